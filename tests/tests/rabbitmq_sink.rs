//! The RabbitMQ sink (`pushpull::sink::rabbitmq`) on a real broker: what it promises the push
//! function.
//!
//! | promise | test |
//! |---|---|
//! | persistent, confirmed messages named by object and line, the partition key in a header, in the call's order | `messages_are_persistent_named_by_object_and_line_and_in_order` |
//! | a queue that does not exist is refused at connect; one deleted later fails the call (returned, 312 NO_ROUTE), not retryable, never counted written | `a_missing_or_deleted_queue_is_an_error_never_a_silent_drop` |
//! | a connection the broker closed (or a broker restart) fails the call's unconfirmed entries, retryable; the next call connects again | `after_the_broker_closes_its_connection_the_next_call_connects_again` |
use std::sync::Arc;

use bytes::Bytes;
use lapin::options::{BasicGetOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use pushpull::sink::rabbitmq::{PARTITION_KEY_HEADER, RabbitMqSink, message_id};
use pushpull::sink::{OutRecord, RecordSink};
use pushpull_tests::rabbitmq::{OwnBroker, confirming, connect, queue, url};

fn records(origin: &str, lines: std::ops::RangeInclusive<u64>) -> Vec<OutRecord> {
    let origin: Arc<str> = origin.into();
    lines
        .map(|l| {
            let mut r = OutRecord::new(format!("user-{}", l % 3), Bytes::from(format!("{{\"n\":{l}}}")), l);
            r.origin = Some(origin.clone());
            r
        })
        .collect()
}

#[tokio::test]
async fn messages_are_persistent_named_by_object_and_line_and_in_order() {
    let connection = connect().await;
    let channel = confirming(&connection).await;
    let q = queue(&channel, "rsink", FieldTable::default()).await;
    let sink = RabbitMqSink::connect(&url(), &q).await.unwrap();
    assert!(sink.names_records() && !sink.can_read_back());
    let outcome = sink.put_records(&records("b/in.ndjson@e1", 1..=50)).await.unwrap();
    assert!(outcome.failed.is_empty(), "{outcome:?}");
    for line in 1..=50u64 {
        let m =
            channel.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap().expect("a message");
        let p = &m.delivery.properties;
        assert_eq!(m.delivery.data, format!("{{\"n\":{line}}}").into_bytes(), "in the call's order");
        assert_eq!(p.delivery_mode(), &Some(2), "persistent");
        assert_eq!(p.message_id().as_ref().map(|s| s.as_str().to_owned()), Some(message_id("b/in.ndjson@e1", line)));
        let key = p.headers().as_ref().and_then(|h| h.inner().get(PARTITION_KEY_HEADER).cloned());
        let Some(AMQPValue::LongString(key)) = key else { panic!("partition key header: {p:?}") };
        assert_eq!(key.as_bytes(), format!("user-{}", line % 3).as_bytes());
    }
}

#[tokio::test]
async fn a_missing_or_deleted_queue_is_an_error_never_a_silent_drop() {
    let missing = pushpull_tests::unique("rsink-missing");
    let e = RabbitMqSink::connect(&url(), &missing).await.unwrap_err();
    assert!(!e.retryable && e.message.contains(&missing) && !e.message.contains("pushpull:pushpull@"), "{e}");
    let connection = connect().await;
    let channel = confirming(&connection).await;
    let q = queue(&channel, "rsink-deleted", FieldTable::default()).await;
    let sink = RabbitMqSink::connect(&url(), &q).await.unwrap();
    channel.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    let e = sink.put_records(&records("b/k@e", 1..=3)).await.unwrap_err();
    assert!(!e.retryable, "resending cannot help: {e}");
    assert!(e.message.contains("312") && e.message.contains(&q), "{e}");
}

/// On a node of the test's own: closing every connection disturbs no other test.
#[tokio::test]
async fn after_the_broker_closes_its_connection_the_next_call_connects_again() {
    let broker = OwnBroker::start(5690);
    let connection = lapin::Connection::connect(&broker.url(), lapin::ConnectionProperties::default()).await.unwrap();
    let channel = confirming(&connection).await;
    let q = queue(&channel, "rsink-cut", FieldTable::default()).await;
    let sink = RabbitMqSink::connect(&broker.url(), &q).await.unwrap();
    assert!(sink.put_records(&records("b/k@e", 1..=10)).await.unwrap().failed.is_empty());
    broker.control("close-connections");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // The call on the closed connection fails its entries, retryable (the Producer resends them);
    // or, if the sink saw the close first, it opens a new connection and writes them.
    let outcome = sink.put_records(&records("b/k@e", 11..=20)).await.unwrap();
    let again =
        if outcome.failed.is_empty() { outcome } else { sink.put_records(&records("b/k@e", 11..=20)).await.unwrap() };
    assert!(again.failed.is_empty(), "written on a new connection: {again:?}");
    let reader = lapin::Connection::connect(&broker.url(), lapin::ConnectionProperties::default()).await.unwrap();
    let ch = reader.create_channel().await.unwrap();
    let declared = ch
        .queue_declare(
            q.as_str().into(),
            lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert!(declared.message_count() >= 20, "every line in the queue (a resent one may be there twice, under its id)");
}
