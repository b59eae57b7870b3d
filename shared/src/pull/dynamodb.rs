//! DynamoDB Streams batches (feature `dynamodb`): one handler per record, the partial batch
//! response by the stream rule (the mapping resumes from the lowest sequence number listed),
//! and item images read into your types from DynamoDB's attribute values by `serde_dynamo`
//! (binary values decoded from base64, numbers read from their text without a detour).
//!
//! The event types are the library's own, not `aws_lambda_events`': measured on a 1,000-record
//! batch, its types need `SizeBytes` and `awsRegion` on every record, read a missing image as an
//! empty one and a missing `ApproximateCreationDateTime` as 1970 (the batch metrics' oldest
//! record), and add chrono; the images are `serde_dynamo::Item`s as in `aws_lambda_events`
//! (BENCHMARKS.md, "SQS and DynamoDB event types").
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
use serde_dynamo::Item;

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
#[non_exhaustive]
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
#[non_exhaustive]
pub struct StreamRecord {
    /// The item's key attributes.
    #[serde(default)]
    pub keys: Item,
    /// The item after the change, if the stream carries it.
    #[serde(default)]
    pub new_image: Option<Item>,
    /// The item before the change, if the stream carries it.
    #[serde(default)]
    pub old_image: Option<Item>,
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

    /// The new image as `T` (attribute values read by `serde_dynamo`: `{"N":"1"}` is `1`,
    /// `{"B":"aGk="}` the bytes `hi`), if present. A binary attribute needs a field that takes
    /// bytes (`serde_bytes::ByteBuf`); `serde_json::Value` does not, so an image holding one does
    /// not read as a `Value`: read it into a struct of the fields you need.
    pub fn new_image<T: serde::de::DeserializeOwned>(&self) -> Result<Option<T>, DecodeError> {
        self.image(self.dynamodb.new_image.as_ref())
    }

    /// The old image as `T`, if present.
    pub fn old_image<T: serde::de::DeserializeOwned>(&self) -> Result<Option<T>, DecodeError> {
        self.image(self.dynamodb.old_image.as_ref())
    }

    fn image<T: serde::de::DeserializeOwned>(&self, image: Option<&Item>) -> Result<Option<T>, DecodeError> {
        let Some(image) = image else { return Ok(None) };
        serde_dynamo::from_item(image.clone()).map(Some).map_err(|source| DecodeError {
            item: self.dynamodb.sequence_number.clone(),
            format: "item",
            source: Box::new(source),
        })
    }

    /// The item's key as text, the same for the same key whatever the order of its attributes:
    /// what [`process_async`] orders records by.
    pub fn key_text(&self) -> String {
        let mut attrs: Vec<_> = self.dynamodb.keys.iter().collect();
        attrs.sort_by(|a, b| a.0.cmp(b.0));
        format!("{attrs:?}")
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
    let key_text: Vec<String> = event.records.iter().map(DynamoDbRecord::key_text).collect();
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
    fn a_bad_sequence_number_fails_the_batch() {
        let e =
            DynamoDbEvent::from_slice(br#"{"Records":[{"eventID":"e","dynamodb":{"SequenceNumber":"x"}}]}"#).unwrap();
        assert!(process(&e, Options::default(), |_| Ok::<_, String>(())).is_err());
    }

    fn attribute() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::json;
        let leaf = prop_oneof![
            any::<String>().prop_map(|s| json!({ "S": s })),
            any::<i64>().prop_map(|n| json!({ "N": n.to_string() })),
            any::<bool>().prop_map(|b| json!({ "BOOL": b })),
            Just(json!({ "NULL": true })),
            "[A-Za-z0-9+/]{0,8}".prop_map(|b| json!({ "B": b })),
            "\\PC{0,12}".prop_map(|s| json!({ "N": s })),
            "[A-Z]{1,4}".prop_map(|t| json!({ t: "x" })),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(|l| json!({ "L": l })),
                prop::collection::btree_map("[a-z]{1,4}", inner, 0..4).prop_map(|m| json!({ "M": m })),
            ]
        })
    }

    #[test]
    fn binary_values_are_decoded_and_long_numbers_read_exactly() {
        let e = DynamoDbEvent::from_slice(
            br#"{"Records":[{"eventID":"1","eventName":"INSERT","dynamodb":{"Keys":{"Id":{"N":"1"}},
              "NewImage":{"Id":{"N":"1"},"Blob":{"B":"aGk="},"Price":{"N":"0.30000000000000004"},"Big":{"N":"12345678901234567"}},
              "SequenceNumber":"5"}}]}"#,
        )
        .unwrap();
        #[derive(serde::Deserialize)]
        struct Row {
            #[serde(rename = "Blob")]
            blob: serde_bytes_like::Bytes,
            #[serde(rename = "Price")]
            price: f64,
            #[serde(rename = "Big")]
            big: u64,
        }
        let row: Row = e.records[0].new_image().unwrap().unwrap();
        assert_eq!(row.blob.0, b"hi");
        assert_eq!(row.price, 0.30000000000000004);
        assert_eq!(row.big, 12_345_678_901_234_567);
        assert!(e.records[0].old_image::<Row>().unwrap().is_none(), "no old image is None, not an empty item");
    }

    /// Bytes as serde_dynamo gives them (a byte buffer), without a serde_bytes dependency.
    mod serde_bytes_like {
        pub struct Bytes(pub Vec<u8>);
        impl<'de> serde::Deserialize<'de> for Bytes {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = Bytes;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("bytes")
                    }
                    fn visit_bytes<E>(self, v: &[u8]) -> Result<Bytes, E> {
                        Ok(Bytes(v.to_vec()))
                    }
                    fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Bytes, E> {
                        Ok(Bytes(v))
                    }
                }
                d.deserialize_byte_buf(V)
            }
        }
    }

    #[test]
    fn the_key_text_does_not_depend_on_attribute_order() {
        let e = DynamoDbEvent::from_slice(
            br#"{"Records":[{"dynamodb":{"Keys":{"a":{"S":"1"},"b":{"N":"2"}},"SequenceNumber":"1"}},
                            {"dynamodb":{"Keys":{"b":{"N":"2"},"a":{"S":"1"}},"SequenceNumber":"2"}}]}"#,
        )
        .unwrap();
        assert_eq!(e.records[0].key_text(), e.records[1].key_text());
    }

    proptest! {
        /// Any image of attribute values (unknown type tags and numbers that are not numbers
        /// among them) reads as a value or as an error naming the record: never a panic.
        #[test]
        fn any_image_reads_or_fails_naming_the_record(attrs in prop::collection::btree_map("[a-z]{1,4}", attribute(), 0..5)) {
            let record = serde_json::json!({"eventID": "e", "dynamodb": {"NewImage": attrs, "SequenceNumber": "9"}});
            let payload = serde_json::json!({"Records": [record]}).to_string();
            if let Ok(e) = DynamoDbEvent::from_slice(payload.as_bytes())
                && let Err(err) = e.records[0].new_image::<serde_json::Value>()
            {
                prop_assert!(err.to_string().starts_with("record 9: not the expected item"), "{}", err);
            }
        }
    }
}
