//! The SQS sink (feature `sqs-sink`): records into one queue with `SendMessageBatch`, ten
//! messages and at most 1 MiB a call, as SQS takes them.
//!
//! - **Named.** Each message carries the object and line it came from in the message attribute
//!   [`ORIGIN_ATTRIBUTE`] (`<bucket>/<key>@<version>#<line>`, as [`message_id`] writes it), the
//!   same on every resend and every retried invocation: SQS gives each send a new `MessageId`, so
//!   a consumer recognises duplicates by this (a standard queue also delivers "at least once").
//!   The partition key travels in [`PARTITION_KEY_ATTRIBUTE`].
//! - **FIFO** (a queue whose name ends in `.fifo`): the partition key is the `MessageGroupId`
//!   (hashed if longer than SQS's 128 characters), so a key's records keep their order; the
//!   deduplication id is a hash of the message's name, so a resend within SQS's five-minute
//!   deduplication interval is accepted and not delivered twice (a record without a name gets a
//!   random one). A FIFO call's batches go one after another, in order, and none is sent after
//!   one that failed.
//! - **Failures.** An entry SQS refuses as the sender's fault (a body too large, a character SQS
//!   does not take) fails the call, not retryable, naming the line; any other failed entry (and
//!   every entry after it in the call, so that a key's order holds) is reported for resending.
//!
//! ```no_run
//! # async fn f(client: aws_sdk_sqs::Client) -> Result<(), pushpull::sink::SinkError> {
//! use pushpull::sink::sqs::SqsSink;
//! use pushpull::sink::{OutRecord, RecordSink};
//! let sink = SqsSink::connect(client, "orders").await?;
//! let outcome = sink.put_records(&[OutRecord::keyed("customer-7", "{\"total\": 3}")]).await?;
//! assert!(outcome.failed.is_empty());
//! # Ok(())
//! # }
//! ```
use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
use futures_util::StreamExt;

use super::{FailedEntry, OutRecord, PutOutcome, RecordSink, SinkError};

#[doc(inline)]
pub use crate::message_name::{message_id, parse_message_id};

/// The message attribute naming the object and line a message came from.
pub const ORIGIN_ATTRIBUTE: &str = "pushpull-origin";
/// The message attribute holding the record's partition key.
pub const PARTITION_KEY_ATTRIBUTE: &str = "pushpull-partition-key";
/// SQS's largest `SendMessageBatch`: ten entries, and 1 MiB of messages in all (quotas-messages:
/// "The maximum is 1,048,576 bytes (1 MiB)").
pub const MAX_BATCH_ENTRIES: usize = 10;
/// The most bytes of messages (bodies and attributes) one call carries.
pub const MAX_BATCH_BYTES: usize = 1_048_576;
/// Standard-queue calls in flight at once.
const CONCURRENT_CALLS: usize = 8;

/// Records into one SQS queue.
#[derive(Debug, Clone)]
pub struct SqsSink {
    client: aws_sdk_sqs::Client,
    queue_url: String,
    fifo: bool,
}

impl SqsSink {
    /// The sink of `queue` (a name, or a URL): a queue that does not exist is refused here (not
    /// retryable), not at the first record.
    pub async fn connect(client: aws_sdk_sqs::Client, queue: &str) -> Result<Self, SinkError> {
        let queue_url = if queue.starts_with("http://") || queue.starts_with("https://") {
            queue.to_owned()
        } else {
            let out = client.get_queue_url().queue_name(queue).send().await.map_err(|e| {
                let message = format!("SQS queue {queue}: {}", crate::aws::describe(&e));
                SinkError::new(message, crate::aws::classify(&e).is_retryable()).with_source(e)
            })?;
            out.queue_url().unwrap_or_default().to_owned()
        };
        let fifo = queue_url.ends_with(".fifo");
        Ok(SqsSink { client, queue_url, fifo })
    }

    /// The queue's URL.
    pub fn queue_url(&self) -> &str {
        &self.queue_url
    }

