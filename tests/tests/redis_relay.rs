//! The Redis pub/sub → Lambda relay (`pushpull_local::relay`, Redis's push) against a real Redis
//! (a server of each test's own) and a real function binary (`scripted`) behind the Invoke API.
//!
//! | behaviour | test |
//! |---|---|
//! | under normal load every message is delivered, once, at most `concurrency` invocations at once, each with the messages already read; the event ours; binary payloads intact | `every_message_is_delivered_once_under_normal_load` |
//! | a function slower than the publisher backs up into Redis, whose `client-output-buffer-limit pubsub` cuts the subscriber: the loss is counted, never hidden | `a_slow_function_backs_up_into_redis_which_cuts_the_subscriber_and_the_loss_shows` |
//! | hostile: Redis restarts mid-run: the relay subscribes again and goes on | `a_redis_restart_mid_run_is_ridden_out` |
//! | a function error is retried twice, then the message is given up and counted | `a_failing_message_is_retried_then_given_up_and_counted` |
use std::time::Duration;

use pushpull::sink::redis::{RedisSink, RedisTarget};
use pushpull::sink::{OutRecord, RecordSink};
use pushpull_local::invoke::InvokeServer;
use pushpull_local::relay::{RelayConfig, RelayCounts, RunningRelay};
use pushpull_local::runtime_api::FunctionSpec;
use pushpull_tests::function;
use pushpull_tests::redis::OwnRedis;
use serde_json::{Value, json};

const FUNCTION: &str = "scripted";

struct Fixture {
    redis: OwnRedis,
    server: InvokeServer,
    dir: tempfile::TempDir,
}

async fn fixture(concurrency: usize) -> Fixture {
    let redis = OwnRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let mut spec: FunctionSpec = function(FUNCTION, &[("SCRIPT_DIR", dir.path().to_str().unwrap())]);
    spec.timeout = Duration::from_secs(5);
    let server = InvokeServer::start(vec![spec], 0, concurrency).await.unwrap();
    Fixture { redis, server, dir }
}

impl Fixture {
    fn relay(&self, concurrency: usize) -> RunningRelay {
        let config = RelayConfig {
            url: self.redis.url(),
            channel: "records".into(),
            pattern: false,
            function: FUNCTION.into(),
            concurrency,
            delivered: None,
            max_batch: 0,
        };
        pushpull_local::relay::start(config, self.server.client()).unwrap()
    }

    async fn publish(&self, messages: &[Vec<u8>]) -> RedisSink {
        let sink = RedisSink::connect(&self.redis.url(), RedisTarget::Channel("records".into())).await.unwrap();
        for chunk in messages.chunks(500) {
            let records: Vec<OutRecord> = chunk.iter().map(|m| OutRecord::keyed("k", m.clone())).collect();
            sink.put_records(&records).await.unwrap();
        }
        sink
    }

