//! Several local mapping runners on one 8-shard stream (`pushpull-local esm` processes sharing
//! leases): how long a shard goes unread after its runner dies or leaves, and what 1, 2 and 3
//! runners read.
//!
//!     make bench-runners              # or: cargo build --release -p pushpull-local &&
//!                                     #     cargo bench -p pushpull-tests --bench runners -- [rounds] [records]
//!
//! Needs LocalStack (the make target starts it). The function is `bench-floor` (receives the
//! event, skips it unparsed), behind an Invoke API that logs when each invocation starts.
//!
//! Handover, `rounds` times on a fresh stream, with the default failover time (10 s): runners A
//! and B share the shards 4 and 4 while 100 records are put every 200 ms; A is killed with -9;
//! once B holds all 8, C starts; once B and C hold 4 each, B gets SIGTERM. For each shard that
//! changed hands: the time from the kill (or the SIGTERM) to the new owner's first invocation of
//! it. Targets (issue 15): at most the failover time + 2 s after kill -9, at most 2 s after
//! SIGTERM.
//!
//! Throughput: `records` records (default 24,000) put first; then 1, 2 and 3 runners started at
//! once, each stopping when idle; records / time from the start to the last invocation's start.
use std::time::Duration;

use pushpull_local::invoke::InvokeServer;
use pushpull_local::localstack::Local;
use pushpull_tests::runners::{Group, handover_delays, held, invocations, now, produce, put_round};
use pushpull_tests::{function, unique};

const SHARDS: usize = 8;

fn quantiles(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    format!("median {:.2} s, max {:.2} s ({} shards)", q(0.5), q(1.0), v.len())
}

async fn handover(l: &Local, server: &InvokeServer, log: &std::path::Path) -> (Vec<f64>, Vec<f64>) {
    let stream = unique("bench-runners");
    l.ensure_stream(&stream, SHARDS as i32).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut g = Group::new(&stream, "bench-floor", &server.endpoint(), dir.path(), 10_000, 100);
    let a = g.start("a", &[]);
    let b = g.start("b", &[]);
    let limit = Duration::from_secs(120);
    g.wait_for("A and B balanced", SHARDS, limit, |o| held(o, "a") == 4 && held(o, "b") == 4).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let (l, stream, stop) = (l.clone(), stream.clone(), stop.clone());
        tokio::spawn(async move {
            let mut put = std::collections::HashMap::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                put.extend(put_round(&l, &stream, n, 7).await);
                n += 100;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            put
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let a_shards = g.held_by("a");
    let killed_at = now();
    g.kill(a);
    g.wait_for("B took A's shards", SHARDS, limit, |o| held(o, "b") == SHARDS).await;
    let c = g.start("c", &[]);
    g.wait_for("B and C balanced", SHARDS, limit, |o| held(o, "b") == 4 && held(o, "c") == 4).await;
    let b_shards = g.held_by("b");
    let termed_at = now();
    g.terminate(b);
    assert!(g.wait(b, limit).await.success());
    // Let C read B's shards for a while, then stop it too.
    tokio::time::sleep(Duration::from_secs(5)).await;
    g.terminate(c);
    assert!(g.wait(c, limit).await.success());
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let shard_of = producer.await.unwrap();
    let inv = invocations(log);
    let (sb, sc) = (g.summary("b"), g.summary("c"));
    let kill = handover_delays(&a_shards, killed_at, &sb, &inv, &shard_of).into_iter().map(|(_, _, f)| f).collect();
    let term = handover_delays(&b_shards, termed_at, &sc, &inv, &shard_of).into_iter().map(|(_, _, f)| f).collect();
    l.kinesis.delete_stream().stream_name(&stream).send().await.ok();
    (kill, term)
}

async fn throughput(l: &Local, server: &InvokeServer, log: &std::path::Path, runners: usize, records: u64) -> f64 {
    let stream = unique("bench-runners-tp");
    l.ensure_stream(&stream, SHARDS as i32).await.unwrap();
    produce(l, &stream, 0, records / 100, Duration::ZERO, 7).await;
    let dir = tempfile::tempdir().unwrap();
    let mut g = Group::new(&stream, "bench-floor", &server.endpoint(), dir.path(), 10_000, 100);
    let _ = std::fs::remove_file(log);
    server.log_invocations("bench-floor", log).unwrap();
    let started = now();
    let pids: Vec<u32> = (0..runners).map(|i| g.start(&format!("r{i}"), &["--stop-when-idle", "3"])).collect();
    for pid in pids {
        assert!(g.wait(pid, Duration::from_secs(600)).await.success());
    }
    let inv = invocations(log);
    let n: usize = inv.iter().map(|(_, s)| s.len()).sum();
    assert!(n as u64 >= records, "{n} of {records} records invoked");
    let last = inv.iter().map(|(t, _)| *t).fold(started, f64::max);
    l.kinesis.delete_stream().stream_name(&stream).send().await.ok();
    records as f64 / (last - started)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let rounds: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(3);
    let records: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(24_000);
    let l = Local::connect().await.unwrap_or_else(|e| panic!("{e}"));
    let server = InvokeServer::start(vec![function("bench-floor", &[])], 0, 16).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("invocations.ndjson");
    server.log_invocations("bench-floor", &log).unwrap();

    let (mut kill, mut term) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (k, t) = handover(&l, &server, &log).await;
        println!("round {round}: kill -9 -> first invocation {k:.2?} s; SIGTERM -> {t:.2?} s");
        kill.extend(k);
        term.extend(t);
    }
    if rounds > 0 {
        println!("kill -9 (failover 10 s) -> the new owner's first invocation: {}", quantiles(kill));
        println!("SIGTERM -> the new owner's first invocation: {}", quantiles(term));
    }
    let mut base = 0.0;
    for n in 1..=3 {
        let rate = throughput(&l, &server, &log, n, records).await;
        if n == 1 {
            base = rate;
        }
        println!(
            "{n} runner(s), {SHARDS} shards, {records} records: {rate:.0} records/s ({:.2}x one runner)",
            rate / base
        );
    }
}
