//! Fidelity of the local Kinesis event source mapping (`pushpull_local::mapping`), one test per
//! behaviour of aws-semantics.md: a real function binary (`scripted`, whose answers the records
//! script) behind the Invoke API, a LocalStack stream, and assertions on the exact sequence of
//! batches the function received and on what reached the failure destination.
//!
//! | behaviour | test |
//! |---|---|
//! | BatchSize, sequence order, AWS-shaped events | `batch_size_splits_in_sequence_order` |
//! | MaximumBatchingWindowInSeconds gathers; window 0 invokes each poll | `the_batching_window_gathers_...`, `without_a_window_...` |
//! | the 6 MiB payload cap | `batches_stay_under_the_6_mib_payload` |
//! | partial batch response: retry from the lowest, later successes included | `partial_failure_retries_from_the_lowest_...` |
//! | no ReportBatchItemFailures: response ignored | `without_report_batch_item_failures_...` |
//! | empty itemIdentifier: whole batch failed | `an_empty_item_identifier_fails_the_whole_batch` |
//! | MaximumRetryAttempts, then the SQS failure record | `errors_are_retried_then_the_batch_goes_to_the_sqs_destination` |
//! | BisectBatchOnFunctionError, splits use no retries | `bisect_isolates_the_bad_record_...` |
//! | bisect with a partial response: retry from it, no split | `bisect_with_a_partial_response_...` |
//! | timeouts and crashes are function errors | `timeouts_and_crashes_are_function_errors_and_retried` |
//! | S3 failure destination: record and payload | `the_s3_destination_gets_the_failure_record_and_the_payload` |
//! | SNS failure destination: the record as the message | `the_sns_destination_gets_the_failure_record` |
//! | MaximumRecordAgeInSeconds (too old before, or while failing; never invocable) | the core's unit tests under paused time (`mapping::rules::records_past_the_maximum_age_are_given_up`, `..._cannot_be_invoked_...`) |
//! | ParallelizationFactor: order per key, lanes at once | `parallelization_keeps_order_per_partition_key_...` |
//! | tumbling windows: state, partial failure, final invocation | `tumbling_windows_carry_state_and_end_with_a_final_invocation` |
//! | resharding: parent before children | `a_parent_shard_is_finished_before_its_children_start` |
//! | LATEST, AT_TIMESTAMP | `latest_and_at_timestamp_skip_what_came_before` |
//! | checkpointed position: a second run resumes | `a_second_run_resumes_after_the_checkpoint` |
//! | kill -9 of the runner process, restart | `a_killed_runner_resumes_where_its_checkpoint_says` |
//! | idle back-off of polling | `an_idle_shard_is_polled_about_once_a_second_not_five_times` |
//! | settings AWS refuses, template parameters checked | `the_runner_refuses_settings_aws_refuses` |
//! | FilterCriteria: matching records only, the rest checkpointed past and counted; non-JSON data dropped | `filter_criteria_invoke_only_matching_records_and_advance_past_the_rest` |
//! | polling: a caught-up shard once a second (AWS's cadence, the default); the summary says which | `aws_polls_a_caught_up_shard_once_a_second` |
//! | IteratorAge: at every send, retries included | `iterator_age_is_measured_for_every_batch_even_one_that_fails`; a blocked shard fires the alarm: `mapping::rules::a_shard_blocked_on_a_failing_batch_fires_the_iterator_age_alarm` |
//! | Enabled: false: nothing read or invoked, state Disabled | `a_disabled_mapping_reads_nothing_and_says_so` |
//! | FilterCriteria limits (5 filters, 4,096 characters) and patterns AWS refuses | `the_runner_refuses_settings_aws_refuses` |
//! | enhanced fan-out (a stream consumer as EventSourceArn): SubscribeToShard, with the same partial failures, bisection, windows, resharding, starting positions and checkpoints as polling | `enhanced_fan_out_*` (six tests that run a polling test's scenario through a consumer) |
//! | enhanced fan-out: a subscription made again after its lifetime and after it breaks, ResourceInUse within 5 s waited out, nothing lost or doubled | `enhanced_fan_out_subscribes_again_when_a_subscription_ends_or_breaks_and_loses_nothing` |
//! | 41 bad and hostile responses (not JSON, huge, wrong types, ids not in the batch) | `hostile_responses.rs` |
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use pushpull::store::Store;
use pushpull_local::invoke::InvokeServer;
use pushpull_local::localstack::endpoint;
use pushpull_local::localstack::{ACCOUNT, Local, REGION};
use pushpull_local::mapping::{Clients, RawSettings, Runner, RunnerOptions, Summary};
use pushpull_local::realism::iam::Policies;
use pushpull_local::realism::proxy::RealismProxy;
use pushpull_local::realism::{Profile, Realism, RealismConfig};
use pushpull_local::runtime_api::FunctionSpec;
use pushpull_tests::{function, local, unique};
use serde_json::{Value, json};
use std::sync::Arc;

struct Fixture {
    local: Local,
    stream: String,
    server: InvokeServer,
    dir: tempfile::TempDir,
    fan_out: Option<FanOut>,
}

/// Enhanced fan-out: a registered consumer, and the proxy that serves `SubscribeToShard`
/// (`pushpull_local::realism::fanout`); records are written through it, as the push function
/// writes them in a run.
struct FanOut {
    consumer: String,
    kinesis: aws_sdk_kinesis::Client,
    proxy: RealismProxy,
}

/// How the mapping reads: GetRecords, or enhanced fan-out.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Read {
    Polling,
    FanOut,
}

const FUNCTION: &str = "scripted";

async fn fixture(shards: i32) -> Fixture {
    fixture_read(shards, Read::Polling).await
}

async fn fixture_read(shards: i32, read: Read) -> Fixture {
    fixture_with(shards, read, RealismConfig::new(Profile::Off, 1)).await
}

