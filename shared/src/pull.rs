//! The pull side: process a Kinesis batch record by record, and answer with the partial batch
//! response exactly as the event source mapping reads it.
//!
//! You write one handler per record; this module decodes (base64 is undone into a reused
//! buffer, [`Record::json`] deserializes into your serde type borrowing from it), captures each
//! record's outcome (a handler error, a decode error, or a panic marks that record failed) and
//! builds the response by AWS's rule: the mapping checkpoints just before the LOWEST sequence
//! number reported and retries every record from there, including ones that succeeded after it.
//! An empty list means the whole batch succeeded. Sequence numbers compare as integers.
//!
//! ```
//! use pushpull::kinesis_event::KinesisEvent;
//! use pushpull::pull::{process_batch, Options};
//!
//! #[derive(serde::Deserialize)]
//! struct Order<'a> { user: &'a str, amount: f64 }
//!
//! let payload = r#"{"Records":[
//!  {"kinesis":{"partitionKey":"a","sequenceNumber":"9","data":"eyJ1c2VyIjoiYSIsImFtb3VudCI6MX0=","approximateArrivalTimestamp":1},"eventID":"shardId-0:9"},
//!  {"kinesis":{"partitionKey":"a","sequenceNumber":"10","data":"bm90IGpzb24=","approximateArrivalTimestamp":1},"eventID":"shardId-0:10"}]}"#;
//! let event: KinesisEvent<'_> = serde_json::from_str(payload).unwrap();
//! let mut total = 0.0;
//! let result = process_batch(&event, Options::default(), |record| {
//!     let order: Order<'_> = record.json()?;   // borrows from the decoded data
//!     assert_eq!(order.user, "a");
//!     total += order.amount;
//!     Ok::<_, pushpull::pull::DecodeError>(())
//! })
//! .unwrap();
//! assert_eq!((result.processed, total), (1, 1.0));
//! let response = serde_json::to_string(&result.response()).unwrap();
//! assert_eq!(response, r#"{"batchItemFailures":[{"itemIdentifier":"10"}]}"#);
//! ```
use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};

use aws_lambda_events::event::streams::{KinesisBatchItemFailure, KinesisEventResponse};
use futures_util::FutureExt;
use serde::{Deserialize, Serialize};

use crate::kinesis_event::{KinesisEvent, KinesisEventRecord, SequenceNumber, SequenceNumberError};

/// One record as a handler sees it: decoded data and where it came from.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    /// Its position in the batch (0-based).
    pub index: usize,
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

/// A record's data is not the JSON the handler expected.
#[derive(Debug, thiserror::Error)]
#[error("record {sequence_number}: not the expected JSON: {source}")]
pub struct DecodeError {
    /// The record's sequence number.
    pub sequence_number: String,
    /// What serde said.
    pub source: serde_json::Error,
}

impl<'a> Record<'a> {
    /// Deserializes the data as JSON into `T`, which may borrow from it.
    pub fn json<T: Deserialize<'a>>(&self) -> Result<T, DecodeError> {
        serde_json::from_slice(self.data)
            .map_err(|source| DecodeError { sequence_number: self.sequence_number.to_string(), source })
    }

    /// An owned copy, for async handlers and tasks.
    pub fn to_owned(&self) -> OwnedRecord {
        OwnedRecord {
            shard_id: self.shard_id.to_owned(),
            sequence_number: self.sequence_number.clone(),
            index: self.index,
            partition_key: self.partition_key.to_owned(),
            arrival: self.arrival,
            data: self.data.to_vec(),
        }
    }
}

/// A record that owns its data: what async handlers receive.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedRecord {
    /// Its position in the batch (0-based).
    pub index: usize,
    /// The shard.
    pub shard_id: String,
    /// The sequence number.
    pub sequence_number: SequenceNumber,
    /// The partition key.
    pub partition_key: String,
    /// Arrival time in Kinesis, seconds since the epoch.
    pub arrival: f64,
    /// The data, base64-decoded.
    pub data: Vec<u8>,
}

