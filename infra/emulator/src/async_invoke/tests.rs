//! One event's rules under paused time: an in-memory queue, an in-process function
//! ([`crate::mapping::testkit`]), destinations and a dead-letter queue that keep what they get.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde_json::{Value, json};

use super::dead_letter::{DeadLetter, DeadLetterError};
use super::event::{EventQueue, LastError, Outcome, Settled, Shared, one_event, record};
use super::{AsyncSettings, AsyncSummary};
use crate::mapping::MappingError;
use crate::mapping::clock::{Instant, now_unix};
use crate::mapping::testkit::{FnInvoker, MemorySink, function_error, respond, throttled};

#[derive(Default)]
struct MemoryQueue {
    deleted: Mutex<Vec<String>>,
}

impl EventQueue for MemoryQueue {
    fn name(&self) -> &str {
        "memory"
    }
    fn hold<'a>(&'a self, _receipt: &'a str, _seconds: u64) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn delete<'a>(&'a self, receipt: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.deleted.lock().unwrap().push(receipt.to_owned());
            Ok(())
        })
    }
}

#[derive(Default)]
struct MemoryDeadLetters {
    sent: Mutex<Vec<(String, DeadLetterError)>>,
}

impl DeadLetter for MemoryDeadLetters {
    fn send<'a>(&'a self, event: &'a str, error: &'a DeadLetterError) -> BoxFuture<'a, Result<(), MappingError>> {
        Box::pin(async move {
            self.sent.lock().unwrap().push((event.to_owned(), error.clone()));
            Ok(())
        })
    }
}

struct World {
    shared: Shared,
    queue: Arc<MemoryQueue>,
    failures: Arc<MemorySink>,
    successes: Arc<MemorySink>,
    dead: Arc<MemoryDeadLetters>,
    calls: Arc<Mutex<Vec<crate::mapping::testkit::Call>>>,
}

fn world(retries: i64, max_age: i64, invoker: FnInvoker) -> World {
    let (queue, failures, successes, dead) = (
        Arc::new(MemoryQueue::default()),
        Arc::<MemorySink>::default(),
        Arc::<MemorySink>::default(),
        Arc::<MemoryDeadLetters>::default(),
    );
    let calls = invoker.calls.clone();
    let shared = Shared {
        settings: AsyncSettings::new("f", retries, max_age, None, 1.0).unwrap(),
        invoker: Arc::new(invoker),
        queue: queue.clone(),
        on_failure: Some(failures.clone()),
        on_success: Some(successes.clone()),
        dead_letter: Some(dead.clone()),
        summary: Mutex::new(AsyncSummary::default()),
        last_activity: Mutex::new(Instant::now()),
        responses: None,
    };
    World { shared, queue, failures, successes, dead, calls }
}

const EVENT: &str = r#"{"Records":[{"s3":{"object":{"key":"k"}}}]}"#;

/// AWS (invocation-async-error-handling): "For throttling errors (429) and system errors
/// (500-series), Lambda returns the event to the queue and attempts to run the function again
/// for up to 6 hours, with exponentially increasing backoff: the retry interval increases from 1
/// second after the first attempt to a maximum of 5 minutes." A throttle uses up no retry. Then
/// the OnSuccess destination gets the invocation record with condition `Success` (CDK's
/// aws-lambda-destinations: `"condition": "Success"`, the response as `responsePayload`).
#[tokio::test(start_paused = true)]
async fn a_throttled_event_waits_1_2_4_s_and_succeeds_with_no_retry_used() {
    let w = world(0, 21600, FnInvoker::new(|_, n| if n < 3 { throttled() } else { respond(json!({"ok": true})) }));
    one_event(&w.shared, EVENT.into(), "m-1", now_unix()).await.unwrap();
    let at: Vec<Duration> = w.calls.lock().unwrap().iter().map(|c| c.at).collect();
    assert_eq!(at, [0, 1, 3, 7].map(Duration::from_secs), "1 s, then 2, then 4");
    let s = w.shared.summary.lock().unwrap().clone();
    assert_eq!((s.throttled, s.retries, s.invocations, s.succeeded), (3, 0, 1, 1));
    let ok = w.successes.sent.lock().unwrap().clone();
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0]["requestContext"]["condition"], "Success");
    assert_eq!(ok[0]["requestContext"]["approximateInvokeCount"], 1);
    assert_eq!(ok[0]["requestPayload"], serde_json::from_str::<Value>(EVENT).unwrap());
    assert_eq!(ok[0]["responsePayload"], json!({"ok": true}));
    assert!(ok[0]["responseContext"].get("functionError").is_none());
    assert!(w.failures.sent.lock().unwrap().is_empty() && w.dead.sent.lock().unwrap().is_empty());
    assert_eq!(*w.queue.deleted.lock().unwrap(), ["m-1"]);
}

