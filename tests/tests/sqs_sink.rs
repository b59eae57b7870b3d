//! The SQS sink (`pushpull::sink::sqs`) on LocalStack's SQS: what it sends, in which order, and
//! what it refuses, naming the line.
use std::sync::Arc;

use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use bytes::Bytes;
use pushpull::sink::sqs::{ORIGIN_ATTRIBUTE, PARTITION_KEY_ATTRIBUTE, SqsSink};
use pushpull::sink::{OutRecord, RecordSink};
use pushpull_tests::{local, unique};

fn record(key: &str, line: u64, body: &str) -> OutRecord {
    let mut r = OutRecord::new(key, Bytes::from(body.to_owned()), line);
    r.origin = Some(Arc::from("bucket/in.ndjson@v1"));
    r
}

/// A FIFO queue: 35 records over three keys in four calls' worth; each key's records come back
/// in order, in its own message group, named by object and line; the same call again is
/// deduplicated by SQS (its deduplication ids are the lines').
#[tokio::test]
async fn fifo_keeps_each_keys_order_names_each_line_and_a_resend_is_deduplicated() {
    let l = local().await;
    let name = unique("ssink") + ".fifo";
    let url = l
        .sqs
        .create_queue()
        .queue_name(&name)
        .attributes(QueueAttributeName::FifoQueue, "true")
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_owned();
    let sink = SqsSink::connect(l.sqs.clone(), &name).await.unwrap();
    let keys = ["ann", "bob", "cy"];
    let records: Vec<OutRecord> =
        (1..=35).map(|i| record(keys[i as usize % 3], i, &format!("{{\"n\":{i}}}"))).collect();
    assert!(sink.put_records(&records).await.unwrap().failed.is_empty());
    assert!(sink.put_records(&records).await.unwrap().failed.is_empty(), "a resend is accepted");
    let mut got: Vec<(String, String, String)> = Vec::new();
    for _ in 0..20 {
        let out = l
            .sqs
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        if out.messages().is_empty() {
            break;
        }
        for m in out.messages() {
            let attr = |k: &str| m.message_attributes().unwrap()[k].string_value().unwrap().to_owned();
            let group = m.attributes().unwrap()[&MessageSystemAttributeName::MessageGroupId].clone();
            assert_eq!(group, attr(PARTITION_KEY_ATTRIBUTE), "the partition key is the group");
            got.push((group, attr(ORIGIN_ATTRIBUTE), m.body().unwrap().to_owned()));
            l.sqs.delete_message().queue_url(&url).receipt_handle(m.receipt_handle().unwrap()).send().await.unwrap();
        }
    }
    assert_eq!(got.len(), 35, "every line once: the resend was deduplicated");
    for key in keys {
        let lines: Vec<u64> = got
            .iter()
            .filter(|(g, _, _)| g == key)
            .map(|(_, origin, _)| pushpull::sink::sqs::parse_message_id(origin).unwrap().1)
            .collect();
        let mut sorted = lines.clone();
        sorted.sort_unstable();
        assert_eq!(lines, sorted, "group {key} in order");
    }
    assert!(got.iter().all(|(_, origin, _)| origin.starts_with("bucket/in.ndjson@v1#")));
}

/// A queue that does not exist is refused when the sink is made; a body over the queue's maximum
/// and a character SQS does not take fail the call, not retryable, naming the line.
#[tokio::test]
async fn what_sqs_cannot_take_is_refused_naming_the_queue_or_the_line() {
    let l = local().await;
    let missing = unique("ssink-none");
    let e = SqsSink::connect(l.sqs.clone(), &missing).await.unwrap_err();
    assert!(!e.retryable && e.message.contains(&missing), "{e}");
    let name = unique("ssink-small");
    l.sqs
        .create_queue()
        .queue_name(&name)
        .attributes(QueueAttributeName::MaximumMessageSize, "1024")
        .send()
        .await
        .unwrap();
    let sink = SqsSink::connect(l.sqs.clone(), &name).await.unwrap();
    let big = record("k", 7, &"x".repeat(2000));
    let e = sink.put_records(&[record("k", 6, "{}"), big]).await.unwrap_err();
    assert!(!e.retryable && e.message.contains("line 7"), "{e}");
    let e = sink.put_records(&[record("k", 9, "{\"s\":\"\u{ffff}\"}")]).await.unwrap_err();
    assert!(!e.retryable && e.message.contains("line 9"), "{e}");
}
