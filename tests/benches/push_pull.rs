//! Push against pull on every broker here, one workload, one run (`make bench-pushpull`):
//!
//!     make bench-pushpull    # or: cargo bench -p pushpull-tests --features integration --bench push_pull -- [rate] [seconds] [idle seconds] [chart.png]
//!
//! **The function** is `bench-floor` taking 20 ms an invocation (`BENCH_FLOOR_SLEEP_MS`), at most
//! two at once (the Invoke API's concurrency, as a reserved concurrency of 2), ten messages an
//! invocation at most (every reader's batch size): it handles about 1,000 messages a second when
//! its batches are full. **Low load**: 50 messages a second for `seconds` (default 10).
//! **Overload**: `rate` (default 2,000) a second for as long: twice what the function handles.
//! Messages of 1 KiB (a body's hash names it; its send time is kept by the producer).
//!
//! **The readers**, each on a broker, queue, stream or topic of its own, fresh for each load:
//! - Redis pub/sub through the relay (`pushpull_local::relay`: push; reads the socket only when an
//!   invocation slot is free; Redis's `client-output-buffer-limit pubsub` at `256kb 64kb 1` under
//!   overload, so that Redis cuts a subscriber that falls behind);
//! - Redis Streams through the local mapping (pull: `XREADGROUP ... BLOCK 1 s`, ParallelizationFactor 2);
//! - RabbitMQ `basic.consume` with unlimited prefetch (push), with prefetch 100 (push with
//!   credit), and `basic.get` (pull, every 100 ms while the queue is empty): a consumer as a team
//!   writes one in front of a function (the bench's own, below: batches of what has arrived, two
//!   invocations at most, acknowledged after the invocation); and the local Amazon MQ mapping
//!   (AWS's way: `basic.consume`, prefetch twice the batch size, one batch invoked at a time: half
//!   the function's capacity here, as on AWS for one queue);
//! - Kafka through the local mapping (pull: librdkafka's fetches wait up to 500 ms at the broker),
//!   on a topic of 2 partitions, through a Kafka proxy that counts the requests;
//! - Kinesis through the local mapping (pull: GetRecords, once a second a caught-up shard, as
//!   AWS polls) and with enhanced fan-out (push: `SubscribeToShard`), on a stream of 2 shards;
//! - SQS through the local mapping with short polling (WaitTimeSeconds 0, each poller asking again
//!   as soon as an empty answer comes: what a loop of short polls costs) and long polling (20, as
//!   AWS's pollers), MaximumConcurrency 2.
//!
//! Every mapping at BatchSize 10 and no batching window; partition keys (and Kafka partitions)
//! from the message number, so that both shards, partitions or lanes are used at any rate. Each
//! cell waits for its reader to be in place (caught up at LATEST, subscribed, its group made)
//! before the producer starts, and invokes the function twice first (no cold start in a delay).
//!
//! **Columns**: sent (and the producer's achieved rate), delivered, lost, duplicated; delay from
//! the send to the invocation, p50 and p99; the messages still waiting (in the broker or the
//! reader) when the producer stopped (invoked for the first time after it); the peak memory of
//! the process that holds the reader, above what it held when the producer started (`VmHWM`,
//! reset then: each cell runs in a process of its own, with the Invoke API and the producer,
//! whose broker client differs by row; the function's processes are not counted). **Idle**:
//! each reader on an empty source for `idle seconds` (default 60): the reads it made of the
//! broker, per minute, each answered empty (`XREADGROUP`/`XAUTOCLAIM`/`XCLAIM` counted by Redis,
//! `INFO commandstats`; Fetch requests counted by the Kafka proxy; `basic.get`s, GetRecords,
//! SubscribeToShard and ReceiveMessage calls by the reader's own counters; the emulator's own
//! monitoring, its caught-up and lag checks, left out), and what an idle month of them costs on
//! AWS where a request has a price (SQS: $0.40 a million). The chart
//! (`docs/push-vs-pull.png` unless named) shows the overload's delay and loss, and the idle
//! requests, per reader.
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use bytes::Bytes;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use plotters::prelude::*;
use pushpull::store::Store;
use pushpull_local::invoke::InvokeServer;
use pushpull_local::localstack::{ACCOUNT, Local, REGION};
use pushpull_local::mapping::{
    Clients, Delivered, KafkaSource, RabbitMqSource, RawSettings, RedisStreamSource, Runner, RunnerOptions,
    RunningMapping, Summary,
};
use pushpull_local::realism::kafka::KafkaFaultProxy;
use pushpull_local::realism::{Profile, Realism, RealismConfig};
use pushpull_local::relay::RelayConfig;
use pushpull_local::runtime_api::FunctionSpec;
use pushpull_tests::redis::OwnRedis;
use pushpull_tests::workload::{self, Tally};
use pushpull_tests::{function, unique};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::{Semaphore, mpsc, watch};

const FUNCTION: &str = "bench-floor";
const SLEEP_MS: &str = "20";
const CONCURRENCY: usize = 2;
const BATCH: usize = 10;
const LOW_RATE: u64 = 50;
const SIZE: usize = 1024;
/// SQS standard queues' price per request beyond the free tier (aws.amazon.com/sqs/pricing).
const SQS_PRICE_PER_REQUEST: f64 = 0.40 / 1_000_000.0;
/// A `basic.get` consumer's pause after an empty answer.
const GET_EVERY: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Reader {
    RedisPubSub,
    RedisStreams,
    RabbitConsume(u16),
    RabbitGet,
    RabbitMapping,
    Kafka,
    KinesisPolling,
    KinesisFanOut,
    Sqs(u8),
}

const READERS: [Reader; 11] = [
    Reader::RedisPubSub,
    Reader::RedisStreams,
    Reader::RabbitConsume(0),
    Reader::RabbitConsume(100),
    Reader::RabbitGet,
    Reader::RabbitMapping,
    Reader::Kafka,
    Reader::KinesisPolling,
    Reader::KinesisFanOut,
    Reader::Sqs(0),
    Reader::Sqs(20),
];

impl Reader {
    fn name(self) -> String {
        match self {
            Reader::RedisPubSub => "Redis pub/sub, relay".into(),
            Reader::RedisStreams => "Redis Streams, mapping (BLOCK 1 s)".into(),
            Reader::RabbitConsume(0) => "RabbitMQ basic.consume, prefetch unlimited".into(),
            Reader::RabbitConsume(n) => format!("RabbitMQ basic.consume, prefetch {n}"),
            Reader::RabbitGet => "RabbitMQ basic.get (every 100 ms when empty)".into(),
            Reader::RabbitMapping => "RabbitMQ, Amazon MQ mapping (one batch at a time)".into(),
            Reader::Kafka => "Kafka, mapping (fetch waits 500 ms)".into(),
            Reader::KinesisPolling => "Kinesis, mapping (GetRecords 1/s a shard)".into(),
            Reader::KinesisFanOut => "Kinesis, enhanced fan-out".into(),
            Reader::Sqs(0) => "SQS, mapping, short polling (no pause)".into(),
            Reader::Sqs(_) => "SQS, mapping, long polling (20 s)".into(),
        }
    }