async fn fixture_with(shards: i32, read: Read, realism: RealismConfig) -> Fixture {
    let local = local().await;
    let stream = unique("esm");
    let stream_arn = local.ensure_stream(&stream, shards).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut spec: FunctionSpec = function("scripted", &[("SCRIPT_DIR", dir.path().to_str().unwrap())]);
    spec.timeout = Duration::from_secs(2);
    let server = InvokeServer::start(vec![spec], 0, 10).await.unwrap();
    let fan_out = match read {
        Read::Polling => None,
        Read::FanOut => {
            let consumer = local.ensure_consumer(&stream_arn, "rollup").await.unwrap();
            let proxy =
                RealismProxy::start(Arc::new(Realism::new(realism)), Policies::default(), &endpoint()).await.unwrap();
            let kinesis = pushpull_local::http2::kinesis(&proxy.endpoint(), "test").await;
            Some(FanOut { consumer, kinesis, proxy })
        }
    };
    Fixture { local, stream, server, dir, fan_out }
}

impl Fixture {
    fn arn(&self) -> String {
        format!("arn:aws:kinesis:{REGION}:{ACCOUNT}:stream/{}", self.stream)
    }

    /// What the mapping reads: the consumer with enhanced fan-out, else the stream.
    fn source(&self) -> String {
        self.fan_out.as_ref().map_or_else(|| self.arn(), |f| f.consumer.clone())
    }

    fn kinesis(&self) -> &aws_sdk_kinesis::Client {
        self.fan_out.as_ref().map_or(&self.local.kinesis, |f| &f.kinesis)
    }

    fn clients(&self) -> Clients {
        let mut c = Clients::from(&self.local);
        c.kinesis = self.kinesis().clone();
        c
    }

    fn settings(&self) -> RawSettings {
        RawSettings {
            stream: Some(self.source()),
            function: Some(FUNCTION.into()),
            starting_position: Some("TRIM_HORIZON".into()),
            function_response_types: Some("ReportBatchItemFailures".into()),
            ..Default::default()
        }
    }

    /// Puts records one by one (so their order is known): (partition key, data). Returns their
    /// sequence numbers.
    async fn put(&self, records: &[(&str, Value)]) -> Vec<String> {
        let mut seqs = Vec::new();
        for (pk, data) in records {
            let out = self
                .kinesis()
                .put_record()
                .stream_name(&self.stream)
                .partition_key(*pk)
                .data(Blob::new(data.to_string()))
                .send()
                .await
                .unwrap();
            seqs.push(out.sequence_number().to_owned());
        }
        seqs
    }

    /// Puts records with these ids (one partition key) and optional directives.
    async fn put_ids(&self, ids: &[(&str, Value)]) -> Vec<String> {
        let recs: Vec<(&str, Value)> = ids
            .iter()
            .map(|(id, extra)| {
                let mut v = json!({ "id": id });
                if let Value::Object(m) = extra {
                    v.as_object_mut().unwrap().extend(m.clone());
                }
                ("k", v)
            })
            .collect();
        self.put(&recs).await
    }

    fn options(&self, settings: &pushpull_local::mapping::MappingSettings) -> RunnerOptions {
        // Fast polling keeps these tests quick; `aws_polls_a_caught_up_shard_once_a_second` pins AWS's cadence.
        let mut o = RunnerOptions::new(settings, Store::file(self.dir.path().join("checkpoints"))).fast_polling();
        o.stop_when_idle = Some(Duration::from_millis(1500));
        o.list_shards_every = Duration::from_millis(500);
        o.retry_backoff = Duration::from_millis(10);
        o.max_retry_backoff = Duration::from_millis(100);
        o
    }

    async fn run(&self, raw: RawSettings) -> Summary {
        let settings = raw.validate().unwrap();
        let options = self.options(&settings);
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let s = Runner::run(settings, options, self.clients(), self.server.client(), rx).await.unwrap();
        self.checked(s)
    }

