//! The Redis Streams source (`pushpull_local::mapping::redis_streams`, Redis's pull on the mapping
//! core) and the Redis sink (`pushpull::sink::redis`), against a real Redis (Debian's
//! redis-server, a server of each test's own: `pushpull_tests::redis::OwnRedis`) and a real
//! function binary (`scripted`) behind the Invoke API. AWS has no Redis source: the rules pinned
//! here are ours, written in the module's documentation.
//!
//! | behaviour | test |
//! |---|---|
//! | the sink's entries (data, partition key, the line's name) delivered in batches, the event ours, every entry acknowledged; binary data intact | `entries_are_delivered_in_batches_and_acknowledged_and_the_event_is_ours` |
//! | a partial batch response: the rest acknowledged, the named entry claimed again after `claim_idle` (`deliveryCount` 2) | `a_partial_batch_response_acknowledges_the_rest_and_the_failed_entry_comes_back` |
//! | a poison entry moved to `<stream>:dead-letter` after `max_deliveries`, with its reason | `a_poison_entry_goes_to_the_dead_letter_stream_after_max_deliveries` |
//! | a consumer that died: its pending entries claimed (`XAUTOCLAIM`) and delivered | `the_entries_of_a_consumer_that_died_are_claimed_and_delivered` |
//! | a consumer restarted under its name reads its own pending entries first, once each | `a_restarted_consumer_reads_its_own_pending_entries_once_each` |
//! | hostile: an entry over the 6 MB payload goes to the dead-letter stream uninvoked | `an_entry_over_the_payload_goes_to_the_dead_letter_stream_uninvoked` |
//! | hostile: Redis restarts mid-run: the mapping connects again, nothing is lost | `a_redis_restart_mid_run_loses_nothing` |
//! | hostile: the sink refuses a key that is not a stream, naming it | `the_sink_names_a_key_that_is_not_a_stream` |
//! | settings that mean nothing for Redis are refused | `settings_a_redis_stream_does_not_have_are_refused` |
use std::collections::HashMap;
use std::time::Duration;

use pushpull::sink::redis::{RedisSink, RedisTarget};
use pushpull::sink::{OutRecord, RecordSink};
use pushpull::store::Store;
use pushpull_local::invoke::InvokeServer;
use pushpull_local::mapping::{Clients, RawSettings, RedisStreamSource, Runner, RunnerOptions, Summary};
use pushpull_local::runtime_api::FunctionSpec;
use pushpull_tests::function;
use pushpull_tests::redis::OwnRedis;
use redis::AsyncCommands;
use serde_json::{Value, json};

const FUNCTION: &str = "scripted";

struct Fixture {
    redis: OwnRedis,
    server: InvokeServer,
    dir: tempfile::TempDir,
    stream: String,
}

async fn fixture() -> Fixture {
    let redis = OwnRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let mut spec: FunctionSpec = function(FUNCTION, &[("SCRIPT_DIR", dir.path().to_str().unwrap())]);
    spec.timeout = Duration::from_secs(5);
    let server = InvokeServer::start(vec![spec], 0, 10).await.unwrap();
    Fixture { redis, server, dir, stream: "records".into() }
}

impl Fixture {
    fn source(&self, claim_idle_ms: u64, max_deliveries: u64) -> RedisStreamSource {
        RedisStreamSource {
            url: self.redis.url(),
            stream: self.stream.clone(),
            group: "rollup".into(),
            consumer: "mapping".into(),
            claim_idle: Duration::from_millis(claim_idle_ms),
            max_deliveries,
            block: Duration::from_millis(500),
        }
    }

    fn settings(&self) -> RawSettings {
        RawSettings { function: Some(FUNCTION.into()), ..Default::default() }
    }

    async fn connection(&self) -> redis::aio::MultiplexedConnection {
        self.redis.client().get_multiplexed_async_connection().await.unwrap()
    }

    /// Adds `{"id": .., ..directives}` for each, as the sink does (data and partition key).
    async fn add(&self, entries: &[(&str, Value)]) {
        let mut c = self.connection().await;
        for (id, d) in entries {
            let mut v = d.clone();
            v["id"] = Value::from(*id);
            let _: String = c
                .xadd(&self.stream, "*", &[("data", v.to_string()), ("pushpull-key", (*id).to_owned())])
                .await
                .unwrap();
        }
    }

    /// Runs the mapping until it is idle for 2 s.
    async fn run(&self, raw: RawSettings, source: RedisStreamSource) -> Summary {
        let settings = raw.validate_redis_streams(&source).unwrap();
        let mut options = RunnerOptions::new(&settings, Store::file(self.dir.path().join("unused")));
        options.stop_when_idle = Some(Duration::from_secs(2));
        let clients = Clients::from(
            &pushpull_local::localstack::Local::at(&pushpull_local::localstack::endpoint(), "test").await,
        );
        let (_stop, rx) = tokio::sync::watch::channel(false);
        let run = Runner::run_redis_streams(settings, source, options, clients, self.server.client(), rx);
        tokio::time::timeout(Duration::from_secs(120), run).await.expect("the mapping ran 120 s").unwrap()
    }

