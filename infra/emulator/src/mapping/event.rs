//! Records as the mapping holds them, and the invocation payload built from them exactly as
//! AWS shapes it (`eventID` = `<shardId>:<sequenceNumber>`, fractional-second
//! `approximateArrivalTimestamp`, base64 `data`, and for tumbling windows `window`, `state`,
//! `shardId`, `eventSourceARN`, `isFinalInvokeForWindow`, `isWindowTerminatedEarly`).
use std::fmt::Write as _;
use std::sync::Arc;

use base64::Engine as _;
use pushpull::kinesis_event::SequenceNumber;

use crate::localstack::ACCOUNT;

/// The invoke payload limit (synchronous invoke: 6 MiB).
pub const MAX_PAYLOAD: usize = 6 * 1024 * 1024;

/// A record read from a shard.
#[derive(Debug, Clone)]
pub struct Rec {
    /// Its shard.
    pub shard_id: Arc<str>,
    /// Its sequence number as Kinesis wrote it.
    pub sequence_number: String,
    /// The same, comparable as an integer.
    pub seq: SequenceNumber,
    /// Partition key.
    pub partition_key: String,
    /// The data (raw bytes; base64 in the event).
    pub data: bytes::Bytes,
    /// Approximate arrival, unix seconds.
    pub arrival: f64,
    /// `encryptionType` when the stream is encrypted.
    pub encryption: Option<String>,
    /// Its place among the records the mapping read from the shard (0, 1, ...).
    pub index: u64,
}

impl Rec {
    /// Bytes this record takes in the event JSON (what counts toward the 6 MiB payload).
    pub fn encoded_len(&self, stream_arn: &str) -> usize {
        // The fixed part of one record (keys, punctuation, constants) is under 330 bytes; the
        // variable parts are added exactly (partition keys are JSON-escaped: at most 6x).
        330 + stream_arn.len() * 2
            + self.shard_id.len()
            + self.sequence_number.len() * 2
            + self.partition_key.len() * 6
            + self.data.len().div_ceil(3) * 4
            + ACCOUNT.len()
    }
}

impl super::source::Record for Rec {
    fn index(&self) -> u64 {
        self.index
    }
    fn ordering_key(&self) -> &[u8] {
        self.partition_key.as_bytes()
    }
    fn data(&self) -> &[u8] {
        &self.data
    }
    fn arrival(&self) -> f64 {
        self.arrival
    }
    fn position(&self) -> &str {
        &self.sequence_number
    }
}

/// The index in `batch` of the record an `itemIdentifier` names: its sequence number, compared as
/// an integer (leading zeros name the same record).
pub fn item_index(batch: &[Rec], identifier: &str) -> Result<usize, String> {
    let Ok(seq) = identifier.parse::<SequenceNumber>() else {
        return Err(format!("itemIdentifier {identifier:?} is not a sequence number"));
    };
    batch.iter().position(|r| r.seq == seq).ok_or_else(|| format!("itemIdentifier {identifier} is not in the batch"))
}

/// `KinesisBatchInfo` of a failure record, as AWS writes it.
pub fn batch_info(shard_id: &str, stream_arn: &str, records: &[Rec]) -> (&'static str, serde_json::Value) {
    let (first, last) = (records.first(), records.last());
    let info = serde_json::json!({
        "shardId": shard_id,
        "startSequenceNumber": first.map(|r| r.sequence_number.as_str()),
        "endSequenceNumber": last.map(|r| r.sequence_number.as_str()),
        "approximateArrivalOfFirstRecord": first.map(|r| iso8601_millis(r.arrival)),
        "approximateArrivalOfLastRecord": last.map(|r| iso8601_millis(r.arrival)),
        "batchSize": records.len(),
        "streamArn": stream_arn,
    });
    ("KinesisBatchInfo", info)
}

