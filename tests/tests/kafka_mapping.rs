//! Fidelity of the local Kafka event source mapping (`pushpull_local::mapping`, its Kafka source):
//! the broker `make test` starts (nisshi), a real function binary (`scripted`, whose answers the
//! records script) behind the Invoke API, and assertions on the batches the function received,
//! the offsets the consumer group committed and what reached the failure destination. AWS's
//! words for each rule, with their pages, are in `docs/kafka-aws-rules.md`.
//!
//! | behaviour | test |
//! |---|---|
//! | order per partition, BatchSize, every record once, offsets committed after each batch | `batches_keep_partition_order_and_the_group_commits_every_offset` |
//! | partial batch response (`{"partition": "topic-N", "offset": N}`): retry from the lowest offset named | `a_partial_batch_response_retries_from_the_offset_it_names` |
//! | an itemIdentifier not in the batch: the whole batch fails | `an_item_identifier_of_another_partition_fails_the_whole_batch` |
//! | MaximumRetryAttempts, then the SQS failure record with `KafkaBatchInfo`, and the group moves on | `a_failing_batch_goes_to_the_sqs_destination_and_its_offsets_are_committed` |
//! | a `kafka://` destination: one message per failed record, keyed as it, with its one-record event; not the source topic | `a_failing_batch_goes_to_a_kafka_topic_one_message_per_record` |
//! | a group with committed offsets: StartingPosition ignored, resumes after them | `a_group_with_committed_offsets_resumes_after_them_whatever_the_starting_position` |
//! | LATEST: only what arrives after the group joins | `latest_reads_only_what_arrives_after_the_group_joins` |
//! | AT_TIMESTAMP: from the first record at or after the time | `at_timestamp_starts_at_the_first_record_at_or_after_the_time` |
//! | FilterCriteria on `value` (JSON or plain string); filtered records committed past | `filter_criteria_match_the_value_and_the_rest_is_committed_past` |
//! | tombstones, null keys, binary values, headers that are not UTF-8 | `tombstones_null_keys_binary_values_and_raw_headers_reach_the_function` |
//! | a record over the 6 MB payload: never invoked, `MaximumPayloadSizeExceeded` to the destination, committed past | `a_record_over_6_mb_goes_to_the_destination_uninvoked_and_is_committed_past` |
//! | settings AWS refuses for Kafka; the 500 ms default window; infinite retries with a destination become 10 | `kafka_settings_aws_refuses_are_refused` |
//! | realism: through a proxy that slows fetches, cuts connections mid-fetch and restarts the broker, the clients stay on the proxy and every record is invoked and committed; the events name the bootstrap servers | `through_fetches_cut_and_slowed_and_a_broker_restart_every_record_is_invoked_and_committed` |
//! | hostile: the topic deleted mid-run; a broker that accepts connections and never answers; a topic the cluster lacks (each an error naming it, never a silent wait) | `a_topic_deleted_mid_run_stops_the_mapping_with_an_error_naming_it`, `a_broker_that_never_answers_stops_the_mapping_with_an_error_naming_it` |
use std::time::Duration;

use pushpull::store::Store;
use pushpull_local::invoke::InvokeServer;
use pushpull_local::localstack::{ACCOUNT, REGION};
use pushpull_local::mapping::{Clients, KafkaSource, RawSettings, Runner, RunnerOptions, Summary};
use pushpull_local::runtime_api::FunctionSpec;
use pushpull_tests::kafka::{bootstrap, committed, send};
use pushpull_tests::{function, local, unique};
use serde_json::{Value, json};

const FUNCTION: &str = "scripted";

struct Fixture {
    topic: String,
    partitions: i32,
    group: String,
    server: InvokeServer,
    dir: tempfile::TempDir,
}

async fn fixture(partitions: i32) -> Fixture {
    fixture_with(partitions, &[]).await
}

async fn fixture_with(partitions: i32, configs: &[(&str, &str)]) -> Fixture {
    let topic = pushpull_tests::kafka::topic_with("kmap", partitions, configs).await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec: FunctionSpec = function(FUNCTION, &[("SCRIPT_DIR", dir.path().to_str().unwrap())]);
    spec.timeout = Duration::from_secs(5);
    let server = InvokeServer::start(vec![spec], 0, 10).await.unwrap();
    Fixture { topic, partitions, group: unique("kmap-group"), server, dir }
}

