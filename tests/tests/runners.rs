//! Several `pushpull-local esm` processes on one mapping share its shards through leases in the
//! mapping's checkpoint store (`pushpull_local::mapping`, module `lease`), as the Kinesis Client
//! Library's workers do: three runners on an 8-shard stream, the pull function (kinesis-rollup)
//! behind them, records put throughout. Runner A is killed with -9, B stopped with SIGTERM, C
//! started late. Every record is invoked; only records of shards A held at its kill (the batches
//! it had in flight) are invoked twice; the rollup is exact; and per shard the lease history of
//! the runners never overlaps. The times from kill -9 and from SIGTERM to the shard's next
//! invocation are printed here and measured in BENCHMARKS.md (`tests/benches/runners.rs`).
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use pushpull_local::invoke::InvokeServer;
use pushpull_local::pipeline::{Resources, rollup_totals};
use pushpull_tests::runners::{
    Group, handover_delays, held, invocations, invoked_times, now, produce, rollup_env, wait_for_invoked,
};
use pushpull_tests::{function, local, unique};
use serde_json::json;

const FAILOVER_MS: u64 = 3000;
const BATCH: usize = 50;
const USERS: u64 = 7;

/// A stream of `shards` shards and the `bench-floor` function behind a logged Invoke API, for
/// runners with a 2 s failover time.
struct FloorRunners {
    stream: String,
    dir: tempfile::TempDir,
    server: InvokeServer,
    log: std::path::PathBuf,
}

impl FloorRunners {
    async fn new(l: &pushpull_local::localstack::Local, prefix: &str, shards: i32) -> Self {
        let stream = unique(prefix);
        l.ensure_stream(&stream, shards).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let server = InvokeServer::start(vec![function("bench-floor", &[])], 0, 8).await.unwrap();
        let log = dir.path().join("invocations.ndjson");
        server.log_invocations("bench-floor", &log).unwrap();
        FloorRunners { stream, dir, server, log }
    }

    fn group(&self) -> Group {
        Group::new(&self.stream, "bench-floor", &self.server.endpoint(), self.dir.path(), 2000, BATCH)
    }
}

