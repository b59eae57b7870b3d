//! The rollup's per-key positions against what a ParallelizationFactor above 1 does to one
//! shard, in process (file stores, no LocalStack): ten lanes by partition key invoking at once,
//! each retrying a failed batch (whole or bisected) and moving on only after it succeeds;
//! invocations killed at random moments (between any two steps of the protocol) and at their
//! deadline; the runner killed now and then, its in-flight invocations running on while the
//! next runner redelivers from the shard's committed prefix, grouped otherwise. Every record must
//! be counted once: the totals per user equal what was sent, and a user's outputs never overlap.
//!
//! AWS (Lambda developer guide, "Using Lambda with Kinesis Data Streams", Polling and batching
//! streams): "When you increase the number of concurrent batches per shard, Lambda still ensures
//! in-order processing at the partition-key level."
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kinesis_rollup::settings::{Positions, RollupSettings};
use kinesis_rollup::{RollupError, RollupHandler};
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

/// Every output's rows: (user, count, first sequence, last sequence).
fn rows(dir: &Path) -> Vec<(String, u64, u64, u64)> {
    let mut out = Vec::new();
    let Ok(files) = std::fs::read_dir(dir.join("out/s/shardId-0")) else { return out };
    for f in files.flatten() {
        for l in std::fs::read_to_string(f.path()).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let seq = |k: &str| v[k].as_str().unwrap().parse::<u64>().unwrap();
            out.push((
                v["key"].as_str().unwrap().to_owned(),
                v["count"].as_u64().unwrap(),
                seq("first_sequence"),
                seq("last_sequence"),
            ));
        }
    }
    out
}

/// How invocations ended, over a run.
#[derive(Default)]
struct Seen {
    busy: AtomicU64,
    killed: AtomicU64,
    given_up: AtomicU64,
}

/// Each invocation's deadline: Lambda stops an invocation there (here: its future is dropped,
/// at an await point, as a killed process stops between two calls).
const DEADLINE: Duration = Duration::from_millis(400);

