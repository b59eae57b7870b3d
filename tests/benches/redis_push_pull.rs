//! Redis both ways, the same workload: pub/sub through the local relay (push) against a stream
//! through the local Streams mapping (pull: `XREADGROUP ... BLOCK`), in one run, on Redis servers
//! of the bench's own (Debian's redis-server).
//!
//!     make bench-redis    # or: cargo bench -p pushpull-tests --features integration --bench redis_push_pull -- [rate] [seconds] [idle seconds]
//!
//! **The function** is `bench-floor` taking 20 ms an invocation (`BENCH_FLOOR_SLEEP_MS`), two
//! at a time, ten messages an invocation at most (the relay's `max_batch`, the mapping's
//! BatchSize): it handles 100 invocations a second, so about 1,000 messages a second when batches
//! are full, whichever way they come.
//!
//! **Low load**: 50 messages a second for `seconds` (default 10). **Overload**: `rate` (default
//! 2,000) a second for as long, twice what the function handles, with Redis's buffer for a slow
//! pub/sub subscriber at `256kb 64kb 1` (the pipeline's `--overload`). Each row: messages sent,
//! delivered, lost (sent and never delivered once the reader is idle), duplicated (delivered more
//! than once), delay from the send to the invocation (p50, p99), and what the broker still held
//! when the producer stopped (the stream's unread entries; a channel holds nothing: what the
//! subscriber did not read is dropped). **Idle**: requests the reader makes of Redis in an idle
//! minute (measured over `idle seconds`, default 20): the relay none (Redis pushes), the mapping one
//! `XREADGROUP` per `BLOCK` (1 s) and a claim every 5 s (its caught-up check, `XINFO GROUPS` every
//! 500 ms, is the emulator's own and not counted). Messages of 100 bytes.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use pushpull::store::Store;
use pushpull_local::invoke::InvokeServer;
use pushpull_local::mapping::{Clients, Delivered, RawSettings, RedisStreamSource, Runner, RunnerOptions};
use pushpull_local::relay::{RelayConfig, RunningRelay};
use pushpull_local::runtime_api::FunctionSpec;
use pushpull_tests::function;
use pushpull_tests::redis::OwnRedis;
use tokio::sync::mpsc;

const SLEEP_MS: &str = "20";
const CONCURRENCY: usize = 2;
const BATCH: usize = 10;
const LOW_RATE: u64 = 50;

struct Row {
    name: &'static str,
    load: String,
    sent: u64,
    delivered: u64,
    lost: u64,
    duplicated: u64,
    p50: f64,
    p99: f64,
    held: u64,
}

/// Sends `rate` messages a second for `seconds` (each a 100-byte body starting with its number),
/// by PUBLISH or XADD; the send time of each message's hash, and what the stream held at the end.
async fn produce(redis: &OwnRedis, key: &str, pubsub: bool, rate: u64, seconds: u64) -> HashMap<u64, f64> {
    let mut c = redis.client().get_multiplexed_async_connection().await.unwrap();
    let mut sent = HashMap::new();
    let started = Instant::now();
    // A pipeline of sends every 10 ms (every 1/rate s below 100 a second).
    let tick = Duration::from_millis(10).max(Duration::from_secs(1) / rate.max(1) as u32);
    let per_tick = (rate * tick.as_millis() as u64 / 1000).max(1);
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        let mut pipe = redis::pipe();
        let now = pushpull_local::mapping::now_unix();
        for _ in 0..per_tick {
            let body = format!("{n:012}{}", "x".repeat(88));
            sent.insert(xxhash_rust::xxh3::xxh3_64(body.as_bytes()), now);
            match pubsub {
                true => pipe.cmd("PUBLISH").arg(key).arg(&body).ignore(),
                false => pipe.cmd("XADD").arg(key).arg("*").arg("data").arg(&body).ignore(),
            };
            n += 1;
        }
        let _: () = pipe.query_async(&mut c).await.unwrap();
        let next = started + tick * (n / per_tick) as u32;
        tokio::time::sleep_until(next.into()).await;
    }
    sent
}

/// Delivered, lost, duplicated, delay p50 and p99 (ms): the workload's tally.
fn tally(sent: &HashMap<u64, f64>, delivered: &[Delivered]) -> (u64, u64, u64, f64, f64) {
    let t = pushpull_tests::workload::tally(sent, delivered, f64::INFINITY);
    (t.delivered, t.lost, t.duplicated, t.p50_ms, t.p99_ms)
}

async fn drain(rx: &mut mpsc::UnboundedReceiver<Delivered>, out: &mut Vec<Delivered>, quiet: Duration) {
    pushpull_tests::workload::drain(rx, out, quiet, Duration::from_secs(600)).await;
}

fn relay(redis: &OwnRedis, server: &InvokeServer, channel: &str, tx: mpsc::UnboundedSender<Delivered>) -> RunningRelay {
    let config = RelayConfig {
        url: redis.url(),
        channel: channel.into(),
        pattern: false,
        function: "bench-floor".into(),
        concurrency: CONCURRENCY,
        delivered: Some(tx),
        max_batch: BATCH,
    };
    pushpull_local::relay::start(config, server.client()).unwrap()
}

