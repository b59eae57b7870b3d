//! Kinesis events as the event source mapping delivers them, read without copying.
//!
//! [`KinesisEvent`] borrows its strings from the invocation payload (no per-record
//! allocations), [`KinesisEvent::from_slice`] parses one with serde_json in one pass
//! ([`KinesisEvent::from_slice_parallel`]: a large batch in parts on every vCPU), and [`KinesisEventRecord::decode_data_into`] base64-decodes a
//! record's data into a buffer the caller reuses. [`SequenceNumber`] compares sequence numbers
//! as the integers they are, never as text.
//!
//! ```
//! use pushpull::kinesis_event::{KinesisEvent, SequenceNumber};
//!
//! let payload = r#"{"Records":[{"kinesis":{"kinesisSchemaVersion":"1.0","partitionKey":"u1",
//!   "sequenceNumber":"49590338271490256608559692538361571095921575989136588898",
//!   "data":"eyJhIjoxfQ==","approximateArrivalTimestamp":1545084650.987},
//!   "eventSource":"aws:kinesis","eventVersion":"1.0",
//!   "eventID":"shardId-000000000006:49590338271490256608559692538361571095921575989136588898",
//!   "eventName":"aws:kinesis:record","awsRegion":"us-east-1",
//!   "eventSourceARN":"arn:aws:kinesis:us-east-1:123456789012:stream/ingest"}]}"#;
//! let event = KinesisEvent::from_slice(payload.as_bytes())?;
//! let record = &event.records[0];
//! assert_eq!(record.shard_id(), "shardId-000000000006");
//! let mut buf = Vec::new();
//! record.decode_data_into(&mut buf).unwrap();
//! assert_eq!(buf, br#"{"a":1}"#);
//! assert!(record.sequence_number().unwrap() > "9".parse::<SequenceNumber>().unwrap());
//! # Ok::<(), pushpull::kinesis_event::EventError>(())
//! ```
use std::borrow::Cow;

use base64::Engine as _;
use serde::Deserialize;

mod split;

pub use crate::sequence::{SequenceNumber, SequenceNumberError};

/// A Kinesis event: the records of one batch from one shard. With tumbling windows
/// (`TumblingWindowInSeconds`), the mapping adds the window, the state carried from the previous
/// invocation of the window, and whether this is the window's final invocation.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KinesisEvent<'a> {
    /// The records, in sequence-number order.
    #[serde(rename = "Records", borrow, default)]
    pub records: Vec<KinesisEventRecord<'a>>,
    /// The tumbling window this invocation belongs to, if windows are on.
    #[serde(default)]
    pub window: Option<Window>,
    /// The state returned by the previous invocation of this window (windows only).
    #[serde(default)]
    pub state: Option<std::collections::HashMap<String, String>>,
    /// The shard (windows only; otherwise see [`KinesisEventRecord::shard_id`]).
    #[serde(default)]
    pub shard_id: Option<String>,
    /// The stream's ARN (windows only; otherwise on each record).
    #[serde(rename = "eventSourceARN", default)]
    pub event_source_arn: Option<String>,
    /// True on the last invocation of a window: emit the window's results now.
    #[serde(default)]
    pub is_final_invoke_for_window: bool,
    /// True when the window ended early (state reached its size limit, or the shard ended).
    #[serde(default)]
    pub is_window_terminated_early: bool,
}

/// A tumbling window's bounds, as the mapping sends them (ISO-8601 text).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Window {
    /// Inclusive start.
    pub start: String,
    /// Exclusive end.
    pub end: String,
}

/// A payload that is not a Kinesis event (not JSON, not UTF-8, or fields of the wrong type).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a Kinesis event: {message}")]
#[non_exhaustive]
pub struct EventError {
    /// The parser's description, with the line and column.
    pub message: String,
}

