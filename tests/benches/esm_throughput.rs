//! The local event source mapping against raw GetRecords, same LocalStack, same run.
//!
//!     make bench-esm            # or: cargo bench -p pushpull-tests --bench esm_throughput -- [records] [rounds]
//!     make bench-esm ARGS=0     # the delay part only
//!
//! Needs LocalStack (the make target starts it). One shard is preloaded with `records` records
//! (default 10,000, ~100 bytes each). Then, `rounds` times: raw GetRecords (limit 10,000) from
//! TRIM_HORIZON to the end; and the mapping (BatchSize 100 and 1000, windows 0, 1 and 5 s)
//! from TRIM_HORIZON until every record reached the function (`bench-floor`, which skips the
//! event unparsed). Throughput is records / time to the end of the last invocation.
//!
//! Delay: for each setting, on a fresh stream, a producer sends 120 PutRecords of 20 records 100 ms
//! apart while the mapping runs from LATEST; the delay of a record is the time from its arrival
//! in the stream (approximateArrivalTimestamp) to the start of its first invocation. Baseline in
//! the same run: a reader calling GetRecords back to back, delay measured at its read.
use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ShardIteratorType};
use pushpull::store::Store;
use pushpull_local::invoke::InvokeServer;
use pushpull_local::localstack::{ACCOUNT, Local, REGION};
use pushpull_local::mapping::{Clients, RawSettings, Runner, RunnerOptions, Summary};
use pushpull_tests::{function, unique};

const GRID: [(u32, u32); 6] = [(100, 0), (1000, 0), (100, 1), (1000, 1), (100, 5), (1000, 5)];

fn entries(n: usize, from: usize) -> Vec<PutRecordsRequestEntry> {
    (from..from + n)
        .map(|i| {
            let data = format!(
                r#"{{"user":"u{:03}","amount":"{}.{:02}","i":{i},"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}"#,
                i % 97,
                i % 1000,
                i % 100
            );
            PutRecordsRequestEntry::builder()
                .partition_key(format!("u{}", i % 97))
                .data(Blob::new(data))
                .build()
                .unwrap()
        })
        .collect()
}

async fn put(local: &Local, stream: &str, batch: Vec<PutRecordsRequestEntry>) {
    let mut pending = batch;
    while !pending.is_empty() {
        let out =
            local.kinesis.put_records().stream_name(stream).set_records(Some(pending.clone())).send().await.unwrap();
        pending = out.records().iter().zip(pending).filter(|(r, _)| r.error_code().is_some()).map(|(_, e)| e).collect();
    }
}