    /// Starts the mapping, waits until `ready` holds of it (an event, not a time), does `then`,
    /// and waits for the mapping to stop by itself (idle).
    async fn run_after(
        &self,
        raw: RawSettings,
        ready: impl Fn(&pushpull_local::mapping::RunningMapping) -> bool,
        then: impl std::future::Future<Output = ()>,
    ) -> Summary {
        let settings = raw.validate().unwrap();
        let options = self.options(&settings);
        let m = Runner::start(settings, options, self.clients(), self.server.client());
        let until = std::time::Instant::now() + Duration::from_secs(30);
        while !ready(&m) {
            assert!(std::time::Instant::now() < until && !m.is_finished(), "the mapping never got ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        then.await;
        let until = std::time::Instant::now() + Duration::from_secs(60);
        while !m.is_finished() {
            assert!(std::time::Instant::now() < until, "the mapping never went idle");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.checked(m.stop().await.unwrap())
    }

    fn checked(&self, s: Summary) -> Summary {
        if self.fan_out.is_some() && s.state == "Enabled" {
            // Read with SubscribeToShard only: no GetRecords at all.
            assert_eq!(s.counts.get_records, 0, "{s}");
            assert!(s.counts.subscriptions >= 1 && s.counts.subscription_events >= 1, "{s}");
            assert!(s.to_string().contains("enhanced fan-out through arn:aws:kinesis:"), "{s}");
            let (http1, http2) = self.fan_out.as_ref().map_or((0, 0), |f| f.proxy.subscribe_calls());
            assert!(
                http1 == 0 && http2 >= 1,
                "SubscribeToShard over HTTP/2: {http1} HTTP/1.1 and {http2} HTTP/2 calls"
            );
        }
        s
    }

    fn log(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.path().join("log.ndjson")).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// The ids of each invocation, in order.
    fn batches(&self) -> Vec<Vec<String>> {
        self.log()
            .iter()
            .map(|l| l["ids"].as_array().unwrap().iter().map(|i| i.as_str().unwrap().to_owned()).collect())
            .collect()
    }

    async fn create_queue(&self) -> (String, String) {
        let name = unique("esm-dlq");
        let url = self.local.sqs.create_queue().queue_name(&name).send().await.unwrap().queue_url().unwrap().to_owned();
        (format!("arn:aws:sqs:{REGION}:{ACCOUNT}:{name}"), url)
    }

    async fn failure_records(&self, url: &str) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let got = self.local.receive(url, Duration::from_secs(1)).await.unwrap();
            if got.is_empty() {
                return out;
            }
            for (receipt, body) in got {
                out.push(serde_json::from_str(&body).unwrap());
                self.local.delete_message(url, &receipt).await.unwrap();
            }
        }
    }
}

fn b(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

fn none() -> Value {
    json!({})
}

#[tokio::test]
async fn batch_size_splits_in_sequence_order() {
    let f = fixture(1).await;
    let ids: Vec<String> = (1..=7).map(|i| format!("r{i}")).collect();
    f.put_ids(&ids.iter().map(|i| (i.as_str(), none())).collect::<Vec<_>>()).await;
    let s = f.run(RawSettings { batch_size: Some("3".into()), ..f.settings() }).await;
    assert_eq!(f.batches(), vec![b(&["r1", "r2", "r3"]), b(&["r4", "r5", "r6"]), b(&["r7"])]);
    assert_eq!((s.counts.invocations, s.records_delivered, s.counts.batch_size_max), (3, 7, 3));
    // The event is AWS's: eventID is shard:sequence, the shard is named.
    assert!(f.log().iter().all(|l| l["shard"] == "shardId-000000000000"));
}

#[tokio::test]
async fn the_batching_window_gathers_records_that_arrive_while_it_is_open() {
    let f = fixture(1).await;
    f.put_ids(&[("a", none()), ("b", none())]).await;
    let raw = RawSettings { batch_size: Some("100".into()), batching_window: Some("3".into()), ..f.settings() };
    // Put once the first two are read, inside the 3 s window: one invocation with all three.
    let later = async {
        f.put_ids(&[("c", none())]).await;
    };
    let s = f.run_after(raw, |m| m.progress().0 >= 2, later).await;
    assert_eq!(f.batches(), vec![b(&["a", "b", "c"])]);
    assert!(s.delay_ms_max >= 1000.0, "records waited for the window: {s:?}");
}

#[tokio::test]
async fn without_a_window_each_poll_is_invoked_at_once() {
    let f = fixture(1).await;
    f.put_ids(&[("a", none()), ("b", none())]).await;
    // Put once the first two were invoked: a batch of its own.
    let later = async {
        f.put_ids(&[("c", none())]).await;
    };
    let s = f
        .run_after(RawSettings { batch_size: Some("100".into()), ..f.settings() }, |_| f.batches().len() == 1, later)
        .await;
    assert_eq!(f.batches(), vec![b(&["a", "b"]), b(&["c"])]);
    assert!(s.delay_ms_p50 < 1500.0, "{s:?}");
}

#[tokio::test]
async fn batches_stay_under_the_6_mib_payload() {
    let f = fixture(1).await;
    // 600 kB of data is 800 kB of base64: seven records fit in 6 MiB, eight do not.
    let pad = "x".repeat(600_000);
    let recs: Vec<(String, Value)> = (0..12).map(|i| (format!("p{i}"), json!({ "pad": pad }))).collect();
    f.put_ids(&recs.iter().map(|(i, v)| (i.as_str(), v.clone())).collect::<Vec<_>>()).await;
    let s = f.run(RawSettings { batch_size: Some("100".into()), ..f.settings() }).await;
    let sizes: Vec<usize> = f.batches().iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![7, 5], "{s:?}");
    assert_eq!(s.counts.function_errors, 0, "the Invoke API would refuse a payload over 6 MiB");
}

#[tokio::test]
async fn partial_failure_retries_from_the_lowest_failed_record_including_later_successes() {
    partial_failure_retries_from_the_lowest_failed_record_including_later_successes_with(Read::Polling).await
}

/// The same with enhanced fan-out: the records come by `SubscribeToShard`.
#[tokio::test]
async fn enhanced_fan_out_partial_failure_retries_from_the_lowest_failed_record() {
    partial_failure_retries_from_the_lowest_failed_record_including_later_successes_with(Read::FanOut).await
}

async fn partial_failure_retries_from_the_lowest_failed_record_including_later_successes_with(read: Read) {
    let f = fixture_read(1, read).await;
    let seqs = f
        .put_ids(&[
            ("a", none()),
            ("b", none()),
            ("c", json!({"item_fail": 1})),
            ("d", json!({"item_fail": 1})),
            ("e", none()),
        ])
        .await;
    let s = f.run(f.settings()).await;
    // c and d failed: the retry starts at c (the lowest), and re-sends e, which had succeeded.
    assert_eq!(f.batches(), vec![b(&["a", "b", "c", "d", "e"]), b(&["c", "d", "e"])]);
    assert_eq!(f.log()[1]["seqs"][0], seqs[2]);
    assert_eq!((s.counts.partial_failures, s.counts.retries, s.counts.function_errors), (1, 1, 0));
}

#[tokio::test]
async fn without_report_batch_item_failures_a_partial_response_is_ignored() {
    let f = fixture(1).await;
    f.put_ids(&[("a", none()), ("b", json!({"item_fail": 1}))]).await;
    let s = f.run(RawSettings { function_response_types: Some(String::new()), ..f.settings() }).await;
    assert_eq!(f.batches(), vec![b(&["a", "b"])]);
    assert_eq!(s.counts.retries, 0);
}

#[tokio::test]
async fn an_empty_item_identifier_fails_the_whole_batch() {
    let f = fixture(1).await;
    f.put_ids(&[("a", none()), ("b", json!({"bad_id": 1}))]).await;
    let s = f.run(f.settings()).await;
    assert_eq!(f.batches(), vec![b(&["a", "b"]), b(&["a", "b"])]);
    assert_eq!((s.counts.function_errors, s.counts.retries), (1, 1));
}

#[tokio::test]
async fn errors_are_retried_then_the_batch_goes_to_the_sqs_destination() {
    let f = fixture(1).await;
    let (dlq_arn, dlq_url) = f.create_queue().await;
    let seqs = f.put_ids(&[("a", none()), ("b", json!({"error": 99})), ("c", none())]).await;
    let raw = RawSettings {
        batch_size: Some("2".into()),
        maximum_retry_attempts: Some("2".into()),
        on_failure: Some(dlq_arn),
        ..f.settings()
    };
    let s = f.run(raw).await;
    // The first try and two retries, then the batch is given up and the shard moves on.
    assert_eq!(f.batches(), vec![b(&["a", "b"]), b(&["a", "b"]), b(&["a", "b"]), b(&["c"])]);
    let records = f.failure_records(&dlq_url).await;
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(r["requestContext"]["condition"], "RetryAttemptsExhausted");
    assert_eq!(r["requestContext"]["approximateInvokeCount"], 3);
    assert_eq!(r["requestContext"]["functionArn"], format!("arn:aws:lambda:{REGION}:{ACCOUNT}:function:{FUNCTION}"));
    assert_eq!(r["responseContext"]["functionError"], "Unhandled");
    let info = &r["KinesisBatchInfo"];
    assert_eq!(info["shardId"], "shardId-000000000000");
    assert_eq!(info["startSequenceNumber"], seqs[0]);
    assert_eq!(info["endSequenceNumber"], seqs[1]);
    assert_eq!(info["batchSize"], 2);
    assert_eq!(info["streamArn"], f.arn());
    assert!(info["approximateArrivalOfFirstRecord"].as_str().unwrap().ends_with('Z'));
    assert!(r.get("Records").is_none(), "SQS gets metadata only");
    assert_eq!((s.counts.to_destination, s.counts.retries, s.counts.function_errors), (2, 2, 3));
}

#[tokio::test]
async fn bisect_isolates_the_bad_record_and_splits_use_no_retries() {
    bisect_isolates_the_bad_record_and_splits_use_no_retries_with(Read::Polling).await
}

/// The same with enhanced fan-out: the records come by `SubscribeToShard`.
#[tokio::test]
async fn enhanced_fan_out_bisects_and_sends_to_the_destination_as_polling_does() {
    bisect_isolates_the_bad_record_and_splits_use_no_retries_with(Read::FanOut).await
}

async fn bisect_isolates_the_bad_record_and_splits_use_no_retries_with(read: Read) {
    let f = fixture_read(1, read).await;
    let (dlq_arn, dlq_url) = f.create_queue().await;
    let seqs = f.put_ids(&[("a", none()), ("b", none()), ("c", json!({"error": 99})), ("d", none())]).await;
    let raw = RawSettings {
        bisect: Some("true".into()),
        maximum_retry_attempts: Some("1".into()),
        on_failure: Some(dlq_arn),
        ..f.settings()
    };
    let s = f.run(raw).await;
    assert_eq!(
        f.batches(),
        vec![b(&["a", "b", "c", "d"]), b(&["a", "b"]), b(&["c", "d"]), b(&["c"]), b(&["c"]), b(&["d"])]
    );
    let records = f.failure_records(&dlq_url).await;
    assert_eq!(records.len(), 1);
    let info = &records[0]["KinesisBatchInfo"];
    assert_eq!(
        (&info["startSequenceNumber"], &info["endSequenceNumber"], &info["batchSize"]),
        (&json!(seqs[2]), &json!(seqs[2]), &json!(1))
    );
    assert_eq!((s.counts.bisections, s.counts.retries, s.counts.to_destination), (2, 1, 1));
}

#[tokio::test]
async fn bisect_with_a_partial_response_retries_from_the_returned_record_without_splitting() {
    let f = fixture(1).await;
    f.put_ids(&[("a", none()), ("b", json!({"item_fail": 1})), ("c", none()), ("d", none())]).await;
    let s = f.run(RawSettings { bisect: Some("true".into()), ..f.settings() }).await;
    assert_eq!(f.batches(), vec![b(&["a", "b", "c", "d"]), b(&["b", "c", "d"])]);
    assert_eq!(s.counts.bisections, 0);
}

#[tokio::test]
async fn timeouts_and_crashes_are_function_errors_and_retried() {
    let f = fixture(1).await;
    f.put_ids(&[("a", json!({"timeout": 1})), ("b", json!({"crash": 1}))]).await;
    let s = f.run(RawSettings { batch_size: Some("1".into()), ..f.settings() }).await;
    assert_eq!(f.batches(), vec![b(&["a"]), b(&["a"]), b(&["b"]), b(&["b"])]);
    assert_eq!((s.counts.function_errors, s.counts.retries), (2, 2));
}

#[tokio::test]
async fn the_s3_destination_gets_the_failure_record_and_the_payload() {
    let f = fixture(1).await;
    let bucket = unique("esm-failures");
    f.local.ensure_bucket(&bucket).await.unwrap();
    f.put_ids(&[("a", json!({"error": 99}))]).await;
    let raw = RawSettings {
        maximum_retry_attempts: Some("0".into()),
        on_failure: Some(format!("arn:aws:s3:::{bucket}")),
        ..f.settings()
    };
    f.run(raw).await;
    let list = f.local.s3.list_objects_v2().bucket(&bucket).send().await.unwrap();
    let keys: Vec<&str> = list.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    // AWS (kinesis-on-failure-destination): aws/lambda/<ESM-UUID>/<shardID>/YYYY/MM/DD/YYYY-MM-DDTHH.MM.SS-<Random UUID>
    let uuid = f.settings().validate().unwrap().uuid();
    let prefix = format!("aws/lambda/{uuid}/shardId-000000000000/");
    assert!(keys[0].starts_with(&prefix), "{}", keys[0]);
    let rest: Vec<&str> = keys[0][prefix.len()..].split('/').collect();
    assert_eq!(rest.len(), 4, "YYYY/MM/DD/<time>-<uuid>: {rest:?}");
    assert_eq!(&rest[3][..4], rest[0]);
    assert_eq!(&rest[3][13..14], ".", "HH.MM.SS: {}", rest[3]);
    let body = f.local.s3.get_object().bucket(&bucket).key(keys[0]).send().await.unwrap().body.collect().await.unwrap();
    let v: Value = serde_json::from_slice(&body.into_bytes()).unwrap();
    assert_eq!(v["requestContext"]["condition"], "RetryAttemptsExhausted");
    assert_eq!(v["payload"]["Records"].as_array().unwrap().len(), 1, "S3 also gets the invocation payload");
}

// The record-age rules (records too old before their first invocation, or failing until they
// are; a function that cannot be invoked until its records are too old) are the core's unit tests
// under paused time (`pushpull_local::mapping::rules`): AWS's smallest MaximumRecordAgeInSeconds
// is 60 s, and a test here would wait it out on the wall clock.

#[tokio::test]
async fn parallelization_keeps_order_per_partition_key_and_runs_lanes_at_once() {
    let f = fixture(1).await;
    let mut recs = Vec::new();
    for i in 0..6 {
        for key in ["k1", "k2", "k3", "k4"] {
            recs.push((key, json!({ "id": format!("{key}-{i}"), "sleep_ms": 300 })));
        }
    }
    f.put(&recs).await;
    let s = f
        .run(RawSettings { parallelization_factor: Some("4".into()), batch_size: Some("2".into()), ..f.settings() })
        .await;
    let batches = f.batches();
    let mut seen: std::collections::HashMap<String, Vec<u32>> = Default::default();
    for id in batches.iter().flatten() {
        let (key, i) = id.split_once('-').unwrap();
        seen.entry(key.to_owned()).or_default().push(i.parse().unwrap());
    }
    for (key, order) in &seen {
        assert_eq!(order, &(0..6).collect::<Vec<u32>>(), "order of {key} across invocations");
    }
    // Every batch holds keys of one lane only; with 24 records and batches of 2 that is 12+ calls.
    assert_eq!(s.records_delivered, 24);
    assert!(s.counts.invocations >= 12);
    assert!(f.server.idle_pids(FUNCTION).len() > 1, "lanes ran at the same time (more than one sandbox)");
}

/// Sleeps until just after the next multiple of `len` seconds (a tumbling window boundary).
async fn at_window_start(len: u64) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(len as f64 - now % len as f64 + 0.1)).await;
}