/// Below this size a payload is read on one thread: a part must be large enough that starting
/// a thread (tens of microseconds) is small beside reading it (serde_json reads about 1.5 MB a
/// millisecond here).
const SPLIT_MIN_BYTES: usize = 512 * 1024;

/// Parts a reading thread may take in turn: with more parts than threads, a thread that starts
/// late leaves its share to the others instead of holding them up (see `split`).
const PARTS_PER_THREAD: usize = 4;

/// The least a part may hold, so that taking one stays small beside reading it.
const PART_MIN_BYTES: usize = 128 * 1024;

impl<'a> KinesisEvent<'a> {
    /// Parses an invocation payload in one pass on the calling thread, borrowing every string
    /// that has no escapes from it. [`KinesisEvent::from_slice_parallel`] reads a large payload
    /// on every vCPU instead (what the runners of `pushpull::lambda` use).
    ///
    /// With serde_json, which limits nesting to 128 levels and skips unknown values without
    /// recursing: a payload built to exhaust the stack is an error, never an abort. A faster
    /// SIMD parser (sonic-rs) overflows the stack on deeply nested values (cloudwego/sonic-rs#232,
    /// #239), and checking the depth first cost more than it saved (BENCHMARKS.md).
    ///
    /// ```
    /// use pushpull::kinesis_event::KinesisEvent;
    /// let event = KinesisEvent::from_slice(br#"{"Records":[]}"#).unwrap();
    /// assert!(event.records.is_empty());
    /// let err = KinesisEvent::from_slice(br#"{"Records":{}}"#).unwrap_err();
    /// assert!(err.to_string().starts_with("not a Kinesis event"), "{err}");
    /// let deep = format!("{{\"Records\":[{{\"kinesis\":{}{}}}]}}", "[".repeat(100_000), "]".repeat(100_000));
    /// assert!(KinesisEvent::from_slice(deep.as_bytes()).is_err());
    /// assert!(KinesisEvent::from_slice(b"[]").is_err());
    /// ```
    pub fn from_slice(payload: &'a [u8]) -> Result<Self, EventError> {
        Self::from_slice_on(payload, 1)
    }

    /// [`KinesisEvent::from_slice`] on every vCPU the process may use: a payload of 512 KiB or
    /// more is read in contiguous parts of its `Records` array by the calling thread and the
    /// library's helper threads (started on first use, or by [`crate::pull::start_helpers`]),
    /// each taking the next part until none is left. The result is
    /// the same as one pass's: the parts are cut only where two records meet, and anything else
    /// is read in one pass. On Lambda's 2 vCPUs a large batch is read faster this way
    /// (BENCHMARKS.md, W1, has the figures). The runners of `pushpull::lambda` read this way.
    ///
    /// ```
    /// use pushpull::kinesis_event::KinesisEvent;
    /// let event = KinesisEvent::from_slice_parallel(br#"{"Records":[]}"#).unwrap();
    /// assert!(event.records.is_empty());
    /// ```
    pub fn from_slice_parallel(payload: &'a [u8]) -> Result<Self, EventError> {
        Self::from_slice_on(payload, crate::parallel::threads())
    }