    fn way(self) -> &'static str {
        match self {
            Reader::RedisPubSub | Reader::RabbitConsume(0) => "push",
            Reader::RabbitConsume(_) | Reader::RabbitMapping => "push, credit",
            Reader::KinesisFanOut => "push, credit (2 MiB/s a shard)",
            Reader::RedisStreams | Reader::Kafka | Reader::Sqs(20) => "pull, long poll",
            Reader::RabbitGet | Reader::KinesisPolling | Reader::Sqs(_) => "pull",
        }
    }

    /// What an idle month of `per_minute` requests costs on AWS, where a request has a price.
    fn idle_month(self, per_minute: f64) -> String {
        match self {
            Reader::Sqs(_) => format!("${:.2}", per_minute * 60.0 * 24.0 * 30.0 * SQS_PRICE_PER_REQUEST),
            Reader::KinesisPolling => "no request price (shard-hours)".into(),
            Reader::KinesisFanOut => "no request price (consumer-shard-hours)".into(),
            Reader::Kafka => "no request price (MSK broker-hours)".into(),
            Reader::RabbitConsume(_) | Reader::RabbitGet | Reader::RabbitMapping => {
                "no request price (Amazon MQ broker-hours)".into()
            }
            Reader::RedisPubSub | Reader::RedisStreams => "no request price (node-hours)".into(),
        }
    }
}

/// What the readers share: LocalStack, the Invoke API with the function, the Kafka proxy.
struct World {
    local: Local,
    server: InvokeServer,
    kafka: Arc<KafkaFaultProxy>,
}

/// One reader on one source, running: what the bench asks of each.
struct Running {
    stop: Box<dyn FnOnce() -> futures_util::future::BoxFuture<'static, ()> + Send>,
    /// Requests made of the broker so far (by whichever counts them best).
    requests: Box<dyn Fn() -> futures_util::future::BoxFuture<'static, u64> + Send + Sync>,
}

/// Where a reader reads: set up fresh, with a sender for the producer.
struct Source {
    send: Box<dyn FnMut(Vec<String>) -> futures_util::future::BoxFuture<'static, ()> + Send>,
    reader: Running,
    /// Kept until the row ends (a Redis server, a temporary directory).
    _keep: Vec<Box<dyn std::any::Any + Send>>,
    /// Removes what the cell made outside its process (a topic, stream, queue), after the reader
    /// stopped: later cells run against brokers no fuller than the first.
    cleanup: futures_util::future::BoxFuture<'static, ()>,
    /// How often the producer sends what is due: 10 ms, or 100 ms where each send is a call that
    /// takes a batch (PutRecords: LocalStack's Kinesis took about 300 calls of 20 records a second
    /// at most, and fell behind; 200 records a call every 100 ms keeps the rate).
    tick: Duration,
}

const TICK: Duration = Duration::from_millis(10);