#[tokio::test]
async fn tumbling_windows_carry_state_and_end_with_a_final_invocation() {
    tumbling_windows_carry_state_and_end_with_a_final_invocation_with(Read::Polling).await
}

/// The same with enhanced fan-out: the records come by `SubscribeToShard`.
#[tokio::test]
async fn enhanced_fan_out_tumbling_windows_carry_state_and_end_with_a_final_invocation() {
    tumbling_windows_carry_state_and_end_with_a_final_invocation_with(Read::FanOut).await
}

async fn tumbling_windows_carry_state_and_end_with_a_final_invocation_with(read: Read) {
    let f = fixture_read(1, read).await;
    at_window_start(3).await;
    f.put_ids(&[("a", none()), ("b", json!({"item_fail": 1}))]).await;
    at_window_start(3).await;
    f.put_ids(&[("c", none())]).await;
    let s = f.run(RawSettings { tumbling_window: Some("3".into()), ..f.settings() }).await;
    let log = f.log();
    let view: Vec<(Vec<String>, Value, Value)> = log
        .iter()
        .map(|l| {
            let ids = l["ids"].as_array().unwrap().iter().map(|i| i.as_str().unwrap().to_owned()).collect();
            (ids, l["state"].clone(), l["final"].clone())
        })
        .collect();
    // b fails once: the retry starts at b and carries the state returned with the failure
    // (it covers a, the record before b). Each window ends with a final invocation, no records.
    assert_eq!(
        view,
        vec![
            (b(&["a", "b"]), json!({}), json!(false)),
            (b(&["b"]), json!({"ids": "a"}), json!(false)),
            (b(&[]), json!({"ids": "a,b"}), json!(true)),
            (b(&["c"]), json!({}), json!(false)),
            (b(&[]), json!({"ids": "c"}), json!(true)),
        ]
    );
    let w0 = log[0]["window"].as_str().unwrap();
    assert_eq!(log[2]["window"], w0);
    assert_ne!(log[3]["window"], w0);
    assert_eq!(s.counts.windows_final, 2);
}

