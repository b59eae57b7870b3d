//! Fidelity of the local Amazon MQ for RabbitMQ event source mapping
//! (`pushpull_local::mapping::rabbitmq`): the broker `make test` starts (`infra/rabbitmq.sh`), a
//! real function binary (`scripted`, whose answers the messages script) behind the Invoke API,
//! and assertions on the batches the function received and what is left in the queues. AWS's words
//! for each rule, with their pages, are in `docs/rabbitmq-aws-rules.md`.
//!
//! | behaviour | test |
//! |---|---|
//! | the event as AWS writes it (`aws:rmq`, `queue::vhost`, properties, base64 data); one batch at a time in queue order, BatchSize; every message acknowledged after its batch | `batches_keep_queue_order_and_every_message_is_acknowledged_after_its_batch` |
//! | a failing batch: retried in the poller, then requeued: it comes back `redelivered` | `a_failing_batch_is_retried_then_requeued_and_comes_back_redelivered` |
//! | a poison message is dead-lettered by a quorum queue's `x-delivery-limit` | `a_poison_message_is_dead_lettered_by_the_quorum_queues_delivery_limit` |
//! | FilterCriteria on `data`: unmatched messages acknowledged, never invoked | `filtered_out_messages_are_acknowledged_and_never_invoked` |
//! | a message over the 6 MB payload: dropped (acknowledged) uninvoked | `a_message_over_6_mb_is_dropped_uninvoked` |
//! | settings AWS does not have for Amazon MQ are refused; a missing queue is an error naming it | `settings_aws_lacks_are_refused_and_a_missing_queue_is_named` |
//! | stopping while the function cannot be invoked takes the grace period, and the batch goes back to the queue | `a_stop_waits_the_grace_period_at_most_and_the_batch_goes_back_to_the_queue` |
//! | hostile: headers of every AMQP field type, a body that is not UTF-8 | `headers_of_every_amqp_type_and_a_body_that_is_not_utf8_reach_the_function` |
//! | hostile: a message expired (TTL) in the queue is never invoked | `an_expired_message_never_reaches_the_function` |
//! | hostile: the queue deleted mid-run stops the mapping with an error naming it | `a_queue_deleted_mid_run_stops_the_mapping_with_an_error_naming_it` |
//! | a lost connection (the broker closing it, restarting) is opened again; nothing is lost | `pipeline::through_rabbitmq_in_a_storm_*` |
use std::time::Duration;

use lapin::Channel;
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use pushpull::store::Store;
use pushpull_local::invoke::InvokeServer;
use pushpull_local::mapping::{Clients, RabbitMqSource, RawSettings, Runner, RunnerOptions, Summary};
use pushpull_local::runtime_api::FunctionSpec;
use pushpull_tests::rabbitmq::{confirming, connect, dead_lettering, publish, queue, url};
use pushpull_tests::{function, local, unique};
use serde_json::{Value, json};

const FUNCTION: &str = "scripted";

struct Fixture {
    queue: String,
    channel: Channel,
    _connection: lapin::Connection,
    server: InvokeServer,
    dir: tempfile::TempDir,
}

async fn fixture_with(arguments: FieldTable) -> Fixture {
    let connection = connect().await;
    let channel = confirming(&connection).await;
    let queue = queue(&channel, "rmap", arguments).await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec: FunctionSpec = function(FUNCTION, &[("SCRIPT_DIR", dir.path().to_str().unwrap())]);
    spec.timeout = Duration::from_secs(5);
    let server = InvokeServer::start(vec![spec], 0, 10).await.unwrap();
    Fixture { queue, channel, _connection: connection, server, dir }
}

async fn fixture() -> Fixture {
    fixture_with(FieldTable::default()).await
}

impl Fixture {
    fn source(&self) -> RabbitMqSource {
        RabbitMqSource { url: url(), queue: self.queue.clone(), broker_arn: None }
    }

    fn settings(&self) -> RawSettings {
        RawSettings { function: Some(FUNCTION.into()), batching_window: Some("1".into()), ..Default::default() }
    }

    /// Publishes `{"id": .., ..directives}` for each.
    async fn send(&self, messages: &[(&str, Value)]) {
        let bodies: Vec<Vec<u8>> = messages
            .iter()
            .map(|(id, d)| {
                let mut v = d.clone();
                v["id"] = Value::from(*id);
                v.to_string().into_bytes()
            })
            .collect();
        publish(&self.channel, &self.queue, &bodies.iter().map(Vec::as_slice).collect::<Vec<_>>()).await;
    }