/// The message number a body starts with ([`workload::body`]): partition keys and partitions
/// come from it, so that low load (one message a tick) spreads as overload does.
fn number(body: &str) -> u64 {
    body.get(..12).and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// Waits until `ready` holds of the mapping (an event, not a time); panics after 30 s.
async fn until_ready(m: &RunningMapping, what: &str, ready: impl Fn(&RunningMapping) -> bool) {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while !ready(m) {
        assert!(std::time::Instant::now() < until && !m.is_finished(), "the mapping never got ready: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts `reader` on a fresh source, sending what it invokes to `delivered`.
async fn start(
    world: &World,
    reader: Reader,
    overload: bool,
    shape: Shape,
    delivered: mpsc::UnboundedSender<Delivered>,
) -> Source {
    match reader {
        Reader::RedisPubSub | Reader::RedisStreams => redis_source(world, reader, overload, shape, delivered).await,
        Reader::RabbitConsume(_) | Reader::RabbitGet | Reader::RabbitMapping => {
            rabbit_source(world, reader, shape, delivered).await
        }
        Reader::Kafka => kafka_source(world, shape, delivered).await,
        Reader::KinesisPolling | Reader::KinesisFanOut => kinesis_source(world, reader, shape, delivered).await,
        Reader::Sqs(wait) => sqs_source(world, wait, shape, delivered).await,
    }
}

fn mapping_options(
    settings: &pushpull_local::mapping::MappingSettings,
    dir: &Path,
    delivered: mpsc::UnboundedSender<Delivered>,
) -> RunnerOptions {
    let mut options = RunnerOptions::new(settings, Store::file(dir));
    options.delivered = Some(delivered);
    options
}

/// A mapping as a [`Running`] reader; `requests` counts from its summary so far.
fn running_mapping(m: RunningMapping, requests: fn(&Summary) -> u64) -> Running {
    let m = Arc::new(tokio::sync::Mutex::new(Some(m)));
    let counted = m.clone();
    Running {
        stop: Box::new(move || {
            Box::pin(async move {
                if let Some(m) = m.lock().await.take() {
                    m.stop().await.expect("the mapping stops cleanly");
                }
            })
        }),
        requests: Box::new(move || {
            let counted = counted.clone();
            Box::pin(async move { counted.lock().await.as_ref().map_or(0, |m| requests(&m.summary())) })
        }),
    }
}

/// A mapping's batch settings: BatchSize and MaximumBatchingWindowInSeconds.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
struct Shape {
    batch: usize,
    window: u32,
}

/// The push-against-pull table's: BatchSize 10 and no batching window (the lowest delay each
/// mapping can give; Kafka's and Amazon MQ's default window is 500 ms), as the push readers have
/// none, and their batches are ten messages at most too.
const TABLE_SHAPE: Shape = Shape { batch: BATCH, window: 0 };

/// The batching grid's shapes (`--grid`).
const GRID: [Shape; 5] = [
    Shape { batch: 10, window: 0 },
    Shape { batch: 100, window: 0 },
    Shape { batch: 10, window: 1 },
    Shape { batch: 100, window: 1 },
    Shape { batch: 1000, window: 1 },
];

/// The readers of the batching grid: the mappings.
const GRID_READERS: [Reader; 6] = [
    Reader::RedisStreams,
    Reader::RabbitMapping,
    Reader::Kafka,
    Reader::KinesisPolling,
    Reader::KinesisFanOut,
    Reader::Sqs(20),
];

fn base_settings(shape: Shape) -> RawSettings {
    RawSettings {
        function: Some(FUNCTION.into()),
        batch_size: Some(shape.batch.to_string()),
        batching_window: Some(shape.window.to_string()),
        ..Default::default()
    }
}

async fn redis_source(
    world: &World,
    reader: Reader,
    overload: bool,
    shape: Shape,
    delivered: mpsc::UnboundedSender<Delivered>,
) -> Source {
    let redis = OwnRedis::start();
    let mut c = redis.client().get_multiplexed_async_connection().await.unwrap();
    let pubsub = reader == Reader::RedisPubSub;
    if pubsub && overload {
        redis.control(&["set-pubsub-limit", "256kb", "64kb", "1"]);
    }
    let dir = tempfile::tempdir().unwrap();
    let running = if pubsub {
        let config = RelayConfig {
            url: redis.url(),
            channel: "bench".into(),
            pattern: false,
            function: FUNCTION.into(),
            concurrency: CONCURRENCY,
            delivered: Some(delivered),
            max_batch: BATCH,
        };
        let relay = pushpull_local::relay::start(config, world.server.client()).unwrap();
        let relay = Arc::new(tokio::sync::Mutex::new(Some(relay)));
        Running {
            stop: Box::new(move || {
                Box::pin(async move {
                    if let Some(r) = relay.lock().await.take() {
                        println!("    relay: {}", r.stop().await);
                    }
                })
            }),
            requests: redis_requests(&redis),
        }
    } else {
        let source = RedisStreamSource {
            url: redis.url(),
            stream: "bench".into(),
            group: "bench".into(),
            consumer: "bench".into(),
            claim_idle: Duration::from_secs(30),
            max_deliveries: 5,
            block: Duration::from_secs(1),
        };
        let raw = RawSettings {
            parallelization_factor: Some(CONCURRENCY.to_string()),
            starting_position: Some("LATEST".into()),
            ..base_settings(shape)
        };
        let settings = raw.validate_redis_streams(&source).unwrap();
        let options = mapping_options(&settings, dir.path(), delivered);
        let m =
            Runner::start_redis_streams(settings, source, options, Clients::from(&world.local), world.server.client());
        // The group exists (created at LATEST) before the first entry.
        until_ready(&m, "group created", |m| m.reading() >= 1).await;
        let mut r = running_mapping(m, |_| 0);
        r.requests = redis_requests(&redis);
        r
    };
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(&mut c).await.unwrap();
    let send = Box::new(move |bodies: Vec<String>| {
        let mut c = c.clone();
        Box::pin(async move {
            let mut pipe = redis::pipe();
            for b in &bodies {
                match pubsub {
                    true => pipe.cmd("PUBLISH").arg("bench").arg(b).ignore(),
                    // A partition key, as the push function writes one: the mapping's lanes
                    // (ParallelizationFactor 2) are by key, and entries without one keep the
                    // stream's order in one lane.
                    false => pipe
                        .cmd("XADD")
                        .arg("bench")
                        .arg("*")
                        .arg("data")
                        .arg(b)
                        .arg(pushpull::pull::redis::PARTITION_KEY_FIELD)
                        .arg(format!("k{}", number(b)))
                        .ignore(),
                };
            }
            let _: () = pipe.query_async(&mut c).await.unwrap();
        }) as futures_util::future::BoxFuture<'static, ()>
    });
    Source {
        send,
        reader: running,
        _keep: vec![Box::new(redis), Box::new(dir)],
        cleanup: Box::pin(async {}),
        tick: TICK,
    }
}

/// The reads Redis served since `CONFIG RESETSTAT` (`INFO commandstats`): `XREADGROUP`,
/// `XAUTOCLAIM`, `XCLAIM`. The mapping's own caught-up check (`XINFO GROUPS` every 500 ms, an
/// emulator's monitoring as `GetQueueAttributes` is on SQS) and the producer's are left out; a
/// subscriber reads nothing (Redis pushes).
fn redis_requests(redis: &OwnRedis) -> Box<dyn Fn() -> futures_util::future::BoxFuture<'static, u64> + Send + Sync> {
    let client = redis.client();
    Box::new(move || {
        let client = client.clone();
        Box::pin(async move {
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut c).await.unwrap();
            info.lines()
                .filter_map(|l| l.strip_prefix("cmdstat_"))
                .filter(|l| ["xreadgroup:", "xautoclaim:", "xclaim:"].iter().any(|p| l.starts_with(p)))
                .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
                .sum()
        })
    })
}

async fn rabbit_source(
    world: &World,
    reader: Reader,
    shape: Shape,
    delivered: mpsc::UnboundedSender<Delivered>,
) -> Source {
    let connection = Arc::new(pushpull_tests::rabbitmq::connect().await);
    let channel = connection.create_channel().await.unwrap();
    let queue = pushpull_tests::rabbitmq::queue(&channel, "pushpull-bench", FieldTable::default()).await;
    let queue_name = queue.clone();
    let publisher = pushpull_tests::rabbitmq::confirming(&connection).await;
    let dir = tempfile::tempdir().unwrap();
    let running = match reader {
        Reader::RabbitMapping => {
            let source =
                RabbitMqSource { url: pushpull_tests::rabbitmq::url(), queue: queue.clone(), broker_arn: None };
            let settings = base_settings(shape).validate_rabbitmq(&source).unwrap();
            let options = mapping_options(&settings, dir.path(), delivered);
            let m =
                Runner::start_rabbitmq(settings, source, options, Clients::from(&world.local), world.server.client());
            tokio::time::sleep(Duration::from_millis(500)).await;
            running_mapping(m, |s| s.counts.receives)
        }
        _ => {
            let (stop_tx, stop_rx) = watch::channel(false);
            let requests = Arc::new(AtomicU64::new(0));
            let task = tokio::spawn(rabbit_consumer(
                connection.clone(),
                queue.clone(),
                reader,
                world.server.client(),
                delivered,
                requests.clone(),
                stop_rx,
            ));
            tokio::time::sleep(Duration::from_millis(200)).await;
            Running {
                stop: Box::new(move || {
                    Box::pin(async move {
                        let _ = stop_tx.send(true);
                        let failures = task.await.expect("the consumer ran to its end");
                        assert_eq!(failures, 0, "the function failed {failures} invocations");
                    })
                }),
                requests: Box::new(move || {
                    let n = requests.load(Ordering::Relaxed);
                    Box::pin(async move { n })
                }),
            }
        }
    };
    let send = Box::new(move |bodies: Vec<String>| {
        let (publisher, queue) = (publisher.clone(), queue.clone());
        Box::pin(async move {
            let mut confirms = Vec::new();
            for b in &bodies {
                let c = publisher
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        b.as_bytes(),
                        BasicProperties::default(),
                    )
                    .await
                    .expect("basic.publish");
                confirms.push(c);
            }
            for c in confirms {
                assert!(c.await.expect("a confirm").is_ack(), "the broker took the message");
            }
        }) as futures_util::future::BoxFuture<'static, ()>
    });
    let cleanup = Box::pin(async move {
        let _ = channel.queue_delete(queue_name.as_str().into(), Default::default()).await;
    });
    Source { send, reader: running, _keep: vec![Box::new(connection), Box::new(dir)], cleanup, tick: TICK }
}

/// A RabbitMQ consumer in front of a function, as a team would write one: it takes a message
/// (pushed by `basic.consume`, or asked for by `basic.get`) only when one of the function's
/// `CONCURRENCY` slots is free, with those that have arrived behind it up to `BATCH`, invokes the
/// function with them and acknowledges each after the invocation. Counts the requests it makes
/// (`basic.get`s; a consumer pushed to makes none); returns the invocations that failed.
async fn rabbit_consumer(
    connection: Arc<Connection>,
    queue: String,
    reader: Reader,
    invoker: pushpull_local::invoke::InvokeClient,
    delivered: mpsc::UnboundedSender<Delivered>,
    requests: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> u64 {
    let channel = connection.create_channel().await.expect("a channel");
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    let invoker = Arc::new(invoker);
    let failures = Arc::new(AtomicU64::new(0));
    let mut consumer = match reader {
        Reader::RabbitConsume(prefetch) => {
            channel.basic_qos(prefetch, BasicQosOptions::default()).await.expect("basic.qos");
            Some(
                channel
                    .basic_consume(
                        queue.as_str().into(),
                        "bench".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .expect("basic.consume"),
            )
        }
        _ => None,
    };
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("open"),
            _ = stop.changed() => break,
        };
        let mut batch = Vec::new();
        match &mut consumer {
            Some(consumer) => {
                let first = tokio::select! {
                    d = consumer.next() => d,
                    _ = stop.changed() => break,
                };
                let Some(Ok(first)) = first else { break };
                batch.push(first);
                while batch.len() < BATCH {
                    match futures_util::FutureExt::now_or_never(consumer.next()) {
                        Some(Some(Ok(d))) => batch.push(d),
                        _ => break,
                    }
                }
            }
            None => {
                while batch.len() < BATCH {
                    requests.fetch_add(1, Ordering::Relaxed);
                    match channel.basic_get(queue.as_str().into(), BasicGetOptions::default()).await.expect("basic.get")
                    {
                        Some(m) => batch.push(m.delivery),
                        None => break,
                    }
                }
                if batch.is_empty() {
                    drop(permit);
                    tokio::select! {
                        _ = tokio::time::sleep(GET_EVERY) => continue,
                        _ = stop.changed() => break,
                    }
                }
            }
        }
        let (invoker, delivered, failures) = (invoker.clone(), delivered.clone(), failures.clone());
        tokio::spawn(async move {
            let now = pushpull_local::mapping::now_unix();
            let bodies: Vec<String> = batch.iter().map(|d| String::from_utf8_lossy(&d.data).into_owned()).collect();
            for d in &batch {
                let _ = delivered.send(Delivered { hash: xxhash_rust::xxh3::xxh3_64(&d.data), invoked_at: now });
            }
            let payload = Bytes::from(serde_json::to_vec(&serde_json::json!({ "messages": bodies })).unwrap());
            let outcome = invoker.invoke(FUNCTION, payload).await;
            if !matches!(&outcome, Ok(i) if matches!(i.answer, pushpull_local::mapping::outcome::Answer::Response(_))) {
                eprintln!("the function failed: {outcome:?}");
                failures.fetch_add(1, Ordering::Relaxed);
            }
            for d in batch {
                d.ack(BasicAckOptions::default()).await.expect("basic.ack");
            }
            drop(permit);
        });
    }
    // Let the invocations in flight end.
    let _ = slots.acquire_many(CONCURRENCY as u32).await;
    let _ = channel.close(200, "bench done".into()).await;
    failures.load(Ordering::Relaxed)
}

async fn kafka_source(world: &World, shape: Shape, delivered: mpsc::UnboundedSender<Delivered>) -> Source {
    let topic = pushpull_tests::kafka::topic("pushpull-bench", 2).await;
    let topic_name = topic.clone();
    let dir = tempfile::tempdir().unwrap();
    let source = KafkaSource {
        bootstrap_servers: vec![world.kafka.bootstrap()],
        topic: topic.clone(),
        consumer_group_id: Some(unique("bench-group")),
        cluster_arn: None,
    };
    let raw = RawSettings { starting_position: Some("LATEST".into()), ..base_settings(shape) };
    let settings = raw.validate_kafka(&source).unwrap();
    let options = mapping_options(&settings, dir.path(), delivered);
    let m = Runner::start_kafka(settings, source, options, Clients::from(&world.local), world.server.client());
    // Joined, both partitions assigned, and found caught up at their end: before the first record.
    until_ready(&m, "both partitions assigned and caught up", |m| m.reading() >= 2 && m.caught_up_since().is_some())
        .await;
    let mut running = running_mapping(m, |_| 0);
    // Fetches only: heartbeats, metadata and the emulator's lag checks (watermarks) left out.
    let proxy = world.kafka.clone();
    running.requests = Box::new(move || {
        let n = proxy.requests(pushpull_local::realism::kafka::FETCH);
        Box::pin(async move { n })
    });
    let producer: FutureProducer = pushpull_tests::kafka::config().set("linger.ms", "5").create().expect("a producer");
    let send = Box::new(move |bodies: Vec<String>| {
        let (producer, topic) = (producer.clone(), topic.clone());
        Box::pin(async move {
            let sends = bodies.iter().map(|b| {
                let r = FutureRecord::<str, str>::to(&topic).partition((number(b) % 2) as i32).payload(b.as_str());
                producer.send(r, Duration::from_secs(10))
            });
            for r in futures_util::future::join_all(sends).await {
                r.unwrap_or_else(|(e, _)| panic!("send: {e}"));
            }
        }) as futures_util::future::BoxFuture<'static, ()>
    });
    let cleanup = Box::pin(async move { pushpull_tests::kafka::delete_topic(&topic_name).await });
    Source { send, reader: running, _keep: vec![Box::new(dir)], cleanup, tick: TICK }
}

async fn kinesis_source(
    world: &World,
    reader: Reader,
    shape: Shape,
    delivered: mpsc::UnboundedSender<Delivered>,
) -> Source {
    let stream = unique("pushpull-bench");
    let stream_name = stream.clone();
    let arn = world.local.ensure_stream(&stream, CONCURRENCY as i32).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut clients = Clients::from(&world.local);
    let mut producer = world.local.kinesis.clone();
    let mut keep: Vec<Box<dyn std::any::Any + Send>> = vec![Box::new(dir)];
    let read = match reader {
        Reader::KinesisFanOut => {
            let consumer = world.local.ensure_consumer(&arn, "bench").await.unwrap();
            // SubscribeToShard is HTTP/2: served by pushpull-local's proxy (realism off).
            let proxy = pushpull_local::realism::proxy::RealismProxy::start(
                Arc::new(Realism::new(RealismConfig::new(Profile::Off, 0))),
                pushpull_local::realism::iam::Policies::default(),
                &pushpull_local::localstack::endpoint(),
            )
            .await
            .unwrap();
            clients.kinesis = pushpull_local::http2::kinesis(&proxy.endpoint(), "test").await;
            // The producer writes through the proxy too, as through AWS's endpoint: a write
            // wakes the subscription at once (written around it, a record is found by the
            // proxy's fallback read every 200 ms).
            producer = Local::at(&proxy.endpoint(), "test").await.kinesis;
            keep.push(Box::new(proxy));
            consumer
        }
        _ => format!("arn:aws:kinesis:{REGION}:{ACCOUNT}:stream/{stream}"),
    };
    let raw = RawSettings { stream: Some(read), starting_position: Some("LATEST".into()), ..base_settings(shape) };
    let settings = raw.validate().unwrap();
    let dir = keep[0].downcast_ref::<tempfile::TempDir>().unwrap().path().to_owned();
    let options = mapping_options(&settings, &dir, delivered);
    let m = Runner::start(settings, options, clients, world.server.client());
    // Both shards read from LATEST before the first record: polled and found caught up, or
    // subscribed to.
    let fan_out = reader == Reader::KinesisFanOut;
    match fan_out {
        true => until_ready(&m, "both shards subscribed", |m| m.summary().counts.subscriptions >= 2).await,
        false => until_ready(&m, "both shards caught up", |m| m.reading() >= 2 && m.caught_up_since().is_some()).await,
    }
    let running = running_mapping(m, if fan_out { |s| s.counts.subscriptions } else { |s| s.counts.get_records });
    let kinesis = producer;
    let send = Box::new(move |bodies: Vec<String>| {
        let (kinesis, stream) = (kinesis.clone(), stream.clone());
        Box::pin(async move {
            let mut pending: Vec<PutRecordsRequestEntry> = bodies
                .iter()
                .map(|b| {
                    PutRecordsRequestEntry::builder()
                        .partition_key(format!("k{}", number(b)))
                        .data(Blob::new(b.as_bytes()))
                        .build()
                        .unwrap()
                })
                .collect();
            while !pending.is_empty() {
                let out =
                    kinesis.put_records().stream_name(&stream).set_records(Some(pending.clone())).send().await.unwrap();
                pending = out
                    .records()
                    .iter()
                    .zip(pending)
                    .filter(|(r, _)| r.error_code().is_some())
                    .map(|(_, e)| e)
                    .collect();
                if !pending.is_empty() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }) as futures_util::future::BoxFuture<'static, ()>
    });
    let (kinesis, name) = (world.local.kinesis.clone(), stream_name);
    let cleanup = Box::pin(async move {
        let _ = kinesis.delete_stream().stream_name(name).enforce_consumer_deletion(true).send().await;
    });
    Source { send, reader: running, _keep: keep, cleanup, tick: Duration::from_millis(100) }
}

async fn sqs_source(world: &World, wait: u8, shape: Shape, delivered: mpsc::UnboundedSender<Delivered>) -> Source {
    let out = world.local.sqs.create_queue().queue_name(unique("pushpull-bench")).send().await.expect("CreateQueue");
    let url = out.queue_url().expect("a URL").to_owned();
    let queue_url = url.clone();
    let source = pushpull_local::mapping::sqs::describe(&world.local.sqs, &url, wait).await.expect("the queue");
    let raw = RawSettings { maximum_concurrency: Some(CONCURRENCY.to_string()), ..base_settings(shape) };
    let settings = raw.validate_sqs(&source, Duration::from_secs(3)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = mapping_options(&settings, dir.path(), delivered);
    let m = Runner::start_sqs(settings, source, options, Clients::from(&world.local), world.server.client());
    let running = running_mapping(m, |s| s.counts.receives);
    let sqs = world.local.sqs.clone();
    let send = Box::new(move |bodies: Vec<String>| {
        let (sqs, url) = (sqs.clone(), url.clone());
        Box::pin(async move {
            let sends = bodies.chunks(10).map(|chunk| {
                let entries = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, b)| {
                        SendMessageBatchRequestEntry::builder().id(i.to_string()).message_body(b).build().unwrap()
                    })
                    .collect();
                sqs.send_message_batch().queue_url(&url).set_entries(Some(entries)).send()
            });
            for r in futures_util::future::join_all(sends).await {
                let r = r.expect("SendMessageBatch");
                assert!(r.failed().is_empty(), "SQS took every message: {:?}", r.failed());
            }
        }) as futures_util::future::BoxFuture<'static, ()>
    });
    let (sqs, queue) = (world.local.sqs.clone(), queue_url);
    let cleanup = Box::pin(async move {
        let _ = sqs.delete_queue().queue_url(queue).send().await;
    });
    Source { send, reader: running, _keep: vec![Box::new(dir)], cleanup, tick: TICK }
}

/// One reader under one load.
#[derive(Clone, Default, serde::Serialize, serde::Deserialize)]
struct Cell {
    tally: Tally,
    achieved: f64,
    peak_kib: u64,
}

/// What one load on one reader gave: what was sent, what was invoked, when the producer stopped
/// (unix seconds), how long it took, and the peak memory above the start (KiB).
struct Load {
    sent: workload::Sent,
    delivered: Vec<Delivered>,
    stopped: f64,
    took: Duration,
    peak_kib: u64,
}

/// Starts the function's `CONCURRENCY` sandboxes (two invocations at once), so that no cell's
/// delay holds a cold start.
async fn warm(world: &World) {
    let client = world.server.client();
    let calls = (0..CONCURRENCY).map(|_| client.invoke(FUNCTION, Bytes::from_static(b"{}")));
    for r in futures_util::future::join_all(calls).await {
        r.expect("the function answers");
    }
}

async fn run_load(world: &World, reader: Reader, shape: Shape, rate: u64, seconds: u64, overload: bool) -> Load {
    let (tx, mut rx) = mpsc::unbounded_channel();
    warm(world).await;
    let mut source = start(world, reader, overload, shape, tx).await;
    let before = workload::reset_peak_memory();
    let (sent, took) = workload::produce(rate, seconds, SIZE, source.tick, &mut source.send).await;
    let stopped = pushpull_local::mapping::now_unix();
    let mut delivered = Vec::new();
    // Until the reader has been quiet for 5 s (a long poll or a fan-out event comes within that),
    // at most 3 minutes.
    if !workload::drain(&mut rx, &mut delivered, Duration::from_secs(5), Duration::from_secs(180)).await {
        println!(
            "    {}: still delivering after 3 minutes: what it had not invoked then counts as lost",
            reader.name()
        );
    }
    let (_, peak) = workload::memory_kib();
    (source.reader.stop)().await;
    workload::drain(&mut rx, &mut delivered, Duration::from_millis(200), Duration::from_secs(5)).await;
    source.cleanup.await;
    Load { sent, delivered, stopped, took, peak_kib: peak.saturating_sub(before) }
}

async fn measure(world: &World, reader: Reader, rate: u64, seconds: u64, overload: bool) -> Cell {
    let l = run_load(world, reader, TABLE_SHAPE, rate, seconds, overload).await;
    let tally = workload::tally(&l.sent, &l.delivered, l.stopped);
    Cell { achieved: workload::achieved_rate(&l.sent, l.took), tally, peak_kib: l.peak_kib }
}

/// The batching grid's steady load.
const STEADY_RATE: u64 = 200;

/// One mapping under one shape.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct GridCell {
    /// At a steady 200 messages a second: the delay, send to invocation...
    p50_ms: f64,
    p99_ms: f64,
    /// ...and the invocations it took per 1,000 messages.
    per_thousand: f64,
    /// Under overload (`rate` a second): messages invoked a second, from the first send to the
    /// last message's first invocation.
    throughput: f64,
    /// Messages not invoked, both loads (a mapping loses none: anything else is a finding).
    lost: u64,
}

