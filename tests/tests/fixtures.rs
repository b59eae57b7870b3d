//! Every sample event in `events/` parses as what it claims to be: with this project's types, and
//! (S3, Kinesis) with aws_lambda_events too, surviving a round trip through it.
use std::path::PathBuf;

use aws_lambda_events::event::kinesis::KinesisEvent as AwsKinesisEvent;
use aws_lambda_events::event::s3::S3Event;
use pushpull::kinesis_event::KinesisEvent;
use pushpull::s3_notification::{EventKind, S3Notification};

fn read(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../events").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug>(text: &str) {
    let parsed: T = serde_json::from_str(text).unwrap();
    let again: T = serde_json::from_str(&serde_json::to_string(&parsed).unwrap()).unwrap();
    assert_eq!(parsed, again);
}

#[test]
fn s3_fixtures() {
    for name in ["s3-put.json", "s3-put-encoded-key.json", "s3-put-multi.json", "s3-object-removed.json"] {
        let text = read(name);
        round_trip::<S3Event>(&text);
        let S3Notification::Records(events) = S3Notification::from_slice(text.as_bytes()).unwrap() else {
            panic!("{name}")
        };
        assert!(!events.is_empty(), "{name}");
    }
    let S3Notification::Records(ev) = S3Notification::from_slice(read("s3-put-encoded-key.json").as_bytes()).unwrap()
    else {
        panic!()
    };
    assert_eq!(ev[0].key, "input/café menu/résumé 2026 + extra.ndjson");
    let S3Notification::Records(ev) = S3Notification::from_slice(read("s3-put-multi.json").as_bytes()).unwrap() else {
        panic!()
    };
    assert_eq!(ev.len(), 3);
    let S3Notification::Records(ev) = S3Notification::from_slice(read("s3-object-removed.json").as_bytes()).unwrap()
    else {
        panic!()
    };
    assert_eq!((ev[0].kind, ev[0].size), (EventKind::ObjectRemoved, None));
    assert!(matches!(
        S3Notification::from_slice(read("s3-test-event.json").as_bytes()).unwrap(),
        S3Notification::TestEvent { .. }
    ));
}

#[test]
fn kafka_fixtures() {
    for name in ["kafka-msk.json", "kafka-self-managed.json"] {
        let text = read(name);
        let event = pushpull::pull::kafka::KafkaEvent::from_slice(text.as_bytes()).unwrap();
        assert_eq!(event.len(), 1, "{name}");
        let msk = name.contains("msk");
        assert_eq!(event.event_source, if msk { "aws:kafka" } else { "SelfManagedKafka" }, "{name}");
        assert_eq!(event.event_source_arn.is_some(), msk, "{name}: only MSK names a cluster ARN");
        let r = event.all_records().next().unwrap();
        assert_eq!((r.topic.as_ref(), r.partition, r.offset), ("mytopic", 0, 15), "{name}");
        assert_eq!(r.value_bytes().unwrap().unwrap(), b"Hello, this is a test.", "{name}");
        assert_eq!(r.key_bytes().unwrap().map(|k| k.len()), Some(22), "{name}: AWS's sample key");
        assert_eq!(r.headers().unwrap(), [("headerKey", Some(b"headerValue".to_vec()))], "{name}");
    }
}

/// AWS's example Amazon MQ for RabbitMQ event (with-mq.html), as AWS writes it.
#[test]
fn rabbitmq_fixture() {
    let text = read("rabbitmq.json");
    let event = pushpull::pull::rabbitmq::RabbitMqEvent::from_slice(text.as_bytes()).unwrap();
    assert_eq!((event.event_source.as_ref(), event.len()), ("aws:rmq", 1));
    let (key, m) = event.messages().next().unwrap();
    assert_eq!(pushpull::pull::rabbitmq::queue_and_vhost(key), ("pizzaQueue", "/"));
    assert_eq!(m.header_text("header2").as_deref(), Some("value2"));
    let body: serde_json::Value = m.json().unwrap();
    assert_eq!(body["timeout"], 0);
}

#[test]
fn kinesis_fixtures() {
    for name in ["kinesis-batch.json", "kinesis-batch-shard1.json"] {
        let text = read(name);
        round_trip::<AwsKinesisEvent>(&text);
        let ev: KinesisEvent<'_> = serde_json::from_str(&text).unwrap();
        let seqs: Vec<_> = ev.records.iter().map(|r| r.sequence_number().unwrap()).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{name}: a batch is in sequence order");
        assert!(
            ev.records.iter().all(|r| r.shard_id() == ev.records[0].shard_id()),
            "{name}: a batch comes from one shard"
        );
        // The one-pass reader and serde read it alike, borrowing the data.
        let one_pass = KinesisEvent::from_slice(text.as_bytes()).unwrap();
        assert_eq!(format!("{one_pass:?}"), format!("{ev:?}"), "{name}");
        assert!(one_pass.records.iter().all(|r| matches!(r.kinesis.data, std::borrow::Cow::Borrowed(_))), "{name}");
    }
}

#[test]
fn dynamodb_fixture() {
    use pushpull::pull::Options;
    use pushpull::pull::dynamodb::{DynamoDbEvent, process};
    let event = DynamoDbEvent::from_slice(read("dynamodb-batch.json").as_bytes()).unwrap();
    assert_eq!(event.records.len(), 3);
    assert_eq!(event.records[0].dynamodb.sequence_number, "111");
    let r = process(&event, Options::default(), |r| if r.event_name == "MODIFY" { Err("no") } else { Ok(()) }).unwrap();
    assert_eq!(r.item_failures()[0].item_identifier, "222");
}
