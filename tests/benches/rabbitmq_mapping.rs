//! The local Amazon MQ for RabbitMQ mapping against a raw lapin consumer, same broker, same run.
//!
//!     make bench-rabbitmq-mapping    # or: cargo bench -p pushpull-tests --features integration --bench rabbitmq_mapping -- [messages]
//!
//! Throughput: a queue of `messages` messages of 100 bytes (default 20,000) drained by a raw
//! consumer at the mapping's prefetch (2,000) acknowledging each message; then a queue of the same
//! drained by the mapping (BatchSize 1000, window 0, `bench-floor` behind the Invoke API, which
//! skips the event unparsed) until every message was invoked and acknowledged. Messages per second
//! for both, and their ratio.
//!
//! Delay, window 0: with the mapping caught up, 100 messages published 10 ms apart; from a
//! message's receipt by the mapping to the start of its invocation (AMQP has no broker arrival
//! time), p50 and p95: what the mapping adds to the broker's push.
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use pushpull::store::Store;
use pushpull_local::invoke::InvokeServer;
use pushpull_local::mapping::{Clients, RabbitMqSource, RawSettings, Runner, RunnerOptions};
use pushpull_tests::rabbitmq::{confirming, connect, fill, queue, url};
use pushpull_tests::{function, unique};

async fn raw_throughput(queue: &str, n: usize) -> f64 {
    let connection = connect().await;
    let channel = connection.create_channel().await.expect("a channel");
    channel.basic_qos(2000, BasicQosOptions::default()).await.expect("basic.qos");
    let started = Instant::now();
    let mut consumer = channel
        .basic_consume(queue.into(), "bench-raw".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .expect("basic.consume");
    let mut got = 0;
    while got < n {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next()).await.expect("a delivery");
        let d = d.expect("the stream").expect("a delivery");
        d.ack(BasicAckOptions::default()).await.expect("basic.ack");
        got += 1;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn settings(source: &RabbitMqSource, batch: u32) -> pushpull_local::mapping::MappingSettings {
    RawSettings {
        function: Some("bench-floor".into()),
        batch_size: Some(batch.to_string()),
        batching_window: Some("0".into()),
        ..Default::default()
    }
    .validate_rabbitmq(source)
    .expect("valid settings")
}

async fn clients() -> Clients {
    Clients::from(&pushpull_local::localstack::Local::at(&pushpull_local::localstack::endpoint(), "test").await)
}

async fn mapping_throughput(server: &InvokeServer, queue: &str, n: usize) -> (f64, f64) {
    let source = RabbitMqSource { url: url(), queue: queue.to_owned(), broker_arn: None };
    let settings = settings(&source, 1000);
    let options = RunnerOptions::new(&settings, Store::file(std::env::temp_dir().join(unique("bench-unused"))));
    let started = Instant::now();
    let m = Runner::start_rabbitmq(settings, source, options, clients().await, server.client());
    while !(m.progress().0 as usize >= n && m.is_idle()) {
        assert!(started.elapsed() < Duration::from_secs(300), "mapping: {:?}/{n}", m.progress());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed().as_secs_f64();
    let s = m.stop().await.expect("the mapping");
    (n as f64 / took, s.batch_size_mean)
}

async fn mapping_delay(server: &InvokeServer, publisher: &lapin::Channel) -> (f64, f64) {
    let q = queue(publisher, "bench-rmap-delay", FieldTable::default()).await;
    let source = RabbitMqSource { url: url(), queue: q.clone(), broker_arn: None };
    let settings = settings(&source, 100);
    let options = RunnerOptions::new(&settings, Store::file(std::env::temp_dir().join(unique("bench-unused"))));
    let m = Runner::start_rabbitmq(settings, source, options, clients().await, server.client());
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..100 {
        fill(publisher, &q, 1).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while m.progress().0 < 100 || !m.is_idle() {
        assert!(Instant::now() < deadline, "mapping delay run: {:?}", m.progress());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = m.stop().await.expect("the mapping");
    (s.delay_ms_p50, s.delay_ms_p95)
}

#[tokio::main]
async fn main() {
    let n: usize =
        std::env::args().skip(1).find(|a| !a.starts_with('-')).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let server = InvokeServer::start(vec![function("bench-floor", &[])], 0, 10).await.expect("the Invoke API");
    let connection = connect().await;
    let publisher = confirming(&connection).await;
    println!("rabbitmq mapping vs raw lapin consumer, {n} messages of 100 bytes, broker {url}", url = url());
    let raw_queue = queue(&publisher, "bench-rmap-raw", FieldTable::default()).await;
    fill(&publisher, &raw_queue, n).await;
    let raw = raw_throughput(&raw_queue, n).await;
    let mapped_queue = queue(&publisher, "bench-rmap", FieldTable::default()).await;
    fill(&publisher, &mapped_queue, n).await;
    let (mapped, mean_batch) = mapping_throughput(&server, &mapped_queue, n).await;
    println!(
        "throughput      raw consumer (prefetch 2000) {raw:.0} msgs/s; mapping (BatchSize 1000, window 0) {mapped:.0} msgs/s, mean batch {mean_batch:.0}: {:.2}x the raw consumer",
        mapped / raw
    );
    let (p50, p95) = mapping_delay(&server, &publisher).await;
    println!("delay (window 0) receipt -> invocation p50 {p50:.1} ms, p95 {p95:.1} ms");
}
