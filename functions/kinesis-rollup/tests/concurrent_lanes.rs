//! The rollup's per-key positions against what a ParallelizationFactor above 1 does to one
//! shard, in process (file stores, no LocalStack): ten lanes by partition key invoking at once,
//! each retrying a failed batch (whole or bisected) and moving on only after it succeeds; a
//! runner killed now and then, whose in-flight invocations run on while the next runner
//! redelivers from the shard's committed prefix, grouped otherwise. Every record must be counted
//! once: the totals per user equal what was sent.
//!
//! AWS (Lambda developer guide, "Using Lambda with Kinesis Data Streams", Polling and batching
//! streams): "When you increase the number of concurrent batches per shard, Lambda still ensures
//! in-order processing at the partition-key level."
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use kinesis_rollup::RollupHandler;
use kinesis_rollup::settings::{Positions, RollupSettings};
use pushpull::config::Env;
use pushpull::store::Store;

const LANES: usize = 10;
const KEYS: usize = 40;

fn handler(dir: &Path) -> RollupHandler {
    let mut settings = RollupSettings::from_env(
        Env::from_pairs([("GROUP_BY_FIELD", "user"), ("SUM_FIELD", "amount")]).with_local_locations(dir),
    )
    .unwrap();
    settings.positions = Positions::PerKey;
    RollupHandler::new(settings, Store::file(dir.join("out")), Store::file(dir.join("cp")))
}

/// Record `seq` of shard 0, partition key and user `k{key}`.
fn record(seq: u64, key: usize) -> String {
    use base64::Engine as _;
    let line = format!(r#"{{"user":"k{key}","amount":1}}"#);
    let data = base64::engine::general_purpose::STANDARD.encode(line);
    format!(
        r#"{{"kinesis":{{"partitionKey":"k{key}","sequenceNumber":"{seq}","data":"{data}","approximateArrivalTimestamp":1}},"eventID":"shardId-0:{seq}","eventSourceARN":"arn:aws:kinesis:us-east-1:1:stream/s"}}"#
    )
}

fn event(records: &[(u64, usize)]) -> Vec<u8> {
    let body: Vec<String> = records.iter().map(|&(s, k)| record(s, k)).collect();
    format!(r#"{{"Records":[{}]}}"#, body.join(",")).into_bytes()
}

/// Every output's counts per user.
fn totals(dir: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(files) = std::fs::read_dir(dir.join("out/s/shardId-0")) else { return out };
    for f in files.flatten() {
        for l in std::fs::read_to_string(f.path()).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            *out.entry(v["key"].as_str().unwrap().to_owned()).or_default() += v["count"].as_u64().unwrap();
        }
    }
    out
}

/// Invokes until a batch succeeds whole, bisecting after a failure (at random, as
/// BisectBatchOnFunctionError would, or retrying it whole). One invocation in five fails before
/// the function sees it, as the storm's injected failures do.
async fn deliver(h: &RollupHandler, batch: Vec<(u64, usize)>, rng: &mut fastrand::Rng) {
    let mut queue = vec![batch];
    while let Some(b) = queue.pop() {
        let ok = if rng.f64() < 0.2 {
            false
        } else {
            match h.handle(&event(&b)).await {
                Ok(r) => serde_json::to_value(&r).unwrap()["batchItemFailures"].as_array().is_none_or(|f| f.is_empty()),
                Err(_) => false,
            }
        };
        if !ok {
            if b.len() > 1 && rng.bool() {
                let (a, c) = b.split_at(b.len() / 2);
                queue.push(c.to_vec());
                queue.push(a.to_vec());
            } else {
                queue.push(b);
            }
            tokio::task::yield_now().await;
        }
    }
}

async fn run(seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let h = Arc::new(handler(dir.path()));
    let mut rng = fastrand::Rng::with_seed(seed);
    let n = 1500u64;
    let records: Vec<(u64, usize)> = (1..=n).map(|s| (s, rng.usize(..KEYS))).collect();
    let lane_of = |key: usize| key % LANES;
    // The shard's committed prefix: records before it are done in every lane.
    let mut done = vec![false; records.len()];
    let mut from = 0usize;
    let mut ghosts = Vec::new();
    while from < records.len() {
        // A runner: each lane reads its records from the committed prefix on, in batches.
        let runner_seed = rng.u64(..);
        let kill_after = rng.usize(1..6);
        let mut lanes = Vec::new();
        for lane in 0..LANES {
            let mine: Vec<(usize, (u64, usize))> = records
                .iter()
                .enumerate()
                .skip(from)
                .filter(|(_, r)| lane_of(r.1) == lane)
                .map(|(i, r)| (i, *r))
                .collect();
            let h = h.clone();
            lanes.push(tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(runner_seed ^ lane as u64);
                let mut finished = Vec::new();
                let mut at = 0;
                let mut batches = 0;
                while at < mine.len() {
                    let size = rng.usize(1..=40).min(mine.len() - at);
                    let batch: Vec<(u64, usize)> = mine[at..at + size].iter().map(|(_, r)| *r).collect();
                    let task = {
                        let h = h.clone();
                        let mut rng = fastrand::Rng::with_seed(rng.u64(..));
                        tokio::spawn(async move { deliver(&h, batch, &mut rng).await })
                    };
                    batches += 1;
                    if batches > kill_after && rng.f64() < 0.3 {
                        // Killed with this batch in flight: it runs on; nothing after it is read.
                        return (finished, Some(task));
                    }
                    task.await.unwrap();
                    finished.extend(mine[at..at + size].iter().map(|(i, _)| *i));
                    at += size;
                }
                (finished, None)
            }));
        }
        for lane in lanes {
            let (finished, ghost) = lane.await.unwrap();
            for i in finished {
                done[i] = true;
            }
            ghosts.extend(ghost);
        }
        while from < records.len() && done[from] {
            from += 1;
        }
    }
    for g in ghosts {
        g.await.unwrap();
    }
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for (_, k) in &records {
        *want.entry(format!("k{k}")).or_default() += 1;
    }
    assert_eq!(totals(dir.path()), want, "seed {seed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_lanes_with_retries_bisection_and_killed_runners_count_every_record_once_per_key() {
    for seed in 0..16 {
        run(seed).await;
    }
}