    /// Runs the mapping until it is idle for 2 s.
    async fn run(&self, raw: RawSettings) -> Summary {
        let settings = raw.validate_rabbitmq(&self.source()).unwrap();
        let mut options = RunnerOptions::new(&settings, Store::file(self.dir.path().join("unused")));
        options.stop_when_idle = Some(Duration::from_secs(2));
        let clients = Clients::from(&local().await);
        let (_stop, rx) = tokio::sync::watch::channel(false);
        let run = Runner::run_rabbitmq(settings, self.source(), options, clients, self.server.client(), rx);
        tokio::time::timeout(Duration::from_secs(120), run).await.expect("the mapping ran 120 s").unwrap()
    }

    fn log(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.path().join("log.ndjson")).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn events(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.path().join("events.ndjson")).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// Per invocation: the ids and whether each was redelivered.
    fn batches(&self) -> Vec<(Vec<String>, Vec<bool>)> {
        self.log()
            .iter()
            .map(|l| {
                let ids = l["ids"].as_array().unwrap().iter().map(|i| i.as_str().unwrap().to_owned()).collect();
                let re = l["redelivered"].as_array().unwrap().iter().map(|r| r.as_bool().unwrap()).collect();
                (ids, re)
            })
            .collect()
    }

    /// Messages ready in `queue` (unacknowledged ones went back when the mapping's channel closed).
    async fn depth(&self, queue: &str) -> u32 {
        let channel = self._connection.create_channel().await.unwrap();
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
    }
}

/// AWS (with-mq.html): messages listed "under `pizzaQueue::/`" (queue and virtual host); "For
/// RabbitMQ, the number of concurrent execution environments is limited to 1 per Amazon MQ event
/// source mapping"; (invocation-eventfiltering) "Lambda acknowledges matched messages after
/// successfully invoking the function".
#[tokio::test]
async fn batches_keep_queue_order_and_every_message_is_acknowledged_after_its_batch() {
    let f = fixture().await;
    let ids: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
    f.send(&ids.iter().map(|id| (id.as_str(), json!({}))).collect::<Vec<_>>()).await;
    let s = f.run(RawSettings { batch_size: Some("7".into()), ..f.settings() }).await;
    let batches = f.batches();
    let seen: Vec<String> = batches.iter().flat_map(|(ids, _)| ids.clone()).collect();
    assert_eq!(seen, ids, "every message once, in queue order");
    assert!(batches.iter().all(|(ids, _)| ids.len() <= 7), "BatchSize 7");
    assert_eq!(s.counts.records_read, 50);
    assert_eq!(f.depth(&f.queue).await, 0, "every message acknowledged");
    let text = s.to_string();
    assert!(s.amazon_mq.is_some() && text.contains("a queue consumer") && text.contains("50 messages"), "{text}");
    // The event as AWS writes it.
    let event = &f.events()[0];
    assert_eq!(event["eventSource"], "aws:rmq");
    assert!(event["eventSourceArn"].as_str().unwrap().starts_with("arn:aws:mq:"), "{event}");
    let key = format!("{}::pushpull", f.queue);
    let m = &event["rmqMessagesByQueue"][&key][0];
    assert_eq!(m["redelivered"], false);
    assert_eq!(m["basicProperties"]["deliveryMode"], 2);
    assert!(m["basicProperties"]["messageId"].is_null(), "unset properties are null");
    assert_eq!(m["basicProperties"]["bodySize"], "{\"id\":\"m0\"}".len());
    // Read back through the library.
    let text = event.to_string();
    let e = pushpull::pull::rabbitmq::RabbitMqEvent::from_slice(text.as_bytes()).unwrap();
    let (k, first) = e.messages().next().unwrap();
    assert_eq!(pushpull::pull::rabbitmq::queue_and_vhost(k), (f.queue.as_str(), "pushpull"));
    assert_eq!(first.json::<Value>().unwrap()["id"], "m0");
}

/// AWS (with-mq.html): "If your function returns an error for any of the messages in a batch,
/// Lambda retries the whole batch of messages until processing succeeds or the messages expire."
/// Ours (AWS is silent on how): retried twice in the poller, then nacked and requeued; the broker
/// delivers it again marked `redelivered`.
#[tokio::test]
async fn a_failing_batch_is_retried_then_requeued_and_comes_back_redelivered() {
    let f = fixture().await;
    f.send(&[("bad", json!({ "error": 3 })), ("good", json!({}))]).await;
    let s = f.run(RawSettings { batch_size: Some("10".into()), ..f.settings() }).await;
    let batches = f.batches();
    let of_bad: Vec<&(Vec<String>, Vec<bool>)> =
        batches.iter().filter(|(ids, _)| ids.contains(&"bad".into())).collect();
    assert_eq!(of_bad.len(), 4, "three failures (the first delivery and two retries), then a success: {batches:?}");
    assert!(of_bad[..3].iter().all(|(_, re)| !re[0]), "the retries in the poller are the same delivery");
    assert!(of_bad[3].1[0], "after the requeue the broker marks it redelivered");
    assert_eq!(s.counts.requeued, 2, "the batch of two went back once");
    assert_eq!(f.depth(&f.queue).await, 0);
}