#[tokio::test]
async fn a_parent_shard_is_finished_before_its_children_start() {
    a_parent_shard_is_finished_before_its_children_start_with(Read::Polling).await
}

/// The same with enhanced fan-out: the records come by `SubscribeToShard`.
#[tokio::test]
async fn enhanced_fan_out_finishes_a_parent_shard_before_its_children_start() {
    a_parent_shard_is_finished_before_its_children_start_with(Read::FanOut).await
}

async fn a_parent_shard_is_finished_before_its_children_start_with(read: Read) {
    let f = fixture_read(1, read).await;
    f.put_ids(&[("p1", none()), ("p2", none())]).await;
    f.local
        .kinesis
        .split_shard()
        .stream_name(&f.stream)
        .shard_to_split("shardId-000000000000")
        .new_starting_hash_key("170141183460469231731687303715884105728")
        .send()
        .await
        .unwrap();
    f.local.ensure_stream(&f.stream, 1).await.unwrap();
    let mut recs = Vec::new();
    for i in 0..6 {
        recs.push(((if i % 2 == 0 { "x" } else { "yy" }).to_owned(), json!({ "id": format!("c{i}") })));
    }
    f.put(&recs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect::<Vec<_>>()).await;
    let s = f.run(f.settings()).await;
    let log = f.log();
    assert_eq!(log[0]["shard"], "shardId-000000000000");
    assert_eq!(log[0]["ids"], json!(["p1", "p2"]));
    let children: Vec<&Value> = log[1..].iter().collect();
    assert!(children.iter().all(|l| l["shard"] != "shardId-000000000000"), "{log:?}");
    let mut ids: Vec<String> = f.batches()[1..].iter().flatten().cloned().collect();
    ids.sort();
    assert_eq!(ids, b(&["c0", "c1", "c2", "c3", "c4", "c5"]));
    assert_eq!((s.counts.shards_started, s.counts.shards_finished), (3, 1));
}

