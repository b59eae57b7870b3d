//! Local S3 -> Lambda delivery with asynchronous-invoke semantics (`pushpull_local::async_invoke`)
//! against LocalStack's SQS and the real push function: retries after function errors, the
//! OnFailure destination with AWS's record, event age, and the source message deleted only
//! once the event is settled.
use std::time::Duration;

use pushpull_local::async_invoke::{AsyncSettings, DeliveryOptions, deliver};
use pushpull_local::invoke::InvokeServer;
use pushpull_local::localstack::{ACCOUNT, Local, REGION};
use pushpull_local::mapping::Clients;
use pushpull_tests::{function, local, unique};
use serde_json::{Value, json};

async fn queue(l: &Local, prefix: &str) -> (String, String) {
    let name = unique(prefix);
    let url = l.sqs.create_queue().queue_name(&name).send().await.unwrap().queue_url().unwrap().to_owned();
    (format!("arn:aws:sqs:{REGION}:{ACCOUNT}:{name}"), url)
}

async fn drain(l: &Local, url: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let got = l.receive(url, Duration::from_secs(1)).await.unwrap();
        if got.is_empty() {
            return out;
        }
        for (receipt, body) in got {
            out.push(serde_json::from_str(&body).unwrap());
            l.delete_message(url, &receipt).await.unwrap();
        }
    }
}

async fn server() -> InvokeServer {
    let spec = function("s3-to-kinesis", &[("STREAM_NAME", "no-such-stream")]);
    InvokeServer::start(vec![spec], 0, 4).await.unwrap()
}

async fn run(
    l: &Local,
    server: &InvokeServer,
    settings: AsyncSettings,
    source: &str,
) -> pushpull_local::async_invoke::AsyncSummary {
    let options = DeliveryOptions { stop_when_idle: Some(Duration::from_secs(3)), ..Default::default() };
    let (_tx, rx) = tokio::sync::watch::channel(false);
    deliver(settings, Clients::from(l), server.client(), source, options, rx).await.unwrap()
}

#[tokio::test]
async fn a_failing_event_is_retried_then_sent_to_the_destination_with_the_event() {
    let l = local().await;
    let server = server().await;
    let (_, source) = queue(&l, "async-src").await;
    let (dlq_arn, dlq) = queue(&l, "async-dlq").await;
    // Not an S3 notification: the push function fails on it, every time.
    let event = json!({ "not": "an S3 event" });
    l.sqs.send_message().queue_url(&source).message_body(event.to_string()).send().await.unwrap();
    // A test event succeeds (acknowledged and ignored by the function).
    let test_event = json!({"Service":"Amazon S3","Event":"s3:TestEvent","Time":"2026-11-25T00:00:00Z","Bucket":"b","RequestId":"r","HostId":"h"});
    l.sqs.send_message().queue_url(&source).message_body(test_event.to_string()).send().await.unwrap();

    let settings = AsyncSettings::new("s3-to-kinesis", 2, 3600, Some(dlq_arn), 0.005).unwrap();
    let s = run(&l, &server, settings, &source).await;
    // 1 + 2 retries (0.3 s then 0.6 s apart at this scale) for the bad one, 1 for the test event.
    assert_eq!((s.events, s.invocations, s.retries, s.retries_exhausted, s.succeeded), (2, 4, 2, 1, 1), "{s:?}");
    let records = drain(&l, &dlq).await;
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r["requestContext"]["condition"], "RetriesExhausted");
    assert_eq!(r["requestContext"]["approximateInvokeCount"], 3);
    assert_eq!(
        r["requestContext"]["functionArn"],
        format!("arn:aws:lambda:{REGION}:{ACCOUNT}:function:s3-to-kinesis:$LATEST")
    );
    assert_eq!(r["requestPayload"], event, "the destination gets the event itself");
    assert_eq!(r["responseContext"]["functionError"], "Unhandled");
    assert!(r["responsePayload"]["errorMessage"].as_str().is_some(), "{r}");
    // Both source messages are settled: deleted.
    assert!(drain(&l, &source).await.is_empty());
}