/// The sample's bound on a poison message (services-mq-errors.html: "To redeliver messages upon
/// function error, you can use a dead-letter queue"): a quorum queue with `x-delivery-limit` 1 and
/// a dead-letter exchange takes a message that always fails back once, then dead-letters it.
#[tokio::test]
async fn a_poison_message_is_dead_lettered_by_the_quorum_queues_delivery_limit() {
    let connection = connect().await;
    let channel = confirming(&connection).await;
    let (args, dlq) = dead_lettering(&channel, 1).await;
    let f = fixture_with(args).await;
    f.send(&[("poison", json!({ "error": 1000 }))]).await;
    let s = f.run(f.settings()).await;
    assert_eq!(f.batches().len(), 6, "two deliveries of three invocations each");
    assert_eq!(s.counts.requeued, 2);
    let dead = channel.basic_get(dlq.as_str().into(), BasicGetOptions::default()).await.unwrap();
    let dead = dead.expect("the poison message is in the dead-letter queue");
    assert_eq!(serde_json::from_slice::<Value>(&dead.delivery.data).unwrap()["id"], "poison");
    assert_eq!(f.depth(&f.queue).await, 0);
}

/// AWS (with-mq-filtering.html): "Amazon MQ event source mappings only support filtering on the
/// `data` key"; (invocation-eventfiltering) Lambda "acknowledges unmatched messages when
/// filtering them".
#[tokio::test]
async fn filtered_out_messages_are_acknowledged_and_never_invoked() {
    let f = fixture().await;
    f.send(&[("a", json!({ "kind": "keep" })), ("b", json!({ "kind": "skip" })), ("c", json!({ "kind": "keep" }))])
        .await;
    let filter = r#"{"Filters":[{"Pattern":"{\"data\":{\"kind\":[\"keep\"]}}"}]}"#;
    let s = f.run(RawSettings { filter_criteria: Some(filter.into()), ..f.settings() }).await;
    let seen: Vec<String> = f.batches().into_iter().flat_map(|(ids, _)| ids).collect();
    assert_eq!(seen, ["a", "c"]);
    assert_eq!(s.counts.filtered_out, 1);
    assert_eq!(f.depth(&f.queue).await, 0, "the unmatched message was acknowledged too");
}

/// AWS (services-mq-errors.html): "Records also go unprocessed if Lambda drops them due to their
/// size. The size limit for Lambda records is 6 MB."
#[tokio::test]
async fn a_message_over_6_mb_is_dropped_uninvoked() {
    let f = fixture().await;
    let big = "x".repeat(7 * 1024 * 1024);
    f.send(&[("before", json!({})), ("big", json!({ "pad": big })), ("after", json!({}))]).await;
    let s = f.run(f.settings()).await;
    let seen: Vec<String> = f.batches().into_iter().flat_map(|(ids, _)| ids).collect();
    assert_eq!(seen, ["before", "after"], "the big one never reaches the function");
    assert_eq!(s.counts.discarded, 1);
    assert_eq!(s.counts.requeued, 0, "dropped, not handed back");
    assert_eq!(f.depth(&f.queue).await, 0);
}

#[tokio::test]
async fn settings_aws_lacks_are_refused_and_a_missing_queue_is_named() {
    let f = fixture().await;
    for (raw, name) in [
        (RawSettings { starting_position: Some("LATEST".into()), ..f.settings() }, "StartingPosition"),
        (
            RawSettings { on_failure: Some("arn:aws:sqs:us-east-1:000000000000:q".into()), ..f.settings() },
            "DestinationConfig",
        ),
        (
            RawSettings { function_response_types: Some("ReportBatchItemFailures".into()), ..f.settings() },
            "FunctionResponseTypes",
        ),
        (RawSettings { parallelization_factor: Some("2".into()), ..f.settings() }, "ParallelizationFactor"),
        (RawSettings { batch_size: Some("10001".into()), ..f.settings() }, "batchSize"),
    ] {
        let e = raw.validate_rabbitmq(&f.source()).unwrap_err().to_string();
        assert!(e.contains(name), "{name}: {e}");
    }
    let s =
        RawSettings { function: Some(FUNCTION.into()), ..Default::default() }.validate_rabbitmq(&f.source()).unwrap();
    assert_eq!((s.batch_size, s.batching_window), (100, Duration::from_millis(500)), "AWS's defaults");
    let missing = RabbitMqSource { queue: unique("rmap-missing"), ..f.source() };
    let settings = f.settings().validate_rabbitmq(&missing).unwrap();
    let options = RunnerOptions::new(&settings, Store::file(f.dir.path().join("unused")));
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let run =
        Runner::run_rabbitmq(settings, missing.clone(), options, Clients::from(&local().await), f.server.client(), rx);
    let e =
        tokio::time::timeout(Duration::from_secs(30), run).await.expect("stopped").expect_err("no queue").to_string();
    assert!(e.contains(&missing.queue) && !e.contains("pushpull:pushpull@"), "named, password hidden: {e}");
}

