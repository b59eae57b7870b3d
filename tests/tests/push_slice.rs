//! The push function, the real binary over the Runtime API, on genuine S3 notifications that
//! LocalStack delivered to SQS: every good line reaches Kinesis once, in order per key; bad lines
//! are quarantined with their line number and reason.
use std::collections::BTreeMap;
use std::time::Duration;

use pushpull_tests::{function, invoke_ok, local, start, unique};

/// Waits for the S3 notifications on `queue` until one names `key_fragment`; returns all bodies.
async fn notifications(l: &pushpull_local::localstack::Local, queue: &str, want: usize) -> Vec<String> {
    let mut bodies = Vec::new();
    for _ in 0..30 {
        for (receipt, body) in l.receive(queue, Duration::from_secs(1)).await.unwrap() {
            l.delete_message(queue, &receipt).await.unwrap();
            bodies.push(body);
        }
        if bodies.iter().filter(|b| b.contains("ObjectCreated")).count() >= want {
            return bodies;
        }
    }
    panic!("only {} notifications arrived: {bodies:?}", bodies.len());
}

#[tokio::test]
async fn every_line_reaches_kinesis_once_in_order_per_key_and_bad_lines_are_quarantined() {
    let l = local().await;
    let bucket = unique("pp-push");
    let stream = unique("pp-push");
    l.ensure_bucket(&bucket).await.unwrap();
    let queue = l.notify_queue(&bucket, &unique("pp-push"), "input/").await.unwrap();
    l.ensure_stream(&stream, 2).await.unwrap();

    // A key with a space, a '+' and non-ASCII: S3 form-encodes it in the event.
    let key = "input/my data/café + menu.ndjson";
    let mut body = String::new();
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 0..40 {
        let user = format!("u{}", i % 3);
        let line = format!(r#"{{"id":{i},"user":"{user}","amount":{}}}"#, i * 2);
        expected.entry(user).or_default().push(line.clone());
        body.push_str(&line);
        body.push('\n');
        if i == 7 {
            body.push_str("{\"id\": broken\n");
        }
        if i == 20 {
            body.push('\n'); // blank: skipped, not a record, not quarantined
        }
    }
    l.s3.put_object().bucket(&bucket).key(key).body(body.into_bytes().into()).send().await.unwrap();
    l.s3.put_object().bucket(&bucket).key("elsewhere/ignored.ndjson").body(b"{}".to_vec().into()).send().await.unwrap();
    let events = notifications(&l, &queue, 1).await;

    let quarantine = format!("s3://{bucket}/quarantine");
    let mut host = start(function(
        "s3-to-kinesis",
        &[
            ("STREAM_NAME", &stream),
            ("PARTITION_KEY_FIELD", "user"),
            ("QUARANTINE_URI", &quarantine),
            ("PUT_MAX_RECORDS", "7"),
        ],
    ))
    .await;
    let mut summaries = Vec::new();
    for event in &events {
        summaries.push(invoke_ok(&mut host, event.as_str()).await);
    }
    // LocalStack sends the s3:TestEvent first when notifications are configured: acknowledged.
    assert!(summaries.iter().any(|s| s["test_event"] == true), "{summaries:?}");
    let object =
        summaries.iter().flat_map(|s| s["objects"].as_array().cloned().unwrap_or_default()).next().expect("one object");
    assert_eq!(object["key"], key, "the key must arrive URL-decoded");
    assert_eq!(object["outcome"], "processed");
    assert_eq!(
        (object["lines"].as_u64(), object["records"].as_u64(), object["quarantined"].as_u64()),
        (Some(42), Some(40), Some(1))
    );
    assert_eq!(object["blank_lines"], 1);
    assert!(object["put_calls"].as_u64().unwrap() >= 6, "40 records at 7 a call: {object}");

    // Exactly the good lines are in the stream, each once, and in input order within each key.
    let records = l.read_stream(&stream).await.unwrap();
    let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut by_shard = records.clone();
    by_shard.sort_by(|a, b| {
        (a.shard_id.as_str(), a.sequence_number.len(), a.sequence_number.as_str()).cmp(&(
            b.shard_id.as_str(),
            b.sequence_number.len(),
            b.sequence_number.as_str(),
        ))
    });
    for r in by_shard {
        got.entry(r.partition_key.clone()).or_default().push(String::from_utf8(r.data).unwrap());
    }
    assert_eq!(got, expected);

    // The bad line is in quarantine, named by bucket, key, line and offset, with its reason.
    let etag =
        l.s3.head_object().bucket(&bucket).key(key).send().await.unwrap().e_tag().unwrap().trim_matches('"').to_owned();
    let part = format!("quarantine/{bucket}/{key}/{etag}/part-000000000001.ndjson");
    let entries = pushpull_tests::object_json_lines(&l, &bucket, &part).await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["bucket"], bucket.as_str());
    assert_eq!(entries[0]["key"], key);
    assert_eq!(entries[0]["line"], 9);
    assert!(entries[0]["reason"].as_str().unwrap().starts_with("invalid JSON"), "{}", entries[0]);
    assert_eq!(entries[0]["excerpt"], "{\"id\": broken");
}

#[tokio::test]
async fn test_events_removals_and_the_loop_guard_are_acknowledged_without_work() {
    let l = local().await;
    let bucket = unique("pp-skip");
    let stream = unique("pp-skip");
    l.ensure_bucket(&bucket).await.unwrap();
    l.ensure_stream(&stream, 1).await.unwrap();
    let output = format!("s3://{bucket}/output");
    let mut host = start(function("s3-to-kinesis", &[("STREAM_NAME", &stream), ("OUTPUT_URI", &output)])).await;

    let test_event =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../events/s3-test-event.json")).unwrap();
    assert_eq!(invoke_ok(&mut host, test_event.as_str()).await["test_event"], true);

    let removed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../events/s3-object-removed.json")).unwrap();
    let s = invoke_ok(&mut host, removed.as_str()).await;
    assert_eq!(s["objects"][0]["outcome"]["skipped"]["reason"], "event ObjectRemoved:Delete");

    // An object under the function's own output prefix is refused (it would loop).
    let looped = removed
        .replace("ObjectRemoved:Delete", "ObjectCreated:Put")
        .replace("pushpull-local-data", &bucket)
        .replace("input/sample.ndjson", "output/x.ndjson");
    let s = invoke_ok(&mut host, looped.as_str()).await;
    assert_eq!(s["objects"][0]["outcome"]["skipped"]["reason"], "under own output or quarantine location");

    // An object deleted before the event is handled: a success, not an endless retry.
    let gone = looped.replace("output/x.ndjson", "input/never-existed.ndjson");
    let s = invoke_ok(&mut host, gone.as_str()).await;
    assert_eq!(s["objects"][0]["outcome"]["gone"]["reason"], "NoSuchKey");
    assert!(l.read_stream(&stream).await.unwrap().is_empty());
}
