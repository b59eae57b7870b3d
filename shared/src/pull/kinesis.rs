//! Kinesis batches (feature `kinesis`): one handler per record, the partial batch response by
//! the stream rule, and tumbling-window state.
//!
//! Records reach a synchronous handler borrowed from the payload (base64 undone into one reused
//! buffer; [`Record::json`] deserializes into your serde type borrowing from it), and an async
//! handler as an [`OwnedRecord`]. A record that does not decode, a handler error, a parse error
//! or a panic fails that record.
//!
//! ```
//! use pushpull::kinesis_event::KinesisEvent;
//! use pushpull::pull::{kinesis, DecodeError, Options};
//!
//! #[derive(serde::Deserialize)]
//! struct Order<'a> { user: &'a str, amount: f64 }
//!
//! let payload = r#"{"Records":[
//!  {"kinesis":{"partitionKey":"a","sequenceNumber":"9","data":"eyJ1c2VyIjoiYSIsImFtb3VudCI6MX0=","approximateArrivalTimestamp":1},"eventID":"shardId-0:9"},
//!  {"kinesis":{"partitionKey":"a","sequenceNumber":"10","data":"bm90IGpzb24=","approximateArrivalTimestamp":1},"eventID":"shardId-0:10"}]}"#;
//! let event = KinesisEvent::from_slice(payload.as_bytes()).unwrap();
//! let mut total = 0.0;
//! let result = kinesis::process(&event, Options::default(), |record| {
//!     let order: Order<'_> = record.json()?;   // borrows from the decoded data
//!     assert_eq!(order.user, "a");
//!     total += order.amount;
//!     Ok::<_, DecodeError>(())
//! })
//! .unwrap();
//! assert_eq!((result.processed, total), (1, 1.0));
//! let response = serde_json::to_string(&result.response()).unwrap();
//! assert_eq!(response, r#"{"batchItemFailures":[{"itemIdentifier":"10"}]}"#);
//! ```
use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;

use serde::{Deserialize, Serialize};

use super::{BatchItemFailure, BatchResult, DecodeError, Options, ResponseRule, parse_json};
use crate::kinesis_event::{KinesisEvent, KinesisEventRecord};
use crate::sequence::{SequenceNumber, SequenceNumberError};

/// One record as a synchronous handler sees it: decoded data and where it came from.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    /// Its position in the batch (0-based).
    pub index: usize,
    /// The shard.
    pub shard_id: &'a str,
    /// The sequence number, as sent.
    pub sequence_number: &'a str,
    /// The partition key (a user record's own key when the record was aggregated).
    pub partition_key: &'a str,
    /// Arrival time in Kinesis, seconds since the epoch.
    pub arrival: f64,
    /// The data, base64-decoded (a user record's data when the record was aggregated).
    pub data: &'a [u8],
    /// For a user record unpacked from a KPL aggregate, its position in the aggregate (the KCL's
    /// sub-sequence number); `None` for a plain record.
    pub sub_sequence_number: Option<u64>,
}

impl<'a> Record<'a> {
    /// Deserializes the data as JSON into `T`, which may borrow from it. An error names the
    /// record; returned from the handler, it fails the record.
    pub fn json<T: Deserialize<'a>>(&self) -> Result<T, DecodeError> {
        parse_json(self.data, || self.sequence_number.to_owned())
    }

    /// An owned copy, for async handlers and tasks (named apart from `ToOwned::to_owned`, which
    /// would clone the borrowed record instead).
    pub fn to_owned_record(&self) -> OwnedRecord {
        OwnedRecord {
            index: self.index,
            shard_id: self.shard_id.to_owned(),
            sequence_number: self.sequence_number.to_owned(),
            partition_key: self.partition_key.to_owned(),
            arrival: self.arrival,
            data: self.data.to_vec(),
            sub_sequence_number: self.sub_sequence_number,
        }
    }
}