/// An Invoke API that cannot be reached is retried without end (Amazon MQ mappings have no record
/// age); a stop still ends the mapping after the grace period, and the batch it held goes back to
/// the queue, unacknowledged.
#[tokio::test]
async fn a_stop_waits_the_grace_period_at_most_and_the_batch_goes_back_to_the_queue() {
    let f = fixture().await;
    f.send(&[("held", json!({}))]).await;
    let settings = f.settings().validate_rabbitmq(&f.source()).unwrap();
    let mut options = RunnerOptions::new(&settings, Store::file(f.dir.path().join("unused")));
    options.stop_grace = Duration::from_secs(1);
    let nowhere = pushpull_local::invoke::InvokeClient::new("http://127.0.0.1:9");
    let (stop, rx) = tokio::sync::watch::channel(false);
    let run =
        tokio::spawn(Runner::run_rabbitmq(settings, f.source(), options, Clients::from(&local().await), nowhere, rx));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let asked = std::time::Instant::now();
    stop.send(true).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), run).await.expect("stopped within 10 s").unwrap();
    assert!(ended.is_ok(), "{ended:?}");
    assert!(asked.elapsed() < Duration::from_secs(5), "the grace period, not the retries: {:?}", asked.elapsed());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(f.depth(&f.queue).await, 1, "never acknowledged: back in the queue");
}

/// Publishes `body` with `properties` (confirmed).
async fn publish_raw(channel: &Channel, queue: &str, body: &[u8], properties: lapin::BasicProperties) {
    let confirm = channel
        .basic_publish("".into(), queue.into(), lapin::options::BasicPublishOptions::default(), body, properties)
        .await
        .unwrap();
    assert!(confirm.await.unwrap().is_ack());
}

