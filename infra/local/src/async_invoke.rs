//! S3 → Lambda locally: S3 notifications arrive in an SQS queue (LocalStack's bucket notifies
//! it), and this plays Lambda's asynchronous invocation: each event is invoked through the
//! Invoke API, retried after a function error up to `MaximumRetryAttempts` (0..2) times, about 1
//! then 2 minutes apart (AWS's spacing, scaled by [`AsyncSettings::delay_scale`] for local use),
//! dropped to the OnFailure destination once retries are exhausted or it is older than
//! `MaximumEventAgeInSeconds` (60..21600), with the failure record AWS writes (the event in
//! `requestPayload`). A queue message is deleted only once its event succeeded or reached the
//! destination; while it waits its visibility is extended, and if this process dies it comes
//! back (at-least-once, as S3 delivers).
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::MessageSystemAttributeName;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::{info, warn};

use crate::invoke::InvokeClient;
use crate::mapping::outcome::Answer;
use crate::mapping::settings::InvalidSetting;
use crate::mapping::{Clients, now_unix};
use crate::template::{Template, TemplateError, scalar};

/// AWS's spacing of the two retries after a function error (about 1 and 2 minutes).
pub const RETRY_DELAYS: [Duration; 2] = [Duration::from_secs(60), Duration::from_secs(120)];

/// The function's `EventInvokeConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct AsyncSettings {
    /// The function to invoke.
    pub function_name: String,
    /// 0..=2 retries after a function error.
    pub maximum_retry_attempts: u32,
    /// 60..=21600 s in the queue, then the event goes to the destination unprocessed.
    pub maximum_event_age: Duration,
    /// OnFailure destination: an SQS queue ARN.
    pub on_failure: Option<String>,
    /// Multiplies [`RETRY_DELAYS`] (1.0 is AWS; 0.01 turns minutes into about a second).
    pub delay_scale: f64,
}

impl AsyncSettings {
    /// Checks the ranges AWS enforces (`PutFunctionEventInvokeConfig`).
    pub fn new(
        function_name: &str,
        retries: i64,
        max_age: i64,
        on_failure: Option<String>,
        delay_scale: f64,
    ) -> Result<Self, InvalidSetting> {
        let bad = |v: i64, f: &str, rule: &str| {
            InvalidSetting(format!(
                "1 validation error detected: Value '{v}' at '{f}' failed to satisfy constraint: {rule}"
            ))
        };
        if !(0..=2).contains(&retries) {
            return Err(bad(retries, "maximumRetryAttempts", "Member must be between 0 and 2"));
        }
        if !(60..=21600).contains(&max_age) {
            return Err(bad(max_age, "maximumEventAgeInSeconds", "Member must be between 60 and 21600"));
        }
        // AWS allows an SQS queue, SNS topic, S3 bucket, Lambda function or EventBridge bus.
        if let Some(arn) = &on_failure {
            crate::mapping::settings::Destination::from_async_arn(arn)?;
        }
        if !(delay_scale.is_finite() && delay_scale >= 0.0) {
            return Err(InvalidSetting(format!("retry delay scale {delay_scale} must be a number >= 0")));
        }
        Ok(AsyncSettings {
            function_name: function_name.to_owned(),
            maximum_retry_attempts: retries as u32,
            maximum_event_age: Duration::from_secs(max_age as u64),
            on_failure,
            delay_scale,
        })
    }

    /// From the `EventInvokeConfig` of the function built from `binary` in the template
    /// (AWS's defaults where it says nothing: 2 retries, 6 hours).
    pub fn from_template(t: &Template, binary: &str, delay_scale: f64) -> Result<Self, TemplateError> {
        let f = t.functions()?.into_iter().find(|f| f.binary == binary).ok_or_else(|| TemplateError::Resolve {
            at: "Resources".into(),
            reason: format!("no function builds {binary}"),
        })?;
        let props = t.resolve(&t.resources[&f.logical_id]["Properties"], &f.logical_id)?;
        let cfg = &props["EventInvokeConfig"];
        let int = |k: &str, d: i64| cfg.get(k).and_then(scalar).and_then(|s| s.parse().ok()).unwrap_or(d);
        let dest = cfg.pointer("/DestinationConfig/OnFailure/Destination").and_then(scalar);
        AsyncSettings::new(
            &f.name,
            int("MaximumRetryAttempts", 2),
            int("MaximumEventAgeInSeconds", 21600),
            dest,
            delay_scale,
        )
        .map_err(|e| TemplateError::Resolve {
            at: format!("{}.EventInvokeConfig", f.logical_id),
            reason: e.to_string(),
        })
    }

