//! A Kafka record as the mapping handles it, and the event it becomes: AWS's `SelfManagedKafka`
//! (or `aws:kafka`) event, the `KafkaBatchInfo` of a failure record, and the `itemIdentifier` of a
//! Kafka partial batch response.
//!
//! AWS (with-kafka.html, "Example event"; with-msk.html): records keyed `topic-partition`, "a
//! timestamp and a base64-encoded message", headers as lists of bytes. Choices where AWS's pages
//! are silent (docs/kafka-aws-rules.md §1): a null key or value (a tombstone) leaves its field
//! out; header bytes are written signed, as Java's bytes are (the evidence: Powertools and the Go
//! and .NET event types read them so).
use std::fmt::Write as _;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::mapping::event::iso8601_millis;
use crate::mapping::source::Record;

/// One record read from a partition.
#[derive(Debug, Clone)]
pub(crate) struct KRec {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// The offset as text (the record's position in logs).
    pub offset_text: String,
    /// Kafka's timestamp (ms), if the record has one.
    pub timestamp: Option<i64>,
    /// `CREATE_TIME` or `LOG_APPEND_TIME` (`NO_TIMESTAMP_TYPE` without a timestamp).
    pub timestamp_type: &'static str,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    /// Name and value (`None`: a header without one).
    pub headers: Vec<(String, Option<Bytes>)>,
    /// When it arrived (its timestamp; the read time without one), unix seconds.
    pub arrival: f64,
    /// Its place among the records read from the partition.
    pub index: u64,
}

impl Record for KRec {
    fn index(&self) -> u64 {
        self.index
    }

    fn ordering_key(&self) -> &[u8] {
        // One lane per partition (Kafka keeps order per partition): the key does not choose one.
        &[]
    }

    fn data(&self) -> &[u8] {
        self.value.as_deref().unwrap_or_default()
    }

    fn arrival(&self) -> f64 {
        self.arrival
    }

    fn position(&self) -> &str {
        &self.offset_text
    }
}