impl OwnedRecord {
    /// Deserializes the data as JSON into `T`, which may borrow from it.
    pub fn json<'a, T: Deserialize<'a>>(&'a self) -> Result<T, DecodeError> {
        serde_json::from_slice(&self.data)
            .map_err(|source| DecodeError { sequence_number: self.sequence_number.to_string(), source })
    }
}

/// A record that was not processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Its position in the batch (0-based).
    pub index: usize,
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
    /// Records not handled because an earlier failure stops them (see [`Options`]); the mapping
    /// delivers them again.
    pub not_attempted: usize,
}

impl BatchResult {
    /// The partial batch response: every failed record's sequence number, lowest first. If all
    /// records failed, all are listed, which the mapping reads as "retry the whole batch".
    pub fn response(&self) -> KinesisEventResponse {
        let mut response = KinesisEventResponse::default();
        response.batch_item_failures = self.item_failures();
        response
    }

    /// The `batchItemFailures` entries, lowest sequence number first.
    pub fn item_failures(&self) -> Vec<KinesisBatchItemFailure> {
        let mut failed: Vec<_> = self.failures.iter().map(|f| &f.sequence_number).collect();
        failed.sort_unstable();
        failed.dedup();
        failed
            .into_iter()
            .map(|seq| {
                let mut item = KinesisBatchItemFailure::default();
                item.item_identifier = Some(seq.to_string());
                item
            })
            .collect()
    }

    /// The lowest failed sequence number: where the mapping will resume.
    pub fn lowest_failure(&self) -> Option<&SequenceNumber> {
        self.failures.iter().map(|f| &f.sequence_number).min()
    }
}

/// How a batch is processed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Stop at the first failed record: later records are not handled (the mapping redelivers
    /// them anyway, from the lowest failure on). Use it when handling a record twice costs
    /// (money, or a non-idempotent side effect), or to keep a contiguous processed prefix.
    pub stop_at_first_failure: bool,
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

fn sequence_number(r: &KinesisEventRecord<'_>) -> Result<SequenceNumber, PullError> {
    r.sequence_number().map_err(|source| PullError::SequenceNumber { event_id: r.event_id.to_string(), source })
}