    fn read(&self, file: &str) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.path().join(file)).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// Per invocation: the ids and the answer.
    fn batches(&self) -> Vec<(Vec<String>, String)> {
        self.read("log.ndjson")
            .iter()
            .map(|l| {
                let ids = l["ids"].as_array().unwrap().iter().map(|i| i.as_str().unwrap().to_owned()).collect();
                (ids, l["answer"].as_str().unwrap().to_owned())
            })
            .collect()
    }

    fn sightings(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for (ids, _) in self.batches() {
            for id in ids {
                *m.entry(id).or_default() += 1;
            }
        }
        m
    }

    /// Entries the group holds pending (delivered, not acknowledged).
    async fn pending(&self) -> usize {
        let mut c = self.connection().await;
        let reply: redis::streams::StreamPendingReply = c.xpending(&self.stream, "rollup").await.unwrap();
        reply.count()
    }
}

#[tokio::test]
async fn entries_are_delivered_in_batches_and_acknowledged_and_the_event_is_ours() {
    let f = fixture().await;
    // The sink writes them: data, partition key, and the line's name.
    let sink = RedisSink::connect(&f.redis.url(), RedisTarget::Stream(f.stream.clone())).await.unwrap();
    let origin: std::sync::Arc<str> = "in/a.ndjson@v1".into();
    let mut records: Vec<OutRecord> = (0..24)
        .map(|i| {
            let mut r = OutRecord::new(format!("k{}", i % 3), json!({"id": format!("e{i}")}).to_string().into(), i + 1);
            r.origin = Some(origin.clone());
            r
        })
        .collect();
    // Binary data, not JSON, not UTF-8: carried intact.
    let binary = vec![0u8, 0xff, 0xfe, b'\n', 0x80];
    let mut bin = OutRecord::new("k0", binary.clone().into(), 25);
    bin.origin = Some(origin.clone());
    records.push(bin);
    assert!(sink.put_records(&records).await.unwrap().failed.is_empty());
    assert!(sink.names_records());
    let summary = f.run(RawSettings { batch_size: Some("10".into()), ..f.settings() }, f.source(30_000, 5)).await;
    let seen = f.sightings();
    for i in 0..24 {
        assert_eq!(seen.get(&format!("e{i}")), Some(&1), "e{i} delivered once: {seen:?}");
    }
    assert_eq!(summary.counts.records_read, 25);
    assert!(f.batches().iter().all(|(ids, _)| ids.len() <= 10), "BatchSize 10: {:?}", f.batches());
    let events = f.read("events.ndjson");
    let records: Vec<&Value> = events.iter().flat_map(|e| e["Records"].as_array().unwrap()).collect();
    let first = records.iter().find(|r| r["data"] == "eyJpZCI6ImUwIn0=").expect("e0's record");
    assert_eq!(first["eventSource"], "pushpull:redis-streams");
    assert_eq!((first["stream"].as_str(), first["group"].as_str()), (Some("records"), Some("rollup")));
    assert_eq!(first["deliveryCount"], 1);
    assert_eq!(first["fields"]["pushpull-origin"], "in/a.ndjson@v1#1");
    assert_eq!(first["fields"]["pushpull-key"], "k0");
    assert!(first["id"].as_str().unwrap().contains('-') && first["timestamp"].as_u64().unwrap() > 1_700_000_000_000);
    let event = pushpull::pull::redis::RedisEvent::from_slice(events[0].to_string().as_bytes()).unwrap();
    assert!(!event.records.is_empty());
    let bin = records.iter().find(|r| r["fields"]["pushpull-origin"] == "in/a.ndjson@v1#25").expect("the binary entry");
    let r: pushpull::pull::redis::RedisRecord = serde_json::from_value((*bin).clone()).unwrap();
    assert_eq!(r.data_bytes().unwrap(), binary, "binary data intact");
    assert_eq!(f.pending().await, 0, "every entry acknowledged");
}

