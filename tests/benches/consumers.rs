//! Several event source mappings reading one stream under AWS's limits (`realism` profile `aws`):
//! with standard polling they share each shard's 5 GetRecords calls a second and 2 MiB/s; with
//! enhanced fan-out each reads through its own stream consumer (`SubscribeToShard`, its own
//! 2 MiB/s per shard).
//!
//!     make bench-consumers      # or: cargo bench -p pushpull-tests --bench consumers
//!
//! Needs LocalStack (the make target starts it). For 1, 2, 3 and 6 mappings at AWS's cadence,
//! 1, 2 and 3 polling every 200 ms (`--fast-polling`), and 1, 2, 3 and 6 with enhanced fan-out
//! (each its own function name, checkpoints and consumer, as separate consumers are), on a fresh
//! 1-shard stream read through the realism proxy: a producer writes 120 PutRecords of 20 records,
//! 100 ms apart, through the proxy (as the push function does); the delay of a record is the time
//! from its arrival to its first invocation, per mapping. Throttles are the GetRecords calls the
//! proxy refused (all mappings together). The last line is the floor of any read here: one
//! GetRecords round trip to LocalStack on a caught-up shard, measured in the same run.
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use pushpull::store::Store;
use pushpull_local::invoke::InvokeServer;
use pushpull_local::localstack::{ACCOUNT, Local, REGION};
use pushpull_local::mapping::{Clients, RawSettings, Runner, RunnerOptions};
use pushpull_local::realism::iam::Policies;
use pushpull_local::realism::proxy::RealismProxy;
use pushpull_local::realism::{Profile, Realism, RealismConfig};
use pushpull_tests::{function, unique};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Read {
    Aws,
    Fast,
    FanOut,
}

async fn put(local: &Local, stream: &str, from: usize) {
    let mut pending: Vec<PutRecordsRequestEntry> = (from..from + 20)
        .map(|i| {
            PutRecordsRequestEntry::builder()
                .partition_key(format!("u{}", i % 97))
                .data(Blob::new(format!(r#"{{"user":"u{:03}","amount":1,"i":{i}}}"#, i % 97)))
                .build()
                .unwrap()
        })
        .collect();
    while !pending.is_empty() {
        let out =
            local.kinesis.put_records().stream_name(stream).set_records(Some(pending.clone())).send().await.unwrap();
        pending = out.records().iter().zip(pending).filter(|(r, _)| r.error_code().is_some()).map(|(_, e)| e).collect();
    }
}

#[tokio::main]
async fn main() {
    let local = Local::connect().await.unwrap_or_else(|e| panic!("{e}"));
    println!(
        "| reading | mappings | put rec/s | delay p50 ms (each mapping) | delay p95 ms (each mapping) | GetRecords calls | GetRecords throttled | subscriptions |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let only_fan_out = std::env::args().any(|a| a == "fan-out");
    let runs = [
        (Read::Aws, 1usize),
        (Read::Aws, 2),
        (Read::Aws, 3),
        (Read::Aws, 6),
        (Read::Fast, 1),
        (Read::Fast, 2),
        (Read::Fast, 3),
        (Read::FanOut, 1),
        (Read::FanOut, 2),
        (Read::FanOut, 3),
        (Read::FanOut, 6),
    ];
    // Stream and consumer names avoid the word "consumer": kinesis-mock misreads such a consumer's ARN.
    for (read, consumers) in runs.into_iter().filter(|(r, _)| !only_fan_out || *r == Read::FanOut) {
        let realism = Arc::new(Realism::new(RealismConfig::new(Profile::Aws, 7)));
        let proxy = RealismProxy::start(realism.clone(), Policies::default(), &pushpull_local::localstack::endpoint())
            .await
            .unwrap();
        let through_proxy = Local::at(&proxy.endpoint(), "test").await;
        let names: Vec<String> = (0..consumers).map(|i| format!("reader-{i}")).collect();
        let specs = names
            .iter()
            .map(|n| {
                let mut spec = function("bench-floor", &[]);
                spec.name = n.clone();
                spec
            })
            .collect();
        let server = InvokeServer::start(specs, 0, 4).await.unwrap();
        let stream = unique("readers");
        let stream_arn = local.ensure_stream(&stream, 1).await.unwrap();
        let mut mappings = Vec::new();
        for name in &names {
            let source = match read {
                Read::FanOut => local.ensure_consumer(&stream_arn, name).await.unwrap(),
                _ => format!("arn:aws:kinesis:{REGION}:{ACCOUNT}:stream/{stream}"),
            };
            let raw = RawSettings {
                stream: Some(source),
                function: Some(name.clone()),
                starting_position: Some("LATEST".into()),
                batch_size: Some("100".into()),
                ..Default::default()
            };
            let settings = raw.validate().unwrap();
            let mut options =
                RunnerOptions::new(&settings, Store::file(std::env::temp_dir().join(unique("consumers"))));
            if read == Read::Fast {
                options = options.fast_polling();
            }
            let mut clients = Clients::from(&local);
            clients.kinesis = match read {
                Read::FanOut => pushpull_local::http2::kinesis(&proxy.endpoint(), "test").await,
                _ => through_proxy.kinesis.clone(),
            };
            mappings.push(Runner::start(settings, options, clients, server.client()));
        }
        tokio::time::sleep(Duration::from_secs(3)).await; // every mapping is polling by now
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for i in 0..120 {
            tick.tick().await;
            put(&through_proxy, &stream, i * 20).await;
        }
        let rate = 2400.0 / started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let mut p50 = Vec::new();
        let mut p95 = Vec::new();
        let (mut calls, mut subscriptions) = (0, 0);
        for m in mappings {
            let s = m.stop().await.unwrap();
            assert_eq!(s.records_delivered, 2400, "every record reached every mapping: {s:?}");
            p50.push(format!("{:.0}", s.delay_ms_p50));
            p95.push(format!("{:.0}", s.delay_ms_p95));
            calls += s.counts.get_records;
            subscriptions += s.counts.subscriptions;
        }
        let throttled = realism.faults().counts.get("kinesis.get.throttled").copied().unwrap_or(0);
        let how = match read {
            Read::Aws => "polling, AWS (1 s)",
            Read::Fast => "polling, fast (200 ms)",
            Read::FanOut => "enhanced fan-out",
        };
        println!(
            "| {how} | {consumers} | {rate:.0} | {} | {} | {calls} | {throttled} | {subscriptions} |",
            p50.join(", "),
            p95.join(", ")
        );
        let _ = local.kinesis.delete_stream().stream_name(&stream).send().await;
    }
    // The floor of any read: a GetRecords round trip on a caught-up shard (50 calls).
    let stream = unique("readers-floor");
    local.ensure_stream(&stream, 1).await.unwrap();
    let it = local
        .kinesis
        .get_shard_iterator()
        .stream_name(&stream)
        .shard_id("shardId-000000000000")
        .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::Latest)
        .send()
        .await
        .unwrap();
    let mut it = it.shard_iterator().unwrap_or_default().to_owned();
    let mut times = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let out = local.kinesis.get_records().shard_iterator(&it).send().await.unwrap();
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        it = out.next_shard_iterator().unwrap_or_default().to_owned();
    }
    times.sort_by(f64::total_cmp);
    println!(
        "\nGetRecords round trip to LocalStack (caught up, 50 calls): p50 {:.1} ms, p95 {:.1} ms",
        times[25], times[47]
    );
    let _ = local.kinesis.delete_stream().stream_name(&stream).send().await;
}