/// A record that owns its data: what async handlers receive.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct OwnedRecord {
    /// Its position in the batch (0-based).
    pub index: usize,
    /// The shard.
    pub shard_id: String,
    /// The sequence number, as sent.
    pub sequence_number: String,
    /// The partition key (a user record's own key when the record was aggregated).
    pub partition_key: String,
    /// Arrival time in Kinesis, seconds since the epoch.
    pub arrival: f64,
    /// The data, base64-decoded (a user record's data when the record was aggregated).
    pub data: Vec<u8>,
    /// For a user record unpacked from a KPL aggregate, its position in the aggregate.
    pub sub_sequence_number: Option<u64>,
}

impl OwnedRecord {
    /// Deserializes the data as JSON into `T`, which may borrow from it.
    pub fn json<'a, T: Deserialize<'a>>(&'a self) -> Result<T, DecodeError> {
        parse_json(&self.data, || self.sequence_number.clone())
    }
}

/// The event cannot be processed record by record: the whole invocation must fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
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

/// The record's sequence number as an integer, or the error that fails the invocation.
pub fn sequence_number(r: &KinesisEventRecord<'_>) -> Result<SequenceNumber, PullError> {
    r.sequence_number().map_err(|source| PullError::SequenceNumber { event_id: r.event_id.to_string(), source })
}

