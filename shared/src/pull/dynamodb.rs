//! DynamoDB Streams batches (feature `dynamodb`): one handler per record, the partial batch
//! response by the stream rule (the mapping resumes from the lowest sequence number listed),
//! and item images turned from DynamoDB's attribute-value JSON into plain JSON.
//!
//! ```
//! use pushpull::pull::{dynamodb, Options};
//!
//! let event = dynamodb::DynamoDbEvent::from_slice(br#"{"Records":[
//!   {"eventID":"1","eventName":"INSERT","dynamodb":{"Keys":{"Id":{"N":"101"}},"NewImage":{"Id":{"N":"101"},"Name":{"S":"a"}},"SequenceNumber":"111"}},
//!   {"eventID":"2","eventName":"INSERT","dynamodb":{"Keys":{"Id":{"N":"102"}},"NewImage":{"Id":{"S":"oops"}},"SequenceNumber":"222"}}]}"#).unwrap();
//! #[derive(serde::Deserialize)]
//! struct Item { #[serde(rename = "Id")] id: u32 }
//! let result = dynamodb::process(&event, Options::default(), |record| {
//!     let item: Item = record.new_image()?.expect("INSERT has a new image");
//!     assert_eq!(item.id, 101);
//!     Ok::<_, pushpull::pull::DecodeError>(())
//! })
//! .unwrap();
//! let ids: Vec<_> = result.item_failures().into_iter().map(|f| f.item_identifier).collect();
//! assert_eq!(ids, ["222"]);
//! ```
use std::fmt::Display;
use std::future::Future;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{BatchResult, DecodeError, Options, ResponseRule};
use crate::sequence::{SequenceNumber, SequenceNumberError};

/// A DynamoDB Streams event: the records of one batch from one shard.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DynamoDbEvent {
    /// The records, in sequence-number order.
    #[serde(rename = "Records", default)]
    pub records: Vec<DynamoDbRecord>,
}

/// A payload that is not a DynamoDB Streams event.
#[derive(Debug, thiserror::Error)]
#[error("not a DynamoDB Streams event: {0}")]
pub struct DynamoDbEventError(#[source] serde_json::Error);

impl DynamoDbEvent {
    /// Parses an invocation payload.
    pub fn from_slice(payload: &[u8]) -> Result<Self, DynamoDbEventError> {
        serde_json::from_slice(payload).map_err(DynamoDbEventError)
    }
}

/// One change record.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DynamoDbRecord {
    /// The record's id.
    #[serde(rename = "eventID", default)]
    pub event_id: String,
    /// `INSERT`, `MODIFY` or `REMOVE`.
    #[serde(default)]
    pub event_name: String,
    /// The change.
    pub dynamodb: StreamRecord,
    /// The stream's ARN.
    #[serde(rename = "eventSourceARN", default)]
    pub event_source_arn: String,
}

/// The `dynamodb` part of a record, images in attribute-value JSON.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct StreamRecord {
    /// The item's key attributes.
    #[serde(default)]
    pub keys: Map<String, Value>,
    /// The item after the change, if the stream carries it.
    #[serde(default)]
    pub new_image: Option<Map<String, Value>>,
    /// The item before the change, if the stream carries it.
    #[serde(default)]
    pub old_image: Option<Map<String, Value>>,
    /// The sequence number: what the response names the record by.
    pub sequence_number: String,
    /// When the change was made, seconds since the epoch (`ApproximateCreationDateTime`).
    #[serde(default)]
    pub approximate_creation_date_time: Option<f64>,
}

impl DynamoDbRecord {
    /// The sequence number as an integer.
    pub fn sequence_number(&self) -> Result<SequenceNumber, SequenceNumberError> {
        self.dynamodb.sequence_number.parse()
    }

    /// The new image as `T` (attribute values unwrapped: `{"N":"1"}` is `1`), if present.
    pub fn new_image<T: serde::de::DeserializeOwned>(&self) -> Result<Option<T>, DecodeError> {
        self.image(self.dynamodb.new_image.as_ref())
    }

