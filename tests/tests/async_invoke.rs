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

#[tokio::test]
async fn an_event_older_than_the_maximum_age_is_not_invoked() {
    let l = local().await;
    let server = server().await;
    let (_, source) = queue(&l, "async-src").await;
    let (dlq_arn, dlq) = queue(&l, "async-dlq").await;
    let event = json!({"Service":"Amazon S3","Event":"s3:TestEvent","Time":"2026-11-25T00:00:00Z","Bucket":"b","RequestId":"r","HostId":"h"});
    l.sqs.send_message().queue_url(&source).message_body(event.to_string()).send().await.unwrap();
    // 60 s is the smallest MaximumEventAgeInSeconds AWS allows; the age counts from the queue.
    tokio::time::sleep(Duration::from_secs(61)).await;
    let s = run(&l, &server, AsyncSettings::new("s3-to-kinesis", 2, 60, Some(dlq_arn), 1.0).unwrap(), &source).await;
    assert_eq!((s.invocations, s.expired), (0, 1), "{s:?}");
    let records = drain(&l, &dlq).await;
    assert_eq!(records[0]["requestContext"]["condition"], "EventAgeExceeded");
    assert_eq!(records[0]["requestContext"]["approximateInvokeCount"], 0);
    assert_eq!(records[0]["requestPayload"], event);
    assert!(drain(&l, &source).await.is_empty());
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
    // Destinations LocalStack does not serve here are refused by name, not ignored.
    let e = AsyncSettings::new("f", 0, 60, Some(format!("arn:aws:events:{REGION}:{ACCOUNT}:event-bus/default")), 1.0)
        .unwrap_err();
    assert!(e.to_string().contains("SQS and SNS only"), "{e}");
}