    fn entry(&self, index: usize, r: &OutRecord) -> Result<SendMessageBatchRequestEntry, SinkError> {
        let body = std::str::from_utf8(&r.data)
            .ok()
            .filter(|b| !b.is_empty() && b.chars().all(sqs_takes))
            .ok_or_else(|| {
                SinkError::new(
                    format!(
                        "line {}: SQS takes a body of 1 or more characters of #x9 | #xA | #xD | #x20 to #xD7FF | #xE000 to #xFFFD | #x10000 to #x10FFFF",
                        r.line
                    ),
                    false,
                )
            })?;
        let text = |s: &str| MessageAttributeValue::builder().data_type("String").string_value(s).build();
        let mut e = SendMessageBatchRequestEntry::builder()
            .id(index.to_string())
            .message_body(body)
            .message_attributes(PARTITION_KEY_ATTRIBUTE, text(&r.partition_key).map_err(|e| built(r, e))?);
        let name = r.origin.as_ref().map(|o| message_id(o, r.line));
        if let Some(name) = &name {
            e = e.message_attributes(ORIGIN_ATTRIBUTE, text(name).map_err(|e| built(r, e))?);
        }
        if self.fifo {
            e = e.message_group_id(group_id(&r.partition_key));
            // A named record's resend is deduplicated by SQS; a record without a name (a library
            // user's `OutRecord::keyed`) gets an id of its own, never taken for another's.
            let dedup = match name {
                Some(name) => xxhash_rust::xxh3::xxh3_128(name.as_bytes()),
                None => fastrand::u128(..),
            };
            e = e.message_deduplication_id(format!("{dedup:032x}"));
        }
        e.build().map_err(|e| built(r, e))
    }

    /// Sends `chunk` (entries `first..` of the call); the failed ones' indices in the call, with
    /// SQS's code and message.
    async fn send(&self, first: usize, chunk: &[OutRecord]) -> Result<Vec<FailedEntry>, SinkError> {
        let entries = chunk.iter().enumerate().map(|(i, r)| self.entry(first + i, r)).collect::<Result<Vec<_>, _>>()?;
        let out = self
            .client
            .send_message_batch()
            .queue_url(&self.queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| {
            let message = format!("SendMessageBatch to {}: {}", self.queue_url, crate::aws::describe(&e));
            SinkError::new(message, crate::aws::classify(&e).is_retryable()).with_source(e)
        })?;
        let mut failed = Vec::new();
        for f in out.failed() {
            let index = f.id().parse::<usize>().map_err(|_| {
                SinkError::new(
                    format!("SendMessageBatch to {}: an unknown entry id {:?}", self.queue_url, f.id()),
                    true,
                )
            })?;
            if f.sender_fault() {
                let line = chunk.get(index.saturating_sub(first)).map_or(0, |r| r.line);
                return Err(SinkError::new(
                    format!(
                        "line {line}: SQS refused the message for {}: {}: {}",
                        self.queue_url,
                        f.code(),
                        f.message().unwrap_or_default()
                    ),
                    false,
                ));
            }
            failed.push(FailedEntry {
                index,
                code: f.code().to_owned(),
                message: f.message().unwrap_or_default().to_owned(),
            });
        }
        failed.sort_by_key(|f| f.index);
        Ok(failed)
    }
}

fn built(r: &OutRecord, e: aws_sdk_sqs::error::BuildError) -> SinkError {
    SinkError::new(format!("line {}: {e}", r.line), false).with_source(e)
}

