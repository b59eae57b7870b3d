//! The pull side: process a Kinesis batch record by record, and answer with the partial batch
//! response exactly as the event source mapping reads it.
//!
//! The rule (see `ReportBatchItemFailures`): the response lists the sequence number of each
//! failed record; the mapping checkpoints just before the LOWEST one listed and retries every
//! record from there, including ones that succeeded after it. An empty list means the whole batch
//! succeeded. [`BatchResult::response`] builds exactly that, lowest first.
//!
//! ```
//! use pushpull::kinesis_event::KinesisEvent;
//! use pushpull::pull::process_batch;
//!
//! let payload = r#"{"Records":[
//!  {"kinesis":{"partitionKey":"a","sequenceNumber":"10","data":"eyJuIjoxfQ==","approximateArrivalTimestamp":1},"eventID":"shardId-0:10"},
//!  {"kinesis":{"partitionKey":"a","sequenceNumber":"9","data":"bm90IGpzb24=","approximateArrivalTimestamp":1},"eventID":"shardId-0:9"}]}"#;
//! let event: KinesisEvent<'_> = serde_json::from_str(payload).unwrap();
//! let result = process_batch(&event, |record| {
//!     serde_json::from_slice::<serde::de::IgnoredAny>(record.data).map(|_| ())
//! })
//! .unwrap();
//! assert_eq!(result.processed, 1);
//! let response = serde_json::to_string(&result.response()).unwrap();
//! assert_eq!(response, r#"{"batchItemFailures":[{"itemIdentifier":"9"}]}"#);
//! ```
use std::fmt::Display;
use std::panic::{AssertUnwindSafe, catch_unwind};

use aws_lambda_events::event::streams::{KinesisBatchItemFailure, KinesisEventResponse};

use crate::kinesis_event::{KinesisEvent, SequenceNumber, SequenceNumberError};

/// One record as a handler sees it: decoded data and where it came from.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    /// The shard.
    pub shard_id: &'a str,
    /// The sequence number.
    pub sequence_number: SequenceNumber,
    /// The partition key.
    pub partition_key: &'a str,
    /// Arrival time in Kinesis, seconds since the epoch.
    pub arrival: f64,
    /// The data, base64-decoded.
    pub data: &'a [u8],
}

/// A record that was not processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Its sequence number (the `itemIdentifier` reported).
    pub sequence_number: SequenceNumber,
    /// Its shard.
    pub shard_id: String,
    /// Why it failed.
    pub reason: String,
}

/// The outcome of a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchResult {
    /// Records handled successfully.
    pub processed: usize,
    /// Records that failed, in the order met.
    pub failures: Vec<Failure>,
}

impl BatchResult {
    /// The partial batch response: every failed record's sequence number, lowest first. If all
    /// records failed, all are listed, which the mapping reads as "retry the whole batch".
    pub fn response(&self) -> KinesisEventResponse {
        let mut failed: Vec<_> = self.failures.iter().map(|f| &f.sequence_number).collect();
        failed.sort_unstable();
        failed.dedup();
        let mut response = KinesisEventResponse::default();
        for seq in failed {
            let mut item = KinesisBatchItemFailure::default();
            item.item_identifier = Some(seq.to_string());
            response.batch_item_failures.push(item);
        }
        response
    }
}

/// The event cannot be processed record by record: the whole invocation must fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PullError {
    /// A record's sequence number is not a number, so it could not be reported.
    #[error("record {event_id}: {source}")]
    SequenceNumber {
        /// The record's eventID.
        event_id: String,
        /// The parse error.
        source: SequenceNumberError,
    },
}