    fn log(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.path().join("log.ndjson")).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn events(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.path().join("events.ndjson")).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

/// Stops the relay once it has read `expected` messages and then been idle for a second.
async fn until_idle(relay: RunningRelay, expected: u64) -> RelayCounts {
    let started = std::time::Instant::now();
    while relay.counts().received < expected || !relay.is_idle_for(Duration::from_secs(1)) {
        assert!(started.elapsed() < Duration::from_secs(120), "the relay was idle within 120 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.stop().await
}

fn message(id: &str, extra: Value) -> Vec<u8> {
    let mut v = extra;
    v["id"] = Value::from(id);
    v.to_string().into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_delivered_once_under_normal_load() {
    let f = fixture(4).await;
    let relay = f.relay(4);
    let mut messages: Vec<Vec<u8>> = (0..200).map(|i| message(&format!("m{i}"), json!({}))).collect();
    let binary = vec![0u8, 0xff, b'\r', b'\n', 0x80];
    messages.push(binary.clone());
    let sink = f.publish(&messages).await;
    assert_eq!(sink.unheard(), 0, "the relay was subscribed to every message");
    let counts = until_idle(relay, 201).await;
    assert_eq!((counts.received, counts.delivered, counts.failed), (201, 201, 0), "{counts}");
    assert_eq!((counts.subscriptions, counts.disconnects), (1, 0));
    assert!(counts.in_flight_max <= 4 && counts.in_flight_max >= 1, "{counts}");
    let mut ids: Vec<String> = f
        .log()
        .iter()
        .flat_map(|l| l["ids"].as_array().unwrap().clone())
        .map(|i| i.as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 201, "200 ids and the binary one ('?')");
    let events = f.events();
    let records: usize = events.iter().map(|e| e["Records"].as_array().unwrap().len()).sum();
    assert_eq!(records, 201, "each message in one invocation");
    assert_eq!(counts.invocations, events.len() as u64);
    let r = &events[0]["Records"][0];
    assert_eq!(r["eventSource"], "pushpull:redis-pubsub");
    assert_eq!(r["channel"], "records");
    assert!(r["id"].as_str().unwrap().contains('-') && r["timestamp"].as_u64().unwrap() > 1_700_000_000_000);
    let records: Vec<pushpull::pull::redis::RedisRecord> = events
        .iter()
        .flat_map(|e| e["Records"].as_array().unwrap().clone())
        .map(|r| serde_json::from_value(r).unwrap())
        .collect();
    assert!(records.iter().any(|r| r.data_bytes().unwrap() == binary), "the binary payload intact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_function_backs_up_into_redis_which_cuts_the_subscriber_and_the_loss_shows() {
    let f = fixture(1).await;
    // A small buffer for a slow subscriber, as the overload run sets it: Redis cuts it within
    // seconds.
    f.redis.control(&["set-pubsub-limit", "256kb", "64kb", "1"]);
    let relay = f.relay(1);
    let pad = "x".repeat(1000);
    let messages: Vec<Vec<u8>> =
        (0..5_000).map(|i| message(&format!("s{i}"), json!({"sleep_ms": 20, "pad": pad}))).collect();
    let sink = f.publish(&messages).await;
    // Published: every message sent; some found no subscriber at all (the relay cut off and not
    // yet subscribed again): lost too.
    let published = messages.len() as u64;
    assert!(sink.unheard() > 0 || published > 0);
    let started = std::time::Instant::now();
    while relay.counts().subscriptions < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "Redis cut the slow subscriber within 60 s, and it subscribed again: {}",
            relay.counts()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counts = relay.stop().await;
    assert!(counts.disconnects >= 1, "Redis cut the slow subscriber: {counts}");
    assert!(counts.subscriptions >= 2, "and it subscribed again: {counts}");
    assert_eq!(counts.received, counts.delivered + counts.failed, "nothing read was dropped in the relay: {counts}");
    let lost = published - counts.delivered;
    assert!(lost > published / 2, "most of what was published was lost: published {published}, {counts}");
    assert!(counts.in_flight_max <= 1, "one at a time: {counts}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_run_is_ridden_out() {
    let f = fixture(2).await;
    let relay = f.relay(2);
    let first: Vec<Vec<u8>> = (0..50).map(|i| message(&format!("a{i}"), json!({}))).collect();
    f.publish(&first).await;
    let redis = &f.redis;
    tokio::task::block_in_place(|| redis.control(&["restart"]));
    // Subscribed again (the relay tries every 100 ms): what is published from then on arrives.
    let started = std::time::Instant::now();
    loop {
        let counts = relay.counts();
        if counts.subscriptions >= 2 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "subscribed again within 30 s: {counts}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second: Vec<Vec<u8>> = (0..50).map(|i| message(&format!("b{i}"), json!({}))).collect();
    let sink = f.publish(&second).await;
    assert_eq!(sink.unheard(), 0);
    let ids = || -> Vec<String> {
        f.log()
            .iter()
            .flat_map(|l| l["ids"].as_array().unwrap().clone())
            .map(|i| i.as_str().unwrap().to_owned())
            .collect()
    };
    let started = std::time::Instant::now();
    while (0..50).any(|i| !ids().contains(&format!("b{i}"))) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "every message published after the restart delivered within 30 s: {}",
            relay.counts()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counts = until_idle(relay, 50).await;
    assert!(counts.disconnects >= 1, "{counts}");
    assert_eq!(ids().iter().filter(|i| i.starts_with('b')).count(), 50, "each once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_message_is_retried_then_given_up_and_counted() {
    let f = fixture(1).await;
    let relay = f.relay(1);
    // One at a time (published together, they could share an invocation and its fate).
    let messages =
        [message("flaky", json!({"error": 1})), message("poison", json!({"error": 100})), message("ok", json!({}))];
    for (i, m) in messages.into_iter().enumerate() {
        f.publish(&[m]).await;
        while relay.counts().received <= i as u64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let counts = until_idle(relay, 3).await;
    assert_eq!((counts.received, counts.delivered, counts.failed), (3, 2, 1), "{counts}");
    assert_eq!(counts.function_errors, 1 + 3, "flaky once, poison three times: {counts}");
    let poison = f.log().iter().filter(|l| l["ids"][0] == "poison").count();
    assert_eq!(poison, 3, "an invocation and two retries");
}
