//! An SQS message as the core's record, the queue as its partition, and the event as AWS writes
//! it (with-sqs.html, "Example standard queue message event"):
//!
//! ```json
//! {"messageId": "059f36b4-...", "receiptHandle": "AQEBwJnKyrHigUMZj6rYigCgxlaS3SLy0a...",
//!  "body": "Test message.",
//!  "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "1545082649183",
//!                 "SenderId": "AIDAIENQZJOLO23YVJ4VO", "ApproximateFirstReceiveTimestamp": "1545082649185"},
//!  "messageAttributes": {"myAttribute": {"stringValue": "myValue", "stringListValues": [],
//!                        "binaryListValues": [], "dataType": "String"}},
//!  "md5OfBody": "e4e68fb7bd0e697a0ae8f1bb342846b3", "eventSource": "aws:sqs",
//!  "eventSourceARN": "arn:aws:sqs:us-east-2:123456789012:my-queue", "awsRegion": "us-east-2"}
//! ```
//!
//! A FIFO queue's records add `SequenceNumber`, `MessageGroupId` and `MessageDeduplicationId` to
//! `attributes` ("For FIFO queues, records contain additional attributes that are related to
//! deduplication and sequencing"). A binary attribute's value is base64 in `binaryValue`; AWS's
//! examples show none, nor `md5OfMessageAttributes`: ours are written as the Java events library
//! (and aws_lambda_events) reads them, `md5OfMessageAttributes` only when the message has
//! attributes.
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, Message, MessageAttributeValue};
use base64::Engine as _;
use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::sync::Notify;
use tracing::warn;

use crate::mapping::MappingError;
use crate::mapping::event::WindowPart;
use crate::mapping::outcome::Condition;
use crate::mapping::progress::WindowCheckpoint;
use crate::mapping::settings::SqsSource;
use crate::mapping::source::{Partition, Record};

/// One received message.
pub(crate) struct SqsRec {
    index: u64,
    /// The poller that received it (its lane).
    pub(crate) poller: usize,
    message_id: String,
    receipt: String,
    body: Bytes,
    /// FIFO: the message group; otherwise the message id.
    key: Vec<u8>,
    /// `SentTimestamp`, unix seconds.
    sent: f64,
    /// When it was received: its visibility timeout runs from here.
    pub(crate) received: f64,
    /// The event's record, as JSON text.
    json: String,
}

impl SqsRec {
    /// The record of `m`, received by `poller` at `received` from `source`.
    pub(crate) fn from_message(index: u64, poller: usize, m: &Message, source: &SqsSource, received: f64) -> Self {
        let attributes: Map<String, Value> = m
            .attributes()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.as_str().to_owned(), Value::from(v.as_str())))
            .collect();
        let message_attributes: Map<String, Value> =
            m.message_attributes().into_iter().flatten().map(|(k, v)| (k.clone(), attribute_json(v))).collect();
        let sent = attributes
            .get("SentTimestamp")
            .and_then(Value::as_str)
            .and_then(|t| t.parse::<f64>().ok())
            .map_or(received, |ms| ms / 1000.0);
        let message_id = m.message_id().unwrap_or_default().to_owned();
        let key = match attributes.get("MessageGroupId").and_then(Value::as_str) {
            Some(g) => g.as_bytes().to_vec(),
            None => message_id.as_bytes().to_vec(),
        };
        let body = m.body().unwrap_or_default();
        let mut record = json!({
            "messageId": message_id,
            "receiptHandle": m.receipt_handle().unwrap_or_default(),
            "body": body,
            "attributes": attributes,
            "messageAttributes": message_attributes,
            "md5OfBody": m.md5_of_body().unwrap_or_default(),
        });
        if let Some(md5) = m.md5_of_message_attributes() {
            record["md5OfMessageAttributes"] = Value::from(md5);
        }
        record["eventSource"] = Value::from("aws:sqs");
        record["eventSourceARN"] = Value::from(source.queue_arn.as_str());
        record["awsRegion"] = Value::from(source.queue_arn.split(':').nth(3).unwrap_or(crate::localstack::REGION));
        SqsRec {
            index,
            poller,
            receipt: m.receipt_handle().unwrap_or_default().to_owned(),
            body: Bytes::copy_from_slice(body.as_bytes()),
            key,
            sent,
            received,
            json: record.to_string(),
            message_id,
        }
    }
}