/// Runs `handler` on each record in order. A handler error, undecodable base64 data, or a panic
/// in the handler marks that record failed; the batch goes on.
pub fn process_batch<F, E>(event: &KinesisEvent<'_>, mut handler: F) -> Result<BatchResult, PullError>
where
    F: FnMut(Record<'_>) -> Result<(), E>,
    E: Display,
{
    let mut result = BatchResult::default();
    let mut buf = Vec::new();
    for r in &event.records {
        let sequence_number = r
            .sequence_number()
            .map_err(|source| PullError::SequenceNumber { event_id: r.event_id.to_string(), source })?;
        let fail = |reason: String| Failure {
            sequence_number: sequence_number.clone(),
            shard_id: r.shard_id().to_owned(),
            reason,
        };
        if let Err(e) = r.decode_data_into(&mut buf) {
            result.failures.push(fail(e.to_string()));
            continue;
        }
        let record = Record {
            shard_id: r.shard_id(),
            sequence_number: sequence_number.clone(),
            partition_key: &r.kinesis.partition_key,
            arrival: r.kinesis.approximate_arrival_timestamp,
            data: &buf,
        };
        match catch_unwind(AssertUnwindSafe(|| handler(record))) {
            Ok(Ok(())) => result.processed += 1,
            Ok(Err(e)) => result.failures.push(fail(e.to_string())),
            Err(panic) => result.failures.push(fail(format!("handler panicked: {}", panic_message(&panic)))),
        }
    }
    Ok(result)
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seqs: &[(&str, &str)]) -> String {
        let recs: Vec<String> = seqs
            .iter()
            .map(|(seq, data)| {
                format!(
                    r#"{{"kinesis":{{"partitionKey":"k","sequenceNumber":"{seq}","data":"{data}","approximateArrivalTimestamp":1}},"eventID":"shardId-000000000001:{seq}"}}"#
                )
            })
            .collect();
        format!(r#"{{"Records":[{}]}}"#, recs.join(","))
    }

    fn ids(r: &KinesisEventResponse) -> Vec<&str> {
        r.batch_item_failures.iter().map(|f| f.item_identifier.as_deref().unwrap()).collect()
    }

    const OK: &str = "e30="; // {}
    const BAD: &str = "e30K"; // "{}\n" decodes fine; the handler below fails on it by content

    #[test]
    fn empty_batch_and_all_success_report_nothing() {
        let e = event(&[]);
        let ev: KinesisEvent<'_> = serde_json::from_str(&e).unwrap();
        let r = process_batch(&ev, |_| Ok::<_, String>(())).unwrap();
        assert!(r.response().batch_item_failures.is_empty());
        assert_eq!(serde_json::to_string(&r.response()).unwrap(), r#"{"batchItemFailures":[]}"#);
    }

    #[test]
    fn failures_are_listed_lowest_first_compared_as_integers() {
        // "100" < "99" as text; as integers 99 comes first.
        let e = event(&[("99", BAD), ("100", BAD), ("101", OK)]);
        let ev: KinesisEvent<'_> = serde_json::from_str(&e).unwrap();
        let mut r = process_batch(&ev, |rec| if rec.data == b"{}\n" { Err("bad") } else { Ok(()) }).unwrap();
        r.failures.reverse();
        assert_eq!(ids(&r.response()), ["99", "100"]);
        assert_eq!(r.processed, 1);
        assert_eq!(r.failures[0].shard_id, "shardId-000000000001");
    }

    #[test]
    fn all_failed_lists_every_record() {
        let e = event(&[("1", OK), ("2", OK)]);
        let ev: KinesisEvent<'_> = serde_json::from_str(&e).unwrap();
        let r = process_batch(&ev, |_| Err("no")).unwrap();
        assert_eq!(ids(&r.response()), ["1", "2"]);
    }

    #[test]
    fn bad_base64_and_panics_fail_only_their_record() {
        let e = event(&[("1", "!!!"), ("2", OK), ("3", OK)]);
        let ev: KinesisEvent<'_> = serde_json::from_str(&e).unwrap();
        let r = process_batch(&ev, |rec| {
            if rec.sequence_number.as_str() == "3" {
                panic!("boom");
            }
            Ok::<_, String>(())
        })
        .unwrap();
        assert_eq!(ids(&r.response()), ["1", "3"]);
        assert!(r.failures[0].reason.starts_with("data is not valid base64"));
        assert_eq!(r.failures[1].reason, "handler panicked: boom");
    }

    #[test]
    fn an_unparseable_sequence_number_fails_the_invocation() {
        let e = event(&[("1", OK), ("x1", OK)]);
        let ev: KinesisEvent<'_> = serde_json::from_str(&e).unwrap();
        let err = process_batch(&ev, |_| Ok::<_, String>(())).unwrap_err();
        assert!(err.to_string().starts_with("record shardId-000000000001:x1: sequence number \"x1\""), "{err}");
    }
}