#[tokio::test]
async fn three_runners_share_eight_shards_through_a_kill_a_sigterm_and_a_late_start() {
    let l = local().await;
    let stream = unique("pp-runners");
    let bucket = unique("pp-runners");
    l.ensure_stream(&stream, 8).await.unwrap();
    l.ensure_bucket(&bucket).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = rollup_env(&bucket);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = InvokeServer::start(vec![function("kinesis-rollup", &env)], 0, 16).await.unwrap();
    let log = dir.path().join("invocations.ndjson");
    server.log_invocations("kinesis-rollup", &log).unwrap();
    let mut g = Group::new(&stream, "kinesis-rollup", &server.endpoint(), dir.path(), FAILOVER_MS, BATCH);

    let a = g.start("a", &[]);
    let b = g.start("b", &[]);
    // A and B split the shards 4 and 4 (whoever came first hands over, one shard a cycle).
    g.wait_for("A and B balanced", 8, Duration::from_secs(60), |o| held(o, "a") == 4 && held(o, "b") == 4).await;

    let producer = {
        let (l, stream) = (l.clone(), stream.clone());
        tokio::spawn(async move { produce(&l, &stream, 0, 70, Duration::from_millis(300), USERS).await })
    };
    // A kill with work in flight: once both runners are invoking.
    wait_for_invoked(&log, 500, Duration::from_secs(60)).await;
    let a_shards = g.held_by("a");
    let killed_at = now();
    g.kill(a);
    // B takes A's shards once their leases stop moving for the failover time.
    g.wait_for("B took over A's shards", 8, Duration::from_secs(60), |o| held(o, "b") == 8).await;

    let c = g.start("c", &["--stop-when-idle", "4"]);
    g.wait_for("B and C balanced", 8, Duration::from_secs(60), |o| held(o, "b") == 4 && held(o, "c") == 4).await;
    let b_shards = g.held_by("b");
    let termed_at = now();
    // SIGTERM: B finishes its batches, checkpoints, and releases its leases.
    g.terminate(b);
    let status = g.wait(b, Duration::from_secs(60)).await;
    assert!(status.success(), "B after SIGTERM: {status}\n{}", g.logs());
    let put = producer.await.unwrap();
    let status = g.wait(c, Duration::from_secs(120)).await;
    assert!(status.success(), "C: {status}\n{}", g.logs());

    // Every record invoked; twice only if A had its shard when it was killed.
    let shard_of: HashMap<String, String> = put.iter().cloned().collect();
    let invocations = invocations(&log);
    let times = invoked_times(&invocations);
    let missing = shard_of.keys().filter(|s| !times.contains_key(s.as_str())).count();
    assert_eq!(missing, 0, "{missing} of {} records never invoked", put.len());
    let twice: Vec<(&str, usize)> = times.iter().filter(|(_, n)| **n > 1).map(|(s, n)| (*s, *n)).collect();
    let outside: Vec<_> = twice.iter().filter(|(s, _)| !a_shards.contains(&shard_of[*s])).collect();
    assert!(outside.is_empty(), "invoked twice, not on a shard A held when killed: {outside:?}");
    assert!(twice.len() <= a_shards.len() * BATCH, "{} records invoked twice", twice.len());
    println!(
        "{} records, {} invocations; invoked twice: {} (in flight on A's {} shards at kill -9)",
        put.len(),
        invocations.len(),
        twice.len(),
        a_shards.len()
    );

    // The rollup counted each record once.
    let r = Resources {
        bucket: bucket.clone(),
        input_prefix: String::new(),
        stream: stream.clone(),
        stream_arn: String::new(),
        s3_events_queue: String::new(),
        push_failure_queue: None,
        pull_failure_queue: None,
        push_function: String::new(),
        pull_function: "kinesis-rollup".into(),
    };
    let (totals, _) = rollup_totals(&l, &r).await.unwrap();
    assert_eq!(totals.values().map(|g| g.0).sum::<u64>(), put.len() as u64, "rollup counts: {totals:?}");
    for u in 0..USERS {
        let want = put.len() as u64 / USERS + u64::from((put.len() as u64 % USERS) > u);
        assert_eq!(totals[&format!("u{u}")].0, want, "user u{u}");
    }

    // Lease histories: per shard, B's and C's holdings never overlap, and B took A's shards only
    // after the kill.
    let (sb, sc) = (g.summary("b"), g.summary("c"));
    let mut spans: HashMap<String, Vec<(f64, f64, &str)>> = HashMap::new();
    for (name, s) in [("b", &sb), ("c", &sc)] {
        let mut open: HashMap<String, f64> = HashMap::new();
        for e in s["leases"].as_array().unwrap() {
            let (shard, at) = (e["shard_id"].as_str().unwrap().to_owned(), e["at"].as_f64().unwrap());
            if e["event"] == "taken" {
                if e["from"] == json!("a") {
                    assert!(at >= killed_at, "{name} took {shard} from A before A was killed");
                }
                open.insert(shard, at);
            } else {
                let since = open.remove(&shard).expect("an end without a start");
                spans.entry(shard).or_default().push((since, at, name));
            }
        }
        for (shard, since) in open {
            spans.entry(shard).or_default().push((since, f64::INFINITY, name));
        }
    }
    for (shard, mut s) in spans {
        s.sort_by(|x, y| x.0.total_cmp(&y.0));
        for pair in s.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "{shard} held twice at once: {s:?}");
        }
    }
    assert!(sb["lease_takeovers"].as_u64().unwrap() >= a_shards.len() as u64, "{sb}");
    assert_eq!((&sb["leases_lost"], &sc["leases_lost"]), (&json!(0), &json!(0)));

    // The figures BENCHMARKS.md measures (benches/runners.rs): from kill -9 / SIGTERM to the new
    // owner's first invocation of each shard.
    let show = |what: &str, shards: &HashSet<String>, t0: f64, owner: &serde_json::Value| {
        for (shard, taken, first) in handover_delays(shards, t0, owner, &invocations, &shard_of) {
            println!("{what} {shard}: taken at +{taken:.2} s, first invocation at +{first:.2} s");
        }
    };
    show("kill -9:", &a_shards, killed_at, &sb);
    show("SIGTERM:", &b_shards, termed_at, &sc);
}