/// AWS (invocation-async-error-handling): after a function error Lambda retries "two more times,
/// with one minute between the first two attempts, and two minutes between the second and third
/// attempts"; then the event is discarded: the OnFailure destination gets the record, and the
/// dead-letter queue "the event ... as-is, with additional information in attributes"
/// (invocation-async-retain-records: RequestID, ErrorCode "The HTTP status code", ErrorMessage
/// "The first 1 KB of the error message"); both, as destinations go "in addition to or instead
/// of a dead-letter queue".
#[tokio::test(start_paused = true)]
async fn a_failing_event_is_retried_a_minute_then_two_apart_and_discarded_to_both() {
    let w = world(2, 21600, FnInvoker::new(|_, _| function_error()));
    one_event(&w.shared, EVENT.into(), "m-1", now_unix()).await.unwrap();
    let at: Vec<Duration> = w.calls.lock().unwrap().iter().map(|c| c.at).collect();
    assert_eq!(at, [0, 60, 180].map(Duration::from_secs));
    let failed = w.failures.sent.lock().unwrap().clone();
    assert_eq!(failed[0]["requestContext"]["condition"], "RetriesExhausted");
    assert_eq!(failed[0]["requestContext"]["approximateInvokeCount"], 3);
    assert_eq!(failed[0]["responseContext"]["functionError"], "Unhandled");
    let dead = w.dead.sent.lock().unwrap().clone();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, EVENT, "the event as it came");
    assert_eq!(dead[0].1.request_id, "req-2", "the last invocation's");
    assert_eq!((dead[0].1.error_code, dead[0].1.error_message.as_str()), (Some(200), "failed"));
    assert!(w.successes.sent.lock().unwrap().is_empty());
    assert_eq!(*w.queue.deleted.lock().unwrap(), ["m-1"]);
}

/// AWS (invocation-async-error-handling): "MaximumEventAgeInSeconds – The maximum amount of time,
/// up to six hours, that Lambda retains an event in the asynchronous event queue, after which it
/// is discarded." An event already older is never invoked: `EventAgeExceeded`,
/// `approximateInvokeCount` 0.
#[tokio::test(start_paused = true)]
async fn an_event_past_its_maximum_age_is_discarded_without_an_invocation() {
    let w = world(2, 60, FnInvoker::new(|_, _| respond(json!({}))));
    one_event(&w.shared, EVENT.into(), "m-1", now_unix() - 61.0).await.unwrap();
    assert!(w.calls.lock().unwrap().is_empty());
    let failed = w.failures.sent.lock().unwrap().clone();
    assert_eq!(failed[0]["requestContext"]["condition"], "EventAgeExceeded");
    assert_eq!(failed[0]["requestContext"]["approximateInvokeCount"], 0);
    let dead = w.dead.sent.lock().unwrap().clone();
    assert_eq!((dead[0].0.as_str(), dead[0].1.error_code), (EVENT, None), "never invoked: no error code");
    assert_eq!(w.shared.summary.lock().unwrap().expired, 1);
}

/// A destination that refuses the record (after its own retries) neither fails the event nor
/// sends it round again: the event is settled, its message deleted, the refusal counted.
#[tokio::test(start_paused = true)]
async fn a_destination_that_refuses_does_not_invoke_the_event_again() {
    struct Refusing;
    impl crate::mapping::destination::FailureSink for Refusing {
        fn send<'a>(
            &'a self,
            _record: &'a Value,
            _payload: Option<&'a str>,
            _partition: &'a str,
        ) -> BoxFuture<'a, Result<String, MappingError>> {
            Box::pin(async { Err(MappingError::Destination("no such bus".into())) })
        }
    }
    let mut w = world(0, 21600, FnInvoker::new(|_, _| respond(json!({}))));
    w.shared.on_success = Some(Arc::new(Refusing));
    one_event(&w.shared, EVENT.into(), "m-1", now_unix()).await.unwrap();
    assert_eq!(w.calls.lock().unwrap().len(), 1);
    assert_eq!(*w.queue.deleted.lock().unwrap(), ["m-1"]);
    assert_eq!(w.shared.summary.lock().unwrap().destination_errors, 1);
}

/// Throttled until it is too old: discarded with the throttle as its last error (429).
#[tokio::test(start_paused = true)]
async fn an_event_throttled_until_it_is_too_old_is_discarded_with_the_throttle() {
    let w = world(2, 60, FnInvoker::new(|_, _| throttled()));
    one_event(&w.shared, EVENT.into(), "m-1", now_unix()).await.unwrap();
    let dead = w.dead.sent.lock().unwrap().clone();
    assert_eq!(dead[0].1.error_code, Some(429));
    let failed = w.failures.sent.lock().unwrap().clone();
    assert_eq!(failed[0]["requestContext"]["condition"], "EventAgeExceeded");
    assert_eq!(failed[0]["requestContext"]["approximateInvokeCount"], 0, "a throttle is no invocation");
}