    /// The wait after the `n`th throttle (or 5xx) in a row: AWS's 1 s doubling up to 5 minutes,
    /// times the delay scale.
    pub fn throttle_delay(&self, n: u32) -> Duration {
        let exponent = n.saturating_sub(1).min(16);
        Duration::from_secs(1).saturating_mul(1 << exponent).min(Duration::from_secs(300)).mul_f64(self.delay_scale)
    }

    fn delay(&self, retry: u32) -> Duration {
        RETRY_DELAYS[(retry as usize).min(1)].mul_f64(self.delay_scale)
    }
}

/// What the delivery did.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq)]
pub struct AsyncSummary {
    /// Events taken from the queue.
    pub events: u64,
    /// Invocations, retries included.
    pub invocations: u64,
    /// Events the function accepted.
    pub succeeded: u64,
    /// Retries after function errors.
    pub retries: u64,
    /// Events sent to the destination after their retries.
    pub retries_exhausted: u64,
    /// Events sent to the destination because they were too old.
    pub expired: u64,
    /// Invocations throttled (429) or failed on Lambda's side (5xx), waited out with backoff.
    pub throttled: u64,
    /// Other failures to invoke (4xx), counted as failed attempts.
    pub invoke_errors: u64,
}

/// Options beyond the function's settings.
#[derive(Debug, Clone)]
pub struct DeliveryOptions {
    /// Events invoked at once (Lambda scales async invokes out).
    pub concurrency: usize,
    /// Stop once the queue was empty and nothing ran for this long.
    pub stop_when_idle: Option<Duration>,
    /// Each successful invocation's event and response, for whoever runs this.
    pub responses: Option<mpsc::UnboundedSender<(Value, Bytes)>>,
    /// Events duplicated and delivered out of order at its rates (AWS: async invoke is at least
    /// once and not ordered).
    pub realism: Option<Arc<crate::realism::Realism>>,
}

impl Default for DeliveryOptions {
    fn default() -> Self {
        DeliveryOptions { concurrency: 4, stop_when_idle: None, responses: None, realism: None }
    }
}

/// The delivery stopped on an error it cannot ride out.
#[derive(Debug, thiserror::Error)]
#[error("S3 event delivery from {queue}: {reason}")]
pub struct DeliveryError {
    /// The queue.
    pub queue: String,
    /// Why.
    pub reason: String,
}

struct Shared {
    settings: AsyncSettings,
    clients: Clients,
    invoker: InvokeClient,
    queue_url: String,
    /// The OnFailure destination (the mapping's sender: SQS or SNS here).
    destination: Option<crate::mapping::destination::FailureDestination>,
    summary: Mutex<AsyncSummary>,
    last_activity: Mutex<Instant>,
    responses: Option<mpsc::UnboundedSender<(Value, Bytes)>>,
}

impl Shared {
    fn count(&self, f: impl FnOnce(&mut AsyncSummary)) {
        if let Ok(mut s) = self.summary.lock() {
            f(&mut s);
        }
    }
    fn touch(&self) {
        if let Ok(mut t) = self.last_activity.lock() {
            *t = Instant::now();
        }
    }
}

