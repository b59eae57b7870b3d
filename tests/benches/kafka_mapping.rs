//! The local Kafka mapping against a raw rdkafka consumer, same broker, same run.
//!
//!     make bench-kafka           # or: cargo bench -p pushpull-tests --features integration --bench kafka_mapping -- [records]
//!
//! Needs the Kafka broker (`infra/kafka.sh up`; the make target starts it). A fresh topic of 4
//! partitions is preloaded with `records` records (default 20,000, ~100 bytes each).
//!
//! Throughput: a raw consumer (librdkafka, a group of its own, from the earliest offsets) reads
//! every record; then the mapping (BatchSize 1000, window 0) from TRIM_HORIZON until every
//! record reached the function (`bench-floor`, which skips the event unparsed) and the group
//! committed it. Records per second for both, and their ratio.
//!
//! Delay, window 0: with the group joined and caught up, a producer sends 100 records in batches
//! of 5, 100 ms apart; the delay of a record is from its timestamp (set by the producer) to the
//! start of its invocation. Baseline in the same run: the raw consumer's delay to receipt.
use std::time::{Duration, Instant};

use pushpull::store::Store;
use pushpull_local::invoke::InvokeServer;
use pushpull_local::mapping::{Clients, KafkaSource, RawSettings, Runner, RunnerOptions};
use pushpull_tests::kafka::{Outgoing, bootstrap, send, topic};
use pushpull_tests::{function, unique};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;

const PARTITIONS: i32 = 4;

fn value(i: usize) -> Vec<u8> {
    format!(
        r#"{{"user":"u{:03}","amount":"{}.{:02}","i":{i},"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}"#,
        i % 97,
        i % 1000,
        i % 100
    )
    .into_bytes()
}

async fn preload(topic: &str, n: usize) {
    let values: Vec<(i32, Vec<u8>)> = (0..n).map(|i| ((i % PARTITIONS as usize) as i32, value(i))).collect();
    for chunk in values.chunks(5000) {
        let list: Vec<Outgoing<'_>> = chunk.iter().map(|(p, v)| (*p, None, Some(v.as_slice()))).collect();
        send(topic, &list).await;
    }
}

fn raw_consumer(group: &str) -> BaseConsumer {
    pushpull_tests::kafka::config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap()
}

