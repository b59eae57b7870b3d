//! Several event source mappings polling one stream under AWS's limits (`realism` profile `aws`):
//! with standard polling they share each shard's 5 GetRecords calls a second and 2 MiB/s.
//!
//!     make bench-consumers      # or: cargo bench -p pushpull-tests --bench consumers
//!
//! Needs LocalStack (the make target starts it). For 1, 2, 3 and 6 mappings at AWS's cadence, and
//! 1, 2 and 3 polling every 200 ms (`--fast-polling`), (each its own function
//! name and checkpoints, as separate consumers are), on a fresh 1-shard stream read through the
//! realism proxy: a producer writes 120 PutRecords of 20 records, 100 ms apart
//! (straight to LocalStack, so that only the readers are limited); the delay of a record is the time
//! from its arrival to its first invocation, per mapping. Throttles are the GetRecords calls the
//! proxy refused (all mappings together). Enhanced fan-out, which gives each consumer its own
//! pipe, is not implemented locally yet (issue #13): this is the polling side of that comparison.
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
        "| polling | mappings | put rec/s | delay p50 ms (each mapping) | delay p95 ms (each mapping) | GetRecords calls | GetRecords throttled |"
    );
    println!("|---|---|---|---|---|---|---|");
    let runs = [(false, 1usize), (false, 2), (false, 3), (false, 6), (true, 1), (true, 2), (true, 3)];
    for (fast, consumers) in runs {
        let realism = Arc::new(Realism::new(RealismConfig::new(Profile::Aws, 7)));
        let proxy = RealismProxy::start(realism.clone(), Policies::default(), &pushpull_local::localstack::endpoint())
            .await
            .unwrap();
        let through_proxy = Local::at(&proxy.endpoint(), "test").await;
        let names: Vec<String> = (0..consumers).map(|i| format!("consumer-{i}")).collect();
        let specs = names
            .iter()
            .map(|n| {
                let mut spec = function("bench-floor", &[]);
                spec.name = n.clone();
                spec
            })
            .collect();
        let server = InvokeServer::start(specs, 0, 4).await.unwrap();
        let stream = unique("consumers");
        local.ensure_stream(&stream, 1).await.unwrap();
        let mut mappings = Vec::new();
        for name in &names {
            let raw = RawSettings {
                stream: Some(format!("arn:aws:kinesis:{REGION}:{ACCOUNT}:stream/{stream}")),
                function: Some(name.clone()),
                starting_position: Some("LATEST".into()),
                batch_size: Some("100".into()),
                ..Default::default()
            };
            let settings = raw.validate().unwrap();
            let mut options =
                RunnerOptions::new(&settings, Store::file(std::env::temp_dir().join(unique("consumers"))));
            if fast {
                options = options.fast_polling();
            }
            let mut clients = Clients::from(&local);
            clients.kinesis = through_proxy.kinesis.clone();
            mappings.push(Runner::start(settings, options, clients, server.client()));
        }
        tokio::time::sleep(Duration::from_secs(3)).await; // every mapping is polling by now
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for i in 0..120 {
            tick.tick().await;
            put(&local, &stream, i * 20).await;
        }
        let rate = 2400.0 / started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let mut p50 = Vec::new();
        let mut p95 = Vec::new();
        let mut calls = 0;
        for m in mappings {
            let s = m.stop().await.unwrap();
            assert_eq!(s.records_delivered, 2400, "every record reached every mapping: {s:?}");
            p50.push(format!("{:.0}", s.delay_ms_p50));
            p95.push(format!("{:.0}", s.delay_ms_p95));
            calls += s.counts.get_records;
        }
        let throttled = realism.faults().counts.get("kinesis.get.throttled").copied().unwrap_or(0);
        let cadence = if fast { "fast (200 ms)" } else { "AWS (1 s)" };
        println!(
            "| {cadence} | {consumers} | {rate:.0} | {} | {} | {calls} | {throttled} |",
            p50.join(", "),
            p95.join(", ")
        );
        let _ = local.kinesis.delete_stream().stream_name(&stream).send().await;
    }
}