/// Every sequence number must parse: a record that could not be named in the response cannot be
/// retried alone, so such a batch fails whole.
fn check_sequence_numbers(records: &[KinesisEventRecord<'_>]) -> Result<(), PullError> {
    records.iter().try_for_each(|r| sequence_number(r).map(drop))
}

fn result_of(records: &[KinesisEventRecord<'_>], outcomes: super::Outcomes) -> BatchResult {
    let mut result = BatchResult { rule: ResponseRule::Stream, ..Default::default() };
    result.absorb(outcomes, |i| records[i].kinesis.sequence_number.to_string());
    result
}

/// Runs `handler` on each record of the batch, in order (see [`process_records`]).
pub fn process<F, E>(event: &KinesisEvent<'_>, options: Options, handler: F) -> Result<BatchResult, PullError>
where
    F: FnMut(Record<'_>) -> Result<(), E>,
    E: Display,
{
    process_records(&event.records, options, handler)
}

/// Runs `handler` on each record, in order. A handler error, undecodable base64 data or a panic
/// marks that record failed; [`Options`] say whether to stop at the first failure and when the
/// deadline is. `records` may be part of a batch (for example those after a checkpoint);
/// [`Record::index`] is the position in `records`.
///
/// KPL aggregated records are unpacked: the handler runs once per user record, in order, each
/// with its own partition key and [`Record::sub_sequence_number`]. The partial batch response
/// can name only the Kinesis record, so a failed user record fails its whole aggregate (and, by
/// the stream rule, what follows it); [`BatchResult::processed`] counts the handler's successes,
/// user records included. A record that starts with the aggregation magic bytes but fails the
/// MD5 or protobuf check is passed to the handler whole, as the reference deaggregators do, with
/// a warning.
///
/// ```
/// use bytes::Bytes;
/// use pushpull::aggregation::Aggregator;
/// use pushpull::kinesis_event::KinesisEvent;
/// use pushpull::pull::{kinesis, Options};
///
/// let mut agg = Aggregator::new(50_000);
/// for (key, line) in [("a", "{}"), ("b", "not json"), ("c", "{}")] {
///     agg.add(key, None, Bytes::from(line)).unwrap();
/// }
/// let data = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, agg.finish().unwrap().data);
/// let payload = format!(r#"{{"Records":[{{"kinesis":{{"partitionKey":"a","sequenceNumber":"7","data":"{data}",
///   "approximateArrivalTimestamp":1}},"eventID":"shardId-0:7"}}]}}"#);
/// let event = KinesisEvent::from_slice(payload.as_bytes()).unwrap();
/// let mut seen = Vec::new();
/// let result = kinesis::process(&event, Options::default(), |r| {
///     seen.push((r.partition_key.to_owned(), r.sub_sequence_number));
///     serde_json::from_slice::<serde_json::Value>(r.data).map(drop)
/// })
/// .unwrap();
/// assert_eq!(seen, [("a".into(), Some(0)), ("b".into(), Some(1)), ("c".into(), Some(2))]);
/// assert_eq!(result.processed, 2);
/// assert_eq!(result.failures[0].item_identifier, "7"); // the whole aggregate is retried
/// assert!(result.failures[0].reason.starts_with("user record 1:"), "{}", result.failures[0].reason);
/// ```
pub fn process_records<F, E>(
    records: &[KinesisEventRecord<'_>],
    options: Options,
    mut handler: F,
) -> Result<BatchResult, PullError>
where
    F: FnMut(Record<'_>) -> Result<(), E>,
    E: Display,
{
    check_sequence_numbers(records)?;
    let mut buf = Vec::new();
    // The handler's successes: a plain record's, or each user record's of an aggregate.
    let mut successes = 0usize;
    let outcomes = super::run_in_order(records.len(), &options, |index| {
        let r = &records[index];
        r.decode_data_into(&mut buf).map_err(|e| e.to_string())?;
        let record = Record {
            index,
            shard_id: r.shard_id(),
            sequence_number: &r.kinesis.sequence_number,
            partition_key: &r.kinesis.partition_key,
            arrival: r.kinesis.approximate_arrival_timestamp,
            data: &buf,
            sub_sequence_number: None,
        };
        let Some(aggregate) = unpack(r, &buf) else {
            let outcome = handler(record).map_err(|e| e.to_string());
            successes += usize::from(outcome.is_ok());
            return outcome;
        };
        let mut first_failure = None;
        for user in aggregate.records() {
            let outcome = handler(Record {
                partition_key: user.partition_key,
                data: user.data,
                sub_sequence_number: Some(user.sub_sequence_number),
                ..record.clone()
            });
            match outcome {
                Ok(()) => successes += 1,
                Err(e) => {
                    first_failure.get_or_insert_with(|| format!("user record {}: {e}", user.sub_sequence_number));
                    if options.stops_at_first_failure() {
                        break;
                    }
                }
            }
        }
        first_failure.map_or(Ok(()), Err)
    });
    let mut result = result_of(records, outcomes);
    result.processed = successes;
    Ok(result)
}

/// The aggregate in a record's decoded data, or `None` for a plain record (with a warning when
/// the data began like an aggregate and failed its checks).
fn unpack(r: &KinesisEventRecord<'_>, data: &[u8]) -> Option<crate::aggregation::Aggregate> {
    if !crate::aggregation::has_magic(data) {
        return None;
    }
    crate::aggregation::deaggregate(data)
        .inspect_err(|why| {
            tracing::warn!(sequence_number = %r.kinesis.sequence_number, reason = %why,
                "record starts like a KPL aggregate but is not one; handled as a plain record")
        })
        .ok()
}

/// Runs an async `handler` on each record: in order, or with [`Options::per_key`] up to that many
/// partition keys at a time, in order within each key. KPL aggregates are unpacked as in
/// [`process_records`]: each user record is handled under its own partition key, and a failed or
/// unreached user record fails (or leaves unprocessed) its whole Kinesis record.
///
/// ```
/// use pushpull::kinesis_event::KinesisEvent;
/// use pushpull::pull::{kinesis, Options};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let payload = r#"{"Records":[
///  {"kinesis":{"partitionKey":"a","sequenceNumber":"1","data":"e30=","approximateArrivalTimestamp":1},"eventID":"shardId-0:1"},
///  {"kinesis":{"partitionKey":"b","sequenceNumber":"2","data":"e30=","approximateArrivalTimestamp":1},"eventID":"shardId-0:2"}]}"#;
/// let event = KinesisEvent::from_slice(payload.as_bytes()).unwrap();
/// let result = kinesis::process_async(&event, Options::default().per_key(8), |record| async move {
///     if record.partition_key == "b" { Err("b is down") } else { Ok(()) }
/// })
/// .await
/// .unwrap();
/// assert_eq!(result.response().batch_item_failures[0].item_identifier, "2");
/// # });
/// ```
pub async fn process_async<F, Fut, E>(
    event: &KinesisEvent<'_>,
    options: Options,
    handler: F,
) -> Result<BatchResult, PullError>
where
    F: Fn(OwnedRecord) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let records = &event.records;
    check_sequence_numbers(records)?;
    // Every record decoded and unpacked first: the units the handler runs on, each with its key.
    let mut units: Vec<OwnedRecord> = Vec::with_capacity(records.len());
    let mut undecodable: Vec<(usize, String)> = Vec::new();
    let mut data = Vec::new();
    for (index, r) in records.iter().enumerate() {
        if let Err(e) = r.decode_data_into(&mut data) {
            undecodable.push((index, e.to_string()));
            continue;
        }
        let plain = OwnedRecord {
            index,
            shard_id: r.shard_id().to_owned(),
            sequence_number: r.kinesis.sequence_number.to_string(),
            partition_key: r.kinesis.partition_key.to_string(),
            arrival: r.kinesis.approximate_arrival_timestamp,
            data: Vec::new(),
            sub_sequence_number: None,
        };
        match unpack(r, &data) {
            None => units.push(OwnedRecord { data: std::mem::take(&mut data), ..plain }),
            Some(aggregate) => units.extend(aggregate.records().map(|u| OwnedRecord {
                partition_key: u.partition_key.to_owned(),
                data: u.data.to_vec(),
                sub_sequence_number: Some(u.sub_sequence_number),
                ..plain.clone()
            })),
        }
    }
    let keys: Vec<&str> = units.iter().map(|u| u.partition_key.as_str()).collect();
    let (units_ref, handler) = (&units, &handler);
    let unit_outcomes = super::run_concurrently(&keys, &options, |u| async move {
        handler(units_ref[u].clone()).await.map_err(|e| e.to_string())
    })
    .await;
    // Back to Kinesis records: one failed or unreached unit decides its record.
    let mut outcomes = super::Outcomes { processed: unit_outcomes.processed, ..Default::default() };
    let mut failed: Vec<Option<String>> = vec![None; records.len()];
    let mut unreached: Vec<Option<super::NotAttempted>> = vec![None; records.len()];
    for (index, reason) in undecodable {
        failed[index] = Some(reason);
    }
    for (u, reason) in unit_outcomes.failed {
        let unit = &units[u];
        let reason = match unit.sub_sequence_number {
            Some(sub) => format!("user record {sub}: {reason}"),
            None => reason,
        };
        let slot = &mut failed[unit.index];
        if slot.is_none() {
            *slot = Some(reason);
        }
    }
    for (u, why) in unit_outcomes.unprocessed {
        unreached[units[u].index].get_or_insert(why);
    }
    for (index, (failed, unreached)) in failed.into_iter().zip(unreached).enumerate() {
        match (failed, unreached) {
            (Some(reason), _) => outcomes.failed.push((index, reason)),
            (None, Some(why)) => outcomes.unprocessed.push((index, why)),
            (None, None) => {}
        }
    }
    Ok(result_of(records, outcomes))
}

/// The most state a tumbling window may carry between invocations (AWS caps it at 1 MB per
/// shard and then ends the window early); [`encode_window_state`] refuses more.
pub const MAX_WINDOW_STATE_BYTES: usize = 1_000_000;

/// Window state that cannot be carried: past [`MAX_WINDOW_STATE_BYTES`], or not encodable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The encoded state would pass the cap.
    #[error(
        "tumbling window state of {size} bytes would exceed the {limit}-byte cap; emit results early or keep less state"
    )]
    TooLarge {
        /// The encoded size.
        size: usize,
        /// The cap.
        limit: usize,
    },
    /// The state does not serialize as JSON (a map with non-string keys, a failing `Serialize`).
    #[error("tumbling window state does not encode as JSON: {0}")]
    Encode(#[source] serde_json::Error),
}

/// The key under which typed state is kept in the window's string map.
pub const STATE_KEY: &str = "pushpull";

/// Encodes typed window state into the string map the mapping carries, refusing it before it
/// passes the cap.
///
/// ```
/// use pushpull::pull::kinesis::{decode_window_state, encode_window_state};
/// let state = encode_window_state(&vec![1u32, 2, 3]).unwrap();
/// assert_eq!(decode_window_state::<Vec<u32>>(Some(&state)).unwrap(), vec![1, 2, 3]);
/// assert_eq!(decode_window_state::<Vec<u32>>(None).unwrap(), Vec::<u32>::new());
/// assert!(encode_window_state(&"x".repeat(1_000_001)).is_err());
/// ```
pub fn encode_window_state<T: Serialize>(value: &T) -> Result<HashMap<String, String>, StateError> {
    let json = serde_json::to_string(value).map_err(StateError::Encode)?;
    // What the mapping counts is the whole map as JSON: the value escaped, plus the key.
    let size = json.len() + json.bytes().filter(|b| matches!(b, b'"' | b'\\')).count() + STATE_KEY.len() + 8;
    if size > MAX_WINDOW_STATE_BYTES {
        return Err(StateError::TooLarge { size, limit: MAX_WINDOW_STATE_BYTES });
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
/// failures. `state` must be present, or the invocation counts as failed.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WindowResponse {
    /// State for the window's next invocation (empty after the final one).
    pub state: HashMap<String, String>,
    /// Failed records, lowest first.
    pub batch_item_failures: Vec<BatchItemFailure>,
}

/// Below this much record data (summed over the records, base64 as delivered) a batch is worked
/// on by [`in_parts`] in one part on the calling thread: starting helpers costs more than it saves.
pub const IN_PARTS_MIN_BYTES: usize = 250_000;

/// Runs `work(base, part)` over contiguous parts of `records` (`base`: the index of the part's
/// first record in `records`) on every vCPU the process may use, the calling thread among them,
/// and returns each part's result in record order. Parts are cut by data bytes, not by records
/// (a KPL aggregate carries many user records in one). For CPU work on a large batch that a
/// handler merges itself, such as the sample rollup's check of every record; a batch with less
/// than [`IN_PARTS_MIN_BYTES`] of data is one part. A panic in `work` is raised again here, after
/// the other parts return.
///
/// ```
/// use pushpull::kinesis_event::KinesisEvent;
/// use pushpull::pull::kinesis::in_parts;
///
/// let record = r#"{"kinesis":{"partitionKey":"k","sequenceNumber":"1","data":"eyJhIjoxfQ==","approximateArrivalTimestamp":1},"eventID":"shardId-0:1"}"#;
/// let payload = format!(r#"{{"Records":[{}]}}"#, vec![record; 30_000].join(","));
/// let event = KinesisEvent::from_slice_parallel(payload.as_bytes()).unwrap();
/// let counts = in_parts(&event.records, |_base, part| part.len());
/// assert_eq!(counts.iter().sum::<usize>(), 30_000);
/// ```
pub fn in_parts<'r, 'a, R, W>(records: &'r [KinesisEventRecord<'a>], work: W) -> Vec<R>
where
    R: Send,
    W: Fn(usize, &'r [KinesisEventRecord<'a>]) -> R + Sync,
{
    let data_bytes: usize = records.iter().map(|r| r.kinesis.data.len()).sum();
    let threads = crate::parallel::threads().min(data_bytes / IN_PARTS_MIN_BYTES);
    if threads <= 1 {
        return vec![work(0, records)];
    }
    let parts = split_by_bytes(records, threads, data_bytes);
    let slots: Vec<std::sync::Mutex<Option<R>>> = parts.iter().map(|_| std::sync::Mutex::new(None)).collect();
    crate::parallel::each_part(threads, parts.len(), |i| {
        let (base, part) = parts[i];
        let out = work(base, part);
        *slots[i].lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(out);
    });
    slots
        .into_iter()
        .map(|s| {
            s.into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .unwrap_or_else(|| unreachable!("each_part runs every part"))
        })
        .collect()
}

/// `records` cut into at most `parts` contiguous parts of about equal data bytes (`total`).
fn split_by_bytes<'r, 'a>(
    records: &'r [KinesisEventRecord<'a>],
    parts: usize,
    total: usize,
) -> Vec<(usize, &'r [KinesisEventRecord<'a>])> {
    let mut out = Vec::with_capacity(parts);
    let (mut start, mut seen) = (0, 0);
    for (i, r) in records.iter().enumerate() {
        seen += r.kinesis.data.len();
        if seen * parts >= total * (out.len() + 1) && out.len() + 1 < parts {
            out.push((start, &records[start..=i]));
            start = i + 1;
        }
    }
    if start < records.len() {
        out.push((start, &records[start..]));
    }
    out
}