/// Records per second for a raw consumer reading `n` records of `topic` (the group's join
/// included, as the mapping's is).
fn raw_throughput(topic: &str, n: usize) -> f64 {
    let c = raw_consumer(&unique("bench-raw"));
    c.subscribe(&[topic]).unwrap();
    let started = Instant::now();
    let mut got = 0;
    while got < n {
        if let Some(Ok(_)) = c.poll(Duration::from_millis(100)) {
            got += 1;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "raw consumer: {got}/{n}");
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn settings(source: &KafkaSource, batch: u32) -> pushpull_local::mapping::MappingSettings {
    RawSettings {
        function: Some("bench-floor".into()),
        starting_position: Some("TRIM_HORIZON".into()),
        batch_size: Some(batch.to_string()),
        batching_window: Some("0".into()),
        ..Default::default()
    }
    .validate_kafka(source)
    .unwrap()
}

async fn clients() -> Clients {
    Clients::from(&pushpull_local::localstack::Local::at(&pushpull_local::localstack::endpoint(), "test").await)
}

fn source(topic: &str) -> KafkaSource {
    KafkaSource {
        bootstrap_servers: vec![bootstrap()],
        topic: topic.to_owned(),
        consumer_group_id: Some(unique("bench-map")),
        cluster_arn: None,
    }
}

async fn mapping_throughput(server: &InvokeServer, topic: &str, n: usize) -> (f64, f64) {
    let source = source(topic);
    let settings = settings(&source, 1000);
    let options = RunnerOptions::new(&settings, Store::file(std::env::temp_dir().join(unique("bench-unused"))));
    let started = Instant::now();
    let m = Runner::start_kafka(settings, source, options, clients().await, server.client());
    while !(m.progress().0 as usize >= n && m.is_idle()) {
        assert!(started.elapsed() < Duration::from_secs(300), "mapping: {:?}/{n}", m.progress());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed().as_secs_f64();
    let s = m.stop().await.unwrap();
    (n as f64 / took, s.batch_size_mean)
}

/// p50 and p95 of `v` (ms).
fn p50_p95(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.95))
}

/// Sends 100 records in batches of 5, 100 ms apart, to `topic`.
async fn trickle(topic: &str) {
    for b in 0..20 {
        let values: Vec<(i32, Vec<u8>)> = (0..5).map(|i| (i % PARTITIONS, value(b * 5 + i as usize))).collect();
        let list: Vec<Outgoing<'_>> = values.iter().map(|(p, v)| (*p, None, Some(v.as_slice()))).collect();
        send(topic, &list).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn mapping_delay(server: &InvokeServer) -> (f64, f64) {
    let topic = topic("bench-delay", PARTITIONS).await;
    let source = source(&topic);
    let settings = settings(&source, 100);
    let options = RunnerOptions::new(&settings, Store::file(std::env::temp_dir().join(unique("bench-unused"))));
    let m = Runner::start_kafka(settings, source, options, clients().await, server.client());
    let deadline = Instant::now() + Duration::from_secs(60);
    while m.summary().group.is_none_or(|g| g.assignments() == 0) {
        assert!(Instant::now() < deadline, "never assigned");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    trickle(&topic).await;
    while m.progress().0 < 100 || !m.is_idle() {
        assert!(Instant::now() < deadline, "mapping delay run: {:?}", m.progress());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = m.stop().await.unwrap();
    (s.delay_ms_p50, s.delay_ms_p95)
}

fn raw_delay_run(topic: &str) -> Vec<f64> {
    let c = raw_consumer(&unique("bench-raw-delay"));
    c.subscribe(&[topic]).unwrap();
    let mut delays = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while delays.len() < 100 && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(50))
            && let Some(ts) = m.timestamp().to_millis()
        {
            delays.push(pushpull_local::mapping::now_unix() * 1000.0 - ts as f64);
        }
    }
    delays
}

async fn raw_delay() -> (f64, f64) {
    let topic = topic("bench-raw-delay", PARTITIONS).await;
    let reader = {
        let topic = topic.clone();
        std::thread::spawn(move || raw_delay_run(&topic))
    };
    // The raw consumer joins its group first (about the same wait as the mapping's).
    tokio::time::sleep(Duration::from_secs(5)).await;
    trickle(&topic).await;
    p50_p95(reader.join().unwrap())
}

#[tokio::main]
async fn main() {
    let n: usize =
        std::env::args().skip(1).find(|a| !a.starts_with('-')).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let spec = function("bench-floor", &[]);
    let server = InvokeServer::start(vec![spec], 0, 10).await.unwrap();
    println!("kafka mapping vs raw rdkafka consumer, {n} records on {PARTITIONS} partitions, broker {}", bootstrap());
    let t1 = topic("bench", PARTITIONS).await;
    preload(&t1, n).await;
    let raw = {
        let t = t1.clone();
        tokio::task::spawn_blocking(move || raw_throughput(&t, n)).await.unwrap()
    };
    let (mapped, mean_batch) = mapping_throughput(&server, &t1, n).await;
    println!(
        "throughput      raw consumer {raw:.0} records/s; mapping (BatchSize 1000, window 0) {mapped:.0} records/s, mean batch {mean_batch:.0}: {:.2}x the raw consumer",
        mapped / raw
    );
    let (rp50, rp95) = raw_delay().await;
    let (mp50, mp95) = mapping_delay(&server).await;
    println!(
        "delay (window 0) raw consumer p50 {rp50:.1} ms, p95 {rp95:.1} ms; mapping (timestamp -> invocation) p50 {mp50:.1} ms, p95 {mp95:.1} ms; beyond the raw consumer: p50 {:.1} ms, p95 {:.1} ms",
        mp50 - rp50,
        mp95 - rp95
    );
}