async fn pubsub_row(server: &InvokeServer, load: &str, rate: u64, seconds: u64, overload: bool) -> Row {
    let redis = OwnRedis::start();
    if overload {
        redis.control(&["set-pubsub-limit", "256kb", "64kb", "1"]);
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let relay = relay(&redis, server, "bench", tx);
    let sent = produce(&redis, "bench", true, rate, seconds).await;
    let mut delivered = Vec::new();
    drain(&mut rx, &mut delivered, Duration::from_secs(3)).await;
    let counts = relay.stop().await;
    drain(&mut rx, &mut delivered, Duration::from_millis(200)).await;
    let (once, lost, duplicated, p50, p99) = tally(&sent, &delivered);
    println!("  pub/sub {load}: {counts}");
    Row {
        name: "Redis pub/sub (relay)",
        load: load.into(),
        sent: sent.len() as u64,
        delivered: once,
        lost,
        duplicated,
        p50,
        p99,
        held: 0,
    }
}

/// The bench's Streams source on `stream`: one consumer, BLOCK 1 s, claims after 30 s (none here).
fn stream_source(redis: &OwnRedis, stream: &str) -> RedisStreamSource {
    RedisStreamSource {
        url: redis.url(),
        stream: stream.into(),
        group: "bench".into(),
        consumer: "bench".into(),
        claim_idle: Duration::from_secs(30),
        max_deliveries: 5,
        block: Duration::from_secs(1),
    }
}

/// Clients the mapping never calls (a Redis mapping has no AWS destination).
async fn no_aws() -> Clients {
    Clients::from(&pushpull_local::localstack::Local::at("http://127.0.0.1:4566", "test").await)
}

async fn stream_row(server: &InvokeServer, load: &str, rate: u64, seconds: u64) -> Row {
    let redis = OwnRedis::start();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let source = stream_source(&redis, "bench");
    let raw = RawSettings {
        function: Some("bench-floor".into()),
        batch_size: Some(BATCH.to_string()),
        parallelization_factor: Some(CONCURRENCY.to_string()),
        starting_position: Some("LATEST".into()),
        ..Default::default()
    };
    let settings = raw.validate_redis_streams(&source).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut options = RunnerOptions::new(&settings, Store::file(dir.path()));
    options.delivered = Some(tx);
    let clients = no_aws().await;
    let mapping = Runner::start_redis_streams(settings, source, options, clients, server.client());
    // The group exists (created at LATEST) before the first entry.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = produce(&redis, "bench", false, rate, seconds).await;
    let mut c = redis.client().get_multiplexed_async_connection().await.unwrap();
    let groups: redis::streams::StreamInfoGroupsReply =
        redis::cmd("XINFO").arg("GROUPS").arg("bench").query_async(&mut c).await.unwrap();
    let held = groups.groups.first().and_then(|g| g.lag).unwrap_or(0) as u64;
    let mut delivered = Vec::new();
    drain(&mut rx, &mut delivered, Duration::from_secs(3)).await;
    let summary = mapping.stop().await.unwrap();
    drain(&mut rx, &mut delivered, Duration::from_millis(200)).await;
    let (once, lost, duplicated, p50, p99) = tally(&sent, &delivered);
    println!(
        "  stream {load}: {} records read, {} invocations, batch mean {:.1}",
        summary.counts.records_read, summary.counts.invocations, summary.batch_size_mean
    );
    Row {
        name: "Redis Streams (mapping, BLOCK 1 s)",
        load: load.into(),
        sent: sent.len() as u64,
        delivered: once,
        lost,
        duplicated,
        p50,
        p99,
        held,
    }
}

/// Requests the mapping makes of Redis on an idle stream, per minute.
async fn stream_idle(server: &InvokeServer, seconds: u64) -> f64 {
    let redis = OwnRedis::start();
    let source = stream_source(&redis, "idle");
    let raw = RawSettings { function: Some("bench-floor".into()), ..Default::default() };
    let settings = raw.validate_redis_streams(&source).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = RunnerOptions::new(&settings, Store::file(dir.path()));
    let clients = no_aws().await;
    let mapping = Runner::start_redis_streams(settings, source, options, clients, server.client());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let summary = mapping.stop().await.unwrap();
    summary.counts.receives as f64 * 60.0 / seconds as f64
}

#[tokio::main]
async fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let rate = args.first().copied().unwrap_or(2000);
    let seconds = args.get(1).copied().unwrap_or(10);
    let idle = args.get(2).copied().unwrap_or(20);
    let mut spec: FunctionSpec = function("bench-floor", &[("BENCH_FLOOR_SLEEP_MS", SLEEP_MS)]);
    spec.timeout = Duration::from_secs(10);
    let server = InvokeServer::start(vec![spec], 0, CONCURRENCY).await.unwrap();
    println!(
        "Redis both ways: a function of 20 ms an invocation, {CONCURRENCY} at a time, {BATCH} messages at most (about 1,000 messages/s)"
    );
    let low = format!("low ({LOW_RATE}/s)");
    let over = format!("overload ({rate}/s)");
    let rows = vec![
        pubsub_row(&server, &low, LOW_RATE, seconds, false).await,
        stream_row(&server, &low, LOW_RATE, seconds).await,
        pubsub_row(&server, &over, rate, seconds, true).await,
        stream_row(&server, &over, rate, seconds).await,
    ];
    let idle_stream = stream_idle(&server, idle).await;
    println!();
    println!(
        "| reader | load | sent | delivered | lost | duplicated | delay p50 | delay p99 | held by Redis when the producer stopped |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.0} ms | {:.0} ms | {} |",
            r.name, r.load, r.sent, r.delivered, r.lost, r.duplicated, r.p50, r.p99, r.held
        );
    }
    println!();
    println!("| reader | requests to Redis per idle minute |");
    println!("|---|---:|");
    println!("| Redis pub/sub (relay) | 0 (Redis pushes; the subscription is one open connection) |");
    println!(
        "| Redis Streams (mapping, BLOCK 1 s) | {idle_stream:.0} (measured over {idle} s; the emulator's caught-up check adds about 120) |"
    );
}
