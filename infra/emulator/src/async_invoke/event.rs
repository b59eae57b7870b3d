//! One event's life in the asynchronous invocation queue: invoked, retried after a function
//! error (`MaximumRetryAttempts`, about 1 then 2 minutes apart), waited out when throttled, and
//! settled: a success (to the OnSuccess destination, if any) or a discard (retries exhausted, or
//! older than `MaximumEventAgeInSeconds`: to the OnFailure destination and the dead-letter queue).
//! Its queue message is held while it waits and deleted once it is settled. The queue, the
//! invoker and the destinations are traits, so the rules run as unit tests under paused time.
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::dead_letter::{DeadLetter, DeadLetterError};
use super::{AsyncSettings, AsyncSummary, DeliveryError};
use crate::invoke::Invoker;
use crate::mapping::clock::{Instant, now_unix};
use crate::mapping::destination::FailureSink;
use crate::mapping::outcome::Answer;

/// The queue an event came from, as its delivery uses it.
pub trait EventQueue: Send + Sync + 'static {
    /// Its name, for errors.
    fn name(&self) -> &str;
    /// Keeps the message hidden for `seconds` more (while the event waits for its next attempt).
    fn hold<'a>(&'a self, receipt: &'a str, seconds: u64) -> BoxFuture<'a, Result<(), String>>;
    /// Deletes the message: the event is settled.
    fn delete<'a>(&'a self, receipt: &'a str) -> BoxFuture<'a, Result<(), String>>;
}

/// What every event's delivery shares.
pub(crate) struct Shared {
    pub settings: AsyncSettings,
    pub invoker: Arc<dyn Invoker>,
    pub queue: Arc<dyn EventQueue>,
    /// The OnFailure destination.
    pub on_failure: Option<Arc<dyn FailureSink>>,
    /// The OnSuccess destination.
    pub on_success: Option<Arc<dyn FailureSink>>,
    /// The dead-letter queue.
    pub dead_letter: Option<Arc<dyn DeadLetter>>,
    pub summary: Mutex<AsyncSummary>,
    pub last_activity: Mutex<Instant>,
    pub responses: Option<mpsc::UnboundedSender<(Value, Bytes)>>,
}

impl Shared {
    pub(crate) fn count(&self, f: impl FnOnce(&mut AsyncSummary)) {
        if let Ok(mut s) = self.summary.lock() {
            f(&mut s);
        }
    }

    pub(crate) fn touch(&self) {
        if let Ok(mut t) = self.last_activity.lock() {
            *t = Instant::now();
        }
    }

    fn error(&self, reason: String) -> DeliveryError {
        DeliveryError { queue: self.queue.name().to_owned(), reason }
    }

    fn function_arn(&self) -> String {
        format!(
            "arn:aws:lambda:{}:{}:function:{}",
            crate::localstack::REGION,
            crate::localstack::ACCOUNT,
            self.settings.function_name
        )
    }
}

/// How the last attempt failed: the function's error, or a failure to invoke it at all.
#[derive(Debug, Clone, PartialEq)]
pub enum LastError {
    /// The function answered with an error (`functionError` in the record).
    Function(Bytes),
    /// The function could not be invoked (no `functionError`: it did not run), with the HTTP
    /// status the Invoke API answered.
    Invoke(Bytes, u16),
}

impl LastError {
    fn body(&self) -> &Bytes {
        match self {
            LastError::Function(b) | LastError::Invoke(b, _) => b,
        }
    }

    /// The dead letter's `ErrorCode` ("The HTTP status code": a function error answers 200) and
    /// `ErrorMessage` (the error's `errorMessage`, else its body).
    fn dead_letter(&self, request_id: &str) -> DeadLetterError {
        let code = match self {
            LastError::Function(_) => 200,
            LastError::Invoke(_, status) => *status,
        };
        let body = self.body();
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let message =
            v["errorMessage"].as_str().map_or_else(|| String::from_utf8_lossy(body).into_owned(), str::to_owned);
        DeadLetterError::new(request_id, Some(code), &message)
    }
}