/// A message attribute as the event writes it: `stringValue` or `binaryValue` (base64), the
/// (unused by SQS) list values, `dataType`.
fn attribute_json(v: &MessageAttributeValue) -> Value {
    let b64 = |b: &aws_sdk_sqs::primitives::Blob| base64::engine::general_purpose::STANDARD.encode(b.as_ref());
    let mut a = Map::new();
    if let Some(s) = v.string_value() {
        a.insert("stringValue".into(), Value::from(s));
    }
    if let Some(b) = v.binary_value() {
        a.insert("binaryValue".into(), Value::from(b64(b)));
    }
    a.insert("stringListValues".into(), json!(v.string_list_values()));
    a.insert("binaryListValues".into(), Value::from(v.binary_list_values().iter().map(b64).collect::<Vec<_>>()));
    a.insert("dataType".into(), Value::from(v.data_type()));
    Value::Object(a)
}

impl Record for SqsRec {
    fn index(&self) -> u64 {
        self.index
    }
    /// A FIFO message's group (its order holds within it); otherwise the message itself.
    fn ordering_key(&self) -> &[u8] {
        &self.key
    }
    fn data(&self) -> &[u8] {
        &self.body
    }
    fn arrival(&self) -> f64 {
        self.sent
    }
    fn position(&self) -> &str {
        &self.message_id
    }
}

/// What one poller holds: messages received and not yet deleted or given back; it receives more
/// only while it holds fewer than a batch.
#[derive(Default)]
pub(crate) struct Slot {
    pub(crate) held: AtomicUsize,
    pub(crate) freed: Notify,
}

/// The mapping's queue as the core's partition: deletions through SQS.
pub(crate) struct SqsPartition {
    pub(crate) client: aws_sdk_sqs::Client,
    pub(crate) source: SqsSource,
    pub(crate) slots: Vec<Slot>,
    /// Deletions SQS refused (an expired receipt handle: the message comes again).
    pub(crate) delete_failures: AtomicUsize,
}

impl SqsPartition {
    fn release(&self, records: &[SqsRec]) {
        for r in records {
            if let Some(s) = self.slots.get(r.poller) {
                s.held.fetch_sub(1, Ordering::SeqCst);
                s.freed.notify_one();
            }
        }
    }
}

/// The event for `records`.
pub(crate) fn event_json(records: &[SqsRec]) -> String {
    crate::mapping::event::records_event(records.iter().map(|r| r.json.as_str()))
}

impl Partition for SqsPartition {
    type Record = SqsRec;

    fn id(&self) -> &str {
        self.source.name()
    }

    fn encoded_len(&self, record: &SqsRec) -> usize {
        record.json.len() + 1
    }

    fn event(&self, records: &[SqsRec], _window: Option<&WindowPart<'_>>) -> String {
        event_json(records)
    }

    fn batch_info(&self, records: &[SqsRec]) -> (&'static str, Value) {
        // SQS mappings have no failure destination (the settings refuse one): named for logs.
        ("SQSBatchInfo", json!({ "queue": self.source.queue_arn, "batchSize": records.len() }))
    }

    /// AWS (services-sqs-errorhandling.html): "The `batchItemFailures` response must include a
    /// list of message IDs, as `itemIdentifier` JSON values"; "An `itemIdentifier` value with a
    /// message ID that doesn't exist" fails the whole batch.
    fn item_index(&self, batch: &[SqsRec], identifier: &Value) -> Result<usize, String> {
        let id = identifier.as_str().ok_or_else(|| format!("itemIdentifier {identifier} is not a message id"))?;
        batch
            .iter()
            .position(|r| r.message_id == id)
            .ok_or_else(|| format!("itemIdentifier {id:?} names no message of the batch"))
    }

    fn failures_stand_alone(&self) -> bool {
        true
    }