/// The realism layer's S3 event faults: a duplicate put back in the queue (delivered again
/// later), or the event itself put back with a delay and taken off now (delivered after events
/// that came later). Returns whether the event was put back instead of being delivered now.
async fn disorder(
    r: &crate::realism::Realism,
    sqs: &aws_sdk_sqs::Client,
    queue_url: &str,
    m: &aws_sdk_sqs::types::Message,
) -> bool {
    let rates = &r.config().rates;
    let body = m.body().unwrap_or_default();
    let again = |delay: i32| sqs.send_message().queue_url(queue_url).message_body(body).delay_seconds(delay).send();
    if r.fire("s3.event.reordered", rates.s3_reorder) {
        let delay = 1 + (r.draw("s3.event.reordered.delay") * 4.0) as i32;
        match again(delay).await {
            Ok(_) => {
                let receipt = m.receipt_handle().unwrap_or_default();
                if let Err(e) = sqs.delete_message().queue_url(queue_url).receipt_handle(receipt).send().await {
                    // Left in the queue, it comes back after its visibility timeout: a duplicate.
                    warn!(error = %pushpull::aws::describe(&e), "realism: a held-back event's original could not be deleted");
                }
                return true;
            }
            Err(e) => warn!(error = %pushpull::aws::describe(&e), "realism: could not hold an event back"),
        }
    }
    if r.fire("s3.event.duplicated", rates.s3_duplicate) {
        let delay = (r.draw("s3.event.duplicated.delay") * 3.0) as i32;
        if let Err(e) = again(delay).await {
            warn!(error = %pushpull::aws::describe(&e), "realism: could not duplicate an event");
        }
    }
    false
}

/// Delivers the S3 events of `queue_url` to the function until `stop` (or idle).
pub async fn deliver(
    settings: AsyncSettings,
    clients: Clients,
    invoker: InvokeClient,
    queue_url: &str,
    options: DeliveryOptions,
    mut stop: watch::Receiver<bool>,
) -> Result<AsyncSummary, DeliveryError> {
    let err = |reason: String| DeliveryError { queue: queue_url.to_owned(), reason };
    let destination = match &settings.on_failure {
        Some(arn) => {
            let d = crate::mapping::settings::Destination::from_async_arn(arn).map_err(|e| err(e.to_string()))?;
            let id = format!("async/{}", settings.function_name);
            Some(
                crate::mapping::destination::FailureDestination::new(d, clients.clone(), id)
                    .with_invoker(invoker.clone()),
            )
        }
        None => None,
    };
    let shared = Arc::new(Shared {
        settings,
        clients,
        invoker,
        queue_url: queue_url.to_owned(),
        destination,
        summary: Mutex::new(AsyncSummary::default()),
        last_activity: Mutex::new(Instant::now()),
        responses: options.responses.clone(),
    });
    let slots = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        if *stop.borrow() {
            break;
        }
        if let Some(idle) = options.stop_when_idle {
            let quiet = shared.last_activity.lock().map(|t| t.elapsed() >= idle).unwrap_or(false);
            if quiet && slots.available_permits() == options.concurrency.max(1) {
                break;
            }
        }
        let Ok(permit) = slots.clone().acquire_many_owned(1).await else { break };
        let free = slots.available_permits() + 1;
        let receive = shared
            .clients
            .sqs
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(free.min(10) as i32)
            .wait_time_seconds(1)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .send();
        let got = tokio::select! {
            r = receive => r.map_err(|e| err(format!("ReceiveMessage: {}", pushpull::aws::describe(&e))))?,
            _ = stop.changed() => break,
        };
        drop(permit);
        for m in got.messages() {
            if let Some(r) = &options.realism
                && disorder(r, &shared.clients.sqs, queue_url, m).await
            {
                continue;
            }
            let Ok(permit) = slots.clone().acquire_owned().await else { break };
            shared.touch();
            shared.count(|s| s.events += 1);
            let sent_ms = m
                .attributes()
                .and_then(|a| a.get(&MessageSystemAttributeName::SentTimestamp))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| now_unix() * 1000.0);
            let (body, receipt) =
                (m.body().unwrap_or_default().to_owned(), m.receipt_handle().unwrap_or_default().to_owned());
            let shared = shared.clone();
            tasks.spawn(async move {
                let r = one_event(&shared, body, &receipt, sent_ms / 1000.0).await;
                shared.touch();
                drop(permit);
                r
            });
        }
        while let Some(done) = tasks.try_join_next() {
            done.map_err(|e| err(e.to_string()))??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| err(e.to_string()))??;
    }
    let summary = shared.summary.lock().map(|s| s.clone()).unwrap_or_default();
    Ok(summary)
}