#[tokio::test]
async fn no_retries_means_one_invocation() {
    let l = local().await;
    let server = server().await;
    let (_, source) = queue(&l, "async-src").await;
    let (dlq_arn, dlq) = queue(&l, "async-dlq").await;
    l.sqs.send_message().queue_url(&source).message_body("{}").send().await.unwrap();
    let s = run(&l, &server, AsyncSettings::new("s3-to-kinesis", 0, 60, Some(dlq_arn), 1.0).unwrap(), &source).await;
    assert_eq!((s.invocations, s.retries_exhausted), (1, 1));
    assert_eq!(drain(&l, &dlq).await[0]["requestContext"]["approximateInvokeCount"], 1);
}

/// The throttle path end to end, through the real push function behind the Invoke API: AWS
/// (invocation-async-error-handling) "For throttling errors (429) ... Lambda returns the event to
/// the queue and attempts to run the function again ... with exponentially increasing backoff";
/// a throttle uses up no retry. Here the realism layer answers half the invocations with 429 (a
/// seeded draw): every event still succeeds once, with no retry counted.
#[tokio::test]
async fn throttled_events_are_waited_out_and_use_no_retry() {
    use pushpull_local::realism::{Profile, Realism, RealismConfig};
    let l = local().await;
    let mut config = RealismConfig::new(Profile::Off, 7);
    config.rates.lambda_throttle = 0.5;
    let realism = std::sync::Arc::new(Realism::new(config));
    let spec = function("s3-to-kinesis", &[("STREAM_NAME", "no-such-stream")]);
    let server = InvokeServer::start_with(vec![spec], 0, 4, Some(realism)).await.unwrap();
    let (_, source) = queue(&l, "async-src").await;
    let test_event = json!({"Service":"Amazon S3","Event":"s3:TestEvent","Time":"2026-11-25T00:00:00Z","Bucket":"b","RequestId":"r","HostId":"h"});
    for _ in 0..6 {
        l.sqs.send_message().queue_url(&source).message_body(test_event.to_string()).send().await.unwrap();
    }
    // Retries 0: a throttle that used one up would discard the event.
    let s = run(&l, &server, AsyncSettings::new("s3-to-kinesis", 0, 3600, None, 0.05).unwrap(), &source).await;
    assert_eq!((s.events, s.succeeded, s.retries, s.retries_exhausted), (6, 6, 0, 0), "{s:?}");
    assert!(s.throttled > 0, "the draw throttled some: {s:?}");
    assert!(drain(&l, &source).await.is_empty());
}

/// The dead-letter queue end to end (LocalStack's SQS): AWS (invocation-async-retain-records)
/// "Lambda sends the event to the dead-letter queue as-is, with additional information in
/// attributes": RequestID, ErrorCode ("The HTTP status code"), ErrorMessage; and the OnFailure
/// destination gets its record too ("in addition to or instead of a dead-letter queue").
#[tokio::test]
async fn a_discarded_event_goes_to_the_dead_letter_queue_as_it_came() {
    let l = local().await;
    let server = server().await;
    let (_, source) = queue(&l, "async-src").await;
    let (dest_arn, dest) = queue(&l, "async-dest").await;
    let (dlq_arn, dlq) = queue(&l, "async-dlq").await;
    let body = r#"{"not": "an S3 event"}"#;
    l.sqs.send_message().queue_url(&source).message_body(body).send().await.unwrap();
    let settings =
        AsyncSettings::new("s3-to-kinesis", 0, 3600, Some(dest_arn), 0.01).unwrap().dead_letter(Some(dlq_arn)).unwrap();
    let s = run(&l, &server, settings, &source).await;
    assert_eq!(s.retries_exhausted, 1, "{s:?}");
    let got = l
        .sqs
        .receive_message()
        .queue_url(&dlq)
        .message_attribute_names("All")
        .wait_time_seconds(2)
        .send()
        .await
        .unwrap();
    let m = &got.messages()[0];
    assert_eq!(m.body(), Some(body), "the event as it came");
    let attr = |name: &str| m.message_attributes().and_then(|a| a.get(name)).cloned().unwrap();
    assert_eq!(attr("ErrorCode").string_value(), Some("200"));
    assert_eq!(attr("ErrorCode").data_type(), "Number");
    assert!(!attr("ErrorMessage").string_value().unwrap_or_default().is_empty());
    assert!(!attr("RequestID").string_value().unwrap_or_default().is_empty());
    let records = drain(&l, &dest).await;
    assert_eq!(records[0]["requestContext"]["condition"], "RetriesExhausted");
}