#[test]
fn the_failure_record_is_awss() {
    let event = json!({"Records": [{"s3": {"object": {"key": "k"}}}]});
    let settled = Settled { condition: "RetriesExhausted", attempts: 3, request_id: "r" };
    let error = LastError::Function(Bytes::from_static(br#"{"errorType":"E","errorMessage":"m"}"#));
    let v = record("arn:aws:lambda:us-east-1:0:function:f", &settled, &event, Outcome::Failure(Some(&error)));
    assert_eq!(v["requestContext"]["condition"], "RetriesExhausted");
    assert_eq!(v["requestContext"]["approximateInvokeCount"], 3);
    assert_eq!(v["requestContext"]["functionArn"], "arn:aws:lambda:us-east-1:0:function:f:$LATEST");
    assert_eq!(v["requestPayload"], event);
    assert_eq!(v["responseContext"]["functionError"], "Unhandled");
    assert_eq!(v["responsePayload"]["errorType"], "E");
    assert_eq!(v["version"], "1.0");
    // A failure to invoke is no function error.
    let invoke = LastError::Invoke(Bytes::from_static(b"{}"), 404);
    let v = record("f", &settled, &event, Outcome::Failure(Some(&invoke)));
    assert!(v["responseContext"].get("functionError").is_none(), "{v}");
}

/// AWS: "the retry interval increases from 1 second after the first attempt to a maximum of 5
/// minutes" (invocation-async-error-handling).
#[test]
fn throttles_back_off_from_1_s_to_5_minutes() {
    let s = AsyncSettings::new("f", 2, 21600, None, 1.0).unwrap();
    let waits: Vec<u64> = (1..=12).map(|n| s.throttle_delay(n).as_secs()).collect();
    assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
    assert_eq!(s.throttle_delay(1000).as_secs(), 300);
    let scaled = AsyncSettings::new("f", 2, 21600, None, 0.01).unwrap();
    assert_eq!(scaled.throttle_delay(1), Duration::from_millis(10));
}

#[test]
fn ranges_are_awss_and_the_template_is_read() {
    assert!(AsyncSettings::new("f", 3, 60, None, 1.0).unwrap_err().0.contains("maximumRetryAttempts"));
    assert!(AsyncSettings::new("f", 2, 59, None, 1.0).unwrap_err().0.contains("between 60 and 21600"));
    assert!(AsyncSettings::new("f", 2, 21601, None, 1.0).is_err());
    let s = AsyncSettings::new("f", 2, 60, None, 0.01).unwrap();
    assert_eq!((s.delay(0), s.delay(1)), (Duration::from_millis(600), Duration::from_millis(1200)));
    assert!(s.clone().dead_letter(Some("arn:aws:s3:::b".into())).is_err(), "a queue or a topic");
    // AWS (invocation-async-retain-records): an S3 bucket is an on-failure destination only.
    assert!(s.clone().on_success(Some("arn:aws:s3:::b".into())).is_err());
    assert!(s.clone().on_success(Some("arn:aws:sqs:us-east-1:000000000000:q".into())).is_ok());
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../template.yaml");
    let t = crate::template::Template::load(&path, "pushpull-local", &["PushMaximumRetryAttempts=1".into()]).unwrap();
    let s = AsyncSettings::from_template(&t, "s3-to-kinesis", 1.0).unwrap();
    assert_eq!(s.function_name, "pushpull-local-s3-to-kinesis");
    assert_eq!(s.maximum_retry_attempts, 1);
    assert_eq!(s.maximum_event_age, Duration::from_secs(21600));
    assert_eq!(s.on_failure.as_deref(), Some("arn:aws:sqs:us-east-1:000000000000:pushpull-local-push-failure-queue"));
    assert_eq!((s.on_success, s.dead_letter), (None, None));
}

/// SAM's `DeadLetterQueue` and `EventInvokeConfig.DestinationConfig.OnSuccess`, read.
#[test]
fn the_dead_letter_queue_and_the_success_destination_are_read_from_the_template() {
    let text = r#"
Transform: AWS::Serverless-2016-10-31
Resources:
  Dlq: {Type: AWS::SQS::Queue}
  Ok: {Type: AWS::SQS::Queue}
  Fn:
    Type: AWS::Serverless::Function
    Metadata: {BuildMethod: rust-cargolambda, BuildProperties: {Binary: s3-to-kinesis}}
    Properties:
      FunctionName: f
      CodeUri: ../
      Handler: bootstrap
      Runtime: provided.al2023
      DeadLetterQueue: {Type: SQS, TargetArn: !GetAtt Dlq.Arn}
      EventInvokeConfig:
        DestinationConfig:
          OnSuccess: {Type: SQS, Destination: !GetAtt Ok.Arn}
"#;
    let t = crate::template::Template::parse(text, "s", &[]).unwrap();
    let s = AsyncSettings::from_template(&t, "s3-to-kinesis", 1.0).unwrap();
    assert_eq!(s.dead_letter.as_deref(), Some("arn:aws:sqs:us-east-1:000000000000:s-dlq"));
    assert_eq!(s.on_success.as_deref(), Some("arn:aws:sqs:us-east-1:000000000000:s-ok"));
}
