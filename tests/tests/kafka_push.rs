//! The push function (`s3-to-kinesis`, the real binary over the Runtime API) writing to a Kafka
//! topic on the broker `make test` starts: `KAFKA_TOPIC` and `KAFKA_BOOTSTRAP_SERVERS` instead of
//! `STREAM_NAME`.
//!
//! | behaviour | test |
//! |---|---|
//! | every line in the topic once; a key's lines in one partition, in line order | `lines_reach_the_topic_once_each_and_a_key_s_lines_keep_their_order` |
//! | a crash mid-object, then the same S3 event again (a retry, a duplicate): each line once (read-back) | `a_crash_mid_object_and_a_duplicate_event_leave_each_line_in_the_topic_once` |
//! | a topic that does not exist: the function refuses to start, naming it | `a_topic_that_does_not_exist_is_named_when_the_function_starts` |
use std::collections::BTreeMap;
use std::time::Duration;

use pushpull_local::runtime_api::{FunctionHost, FunctionSpec};
use pushpull_tests::kafka::{bootstrap, config, topic, watermarks};
use pushpull_tests::{function, invoke_ok, local, object_created_event, start, unique};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};

const PARTITIONS: i32 = 4;

struct Fixture {
    l: pushpull_local::localstack::Local,
    bucket: String,
    topic: String,
}

async fn fixture() -> Fixture {
    let l = local().await;
    let bucket = unique("kpush");
    l.ensure_bucket(&bucket).await.unwrap();
    Fixture { l, bucket, topic: topic("kpush", PARTITIONS).await }
}

impl Fixture {
    fn spec(&self, extra: &[(&str, String)]) -> FunctionSpec {
        let mut env = vec![
            ("KAFKA_TOPIC", self.topic.clone()),
            ("KAFKA_BOOTSTRAP_SERVERS", bootstrap()),
            ("CHECKPOINT_URI", format!("s3://{}/checkpoints", self.bucket)),
            ("QUARANTINE_URI", format!("s3://{}/quarantine", self.bucket)),
            ("OUTPUT_URI", format!("s3://{}/output", self.bucket)),
            ("PARTITION_KEY_FIELD", "user".to_owned()),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        function("s3-to-kinesis", &pairs)
    }

    async fn host(&self, extra: &[(&str, String)]) -> FunctionHost {
        start(self.spec(extra)).await
    }

    /// An object of `n` lines, 10 users; returns the S3 event for it.
    async fn object(&self, key: &str, n: usize) -> String {
        let body: String =
            (0..n).map(|i| format!("{}\n", json!({"user": format!("u{}", i % 10), "n": i, "amount": "1.5"}))).collect();
        self.l.s3.put_object().bucket(&self.bucket).key(key).body(body.into_bytes().into()).send().await.unwrap();
        object_created_event(&self.l, &self.bucket, key, "0055AED6DCD90281E5").await
    }

    /// Every record of the topic, per partition in offset order: (key, value as JSON).
    fn read(&self) -> BTreeMap<i32, Vec<(String, Value)>> {
        let c: BaseConsumer = config().set("group.id", unique("kpush-read")).create().unwrap();
        let mut tpl = TopicPartitionList::new();
        let mut ends = BTreeMap::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(&self.topic, p, Offset::Beginning).unwrap();
            ends.insert(p, watermarks(&self.topic, p).1);
        }
        c.assign(&tpl).unwrap();
        let total: i64 = ends.values().sum();
        let mut out: BTreeMap<i32, Vec<(String, Value)>> = BTreeMap::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while out.values().map(|v| v.len() as i64).sum::<i64>() < total {
            assert!(std::time::Instant::now() < deadline, "the topic's {total} records were not all read");
            if let Some(m) = c.poll(Duration::from_millis(200)) {
                let m = m.unwrap();
                let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
                let value: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
                out.entry(m.partition()).or_default().push((key, value));
            }
        }
        out
    }
}