/// A failure to invoke that is not a throttle (here 404: no such function) is counted as a
/// failed attempt and the event goes to the destination with the error; it never stops the
/// delivery of the other events (it used to end the whole delivery).
#[tokio::test]
async fn an_invoke_error_fails_its_event_alone() {
    let l = local().await;
    let server = server().await;
    let (_, source) = queue(&l, "async-src").await;
    let (dlq_arn, dlq) = queue(&l, "async-dlq").await;
    for i in 0..3 {
        l.sqs.send_message().queue_url(&source).message_body(json!({ "n": i }).to_string()).send().await.unwrap();
    }
    let settings = AsyncSettings::new("no-such-function", 1, 3600, Some(dlq_arn), 0.005).unwrap();
    let s = run(&l, &server, settings, &source).await;
    assert_eq!((s.events, s.invoke_errors, s.retries_exhausted), (3, 6, 3), "{s:?}");
    let records = drain(&l, &dlq).await;
    assert_eq!(records.len(), 3);
    for r in &records {
        assert_eq!(r["requestContext"]["condition"], "RetriesExhausted");
        assert_eq!(r["requestContext"]["approximateInvokeCount"], 2);
        assert!(r["responsePayload"]["errorMessage"].as_str().is_some_and(|m| m.contains("404")), "{r}");
        assert!(r["responseContext"].get("functionError").is_none(), "the function never ran: {r}");
        let ts = r["timestamp"].as_str().unwrap();
        assert_eq!(&ts[ts.len() - 5..ts.len() - 4], ".", "milliseconds, as in AWS's sample: {ts}");
    }
    assert!(drain(&l, &source).await.is_empty());
}

/// AWS's async OnFailure destinations include SNS topics: the same record as SQS gets, published
/// (read here through an SQS queue subscribed to the topic, raw delivery).
#[tokio::test]
async fn an_sns_destination_gets_the_async_failure_record() {
    let l = local().await;
    let server = server().await;
    let (_, source) = queue(&l, "async-src").await;
    let topic = l.sns.create_topic().name(unique("async-topic")).send().await.unwrap().topic_arn().unwrap().to_owned();
    let (sub_arn, sub_url) = queue(&l, "async-sub").await;
    l.sns
        .subscribe()
        .topic_arn(&topic)
        .protocol("sqs")
        .endpoint(&sub_arn)
        .attributes("RawMessageDelivery", "true")
        .send()
        .await
        .unwrap();
    let event = json!({ "not": "an S3 event" });
    l.sqs.send_message().queue_url(&source).message_body(event.to_string()).send().await.unwrap();
    let s = run(&l, &server, AsyncSettings::new("s3-to-kinesis", 0, 60, Some(topic), 1.0).unwrap(), &source).await;
    assert_eq!(s.retries_exhausted, 1);
    let records = drain(&l, &sub_url).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["requestContext"]["condition"], "RetriesExhausted");
    assert_eq!(records[0]["requestPayload"], event);
    // What is not a destination AWS allows is refused with AWS's wording.
    let e =
        AsyncSettings::new("f", 0, 60, Some(format!("arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/t")), 1.0).unwrap_err();
    assert!(
        e.to_string().contains(
            "Member must be an SQS queue, SNS topic, S3 bucket, Lambda function or EventBridge event bus ARN"
        ),
        "{e}"
    );
}