async fn one_event(s: &Shared, body: String, receipt: &str, queued_at: f64) -> Result<(), DeliveryError> {
    let event: Value = serde_json::from_str(&body).unwrap_or_else(|_| Value::from(body.clone()));
    let payload = Bytes::from(body);
    let mut attempts = 0u32;
    let mut throttled = 0u32;
    let mut last_error: Option<LastError> = None;
    let mut request_id = uuid::Uuid::new_v4().to_string();
    loop {
        if now_unix() - queued_at > s.settings.maximum_event_age.as_secs_f64() {
            s.count(|c| c.expired += 1);
            return to_destination(s, &event, "EventAgeExceeded", attempts, &request_id, last_error.as_ref(), receipt)
                .await;
        }
        // Keep the message hidden for this attempt (and the wait after it).
        let hold = s.settings.delay(attempts).as_secs() + 900 + 60;
        if let Err(e) = s
            .clients
            .sqs
            .change_message_visibility()
            .queue_url(&s.queue_url)
            .receipt_handle(receipt)
            .visibility_timeout(hold.min(43_200) as i32)
            .send()
            .await
        {
            // The delivery goes on; the message may show again before it settles and be delivered
            // a second time (at least once, as AWS's async invoke is).
            warn!(request_id, error = %pushpull::aws::describe(&e), "could not extend the message's visibility; it may be delivered again meanwhile");
        }
        let answer: Result<Answer, LastError> = match s.invoker.invoke(&s.settings.function_name, payload.clone()).await
        {
            Ok(invoked) => {
                throttled = 0;
                request_id = invoked.request_id.clone();
                Ok(invoked.answer)
            }
            Err(e) if e.is_throttle() => {
                // AWS (invocation-async-error-handling): "For throttling errors (429) and system
                // errors (500-series), Lambda returns the event to the queue and attempts to run
                // the function again for up to 6 hours, with exponentially increasing backoff:
                // the retry interval increases from 1 second after the first attempt to a
                // maximum of 5 minutes." No retry is used up; the event's age still counts.
                throttled += 1;
                let wait = s.settings.throttle_delay(throttled);
                warn!(error = %e, wait_ms = wait.as_millis() as u64, "invoke throttled or failed on Lambda's side; retrying");
                s.count(|c| c.throttled += 1);
                tokio::time::sleep(wait).await;
                continue;
            }
            Err(e) => {
                // Any other failure to invoke (a 4xx such as 404 or 413) is not the function's
                // answer; AWS does not say what its queue does with one. We take it as a failed
                // attempt (retried as MaximumRetryAttempts says, then the destination with the
                // error as responsePayload, without functionError); this event's failure never
                // stops the others.
                s.count(|c| c.invoke_errors += 1);
                let error = json!({"errorType": "InvokeError", "errorMessage": e.to_string()}).to_string();
                Err(LastError::Invoke(Bytes::from(error)))
            }
        };
        attempts += 1;
        s.count(|c| c.invocations += 1);
        let failed = match answer {
            Ok(Answer::Response(response)) => {
                s.count(|c| c.succeeded += 1);
                if let Some(tx) = &s.responses {
                    let _ = tx.send((event.clone(), response));
                }
                return delete(s, receipt).await;
            }
            Ok(Answer::FunctionError(e)) => LastError::Function(e),
            Err(e) => e,
        };
        warn!(attempt = attempts, error = %String::from_utf8_lossy(failed.body()), "an invocation for an S3 event failed");
        last_error = Some(failed);
        if attempts > s.settings.maximum_retry_attempts {
            s.count(|c| c.retries_exhausted += 1);
            return to_destination(s, &event, "RetriesExhausted", attempts, &request_id, last_error.as_ref(), receipt)
                .await;
        }
        s.count(|c| c.retries += 1);
        tokio::time::sleep(s.settings.delay(attempts - 1)).await;
    }
}

async fn delete(s: &Shared, receipt: &str) -> Result<(), DeliveryError> {
    s.clients.sqs.delete_message().queue_url(&s.queue_url).receipt_handle(receipt).send().await.map(|_| ()).map_err(
        |e| DeliveryError {
            queue: s.queue_url.clone(),
            reason: format!("DeleteMessage: {}", pushpull::aws::describe(&e)),
        },
    )
}

/// How the last attempt failed: the function's error, or a failure to invoke it at all.
#[derive(Debug, Clone, PartialEq)]
pub enum LastError {
    /// The function answered with an error (`functionError` in the record).
    Function(Bytes),
    /// The function could not be invoked (no `functionError`: it did not run).
    Invoke(Bytes),
}