/// A character SQS takes in a body (API SendMessage: "#x9 | #xA | #xD | #x20 to #xD7FF | #xE000 to
/// #xFFFD | #x10000 to #x10FFFF").
fn sqs_takes(c: char) -> bool {
    matches!(c, '\u{9}' | '\u{A}' | '\u{D}' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// A `MessageGroupId` for `key`: itself up to SQS's 128 characters of its alphabet, else a hash.
fn group_id(key: &str) -> String {
    let fits = !key.is_empty()
        && key.len() <= 128
        && key.chars().all(|c| c.is_ascii_alphanumeric() || "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~".contains(c));
    if fits { key.to_owned() } else { format!("{:032x}", xxhash_rust::xxh3::xxh3_128(key.as_bytes())) }
}

/// Bytes `r` counts toward a call's 1 MiB: its body and attributes.
fn size(r: &OutRecord) -> usize {
    r.data.len() + r.partition_key.len() + r.origin.as_ref().map_or(0, |o| o.len() + 24) + 64
}

/// Consecutive runs of `records` a call each: at most ten, and at most 1 MiB (a record alone
/// over it goes alone, for SQS to refuse by name).
fn chunks(records: &[OutRecord]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, r) in records.iter().enumerate() {
        let n = size(r);
        if i > start && (i - start == MAX_BATCH_ENTRIES || bytes + n > MAX_BATCH_BYTES) {
            out.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += n;
    }
    if start < records.len() {
        out.push(start..records.len());
    }
    out
}

impl RecordSink for SqsSink {
    /// A failed entry fails those after it in the call; a FIFO call's batches go in order.
    fn keeps_key_order_in_a_call(&self) -> bool {
        true
    }

    /// The push loop names each record's object, for [`ORIGIN_ATTRIBUTE`].
    fn names_records(&self) -> bool {
        true
    }

    async fn put_records(&self, records: &[OutRecord]) -> Result<PutOutcome, SinkError> {
        let ranges = chunks(records);
        let results: Vec<Result<Vec<FailedEntry>, SinkError>> = if self.fifo {
            // One after another, none after a failure: what follows a failed entry is resent
            // after it, in order (sent now, it would enter its group ahead of it).
            let mut results = Vec::new();
            for r in ranges.iter().cloned() {
                let result = self.send(r.start, &records[r]).await;
                let stop = !matches!(&result, Ok(failed) if failed.is_empty());
                results.push(result);
                if stop {
                    break;
                }
            }
            results
        } else {
            let calls: Vec<_> = ranges.iter().cloned().map(|r| self.send(r.start, &records[r])).collect();
            futures_util::stream::iter(calls).buffered(CONCURRENT_CALLS).collect().await
        };
        // The first failure, in call order: it and everything after it are resent.
        let mut first: Option<FailedEntry> = None;
        for (range, result) in ranges.iter().zip(results) {
            match result {
                Ok(failed) => {
                    if let Some(f) = failed.into_iter().next() {
                        first = Some(f);
                        break;
                    }
                }
                Err(e) if !e.retryable => return Err(e),
                Err(e) => {
                    first = Some(FailedEntry { index: range.start, code: "CallFailed".into(), message: e.message });
                    break;
                }
            }
        }
        let mut outcome = PutOutcome::default();
        if let Some(f) = first {
            outcome.failed = (f.index..records.len())
                .map(|index| FailedEntry { index, code: f.code.clone(), message: f.message.clone() })
                .collect();
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: usize) -> OutRecord {
        OutRecord::keyed("k", bytes::Bytes::from(vec![b'x'; n]))
    }

    #[test]
    fn calls_hold_ten_messages_and_one_mib_at_most() {
        let small: Vec<OutRecord> = (0..25).map(|_| rec(10)).collect();
        assert_eq!(chunks(&small), [0..10, 10..20, 20..25]);
        let big: Vec<OutRecord> = (0..5).map(|_| rec(400_000)).collect();
        assert_eq!(chunks(&big), [0..2, 2..4, 4..5]);
        let huge = vec![rec(2_000_000), rec(1)];
        assert_eq!(chunks(&huge), [0..1, 1..2], "alone, for SQS to refuse by name");
        assert!(chunks(&[]).is_empty());
    }

    #[test]
    fn group_ids_are_keys_within_sqss_rules() {
        assert_eq!(group_id("customer-7"), "customer-7");
        let long = "k".repeat(129);
        assert_eq!(group_id(&long).len(), 32);
        assert_eq!(group_id("café").len(), 32, "outside SQS's alphabet: hashed");
        assert_ne!(group_id("a b"), group_id("a_b"));
    }

    proptest::proptest! {
        #[test]
        fn chunks_cover_every_record_once_in_order(sizes in proptest::collection::vec(0usize..600_000, 0..40)) {
            let records: Vec<OutRecord> = sizes.iter().map(|&n| rec(n)).collect();
            let ranges = chunks(&records);
            let mut next = 0;
            for r in &ranges {
                proptest::prop_assert_eq!(r.start, next);
                proptest::prop_assert!(!r.is_empty() && r.len() <= MAX_BATCH_ENTRIES);
                let bytes: usize = records[r.clone()].iter().map(size).sum();
                proptest::prop_assert!(r.len() == 1 || bytes <= MAX_BATCH_BYTES);
                next = r.end;
            }
            proptest::prop_assert_eq!(next, records.len());
        }

        #[test]
        fn bodies_sqs_takes_are_those_of_its_rule(s in "\\PC*") {
            let all_ok = s.chars().all(|c| {
                let u = c as u32;
                u == 9 || u == 10 || u == 13 || (0x20..=0xD7FF).contains(&u) || (0xE000..=0xFFFD).contains(&u) || u >= 0x10000
            });
            proptest::prop_assert_eq!(s.chars().all(sqs_takes), all_ok);
        }
    }
}