    /// [`KinesisEvent::from_slice`] on at most `threads` threads, the calling thread among them
    /// (1: one pass, no thread started), for a caller that keeps its own threads busy or reads
    /// several batches at once.
    ///
    /// ```
    /// use pushpull::kinesis_event::KinesisEvent;
    /// let record = r#"{"kinesis":{"partitionKey":"k","sequenceNumber":"1","data":"e30=","approximateArrivalTimestamp":1},"eventID":"shardId-0:1"}"#;
    /// let payload = format!(r#"{{"Records":[{}]}}"#, vec![record; 8_000].join(","));
    /// let in_parts = KinesisEvent::from_slice_on(payload.as_bytes(), 2).unwrap();
    /// let one_pass = KinesisEvent::from_slice_on(payload.as_bytes(), 1).unwrap();
    /// assert_eq!(format!("{in_parts:?}"), format!("{one_pass:?}"));
    /// ```
    pub fn from_slice_on(payload: &'a [u8], threads: usize) -> Result<Self, EventError> {
        // serde lets a struct be read from an array: `[]` would be an empty event.
        if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(EventError { message: "not a JSON object".to_owned() });
        }
        let threads = threads.min(payload.len() / SPLIT_MIN_BYTES);
        if threads > 1 {
            let parts = (threads * PARTS_PER_THREAD).min(payload.len() / PART_MIN_BYTES);
            if let Some(event) = split::parse(payload, threads, parts) {
                return Ok(event);
            }
            tracing::debug!(bytes = payload.len(), "batch read in one pass: not cut where two records meet");
        }
        serde_json::from_slice(payload).map_err(|e| EventError { message: e.to_string() })
    }

    /// Whether this invocation is part of a tumbling window.
    pub fn is_windowed(&self) -> bool {
        self.window.is_some()
    }

    /// The shard of this batch: from the window fields, else from the first record.
    pub fn shard(&self) -> Option<&str> {
        self.shard_id.as_deref().or_else(|| self.records.first().map(|r| r.shard_id()))
    }
}

/// One record of a [`KinesisEvent`].
#[derive(Debug, Clone, Deserialize)]
pub struct KinesisEventRecord<'a> {
    /// The Kinesis part of the record.
    #[serde(borrow)]
    pub kinesis: KinesisData<'a>,
    /// `shardId-...:<sequenceNumber>`.
    #[serde(rename = "eventID", borrow)]
    pub event_id: Cow<'a, str>,
    /// The stream's ARN.
    #[serde(rename = "eventSourceARN", borrow, default)]
    pub event_source_arn: Cow<'a, str>,
}

/// The `kinesis` object of a record.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KinesisData<'a> {
    /// The partition key the producer chose.
    #[serde(borrow)]
    pub partition_key: Cow<'a, str>,
    /// The sequence number, as sent.
    #[serde(borrow)]
    pub sequence_number: Cow<'a, str>,
    /// The data, base64-encoded.
    #[serde(borrow)]
    pub data: Cow<'a, str>,
    /// When Kinesis received the record, in (fractional) seconds since the epoch.
    #[serde(default)]
    pub approximate_arrival_timestamp: f64,
}

/// A record whose data is not valid base64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("data is not valid base64: {0}")]
pub struct DataDecodeError(pub String);