async fn grid_cell(world: &World, reader: Reader, shape: Shape, rate: u64, seconds: u64) -> GridCell {
    let steady = run_load(world, reader, shape, STEADY_RATE, seconds, false).await;
    let t = workload::tally(&steady.sent, &steady.delivered, steady.stopped);
    let invocations: std::collections::HashSet<u64> =
        steady.delivered.iter().filter(|d| steady.sent.contains_key(&d.hash)).map(|d| d.invoked_at.to_bits()).collect();
    let over = run_load(world, reader, shape, rate, seconds, true).await;
    let o = workload::tally(&over.sent, &over.delivered, over.stopped);
    let first_send = over.sent.values().copied().fold(f64::INFINITY, f64::min);
    // The last message's first invocation.
    let mut first: std::collections::HashMap<u64, f64> = std::collections::HashMap::new();
    for d in over.delivered.iter().filter(|d| over.sent.contains_key(&d.hash)) {
        first.entry(d.hash).and_modify(|t| *t = t.min(d.invoked_at)).or_insert(d.invoked_at);
    }
    let last = first.values().copied().fold(first_send, f64::max);
    GridCell {
        p50_ms: t.p50_ms,
        p99_ms: t.p99_ms,
        per_thousand: invocations.len() as f64 * 1000.0 / t.delivered.max(1) as f64,
        throughput: o.delivered as f64 / (last - first_send).max(1e-3),
        lost: t.lost + o.lost,
    }
}