#[tokio::test]
async fn a_partial_batch_response_acknowledges_the_rest_and_the_failed_entry_comes_back() {
    let f = fixture().await;
    f.add(&[("a", json!({})), ("b", json!({"item_fail": 1})), ("c", json!({}))]).await;
    // No retry in the poller: the failed entry comes back only by being claimed.
    let raw = RawSettings {
        function_response_types: Some("ReportBatchItemFailures".into()),
        maximum_retry_attempts: Some("0".into()),
        ..f.settings()
    };
    let summary = f.run(raw, f.source(1_000, 5)).await;
    let seen = f.sightings();
    assert_eq!((seen["a"], seen["b"], seen["c"]), (1, 2, 1), "only b again: {:?}", f.batches());
    let events = f.read("events.ndjson");
    let last_b = events
        .iter()
        .flat_map(|e| e["Records"].as_array().unwrap().clone())
        .collect::<Vec<_>>()
        .into_iter()
        .rfind(|r| r["data"] == "eyJpZCI6ImIiLCJpdGVtX2ZhaWwiOjF9")
        .unwrap();
    assert_eq!(last_b["deliveryCount"], 2, "claimed again: its second delivery");
    assert!(summary.counts.requeued >= 1, "{:?}", summary.counts);
    assert_eq!(f.pending().await, 0);
}

#[tokio::test]
async fn a_poison_entry_goes_to_the_dead_letter_stream_after_max_deliveries() {
    let f = fixture().await;
    f.add(&[("ok1", json!({})), ("poison", json!({"error": 100})), ("ok2", json!({}))]).await;
    let raw = RawSettings { batch_size: Some("1".into()), maximum_retry_attempts: Some("0".into()), ..f.settings() };
    let summary = f.run(raw, f.source(500, 2)).await;
    let seen = f.sightings();
    assert_eq!((seen["ok1"], seen["ok2"]), (1, 1));
    assert_eq!(seen["poison"], 2, "delivered max_deliveries times, then no more: {:?}", f.batches());
    let mut c = f.connection().await;
    let dead: redis::streams::StreamRangeReply = c.xrange_all("records:dead-letter").await.unwrap();
    assert_eq!(dead.ids.len(), 1, "one entry in the dead-letter stream");
    let entry = &dead.ids[0];
    let reason: String = entry.get("pushpull-reason").unwrap();
    assert!(reason.contains("delivered 3 times (max deliveries 2)"), "{reason}");
    let data: String = entry.get("data").unwrap();
    assert!(data.contains("poison"), "{data}");
    assert_eq!(summary.counts.to_destination, 1);
    assert_eq!(f.pending().await, 0, "moved, then acknowledged");
}

#[tokio::test]
async fn the_entries_of_a_consumer_that_died_are_claimed_and_delivered() {
    let f = fixture().await;
    let mut c = f.connection().await;
    let _: () = c.xgroup_create_mkstream(&f.stream, "rollup", "0").await.unwrap();
    f.add(&[("d1", json!({})), ("d2", json!({})), ("d3", json!({}))]).await;
    // A worker reads them and dies before acknowledging.
    let opts = redis::streams::StreamReadOptions::default().group("rollup", "worker-that-died").count(10);
    let read: redis::streams::StreamReadReply = c.xread_options(&[&f.stream], &[">"], &opts).await.unwrap();
    assert_eq!(read.keys[0].ids.len(), 3);
    f.add(&[("new", json!({}))]).await;
    let summary = f.run(f.settings(), f.source(500, 5)).await;
    let seen = f.sightings();
    for id in ["d1", "d2", "d3", "new"] {
        assert_eq!(seen.get(id), Some(&1), "{id}: {seen:?}");
    }
    assert_eq!(summary.counts.requeued, 3, "three claimed");
    assert_eq!(f.pending().await, 0);
}

#[tokio::test]
async fn a_restarted_consumer_reads_its_own_pending_entries_once_each() {
    let f = fixture().await;
    let mut c = f.connection().await;
    let _: () = c.xgroup_create_mkstream(&f.stream, "rollup", "0").await.unwrap();
    f.add(&[("p1", json!({})), ("p2", json!({})), ("p3", json!({}))]).await;
    // A previous run of the same consumer read them and stopped before acknowledging.
    let opts = redis::streams::StreamReadOptions::default().group("rollup", "mapping").count(10);
    let _: redis::streams::StreamReadReply = c.xread_options(&[&f.stream], &[">"], &opts).await.unwrap();
    f.add(&[("later", json!({}))]).await;
    let summary = f.run(f.settings(), f.source(30_000, 5)).await;
    let seen = f.sightings();
    for id in ["p1", "p2", "p3", "later"] {
        assert_eq!(seen.get(id), Some(&1), "{id} once: {seen:?}");
    }
    assert_eq!(summary.counts.records_read, 4, "{:?}", summary.counts);
    assert_eq!(f.pending().await, 0);
}

