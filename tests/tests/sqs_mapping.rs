//! Fidelity of the local SQS event source mapping (`pushpull_local::mapping::sqs`): LocalStack's
//! SQS, a real function binary (`scripted`, whose answers the messages script) behind the Invoke
//! API, and assertions on the batches the function received and what is left in the queues. AWS's
//! words for each rule, with their pages, are in `docs/sqs-aws-rules.md`.
//!
//! | behaviour | test |
//! |---|---|
//! | the event as AWS writes it (`aws:sqs`, attributes, message attributes string and binary, `md5OfBody`); BatchSize; every message deleted after its batch | `batches_are_deleted_after_they_succeed_and_the_event_is_awss` |
//! | ReportBatchItemFailures: the successes deleted, the named ones back after the visibility timeout (`ApproximateReceiveCount` 2) | `a_partial_batch_response_deletes_the_successes_and_the_rest_comes_back` |
//! | a failed batch comes back whole; the queue's redrive policy dead-letters a poison message (SQS's doing) | `a_failed_batch_comes_back_whole_and_the_redrive_policy_dead_letters_a_poison_message` |
//! | FilterCriteria on `body`: unmatched messages (and bodies of the other format) deleted, never invoked | `filtered_out_messages_are_deleted_and_never_invoked` |
//! | FIFO: a group's messages in order, a failing message holds its group back, other groups go on | `fifo_keeps_each_group_in_order_and_a_failure_holds_back_only_its_group` |
//! | FIFO: a deduplication id reused within five minutes is delivered once | `a_reused_fifo_deduplication_id_is_delivered_once` |
//! | settings AWS refuses are refused (visibility timeout below the function's timeout, BatchSize > 10 without a window, FIFO limits, MaximumConcurrency's range, the streams' settings) | `settings_aws_refuses_are_refused` |
//! | five pollers to start, more while messages remain, at most MaximumConcurrency | `pollers_start_at_five_scale_up_under_a_backlog_and_keep_to_maximum_concurrency` |
//! | hostile: bodies at SQS's 1 MiB maximum, ten to a batch, split under the 6 MB payload | `bodies_at_the_one_mib_maximum_are_split_under_the_6_mb_payload` |
//! | hostile: the queue deleted mid-run stops the mapping with an error naming it | `a_queue_deleted_mid_run_stops_the_mapping_with_an_error_naming_it` |
use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName};
use pushpull::store::Store;
use pushpull_local::invoke::InvokeServer;
use pushpull_local::localstack::Local;
use pushpull_local::mapping::{Clients, RawSettings, Runner, RunnerOptions, SqsSource, Summary};
use pushpull_local::runtime_api::FunctionSpec;
use pushpull_tests::{function, local, unique};
use serde_json::{Value, json};

const FUNCTION: &str = "scripted";

struct Fixture {
    local: Local,
    url: String,
    server: InvokeServer,
    dir: tempfile::TempDir,
}

/// A queue named `name` with `attributes`; its URL.
async fn queue(local: &Local, name: &str, attributes: &[(QueueAttributeName, String)]) -> String {
    let mut create = local.sqs.create_queue().queue_name(name);
    for (k, v) in attributes {
        create = create.attributes(k.clone(), v.clone());
    }
    create.send().await.unwrap().queue_url().unwrap().to_owned()
}

/// A queue (FIFO if `fifo`) with a visibility timeout of `visibility` seconds, and the function
/// (timeout 2 s) behind the Invoke API.
async fn fixture_with(fifo: bool, attributes: &[(QueueAttributeName, String)]) -> Fixture {
    let local = local().await;
    let name = unique("smap") + if fifo { ".fifo" } else { "" };
    let mut all = vec![(QueueAttributeName::VisibilityTimeout, "2".to_owned())];
    if fifo {
        all.push((QueueAttributeName::FifoQueue, "true".into()));
    }
    all.extend(attributes.iter().cloned());
    let url = queue(&local, &name, &all).await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec: FunctionSpec = function(FUNCTION, &[("SCRIPT_DIR", dir.path().to_str().unwrap())]);
    spec.timeout = Duration::from_secs(2);
    let server = InvokeServer::start(vec![spec], 0, 20).await.unwrap();
    Fixture { local, url, server, dir }
}