async fn raw_get_records(local: &Local, stream: &str, expect: usize) -> f64 {
    let started = Instant::now();
    let it = local.shard_iterators(stream, ShardIteratorType::TrimHorizon).await.unwrap();
    let mut iterator = it[0].1.clone();
    let mut n = 0;
    while n < expect {
        let out = local.kinesis.get_records().shard_iterator(&iterator).limit(10_000).send().await.unwrap();
        n += out.records().len();
        iterator = out.next_shard_iterator().unwrap().to_owned();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Reads `stream` from LATEST with GetRecords back to back until `stop`; the p50 and p95 delay
/// (ms) from each record's arrival to the read that returned it.
async fn raw_delays(local: &Local, stream: &str, stop: tokio::sync::watch::Receiver<bool>) -> (f64, f64) {
    let it = local.shard_iterators(stream, ShardIteratorType::Latest).await.unwrap();
    let mut iterator = it[0].1.clone();
    let mut delays = Vec::new();
    while !*stop.borrow() {
        let out = local.kinesis.get_records().shard_iterator(&iterator).limit(10_000).send().await.unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        for r in out.records() {
            delays.push((now - r.approximate_arrival_timestamp().unwrap().as_secs_f64()) * 1000.0);
        }
        iterator = out.next_shard_iterator().unwrap().to_owned();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    delays.sort_by(f64::total_cmp);
    let p = |q: f64| delays.get(((delays.len().max(1) - 1) as f64 * q) as usize).copied().unwrap_or(0.0);
    (p(0.5), p(0.95))
}

async fn run(
    local: &Local,
    server: &InvokeServer,
    stream: &str,
    bs: u32,
    w: u32,
    latest: bool,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Summary {
    let raw = RawSettings {
        stream: Some(format!("arn:aws:kinesis:{REGION}:{ACCOUNT}:stream/{stream}")),
        function: Some("bench-floor".into()),
        starting_position: Some(if latest { "LATEST" } else { "TRIM_HORIZON" }.into()),
        batch_size: Some(bs.to_string()),
        batching_window: Some(w.to_string()),
        function_response_types: Some("ReportBatchItemFailures".into()),
        ..Default::default()
    };
    let settings = raw.validate().unwrap();
    let dir = std::env::temp_dir().join(unique("esm-bench"));
    // The figures in BENCHMARKS.md were measured with the fast cadence (AWS's is once a second).
    let mut options = RunnerOptions::new(&settings, Store::file(&dir)).fast_polling();
    if !latest {
        options.stop_when_idle = Some(Duration::from_millis(1500));
    }
    let s = Runner::run(settings, options, Clients::from(local), server.client(), stop).await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
    s
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let records: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let rounds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    let local = Local::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let stream = unique("esm-bench");
    local.ensure_stream(&stream, 1).await.unwrap();
    let t = Instant::now();
    for from in (0..records).step_by(500) {
        put(&local, &stream, entries(500.min(records - from), from)).await;
    }
    eprintln!("preloaded {records} records in {:.1} s", t.elapsed().as_secs_f64());
    let mut spec = function("bench-floor", &[]);
    spec.timeout = Duration::from_secs(30);
    let server = InvokeServer::start(vec![spec], 0, 4).await.unwrap();

    let rounds = if records == 0 { 0 } else { rounds }; // 0 records: the delay part only
    println!("## throughput, {records} records preloaded on one shard ({rounds} rounds)\n");
    println!(
        "| round | raw GetRecords rec/s | BatchSize | window s | mapping rec/s | ratio | invocations | mean batch |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for round in 1..=rounds {
        for (bs, w) in GRID {
            let raw = raw_get_records(&local, &stream, records).await;
            let (_tx, rx) = tokio::sync::watch::channel(false);
            let s = run(&local, &server, &stream, bs, w, false, rx).await;
            assert_eq!(s.records_delivered as usize, records, "{s:?}");
            let rate = records as f64 / s.active_s;
            println!(
                "| {round} | {raw:.0} | {bs} | {w} | {rate:.0} | {:.2} | {} | {:.0} |",
                rate / raw,
                s.counts.invocations,
                s.batch_size_mean
            );
        }
    }

    println!("\n## delay from arrival in the stream to invocation, mapping from LATEST on a fresh stream\n");
    println!("A producer sends 120 PutRecords of 20 records, 100 ms apart. Baseline: a reader calling");
    println!("GetRecords back to back (no 5 reads/s limit), delay measured when it reads the record.\n");
    println!(
        "| BatchSize | window s | put rec/s | baseline p50 / p95 ms | mapping p50 ms | p95 ms | max ms | max beyond window ms | invocations | mean batch |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (bs, w) in GRID {
        let fresh = unique("esm-bench-delay");
        local.ensure_stream(&fresh, 1).await.unwrap();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mapping = run(&local, &server, &fresh, bs, w, true, rx.clone());
        let baseline = raw_delays(&local, &fresh, rx);
        let producer = async {
            tokio::time::sleep(Duration::from_millis(1500)).await; // the mapping is polling by now
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for i in 0..120 {
                tick.tick().await;
                put(&local, &fresh, entries(20, i * 20)).await;
            }
            let rate = 2400.0 / started.elapsed().as_secs_f64();
            tokio::time::sleep(Duration::from_secs(u64::from(w) + 2)).await;
            let _ = tx.send(true);
            rate
        };
        let (s, (b50, b95), rate) = tokio::join!(mapping, baseline, producer);
        println!(
            "| {bs} | {w} | {rate:.0} | {b50:.0} / {b95:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.0} |",
            s.delay_ms_p50,
            s.delay_ms_p95,
            s.delay_ms_max,
            s.delay_ms_max - f64::from(w) * 1000.0,
            s.counts.invocations,
            s.batch_size_mean
        );
        let _ = local.kinesis.delete_stream().stream_name(&fresh).send().await;
    }
    let _ = local.kinesis.delete_stream().stream_name(&stream).send().await;
}