/// A tumbling window's state as the function returned it: any JSON values, kept as they are (AWS's
/// own example returns numbers: `{"state": {"1": 282, "2": 715}}`, services-kinesis-windows).
pub type WindowState = serde_json::Map<String, serde_json::Value>;

/// The tumbling-window part of an event.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowPart<'a> {
    /// Window start and end, unix seconds.
    pub start: i64,
    /// Window end (exclusive).
    pub end: i64,
    /// The state the previous invocation of this window returned.
    pub state: &'a WindowState,
    /// Whether this is the window's final invocation.
    pub is_final: bool,
    /// Whether the window ends early (its state passed 1 MB).
    pub terminated_early: bool,
}

/// RFC 3339 with milliseconds, UTC, as AWS writes it.
pub fn iso8601(unix_seconds: f64) -> String {
    let t = aws_smithy_types::DateTime::from_secs_f64(unix_seconds);
    t.fmt(aws_smithy_types::date_time::Format::DateTime).unwrap_or_default()
}

/// RFC 3339 with exactly three decimals, as AWS's failure records write their times
/// (`"timestamp": "2019-11-14T00:38:06.021Z"` in AWS's sample).
pub fn iso8601_millis(unix_seconds: f64) -> String {
    let ms = (unix_seconds * 1000.0).round().max(0.0) as i64;
    let whole = aws_smithy_types::DateTime::from_secs(ms.div_euclid(1000));
    let text = whole.fmt(aws_smithy_types::date_time::Format::DateTime).unwrap_or_default();
    format!("{}.{:03}Z", text.trim_end_matches('Z'), ms.rem_euclid(1000))
}

/// `{"Records":[...]}` of records already written as JSON text (a queue's event: SQS's, a Redis
/// stream's).
pub(crate) fn records_event<'a>(records: impl ExactSizeIterator<Item = &'a str> + Clone) -> String {
    let len = records.clone().map(|r| r.len() + 1).sum::<usize>() + 16;
    let mut out = String::with_capacity(len);
    out.push_str("{\"Records\":[");
    for (i, r) in records.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(r);
    }
    out.push_str("]}");
    out
}

