//! Push pipeline throughput against raw GetObject throughput of the same object, same run.
//!
//!     make bench-push            # or: cargo bench -p pushpull-tests --bench push_stream -- [MiB] [rounds]  (256 7)
//!
//! Needs LocalStack (the make target starts it). Uploads one NDJSON object (default 256 MiB of
//! ~90-byte lines, 1,000 users), then, `rounds` times and in a rotating order: a raw GetObject
//! read to the end; the full push pipeline (stream, split, check JSON, pick the partition key,
//! batch) into a counting sink, with `PUT_ORDERING=per-key` and `none`, and with per-key order and
//! `PUT_AGGREGATION=on` (KPL aggregates for a 2-shard stream: shard prediction by MD5, protobuf,
//! the aggregate's MD5). Reports median MiB/s, the
//! median over rounds of each round's ratio to raw, and the process's peak RSS during the pipeline
//! runs (VmHWM, reset before each run).
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use pushpull::config::{Env, PushSettings};
use pushpull::invocation::Invocation;
use pushpull::push::PushHandler;
use pushpull::push::line::JsonLines;
use pushpull::push::source::S3Source;
use pushpull::s3_notification::S3Notification;
use pushpull::sink::{OutRecord, PutOutcome, RecordSink, SinkError};
use tokio::io::AsyncReadExt;

#[derive(Default)]
struct CountingSink {
    records: AtomicU64,
    bytes: AtomicU64,
}

impl RecordSink for CountingSink {
    async fn put_records(&self, records: &[OutRecord]) -> Result<PutOutcome, SinkError> {
        self.records.fetch_add(records.len() as u64, Ordering::Relaxed);
        self.bytes.fetch_add(records.iter().map(|r| r.data.len() as u64).sum(), Ordering::Relaxed);
        Ok(PutOutcome::all_written("shardId-000000000000", "1"))
    }

    /// Two shards, as the sample stream has.
    async fn shard_map(&self) -> Result<Option<pushpull::sink::ShardMap>, SinkError> {
        let half = u128::MAX / 2;
        Ok(Some(pushpull::sink::ShardMap::new(vec![
            ("shardId-000000000000".into(), 0, half),
            ("shardId-000000000001".into(), half + 1, u128::MAX),
        ])))
    }
}

/// The pipeline runs measured against raw GetObject: name, settings.
const VARIANTS: [(&str, &[(&str, &str)]); 3] = [
    ("PUT_ORDERING=per-key", &[("PUT_ORDERING", "per-key")]),
    ("PUT_ORDERING=none", &[("PUT_ORDERING", "none")]),
    ("PUT_ORDERING=per-key, PUT_AGGREGATION=on", &[("PUT_ORDERING", "per-key"), ("PUT_AGGREGATION", "on")]),
];

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let mib: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(256);
    let rounds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(7);
    let l = pushpull_tests::local().await;
    let bucket = pushpull_tests::unique("pp-bench");
    l.ensure_bucket(&bucket).await.unwrap();
    let key = "input/bench.ndjson";
    {
        let mut body = Vec::with_capacity(mib << 20);
        let mut i = 0u64;
        while body.len() < mib << 20 {
            let line = format!(
                "{{\"id\":{i},\"user\":\"u{:04}\",\"amount\":{:.2},\"ts\":\"2026-11-24T00:{:02}:{:02}Z\"}}\n",
                i % 1000,
                (i * 37 % 10000) as f64 / 100.0,
                (i / 60) % 60,
                i % 60
            );
            body.extend_from_slice(line.as_bytes());
            i += 1;
        }
        l.s3.put_object().bucket(&bucket).key(key).body(body.into()).send().await.unwrap();
    }
    let size = l.s3.head_object().bucket(&bucket).key(key).send().await.unwrap().content_length().unwrap_or(0) as f64;
    let event = pushpull_tests::object_created_event(&l, &bucket, key, "01").await;
    let S3Notification::Records(events) = S3Notification::from_slice(event.as_bytes()).unwrap() else { unreachable!() };
    let dir = tempfile::tempdir().unwrap();

    let n = VARIANTS.len() + 1;
    let mut raw = vec![0.0; rounds];
    let mut runs = vec![vec![0.0; rounds]; VARIANTS.len()];
    let mut rss = vec![0.0f64; VARIANTS.len()];
    for round in 0..rounds {
        // The runs of a round in a rotating order: whichever runs first after the upload or
        // after another run must not always be the same one.
        for step in 0..n {
            match (round + step) % n {
                0 => {
                    let t = Instant::now();
                    let out = l.s3.get_object().bucket(&bucket).key(key).send().await.unwrap();
                    let mut reader = out.body.into_async_read();
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut read = 0u64;
                    loop {
                        let got = reader.read(&mut buf).await.unwrap();
                        if got == 0 {
                            break;
                        }
                        read += got as u64;
                    }
                    assert_eq!(read as f64, size);
                    raw[round] = size / (1 << 20) as f64 / t.elapsed().as_secs_f64();
                }
                which => {
                    let v = which - 1;
                    // Checkpoints of their own for each round and variant, so none finds the object done.
                    let cp = format!("file://{}", dir.path().join(format!("cp-{round}-{v}")).display());
                    let env = Env::from_pairs(VARIANTS[v].1.iter().copied().chain([("CHECKPOINT_URI", cp.as_str())]))
                        .with_local_locations(dir.path());
                    let settings = PushSettings::from_env(env).unwrap();
                    let handler = PushHandler::builder(settings)
                        .source(S3Source::new(l.s3.clone()))
                        .lines(JsonLines::new(Some("user".into())))
                        .sink(CountingSink::default())
                        .build();
                    reset_peak_rss();
                    let t = Instant::now();
                    let summary = handler
                        .process_object(&events[0], &Invocation::unbounded(format!("bench-{round}")))
                        .await
                        .unwrap();
                    runs[v][round] = size / (1 << 20) as f64 / t.elapsed().as_secs_f64();
                    rss[v] = rss[v].max(peak_rss_mib());
                    assert_eq!(summary.records, summary.lines, "every line is a record");
                    if VARIANTS[v].0.contains("AGGREGATION") {
                        assert!(summary.put_records * 100 < summary.records, "aggregated: {summary:?}");
                    }
                }
            }
        }
        let ratios: Vec<String> = (0..VARIANTS.len())
            .map(|v| format!("{:.0} MiB/s ({:.2})", runs[v][round], runs[v][round] / raw[round]))
            .collect();
        eprintln!("round {}: raw {:.0} MiB/s, {}", round + 1, raw[round], ratios.join(", "));
    }
    println!(
        "object: {:.0} MiB NDJSON, 1,000 partition keys; medians of {rounds} rounds (ratios: median of each round's ratio)",
        size / (1 << 20) as f64
    );
    println!("| path | MiB/s | vs raw GetObject | peak RSS MiB |");
    println!("|---|---|---|---|");
    println!("| raw GetObject, read to the end | {:.0} | 1.00 | - |", median(&mut raw.clone()));
    for (v, (name, _)) in VARIANTS.iter().enumerate() {
        // Ratios are taken within each round (runs seconds apart), then the median over rounds.
        let mut ratios: Vec<f64> = (0..rounds).map(|r| runs[v][r] / raw[r]).collect();
        println!(
            "| push pipeline, {name}, counting sink | {:.0} | {:.2} | {:.1} |",
            median(&mut runs[v].clone()),
            median(&mut ratios),
            rss[v]
        );
    }
}