/// A handler's result, or its panic, as the record's outcome.
fn handler_outcome<E: Display>(outcome: std::thread::Result<Result<(), E>>) -> Result<(), String> {
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(format!("handler panicked: {}", panic_message(&panic))),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Runs `handler` on each record in order. A handler error, undecodable base64 data, or a panic
/// in the handler marks that record failed; with [`Options::stop_at_first_failure`] the batch
/// stops there, otherwise it goes on.
pub fn process_batch<F, E>(event: &KinesisEvent<'_>, options: Options, handler: F) -> Result<BatchResult, PullError>
where
    F: FnMut(Record<'_>) -> Result<(), E>,
    E: Display,
{
    process_records(&event.records, options, handler)
}

/// [`process_batch`] on a slice of a batch's records (for example those after a checkpoint).
pub fn process_records<F, E>(
    records: &[KinesisEventRecord<'_>],
    options: Options,
    mut handler: F,
) -> Result<BatchResult, PullError>
where
    F: FnMut(Record<'_>) -> Result<(), E>,
    E: Display,
{
    let mut result = BatchResult::default();
    let mut buf = Vec::new();
    let mut stopped = false;
    for (index, r) in records.iter().enumerate() {
        let seq = sequence_number(r)?;
        if stopped {
            result.not_attempted += 1;
            continue;
        }
        let outcome = match r.decode_data_into(&mut buf) {
            Err(e) => Err(e.to_string()),
            Ok(()) => {
                let record = Record {
                    index,
                    shard_id: r.shard_id(),
                    sequence_number: seq,
                    partition_key: &r.kinesis.partition_key,
                    arrival: r.kinesis.approximate_arrival_timestamp,
                    data: &buf,
                };
                handler_outcome(catch_unwind(AssertUnwindSafe(|| handler(record))))
            }
        };
        match outcome {
            Ok(()) => result.processed += 1,
            Err(reason) => {
                // Parsed again rather than cloned for every record: failures are the exception.
                let sequence_number = sequence_number(r)?;
                result.failures.push(Failure { index, sequence_number, shard_id: r.shard_id().to_owned(), reason });
                stopped = options.stop_at_first_failure;
            }
        }
    }
    Ok(result)
}

/// Runs an async `handler` on each record, up to `concurrency` partition keys at a time and in
/// order within each key. A failure stops the rest of its key's records (they stay in order for
/// the retry), and with [`Options::stop_at_first_failure`] no new record starts after any
/// failure. Panics are caught and fail their record.
///
/// ```
/// use pushpull::kinesis_event::KinesisEvent;
/// use pushpull::pull::{process_batch_concurrently, Options};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let payload = r#"{"Records":[
///  {"kinesis":{"partitionKey":"a","sequenceNumber":"1","data":"e30=","approximateArrivalTimestamp":1},"eventID":"shardId-0:1"},
///  {"kinesis":{"partitionKey":"b","sequenceNumber":"2","data":"e30=","approximateArrivalTimestamp":1},"eventID":"shardId-0:2"}]}"#;
/// let event: KinesisEvent<'_> = serde_json::from_str(payload).unwrap();
/// let result = process_batch_concurrently(&event, Options::default(), 8, |record| async move {
///     if record.partition_key == "b" { Err("b is down") } else { Ok(()) }
/// })
/// .await
/// .unwrap();
/// assert_eq!(result.response().batch_item_failures[0].item_identifier.as_deref(), Some("2"));
/// # });
/// ```
pub async fn process_batch_concurrently<F, Fut, E>(
    event: &KinesisEvent<'_>,
    options: Options,
    concurrency: usize,
    handler: F,
) -> Result<BatchResult, PullError>
where
    F: Fn(OwnedRecord) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    use futures_util::StreamExt;
    use std::sync::atomic::{AtomicBool, Ordering};

    // Group by partition key, keeping each key's records in order, keys in order of first sight.
    let mut order: Vec<&str> = Vec::new();
    let mut by_key: HashMap<&str, Vec<(usize, &KinesisEventRecord<'_>)>> = HashMap::new();
    for (index, r) in event.records.iter().enumerate() {
        sequence_number(r)?;
        let key = &*r.kinesis.partition_key;
        by_key
            .entry(key)
            .or_insert_with(|| {
                order.push(key);
                Vec::new()
            })
            .push((index, r));
    }
    let any_failed = AtomicBool::new(false);
    let (handler, any_failed) = (&handler, &any_failed);
    let per_key = futures_util::stream::iter(order.into_iter().map(|key| {
        let records = by_key.remove(key).unwrap_or_default();
        async move {
            let mut out = BatchResult::default();
            let mut buf = Vec::new();
            let mut stopped = false;
            for (index, r) in records {
                let sequence_number = r.sequence_number().unwrap_or_else(|_| unreachable!("checked above"));
                if stopped || (options.stop_at_first_failure && any_failed.load(Ordering::Acquire)) {
                    out.not_attempted += 1;
                    continue;
                }
                let outcome = match r.decode_data_into(&mut buf) {
                    Err(e) => Err(e.to_string()),
                    Ok(()) => {
                        let record = OwnedRecord {
                            index,
                            shard_id: r.shard_id().to_owned(),
                            sequence_number: sequence_number.clone(),
                            partition_key: r.kinesis.partition_key.to_string(),
                            arrival: r.kinesis.approximate_arrival_timestamp,
                            data: std::mem::take(&mut buf),
                        };
                        handler_outcome(AssertUnwindSafe(handler(record)).catch_unwind().await)
                    }
                };
                match outcome {
                    Ok(()) => out.processed += 1,
                    Err(reason) => {
                        out.failures.push(Failure {
                            index,
                            sequence_number,
                            shard_id: r.shard_id().to_owned(),
                            reason,
                        });
                        any_failed.store(true, Ordering::Release);
                        stopped = true;
                    }
                }
            }
            out
        }
    }))
    .buffer_unordered(concurrency.max(1));
    let results: Vec<BatchResult> = per_key.collect().await;
    let mut result = BatchResult::default();
    for r in results {
        result.processed += r.processed;
        result.not_attempted += r.not_attempted;
        result.failures.extend(r.failures);
    }
    result.failures.sort_by(|a, b| a.sequence_number.cmp(&b.sequence_number));
    Ok(result)
}

/// The most state a tumbling window may carry between invocations (AWS caps it at 1 MB per
/// shard and then ends the window early); [`encode_window_state`] refuses more.
pub const MAX_WINDOW_STATE_BYTES: usize = 1_000_000;

/// Window state that would pass [`MAX_WINDOW_STATE_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "tumbling window state of {size} bytes would exceed the {limit}-byte cap; emit results early or keep less state"
)]
pub struct StateTooLarge {
    /// The encoded size.
    pub size: usize,
    /// The cap.
    pub limit: usize,
}

/// The key under which typed state is kept in the window's string map.
pub const STATE_KEY: &str = "pushpull";

/// Encodes typed window state into the string map the mapping carries, refusing it before it
/// passes the cap.
///
/// ```
/// use pushpull::pull::{decode_window_state, encode_window_state};
/// let state = encode_window_state(&vec![1u32, 2, 3]).unwrap();
/// assert_eq!(decode_window_state::<Vec<u32>>(Some(&state)).unwrap(), vec![1, 2, 3]);
/// assert_eq!(decode_window_state::<Vec<u32>>(None).unwrap(), Vec::<u32>::new());
/// assert!(encode_window_state(&"x".repeat(1_000_001)).is_err());
/// ```
pub fn encode_window_state<T: Serialize>(value: &T) -> Result<HashMap<String, String>, StateTooLarge> {
    let json = serde_json::to_string(value).unwrap_or_default();
    // What the mapping counts is the whole map as JSON: the value escaped, plus the key.
    let size = json.len() + json.bytes().filter(|b| matches!(b, b'"' | b'\\')).count() + STATE_KEY.len() + 8;
    if size > MAX_WINDOW_STATE_BYTES {
        return Err(StateTooLarge { size, limit: MAX_WINDOW_STATE_BYTES });
    }
    Ok(HashMap::from([(STATE_KEY.to_owned(), json)]))
}

/// Decodes typed window state; no state (the window's first invocation) is `T::default()`.
pub fn decode_window_state<T: serde::de::DeserializeOwned + Default>(
    state: Option<&HashMap<String, String>>,
) -> Result<T, serde_json::Error> {
    match state.and_then(|s| s.get(STATE_KEY)) {
        Some(json) => serde_json::from_str(json),
        None => Ok(T::default()),
    }
}

/// The response to a tumbling-window invocation: the state to carry, and the partial batch
/// failures (aws_lambda_events' window response has no `batchItemFailures`). `state` must be
/// present, or the invocation counts as failed.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WindowResponse {
    /// State for the window's next invocation (empty after the final one).
    pub state: HashMap<String, String>,
    /// Failed records, lowest first.
    pub batch_item_failures: Vec<KinesisBatchItemFailure>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seqs: &[(&str, &str)]) -> String {
        event_keys(&seqs.iter().map(|(s, d)| (*s, *d, "k")).collect::<Vec<_>>())
    }

    fn event_keys(seqs: &[(&str, &str, &str)]) -> String {
        let recs: Vec<String> = seqs
            .iter()
            .map(|(seq, data, key)| {
                format!(
                    r#"{{"kinesis":{{"partitionKey":"{key}","sequenceNumber":"{seq}","data":"{data}","approximateArrivalTimestamp":1}},"eventID":"shardId-000000000001:{seq}"}}"#
                )
            })
            .collect();
        format!(r#"{{"Records":[{}]}}"#, recs.join(","))
    }

    fn ids(r: &KinesisEventResponse) -> Vec<&str> {
        r.batch_item_failures.iter().map(|f| f.item_identifier.as_deref().unwrap()).collect()
    }

    const OK: &str = "e30="; // {}
    const BAD: &str = "e30K"; // "{}\n": decodes; the handlers below fail on it by content

    fn all(e: &KinesisEvent<'_>, f: impl FnMut(Record<'_>) -> Result<(), String>) -> BatchResult {
        process_batch(e, Options::default(), f).unwrap()
    }

    #[test]
    fn empty_batch_and_all_success_report_nothing() {
        for e in [event(&[]), event(&[("1", OK), ("2", OK)])] {
            let ev: KinesisEvent<'_> = serde_json::from_str(&e).unwrap();
            let r = all(&ev, |_| Ok(()));
            assert!(r.response().batch_item_failures.is_empty());
            assert_eq!(serde_json::to_string(&r.response()).unwrap(), r#"{"batchItemFailures":[]}"#);
        }
    }

    #[test]
    fn failures_are_listed_lowest_first_compared_as_integers() {
        // "100" < "99" as text; as integers 99 comes first.
        let e = event(&[("99", BAD), ("100", BAD), ("101", OK)]);
        let ev: KinesisEvent<'_> = serde_json::from_str(&e).unwrap();
        let mut r = all(&ev, |rec| if rec.data == b"{}\n" { Err("bad".into()) } else { Ok(()) });
        r.failures.reverse();
        assert_eq!(ids(&r.response()), ["99", "100"]);
        assert_eq!(r.lowest_failure().unwrap().as_str(), "99");
        assert_eq!(r.processed, 1);
        assert_eq!(r.failures[0].shard_id, "shardId-000000000001");
    }

    #[test]
    fn all_failed_lists_every_record() {
        let e = event(&[("1", OK), ("2", OK)]);
        let ev: KinesisEvent<'_> = serde_json::from_str(&e).unwrap();
        assert_eq!(ids(&all(&ev, |_| Err("no".into())).response()), ["1", "2"]);
    }

    #[test]
    fn bad_base64_and_panics_fail_only_their_record() {
        let e = event(&[("1", "!!!"), ("2", OK), ("3", OK)]);
        let ev: KinesisEvent<'_> = serde_json::from_str(&e).unwrap();
        let r = all(&ev, |rec| {
            if rec.sequence_number.as_str() == "3" {
                panic!("boom");
            }
            Ok(())
        });
        assert_eq!(ids(&r.response()), ["1", "3"]);
        assert!(r.failures[0].reason.starts_with("data is not valid base64"));
        assert_eq!(r.failures[1].reason, "handler panicked: boom");
    }

    #[test]
    fn stop_at_first_failure_leaves_the_rest_for_the_retry() {
        let e = event(&[("1", OK), ("2", BAD), ("3", OK), ("4", BAD)]);
        let ev: KinesisEvent<'_> = serde_json::from_str(&e).unwrap();
        let mut seen = Vec::new();
        let r = process_batch(&ev, Options { stop_at_first_failure: true }, |rec| {
            seen.push(rec.sequence_number.to_string());
            if rec.data == b"{}\n" { Err("bad") } else { Ok(()) }
        })
        .unwrap();
        assert_eq!(seen, ["1", "2"]);
        assert_eq!((r.processed, r.not_attempted), (1, 2));
        assert_eq!(ids(&r.response()), ["2"]);
    }

    #[test]
    fn decode_errors_name_the_record() {
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct Order {
            user: String,
        }
        let e = event(&[("7", OK)]);
        let ev: KinesisEvent<'_> = serde_json::from_str(&e).unwrap();
        let r = all(&ev, |rec| rec.json::<Order>().map(|_| ()).map_err(|e| e.to_string()));
        assert!(
            r.failures[0].reason.starts_with("record 7: not the expected JSON: missing field `user`"),
            "{}",
            r.failures[0].reason
        );
    }

    #[test]
    fn an_unparseable_sequence_number_fails_the_invocation() {
        let e = event(&[("1", OK), ("x1", OK)]);
        let ev: KinesisEvent<'_> = serde_json::from_str(&e).unwrap();
        let err = process_batch(&ev, Options::default(), |_| Ok::<_, String>(())).unwrap_err();
        assert!(err.to_string().starts_with("record shardId-000000000001:x1: sequence number \"x1\""), "{err}");
    }

    #[tokio::test]
    async fn concurrent_processing_keeps_order_within_a_key_and_stops_a_key_at_its_failure() {
        let e = event_keys(&[("1", OK, "a"), ("2", OK, "b"), ("3", BAD, "a"), ("4", OK, "a"), ("5", OK, "b")]);
        let ev: KinesisEvent<'_> = serde_json::from_str(&e).unwrap();
        let seen = std::sync::Mutex::new(Vec::new());
        let r = process_batch_concurrently(&ev, Options::default(), 4, |rec| {
            let seen = &seen;
            async move {
                tokio::task::yield_now().await;
                seen.lock().unwrap().push((rec.partition_key.clone(), rec.sequence_number.to_string()));
                if rec.data == b"{}\n" { Err("bad") } else { Ok(()) }
            }
        })
        .await
        .unwrap();
        let seen = seen.into_inner().unwrap();
        let of = |k: &str| seen.iter().filter(|(key, _)| key == k).map(|(_, s)| s.as_str()).collect::<Vec<_>>();
        assert_eq!(of("a"), ["1", "3"], "4 is not attempted after 3 failed");
        assert_eq!(of("b"), ["2", "5"]);
        assert_eq!((r.processed, r.not_attempted), (3, 1));
        assert_eq!(ids(&r.response()), ["3"]);
    }

    #[tokio::test]
    async fn concurrent_panics_fail_their_record() {
        let e = event_keys(&[("1", OK, "a"), ("2", OK, "b")]);
        let ev: KinesisEvent<'_> = serde_json::from_str(&e).unwrap();
        let r = process_batch_concurrently(&ev, Options::default(), 2, |rec| async move {
            if rec.partition_key == "b" {
                panic!("async boom");
            }
            Ok::<_, String>(())
        })
        .await
        .unwrap();
        assert_eq!(ids(&r.response()), ["2"]);
        assert_eq!(r.failures[0].reason, "handler panicked: async boom");
    }

    #[test]
    fn window_response_carries_state_and_failures() {
        let mut r = WindowResponse { state: encode_window_state(&5u32).unwrap(), ..Default::default() };
        let e = event(&[("1", BAD)]);
        let ev: KinesisEvent<'_> = serde_json::from_str(&e).unwrap();
        r.batch_item_failures = all(&ev, |_| Err("x".into())).item_failures();
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"state": {"pushpull": "5"}, "batchItemFailures": [{"itemIdentifier": "1"}]})
        );
    }

    #[test]
    fn window_state_is_refused_before_the_cap() {
        let big: Vec<String> = (0..20_000).map(|i| format!("group-{i:040}")).collect();
        let err = encode_window_state(&big).unwrap_err();
        assert!(err.size > MAX_WINDOW_STATE_BYTES && err.limit == MAX_WINDOW_STATE_BYTES);
        // Escaping counts: quotes inside the value grow the map's JSON.
        let quotes = "\"".repeat(600_000);
        assert!(encode_window_state(&quotes).is_err());
    }

    #[test]
    fn window_events_parse_with_their_fields() {
        let payload = r#"{"Records":[],"window":{"start":"2026-11-24T10:00:00Z","end":"2026-11-24T10:05:00Z"},
            "state":{"pushpull":"7"},"shardId":"shardId-000000000003","eventSourceARN":"arn","isFinalInvokeForWindow":true,"isWindowTerminatedEarly":false}"#;
        let ev: KinesisEvent<'_> = serde_json::from_str(payload).unwrap();
        assert!(ev.is_windowed() && ev.is_final_invoke_for_window);
        assert_eq!(ev.shard(), Some("shardId-000000000003"));
        assert_eq!(decode_window_state::<u32>(ev.state.as_ref()).unwrap(), 7);
    }
}