impl KinesisEventRecord<'_> {
    /// The shard the record came from (the part of `eventID` before the `:`).
    pub fn shard_id(&self) -> &str {
        memchr::memchr(b':', self.event_id.as_bytes()).map_or(&*self.event_id, |colon| &self.event_id[..colon])
    }

    /// The record's sequence number as an integer.
    pub fn sequence_number(&self) -> Result<SequenceNumber, SequenceNumberError> {
        self.kinesis.sequence_number.parse()
    }

    /// Decodes the data into `buf` (cleared first), so one buffer serves a whole batch.
    ///
    /// Standard base64 with padding, as Kinesis writes it. Decoded with SIMD (`base64-simd`,
    /// which the AWS SDK uses too, for speed: BENCHMARKS.md); what it refuses is decoded again
    /// by the `base64` crate, whose
    /// answer, a decoding or an error naming the offending byte and its offset, is the one given
    /// (a property test checks that what the first accepts, the second decodes alike).
    ///
    /// ```
    /// use pushpull::kinesis_event::KinesisEvent;
    /// let payload = br#"{"Records":[{"kinesis":{"partitionKey":"k","sequenceNumber":"1","data":"eyJhIjoxfQ=="},"eventID":"s:1"}]}"#;
    /// let event = KinesisEvent::from_slice(payload).unwrap();
    /// let mut buf = Vec::new();
    /// event.records[0].decode_data_into(&mut buf).unwrap();
    /// assert_eq!(buf, br#"{"a":1}"#);
    /// ```
    pub fn decode_data_into(&self, buf: &mut Vec<u8>) -> Result<(), DataDecodeError> {
        buf.clear();
        let data = self.kinesis.data.as_bytes();
        if base64_simd::STANDARD.decode_append(data, buf).is_ok() {
            return Ok(());
        }
        buf.clear();
        base64::engine::general_purpose::STANDARD.decode_vec(data, buf).map_err(|e| DataDecodeError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrows_from_the_payload() {
        let payload = r#"{"Records":[{"kinesis":{"partitionKey":"k","sequenceNumber":"1","data":"e30=","approximateArrivalTimestamp":1.5},"eventID":"shardId-1:1","eventSourceARN":"arn"}]}"#;
        let ev: KinesisEvent<'_> = serde_json::from_str(payload).unwrap();
        assert!(matches!(ev.records[0].kinesis.data, Cow::Borrowed(_)));
        assert_eq!(ev.records[0].kinesis.approximate_arrival_timestamp, 1.5);
        let mut buf = vec![1, 2, 3];
        ev.records[0].decode_data_into(&mut buf).unwrap();
        assert_eq!(buf, b"{}");
    }

    #[test]
    fn both_parsers_read_an_event_alike() {
        let payload = r#"{"Records":[{"kinesis":{"kinesisSchemaVersion":"1.0","partitionKey":"u1","sequenceNumber":"4959","data":"eyJ1c2VyIjoidTEifQ==","approximateArrivalTimestamp":1545084650.987},"eventSource":"aws:kinesis","eventVersion":"1.0","eventID":"shardId-000000000000:4959","eventName":"aws:kinesis:record","invokeIdentityArn":"arn:aws:iam::1:role/r","awsRegion":"us-east-1","eventSourceARN":"arn:aws:kinesis:us-east-1:1:stream/s"}]}"#;
        let a = KinesisEvent::from_slice(payload.as_bytes()).unwrap();
        let b: KinesisEvent<'_> = serde_json::from_str(payload).unwrap();
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        assert!(a.records.iter().all(|r| matches!(r.kinesis.data, Cow::Borrowed(_))));
        assert!(KinesisEvent::from_slice(b"{\"Records\":[{\"kinesis\":\"\xff\"}]}").is_err(), "not UTF-8");
    }

    #[test]
    fn a_large_batch_is_read_in_parts_as_one_pass_reads_it() {
        let record = |i: usize| {
            format!(
                r#"{{"kinesis":{{"partitionKey":"u{i}","sequenceNumber":"{i}","data":"eyJ1c2VyIjoidTEifQ==","approximateArrivalTimestamp":1.5}},"eventID":"shardId-000000000001:{i}","eventSourceARN":"arn:aws:kinesis:us-east-1:1:stream/s"}}"#
            )
        };
        let records: Vec<String> = (0..6_000).map(record).collect();
        let payload = format!(r#"{{"Records":[{}]}}"#, records.join(","));
        assert!(payload.len() >= 2 * SPLIT_MIN_BYTES);
        let one_pass: KinesisEvent<'_> = serde_json::from_str(&payload).unwrap();
        let bad = payload.replacen(r#""sequenceNumber":"4000""#, r#""sequenceNumber":4000"#, 1);
        for threads in [1, 2, 3] {
            let event = KinesisEvent::from_slice_on(payload.as_bytes(), threads).unwrap();
            assert_eq!(format!("{event:?}"), format!("{one_pass:?}"));
            assert_eq!(event.records.len(), 6_000);
            // One bad record anywhere: the error one pass gives.
            let err = KinesisEvent::from_slice_on(bad.as_bytes(), threads).unwrap_err();
            assert_eq!(err.message, serde_json::from_str::<KinesisEvent<'_>>(&bad).unwrap_err().to_string());
        }
    }

    #[test]
    fn escaped_strings_still_parse() {
        // JSON may escape '/' in base64 as "\/"; serde then hands us an owned string.
        let payload = r#"{"Records":[{"kinesis":{"partitionKey":"k","sequenceNumber":"1","data":"Pz8\/","approximateArrivalTimestamp":1},"eventID":"s:1"}]}"#;
        let ev = KinesisEvent::from_slice(payload.as_bytes()).unwrap();
        let mut buf = Vec::new();
        ev.records[0].decode_data_into(&mut buf).unwrap();
        assert_eq!(buf, b"???");
        let bad = r#"{"Records":[{"kinesis":{"partitionKey":"k","sequenceNumber":"1","data":"!!","approximateArrivalTimestamp":1},"eventID":"s:1"}]}"#;
        let ev: KinesisEvent<'_> = serde_json::from_str(bad).unwrap();
        assert!(ev.records[0].decode_data_into(&mut buf).is_err());
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any bytes: an event or an error naming the problem; never a panic.
            #[test]
            fn any_payload_parses_or_is_refused(payload in prop::collection::vec(any::<u8>(), 0..300)) {
                if let Err(e) = KinesisEvent::from_slice(&payload) {
                    prop_assert!(e.to_string().starts_with("not a Kinesis event"));
                }
            }

            /// Generated events parse with every field as sent (escapes included), and the data
            /// decodes to the bytes encoded.
            #[test]
            fn generated_events_round_trip(records in prop::collection::vec((any::<u64>(), "\\PC{1,20}", prop::collection::vec(any::<u8>(), 0..64)), 0..8)) {
                let json: Vec<_> = records.iter().map(|(seq, key, data)| serde_json::json!({
                    "kinesis": {"partitionKey": key, "sequenceNumber": seq.to_string(),
                        "data": base64::engine::general_purpose::STANDARD.encode(data), "approximateArrivalTimestamp": 1.5},
                    "eventID": format!("shardId-000000000007:{seq}"), "eventSourceARN": "arn:aws:kinesis:us-east-1:1:stream/s"})).collect();
                let payload = serde_json::json!({ "Records": json }).to_string();
                let event = KinesisEvent::from_slice(payload.as_bytes()).unwrap();
                let mut buf = Vec::new();
                for (r, (seq, key, data)) in event.records.iter().zip(&records) {
                    prop_assert_eq!(&*r.kinesis.partition_key, key.as_str());
                    prop_assert_eq!(r.sequence_number().unwrap().to_string(), seq.to_string());
                    prop_assert_eq!(r.shard_id(), "shardId-000000000007");
                    r.decode_data_into(&mut buf).unwrap();
                    prop_assert_eq!(&buf, data);
                }
            }

            /// The SIMD decoder accepts nothing the `base64` crate refuses, and decodes alike:
            /// strings of the alphabet, padding and a few strangers, of every length.
            #[test]
            fn simd_decoding_agrees_with_the_base64_crate(data in prop_oneof!["[A-Za-z0-9+/=\\-_ .]{0,40}", "[A-Za-z0-9+/]{0,40}(=|==)?"]) {
                let mut simd = Vec::new();
                if base64_simd::STANDARD.decode_append(data.as_bytes(), &mut simd).is_ok() {
                    let plain = base64::engine::general_purpose::STANDARD.decode(data.as_bytes());
                    prop_assert_eq!(plain.as_deref().ok(), Some(&simd[..]), "{:?}", data);
                }
            }

            /// Encoded bytes (which is all Kinesis sends) always take the SIMD path.
            #[test]
            fn encoded_bytes_decode(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
                let encoded = base64::engine::general_purpose::STANDARD.encode(&bytes);
                let mut simd = Vec::new();
                prop_assert!(base64_simd::STANDARD.decode_append(encoded.as_bytes(), &mut simd).is_ok());
                prop_assert_eq!(simd, bytes);
            }
        }
    }
}
