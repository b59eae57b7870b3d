//! SQS batches (feature `sqs`): one handler per message, and the partial batch response by the
//! queue rule (every failed and every unprocessed message listed).
//!
//! FIFO queues (an `eventSourceARN` ending in `.fifo`) keep order per message group: processed
//! in order, the batch stops at the first failure (AWS: "If you're using this feature with a FIFO
//! queue, your function should stop processing messages after the first failure and return all
//! failed and unprocessed messages in batchItemFailures", Lambda developer guide,
//! services-sqs-errorhandling.html); with [`Options::per_key`], groups run concurrently and a
//! failure stops only the rest of its group (what Powertools calls `skip_group_on_error`: other
//! groups' order is not at stake).
//!
//! ```
//! use pushpull::pull::{sqs, Options};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let event = sqs::SqsEvent::from_slice(br#"{"Records":[
//!   {"messageId":"m1","body":"{\"n\":1}","attributes":{"MessageGroupId":"g"},"eventSourceARN":"arn:aws:sqs:us-east-1:1:q.fifo"},
//!   {"messageId":"m2","body":"oops","attributes":{"MessageGroupId":"g"},"eventSourceARN":"arn:aws:sqs:us-east-1:1:q.fifo"},
//!   {"messageId":"m3","body":"{\"n\":3}","attributes":{"MessageGroupId":"g"},"eventSourceARN":"arn:aws:sqs:us-east-1:1:q.fifo"}]}"#).unwrap();
//! #[derive(serde::Deserialize)]
//! struct Msg { n: u32 }
//! let result = sqs::process_async(&event, Options::default(), |message| async move {
//!     let msg: Msg = message.json()?;
//!     assert!(msg.n > 0);
//!     Ok::<_, pushpull::pull::DecodeError>(())
//! })
//! .await
//! .unwrap();
//! // m2 failed; m3 was not reached: both are retried, m1 is deleted.
//! let ids: Vec<_> = result.item_failures().into_iter().map(|f| f.item_identifier).collect();
//! assert_eq!(ids, ["m2", "m3"]);
//! # });
//! ```
use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;

use serde::Deserialize;

use super::{BatchResult, DecodeError, Options, ResponseRule, parse_json};

/// An SQS event: the messages of one batch.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SqsEvent {
    /// The messages.
    #[serde(rename = "Records", default)]
    pub records: Vec<SqsMessage>,
}

/// A payload that is not an SQS event.
#[derive(Debug, thiserror::Error)]
#[error("not an SQS event: {0}")]
pub struct SqsEventError(#[source] serde_json::Error);

impl SqsEvent {
    /// Parses an invocation payload.
    pub fn from_slice(payload: &[u8]) -> Result<Self, SqsEventError> {
        serde_json::from_slice(payload).map_err(SqsEventError)
    }

    /// Whether the messages come from a FIFO queue.
    pub fn is_fifo(&self) -> bool {
        self.records.first().is_some_and(|m| m.event_source_arn.ends_with(".fifo"))
    }
}

/// One message.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct SqsMessage {
    /// The message id: what the response names it by.
    pub message_id: String,
    /// The receipt handle.
    #[serde(default)]
    pub receipt_handle: String,
    /// The body.
    #[serde(default)]
    pub body: String,
    /// System attributes (`ApproximateReceiveCount`, `MessageGroupId`, ...).
    #[serde(default)]
    pub attributes: HashMap<String, String>,
    /// Message attributes, by name.
    #[serde(default)]
    pub message_attributes: HashMap<String, MessageAttribute>,
    /// The queue's ARN.
    #[serde(rename = "eventSourceARN", default)]
    pub event_source_arn: String,
}

/// A message attribute as the event carries it: a string (`String`, `Number` and their custom
/// types) or a binary value in base64.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct MessageAttribute {
    /// `String`, `Number`, `Binary`, or one of those with a custom suffix (`Number.int`).
    #[serde(default)]
    pub data_type: String,
    /// The value of a string or number attribute.
    #[serde(default)]
    pub string_value: Option<String>,
    /// The value of a binary attribute, base64.
    #[serde(default)]
    pub binary_value: Option<String>,
}