/// Lines as the topic holds them: each line's `n`, counted.
fn counts(read: &BTreeMap<i32, Vec<(String, Value)>>) -> BTreeMap<u64, usize> {
    let mut out = BTreeMap::new();
    for (_, v) in read.values().flatten() {
        *out.entry(v["n"].as_u64().unwrap()).or_default() += 1;
    }
    out
}

#[tokio::test]
async fn lines_reach_the_topic_once_each_and_a_key_s_lines_keep_their_order() {
    let f = fixture().await;
    let event = f.object("in/a.ndjson", 500).await;
    let mut host = f.host(&[]).await;
    let answer = invoke_ok(&mut host, event).await;
    assert_eq!(answer["objects"][0]["records"], 500, "{answer}");
    let read = f.read();
    let seen = counts(&read);
    assert_eq!(seen.len(), 500);
    assert!(seen.values().all(|n| *n == 1), "every line once");
    // A key's lines are in one partition, in line order.
    let mut partition_of: BTreeMap<String, i32> = BTreeMap::new();
    for (p, records) in &read {
        let mut last: BTreeMap<&str, u64> = BTreeMap::new();
        for (key, v) in records {
            assert_eq!(*partition_of.entry(key.clone()).or_insert(*p), *p, "{key} in two partitions");
            let n = v["n"].as_u64().unwrap();
            if let Some(prev) = last.insert(key.as_str(), n) {
                assert!(prev < n, "{key}: line {n} after line {prev}");
            }
        }
    }
    assert!(read.len() > 1, "10 keys over 4 partitions use more than one: {:?}", read.keys());
}

/// The push side's exactly-once on Kafka: a crash after 200 lines (the process aborts mid-object,
/// as a Lambda timeout or OOM would end it), then the same S3 event again, then once more (S3
/// delivers at least once): the interrupted object resumes after what it finds already in the
/// topic (read back from the checkpointed offsets), and a finished one is not sent again.
#[tokio::test]
async fn a_crash_mid_object_and_a_duplicate_event_leave_each_line_in_the_topic_once() {
    let f = fixture().await;
    let event = f.object("in/crash.ndjson", 1000).await;
    let marker = std::env::temp_dir().join(unique("kpush-crash"));
    let mut host = f
        .host(&[
            ("PUSHPULL_INJECT_CRASH_ONCE", format!("{}:200", marker.display())),
            ("PUT_MAX_RECORDS", "50".to_owned()),
            // The crashed invocation's object lease expires soon: the retry takes the object over.
            ("CHECKPOINT_LEASE_MS", "3000".to_owned()),
        ])
        .await;
    let first = host.invoke(event.clone().into_bytes()).await.unwrap();
    assert!(marker.exists(), "the crash was injected: {:?}", first.outcome);
    let second = invoke_ok(&mut host, event.clone()).await;
    assert!(
        second["objects"][0]["found_written"].as_u64().unwrap() > 0,
        "the retry read back what was written: {second}"
    );
    let third = invoke_ok(&mut host, event).await;
    let seen = counts(&f.read());
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).map(|(k, _)| *k).collect();
    assert!(twice.is_empty(), "lines in the topic twice: {twice:?}\nsecond: {second}\nthird: {third}");
    assert_eq!(seen.len(), 1000, "every line");
    let _ = std::fs::remove_file(marker);
}

#[tokio::test]
async fn a_topic_that_does_not_exist_is_named_when_the_function_starts() {
    let f = fixture().await;
    let missing = unique("kpush-missing");
    let spec = {
        let mut s = f.spec(&[]);
        for (k, v) in &mut s.env {
            if k == "KAFKA_TOPIC" {
                *v = missing.clone();
            }
        }
        s
    };
    let err = FunctionHost::start(spec).await.err().expect("the function must not start");
    assert!(err.to_string().contains(&missing), "{err}");
}