fn none() -> Value {
    json!({})
}

impl Fixture {
    fn source(&self) -> KafkaSource {
        KafkaSource {
            bootstrap_servers: vec![bootstrap()],
            topic: self.topic.clone(),
            consumer_group_id: Some(self.group.clone()),
            cluster_arn: None,
        }
    }

    fn settings(&self) -> RawSettings {
        RawSettings {
            function: Some(FUNCTION.into()),
            starting_position: Some("TRIM_HORIZON".into()),
            batching_window: Some("1".into()),
            ..Default::default()
        }
    }

    /// Sends records `(partition, id, directives)`: the value is `{"id": .., ..directives}`.
    async fn send_ids(&self, records: &[(i32, &str, Value)]) -> Vec<i64> {
        let values: Vec<(i32, Vec<u8>)> = records
            .iter()
            .map(|(p, id, d)| {
                let mut v = d.clone();
                v["id"] = Value::from(*id);
                (*p, v.to_string().into_bytes())
            })
            .collect();
        let list: Vec<pushpull_tests::kafka::Outgoing<'_>> =
            values.iter().map(|(p, v)| (*p, Some(&b"k"[..]), Some(v.as_slice()))).collect();
        send(&self.topic, &list).await
    }

    /// Runs the mapping until it is idle for 2 s.
    async fn run(&self, raw: RawSettings) -> Summary {
        self.run_source(raw, self.source()).await
    }

    async fn run_source(&self, raw: RawSettings, source: KafkaSource) -> Summary {
        let settings = raw.validate_kafka(&source).unwrap();
        let mut options = RunnerOptions::new(&settings, Store::file(self.dir.path().join("unused")));
        options.stop_when_idle = Some(Duration::from_secs(2));
        options.failover = Duration::from_secs(6);
        let clients = Clients::from(&local().await);
        let (_stop, rx) = tokio::sync::watch::channel(false);
        let run = Runner::run_kafka(settings, source, options, clients, self.server.client(), rx);
        tokio::time::timeout(Duration::from_secs(120), run).await.expect("the mapping ran 120 s").unwrap()
    }

    fn log(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.path().join("log.ndjson")).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// Per invocation: the partition and the ids, in order.
    fn batches(&self) -> Vec<(String, Vec<String>)> {
        self.log()
            .iter()
            .map(|l| {
                let ids = l["ids"].as_array().unwrap().iter().map(|i| i.as_str().unwrap().to_owned()).collect();
                (l["shard"].as_str().unwrap().to_owned(), ids)
            })
            .collect()
    }

    fn partition(&self, n: i32) -> String {
        format!("{}-{n}", self.topic)
    }

    fn committed(&self) -> Vec<Option<i64>> {
        committed(&self.group, &self.topic, self.partitions)
    }
}