/// Delivers one event (`body`, its queue message `receipt`, queued at `queued_at` unix seconds).
pub(crate) async fn one_event(s: &Shared, body: String, receipt: &str, queued_at: f64) -> Result<(), DeliveryError> {
    let event: Value = serde_json::from_str(&body).unwrap_or_else(|_| Value::from(body.clone()));
    let payload = Bytes::from(body.clone());
    let mut attempts = 0u32;
    let mut throttled = 0u32;
    let mut last_error: Option<LastError> = None;
    let mut request_id = uuid::Uuid::new_v4().to_string();
    loop {
        if now_unix() - queued_at > s.settings.maximum_event_age.as_secs_f64() {
            s.count(|c| c.expired += 1);
            let settled = Settled { condition: "EventAgeExceeded", attempts, request_id: &request_id };
            return discard(s, &event, &body, &settled, last_error.as_ref(), receipt).await;
        }
        // Keep the message hidden for this attempt (and the wait after it).
        let hold = s.settings.delay(attempts).as_secs() + 900 + 60;
        if let Err(e) = s.queue.hold(receipt, hold.min(43_200)).await {
            // The delivery goes on; the message may show again before it settles and be delivered
            // a second time (at least once, as AWS's async invoke is).
            warn!(request_id, error = %e, "could not extend the message's visibility; it may be delivered again meanwhile");
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
                let status = match &e {
                    crate::invoke::InvokeError::Status { status, .. } => *status,
                    crate::invoke::InvokeError::Transport { .. } => 503,
                };
                let error = json!({"errorType": "TooManyRequestsException", "errorMessage": e.to_string()}).to_string();
                last_error = Some(LastError::Invoke(Bytes::from(error), status));
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
                let status = match &e {
                    crate::invoke::InvokeError::Status { status, .. } => *status,
                    crate::invoke::InvokeError::Transport { .. } => 0,
                };
                let error = json!({"errorType": "InvokeError", "errorMessage": e.to_string()}).to_string();
                Err(LastError::Invoke(Bytes::from(error), status))
            }
        };
        attempts += 1;
        s.count(|c| c.invocations += 1);
        let failed = match answer {
            Ok(Answer::Response(response)) => {
                s.count(|c| c.succeeded += 1);
                if let Some(d) = &s.on_success {
                    // AWS's success record: condition "Success", the response as responsePayload.
                    // A destination that refuses it does not make the invocation fail: the event
                    // is done either way, and is not invoked again.
                    let settled = Settled { condition: "Success", attempts, request_id: &request_id };
                    let record = record(&s.function_arn(), &settled, &event, Outcome::Success(&response));
                    if let Err(e) = d.send(&record, None, "").await {
                        s.count(|c| c.destination_errors += 1);
                        warn!(request_id, error = %e, "the OnSuccess destination refused the record; the event is done");
                    }
                }
                if let Some(tx) = &s.responses {
                    let _ = tx.send((event.clone(), response));
                }
                return delete(s, receipt).await;
            }
            Ok(Answer::FunctionError(e)) => LastError::Function(e),
            Err(e) => e,
        };
        warn!(attempt = attempts, error = %String::from_utf8_lossy(failed.body()), "an invocation for an event failed");
        last_error = Some(failed);
        if attempts > s.settings.maximum_retry_attempts {
            s.count(|c| c.retries_exhausted += 1);
            let settled = Settled { condition: "RetriesExhausted", attempts, request_id: &request_id };
            return discard(s, &event, &body, &settled, last_error.as_ref(), receipt).await;
        }
        s.count(|c| c.retries += 1);
        tokio::time::sleep(s.settings.delay(attempts - 1)).await;
    }
}

async fn delete(s: &Shared, receipt: &str) -> Result<(), DeliveryError> {
    s.queue.delete(receipt).await.map_err(|e| s.error(format!("DeleteMessage: {e}")))
}

/// How an event was settled.
pub struct Settled<'a> {
    /// `Success`, `RetriesExhausted` or `EventAgeExceeded`.
    pub condition: &'a str,
    /// Invocations made.
    pub attempts: u32,
    /// The last invocation's request id.
    pub request_id: &'a str,
}

/// What the record says of the last attempt.
pub enum Outcome<'a> {
    /// The function's response.
    Success(&'a Bytes),
    /// The last error, if any attempt was made.
    Failure(Option<&'a LastError>),
}

/// The invocation record AWS sends to an async invocation's destinations: "Lambda passes the
/// invocation record as the Message to the destination" (invocation-async-retain-records).
pub fn record(function_arn: &str, settled: &Settled<'_>, event: &Value, outcome: Outcome<'_>) -> Value {
    let mut response = json!({ "statusCode": 200, "executedVersion": "$LATEST" });
    let payload = match outcome {
        Outcome::Success(body) => Some(body),
        Outcome::Failure(error) => {
            if let Some(LastError::Function(_)) = error {
                response["functionError"] = Value::from("Unhandled");
            }
            error.map(LastError::body)
        }
    };
    let as_json = |b: &Bytes| {
        serde_json::from_slice::<Value>(b).unwrap_or_else(|_| Value::from(String::from_utf8_lossy(b).into_owned()))
    };
    json!({
        "version": "1.0",
        "timestamp": crate::mapping::event::iso8601_millis(now_unix()),
        "requestContext": {
            "requestId": settled.request_id,
            "functionArn": format!("{function_arn}:$LATEST"),
            "condition": settled.condition,
            "approximateInvokeCount": settled.attempts,
        },
        "requestPayload": event,
        "responseContext": response,
        "responsePayload": payload.map(as_json),
    })
}

/// A discarded event: the failure record to the OnFailure destination, the event itself to the
/// dead-letter queue (both, when both are set), then its message deleted.
async fn discard(
    s: &Shared,
    event: &Value,
    body: &str,
    settled: &Settled<'_>,
    error: Option<&LastError>,
    receipt: &str,
) -> Result<(), DeliveryError> {
    let (condition, attempts) = (settled.condition, settled.attempts);
    // A destination that refuses the event (after its retries) loses it, as on AWS, where the
    // event source's DroppedEventCount counts what failed delivery: it is logged and counted, and
    // neither stops the other deliveries nor sends the event round again.
    if let Some(d) = &s.on_failure {
        let record = record(&s.function_arn(), settled, event, Outcome::Failure(error));
        match d.send(&record, None, "").await {
            Ok(at) => info!(condition, attempts, destination = at, "event sent to the failure destination"),
            Err(e) => {
                s.count(|c| c.destination_errors += 1);
                warn!(condition, attempts, error = %e, "the OnFailure destination refused the event: lost");
            }
        }
    }
    if let Some(dlq) = &s.dead_letter {
        let letter = match error {
            Some(e) => e.dead_letter(settled.request_id),
            None => DeadLetterError::new(settled.request_id, None, ""),
        };
        match dlq.send(body, &letter).await {
            Ok(()) => info!(condition, attempts, "event sent to the dead-letter queue"),
            Err(e) => {
                s.count(|c| c.destination_errors += 1);
                warn!(condition, attempts, error = %e, "the dead-letter queue refused the event: lost");
            }
        }
    }
    if s.on_failure.is_none() && s.dead_letter.is_none() {
        warn!(condition, attempts, "event dropped: no failure destination and no dead-letter queue (as AWS does)");
    }
    delete(s, receipt).await
}