/// The invocation payload for `records` (all of one shard) of `stream_arn`.
pub fn event_json(
    records: &[Rec],
    shard_id: &str,
    stream_arn: &str,
    role_arn: &str,
    window: Option<&WindowPart<'_>>,
) -> String {
    let region = stream_arn.split(':').nth(3).unwrap_or(crate::localstack::REGION);
    let mut out = String::with_capacity(records.iter().map(|r| r.encoded_len(stream_arn)).sum::<usize>() + 512);
    out.push_str("{\"Records\":[");
    let b64 = base64::engine::general_purpose::STANDARD;
    let js = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned());
    // The same for every record: escaped once.
    let (role, stream) = (js(role_arn), js(stream_arn));
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"kinesis\":{\"kinesisSchemaVersion\":\"1.0\",\"partitionKey\":");
        out.push_str(&js(&r.partition_key));
        let _ = write!(out, ",\"sequenceNumber\":\"{}\",\"data\":\"", r.sequence_number);
        b64.encode_string(&r.data, &mut out);
        let _ = write!(out, "\",\"approximateArrivalTimestamp\":{:.3}", r.arrival);
        if let Some(e) = &r.encryption {
            let _ = write!(out, ",\"encryptionType\":{}", js(e));
        }
        let _ = write!(
            out,
            "}},\"eventSource\":\"aws:kinesis\",\"eventVersion\":\"1.0\",\"eventID\":\"{}:{}\",\
             \"eventName\":\"aws:kinesis:record\",\"invokeIdentityArn\":{},\"awsRegion\":\"{region}\",\
             \"eventSourceARN\":{}}}",
            r.shard_id, r.sequence_number, role, stream
        );
    }
    out.push(']');
    if let Some(w) = window {
        let _ = write!(
            out,
            ",\"window\":{{\"start\":\"{}\",\"end\":\"{}\"}},\"state\":{},\"shardId\":{},\"eventSourceARN\":{},\
             \"isFinalInvokeForWindow\":{},\"isWindowTerminatedEarly\":{}",
            iso8601(w.start as f64),
            iso8601(w.end as f64),
            serde_json::to_string(w.state).unwrap_or_else(|_| "{}".into()),
            js(shard_id),
            stream,
            w.is_final,
            w.terminated_early
        );
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: &str, pk: &str, data: &[u8]) -> Rec {
        Rec {
            shard_id: Arc::from("shardId-000000000003"),
            sequence_number: seq.into(),
            seq: seq.parse().unwrap(),
            partition_key: pk.into(),
            data: bytes::Bytes::copy_from_slice(data),
            arrival: 1545084650.987,
            encryption: None,
            index: 0,
        }
    }

    const ARN: &str = "arn:aws:kinesis:us-east-2:000000000000:stream/s";

    #[test]
    fn parses_as_the_aws_event_type_and_as_our_own() {
        let recs = [
            rec("49590338271490256608559692538361571095921575989136588898", "k\"1", b"{\"a\":1}"),
            rec("2", "é", &[0xff, 0]),
        ];
        let json = event_json(&recs, "shardId-000000000003", ARN, "arn:aws:iam::000000000000:role/r", None);
        let e: aws_lambda_events::event::kinesis::KinesisEvent = serde_json::from_str(&json).unwrap();
        assert_eq!(e.records.len(), 2);
        let r = &e.records[0];
        assert_eq!(r.kinesis.partition_key, "k\"1");
        assert_eq!(r.kinesis.data.0, b"{\"a\":1}");
        assert_eq!(
            r.event_id.as_deref(),
            Some("shardId-000000000003:49590338271490256608559692538361571095921575989136588898")
        );
        assert_eq!(r.aws_region.as_deref(), Some("us-east-2"));
        assert_eq!(r.kinesis.approximate_arrival_timestamp.0.timestamp_millis(), 1545084650987);
        assert_eq!(e.records[1].kinesis.data.0, vec![0xff, 0]);
        let ours: pushpull::kinesis_event::KinesisEvent<'_> = serde_json::from_str(&json).unwrap();
        assert_eq!(ours.records.len(), 2);
        assert!(
            recs.iter().map(|r| r.encoded_len(ARN)).sum::<usize>() + 12 >= json.len(),
            "size estimate is an upper bound"
        );
    }

    #[test]
    fn window_events_carry_state_and_flags() {
        let state: WindowState = serde_json::json!({"n": "3", "count": 282}).as_object().unwrap().clone();
        let w = WindowPart {
            start: 1_700_000_000,
            end: 1_700_000_060,
            state: &state,
            is_final: true,
            terminated_early: false,
        };
        let json = event_json(&[], "shardId-000000000000", ARN, "r", Some(&w));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["window"]["start"], "2023-11-14T22:13:20Z");
        assert_eq!(v["window"]["end"], "2023-11-14T22:14:20Z");
        assert_eq!(v["state"]["n"], "3");
        assert_eq!(v["state"]["count"], 282, "a number stays a number");
        assert_eq!(v["isFinalInvokeForWindow"], true);
        assert_eq!(v["isWindowTerminatedEarly"], false);
        assert_eq!(v["shardId"], "shardId-000000000000");
        // aws_lambda_events types `state` as a map of strings: it reads an event whose state is
        // strings (a number is ours to pass on as AWS does, not its to read).
        let strings: WindowState = serde_json::json!({"n": "3"}).as_object().unwrap().clone();
        let json = event_json(&[], "shardId-000000000000", ARN, "r", Some(&WindowPart { state: &strings, ..w }));
        let e: aws_lambda_events::event::kinesis::KinesisTimeWindowEvent = serde_json::from_str(&json).unwrap();
        assert!(e.time_window_properties.is_final_invoke_for_window);
    }
}