impl SqsMessage {
    /// The FIFO message group, if any.
    pub fn message_group_id(&self) -> Option<&str> {
        self.attributes.get("MessageGroupId").map(String::as_str)
    }

    /// The string value of message attribute `name`, if it has one.
    ///
    /// ```
    /// let e = pushpull::pull::sqs::SqsEvent::from_slice(br#"{"Records":[{"messageId":"m1",
    ///     "messageAttributes":{"k":{"stringValue":"v","dataType":"String"}}}]}"#).unwrap();
    /// assert_eq!(e.records[0].attribute_text("k"), Some("v"));
    /// assert_eq!(e.records[0].attribute_text("other"), None);
    /// ```
    pub fn attribute_text(&self, name: &str) -> Option<&str> {
        self.message_attributes.get(name)?.string_value.as_deref()
    }

    /// How many times SQS has delivered it (`ApproximateReceiveCount`; 1 the first time).
    pub fn receive_count(&self) -> Option<u32> {
        self.attributes.get("ApproximateReceiveCount")?.parse().ok()
    }

    /// Deserializes the body as JSON into `T`.
    pub fn json<'a, T: Deserialize<'a>>(&'a self) -> Result<T, DecodeError> {
        parse_json(self.body.as_bytes(), || self.message_id.clone())
    }
}

/// The batch's measures for [`crate::metrics::PullBatch`], before processing: the queue (the
/// dimension), the messages, the oldest message's send time (`SentTimestamp`).
///
/// ```
/// let event = pushpull::pull::sqs::SqsEvent::from_slice(br#"{"Records":[{"messageId":"m1",
///     "eventSourceARN":"arn:aws:sqs:us-east-1:1:jobs","attributes":{"SentTimestamp":"1700000000500"}}]}"#).unwrap();
/// let m = pushpull::pull::sqs::batch_metrics(&event);
/// assert_eq!((m.stream.as_str(), m.batch_size, m.oldest_arrival), ("jobs", 1, Some(1700000000.5)));
/// ```
pub fn batch_metrics(event: &SqsEvent) -> crate::metrics::PullBatch {
    let arn = event.records.first().map_or("", |m| m.event_source_arn.as_str());
    let queue = arn.rsplit(':').next().filter(|q| !q.is_empty()).unwrap_or("unknown");
    let sent = |m: &SqsMessage| m.attributes.get("SentTimestamp")?.parse::<f64>().ok().map(|ms| ms / 1000.0);
    crate::metrics::PullBatch {
        stream: queue.to_owned(),
        batch_size: event.records.len(),
        records_in: event.records.len(),
        processed: 0,
        failed: 0,
        oldest_arrival: event.records.iter().filter_map(sent).reduce(f64::min),
    }
}

fn fifo_options(event: &SqsEvent, mut options: Options) -> Options {
    if event.is_fifo() && options.concurrency() <= 1 {
        options.stop_at_first_failure = true;
    }
    options
}

/// A batch that cannot be answered message by message: a message with an empty `messageId`
/// cannot be named in `batchItemFailures`. AWS's pages do not say what an empty identifier in a
/// response does; what we chose: the invocation fails, so every message of the batch is retried
/// (nothing is deleted that was not handled) and the failure is visible.
#[derive(Debug, thiserror::Error)]
#[error("message {index} of the batch has an empty messageId: it cannot be named in batchItemFailures")]
pub struct SqsPullError {
    /// The message's index in the batch.
    pub index: usize,
}

fn check(event: &SqsEvent) -> Result<(), SqsPullError> {
    match event.records.iter().position(|m| m.message_id.is_empty()) {
        Some(index) => Err(SqsPullError { index }),
        None => Ok(()),
    }
}

fn result_of(event: &SqsEvent, outcomes: super::Outcomes) -> BatchResult {
    let mut result = BatchResult { rule: ResponseRule::Queue, ..Default::default() };
    result.absorb(outcomes, |i| event.records[i].message_id.clone());
    result
}

