//! S3 → Lambda locally: S3 notifications arrive in an SQS queue (LocalStack's bucket notifies
//! it), and this plays Lambda's asynchronous invocation: each event is invoked through the
//! Invoke API, retried after a function error up to `MaximumRetryAttempts` (0..2) times, about 1
//! then 2 minutes apart (AWS's spacing, scaled by [`AsyncSettings::delay_scale`] for local use),
//! dropped to the OnFailure destination once retries are exhausted or it is older than
//! `MaximumEventAgeInSeconds` (60..21600), with the failure record AWS writes (the event in
//! `requestPayload`), and to the dead-letter queue (the event as it came, [`dead_letter`]); a
//! success goes to the OnSuccess destination if one is set ([`event`]). A queue message is deleted only once its event succeeded or reached the
//! destination; while it waits its visibility is extended, and if this process dies it comes
//! back (at-least-once, as S3 delivers).
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::types::MessageSystemAttributeName;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::warn;

use crate::invoke::InvokeClient;
use crate::mapping::clock::Instant;
use crate::mapping::destination::{FailureDestination, FailureSink};
use crate::mapping::settings::Destination;
use crate::mapping::{Clients, now_unix};

pub mod dead_letter;
pub mod event;
mod settings;

use dead_letter::{DeadLetter, DeadLetterQueue, DeadLetterTarget};
use event::Shared;
pub use event::{EventQueue, LastError, Outcome, Settled, record};
pub use settings::{AsyncSettings, RETRY_DELAYS};

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
    /// Records a destination or the dead-letter queue refused after its retries (logged; the
    /// event is settled anyway).
    pub destination_errors: u64,
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
    let destination = |arn: &Option<String>| -> Result<Option<Arc<dyn FailureSink>>, DeliveryError> {
        let Some(arn) = arn else { return Ok(None) };
        let d = Destination::from_async_arn(arn).map_err(|e| err(e.to_string()))?;
        let id = format!("async/{}", settings.function_name);
        Ok(Some(Arc::new(FailureDestination::new(d, clients.clone(), id).with_invoker(invoker.clone()))))
    };
    let (on_failure, on_success) = (destination(&settings.on_failure)?, destination(&settings.on_success)?);
    let dead_letter = match &settings.dead_letter {
        Some(arn) => {
            let target = DeadLetterTarget::from_arn(arn).map_err(|e| err(e.to_string()))?;
            Some(Arc::new(DeadLetterQueue::new(target, clients.clone())) as Arc<dyn DeadLetter>)
        }
        None => None,
    };
    let sqs = clients.sqs.clone();
    let shared = Arc::new(Shared {
        settings,
        invoker: Arc::new(invoker),
        queue: Arc::new(SqsQueue { sqs: sqs.clone(), url: queue_url.to_owned() }),
        on_failure,
        on_success,
        dead_letter,
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
        let receive = sqs
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
                && disorder(r, &sqs, queue_url, m).await
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
                let r = event::one_event(&shared, body, &receipt, sent_ms / 1000.0).await;
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

/// The SQS queue the S3 notifications arrive in.
struct SqsQueue {
    sqs: aws_sdk_sqs::Client,
    url: String,
}

impl EventQueue for SqsQueue {
    fn name(&self) -> &str {
        &self.url
    }

    fn hold<'a>(&'a self, receipt: &'a str, seconds: u64) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let req = self.sqs.change_message_visibility().queue_url(&self.url).receipt_handle(receipt);
            req.visibility_timeout(seconds.min(43_200) as i32)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| pushpull::aws::describe(&e))
        })
    }

    fn delete<'a>(&'a self, receipt: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let req = self.sqs.delete_message().queue_url(&self.url).receipt_handle(receipt);
            req.send().await.map(|_| ()).map_err(|e| pushpull::aws::describe(&e))
        })
    }
}

#[cfg(test)]
mod tests;