/// What every event of a mapping carries besides its records.
#[derive(Debug, Clone)]
pub(crate) struct Envelope {
    /// `SelfManagedKafka`, or `aws:kafka` for MSK.
    pub event_source: &'static str,
    /// The MSK cluster's ARN (none for self-managed Kafka).
    pub event_source_arn: Option<String>,
    /// Comma-separated, as AWS writes it.
    pub bootstrap_servers: String,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Bytes `rec` takes in an event, at most (base64 is 4/3; a header byte at most 5 characters).
pub(crate) fn encoded_len(rec: &KRec) -> usize {
    let b = |n: usize| n.div_ceil(3) * 4;
    let headers: usize = rec.headers.iter().map(|(k, v)| k.len() * 2 + 8 + v.as_ref().map_or(4, |v| v.len() * 5)).sum();
    200 + rec.topic.len()
        + rec.key.as_ref().map_or(0, |k| b(k.len()))
        + rec.value.as_ref().map_or(0, |v| b(v.len()))
        + headers
}

/// The record as the event writes it.
fn record_json(out: &mut String, rec: &KRec) {
    let topic = serde_json::to_string(&*rec.topic).unwrap_or_default();
    let _ = write!(
        out,
        r#"{{"topic":{topic},"partition":{},"offset":{},"timestamp":{},"timestampType":"{}""#,
        rec.partition,
        rec.offset,
        rec.timestamp.unwrap_or(-1),
        rec.timestamp_type
    );
    if let Some(k) = &rec.key {
        let _ = write!(out, r#","key":"{}""#, b64(k));
    }
    if let Some(v) = &rec.value {
        let _ = write!(out, r#","value":"{}""#, b64(v));
    }
    out.push_str(r#","headers":["#);
    for (i, (name, value)) in rec.headers.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let name = serde_json::to_string(name).unwrap_or_default();
        let Some(value) = value else {
            let _ = write!(out, "{{{name}:null}}");
            continue;
        };
        let _ = write!(out, "{{{name}:[");
        for (j, b) in value.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            let _ = write!(out, "{}", *b as i8);
        }
        out.push_str("]}");
    }
    out.push_str("]}");
}

/// The event for `records`, all of partition `name` (`topic-N`).
pub(crate) fn event_json(envelope: &Envelope, name: &str, records: &[KRec]) -> String {
    let mut out = String::with_capacity(256 + records.iter().map(encoded_len).sum::<usize>());
    let _ = write!(out, r#"{{"eventSource":"{}""#, envelope.event_source);
    if let Some(arn) = &envelope.event_source_arn {
        let _ = write!(out, r#","eventSourceArn":{}"#, serde_json::to_string(arn).unwrap_or_default());
    }
    let servers = serde_json::to_string(&envelope.bootstrap_servers).unwrap_or_default();
    let name = serde_json::to_string(name).unwrap_or_default();
    let _ = write!(out, r#","bootstrapServers":{servers},"records":{{{name}:["#);
    for (i, rec) in records.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        record_json(&mut out, rec);
    }
    out.push_str("]}}");
    out
}

/// `KafkaBatchInfo` of a failure record, as AWS writes it (with-msk-on-failure.html):
/// `batchSize`, `eventSourceArn`, `bootstrapServers`, `payloadSize` and per `topic-partition`
/// the first and last offsets (as text) and timestamps.
pub(crate) fn batch_info(envelope: &Envelope, name: &str, records: &[KRec]) -> (&'static str, Value) {
    let (first, last) = (records.first(), records.last());
    let time = |r: Option<&KRec>| r.map(|r| iso8601_millis(r.timestamp.map_or(r.arrival, |t| t as f64 / 1000.0)));
    let mut info = json!({
        "batchSize": records.len(),
        "bootstrapServers": envelope.bootstrap_servers,
        "payloadSize": event_json(envelope, name, records).len(),
        "recordsInfo": {
            name: {
                "firstRecordOffset": first.map(|r| r.offset.to_string()),
                "lastRecordOffset": last.map(|r| r.offset.to_string()),
                "firstRecordTimestamp": time(first),
                "lastRecordTimestamp": time(last),
            }
        },
    });
    if let Some(arn) = &envelope.event_source_arn {
        info["eventSourceArn"] = Value::from(arn.as_str());
    }
    ("KafkaBatchInfo", info)
}

/// The index in `batch` (records of partition `name`) of the record a Kafka partial batch
/// response names. AWS (kafka-retry-configurations.html): `{"itemIdentifier": {"partition":
/// "topic-partition_number", "offset": 100}}`; "Any invalid topic-partition_number or offset
/// returned that was not present in the invoked event will be treated as failure and entire
/// batch will be retried."
pub(crate) fn item_index(name: &str, batch: &[KRec], identifier: &Value) -> Result<usize, String> {
    let Value::Object(o) = identifier else {
        return Err(format!("itemIdentifier {identifier} is not {{\"partition\": \"topic-N\", \"offset\": N}}"));
    };
    match o.get("partition") {
        Some(Value::String(p)) if p == name => {}
        other => {
            return Err(format!(
                "itemIdentifier {identifier}: partition {} is not this batch's {name:?}",
                other.map_or_else(|| "missing".to_owned(), Value::to_string)
            ));
        }
    }
    let Some(offset) = o.get("offset").and_then(Value::as_i64) else {
        return Err(format!("itemIdentifier {identifier}: offset is not a number"));
    };
    batch
        .iter()
        .position(|r| r.offset == offset)
        .ok_or_else(|| format!("itemIdentifier {identifier}: offset {offset} is not in the batch"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(offset: i64, value: Option<&[u8]>) -> KRec {
        KRec {
            topic: Arc::from("orders"),
            partition: 3,
            offset,
            offset_text: offset.to_string(),
            timestamp: Some(1_545_084_650_987),
            timestamp_type: "CREATE_TIME",
            key: Some(Bytes::from_static(b"k")),
            value: value.map(Bytes::copy_from_slice),
            headers: vec![("h".into(), Some(Bytes::from_static(&[104, 0xc3, 0xab]))), ("empty".into(), None)],
            arrival: 1_545_084_650.987,
            index: offset as u64,
        }
    }

    fn envelope() -> Envelope {
        Envelope {
            event_source: "SelfManagedKafka",
            event_source_arn: None,
            bootstrap_servers: "127.0.0.1:9092".into(),
        }
    }

    /// The event reads back through the library's own Kafka event type, field by field: base64
    /// key and value, a tombstone without `value`, signed header bytes.
    #[test]
    fn the_event_is_the_library_s_kafka_event() {
        let recs = [rec(15, Some(b"hello")), rec(16, None)];
        let text = event_json(&envelope(), "orders-3", &recs);
        assert!(encoded_len(&recs[0]) + encoded_len(&recs[1]) + 100 >= text.len());
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["eventSource"], "SelfManagedKafka");
        assert!(v.get("eventSourceArn").is_none());
        let list = &v["records"]["orders-3"];
        assert_eq!(list[0]["value"], "aGVsbG8=");
        assert_eq!(list[0]["headers"][0]["h"], json!([104, -61, -85]));
        assert!(list[1].get("value").is_none(), "a tombstone has no value: {}", list[1]);
        assert_eq!(list[1]["offset"], 16);
        // And as the library reads it.
        let event = pushpull::pull::kafka::KafkaEvent::from_slice(text.as_bytes()).unwrap();
        let read: Vec<_> = event.all_records().collect();
        assert_eq!(read[0].value_bytes().unwrap().as_deref(), Some(&b"hello"[..]));
        assert_eq!(read[0].key_bytes().unwrap().as_deref(), Some(&b"k"[..]));
        assert_eq!(read[0].headers().unwrap(), vec![("h", Some(vec![104, 0xc3, 0xab])), ("empty", None)]);
        assert_eq!(read[0].timestamp, Some(1_545_084_650_987));
        assert_eq!(read[1].value_bytes().unwrap(), None);
    }

    #[test]
    fn item_identifiers_name_a_partition_and_an_offset_of_the_batch() {
        let recs = [rec(15, Some(b"a")), rec(16, Some(b"b"))];
        let id = |v: Value| item_index("orders-3", &recs, &v);
        assert_eq!(id(json!({"partition": "orders-3", "offset": 16})), Ok(1));
        for bad in [
            json!({"partition": "orders-2", "offset": 16}),
            json!({"partition": "orders-3", "offset": 17}),
            json!({"partition": "orders-3", "offset": "16"}),
            json!({"offset": 16}),
            json!("16"),
        ] {
            assert!(id(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn batch_info_names_first_and_last_offsets_as_text() {
        let recs = [rec(15, Some(b"a")), rec(16, Some(b"b"))];
        let (key, info) = batch_info(&envelope(), "orders-3", &recs);
        assert_eq!(key, "KafkaBatchInfo");
        assert_eq!(info["recordsInfo"]["orders-3"]["firstRecordOffset"], "15");
        assert_eq!(info["recordsInfo"]["orders-3"]["lastRecordOffset"], "16");
        assert_eq!(info["batchSize"], 2);
        assert_eq!(info["recordsInfo"]["orders-3"]["firstRecordTimestamp"], "2018-12-17T22:10:50.987Z");
    }
}