#[tokio::test]
async fn latest_and_at_timestamp_skip_what_came_before() {
    latest_and_at_timestamp_skip_what_came_before_with(Read::Polling).await
}

/// The same with enhanced fan-out: the records come by `SubscribeToShard`.
#[tokio::test]
async fn enhanced_fan_out_latest_and_at_timestamp_skip_what_came_before() {
    latest_and_at_timestamp_skip_what_came_before_with(Read::FanOut).await
}

async fn latest_and_at_timestamp_skip_what_came_before_with(read: Read) {
    let f = fixture_read(1, read).await;
    f.put_ids(&[("before", none())]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    f.put_ids(&[("after", none())]).await;
    f.run(RawSettings {
        starting_position: Some("AT_TIMESTAMP".into()),
        starting_position_timestamp: Some(format!("{t}")),
        ..f.settings()
    })
    .await;
    assert_eq!(f.batches(), vec![b(&["after"])]);

    // LATEST: only what arrives after the mapping started. A fresh checkpoint place.
    let g = fixture_read(1, read).await;
    g.put_ids(&[("before", none())]).await;
    // "after" is put once the shard was read and found caught up: LATEST is taken by then.
    let later = async {
        g.put_ids(&[("after", none())]).await;
    };
    g.run_after(
        RawSettings { starting_position: Some("LATEST".into()), ..g.settings() },
        |m| m.caught_up_since().is_some(),
        later,
    )
    .await;
    assert_eq!(g.batches(), vec![b(&["after"])]);
}

#[tokio::test]
async fn a_second_run_resumes_after_the_checkpoint() {
    a_second_run_resumes_after_the_checkpoint_with(Read::Polling).await
}

/// The same with enhanced fan-out: the records come by `SubscribeToShard`.
#[tokio::test]
async fn enhanced_fan_out_a_second_run_resumes_after_the_checkpoint() {
    a_second_run_resumes_after_the_checkpoint_with(Read::FanOut).await
}

async fn a_second_run_resumes_after_the_checkpoint_with(read: Read) {
    let f = fixture_read(2, read).await;
    let mut recs = Vec::new();
    for i in 0..20 {
        recs.push((format!("key{i}"), json!({ "id": format!("r{i}") })));
    }
    f.put(&recs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect::<Vec<_>>()).await;
    let first = f.run(f.settings()).await;
    assert_eq!(first.records_delivered, 20);
    f.put_ids(&[("late", none())]).await;
    let second = f.run(f.settings()).await;
    assert_eq!(second.records_delivered, 1);
    assert_eq!(f.batches().last().unwrap(), &b(&["late"]));
}

#[tokio::test]
async fn the_runner_refuses_settings_aws_refuses() {
    let bin = pushpull_local::runtime_api::workspace_binary("pushpull-local");
    let template = concat!(env!("CARGO_MANIFEST_DIR"), "/../infra/template.yaml");
    for (flag, value, expect) in [
        ("--batch-size", "0", "Value '0' at 'batchSize' failed to satisfy constraint"),
        ("--maximum-record-age", "30", "Member must be -1 or between 60 and 604800"),
        ("--parallelization-factor", "11", "parallelizationFactor"),
        ("--starting-position", "OLDEST", "startingPosition"),
        (
            "--filter-criteria",
            r#"{"Filters":[{"Pattern":"{}"},{"Pattern":"{}"},{"Pattern":"{}"},{"Pattern":"{}"},{"Pattern":"{}"},{"Pattern":"{}"}]}"#,
            "exceeds the limit of 5 filters",
        ),
        ("--filter-criteria", r#"{"Filters":[{"Pattern":"{\"data\": \"plain\"}"}]}"#, "must be in a valid JSON format"),
    ] {
        let out = std::process::Command::new(&bin).args(["esm", "--template", template, flag, value]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(expect), "{flag} {value}: {err}");
    }
    // The template's own parameters are checked the way CloudFormation checks them.
    let out = std::process::Command::new(&bin)
        .args(["esm", "--template", template, "--parameter-overrides", "BatchSize=20000"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("above MaxValue 10000"));
}

#[tokio::test]
async fn an_idle_shard_is_polled_about_once_a_second_not_five_times() {
    let f = fixture(1).await;
    let raw = f.settings().validate().unwrap();
    let mut options = f.options(&raw);
    options.stop_when_idle = Some(Duration::from_secs(5));
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let s = Runner::run(raw, options, Clients::from(&f.local), f.server.client(), rx).await.unwrap();
    // About 5 s idle: backing off 0.2, 0.4, 0.8, then 1 s apart is 6-9 calls; 5 a second would be 25+.
    assert!(
        (4..=12).contains(&s.counts.get_records),
        "{} GetRecords calls in 5 s of an empty shard",
        s.counts.get_records
    );
    assert_eq!(s.counts.empty_polls, s.counts.get_records);
}

/// The runner as a process: killed with SIGKILL mid-stream, then restarted on the same
/// checkpoints. Every record is processed; only what was in flight (one batch per shard) comes twice.
#[tokio::test]
async fn a_killed_runner_resumes_where_its_checkpoint_says() {
    let f = fixture(2).await;
    let mut recs = Vec::new();
    for i in 0..600 {
        recs.push((format!("key{}", i % 13), json!({ "id": format!("r{i}"), "sleep_ms": 40 })));
    }
    let mut put = Vec::new();
    for chunk in recs.chunks(300) {
        let entries = chunk.iter().map(|(k, v)| {
            aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
                .partition_key(k)
                .data(Blob::new(v.to_string()))
                .build()
                .unwrap()
        });
        let out = f
            .local
            .kinesis
            .put_records()
            .stream_name(&f.stream)
            .set_records(Some(entries.collect()))
            .send()
            .await
            .unwrap();
        assert_eq!(out.failed_record_count(), Some(0));
        put.push(out);
    }
    let bin = pushpull_local::runtime_api::workspace_binary("pushpull-local");
    let checkpoints = format!("file://{}", f.dir.path().join("runner-checkpoints").display());
    let start = || {
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(["esm", "--no-template", "--stream", &f.stream, "--function-name", FUNCTION])
            .args(["--invoke-endpoint", &f.server.endpoint(), "--starting-position", "TRIM_HORIZON"])
            .args(["--batch-size", "25", "--checkpoint-uri", &checkpoints, "--stop-when-idle", "2"])
            // A new process is a new runner (host and pid): it waits for the killed one's leases
            // to go unrenewed for the failover time before it takes them.
            .args(["--failover-ms", "2000"])
            .envs(pushpull_local::localstack::function_env())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        cmd.spawn().unwrap()
    };
    let mut first = start();
    // Let it get well into the stream, then kill it without warning.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while f.log().len() < 8 {
        assert!(std::time::Instant::now() < deadline, "the runner made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().unwrap(); // SIGKILL, by PID
    first.wait().unwrap();
    let before = f.log().len();
    let mut second = start();
    let status = tokio::task::spawn_blocking(move || second.wait().unwrap()).await.unwrap();
    assert!(status.success());
    let mut counts: std::collections::HashMap<String, usize> = Default::default();
    for id in f.batches().into_iter().flatten() {
        *counts.entry(id).or_default() += 1;
    }
    assert_eq!(counts.len(), 600, "every record was processed");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.iter().all(|(_, n)| **n == 2), "{twice:?}");
    // At most the batch in flight on each of the two shards comes again.
    assert!(twice.len() <= 2 * 25, "{} records re-delivered: {twice:?}", twice.len());
    assert!(f.log().len() > before, "the second runner did the rest");
}

/// AWS (invocation-eventfiltering.html): "If a record from your event source satisfies one or
/// more of your filters, Lambda includes the record in the next event it sends to your function.
/// If none of your filters are satisfied, Lambda discards the record." For streams: "Once your
/// filter criteria processes an Kinesis or DynamoDB record, the streams iterator advances past
/// this record", and non-JSON data with a pattern on data properties: "Lambda drops the record".
/// AWS's own Kinesis example (with-kinesis-filtering.html): orders of type "buy" only.
#[tokio::test]
async fn filter_criteria_invoke_only_matching_records_and_advance_past_the_rest() {
    let f = fixture(1).await;
    f.put(&[
        ("k", json!({"id": "b1", "record": 12345, "order": {"type": "buy", "stock": "ANYCO", "quantity": 1000}})),
        ("k", json!({"id": "s1", "order": {"type": "sell"}})),
    ])
    .await;
    f.local
        .kinesis
        .put_record()
        .stream_name(&f.stream)
        .partition_key("k")
        .data(Blob::new("not json"))
        .send()
        .await
        .unwrap();
    f.put(&[("k", json!({"id": "b2", "order": {"type": "buy"}})), ("k", json!({"id": "x1"}))]).await;
    let pattern = json!({"data": {"order": {"type": ["buy"]}}}).to_string();
    let criteria = json!({"Filters": [{"Pattern": pattern}]}).to_string();
    let raw = RawSettings { filter_criteria: Some(criteria.clone()), ..f.settings() };
    let s = f.run(raw.clone()).await;
    assert_eq!(f.batches().concat(), b(&["b1", "b2"]), "only the buy orders are invoked");
    assert_eq!(s.counts.filtered_out, 3, "the sell order, the non-JSON record and the one without an order");
    assert_eq!(s.counts.records_read, 5);
    // Advanced past: a second run reads nothing again, and invokes nothing.
    let again = f.run(raw).await;
    assert_eq!((again.counts.records_read, again.counts.invocations), (0, 0));
    assert_eq!(f.batches().len(), 1);
    // Several filters are ORed.
    let g = fixture(1).await;
    g.put(&[("k", json!({"id": "a", "n": 5})), ("k", json!({"id": "c", "tag": "red"})), ("k", json!({"id": "d"}))])
        .await;
    let two = json!({"Filters": [
        {"Pattern": json!({"data": {"n": [{"numeric": [">", 1]}]}}).to_string()},
        {"Pattern": json!({"data": {"tag": [{"prefix": "re"}]}}).to_string()},
    ]});
    let s = g.run(RawSettings { filter_criteria: Some(two.to_string()), ..g.settings() }).await;
    assert_eq!(g.batches().concat(), b(&["a", "c"]));
    assert_eq!(s.counts.filtered_out, 1);
}

/// AWS (with-kinesis.html): "Lambda polls each shard in your Kinesis stream for records at a base
/// rate of once per second. When more records are available, Lambda keeps processing batches
/// until the function catches up with the stream." With the default cadence, a shard that keeps
/// receiving a record now and then is read about once a second, not five times.
#[tokio::test]
async fn aws_polls_a_caught_up_shard_once_a_second() {
    let f = fixture(1).await;
    let settings = f.settings().validate().unwrap();
    let mut options = RunnerOptions::new(&settings, Store::file(f.dir.path().join("aws-cadence")));
    options.stop_when_idle = Some(Duration::from_millis(1500));
    assert_eq!(options.polling, pushpull_local::mapping::Polling::Aws, "AWS's cadence is the default");
    let mapping = Runner::start(settings, options, Clients::from(&f.local), f.server.client());
    let started = std::time::Instant::now();
    for i in 0..8 {
        f.put_ids(&[(&format!("t{i}"), none())]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The last record can wait up to a poll interval to be read: let the runner stop by itself
    // once the shard has been idle, rather than stopping it before its next poll.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !mapping.is_finished() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = mapping.stop().await.unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(s.records_delivered, 8);
    assert!(
        (s.counts.get_records as f64) < seconds * 1.5 + 2.0,
        "{} GetRecords in {seconds:.1} s: more than about one a second",
        s.counts.get_records
    );
    assert_eq!(s.polling, pushpull_local::mapping::Polling::Aws);
    assert!(s.to_string().contains("polled once a second"), "{s}");
}

/// AWS: a mapping created with `Enabled: false` exists in state `Disabled` and does not poll.
#[tokio::test]
async fn a_disabled_mapping_reads_nothing_and_says_so() {
    let f = fixture(1).await;
    f.put_ids(&[("r1", none())]).await;
    let s = f.run(RawSettings { enabled: Some("false".into()), ..f.settings() }).await;
    assert_eq!((s.counts.get_records, s.counts.invocations), (0, 0));
    assert_eq!(s.state, "Disabled");
    assert!(s.to_string().contains("state            Disabled"), "{s}");
    let enabled = f.run(f.settings()).await;
    assert_eq!((enabled.state.as_str(), enabled.records_delivered), ("Enabled", 1));
}

/// aws-semantics.md: IteratorAge is "measured when the mapping receives a batch: the time since
/// the last record of the batch was written (for every batch, failed or not)". A batch that only
/// ever fails still has its age measured (it was measured after a success only before).
#[tokio::test]
async fn iterator_age_is_measured_for_every_batch_even_one_that_fails() {
    let f = fixture(1).await;
    f.put_ids(&[("bad", json!({"error": 99}))]).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let s = f.run(RawSettings { maximum_retry_attempts: Some("0".into()), ..f.settings() }).await;
    assert_eq!((s.counts.function_errors, s.counts.discarded), (1, 1), "{s}");
    assert!(s.counts.iterator_age_ms_max >= 1000.0, "the failed batch's age: {}", s.counts.iterator_age_ms_max);
}

/// AWS (kinesis-on-failure-destination): "you can configure an Amazon SQS queue, Amazon SNS topic,
/// or Amazon S3 bucket as the destination"; SNS gets the same metadata record as SQS. The topic
/// is read here through an SQS queue subscribed to it (raw delivery).
#[tokio::test]
async fn the_sns_destination_gets_the_failure_record() {
    let f = fixture(1).await;
    let topic =
        f.local.sns.create_topic().name(unique("esm-topic")).send().await.unwrap().topic_arn().unwrap().to_owned();
    let (queue_arn, queue_url) = f.create_queue().await;
    f.local
        .sns
        .subscribe()
        .topic_arn(&topic)
        .protocol("sqs")
        .endpoint(&queue_arn)
        .attributes("RawMessageDelivery", "true")
        .send()
        .await
        .unwrap();
    let seqs = f.put_ids(&[("a", json!({"error": 99}))]).await;
    let raw = RawSettings { maximum_retry_attempts: Some("0".into()), on_failure: Some(topic.clone()), ..f.settings() };
    let s = f.run(raw).await;
    assert_eq!(s.counts.to_destination, 1);
    let records = f.failure_records(&queue_url).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["requestContext"]["condition"], "RetryAttemptsExhausted");
    assert_eq!(records[0]["KinesisBatchInfo"]["startSequenceNumber"], seqs[0]);
    assert!(records[0].get("payload").is_none(), "SNS gets metadata only, as SQS");
}

/// AWS (API Reference, SubscribeToShard): "your consumer starts receiving events of type
/// SubscribeToShardEvent over the HTTP/2 connection for up to 5 minutes, after which time you
/// need to call SubscribeToShard again"; "If you call SubscribeToShard again with the same
/// ConsumerARN and ShardId within 5 seconds of a successful call, you'll get a
/// ResourceInUseException"; "You can make one call to SubscribeToShard per second per
/// registered consumer per shard" (LimitExceededException). The mapping subscribes again when a
/// subscription ends (here after 6 s instead of 5 minutes) and when one breaks off (the proxy
/// cuts connections at random), waiting out both refusals, from after the last record it read:
/// every record is invoked once, in order.
#[tokio::test]
async fn enhanced_fan_out_subscribes_again_when_a_subscription_ends_or_breaks_and_loses_nothing() {
    use aws_sdk_kinesis::types::{ShardIteratorType, StartingPosition};
    let mut realism = RealismConfig::new(Profile::Off, 7);
    realism.subscription_lifetime = Duration::from_secs(6);
    realism.rates.subscription_cut = 0.08;
    let f = fixture_with(1, Read::FanOut, realism).await;
    let consumer = f.source();
    let subscribe = || {
        f.kinesis()
            .subscribe_to_shard()
            .consumer_arn(&consumer)
            .shard_id("shardId-000000000000")
            .starting_position(StartingPosition::builder().r#type(ShardIteratorType::Latest).build().unwrap())
            .send()
    };
    let first = subscribe().await.unwrap();
    // At once: refused, by the one-call-a-second rule if it comes within a second of the first
    // call (the proxy's unit test `one_call_a_second_per_consumer_and_shard` pins that rule; here
    // the first call may take longer than a second on a loaded machine), else by the 5 s one.
    let at_once = subscribe().await.expect_err("a second call at once is refused");
    assert!(
        at_once.as_service_error().is_some_and(|e| e.is_limit_exceeded_exception() || e.is_resource_in_use_exception()),
        "{at_once:?}"
    );
    // A second later (the rule's own wait), still within 5 s of the successful call.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = subscribe().await.expect_err("a second subscription within 5 s is refused");
    assert!(again.as_service_error().is_some_and(|e| e.is_resource_in_use_exception()), "{again:?}");
    drop(first);

    let ids: Vec<String> = (0..40).map(|i| format!("r{i:02}")).collect();
    let producer = async {
        for id in &ids {
            f.put_ids(&[(id, none())]).await;
            tokio::time::sleep(Duration::from_millis(350)).await;
        }
    };
    let (s, ()) = tokio::join!(f.run(f.settings()), producer);
    assert_eq!(f.batches().concat(), ids, "every record once, in order: {s}");
    assert!(s.counts.subscriptions >= 3, "the 6 s subscriptions were made again: {s}");
    assert!(s.counts.subscription_errors >= 1, "the first call met the test's subscription: {s}");
    println!("{s}");
}