/// Invokes until a batch succeeds whole, bisecting after a failure (at random, as
/// BisectBatchOnFunctionError would, or retrying it whole). One invocation in five fails before
/// the function sees it, as the storm's injected failures do; one in six is killed at a random
/// moment before its deadline (a crash between any two steps of the rollup's protocol).
async fn deliver(h: &RollupHandler, batch: Vec<(u64, usize)>, rng: &mut fastrand::Rng, seen: &Seen) {
    let mut queue = vec![batch];
    let mut failures = 0;
    while let Some(b) = queue.pop() {
        let ok = if rng.f64() < 0.2 {
            false
        } else {
            let deadline = SystemTime::now() + DEADLINE;
            let unix = deadline.duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
            // Killed within the few milliseconds an invocation takes here: between two of its steps.
            let limit = if rng.f64() < 1.0 / 6.0 { Duration::from_micros(rng.u64(0..3000)) } else { DEADLINE };
            match tokio::time::timeout(limit, h.handle_until(&event(&b), Some(unix))).await {
                Err(_) => {
                    seen.killed.fetch_add(1, Ordering::Relaxed);
                    false
                }
                Ok(Ok(r)) => {
                    serde_json::to_value(&r).unwrap()["batchItemFailures"].as_array().is_none_or(|f| f.is_empty())
                }
                Ok(Err(RollupError::Busy { .. })) => {
                    seen.busy.fetch_add(1, Ordering::Relaxed);
                    false
                }
                Ok(Err(_)) => false,
            }
        };
        if !ok {
            // The mapping's MaximumRetryAttempts: a batch that keeps failing is given up (its
            // records then miss from the totals, and the run fails on them).
            failures += 1;
            if failures > 300 {
                seen.given_up.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if b.len() > 1 && rng.bool() {
                let (a, c) = b.split_at(b.len() / 2);
                queue.push(c.to_vec());
                queue.push(a.to_vec());
            } else {
                queue.push(b);
            }
            tokio::time::sleep(Duration::from_millis(rng.u64(5..50))).await;
        }
    }
}

async fn run(seed: u64, seen: Arc<Seen>) {
    let dir = tempfile::tempdir().unwrap();
    // A write that began before its deadline lands within milliseconds here (a file).
    let h = Arc::new(handler(dir.path()).with_note_margin(Duration::from_millis(100)));
    let mut rng = fastrand::Rng::with_seed(seed);
    let n = 1000u64;
    let records: Vec<(u64, usize)> = (1..=n).map(|s| (s, rng.usize(..KEYS))).collect();
    let lane_of = |key: usize| key % LANES;
    // The shard's committed prefix: records before it are done in every lane.
    let done = Arc::new(std::sync::Mutex::new(vec![false; records.len()]));
    let mut from = 0usize;
    let mut ghosts = Vec::new();
    while from < records.len() {
        // A runner: each lane reads its records from the committed prefix on, in batches, one
        // batch at a time, the next only once the last succeeded. The runner is killed at one
        // moment (a SIGKILL): its lanes stop, the batches in flight run on (ghosts), and the
        // next runner starts at once from the committed prefix.
        let runner_seed = rng.u64(..);
        let (kill, killed) = tokio::sync::watch::channel(false);
        let mut lanes = Vec::new();
        for lane in 0..LANES {
            let mine: Vec<(usize, (u64, usize))> = records
                .iter()
                .enumerate()
                .skip(from)
                .filter(|(_, r)| lane_of(r.1) == lane)
                .map(|(i, r)| (i, *r))
                .collect();
            let (h, done, seen, mut killed) = (h.clone(), done.clone(), seen.clone(), killed.clone());
            lanes.push(tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(runner_seed ^ lane as u64);
                let mut at = 0;
                while at < mine.len() && !*killed.borrow() {
                    let size = rng.usize(1..=40).min(mine.len() - at);
                    let batch: Vec<(u64, usize)> = mine[at..at + size].iter().map(|(_, r)| *r).collect();
                    let mut task = {
                        let (h, seen) = (h.clone(), seen.clone());
                        let mut rng = fastrand::Rng::with_seed(rng.u64(..));
                        tokio::spawn(async move { deliver(&h, batch, &mut rng, &seen).await })
                    };
                    tokio::select! {
                        finished = &mut task => finished.unwrap(),
                        _ = killed.wait_for(|k| *k) => return Some(task),
                    }
                    let mut d = done.lock().unwrap();
                    for (i, _) in &mine[at..at + size] {
                        d[*i] = true;
                    }
                    at += size;
                }
                None
            }));
        }
        // Kill this runner after a while, unless its lanes finish first.
        let life = Duration::from_millis(rng.u64(2..40));
        let all = futures_util::future::join_all(lanes);
        tokio::pin!(all);
        let ended = tokio::select! {
            ended = &mut all => ended,
            () = tokio::time::sleep(life) => {
                let _ = kill.send(true);
                all.await
            }
        };
        ghosts.extend(ended.into_iter().filter_map(|r| r.unwrap()));
        let d = done.lock().unwrap();
        while from < records.len() && d[from] {
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
    let rows = rows(dir.path());
    let mut got: BTreeMap<String, u64> = BTreeMap::new();
    for (user, count, _, _) in &rows {
        *got.entry(user.clone()).or_default() += count;
    }
    assert_eq!(got, want, "seed {seed}: counts per user");
    // Each user's outputs hold disjoint runs of its records: nothing counted twice and missed
    // elsewhere in the same user's total.
    let mut by_user: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
    for (user, _, first, last) in &rows {
        by_user.entry(user).or_default().push((*first, *last));
    }
    for (user, mut runs) in by_user {
        runs.sort();
        assert!(runs.windows(2).all(|w| w[0].1 < w[1].0), "seed {seed}: {user}'s outputs overlap: {runs:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_lanes_with_retries_bisection_crashes_and_killed_runners_count_every_record_once_per_key() {
    let seen = Arc::new(Seen::default());
    for seed in 0..6 {
        let stalled = tokio::time::timeout(Duration::from_secs(120), run(seed, seen.clone())).await;
        assert!(stalled.is_ok(), "seed {seed}: the run stalled");
        assert_eq!(seen.given_up.load(Ordering::Relaxed), 0, "seed {seed}: a batch failed for good");
    }
    // The run exercised what it is about: keys claimed by an invocation still at work (or dead
    // with its note) refused others, and invocations died mid-way.
    assert!(seen.busy.load(Ordering::Relaxed) > 0, "no invocation found its keys claimed");
    assert!(seen.killed.load(Ordering::Relaxed) > 0, "no invocation was killed");
}