    /// The old image as `T`, if present.
    pub fn old_image<T: serde::de::DeserializeOwned>(&self) -> Result<Option<T>, DecodeError> {
        self.image(self.dynamodb.old_image.as_ref())
    }

    fn image<T: serde::de::DeserializeOwned>(
        &self,
        image: Option<&Map<String, Value>>,
    ) -> Result<Option<T>, DecodeError> {
        let Some(image) = image else { return Ok(None) };
        let plain = Value::Object(image.iter().map(|(k, v)| (k.clone(), unwrap_attribute(v))).collect());
        serde_json::from_value(plain)
            .map(Some)
            .map_err(|source| DecodeError { item: self.dynamodb.sequence_number.clone(), source })
    }
}

/// The batch's measures for [`crate::metrics::PullBatch`], before processing: the table (the
/// dimension), the records, the oldest change's time.
///
/// ```
/// let event = pushpull::pull::dynamodb::DynamoDbEvent::from_slice(br#"{"Records":[{"eventSourceARN":
///     "arn:aws:dynamodb:us-east-1:1:table/orders/stream/2026-01-01T00:00:00.000",
///     "dynamodb":{"SequenceNumber":"1","ApproximateCreationDateTime":1700000000}}]}"#).unwrap();
/// let m = pushpull::pull::dynamodb::batch_metrics(&event);
/// assert_eq!((m.stream.as_str(), m.batch_size, m.oldest_arrival), ("orders", 1, Some(1700000000.0)));
/// ```
pub fn batch_metrics(event: &DynamoDbEvent) -> crate::metrics::PullBatch {
    let arn = event.records.first().map_or("", |r| r.event_source_arn.as_str());
    let table = arn.split_once(":table/").map_or("unknown", |(_, rest)| rest.split('/').next().unwrap_or(rest));
    crate::metrics::PullBatch {
        stream: table.to_owned(),
        batch_size: event.records.len(),
        records_in: event.records.len(),
        processed: 0,
        failed: 0,
        oldest_arrival: event.records.iter().filter_map(|r| r.dynamodb.approximate_creation_date_time).reduce(f64::min),
    }
}

/// DynamoDB's attribute-value JSON as plain JSON: `S`, `N` (a number when it parses as one, else
/// its text), `BOOL`, `NULL`, `M`, `L`, and the sets `SS`, `NS`, `BS` as arrays; `B` stays base64.
///
/// ```
/// use serde_json::json;
/// let plain = pushpull::pull::dynamodb::unwrap_attribute(&json!({"M": {"a": {"N": "1.5"}, "b": {"L": [{"S": "x"}, {"NULL": true}]}}}));
/// assert_eq!(plain, json!({"a": 1.5, "b": ["x", null]}));
/// ```
pub fn unwrap_attribute(v: &Value) -> Value {
    let Some((tag, inner)) = v.as_object().filter(|o| o.len() == 1).and_then(|o| o.iter().next()) else {
        return v.clone();
    };
    let number = |n: &Value| {
        n.as_str()
            .and_then(|s| serde_json::from_str::<serde_json::Number>(s).ok())
            .map_or_else(|| n.clone(), Value::Number)
    };
    match (tag.as_str(), inner) {
        ("S" | "B" | "BOOL", x) => x.clone(),
        ("N", n) => number(n),
        ("NULL", _) => Value::Null,
        ("M", Value::Object(m)) => Value::Object(m.iter().map(|(k, v)| (k.clone(), unwrap_attribute(v))).collect()),
        ("L", Value::Array(items)) => Value::Array(items.iter().map(unwrap_attribute).collect()),
        ("SS" | "BS", x) => x.clone(),
        ("NS", Value::Array(items)) => Value::Array(items.iter().map(number).collect()),
        _ => v.clone(),
    }
}