/// The measures of a Kinesis batch known before it is handled (stream, batch size, the oldest
/// record's arrival); fill in `processed` and `failed` and [`crate::metrics::PullBatch::record`] it.
///
/// ```
/// let event = pushpull::kinesis_event::KinesisEvent::from_slice(br#"{"Records":[]}"#).unwrap();
/// let mut batch = pushpull::pull::kinesis::batch_metrics(&event);
/// batch.processed = 0;
/// batch.record();
/// ```
pub fn batch_metrics(event: &KinesisEvent<'_>) -> crate::metrics::PullBatch {
    let arn = event.records.first().map(|r| &*r.event_source_arn).or(event.event_source_arn.as_deref());
    crate::metrics::PullBatch {
        stream: arn.and_then(crate::metrics::stream_name).unwrap_or("unknown").to_owned(),
        batch_size: event.records.len(),
        records_in: event.records.len(),
        processed: 0,
        failed: 0,
        oldest_arrival: event.records.iter().map(|r| r.kinesis.approximate_arrival_timestamp).reduce(f64::min),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_split_by_data_bytes_cover_the_batch_in_order() {
        let record = |i: usize| {
            format!(
                r#"{{"kinesis":{{"partitionKey":"p","sequenceNumber":"{}","data":"{}","approximateArrivalTimestamp":1}},"eventID":"shardId-0:1"}}"#,
                1000 + i,
                "e30=".repeat(1 + i % 5)
            )
        };
        let payload = format!(r#"{{"Records":[{}]}}"#, (0..50).map(record).collect::<Vec<_>>().join(","));
        let event = KinesisEvent::from_slice(payload.as_bytes()).unwrap();
        let total: usize = event.records.iter().map(|r| r.kinesis.data.len()).sum();
        for parts in 1..=7 {
            let split = split_by_bytes(&event.records, parts, total);
            assert_eq!(split.len(), parts);
            let mut next = 0;
            for (base, chunk) in &split {
                assert_eq!(*base, next);
                assert!(!chunk.is_empty());
                next += chunk.len();
            }
            assert_eq!(next, 50);
        }
    }

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

    fn ids(r: &BatchResult) -> Vec<String> {
        r.item_failures().into_iter().map(|f| f.item_identifier).collect()
    }

    const OK: &str = "e30="; // {}
    const BAD: &str = "e30K"; // "{}\n": decodes; the handlers below fail on it by content

    fn all(e: &KinesisEvent<'_>, f: impl FnMut(Record<'_>) -> Result<(), String>) -> BatchResult {
        process(e, Options::default(), f).unwrap()
    }

    #[test]
    fn empty_batch_and_all_success_report_nothing() {
        for e in [event(&[]), event(&[("1", OK), ("2", OK)])] {
            let ev = KinesisEvent::from_slice(e.as_bytes()).unwrap();
            let r = all(&ev, |_| Ok(()));
            assert_eq!(serde_json::to_string(&r.response()).unwrap(), r#"{"batchItemFailures":[]}"#);
        }
    }

    #[test]
    fn failures_are_listed_in_batch_order_which_is_sequence_order() {
        let e = event(&[("99", BAD), ("100", BAD), ("101", OK)]);
        let ev = KinesisEvent::from_slice(e.as_bytes()).unwrap();
        let r = all(&ev, |rec| if rec.data == b"{}\n" { Err("bad".into()) } else { Ok(()) });
        assert_eq!(ids(&r), ["99", "100"]);
        assert_eq!(r.processed, 1);
    }

    #[test]
    fn all_failed_lists_every_record() {
        let e = event(&[("1", OK), ("2", OK)]);
        let ev = KinesisEvent::from_slice(e.as_bytes()).unwrap();
        assert_eq!(ids(&all(&ev, |_| Err("no".into()))), ["1", "2"]);
    }

    #[test]
    fn bad_base64_and_panics_fail_only_their_record() {
        let e = event(&[("1", "!!!"), ("2", OK), ("3", OK)]);
        let ev = KinesisEvent::from_slice(e.as_bytes()).unwrap();
        let r = all(&ev, |rec| {
            if rec.sequence_number == "3" {
                panic!("boom");
            }
            Ok(())
        });
        assert_eq!(ids(&r), ["1", "3"]);
        assert!(r.failures[0].reason.starts_with("data is not valid base64"));
        assert_eq!(r.failures[1].reason, "handler panicked: boom");
    }

    #[test]
    fn stop_at_first_failure_leaves_the_rest_for_the_retry() {
        let e = event(&[("1", OK), ("2", BAD), ("3", OK), ("4", BAD)]);
        let ev = KinesisEvent::from_slice(e.as_bytes()).unwrap();
        let mut seen = Vec::new();
        let r = process(&ev, Options::default().stop_at_first_failure(true), |rec| {
            seen.push(rec.sequence_number.to_owned());
            if rec.data == b"{}\n" { Err("bad") } else { Ok(()) }
        })
        .unwrap();
        assert_eq!(seen, ["1", "2"]);
        assert_eq!((r.processed, r.unprocessed.len()), (1, 2));
        assert_eq!(ids(&r), ["2"], "the failure covers what follows it");
    }

    #[test]
    fn decode_errors_name_the_record() {
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct Order {
            user: String,
        }
        let e = event(&[("7", OK)]);
        let ev = KinesisEvent::from_slice(e.as_bytes()).unwrap();
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
        let ev = KinesisEvent::from_slice(e.as_bytes()).unwrap();
        let err = process(&ev, Options::default(), |_| Ok::<_, String>(())).unwrap_err();
        assert!(err.to_string().starts_with("record shardId-000000000001:x1: sequence number \"x1\""), "{err}");
    }

    #[tokio::test]
    async fn async_records_keep_order_per_key_and_panics_fail_their_record() {
        let e = event_keys(&[("1", OK, "a"), ("2", OK, "b"), ("3", BAD, "a"), ("4", OK, "a")]);
        let ev = KinesisEvent::from_slice(e.as_bytes()).unwrap();
        let r = process_async(&ev, Options::default().per_key(4), |rec| async move {
            if rec.partition_key == "b" {
                panic!("async boom");
            }
            if rec.data == b"{}\n" { Err("bad") } else { Ok(()) }
        })
        .await
        .unwrap();
        assert_eq!(ids(&r), ["2", "3"]);
        assert_eq!(r.failures[0].reason, "handler panicked: async boom");
        assert_eq!(r.unprocessed.iter().map(|u| u.index).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn window_response_carries_state_and_failures() {
        let mut r = WindowResponse { state: encode_window_state(&5u32).unwrap(), ..Default::default() };
        let e = event(&[("1", BAD)]);
        let ev = KinesisEvent::from_slice(e.as_bytes()).unwrap();
        r.batch_item_failures = all(&ev, |_| Err("x".into())).item_failures();
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"state": {"pushpull": "5"}, "batchItemFailures": [{"itemIdentifier": "1"}]})
        );
    }

    #[test]
    fn window_state_is_refused_before_the_cap_and_unencodable_state_is_an_error() {
        let big: Vec<String> = (0..20_000).map(|i| format!("group-{i:040}")).collect();
        let Err(StateError::TooLarge { size, limit }) = encode_window_state(&big) else { panic!("not refused") };
        assert!(size > MAX_WINDOW_STATE_BYTES && limit == MAX_WINDOW_STATE_BYTES);
        // Escaping counts: quotes inside the value grow the map's JSON.
        assert!(encode_window_state(&"\"".repeat(600_000)).is_err());
        let non_string_keys = std::collections::BTreeMap::from([((1, 2), 3)]);
        assert!(matches!(encode_window_state(&non_string_keys), Err(StateError::Encode(_))));
    }

    #[test]
    fn window_events_parse_with_their_fields() {
        let payload = r#"{"Records":[],"window":{"start":"2026-11-24T10:00:00Z","end":"2026-11-24T10:05:00Z"},
            "state":{"pushpull":"7"},"shardId":"shardId-000000000003","eventSourceARN":"arn","isFinalInvokeForWindow":true,"isWindowTerminatedEarly":false}"#;
        let ev = KinesisEvent::from_slice(payload.as_bytes()).unwrap();
        assert!(ev.is_windowed() && ev.is_final_invoke_for_window);
        assert_eq!(ev.shard(), Some("shardId-000000000003"));
        assert_eq!(decode_window_state::<u32>(ev.state.as_ref()).unwrap(), 7);
    }
}