async fn fixture() -> Fixture {
    fixture_with(false, &[]).await
}

/// A queue whose messages do not come back while a loaded machine starts the function's
/// sandboxes: for tests where nothing should come back.
async fn patient_fixture(attributes: &[(QueueAttributeName, String)]) -> Fixture {
    let mut all = vec![(QueueAttributeName::VisibilityTimeout, "30".to_owned())];
    all.extend(attributes.iter().cloned());
    fixture_with(false, &all).await
}

impl Fixture {
    async fn source(&self) -> SqsSource {
        pushpull_local::mapping::sqs::describe(&self.local.sqs, &self.url, 20).await.unwrap()
    }

    fn settings(&self) -> RawSettings {
        RawSettings { function: Some(FUNCTION.into()), ..Default::default() }
    }

    /// Sends `{"id": .., ..directives}` for each, in order (FIFO: in group `group` of each).
    async fn send(&self, messages: &[(&str, Value)]) {
        for (id, d) in messages {
            let mut v = d.clone();
            v["id"] = Value::from(*id);
            let group = d["group"].as_str().map(str::to_owned);
            self.local
                .sqs
                .send_message()
                .queue_url(&self.url)
                .message_body(v.to_string())
                .set_message_group_id(group.clone())
                .set_message_deduplication_id(group.map(|_| d["dedup"].as_str().unwrap_or(id).to_owned()))
                .send()
                .await
                .unwrap();
        }
    }