/// The event cannot be processed record by record: the whole invocation must fail.
#[derive(Debug, Clone, thiserror::Error)]
#[error("record {event_id}: {source}")]
pub struct DynamoDbPullError {
    /// The record's eventID.
    pub event_id: String,
    /// Why its sequence number cannot be reported.
    pub source: SequenceNumberError,
}

fn check(event: &DynamoDbEvent) -> Result<(), DynamoDbPullError> {
    for r in &event.records {
        r.sequence_number().map_err(|source| DynamoDbPullError { event_id: r.event_id.clone(), source })?;
    }
    Ok(())
}

fn result_of(event: &DynamoDbEvent, outcomes: super::Outcomes) -> BatchResult {
    let mut result = BatchResult { rule: ResponseRule::Stream, ..Default::default() };
    result.absorb(outcomes, |i| event.records[i].dynamodb.sequence_number.clone());
    result
}

/// Runs `handler` on each record, in order.
pub fn process<F, E>(event: &DynamoDbEvent, options: Options, mut handler: F) -> Result<BatchResult, DynamoDbPullError>
where
    F: FnMut(&DynamoDbRecord) -> Result<(), E>,
    E: Display,
{
    check(event)?;
    let outcomes = super::run_in_order(event.records.len(), &options, |i| handler(&event.records[i]));
    Ok(result_of(event, outcomes))
}

/// Runs an async `handler` on each record: in order, or with [`Options::per_key`] that many
/// items (by their key attributes) at a time, in order per item.
pub async fn process_async<F, Fut, E>(
    event: &DynamoDbEvent,
    options: Options,
    handler: F,
) -> Result<BatchResult, DynamoDbPullError>
where
    F: Fn(DynamoDbRecord) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    check(event)?;
    let key_text: Vec<String> =
        event.records.iter().map(|r| Value::Object(r.dynamodb.keys.clone()).to_string()).collect();
    let keys: Vec<&str> = key_text.iter().map(String::as_str).collect();
    let handler = &handler;
    let outcomes = super::run_concurrently(&keys, &options, |i| handler(event.records[i].clone())).await;
    Ok(result_of(event, outcomes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_aws_sample_event_parses() {
        let payload = include_str!("../../../events/dynamodb-batch.json");
        let event = DynamoDbEvent::from_slice(payload.as_bytes()).unwrap();
        assert_eq!(event.records.len(), 3);
        assert_eq!(event.records[0].dynamodb.sequence_number, "111");
        let r =
            process(&event, Options::default(), |r| if r.event_name == "MODIFY" { Err("no") } else { Ok(()) }).unwrap();
        assert_eq!(r.item_failures()[0].item_identifier, "222");
    }

    #[test]
    fn a_bad_sequence_number_fails_the_batch() {
        let e =
            DynamoDbEvent::from_slice(br#"{"Records":[{"eventID":"e","dynamodb":{"SequenceNumber":"x"}}]}"#).unwrap();
        assert!(process(&e, Options::default(), |_| Ok::<_, String>(())).is_err());
    }

    fn attribute() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            any::<String>().prop_map(|s| serde_json::json!({ "S": s })),
            any::<i64>().prop_map(|n| serde_json::json!({ "N": n.to_string() })),
            any::<bool>().prop_map(|b| serde_json::json!({ "BOOL": b })),
            Just(serde_json::json!({ "NULL": true })),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(|l| serde_json::json!({ "L": l })),
                prop::collection::btree_map("[a-z]{1,4}", inner, 0..4).prop_map(|m| serde_json::json!({ "M": m })),
            ]
        })
    }

    proptest! {
        /// Every attribute value unwraps without a panic, and none of its type tags survive at
        /// the top of a value that had one.
        #[test]
        fn attribute_values_unwrap(v in attribute()) {
            let plain = unwrap_attribute(&v);
            if let Some(o) = plain.as_object() {
                prop_assert!(!(o.len() == 1 && ["S", "N", "BOOL", "NULL", "L"].iter().any(|t| o.contains_key(*t)) && v.get("M").is_none()));
            }
        }
    }
}