impl LastError {
    fn body(&self) -> &Bytes {
        match self {
            LastError::Function(b) | LastError::Invoke(b) => b,
        }
    }
}

/// The record AWS sends to an async invocation's OnFailure destination.
pub fn async_failure_record(
    function_arn: &str,
    request_id: &str,
    condition: &str,
    attempts: u32,
    event: &Value,
    error: Option<&LastError>,
) -> Value {
    let mut response = json!({ "statusCode": 200, "executedVersion": "$LATEST" });
    if let Some(LastError::Function(_)) = error {
        response["functionError"] = Value::from("Unhandled");
    }
    let error = error.map(LastError::body);
    json!({
        "version": "1.0",
        "timestamp": crate::mapping::event::iso8601_millis(now_unix()),
        "requestContext": {
            "requestId": request_id,
            "functionArn": format!("{function_arn}:$LATEST"),
            "condition": condition,
            "approximateInvokeCount": attempts,
        },
        "requestPayload": event,
        "responseContext": response,
        "responsePayload": error.map(|e| serde_json::from_slice::<Value>(e).unwrap_or_else(|_| Value::from(String::from_utf8_lossy(e).into_owned()))),
    })
}

async fn to_destination(
    s: &Shared,
    event: &Value,
    condition: &str,
    attempts: u32,
    request_id: &str,
    error: Option<&LastError>,
    receipt: &str,
) -> Result<(), DeliveryError> {
    let function_arn = format!(
        "arn:aws:lambda:{}:{}:function:{}",
        crate::localstack::REGION,
        crate::localstack::ACCOUNT,
        s.settings.function_name
    );
    let record = async_failure_record(&function_arn, request_id, condition, attempts, event, error);
    match &s.destination {
        Some(d) => {
            let at = d
                .send(&record, None, "")
                .await
                .map_err(|e| DeliveryError { queue: s.queue_url.clone(), reason: e.to_string() })?;
            info!(condition, attempts, destination = at, "S3 event sent to the failure destination");
        }
        None => warn!(condition, attempts, "S3 event dropped: no failure destination (as AWS does)"),
    }
    delete(s, receipt).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS: "the retry interval increases from 1 second after the first attempt to a maximum of
    /// 5 minutes" (invocation-async-error-handling).
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
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../template.yaml");
        let t = Template::load(&path, "pushpull-local", &["PushMaximumRetryAttempts=1".into()]).unwrap();
        let s = AsyncSettings::from_template(&t, "s3-to-kinesis", 1.0).unwrap();
        assert_eq!(s.function_name, "pushpull-local-s3-to-kinesis");
        assert_eq!(s.maximum_retry_attempts, 1);
        assert_eq!(s.maximum_event_age, Duration::from_secs(21600));
        assert_eq!(
            s.on_failure.as_deref(),
            Some("arn:aws:sqs:us-east-1:000000000000:pushpull-local-push-failure-queue")
        );
    }

    #[test]
    fn the_failure_record_is_awss() {
        let event = json!({"Records": [{"s3": {"object": {"key": "k"}}}]});
        let v = async_failure_record(
            "arn:aws:lambda:us-east-1:0:function:f",
            "r",
            "RetriesExhausted",
            3,
            &event,
            Some(&LastError::Function(Bytes::from_static(br#"{"errorType":"E","errorMessage":"m"}"#))),
        );
        assert_eq!(v["requestContext"]["condition"], "RetriesExhausted");
        assert_eq!(v["requestContext"]["approximateInvokeCount"], 3);
        assert_eq!(v["requestContext"]["functionArn"], "arn:aws:lambda:us-east-1:0:function:f:$LATEST");
        assert_eq!(v["requestPayload"], event);
        assert_eq!(v["responseContext"]["functionError"], "Unhandled");
        assert_eq!(v["responsePayload"]["errorType"], "E");
        assert_eq!(v["version"], "1.0");
        // A failure to invoke is no function error.
        let v = async_failure_record(
            "f",
            "r",
            "RetriesExhausted",
            1,
            &event,
            Some(&LastError::Invoke(Bytes::from_static(b"{}"))),
        );
        assert!(v["responseContext"].get("functionError").is_none(), "{v}");
    }
}