    /// AWS (services-sqs-errorhandling.html): "Lambda continues to retry the message until the
    /// message's timestamp exceeds your queue's visibility timeout, at which point Lambda drops
    /// the message" (it comes back: the visibility timeout has run out).
    fn invoke_until(&self, records: &[SqsRec]) -> Option<f64> {
        let timeout = self.source.visibility_timeout.as_secs_f64();
        records.iter().map(|r| r.received + timeout).reduce(f64::min)
    }

    /// AWS (with-sqs-filtering.html): "Amazon SQS event source mappings only support filtering
    /// on the `body` key": the body as JSON if it is JSON, else as its text (a plain-string
    /// pattern; a mismatch of the two drops the message).
    fn filter_fields(&self, record: &SqsRec) -> Map<String, Value> {
        let mut m = Map::new();
        let text = String::from_utf8_lossy(&record.body);
        let body = serde_json::from_str::<Value>(&text).unwrap_or_else(|_| Value::String(text.into_owned()));
        m.insert("body".to_owned(), body);
        m
    }

    /// Deletes them (DeleteMessageBatch, ten at a time). A receipt SQS refuses (expired: the
    /// message was received again) is not an error of the mapping: the message comes again,
    /// at least once as SQS promises.
    async fn done(&self, records: &[SqsRec], _window: Option<WindowCheckpoint>) -> Result<(), MappingError> {
        let result = self.delete(records).await;
        self.release(records);
        result
    }

    /// Given up (the function failed, or could not be invoked in time): left in the queue,
    /// hidden until its visibility timeout runs out; then SQS delivers it again, or its redrive
    /// policy moves it to the dead-letter queue. AWS (with-sqs.html): "all messages in that batch
    /// become visible in the queue again after the visibility timeout expires."
    async fn take_back(&self, records: &[SqsRec], _condition: Condition) -> Result<bool, MappingError> {
        self.release(records);
        Ok(true)
    }

    fn dropped(&self, _count: usize) {}

    async fn fence(&self) -> Result<(), MappingError> {
        Ok(())
    }

    async fn window_closed(&self) -> Result<(), MappingError> {
        Ok(())
    }
}

impl SqsPartition {
    async fn delete(&self, records: &[SqsRec]) -> Result<(), MappingError> {
        for chunk in records.chunks(10) {
            let entries: Vec<DeleteMessageBatchRequestEntry> = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    DeleteMessageBatchRequestEntry::builder().id(i.to_string()).receipt_handle(&r.receipt).build().ok()
                })
                .collect();
            let mut attempt = 0u32;
            let out = 'call: loop {
                match self
                    .client
                    .delete_message_batch()
                    .queue_url(&self.source.queue_url)
                    .set_entries(Some(entries.clone()))
                    .send()
                    .await
                {
                    Ok(out) => break 'call Some(out),
                    Err(e) if attempt < 5 => {
                        attempt += 1;
                        let e = aws_sdk_sqs::error::DisplayErrorContext(e);
                        warn!(queue = self.source.name(), attempt, error = %e, "DeleteMessageBatch failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                    }
                    Err(e) => {
                        // The messages come again after their visibility timeout.
                        let e = aws_sdk_sqs::error::DisplayErrorContext(e);
                        warn!(queue = self.source.name(), messages = chunk.len(), error = %e, "DeleteMessageBatch failed for good; these messages come again");
                        self.delete_failures.fetch_add(chunk.len(), Ordering::SeqCst);
                        break 'call None;
                    }
                }
            };
            // The next chunks are deleted all the same.
            let Some(out) = out else { continue };
            for f in out.failed() {
                let id = f.id().parse::<usize>().ok().and_then(|i| chunk.get(i)).map(|r| r.message_id.as_str());
                warn!(
                    queue = self.source.name(),
                    message = id,
                    code = f.code(),
                    reason = f.message(),
                    "SQS refused a deletion; the message comes again"
                );
                self.delete_failures.fetch_add(1, Ordering::SeqCst);
            }
        }
        Ok(())
    }
}

/// The partition of `source`, with a slot for each of `pollers`.
pub(crate) fn partition(client: aws_sdk_sqs::Client, source: SqsSource, pollers: usize) -> Arc<SqsPartition> {
    Arc::new(SqsPartition {
        client,
        source,
        slots: (0..pollers).map(|_| Slot::default()).collect(),
        delete_failures: AtomicUsize::new(0),
    })
}