#[tokio::test]
async fn an_entry_over_the_payload_goes_to_the_dead_letter_stream_uninvoked() {
    let f = fixture().await;
    let mut c = f.connection().await;
    let big = vec![b'x'; 7 * 1024 * 1024];
    f.add(&[("before", json!({}))]).await;
    let _: String = c.xadd(&f.stream, "*", &[("data", big.as_slice())]).await.unwrap();
    f.add(&[("after", json!({}))]).await;
    let summary = f.run(f.settings(), f.source(30_000, 5)).await;
    let seen = f.sightings();
    assert_eq!((seen.get("before"), seen.get("after")), (Some(&1), Some(&1)));
    assert_eq!(seen.get("?"), None, "the big entry was never invoked");
    let dead: redis::streams::StreamRangeReply = c.xrange_all("records:dead-letter").await.unwrap();
    assert_eq!(dead.ids.len(), 1);
    let reason: String = dead.ids[0].get("pushpull-reason").unwrap();
    assert!(reason.contains("larger than the 6 MB"), "{reason}");
    assert_eq!(summary.counts.to_destination, 1);
    assert_eq!(f.pending().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_run_loses_nothing() {
    let f = fixture().await;
    let n = 300;
    let entries: Vec<(String, Value)> = (0..n).map(|i| (format!("r{i}"), json!({"sleep_ms": 10}))).collect();
    let refs: Vec<(&str, Value)> = entries.iter().map(|(id, v)| (id.as_str(), v.clone())).collect();
    f.add(&refs).await;
    // The append-only file is fsynced every second: the entries are on disk before the restart.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let raw = RawSettings { batch_size: Some("10".into()), ..f.settings() };
    let run = f.run(raw, f.source(2_000, 10));
    let restart = async {
        while f.batches().len() < 5 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let redis = &f.redis;
        tokio::task::block_in_place(|| redis.control(&["restart"]));
    };
    let (summary, ()) = tokio::join!(run, restart);
    let seen = f.sightings();
    for i in 0..n {
        assert!(seen.contains_key(&format!("r{i}")), "r{i} delivered (at least once)");
    }
    assert!(summary.counts.reconnects >= 1, "{:?}", summary.counts);
    assert_eq!(f.pending().await, 0);
}

#[tokio::test]
async fn the_sink_names_a_key_that_is_not_a_stream() {
    let redis = OwnRedis::start();
    let mut c = redis.client().get_multiplexed_async_connection().await.unwrap();
    let _: () = c.set("not-a-stream", "text").await.unwrap();
    let sink = RedisSink::connect(&redis.url(), RedisTarget::Stream("not-a-stream".into())).await.unwrap();
    let e = sink.put_records(&[OutRecord::keyed("k", "{}")]).await.unwrap_err();
    assert!(!e.retryable, "{e}");
    assert!(e.message.contains("stream not-a-stream") && e.message.contains("WRONGTYPE"), "{e}");
    // Publishing to a channel no one listens to is lost, and counted.
    let channel = RedisSink::connect(&redis.url(), RedisTarget::Channel("nobody".into())).await.unwrap();
    channel.put_records(&[OutRecord::keyed("k", "{}"), OutRecord::keyed("k", "{}")]).await.unwrap();
    assert_eq!(channel.unheard(), 2);
    let refused = RedisSink::connect("redis://127.0.0.1:1/", RedisTarget::Channel("c".into())).await.unwrap_err();
    assert!(refused.retryable && refused.message.contains("127.0.0.1:1"), "{refused}");
}

#[test]
fn settings_a_redis_stream_does_not_have_are_refused() {
    let source = RedisStreamSource {
        url: "redis://127.0.0.1:6390/".into(),
        stream: "s".into(),
        group: "g".into(),
        consumer: "c".into(),
        claim_idle: Duration::from_secs(30),
        max_deliveries: 5,
        block: Duration::from_secs(1),
    };
    let base = || RawSettings { function: Some("f".into()), ..Default::default() };
    for (raw, says) in [
        (RawSettings { tumbling_window: Some("60".into()), ..base() }, "TumblingWindowInSeconds is not a setting"),
        (RawSettings { on_failure: Some("arn:aws:sqs:us-east-1:1:q".into()), ..base() }, "s:dead-letter"),
        (RawSettings { bisect: Some("true".into()), ..base() }, "BisectBatchOnFunctionError"),
        (RawSettings { starting_position: Some("AT_TIMESTAMP".into()), ..base() }, "TRIM_HORIZON, LATEST"),
        (RawSettings { batch_size: Some("10001".into()), ..base() }, "less than or equal to 10000"),
    ] {
        let e = raw.validate_redis_streams(&source).unwrap_err();
        assert!(e.0.contains(says), "{} does not say {says}", e.0);
    }
    let s = base().validate_redis_streams(&source).unwrap();
    assert_eq!((s.batch_size, s.maximum_retry_attempts), (100, 2));
    assert_eq!(s.event_source_arn(), "pushpull:redis:127.0.0.1:6390:s");
}