fn b(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

/// AWS (with-msk-configure.html): "Lambda reads messages sequentially for each Kafka topic
/// partition." (with-kafka-configure.html): "After Lambda processes each batch, it commits the
/// offsets of the messages in that batch." BatchSize caps an invocation (API
/// CreateEventSourceMapping: "The maximum number of records in each batch that Lambda pulls from
/// your stream or queue and sends to your function.").
#[tokio::test]
async fn batches_keep_partition_order_and_the_group_commits_every_offset() {
    let f = fixture(3).await;
    let mut records = Vec::new();
    let ids: Vec<String> = (0..90).map(|i| format!("r{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        records.push(((i % 3) as i32, id.as_str(), none()));
    }
    f.send_ids(&records).await;
    let s = f.run(RawSettings { batch_size: Some("7".into()), ..f.settings() }).await;
    let batches = f.batches();
    for p in 0..3 {
        let seen: Vec<String> =
            batches.iter().filter(|(part, _)| *part == f.partition(p)).flat_map(|(_, ids)| ids.clone()).collect();
        let sent: Vec<String> = ids.iter().skip(p as usize).step_by(3).cloned().collect();
        assert_eq!(seen, sent, "partition {p}: every record once, in offset order");
    }
    assert!(batches.iter().all(|(_, ids)| ids.len() <= 7), "BatchSize 7: {batches:?}");
    assert_eq!(f.committed(), vec![Some(30); 3], "the offset after each partition's last record is committed");
    assert_eq!(s.counts.records_read, 90);
    let group = s.group.expect("the summary names the group");
    assert_eq!(group.group_id, f.group);
    assert_eq!(group.assignments(), 1);
    assert_eq!(group.last_assigned(), &[0, 1, 2]);
}

/// AWS (kafka-retry-configurations.html): the response `{"batchItemFailures":[{"itemIdentifier":
/// {"partition":"topic-partition_number","offset":100}}]}` "returns identifiers only for the failed
/// messages, allowing Lambda to retry just those specific items". Kafka commits one offset per
/// partition, so the retry starts at the lowest failed offset and the records after it come again
/// (our choice where AWS is silent: docs/kafka-aws-rules.md §2, the Kinesis rule).
#[tokio::test]
async fn a_partial_batch_response_retries_from_the_offset_it_names() {
    let f = fixture(1).await;
    f.send_ids(&[(0, "a", none()), (0, "b", none()), (0, "c", json!({"item_fail": 1})), (0, "d", none())]).await;
    let s =
        f.run(RawSettings { function_response_types: Some("ReportBatchItemFailures".into()), ..f.settings() }).await;
    let p = f.partition(0);
    assert_eq!(f.batches(), vec![(p.clone(), b(&["a", "b", "c", "d"])), (p, b(&["c", "d"]))]);
    assert_eq!(f.committed(), vec![Some(4)]);
    assert_eq!(s.counts.partial_failures, 1);
}

/// AWS (same page): "Any invalid topic-partition_number or offset returned that was not present in
/// the invoked event will be treated as failure and entire batch will be retried."
#[tokio::test]
async fn an_item_identifier_of_another_partition_fails_the_whole_batch() {
    let f = fixture(1).await;
    f.send_ids(&[(0, "a", none()), (0, "b", json!({"bad_id": 1}))]).await;
    f.run(RawSettings { function_response_types: Some("ReportBatchItemFailures".into()), ..f.settings() }).await;
    let p = f.partition(0);
    assert_eq!(f.batches(), vec![(p.clone(), b(&["a", "b"])), (p, b(&["a", "b"]))]);
    assert_eq!(f.committed(), vec![Some(2)]);
}

/// AWS (kafka-retry-configurations.html): "Maximum retry attempts – ... This doesn't count the
/// initial invocation attempt." (with-msk-on-failure.html) the SQS record carries
/// `KafkaBatchInfo` with `recordsInfo` per `topic-partition`: first and last offsets as text.
/// The group moves past the batch given up on (its offsets are committed).
#[tokio::test]
async fn a_failing_batch_goes_to_the_sqs_destination_and_its_offsets_are_committed() {
    let f = fixture(1).await;
    let l = local().await;
    let name = unique("kmap-dlq");
    let url = l.sqs.create_queue().queue_name(&name).send().await.unwrap().queue_url().unwrap().to_owned();
    f.send_ids(&[(0, "a", none()), (0, "b", json!({"error": 99})), (0, "c", none())]).await;
    let s = f
        .run(RawSettings {
            batch_size: Some("2".into()),
            maximum_retry_attempts: Some("1".into()),
            on_failure: Some(format!("arn:aws:sqs:{REGION}:{ACCOUNT}:{name}")),
            ..f.settings()
        })
        .await;
    let p = f.partition(0);
    assert_eq!(f.batches(), vec![(p.clone(), b(&["a", "b"])), (p.clone(), b(&["a", "b"])), (p.clone(), b(&["c"]))]);
    let got = l.sqs.receive_message().queue_url(&url).max_number_of_messages(10).send().await.unwrap();
    let records: Vec<Value> = got.messages().iter().map(|m| serde_json::from_str(m.body().unwrap()).unwrap()).collect();
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(r["requestContext"]["condition"], "RetryAttemptsExhausted");
    assert_eq!(r["requestContext"]["approximateInvokeCount"], 2);
    let info = &r["KafkaBatchInfo"];
    assert_eq!(info["batchSize"], 2);
    assert_eq!(info["bootstrapServers"], bootstrap());
    assert_eq!(info["recordsInfo"][&p]["firstRecordOffset"], "0");
    assert_eq!(info["recordsInfo"][&p]["lastRecordOffset"], "1");
    assert!(info["recordsInfo"][&p]["firstRecordTimestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(f.committed(), vec![Some(3)]);
    assert_eq!(s.counts.to_destination, 2);
}

/// AWS (kafka-on-failure-destination.html): "Lambda acts as a Kafka producer and writes failed
/// records to the destination topic"; "Kafka destinations receive the actual failed records along
/// with failure metadata"; its example is one message per record, `"condition":
/// "RetriesExhausted"`, `KafkaBatchInfo` of `batchSize` 1 with `recordInfo`, the one-record event
/// as `payload`; "Lambda uses the same partition key from the original record". And "Lambda
/// prevents infinite loops by blocking configurations where the source and destination topics
/// are the same."
#[tokio::test]
async fn a_failing_batch_goes_to_a_kafka_topic_one_message_per_record() {
    let f = fixture(1).await;
    let dead_letters = pushpull_tests::kafka::topic("kmap-dlt", 1).await;
    f.send_ids(&[(0, "a", none()), (0, "b", json!({"error": 99})), (0, "c", none())]).await;
    let s = f
        .run(RawSettings {
            batch_size: Some("2".into()),
            maximum_retry_attempts: Some("0".into()),
            on_failure: Some(format!("kafka://{dead_letters}")),
            ..f.settings()
        })
        .await;
    let p = f.partition(0);
    assert_eq!(f.batches(), vec![(p.clone(), b(&["a", "b"])), (p.clone(), b(&["c"]))]);
    let got = pushpull_tests::kafka::read_all(&dead_letters, 1);
    assert_eq!(got.len(), 2, "one message per record of the batch given up on");
    for (i, (key, value)) in got.iter().enumerate() {
        assert_eq!(key.as_deref(), Some(&b"k"[..]), "keyed as the original record");
        let v: Value = serde_json::from_slice(value.as_deref().unwrap()).unwrap();
        assert_eq!(v["requestContext"]["condition"], "RetriesExhausted");
        assert_eq!(v["KafkaBatchInfo"]["batchSize"], 1);
        assert_eq!(v["KafkaBatchInfo"]["recordInfo"]["offset"], i.to_string());
        let records = v["payload"]["records"][&p].as_array().unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0]["offset"], i);
    }
    assert_eq!(f.committed(), vec![Some(3)]);
    assert_eq!(s.counts.to_destination, 2);
    // The source topic as its own destination is refused.
    let same = RawSettings { on_failure: Some(format!("kafka://{}", f.topic)), ..f.settings() };
    assert!(same.validate_kafka(&f.source()).unwrap_err().to_string().contains("source and destination topics"));
}

/// AWS (kafka-consumer-group-id.html): "if you specify a consumer group ID, and Kafka finds a valid
/// existing consumer group with the same ID, Lambda ignores the StartingPosition ... Lambda begins
/// processing records according to the committed offset of the consumer group."
#[tokio::test]
async fn a_group_with_committed_offsets_resumes_after_them_whatever_the_starting_position() {
    let f = fixture(1).await;
    f.send_ids(&[(0, "a", none()), (0, "b", none())]).await;
    f.run(f.settings()).await;
    f.send_ids(&[(0, "c", none())]).await;
    // TRIM_HORIZON again, same group: only what came after the committed offset.
    f.run(f.settings()).await;
    let p = f.partition(0);
    assert_eq!(f.batches(), vec![(p.clone(), b(&["a", "b"])), (p, b(&["c"]))]);
    assert_eq!(f.committed(), vec![Some(3)]);
}

/// AWS (kafka-starting-positions.html): "Latest – Lambda starts reading just after the most recent
/// record in the Kafka topic."
#[tokio::test]
async fn latest_reads_only_what_arrives_after_the_group_joins() {
    let f = fixture(1).await;
    f.send_ids(&[(0, "old", none())]).await;
    let settings = RawSettings { starting_position: Some("LATEST".into()), ..f.settings() };
    let source = f.source();
    let validated = settings.validate_kafka(&source).unwrap();
    let mut options = RunnerOptions::new(&validated, Store::file(f.dir.path().join("unused")));
    options.failover = Duration::from_secs(6);
    let clients = Clients::from(&local().await);
    let running = Runner::start_kafka(validated, source, options, clients, f.server.client());
    // Joined and assigned: the group's view says so.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while running.summary().group.is_none_or(|g| g.assignments() == 0) {
        assert!(std::time::Instant::now() < deadline, "never assigned a partition");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    f.send_ids(&[(0, "new", none())]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while f.batches().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the new record was never invoked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await.unwrap();
    assert_eq!(f.batches(), vec![(f.partition(0), b(&["new"]))]);
    assert_eq!(f.committed(), vec![Some(2)]);
}

/// AWS (kafka-starting-positions.html): "At timestamp – ... a position defined by a timestamp, in
/// Unix time seconds." A new group starts each partition at the first record at or after it.
#[tokio::test]
async fn at_timestamp_starts_at_the_first_record_at_or_after_the_time() {
    let f = fixture(2).await;
    f.send_ids(&[(0, "old-0", none()), (1, "old-1", none())]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let t = pushpull_local::mapping::now_unix();
    tokio::time::sleep(Duration::from_millis(100)).await;
    f.send_ids(&[(0, "new-0", none()), (1, "new-1", none())]).await;
    f.run(RawSettings {
        starting_position: Some("AT_TIMESTAMP".into()),
        starting_position_timestamp: Some(format!("{t:.3}")),
        ..f.settings()
    })
    .await;
    let mut ids: Vec<String> = f.batches().into_iter().flat_map(|(_, ids)| ids).collect();
    ids.sort();
    assert_eq!(ids, b(&["new-0", "new-1"]));
    assert_eq!(f.committed(), vec![Some(2), Some(2)]);
}

/// AWS (kafka-filtering.html): "Amazon MSK and self-managed Apache Kafka event source mappings only
/// support filtering on the `value` key", JSON (`{ "value" : { "device_ID" : [ { "prefix": "AB" } ]
/// } }`) or a plain string (`{ "value" : [ { "anything-but": [ "error" ] } ] }`). A record no filter
/// matches is not invoked and its offset is committed past.
#[tokio::test]
async fn filter_criteria_match_the_value_and_the_rest_is_committed_past() {
    let f = fixture(1).await;
    f.send_ids(&[
        (0, "a", json!({"kind": "keep"})),
        (0, "b", json!({"kind": "drop"})),
        (0, "c", json!({"kind": "keep"})),
    ])
    .await;
    send(&f.topic, &[(0, None, Some(b"error")), (0, None, Some(b"fine"))]).await;
    let pattern = json!({"$or": [{"value": {"kind": ["keep"]}}, {"value": [{"prefix": "fi"}]}]}).to_string();
    let s = f
        .run(RawSettings {
            filter_criteria: Some(json!({"Filters": [{"Pattern": pattern}]}).to_string()),
            ..f.settings()
        })
        .await;
    let ids: Vec<String> = f.batches().into_iter().flat_map(|(_, ids)| ids).collect();
    // "fine" is not JSON: the function logs it as "?".
    assert_eq!(ids, b(&["a", "c", "?"]));
    assert_eq!(s.counts.filtered_out, 2);
    assert_eq!(f.committed(), vec![Some(5)]);
}

/// Hostile input the mapping passes on as AWS's would: a tombstone (no value), a record without a
/// key, a value that is not UTF-8, a header that is not UTF-8. The event's fields read back through
/// the library (`pushpull::pull::kafka`).
#[tokio::test]
async fn tombstones_null_keys_binary_values_and_raw_headers_reach_the_function() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let f = fixture(1).await;
    let producer: FutureProducer = pushpull_tests::kafka::config().create().unwrap();
    let headers = OwnedHeaders::new().insert(Header { key: "raw", value: Some(&[0xff, 0x00, 0xc3][..]) });
    for r in [
        FutureRecord::<[u8], [u8]>::to(&f.topic).partition(0).key(b"k1"),
        FutureRecord::to(&f.topic).partition(0).payload(&b"\xff\xfe binary"[..]),
        FutureRecord::to(&f.topic).partition(0).key(&b"k3"[..]).payload(&b"{}"[..]).headers(headers),
    ] {
        producer.send(r, Duration::from_secs(10)).await.unwrap();
    }
    f.run(f.settings()).await;
    let text = std::fs::read_to_string(f.dir.path().join("events.ndjson")).unwrap();
    let mut records = Vec::new();
    for line in text.lines() {
        let event = pushpull::pull::kafka::KafkaEvent::from_slice(line.as_bytes()).unwrap();
        assert_eq!(event.event_source, "SelfManagedKafka");
        records.extend(event.all_records().cloned());
    }
    records.sort_by_key(|r| r.offset);
    assert_eq!(records.len(), 3);
    assert_eq!(records[0].value_bytes().unwrap(), None, "a tombstone has no value");
    assert_eq!(records[0].key_bytes().unwrap().as_deref(), Some(&b"k1"[..]));
    assert_eq!(records[1].key_bytes().unwrap(), None, "no key");
    assert_eq!(records[1].value_bytes().unwrap().as_deref(), Some(&b"\xff\xfe binary"[..]));
    assert_eq!(records[2].headers().unwrap(), vec![("raw", Some(vec![0xff, 0x00, 0xc3]))]);
    assert_eq!(committed(&f.group, &f.topic, 1), vec![Some(3)]);
}

/// AWS (with-msk.html, archived): "If your Lambda event records exceed the allowed size limit of 6
/// MB, they can go unprocessed"; the failure record's `"condition": "MaximumPayloadSizeExceeded"`
/// with `"responseContext": { // null if record is MaximumPayloadSizeExceeded` (with-msk-on-failure
/// .html). A 7 MB record is never invoked: it goes to the destination, the records around it are
/// invoked, and the group commits past it.
#[tokio::test]
async fn a_record_over_6_mb_goes_to_the_destination_uninvoked_and_is_committed_past() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let f = fixture_with(1, &[("max.message.bytes", "10485760")]).await;
    let l = local().await;
    let name = unique("kmap-big");
    let url = l.sqs.create_queue().queue_name(&name).send().await.unwrap().queue_url().unwrap().to_owned();
    f.send_ids(&[(0, "before", none())]).await;
    let big = json!({"id": "big", "pad": "x".repeat(7 * 1024 * 1024)}).to_string();
    let producer: FutureProducer =
        pushpull_tests::kafka::config().set("message.max.bytes", "10000000").create().unwrap();
    producer
        .send(FutureRecord::<str, str>::to(&f.topic).partition(0).payload(&big), Duration::from_secs(30))
        .await
        .unwrap_or_else(|(e, _)| panic!("the broker took no 7 MB record: {e}"));
    f.send_ids(&[(0, "after", none())]).await;
    let s =
        f.run(RawSettings { on_failure: Some(format!("arn:aws:sqs:{REGION}:{ACCOUNT}:{name}")), ..f.settings() }).await;
    let ids: Vec<String> = f.batches().into_iter().flat_map(|(_, ids)| ids).collect();
    assert_eq!(ids, b(&["before", "after"]));
    let got = l.sqs.receive_message().queue_url(&url).max_number_of_messages(10).send().await.unwrap();
    let records: Vec<Value> = got.messages().iter().map(|m| serde_json::from_str(m.body().unwrap()).unwrap()).collect();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["requestContext"]["condition"], "MaximumPayloadSizeExceeded");
    assert_eq!(records[0]["requestContext"]["approximateInvokeCount"], 0);
    assert!(records[0]["responseContext"].is_null());
    assert_eq!(records[0]["KafkaBatchInfo"]["recordsInfo"][f.partition(0)]["firstRecordOffset"], "1");
    assert_eq!(f.committed(), vec![Some(3)]);
    assert_eq!(s.counts.to_destination, 1);
}

/// AWS refuses these on CreateEventSourceMapping for a Kafka source.
#[tokio::test]
async fn kafka_settings_aws_refuses_are_refused() {
    let source = KafkaSource {
        bootstrap_servers: vec!["127.0.0.1:9092".into()],
        topic: "orders".into(),
        consumer_group_id: None,
        cluster_arn: None,
    };
    let base = || RawSettings {
        function: Some("f".into()),
        starting_position: Some("TRIM_HORIZON".into()),
        ..Default::default()
    };
    let ok = base().validate_kafka(&source).unwrap();
    assert_eq!(ok.batching_window, Duration::from_millis(500), "AWS: \"the default batching window is 500 ms\"");
    assert_eq!(ok.batch_size, 100);
    assert_eq!(ok.maximum_retry_attempts, -1, "infinite by default");
    // AWS (kafka-retry-configurations.html): "When you configure both infinite retries and an
    // on-failure destination, Lambda automatically applies a maximum of 10 retry attempts."
    let with_destination = RawSettings { on_failure: Some(format!("arn:aws:sqs:{REGION}:{ACCOUNT}:dlq")), ..base() };
    assert_eq!(with_destination.validate_kafka(&source).unwrap().maximum_retry_attempts, 10);
    let refused = |raw: RawSettings, source: &KafkaSource| raw.validate_kafka(source).unwrap_err().to_string();
    assert!(refused(RawSettings { tumbling_window: Some("60".into()), ..base() }, &source).contains("Kafka"));
    assert!(refused(RawSettings { parallelization_factor: Some("2".into()), ..base() }, &source).contains("Kafka"));
    assert!(refused(RawSettings { batch_size: Some("10001".into()), ..base() }, &source).contains("batchSize"));
    assert!(refused(RawSettings { starting_position: None, ..base() }, &source).contains("StartingPosition"));
    let bad_topic = KafkaSource { topic: ".hidden".into(), ..source.clone() };
    assert!(refused(base(), &bad_topic).contains("topics"));
    let bad_group = KafkaSource { consumer_group_id: Some("a group".into()), ..source.clone() };
    assert!(refused(base(), &bad_group).contains("consumerGroupId"));
    let no_servers = KafkaSource { bootstrap_servers: vec![], ..source };
    assert!(refused(base(), &no_servers).contains("KAFKA_BOOTSTRAP_SERVERS"));
}

/// A topic deleted while the mapping reads it: the mapping stops with an error naming the topic
/// (what was processed stays processed), rather than waiting forever for records that cannot come.
#[tokio::test]
async fn a_topic_deleted_mid_run_stops_the_mapping_with_an_error_naming_it() {
    let f = fixture(2).await;
    f.send_ids(&[(0, "a", none()), (1, "b", none())]).await;
    let settings =
        RawSettings { batching_window: Some("0".into()), ..f.settings() }.validate_kafka(&f.source()).unwrap();
    let mut options = RunnerOptions::new(&settings, Store::file(f.dir.path().join("unused")));
    options.failover = Duration::from_secs(6);
    let clients = Clients::from(&local().await);
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(Runner::run_kafka(settings, f.source(), options, clients, f.server.client(), rx));
    let started = std::time::Instant::now();
    while f.log().len() < 2 {
        assert!(started.elapsed() < Duration::from_secs(60), "the records were not processed in 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pushpull_tests::kafka::delete_topic(&f.topic).await;
    let ended = tokio::time::timeout(Duration::from_secs(60), run).await.expect("the mapping stopped within 60 s");
    let e = ended.unwrap().expect_err("a deleted topic is an error").to_string();
    assert!(e.contains(&f.topic), "{e}");
}

/// A broker that accepts connections and never answers: the mapping says so and stops with an
/// error naming the servers, instead of waiting in silence.
#[tokio::test]
async fn a_broker_that_never_answers_stops_the_mapping_with_an_error_naming_it() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket); // read nothing, answer nothing
        }
    });
    let f = fixture(1).await;
    let source = KafkaSource { bootstrap_servers: vec![address.clone()], ..f.source() };
    let settings = f.settings().validate_kafka(&source).unwrap();
    let mut options = RunnerOptions::new(&settings, Store::file(f.dir.path().join("unused")));
    options.stop_when_idle = Some(Duration::from_secs(2));
    let clients = Clients::from(&local().await);
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let run = Runner::run_kafka(settings, source, options, clients, f.server.client(), rx);
    let ended = tokio::time::timeout(Duration::from_secs(90), run).await.expect("the mapping stopped within 90 s");
    let e = ended.expect_err("a broker that never answers is an error").to_string();
    assert!(e.contains(&address), "{e}");
    held.abort();
    // A topic the cluster does not have, likewise.
    let missing = KafkaSource { topic: pushpull_tests::unique("kmap-missing"), ..f.source() };
    let settings = f.settings().validate_kafka(&missing).unwrap();
    let options = RunnerOptions::new(&settings, Store::file(f.dir.path().join("unused")));
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let run =
        Runner::run_kafka(settings, missing.clone(), options, Clients::from(&local().await), f.server.client(), rx);
    let e =
        tokio::time::timeout(Duration::from_secs(60), run).await.expect("stopped").expect_err("no topic").to_string();
    assert!(e.contains(&missing.topic), "{e}");
}