/// Requests per minute the reader makes of an empty source in `seconds`.
async fn idle(world: &World, reader: Reader, seconds: u64) -> f64 {
    let (tx, _rx) = mpsc::unbounded_channel();
    let source = start(world, reader, false, TABLE_SHAPE, tx).await;
    let before = (source.reader.requests)().await;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let after = (source.reader.requests)().await;
    (source.reader.stop)().await;
    source.cleanup.await;
    (after - before) as f64 * 60.0 / seconds as f64
}

struct Row {
    reader: Reader,
    low: Cell,
    over: Cell,
    idle_per_minute: f64,
}

/// A row as the run saves it beside the chart (`push-vs-pull.json`), for `--redraw`.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedRow {
    /// The reader's index in [`READERS`], and its name when saved.
    reader: usize,
    name: String,
    low: Cell,
    over: Cell,
    idle_per_minute: f64,
}

/// What a cell's process prints on its last line, before the JSON.
const CELL: &str = "CELL ";

/// A cell in a process of its own (this bench, `PUSHPULL_BENCH_CELL=READER:low|over|idle`), so
/// that its peak memory is its own and nothing one reader left behind (heap, connections,
/// threads) weighs on the next. The child's own lines are passed on.
fn cell_in_child(index: usize, kind: &str, args: &[String]) -> serde_json::Value {
    let exe = std::env::current_exe().expect("this bench's path");
    let out = std::process::Command::new(exe)
        .args(args)
        .env("PUSHPULL_BENCH_CELL", format!("{index}:{kind}"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("the cell's process runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut result = None;
    for line in stdout.lines() {
        match line.strip_prefix(CELL) {
            Some(json) => result = serde_json::from_str(json).ok(),
            None => println!("{line}"),
        }
    }
    match (out.status.success(), result) {
        (true, Some(v)) => v,
        (_, _) => panic!("{} {kind}: the cell failed ({})", READERS[index].name(), out.status),
    }
}

/// The child's part: one cell, printed as JSON after [`CELL`].
async fn run_cell(cell: &str, rate: u64, seconds: u64, idle_s: u64) {
    let (index, kind) = cell.split_once(':').expect("READER:KIND");
    let reader = READERS[index.parse::<usize>().expect("a reader's index")];
    let mut spec: FunctionSpec = function(FUNCTION, &[("BENCH_FLOOR_SLEEP_MS", SLEEP_MS)]);
    spec.timeout = Duration::from_secs(10);
    let world = World {
        local: pushpull_tests::local().await,
        server: InvokeServer::start(vec![spec], 0, CONCURRENCY).await.unwrap(),
        kafka: Arc::new(
            KafkaFaultProxy::start(
                Arc::new(Realism::new(RealismConfig::new(Profile::Off, 0))),
                &[pushpull_tests::kafka::bootstrap()],
            )
            .unwrap(),
        ),
    };
    let v = match kind {
        "low" => serde_json::to_value(measure(&world, reader, LOW_RATE, seconds, false).await),
        "over" => serde_json::to_value(measure(&world, reader, rate, seconds, true).await),
        "idle" => serde_json::to_value(idle(&world, reader, idle_s).await),
        grid => {
            let shape = grid.strip_prefix("grid").and_then(|g| GRID.get(g.parse::<usize>().ok()?)).expect("gridN");
            serde_json::to_value(grid_cell(&world, reader, *shape, rate, seconds).await)
        }
    };
    println!("{CELL}{}", v.expect("JSON"));
}

#[tokio::main]
async fn main() {
    let all: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<String> = all.iter().filter(|a| !a.starts_with('-')).cloned().collect();
    let number = |i: usize, default: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (rate, seconds, idle_s) = (number(0, 2000), number(1, 10), number(2, 60));
    if let Ok(cell) = std::env::var("PUSHPULL_BENCH_CELL") {
        return run_cell(&cell, rate, seconds, idle_s).await;
    }
    if all.iter().any(|a| a == "--grid") {
        return run_grid(&all, rate, seconds);
    }
    if all.iter().any(|a| a == "--redraw") {
        // `--redraw SAVED.json CHART.png`: the tables and chart again from a run's saved rows.
        // cargo runs a bench in its package's directory: relative paths are the workspace's.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let (json, png) = (root.join(args.first().expect("SAVED.json")), root.join(args.get(1).expect("CHART.png")));
        let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(json).expect("the saved rows")).unwrap();
        let rate = saved["rate"].as_u64().unwrap_or(2000);
        let rows: Vec<SavedRow> = serde_json::from_value(saved["rows"].clone()).expect("saved rows");
        let rows: Vec<Row> = rows
            .into_iter()
            .map(|r| Row { reader: READERS[r.reader], low: r.low, over: r.over, idle_per_minute: r.idle_per_minute })
            .collect();
        print_tables(&rows, rate);
        draw(&rows, rate, &png).expect("the chart");
        return println!("\nchart: {}", png.display());
    }
    let png = args
        .get(3)
        .map(|p| Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/push-vs-pull.png"));
    let only: Option<String> = std::env::var("PUSHPULL_BENCH_ONLY").ok();
    println!(
        "Push against pull: a function of {SLEEP_MS} ms an invocation, {CONCURRENCY} at once, {BATCH} messages at most \
         (about 1,000 messages/s); low load {LOW_RATE}/s and overload {rate}/s, {seconds} s each; idle {idle_s} s; \
         messages of {SIZE} bytes; each cell a process of its own"
    );
    let mut rows = Vec::new();
    for (index, reader) in READERS.into_iter().enumerate() {
        if only.as_deref().is_some_and(|o| !reader.name().to_lowercase().contains(&o.to_lowercase())) {
            continue;
        }
        println!("  {} ...", reader.name());
        let cell =
            |kind: &str| -> Cell { serde_json::from_value(cell_in_child(index, kind, &all)).expect("a cell's JSON") };
        let low = cell("low");
        let over = cell("over");
        let idle_per_minute: f64 = serde_json::from_value(cell_in_child(index, "idle", &all)).expect("a number");
        println!(
            "    low: {:?}\n    overload: {:?} (sent at {:.0}/s), peak +{} KiB\n    idle: {idle_per_minute:.0} requests/min",
            low.tally, over.tally, over.achieved, over.peak_kib
        );
        rows.push(Row { reader, low, over, idle_per_minute });
    }
    print_tables(&rows, rate);
    if rows.len() == READERS.len() {
        if let Some(dir) = png.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        let saved: Vec<SavedRow> = rows
            .iter()
            .map(|r| SavedRow {
                reader: READERS.iter().position(|x| *x == r.reader).unwrap_or(0),
                name: r.reader.name(),
                low: r.low.clone(),
                over: r.over.clone(),
                idle_per_minute: r.idle_per_minute,
            })
            .collect();
        let json = png.with_extension("json");
        std::fs::write(&json, serde_json::to_vec_pretty(&serde_json::json!({ "rate": rate, "rows": saved })).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", json.display()));
        match draw(&rows, rate, &png) {
            Ok(()) => println!("\nchart: {}", png.display()),
            Err(e) => eprintln!("chart not drawn: {e}"),
        }
    }
}

/// The batching trade-off on every mapping (`--grid`): each of [`GRID_READERS`] under each of
/// [`GRID`]'s shapes, each cell a process of its own; prints the table.
fn run_grid(all: &[String], rate: u64, seconds: u64) {
    println!(
        "Batching on every mapping: a function of {SLEEP_MS} ms an invocation, {CONCURRENCY} at once; \
         {STEADY_RATE}/s for {seconds} s (delay, invocations), then {rate}/s for {seconds} s (throughput); \
         messages of {SIZE} bytes"
    );
    println!();
    println!(
        "| mapping | BatchSize | window | delay p50 at {STEADY_RATE}/s | p99 | invocations per 1,000 | messages/s under {rate}/s | lost |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for reader in GRID_READERS {
        let index = READERS.iter().position(|r| *r == reader).expect("a reader of the table");
        for (g, shape) in GRID.iter().enumerate() {
            if matches!(reader, Reader::Sqs(_)) && shape.batch > 10 && shape.window == 0 {
                // with-sqs.html: "When you set BatchSize to a value greater than 10, you must set
                // MaximumBatchingWindowInSeconds to at least 1 second."
                println!(
                    "| {} | {} | {} s | refused by AWS (BatchSize above 10 needs a window of at least 1 s) | | | | |",
                    reader.name(),
                    shape.batch,
                    shape.window
                );
                continue;
            }
            let c: GridCell =
                serde_json::from_value(cell_in_child(index, &format!("grid{g}"), all)).expect("a grid cell's JSON");
            println!(
                "| {} | {} | {} s | {:.0} ms | {:.0} ms | {:.0} | {:.0} | {} |",
                reader.name(),
                shape.batch,
                shape.window,
                c.p50_ms,
                c.p99_ms,
                c.per_thousand,
                c.throughput,
                c.lost
            );
        }
    }
}

fn print_tables(rows: &[Row], rate: u64) {
    println!();
    println!(
        "| reader | way | low {LOW_RATE}/s: delivered/sent | p50 | p99 | overload {rate}/s: sent (rate) | delivered | lost | duplicated | p50 | p99 | waiting when the producer stopped | reader's peak memory | idle requests/min | an idle month on AWS |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        let (l, o) = (&r.low.tally, &r.over.tally);
        println!(
            "| {} | {} | {}/{} | {:.0} ms | {:.0} ms | {} ({:.0}/s) | {} | {} | {} | {:.1} s | {:.1} s | {} | {:.1} MiB | {:.0} | {} |",
            r.reader.name(),
            r.reader.way(),
            l.delivered,
            l.sent,
            l.p50_ms,
            l.p99_ms,
            o.sent,
            r.over.achieved,
            o.delivered,
            o.lost,
            o.duplicated,
            o.p50_ms / 1000.0,
            o.p99_ms / 1000.0,
            o.waiting_at_stop,
            r.over.peak_kib as f64 / 1024.0,
            r.idle_per_minute,
            r.reader.idle_month(r.idle_per_minute),
        );
    }
}

/// Four panels, a bar per reader coloured by the way it reads (the legend below): delay under
/// overload (p50 bar, p99 mark, log), messages lost under overload, the reader's peak memory
/// under overload, requests per idle minute (log).
fn draw(rows: &[Row], rate: u64, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let font: &'static [u8] = match std::env::var("CHART_FONT") {
        Ok(p) => Box::leak(std::fs::read(&p).map_err(|e| format!("{p}: {e}"))?.into_boxed_slice()),
        Err(_) => dejavu::sans::regular(),
    };
    plotters::style::register_font("sans-serif", FontStyle::Normal, font).map_err(|_| "not a usable font")?;
    let path: &'static Path = Box::leak(path.to_owned().into_boxed_path());
    let root = BitMapBackend::new(path, (1800, 860)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "push against pull: a function that handles ~1,000 msg/s; overload: a producer at {rate}/s for 10 s (make bench-pushpull)"
        ),
        ("sans-serif", 24),
    )?;
    let (charts, legend) = root.split_vertically(770);
    let (left, rest) = charts.split_horizontally(780);
    let (lost_area, rest) = rest.split_horizontally(340);
    let (memory_area, idle_area) = rest.split_horizontally(340);
    let n = rows.len() as i32;
    let ways: [(&str, RGBColor); 4] = [
        ("push", RGBColor(214, 39, 40)),
        ("push with credit (prefetch, fan-out's 2 MiB/s, one batch at a time)", RGBColor(255, 127, 14)),
        ("pull", RGBColor(31, 119, 180)),
        ("pull, long poll (waits at the broker)", RGBColor(44, 160, 44)),
    ];
    let color = |r: Reader| match r.way() {
        "push" => ways[0].1,
        w if w.starts_with("push") => ways[1].1,
        "pull, long poll" => ways[3].1,
        _ => ways[2].1,
    };
    let label = |i: i32| rows.get(i as usize).map(|r| r.reader.name()).unwrap_or_default();
    let segments = (0..n - 1).into_segmented();
    // One panel: a bar per reader from `from` to `value(row)` on `x`, with its figure written
    // beside it.
    macro_rules! bars {
        ($chart:expr, $from:expr, $value:expr, $text:expr) => {
            for (i, r) in rows.iter().enumerate() {
                let i = i as i32;
                let v = $value(r);
                $chart.draw_series(std::iter::once(Rectangle::new(
                    [($from, SegmentValue::Exact(i)), (v, SegmentValue::Exact(i + 1))],
                    color(r.reader).mix(0.85).filled(),
                )))?;
                $chart.draw_series(std::iter::once(Text::new(
                    $text(r),
                    (v, SegmentValue::CenterOf(i)),
                    ("sans-serif", 15),
                )))?;
            }
        };
    }
    // Delay under overload, seconds, log: p50 bar, p99 mark.
    let max_delay = rows.iter().map(|r| r.over.tally.p99_ms / 1000.0).fold(1.0, f64::max) * 3.0;
    let mut chart = ChartBuilder::on(&left)
        .caption("delay under overload, s (log): bar p50, mark p99", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(360)
        .build_cartesian_2d((0.01f64..max_delay).log_scale(), segments.clone())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(rows.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => label(*i),
            _ => String::new(),
        })
        .x_label_formatter(&|v| format!("{v}"))
        .draw()?;
    bars!(chart, 0.01, |r: &Row| (r.over.tally.p50_ms / 1000.0).max(0.01), |r: &Row| format!(
        " {:.1} / {:.1}",
        r.over.tally.p50_ms / 1000.0,
        r.over.tally.p99_ms / 1000.0
    ));
    for (i, r) in rows.iter().enumerate() {
        let (i, p99) = (i as i32, (r.over.tally.p99_ms / 1000.0).max(0.01));
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(p99, SegmentValue::Exact(i)), (p99, SegmentValue::Exact(i + 1))],
            BLACK.stroke_width(3),
        )))?;
    }
    // Lost under overload, % of sent.
    let mut chart = ChartBuilder::on(&lost_area)
        .caption("lost under overload, % of sent", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .build_cartesian_2d(0f64..100f64, segments.clone())?;
    chart.configure_mesh().disable_y_mesh().y_labels(0).x_label_formatter(&|v| format!("{v:.0}")).draw()?;
    let lost = |r: &Row| 100.0 * r.over.tally.lost as f64 / r.over.tally.sent.max(1) as f64;
    bars!(chart, 0.0, lost, |r: &Row| format!(" {:.0}%", lost(r)));
    // The reader's peak memory under overload, MiB.
    let max_memory = rows.iter().map(|r| r.over.peak_kib as f64 / 1024.0).fold(1.0, f64::max) * 1.4;
    let mut chart = ChartBuilder::on(&memory_area)
        .caption("reader's peak memory under overload, MiB", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .build_cartesian_2d(0f64..max_memory, segments.clone())?;
    chart.configure_mesh().disable_y_mesh().y_labels(0).x_label_formatter(&|v| format!("{v:.0}")).draw()?;
    let memory = |r: &Row| r.over.peak_kib as f64 / 1024.0;
    bars!(chart, 0.0, memory, |r: &Row| format!(" {:.0}", memory(r)));
    // Requests per idle minute, log (0 drawn at its axis, with its figure).
    let max_idle = rows.iter().map(|r| r.idle_per_minute).fold(10.0, f64::max) * 20.0;
    let mut chart = ChartBuilder::on(&idle_area)
        .caption("reads per idle minute (log)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .build_cartesian_2d((0.5f64..max_idle).log_scale(), segments)?;
    chart.configure_mesh().disable_y_mesh().y_labels(0).x_label_formatter(&|v| format!("{v:.0}")).draw()?;
    bars!(chart, 0.5, |r: &Row| r.idle_per_minute.max(0.5), |r: &Row| format!(" {:.0}", r.idle_per_minute));
    // The legend: the ways of reading.
    let mut x = 20;
    for (name, c) in ways {
        legend.draw(&Rectangle::new([(x, 30), (x + 22, 48)], c.mix(0.85).filled()))?;
        legend.draw(&Text::new(name.to_owned(), (x + 30, 31), ("sans-serif", 17)))?;
        x += 40 + name.len() as i32 * 8;
    }
    root.present()?;
    Ok(())
}
