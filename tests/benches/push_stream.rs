//! Push pipeline throughput against raw GetObject throughput of the same object, same run.
//!
//!     make bench-push            # or: cargo bench -p pushpull-tests --bench push_stream -- [MiB] [rounds]  (256 7)
//!
//! Needs LocalStack (the make target starts it). Uploads one NDJSON object (default 256 MiB of
//! ~90-byte lines, 1,000 users), then, `rounds` times and in a rotating order: a raw GetObject
//! read to the end; the full push pipeline (stream, split, check JSON, pick the partition key,
//! batch) into a counting sink, with `PUT_ORDERING=per-key` and `none`. Reports median MiB/s, the
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
use pushpull::store::Store;
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
}

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

    let (mut raw, mut per_key, mut unordered) = (vec![0.0; rounds], vec![0.0; rounds], vec![0.0; rounds]);
    let (mut rss_per_key, mut rss_none): (f64, f64) = (0.0, 0.0);
    for round in 0..rounds {
        // The three runs of a round in a rotating order: whichever runs first after the upload or
        // after another run must not always be the same one.
        for step in 0..3 {
            match (round + step) % 3 {
                0 => {
                    let t = Instant::now();
                    let out = l.s3.get_object().bucket(&bucket).key(key).send().await.unwrap();
                    let mut reader = out.body.into_async_read();
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut n = 0u64;
                    loop {
                        let got = reader.read(&mut buf).await.unwrap();
                        if got == 0 {
                            break;
                        }
                        n += got as u64;
                    }
                    assert_eq!(n as f64, size);
                    raw[round] = size / (1 << 20) as f64 / t.elapsed().as_secs_f64();
                }
                which => {
                    let (ordering, results, rss) = if which == 1 {
                        ("per-key", &mut per_key, &mut rss_per_key)
                    } else {
                        ("none", &mut unordered, &mut rss_none)
                    };
                    let env = Env::from_pairs([("PUT_ORDERING", ordering)]).with_local_locations(dir.path());
                    let settings = PushSettings::from_env(env).unwrap();
                    let cp = dir.path().join(format!("cp-{round}-{ordering}"));
                    let handler = PushHandler::new(
                        settings,
                        S3Source::new(l.s3.clone()),
                        JsonLines::new(Some("user".into())),
                        CountingSink::default(),
                        Store::file(dir.path().join("q")),
                        Store::file(cp),
                    );
                    reset_peak_rss();
                    let t = Instant::now();
                    let summary = handler
                        .process_object(&events[0], &Invocation::unbounded(format!("bench-{round}")))
                        .await
                        .unwrap();
                    results[round] = size / (1 << 20) as f64 / t.elapsed().as_secs_f64();
                    *rss = rss.max(peak_rss_mib());
                    assert_eq!(summary.records, summary.lines, "every line is a record");
                }
            }
        }
        eprintln!(
            "round {}: raw {:.0} MiB/s, per-key {:.0} MiB/s ({:.2}), none {:.0} MiB/s ({:.2})",
            round + 1,
            raw[round],
            per_key[round],
            per_key[round] / raw[round],
            unordered[round],
            unordered[round] / raw[round]
        );
    }
    // Ratios are taken within each round (runs seconds apart), then the median over rounds.
    let mut ratio_per_key: Vec<f64> = (0..rounds).map(|r| per_key[r] / raw[r]).collect();
    let mut ratio_none: Vec<f64> = (0..rounds).map(|r| unordered[r] / raw[r]).collect();
    let (ratio_per_key, ratio_none) = (median(&mut ratio_per_key), median(&mut ratio_none));
    let (raw, per_key, unordered) = (median(&mut raw), median(&mut per_key), median(&mut unordered));
    println!(
        "object: {:.0} MiB NDJSON, 1,000 partition keys; medians of {rounds} rounds (ratios: median of each round's ratio)",
        size / (1 << 20) as f64
    );
    println!("| path | MiB/s | vs raw GetObject | peak RSS MiB |");
    println!("|---|---|---|---|");
    println!("| raw GetObject, read to the end | {raw:.0} | 1.00 | - |");
    println!(
        "| push pipeline, PUT_ORDERING=per-key, counting sink | {per_key:.0} | {ratio_per_key:.2} | {rss_per_key:.1} |"
    );
    println!("| push pipeline, PUT_ORDERING=none, counting sink | {unordered:.0} | {ratio_none:.2} | {rss_none:.1} |");
}