/// Hostile input: headers of every AMQP field type RabbitMQ carries, and a body that is not UTF-8.
/// AWS documents the long string (`{"bytes": [...]}`, the bytes signed, as Java's `byte`) and the
/// integer (a number) only (with-mq.html's sample event); the rest is written as AWS's Java
/// poller's Gson would write the values its AMQP client hands it, and pinned here: numbers for
/// every integer and float type, a decimal as its value, a timestamp as a Gson date, a byte
/// array as signed bytes, a field array and a table as JSON arrays and objects, void as null.
/// The body reaches the function byte for byte (base64 of the bytes, whatever they are).
#[tokio::test]
async fn headers_of_every_amqp_type_and_a_body_that_is_not_utf8_reach_the_function() {
    use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, LongString, ShortString};
    let f = fixture().await;
    let mut nested = FieldTable::default();
    nested.insert(ShortString::from("inner"), AMQPValue::LongInt(7));
    let mut h = FieldTable::default();
    let entries: Vec<(&str, AMQPValue)> = vec![
        ("bool", AMQPValue::Boolean(true)),
        ("i8", AMQPValue::ShortShortInt(-8)),
        ("u8", AMQPValue::ShortShortUInt(200)),
        ("i16", AMQPValue::ShortInt(-1600)),
        ("u16", AMQPValue::ShortUInt(60000)),
        ("i32", AMQPValue::LongInt(-320_000)),
        ("u32", AMQPValue::LongUInt(4_000_000_000)),
        ("i64", AMQPValue::LongLongInt(-6_400_000_000)),
        ("f32", AMQPValue::Float(1.5)),
        ("f64", AMQPValue::Double(-2.25)),
        ("decimal", AMQPValue::DecimalValue(DecimalValue { scale: 2, value: 12345 })),
        ("longstr", AMQPValue::LongString(LongString::from("é"))),
        ("array", AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongInt(1), AMQPValue::Boolean(false)]))),
        ("timestamp", AMQPValue::Timestamp(1_796_656_562)),
        ("table", AMQPValue::FieldTable(nested)),
        ("bytes", AMQPValue::ByteArray(ByteArray::from(vec![0u8, 255]))),
        ("void", AMQPValue::Void),
    ];
    for (k, v) in entries {
        h.insert(ShortString::from(k), v);
    }
    let body = [0xffu8, 0xfe, 0x00, 0x80, b'{'];
    publish_raw(&f.channel, &f.queue, &body, lapin::BasicProperties::default().with_headers(h)).await;
    f.run(f.settings()).await;
    let event = &f.events()[0];
    let key = format!("{}::pushpull", f.queue);
    let m = &event["rmqMessagesByQueue"][&key][0];
    let data = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, m["data"].as_str().unwrap()).unwrap();
    assert_eq!(data, body, "the body byte for byte");
    let headers = &m["basicProperties"]["headers"];
    println!("{headers:#}");
    assert_eq!(headers["bool"], json!(true));
    assert_eq!(headers["i8"], json!(-8));
    assert_eq!(headers["i16"], json!(-1600));
    assert_eq!(headers["i32"], json!(-320_000));
    assert_eq!(headers["i64"], json!(-6_400_000_000i64));
    assert_eq!(headers["f32"], json!(1.5));
    assert_eq!(headers["f64"], json!(-2.25));
    assert_eq!(headers["decimal"], json!(123.45));
    assert_eq!(headers["longstr"], json!({"bytes": [-61, -87]}), "é in UTF-8, as Java's signed bytes");
    assert_eq!(headers["array"], json!([1, false]));
    assert_eq!(headers["table"], json!({"inner": 7}));
    assert_eq!(headers["void"], json!(null));
    assert!(headers["timestamp"].as_str().is_some_and(|t| t.contains("2026")), "a Gson date: {}", headers["timestamp"]);
    // RabbitMQ's own table types beyond AMQP 0-9-1's errata: unsigned integers, a byte array.
    assert_eq!(
        (&headers["u8"], &headers["u16"], &headers["u32"]),
        (&json!(200), &json!(60000), &json!(4_000_000_000u32))
    );
    assert_eq!(headers["bytes"], json!([0, -1]), "signed, as Java's byte[]");
    assert_eq!(f.depth(&f.queue).await, 0);
}

/// Hostile input: a message whose time to live ran out in the queue never reaches the function
/// (the broker drops it: AWS, with-mq.html, "Lambda retries the whole batch of messages until
/// processing succeeds or the messages expire": expiry is the broker's); one still alive arrives
/// with its `expiration` as AMQP's text.
#[tokio::test]
async fn an_expired_message_never_reaches_the_function() {
    let f = fixture().await;
    let props = |ttl: &str| lapin::BasicProperties::default().with_expiration(ttl.into());
    publish_raw(&f.channel, &f.queue, br#"{"id":"expired"}"#, props("50")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish_raw(&f.channel, &f.queue, br#"{"id":"alive"}"#, props("600000")).await;
    f.run(f.settings()).await;
    let seen: Vec<String> = f.batches().into_iter().flat_map(|(ids, _)| ids).collect();
    assert_eq!(seen, ["alive"]);
    let key = format!("{}::pushpull", f.queue);
    assert_eq!(f.events()[0]["rmqMessagesByQueue"][&key][0]["basicProperties"]["expiration"], "600000");
    assert_eq!(f.depth(&f.queue).await, 0);
}

/// Hostile input: the queue deleted while the mapping reads it. The broker cancels the consumer;
/// the mapping stops with an error naming the queue (AWS would disable it after failing to
/// reach it; it does not make the queue again), its password hidden, and what was delivered before
/// was processed.
#[tokio::test]
async fn a_queue_deleted_mid_run_stops_the_mapping_with_an_error_naming_it() {
    let f = fixture().await;
    f.send(&[("first", json!({}))]).await;
    let settings = f.settings().validate_rabbitmq(&f.source()).unwrap();
    let options = RunnerOptions::new(&settings, Store::file(f.dir.path().join("unused")));
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(Runner::run_rabbitmq(
        settings,
        f.source(),
        options,
        Clients::from(&local().await),
        f.server.client(),
        rx,
    ));
    for _ in 0..100 {
        if !f.batches().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(f.batches().len(), 1, "the message before the deletion was processed");
    f.channel.queue_delete(f.queue.as_str().into(), lapin::options::QueueDeleteOptions::default()).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), run).await.expect("the mapping stopped").unwrap();
    let e = ended.expect_err("a deleted queue is an error").to_string();
    assert!(e.contains(&f.queue) && !e.contains("pushpull:pushpull@"), "named, password hidden: {e}");
}