/// A runner paused past the failover time (SIGSTOP: a long GC pause, a starved VM) loses its
/// leases to another runner; when it resumes, its next checkpoint write or lease check is refused
/// (compare-and-swap on the lease's version) and it stops reading those shards at once: it never
/// moves a checkpoint again, and no record is invoked twice beyond the batches it had in flight
/// when it was paused.
#[tokio::test]
async fn a_paused_runner_loses_its_leases_and_stops_at_once_when_it_resumes() {
    let l = local().await;
    let f = FloorRunners::new(&l, "pp-paused", 2).await;
    let (stream, log, mut g) = (f.stream.clone(), f.log.clone(), f.group());
    let a = g.start("a", &[]);
    g.wait_for("A holds both shards", 2, Duration::from_secs(60), |o| o.values().all(|x| x.as_deref() == Some("a")))
        .await;
    let producer = {
        let (l, stream) = (l.clone(), stream.clone());
        tokio::spawn(async move { produce(&l, &stream, 0, 40, Duration::from_millis(200), USERS).await })
    };
    wait_for_invoked(&log, 300, Duration::from_secs(60)).await;
    assert!(std::process::Command::new("kill").args(["-STOP", &a.to_string()]).status().unwrap().success());
    let paused_at = now();
    let b = g.start("b", &["--stop-when-idle", "3"]);
    g.wait_for("B took both shards", 2, Duration::from_secs(60), |o| o.values().all(|x| x.as_deref() == Some("b")))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Taken before the signal: A runs again the moment SIGCONT lands, which can be before
    // `kill` returns to us on a loaded machine.
    let resumed_at = now();
    assert!(std::process::Command::new("kill").args(["-CONT", &a.to_string()]).status().unwrap().success());
    let put = producer.await.unwrap();
    assert!(g.wait(b, Duration::from_secs(120)).await.success(), "{}", g.logs());
    g.terminate(a);
    assert!(g.wait(a, Duration::from_secs(60)).await.success(), "{}", g.logs());

    let sa = g.summary("a");
    assert_eq!(sa["leases_lost"], 2, "A found both leases taken: {sa}");
    // Both stopped cleanly: every lease released.
    assert!(g.owners().values().all(|o| o.is_none()), "released at the end: {:?}", g.owners());
    let lost_at: Vec<f64> = sa["leases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "lost")
        .map(|e| e["at"].as_f64().unwrap())
        .collect();
    assert!(lost_at.iter().all(|t| *t >= resumed_at), "lost only once it ran again: {lost_at:?} vs {resumed_at}");
    let inv = invocations(&log);
    let times = invoked_times(&inv);
    assert!(put.iter().all(|(s, _)| times.contains_key(s.as_str())), "every record invoked");
    let twice = times.values().filter(|n| **n > 1).count();
    assert!(twice <= 2 * BATCH, "{twice} records invoked twice: at most the batch in flight on each shard");
    println!("paused {:.1} s; {} records; invoked twice: {twice}", resumed_at - paused_at, put.len());
}

/// A shard split while two runners share the stream: its children start only once the parent is
/// finished, whichever runner holds each, so that order per partition key holds across the split.
/// (The local mapping's rule, as in `esm.rs`'s single-runner test; not quoted: we found no AWS
/// sentence for Lambda's mapping that states it.)
#[tokio::test]
async fn after_a_split_the_children_start_after_their_parent_whoever_holds_them() {
    let l = local().await;
    let f = FloorRunners::new(&l, "pp-split-runners", 4).await;
    let (stream, log, mut g) = (f.stream.clone(), f.log.clone(), f.group());
    let a = g.start("a", &["--stop-when-idle", "3"]);
    let b = g.start("b", &["--stop-when-idle", "3"]);
    g.wait_for("A and B balanced", 4, Duration::from_secs(60), |o| held(o, "a") == 2 && held(o, "b") == 2).await;
    let producer = {
        let (l, stream) = (l.clone(), stream.clone());
        tokio::spawn(async move { produce(&l, &stream, 0, 40, Duration::from_millis(200), USERS).await })
    };
    // Split while both runners are invoking.
    wait_for_invoked(&log, 300, Duration::from_secs(60)).await;
    let parent = pushpull_local::pipeline::split_a_shard(&l, &stream).await.unwrap();
    let put = producer.await.unwrap();
    assert!(g.wait(a, Duration::from_secs(120)).await.success(), "{}", g.logs());
    assert!(g.wait(b, Duration::from_secs(120)).await.success(), "{}", g.logs());

    let shard_of: HashMap<String, String> = put.iter().cloned().collect();
    let inv = invocations(&log);
    let times = invoked_times(&inv);
    assert!(shard_of.keys().all(|s| times.contains_key(s.as_str())), "every record invoked");
    assert!(times.values().all(|n| *n == 1), "no record invoked twice (no runner died)");
    let shards: HashSet<&str> = shard_of.values().map(String::as_str).collect();
    let children: Vec<&str> = shards.iter().copied().filter(|s| *s > "shardId-000000000003").collect();
    assert_eq!(children.len(), 2, "records went to both children: {shards:?}");
    let on = |shard: &str| -> Vec<f64> {
        inv.iter().filter(|(_, s)| s.first().is_some_and(|q| shard_of[q] == shard)).map(|(t, _)| *t).collect()
    };
    let parent_last = on(&parent).into_iter().fold(0.0, f64::max);
    for c in &children {
        let first = on(c).into_iter().fold(f64::INFINITY, f64::min);
        assert!(
            first > parent_last,
            "{c} invoked at {first} before its parent {parent}'s last invocation at {parent_last}"
        );
    }
    let holders: Vec<String> = ["a", "b"]
        .iter()
        .flat_map(|n| {
            let s = g.summary(n);
            s["leases"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["event"] == "taken" && children.contains(&e["shard_id"].as_str().unwrap()))
                .map(|e| format!("{} by {n}", e["shard_id"].as_str().unwrap()))
                .collect::<Vec<_>>()
        })
        .collect();
    println!("{parent} split; its children taken: {holders:?}");
}

/// SIGTERM while a batch cannot finish (the function is unreachable, retried until the records
/// expire): after `--stop-grace-ms` the runner stops the batch, releases its leases with the
/// checkpoint where it was (the records are the next owner's), and exits.
#[tokio::test]
async fn sigterm_with_a_batch_that_cannot_finish_stops_after_the_grace_period() {
    let l = local().await;
    let stream = unique("pp-grace");
    l.ensure_stream(&stream, 2).await.unwrap();
    produce(&l, &stream, 0, 2, Duration::ZERO, USERS).await;
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 9: every invoke fails to connect and is retried.
    let mut g = Group::new(&stream, "bench-floor", "http://127.0.0.1:9", dir.path(), 2000, BATCH);
    let a = g.start("a", &["--stop-grace-ms", "1500"]);
    g.wait_for("A holds both shards", 2, Duration::from_secs(60), |o| o.values().all(|x| x.as_deref() == Some("a")))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let termed = std::time::Instant::now();
    g.terminate(a);
    assert!(g.wait(a, Duration::from_secs(30)).await.success(), "{}", g.logs());
    println!("stopped {:.1} s after SIGTERM (grace 1.5 s)", termed.elapsed().as_secs_f64());
    assert!(g.owners().values().all(|o| o.is_none()), "leases released: {:?}", g.owners());
    let s = g.summary("a");
    assert!(s["invoke_errors"].as_u64().unwrap() + s["throttles"].as_u64().unwrap() > 0, "{s}");
    // Nothing was processed, so no checkpoint moved: the next owner starts at the beginning.
    let cps = g.checkpoint_dir();
    for e in
        std::fs::read_dir(cps).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("shardId"))
    {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
        assert!(v.get("after").is_none(), "{v}");
    }
}