/// AWS (invocation-async-retain-records): "Lambda can send records of asynchronous invocations
/// to one of the following AWS services. Amazon SQS ... Amazon SNS ... Amazon S3 – An Amazon S3
/// bucket (on failure only) ... AWS Lambda – A Lambda function ... Amazon EventBridge – An
/// EventBridge event bus". The same failure record reaches each: an S3 object, a Lambda function's
/// event, and an EventBridge event from `lambda` with detail-type "Lambda Function Invocation
/// Result - Failure" (read through a rule that sends it to an SQS queue).
#[tokio::test]
async fn s3_lambda_and_eventbridge_destinations_get_the_async_failure_record() {
    let l = local().await;
    let dir = tempfile::tempdir().unwrap();
    let push = function("s3-to-kinesis", &[("STREAM_NAME", "no-such-stream")]);
    let recorder = function("scripted", &[("SCRIPT_DIR", dir.path().to_str().unwrap())]);
    let server = InvokeServer::start(vec![push, recorder], 0, 4).await.unwrap();
    let event = json!({ "not": "an S3 event" });
    let fail_once_to = |destination: String| {
        let (l, server, event) = (&l, &server, event.clone());
        async move {
            let (_, source) = queue(l, "async-src").await;
            l.sqs.send_message().queue_url(&source).message_body(event.to_string()).send().await.unwrap();
            let settings = AsyncSettings::new("s3-to-kinesis", 0, 60, Some(destination), 1.0).unwrap();
            let s = run(l, server, settings, &source).await;
            assert_eq!(s.retries_exhausted, 1);
        }
    };
    let check = |record: &Value| {
        assert_eq!(record["requestContext"]["condition"], "RetriesExhausted", "{record}");
        let function = format!("arn:aws:lambda:{REGION}:{ACCOUNT}:function:s3-to-kinesis:$LATEST");
        assert_eq!(record["requestContext"]["functionArn"], function);
        assert_eq!(record["requestPayload"], event);
    };

    // S3: one object, the record, under aws/lambda/async/<function>/YYYY/MM/DD/.
    let bucket = unique("async-dest");
    l.ensure_bucket(&bucket).await.unwrap();
    fail_once_to(format!("arn:aws:s3:::{bucket}")).await;
    let listed = l.s3.list_objects_v2().bucket(&bucket).send().await.unwrap();
    let keys: Vec<&str> = listed.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].starts_with("aws/lambda/async/s3-to-kinesis/20"), "{}", keys[0]);
    let body = l.s3.get_object().bucket(&bucket).key(keys[0]).send().await.unwrap().body.collect().await.unwrap();
    check(&serde_json::from_slice(&body.into_bytes()).unwrap());

    // Lambda: the destination function is invoked with the record as its event.
    fail_once_to(format!("arn:aws:lambda:{REGION}:{ACCOUNT}:function:scripted")).await;
    let log = std::fs::read_to_string(dir.path().join("log.ndjson")).unwrap();
    let lines: Vec<Value> = log.lines().map(|x| serde_json::from_str(x).unwrap()).collect();
    assert_eq!(lines.len(), 1, "{log}");
    check(&lines[0]["destination_record"]);

    // EventBridge: a bus, a rule for Lambda's failure events, an SQS queue as its target.
    let bus = unique("async-bus");
    let bus_arn = l.events.create_event_bus().name(&bus).send().await.unwrap().event_bus_arn().unwrap().to_owned();
    let (target_arn, target_url) = queue(&l, "async-bus-target").await;
    let pattern = json!({ "source": ["lambda"], "detail-type": ["Lambda Function Invocation Result - Failure"] });
    l.events.put_rule().name("failures").event_bus_name(&bus).event_pattern(pattern.to_string()).send().await.unwrap();
    let target = aws_sdk_eventbridge::types::Target::builder().id("queue").arn(&target_arn).build().unwrap();
    l.events.put_targets().rule("failures").event_bus_name(&bus).targets(target).send().await.unwrap();
    fail_once_to(bus_arn).await;
    let events = drain(&l, &target_url).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (&events[0]["source"], &events[0]["detail-type"]),
        (&json!("lambda"), &json!("Lambda Function Invocation Result - Failure"))
    );
    check(&events[0]["detail"]);
}