    /// Runs the mapping until it is idle for 2 s.
    async fn run(&self, raw: RawSettings) -> Summary {
        let source = self.source().await;
        let settings = raw.validate_sqs(&source, Duration::from_secs(2)).unwrap();
        let mut options = RunnerOptions::new(&settings, Store::file(self.dir.path().join("unused")));
        options.stop_when_idle = Some(Duration::from_secs(2));
        let clients = Clients::from(&self.local);
        let (_stop, rx) = tokio::sync::watch::channel(false);
        let run = Runner::run_sqs(settings, source, options, clients, self.server.client(), rx);
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

    /// Per invocation: the ids and the answer.
    fn batches(&self) -> Vec<(Vec<String>, String)> {
        self.log()
            .iter()
            .map(|l| {
                let ids = l["ids"].as_array().unwrap().iter().map(|i| i.as_str().unwrap().to_owned()).collect();
                (ids, l["answer"].as_str().unwrap().to_owned())
            })
            .collect()
    }

    /// Messages in `url`: visible, in flight and delayed.
    async fn depth(&self, url: &str) -> u64 {
        pushpull_local::mapping::sqs::held(&self.local.sqs, url).await.unwrap()
    }
}

/// AWS (with-sqs.html): "If your function successfully processes all messages in the batch,
/// Lambda deletes the messages from the queue"; the event as its example shows it.
#[tokio::test]
async fn batches_are_deleted_after_they_succeed_and_the_event_is_awss() {
    let f = patient_fixture(&[]).await;
    let body = json!({"id": "attrs"}).to_string();
    let sent = f
        .local
        .sqs
        .send_message()
        .queue_url(&f.url)
        .message_body(&body)
        .message_attributes(
            "text",
            MessageAttributeValue::builder().data_type("String").string_value("hello").build().unwrap(),
        )
        .message_attributes(
            "raw",
            MessageAttributeValue::builder()
                .data_type("Binary")
                .binary_value(Blob::new(vec![0u8, 255, 1]))
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let md5 = sent.md5_of_message_body().unwrap().to_owned();
    let ids: Vec<String> = (0..29).map(|i| format!("m{i}")).collect();
    f.send(&ids.iter().map(|id| (id.as_str(), json!({}))).collect::<Vec<_>>()).await;
    let s = f.run(RawSettings { batch_size: Some("7".into()), ..f.settings() }).await;
    let batches = f.batches();
    let mut seen: Vec<String> = batches.iter().flat_map(|(ids, _)| ids.clone()).collect();
    seen.sort();
    let mut want: Vec<String> = ids.clone();
    want.push("attrs".into());
    want.sort();
    assert_eq!(seen, want, "every message once");
    assert!(batches.iter().all(|(ids, _)| ids.len() <= 7), "BatchSize 7: {batches:?}");
    assert_eq!(s.counts.records_read, 30);
    assert_eq!(f.depth(&f.url).await, 0, "every message deleted");
    assert!(s.sqs.is_some() && s.counts.receives >= 3, "{s}");
    let text = s.to_string();
    assert!(text.contains("ReceiveMessage") && text.contains("30 messages"), "{text}");
    // The event as AWS writes it.
    let records: Vec<Value> = f.events().iter().flat_map(|e| e["Records"].as_array().unwrap().clone()).collect();
    let r = records.iter().find(|r| r["body"] == body.as_str()).expect("the message with attributes");
    assert_eq!(r["eventSource"], "aws:sqs");
    assert_eq!(r["eventSourceARN"], f.source().await.queue_arn);
    assert_eq!(r["awsRegion"], "us-east-1");
    assert_eq!(r["md5OfBody"], md5.as_str(), "the MD5 SQS computed on sending");
    for key in ["ApproximateReceiveCount", "SentTimestamp", "SenderId", "ApproximateFirstReceiveTimestamp"] {
        assert!(r["attributes"][key].is_string(), "{key} as a string: {r}");
    }
    assert_eq!(r["attributes"]["ApproximateReceiveCount"], "1");
    assert_eq!(
        r["messageAttributes"]["text"],
        json!({"stringValue": "hello", "stringListValues": [], "binaryListValues": [], "dataType": "String"})
    );
    assert_eq!(r["messageAttributes"]["raw"]["binaryValue"], "AP8B", "base64 of 00 ff 01");
    assert_eq!(r["messageAttributes"]["raw"]["dataType"], "Binary");
    assert!(r["receiptHandle"].as_str().is_some_and(|h| !h.is_empty()));
    // Read back through the library.
    let text = f.events()[0].to_string();
    let e = pushpull::pull::sqs::SqsEvent::from_slice(text.as_bytes()).unwrap();
    assert!(!e.records.is_empty() && !e.is_fifo());
}

/// AWS (services-sqs-errorhandling.html): with ReportBatchItemFailures the response lists the
/// failed messages' ids; (with-sqs.html) the others are deleted, and the failed ones "become
/// visible in the queue again after the visibility timeout expires".
#[tokio::test]
async fn a_partial_batch_response_deletes_the_successes_and_the_rest_comes_back() {
    let f = fixture().await;
    f.send(&[("a", json!({"item_fail": 1})), ("b", json!({})), ("c", json!({"item_fail": 1})), ("d", json!({}))]).await;
    let raw = RawSettings {
        function_response_types: Some("ReportBatchItemFailures".into()),
        batch_size: Some("10".into()),
        maximum_concurrency: Some("2".into()),
        ..f.settings()
    };
    let s = f.run(raw).await;
    let count = |id: &str| f.batches().iter().filter(|(ids, _)| ids.contains(&id.to_owned())).count();
    assert_eq!((count("a"), count("b"), count("c"), count("d")), (2, 1, 2, 1), "{:?}", f.batches());
    assert!(s.counts.partial_failures >= 1 && s.counts.requeued == 2, "{s}");
    // The second delivery says so.
    let again: Vec<Value> = f
        .events()
        .iter()
        .flat_map(|e| e["Records"].as_array().unwrap().clone())
        .filter(|r| r["attributes"]["ApproximateReceiveCount"] == "2")
        .collect();
    assert_eq!(again.len(), 2, "a and c came back once each");
    assert_eq!(f.depth(&f.url).await, 0);
}

/// AWS (with-sqs.html): "By default, if your function encounters an error while processing a
/// batch, all messages in that batch become visible in the queue again after the visibility
/// timeout expires"; (services-sqs-configure.html) "if your function fails to process a message
/// multiple times, Amazon SQS can send it to a dead-letter queue".
#[tokio::test]
async fn a_failed_batch_comes_back_whole_and_the_redrive_policy_dead_letters_a_poison_message() {
    let local = local().await;
    let dlq_name = unique("smap-dlq");
    let dlq = queue(&local, &dlq_name, &[]).await;
    let policy =
        json!({"deadLetterTargetArn": format!("arn:aws:sqs:us-east-1:000000000000:{dlq_name}"), "maxReceiveCount": 2});
    let f = fixture_with(false, &[(QueueAttributeName::RedrivePolicy, policy.to_string())]).await;
    f.send(&[("poison", json!({"error": 1000}))]).await;
    f.send(&[("flaky", json!({"error": 1}))]).await;
    let s = f.run(RawSettings { maximum_concurrency: Some("2".into()), ..f.settings() }).await;
    let count = |id: &str| f.batches().iter().filter(|(ids, _)| ids.contains(&id.to_owned())).count();
    assert_eq!(count("poison"), 2, "received twice (maxReceiveCount 2), then dead-lettered: {:?}", f.batches());
    assert_eq!(count("flaky"), 2, "failed once, then came back and succeeded");
    assert_eq!(s.counts.retries, 0, "no retry in the poller: SQS brings it back");
    let dead = local.sqs.receive_message().queue_url(&dlq).send().await.unwrap();
    let bodies: Vec<Value> = dead.messages().iter().map(|m| serde_json::from_str(m.body().unwrap()).unwrap()).collect();
    assert_eq!(bodies.len(), 1);
    assert_eq!(bodies[0]["id"], "poison");
    assert_eq!(f.depth(&f.url).await, 0);
}

/// AWS (invocation-eventfiltering.html): "For Amazon SQS, if a message doesn't satisfy your filter
/// criteria, Lambda automatically removes the message from the queue"; (with-sqs-filtering.html)
/// "Amazon SQS event source mappings only support filtering on the body key", and a body whose
/// format does not match the pattern's is dropped.
#[tokio::test]
async fn filtered_out_messages_are_deleted_and_never_invoked() {
    let f = patient_fixture(&[]).await;
    f.send(&[("k1", json!({"kind": "keep"})), ("d1", json!({"kind": "drop"})), ("k2", json!({"kind": "keep"}))]).await;
    f.local.sqs.send_message().queue_url(&f.url).message_body("plain text, not JSON").send().await.unwrap();
    let pattern = json!({"body": {"kind": ["keep"]}}).to_string();
    let raw =
        RawSettings { filter_criteria: Some(json!({"Filters": [{"Pattern": pattern}]}).to_string()), ..f.settings() };
    let s = f.run(raw).await;
    let mut seen: Vec<String> = f.batches().iter().flat_map(|(ids, _)| ids.clone()).collect();
    seen.sort();
    assert_eq!(seen, ["k1", "k2"]);
    assert_eq!(s.counts.filtered_out, 2);
    assert_eq!(f.depth(&f.url).await, 0, "the filtered-out messages were deleted");
}

/// AWS (services-sqs-scaling.html): "If your function returns an error, the function attempts all
/// retries on the affected messages before Lambda receives additional messages from the same
/// group"; SQS hands no other message of a group while one is in flight. Other groups go on.
#[tokio::test]
async fn fifo_keeps_each_group_in_order_and_a_failure_holds_back_only_its_group() {
    let f = fixture_with(true, &[]).await;
    f.send(&[
        ("a1", json!({"group": "A", "error": 1})),
        ("a2", json!({"group": "A"})),
        ("a3", json!({"group": "A"})),
        ("b1", json!({"group": "B"})),
        ("b2", json!({"group": "B"})),
        ("b3", json!({"group": "B"})),
    ])
    .await;
    let s = f.run(RawSettings { batch_size: Some("1".into()), ..f.settings() }).await;
    let batches = f.batches();
    let ok: Vec<String> = batches.iter().filter(|(_, a)| a == "ok").flat_map(|(ids, _)| ids.clone()).collect();
    let order = |g: char| ok.iter().filter(|id| id.starts_with(g)).cloned().collect::<Vec<_>>();
    assert_eq!(order('a'), ["a1", "a2", "a3"], "group A in order after a1's failure: {batches:?}");
    assert_eq!(order('b'), ["b1", "b2", "b3"]);
    let at = |id: &str| ok.iter().position(|x| x == id).unwrap();
    assert!(at("b3") < at("a1"), "group B did not wait for A's failed message: {ok:?}");
    assert_eq!(s.counts.function_errors, 1);
    assert_eq!(f.depth(&f.url).await, 0);
}

/// SQS (FIFO deduplication): a message with a deduplication id already sent within five minutes
/// is accepted and not delivered.
#[tokio::test]
async fn a_reused_fifo_deduplication_id_is_delivered_once() {
    let f = fixture_with(true, &[]).await;
    f.send(&[
        ("first", json!({"group": "G", "dedup": "same"})),
        ("second", json!({"group": "G", "dedup": "same"})),
        ("third", json!({"group": "G", "dedup": "other"})),
    ])
    .await;
    f.run(f.settings()).await;
    let seen: Vec<String> = f.batches().iter().flat_map(|(ids, _)| ids.clone()).collect();
    assert_eq!(seen, ["first", "third"]);
}

/// Each refusal in AWS's words (docs/sqs-aws-rules.md).
#[tokio::test]
async fn settings_aws_refuses_are_refused() {
    let f = fixture().await;
    let fifo = fixture_with(true, &[]).await;
    let (standard, fifo) = (f.source().await, fifo.source().await);
    let refuse = |raw: RawSettings, source: &SqsSource, timeout: u64| {
        raw.validate_sqs(source, Duration::from_secs(timeout)).expect_err("refused").to_string()
    };
    let base = f.settings();
    let e = refuse(base.clone(), &standard, 3);
    assert!(e.contains("Queue visibility timeout: 2 seconds is less than Function timeout: 3 seconds"), "{e}");
    assert!(base.clone().validate_sqs(&standard, Duration::from_secs(2)).is_ok(), "equal timeouts are allowed");
    let e = refuse(RawSettings { batch_size: Some("11".into()), ..base.clone() }, &standard, 1);
    assert!(
        e.contains("Maximum batch window in seconds must be greater than 0 if maximum batch size is greater than 10"),
        "{e}"
    );
    let ok = RawSettings { batch_size: Some("10000".into()), batching_window: Some("1".into()), ..base.clone() };
    assert_eq!(ok.validate_sqs(&standard, Duration::from_secs(1)).unwrap().batch_size, 10_000);
    let e = refuse(
        RawSettings { batch_size: Some("10001".into()), batching_window: Some("1".into()), ..base.clone() },
        &standard,
        1,
    );
    assert!(e.contains("batchSize"), "{e}");
    let e = refuse(RawSettings { batch_size: Some("11".into()), ..base.clone() }, &fifo, 1);
    assert!(e.contains("batchSize") && e.contains("10"), "FIFO: at most 10: {e}");
    let e = refuse(RawSettings { batching_window: Some("1".into()), ..base.clone() }, &fifo, 1);
    assert!(e.contains("not supported for FIFO"), "{e}");
    for bad in ["1", "1001"] {
        let e = refuse(RawSettings { maximum_concurrency: Some(bad.into()), ..base.clone() }, &standard, 1);
        assert!(e.contains("maximumConcurrency"), "{e}");
    }
    for raw in [
        RawSettings { parallelization_factor: Some("2".into()), ..base.clone() },
        RawSettings { starting_position: Some("LATEST".into()), ..base.clone() },
        RawSettings { maximum_retry_attempts: Some("1".into()), ..base.clone() },
        RawSettings { on_failure: Some("arn:aws:sqs:us-east-1:000000000000:x".into()), ..base.clone() },
        RawSettings { tumbling_window: Some("60".into()), ..base.clone() },
    ] {
        let e = refuse(raw, &standard, 1);
        assert!(e.contains("not a setting of an SQS event source"), "{e}");
    }
    let s = base.validate_sqs(&standard, Duration::from_secs(1)).unwrap();
    assert_eq!((s.batch_size, s.batching_window, s.maximum_concurrency), (10, Duration::ZERO, None), "AWS's defaults");
}

/// AWS (services-sqs-scaling.html): "Lambda starts processing five batches at a time with five
/// concurrent invocations", adding more "if messages are still available"; MaximumConcurrency
/// "limits the number of concurrent instances of the function that an Amazon SQS event source can
/// invoke".
#[tokio::test]
async fn pollers_start_at_five_scale_up_under_a_backlog_and_keep_to_maximum_concurrency() {
    let f = patient_fixture(&[]).await;
    let ids: Vec<String> = (0..300).map(|i| format!("s{i}")).collect();
    let slow = json!({"sleep_ms": 300});
    send_many(&f, &ids, &slow).await;
    let s = f.run(RawSettings { maximum_concurrency: Some("3".into()), ..f.settings() }).await;
    assert_eq!(s.counts.pollers_max, 3, "capped at MaximumConcurrency: {s}");
    assert_eq!(s.records_delivered, 300);
    // Without a cap: five to start, then more while the backlog lasts.
    let g = patient_fixture(&[]).await;
    send_many(&g, &ids, &slow).await;
    let s = g.run(g.settings()).await;
    assert!(s.counts.pollers_max > 5, "scaled up past five under a backlog: {s}");
    assert_eq!(s.records_delivered, 300);
    assert_eq!(g.depth(&g.url).await, 0);
}

async fn send_many(f: &Fixture, ids: &[String], directives: &Value) {
    for chunk in ids.chunks(10) {
        let mut batch = f.local.sqs.send_message_batch().queue_url(&f.url);
        for (i, id) in chunk.iter().enumerate() {
            let mut v = directives.clone();
            v["id"] = Value::from(id.as_str());
            batch = batch.entries(
                aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(v.to_string())
                    .build()
                    .unwrap(),
            );
        }
        batch.send().await.unwrap();
    }
}

/// SQS (quotas-messages.html): "The maximum is 1,048,576 bytes (1 MiB)"; AWS
/// (services-sqs-configure.html): the batch is passed in one call "as long as the total size of the
/// events doesn't exceed the invocation payload size quota for synchronous invocation (6 MB)".
#[tokio::test]
async fn bodies_at_the_one_mib_maximum_are_split_under_the_6_mb_payload() {
    let f = patient_fixture(&[(QueueAttributeName::MaximumMessageSize, "1048576".into())]).await;
    let mut sizes = HashMap::new();
    for i in 0..8 {
        let id = format!("big{i}");
        let head = json!({"id": id, "pad": ""}).to_string();
        let body = format!("{}{}\"}}", &head[..head.len() - 2], "x".repeat(1_048_576 - head.len()));
        assert_eq!(body.len(), 1_048_576);
        f.local.sqs.send_message().queue_url(&f.url).message_body(&body).send().await.unwrap();
        sizes.insert(id, body.len());
    }
    let s =
        f.run(RawSettings { batch_size: Some("20".into()), batching_window: Some("1".into()), ..f.settings() }).await;
    let batches = f.batches();
    let mut seen: Vec<String> = batches.iter().flat_map(|(ids, _)| ids.clone()).collect();
    seen.sort();
    assert_eq!(seen.len(), 8, "every 1 MiB body delivered once: {batches:?}");
    assert!(batches.iter().all(|(ids, _)| ids.len() <= 5), "at most five 1 MiB bodies under 6 MB: {batches:?}");
    assert_eq!(s.counts.function_errors, 0);
    assert_eq!(f.depth(&f.url).await, 0);
}

/// Ours (AWS disables a mapping whose queue is gone, without saying how fast): the pollers' next
/// receive fails for good, and the mapping stops at once with an error naming the queue.
#[tokio::test]
async fn a_queue_deleted_mid_run_stops_the_mapping_with_an_error_naming_it() {
    let f = fixture().await;
    let source = f.source().await;
    let arn = source.queue_arn.clone();
    let settings = f.settings().validate_sqs(&source, Duration::from_secs(2)).unwrap();
    let options = RunnerOptions::new(&settings, Store::file(f.dir.path().join("unused")));
    // Short polls, so that the deletion is seen at the next one.
    let source = SqsSource { wait_time_seconds: 1, ..source };
    let m = Runner::start_sqs(settings, source, options, Clients::from(&f.local), f.server.client());
    tokio::time::sleep(Duration::from_secs(1)).await;
    f.local.sqs.delete_queue().queue_url(&f.url).send().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !m.is_finished() {
        assert!(std::time::Instant::now() < deadline, "the mapping went on without its queue");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e = m.stop().await.expect_err("an error").to_string();
    assert!(e.contains(&arn), "{e}");
}