/// The realism layer's Kafka faults (`pushpull_local::realism::kafka`), at high rates: the
/// mapping's connections go through a proxy that holds Fetch answers back, cuts connections
/// half-way through Fetch answers carrying records, and plays a broker restart mid-run (every
/// connection reset, refused for 2 s). The proxy rewrites Metadata and FindCoordinator so that
/// clients never go around it (their Metadata names only the proxy); every record is invoked and
/// every offset committed, and the events still name the bootstrap servers the mapping was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_fetches_cut_and_slowed_and_a_broker_restart_every_record_is_invoked_and_committed() {
    use pushpull_local::realism::kafka::KafkaFaultProxy;
    use pushpull_local::realism::{Profile, Realism, RealismConfig};
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let f = fixture(4).await;
    let mut config = RealismConfig::new(Profile::Storm, 7);
    config.rates.kafka_fetch_cut = 0.5;
    config.rates.kafka_fetch_slowed = 0.3;
    let realism = std::sync::Arc::new(Realism::new(config));
    let proxy = std::sync::Arc::new(KafkaFaultProxy::start(realism.clone(), &[bootstrap()]).unwrap());

    // A client bootstrapped on the proxy is told of no broker but the proxy.
    let (via, topic) = (proxy.bootstrap(), f.topic.clone());
    let brokers = tokio::task::spawn_blocking(move || {
        let probe: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", via).create().unwrap();
        let metadata = probe.fetch_metadata(Some(&topic), Duration::from_secs(10)).unwrap();
        metadata.brokers().iter().map(|b| format!("{}:{}", b.host(), b.port())).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert_eq!(brokers, [proxy.bootstrap()], "Metadata names the proxy");

    let ids: Vec<String> = (0..800).map(|i| format!("p{i}")).collect();
    let pad = "x".repeat(300);
    let first: Vec<(i32, &str, Value)> =
        ids[..400].iter().enumerate().map(|(i, id)| ((i % 4) as i32, id.as_str(), json!({ "pad": pad }))).collect();
    f.send_ids(&first).await;
    let settings = RawSettings { batch_size: Some("20".into()), ..f.settings() }.validate_kafka(&f.source()).unwrap();
    let mut options = RunnerOptions::new(&settings, Store::file(f.dir.path().join("unused")));
    options.stop_when_idle = Some(Duration::from_secs(5));
    options.failover = Duration::from_secs(10);
    options.kafka_via = Some(proxy.bootstrap());
    let clients = Clients::from(&local().await);
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let run = Runner::run_kafka(settings, f.source(), options, clients, f.server.client(), rx);
    let later = {
        let proxy = proxy.clone();
        let second: Vec<(i32, String, Value)> =
            ids[400..].iter().enumerate().map(|(i, id)| ((i % 4) as i32, id.clone(), json!({ "pad": pad }))).collect();
        let topic = f.topic.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            proxy.restart(Duration::from_secs(2));
            let values: Vec<(i32, Vec<u8>)> = second
                .iter()
                .map(|(p, id, d)| {
                    let mut v = d.clone();
                    v["id"] = Value::from(id.as_str());
                    (*p, v.to_string().into_bytes())
                })
                .collect();
            let list: Vec<pushpull_tests::kafka::Outgoing<'_>> =
                values.iter().map(|(p, v)| (*p, Some(&b"k"[..]), Some(v.as_slice()))).collect();
            // In eight rounds: many Fetch answers carry records, so cuts are drawn.
            for round in list.chunks(50) {
                send(&topic, round).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    let (summary, ()) = tokio::join!(tokio::time::timeout(Duration::from_secs(180), run), later);
    let summary = summary.expect("the mapping ran 180 s").unwrap();
    let faults = realism.faults();
    println!("{faults}");
    let invoked: std::collections::HashSet<String> = f.batches().into_iter().flat_map(|(_, ids)| ids).collect();
    let missing: Vec<&String> = ids.iter().filter(|id| !invoked.contains(*id)).collect();
    assert!(missing.is_empty(), "never invoked: {missing:?}");
    assert_eq!(f.committed(), vec![Some(200); 4], "every offset committed");
    assert_eq!(faults.get("kafka.broker.restart"), 1);
    assert!(faults.get("kafka.fetch.cut") > 0 && faults.get("kafka.fetch.slowed") > 0, "{faults}");
    assert!(proxy.connections() > 2, "the clients reconnected through the proxy");
    assert!(
        f.log().iter().all(|l| l["servers"] == bootstrap().as_str()),
        "the events name the bootstrap servers, not the proxy"
    );
    assert!(summary.counts.records_read >= 800);
}