/// Runs `handler` on each message in order; a FIFO batch stops at the first failure.
pub fn process<F, E>(event: &SqsEvent, options: Options, mut handler: F) -> Result<BatchResult, SqsPullError>
where
    F: FnMut(&SqsMessage) -> Result<(), E>,
    E: Display,
{
    check(event)?;
    let options = fifo_options(event, options);
    let outcomes = super::run_in_order(event.records.len(), &options, |i| handler(&event.records[i]));
    Ok(result_of(event, outcomes))
}

/// Runs an async `handler` on each message: in order, or with [`Options::per_key`] that many
/// message groups at a time (standard queues have no groups: every message is its own key).
pub async fn process_async<F, Fut, E>(
    event: &SqsEvent,
    options: Options,
    handler: F,
) -> Result<BatchResult, SqsPullError>
where
    F: Fn(SqsMessage) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    check(event)?;
    let options = fifo_options(event, options);
    let keys: Vec<&str> = event.records.iter().map(|m| m.message_group_id().unwrap_or(m.message_id.as_str())).collect();
    let handler = &handler;
    let outcomes = super::run_concurrently(&keys, &options, |i| handler(event.records[i].clone())).await;
    Ok(result_of(event, outcomes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(arn: &str, msgs: &[(&str, &str)]) -> SqsEvent {
        let records: Vec<_> = msgs
            .iter()
            .map(|(id, group)| serde_json::json!({"messageId": id, "body": id, "attributes": {"MessageGroupId": group}, "eventSourceARN": arn}))
            .collect();
        SqsEvent::from_slice(serde_json::json!({ "Records": records }).to_string().as_bytes()).unwrap()
    }

    fn ids(r: &BatchResult) -> Vec<String> {
        r.item_failures().into_iter().map(|f| f.item_identifier).collect()
    }

    #[test]
    fn a_standard_queue_lists_only_the_failed_messages() {
        let e = event("arn:aws:sqs:us-east-1:1:q", &[("a", ""), ("b", ""), ("c", "")]);
        let r = process(&e, Options::default(), |m| if m.message_id == "b" { Err("no") } else { Ok(()) }).unwrap();
        assert_eq!(ids(&r), ["b"]);
    }

    #[test]
    fn a_fifo_queue_stops_at_the_first_failure_and_lists_the_rest() {
        let e = event("arn:aws:sqs:us-east-1:1:q.fifo", &[("a", "g1"), ("b", "g2"), ("c", "g1")]);
        let r = process(&e, Options::default(), |m| if m.message_id == "a" { Err("no") } else { Ok(()) }).unwrap();
        assert_eq!(ids(&r), ["a", "b", "c"]);
        assert_eq!(r.processed, 0);
    }

    #[tokio::test]
    async fn fifo_groups_run_concurrently_and_a_failure_stops_only_its_group() {
        let e = event("arn:aws:sqs:us-east-1:1:q.fifo", &[("a", "g1"), ("b", "g2"), ("c", "g1"), ("d", "g2")]);
        let r = process_async(&e, Options::default().per_key(4), |m| async move {
            if m.message_id == "a" { Err("no") } else { Ok(()) }
        })
        .await
        .unwrap();
        assert_eq!(ids(&r), ["a", "c"]);
        assert_eq!(r.processed, 2);
    }

    #[test]
    fn a_message_without_an_id_fails_the_batch_instead_of_answering_an_empty_identifier() {
        let e = event("arn:aws:sqs:us-east-1:1:q", &[("a", ""), ("", ""), ("c", "")]);
        let err = process(&e, Options::default(), |_| Ok::<_, String>(())).unwrap_err();
        assert_eq!(err.index, 1);
        assert!(err.to_string().contains("empty messageId"), "{err}");
    }

    #[test]
    fn not_an_event_is_an_error() {
        assert!(SqsEvent::from_slice(b"[1]").unwrap_err().to_string().starts_with("not an SQS event"));
    }
}
