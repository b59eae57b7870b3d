//! Kafka batches (feature `kafka`): Amazon MSK (`aws:kafka`) and self-managed Apache Kafka
//! (`SelfManagedKafka`) events, one handler per record, each partition's records in offset order,
//! and the partial batch response in Kafka's shape.
//!
//! AWS: "Each array item contains details of the Amazon MSK topic and partition identifier,
//! together with a timestamp and a base64-encoded message" (Lambda developer guide, with-msk.html,
//! "Example event"); the records are grouped under `"<topic>-<partition>"`. The response names a
//! failed record by its partition and offset:
//! `{"batchItemFailures":[{"itemIdentifier":{"partition":"topic-partition_number","offset":100}}]}`,
//! and "Any invalid topic-partition_number or offset returned that was not present in the invoked
//! event will be treated as failure and entire batch will be retried" (kafka-retry-configurations.html).
//! AWS does not say whether the records after a listed one are delivered again, so this module
//! keeps each partition's order itself: a failed record stops the rest of its partition (of the
//! whole batch when records run one at a time), and every failed record and every record not
//! reached is listed. Whether the mapping retries only those or everything from the lowest, no
//! record of a partition is handled after a later one.
//!
//! **Partial batch responses need provisioned mode.** AWS reads them only from a mapping in
//! provisioned mode with `ReportBatchItemFailures` ("Under Event poller configuration, select
//! provisioned mode to configure error handling controls", kafka-retry-configurations.html). A
//! mapping in on-demand mode (the default) takes any answer as success and commits the batch:
//! there, fail the invocation instead (return an error from a `run_raw` handler when
//! [`process`]'s result has failures), or failed records are skipped.
//!
//! Where AWS's pages are silent, what this module accepts: `partition` as a number or a string
//! (older examples show `"0"`); a `key` or `value` absent or `null` (a null key, a tombstone);
//! header bytes signed (`[-61,-85]` for `ë`, as AWS's own client libraries read them) or unsigned.
//!
//! ```
//! use pushpull::pull::{kafka, Options};
//!
//! let event = kafka::KafkaEvent::from_slice(br#"{"eventSource":"SelfManagedKafka","bootstrapServers":"127.0.0.1:9092",
//!   "records":{"orders-0":[
//!     {"topic":"orders","partition":0,"offset":15,"timestamp":1545084650987,"timestampType":"CREATE_TIME","value":"eyJuIjoxfQ==","headers":[]},
//!     {"topic":"orders","partition":0,"offset":16,"timestamp":1545084650988,"timestampType":"CREATE_TIME","value":"b29wcw==","headers":[]}]}}"#).unwrap();
//! #[derive(serde::Deserialize)]
//! struct Order { n: u32 }
//! let result = kafka::process(&event, Options::default(), |record| {
//!     let order: Order = record.json()?;
//!     assert_eq!(order.n, 1);
//!     Ok::<_, pushpull::pull::DecodeError>(())
//! })
//! .unwrap();
//! let response = kafka::response(&event, &result);
//! assert_eq!(serde_json::to_string(&response).unwrap(),
//!     r#"{"batchItemFailures":[{"itemIdentifier":{"partition":"orders-0","offset":16}}]}"#);
//! ```
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Display;
use std::future::Future;

use serde::{Deserialize, Deserializer, Serialize};

use super::{BatchResult, DecodeError, Options, ResponseRule, parse_json};

/// A Kafka event: the records of one batch, by partition, borrowed from the payload (a key or
/// value is base64 text, copied only if the payload escaped a character in it).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KafkaEvent<'a> {
    /// `aws:kafka` (MSK) or `SelfManagedKafka`.
    #[serde(default, borrow)]
    pub event_source: Cow<'a, str>,
    /// The MSK cluster's ARN (absent for self-managed Kafka).
    #[serde(default, borrow, deserialize_with = "borrowed")]
    pub event_source_arn: Option<Cow<'a, str>>,
    /// The brokers, comma-separated.
    #[serde(default, borrow)]
    pub bootstrap_servers: Cow<'a, str>,
    /// Each partition's records (`"<topic>-<partition>"`), in offset order.
    #[serde(default, borrow)]
    pub records: BTreeMap<Cow<'a, str>, Vec<KafkaRecord<'a>>>,
}

/// A payload that is not a Kafka event.
#[derive(Debug, thiserror::Error)]
#[error("not a Kafka event: {0}")]
pub struct KafkaEventError(#[source] serde_json::Error);

impl<'a> KafkaEvent<'a> {
    /// Parses an invocation payload.
    pub fn from_slice(payload: &'a [u8]) -> Result<Self, KafkaEventError> {
        serde_json::from_slice(payload).map_err(KafkaEventError)
    }

    /// Every record: partitions in the order of their names, each partition's in offset order.
    pub fn all_records(&self) -> impl Iterator<Item = &KafkaRecord<'a>> {
        self.records.values().flatten()
    }

    /// The number of records.
    pub fn len(&self) -> usize {
        self.records.values().map(Vec::len).sum()
    }

    /// Whether the batch has no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One Kafka record as the mapping delivers it: key and value in base64, borrowed from the
/// payload ([`KafkaRecord::into_owned`] for a record that outlives it; the runners hand each
/// handler one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct KafkaRecord<'a> {
    /// The topic.
    #[serde(borrow)]
    pub topic: Cow<'a, str>,
    /// The partition.
    #[serde(deserialize_with = "number_or_text")]
    pub partition: i32,
    /// The record's offset in its partition.
    pub offset: i64,
    /// Milliseconds since the epoch; `None` when absent (Kafka writes -1 for none: also `None`).
    #[serde(default, deserialize_with = "positive")]
    pub timestamp: Option<i64>,
    /// `CREATE_TIME` or `LOG_APPEND_TIME`.
    #[serde(default, borrow)]
    pub timestamp_type: Cow<'a, str>,
    /// The key in base64; `None` for a record without one.
    #[serde(default, borrow, deserialize_with = "borrowed")]
    pub key: Option<Cow<'a, str>>,
    /// The value in base64; `None` for a tombstone.
    #[serde(default, borrow, deserialize_with = "borrowed")]
    pub value: Option<Cow<'a, str>>,
    /// Headers, each a one-entry map of name to bytes (signed as Java writes them, or not); a
    /// header without a value is `None`.
    #[serde(default)]
    pub headers: Vec<BTreeMap<String, Option<Vec<i16>>>>,
}

/// Text borrowed from the payload where it has no escapes (serde borrows a `Cow<str>` only as a
/// field of its own, not inside an `Option`).
#[derive(Deserialize)]
struct BorrowedText<'a>(#[serde(borrow)] Cow<'a, str>);

fn borrowed<'de: 'a, 'a, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'a, str>>, D::Error> {
    Ok(Option::<BorrowedText<'a>>::deserialize(d)?.map(|t| t.0))
}

fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Ok(Option::<i64>::deserialize(d)?.filter(|t| *t >= 0))
}

fn number_or_text<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    struct Partition;
    impl serde::de::Visitor<'_> for Partition {
        type Value = i32;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a partition number, or its text")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<i32, E> {
            i32::try_from(v).map_err(E::custom)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<i32, E> {
            i32::try_from(v).map_err(E::custom)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<i32, E> {
            v.parse().map_err(E::custom)
        }
    }
    d.deserialize_any(Partition)
}

/// A record that owns its text: what `process_async` and `lambda::run_kafka` hand a handler.
pub type OwnedKafkaRecord = KafkaRecord<'static>;

impl KafkaRecord<'_> {
    /// The record with everything it borrows copied, to outlive the payload.
    pub fn into_owned(self) -> KafkaRecord<'static> {
        KafkaRecord {
            topic: Cow::Owned(self.topic.into_owned()),
            partition: self.partition,
            offset: self.offset,
            timestamp: self.timestamp,
            timestamp_type: Cow::Owned(self.timestamp_type.into_owned()),
            key: self.key.map(|k| Cow::Owned(k.into_owned())),
            value: self.value.map(|v| Cow::Owned(v.into_owned())),
            headers: self.headers,
        }
    }

    /// `"<topic>-<partition>"`: the key of its partition in the event and in the response.
    pub fn topic_partition(&self) -> String {
        format!("{}-{}", self.topic, self.partition)
    }

    /// What the response names it by.
    pub fn item_identifier(&self) -> KafkaItemIdentifier {
        KafkaItemIdentifier { partition: self.topic_partition(), offset: self.offset }
    }

    fn name(&self) -> String {
        format!("{}@{}", self.topic_partition(), self.offset)
    }

    /// Forgiving base64 (WHATWG's): the bits after the last whole byte need not be zero, as in
    /// AWS's own sample key (`...1234==`).
    fn decode(&self, what: &str, b64: Option<&str>) -> Result<Option<Vec<u8>>, DecodeError> {
        let Some(b64) = b64 else { return Ok(None) };
        base64_simd::forgiving_decode_to_vec(b64.as_bytes()).map(Some).map_err(|e| DecodeError {
            item: self.name(),
            format: "base64",
            source: format!("{what}: {e}").into(),
        })
    }

    /// The key's bytes; `None` when the record has no key.
    pub fn key_bytes(&self) -> Result<Option<Vec<u8>>, DecodeError> {
        self.decode("key", self.key.as_deref())
    }

    /// The value's bytes; `None` for a tombstone (a record that deletes its key).
    pub fn value_bytes(&self) -> Result<Option<Vec<u8>>, DecodeError> {
        self.decode("value", self.value.as_deref())
    }

    /// The value as JSON into `T`; a tombstone is an error naming the record.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, DecodeError> {
        let value = self.value_bytes()?.ok_or_else(|| DecodeError {
            item: self.name(),
            format: "JSON",
            source: "no value (a tombstone)".into(),
        })?;
        parse_json::<T>(&value, || self.name())
    }

    /// The headers in order, as name and bytes (a signed byte `-61` is `0xC3`; a header without
    /// a value is `None`), or an error naming the record if a byte is outside -128..=255.
    pub fn headers(&self) -> Result<Vec<Header<'_>>, DecodeError> {
        let mut out = Vec::new();
        for (name, bytes) in self.headers.iter().flatten() {
            let bytes = match bytes {
                None => None,
                Some(bytes) => Some(
                    bytes
                        .iter()
                        .map(|b| match *b {
                            -128..=-1 => Ok(*b as u8),
                            0..=255 => Ok(*b as u8),
                            _ => Err(DecodeError {
                                item: self.name(),
                                format: "header",
                                source: format!("header {name}: {b} is not a byte").into(),
                            }),
                        })
                        .collect::<Result<Vec<u8>, DecodeError>>()?,
                ),
            };
            out.push((name.as_str(), bytes));
        }
        Ok(out)
    }
}

/// A header: its name and its bytes (`None`: a header without a value).
pub type Header<'a> = (&'a str, Option<Vec<u8>>);

/// A record in a Kafka partial batch response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaItemIdentifier {
    /// `"<topic>-<partition>"`.
    pub partition: String,
    /// The record's offset.
    pub offset: i64,
}

/// One entry of a [`KafkaBatchResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KafkaItemFailure {
    /// The record.
    pub item_identifier: KafkaItemIdentifier,
}

/// The partial batch response in Kafka's shape.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KafkaBatchResponse {
    /// The records to retry.
    pub batch_item_failures: Vec<KafkaItemFailure>,
}

/// The event cannot be answered record by record: the whole invocation must fail.
#[derive(Debug, Clone, thiserror::Error)]
#[error("records under {key}: {problem}")]
pub struct KafkaPullError {
    /// The event's partition key the records were under.
    pub key: String,
    /// What is wrong.
    pub problem: String,
}

fn check(event: &KafkaEvent<'_>) -> Result<(), KafkaPullError> {
    for (key, records) in &event.records {
        let mut last = None;
        for r in records {
            if r.topic_partition() != *key {
                return Err(KafkaPullError {
                    key: key.to_string(),
                    problem: format!("a record of {} (it could not be named in the response)", r.topic_partition()),
                });
            }
            if last.is_some_and(|l| r.offset <= l) {
                return Err(KafkaPullError {
                    key: key.to_string(),
                    problem: format!("offset {} out of order", r.offset),
                });
            }
            last = Some(r.offset);
        }
    }
    Ok(())
}

/// A failure stops the rest of its partition: with one record at a time, the rest of the batch.
fn partition_order(mut options: Options) -> Options {
    if options.concurrency() <= 1 {
        options.stop_at_first_failure = true;
    }
    options
}

/// The batch's result; only the records that failed or were not reached are named.
fn result_of(records: &[&KafkaRecord<'_>], outcomes: super::Outcomes) -> BatchResult {
    let mut result = BatchResult { rule: ResponseRule::Queue, ..Default::default() };
    result.absorb(outcomes, |i| records[i].name());
    result
}

/// Runs `handler` on each record in order; the first failure stops the batch (the rest is listed).
pub fn process<'a, F, E>(
    event: &KafkaEvent<'a>,
    options: Options,
    mut handler: F,
) -> Result<BatchResult, KafkaPullError>
where
    F: FnMut(&KafkaRecord<'a>) -> Result<(), E>,
    E: Display,
{
    check(event)?;
    let records: Vec<&KafkaRecord<'a>> = event.all_records().collect();
    let outcomes = super::run_in_order(records.len(), &partition_order(options), |i| handler(records[i]));
    Ok(result_of(&records, outcomes))
}

/// Runs an async `handler` on each record (its own copy: [`KafkaRecord::into_owned`]): in order,
/// or with [`Options::per_key`] that many partitions at a time, each partition's records in
/// offset order (a failure stops the rest of its partition).
pub async fn process_async<F, Fut, E>(
    event: &KafkaEvent<'_>,
    options: Options,
    handler: F,
) -> Result<BatchResult, KafkaPullError>
where
    F: Fn(KafkaRecord<'static>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    check(event)?;
    let records: Vec<&KafkaRecord<'_>> = event.all_records().collect();
    // Each record's partition key as the event names it (check() made sure they agree).
    let keys: Vec<&str> = event.records.iter().flat_map(|(key, rs)| rs.iter().map(move |_| key.as_ref())).collect();
    let handler = &handler;
    let outcomes =
        super::run_concurrently(&keys, &partition_order(options), |i| handler(records[i].clone().into_owned())).await;
    Ok(result_of(&records, outcomes))
}

/// The partial batch response for `result` (of `event`): every failed record and every record not
/// reached, by partition and offset. (`BatchResult::response` is the other sources' shape, with
/// text identifiers: not for Kafka.)
pub fn response(event: &KafkaEvent<'_>, result: &BatchResult) -> KafkaBatchResponse {
    let records: Vec<&KafkaRecord<'_>> = event.all_records().collect();
    let mut listed: Vec<usize> = result.failures.iter().map(|f| f.index).collect();
    listed.extend(result.unprocessed.iter().map(|u| u.index));
    listed.sort_unstable();
    listed.dedup();
    KafkaBatchResponse {
        batch_item_failures: listed
            .into_iter()
            .filter_map(|i| records.get(i))
            .map(|r| KafkaItemFailure { item_identifier: r.item_identifier() })
            .collect(),
    }
}

/// The batch's measures for [`crate::metrics::PullBatch`], before processing: the topic (the
/// dimension; the first record's), the records, the oldest record's timestamp.
///
/// ```
/// let event = pushpull::pull::kafka::KafkaEvent::from_slice(br#"{"records":{"t-0":[
///     {"topic":"t","partition":0,"offset":1,"timestamp":1700000000500}]}}"#).unwrap();
/// let m = pushpull::pull::kafka::batch_metrics(&event);
/// assert_eq!((m.stream.as_str(), m.batch_size, m.oldest_arrival), ("t", 1, Some(1700000000.5)));
/// ```
pub fn batch_metrics(event: &KafkaEvent<'_>) -> crate::metrics::PullBatch {
    let topic = event.all_records().next().map_or("unknown", |r| r.topic.as_ref());
    crate::metrics::PullBatch {
        stream: topic.to_owned(),
        batch_size: event.len(),
        records_in: event.len(),
        processed: 0,
        failed: 0,
        oldest_arrival: event.all_records().filter_map(|r| r.timestamp).map(|t| t as f64 / 1000.0).reduce(f64::min),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(records: serde_json::Value) -> KafkaEvent<'static> {
        let payload = serde_json::json!({"eventSource": "aws:kafka", "bootstrapServers": "b:9092", "records": records});
        let payload: &'static [u8] = payload.to_string().into_bytes().leak();
        KafkaEvent::from_slice(payload).unwrap()
    }

    fn rec(topic: &str, partition: i32, offset: i64, value: Option<&str>) -> serde_json::Value {
        let mut r = serde_json::json!({"topic": topic, "partition": partition, "offset": offset, "timestamp": 1, "timestampType": "CREATE_TIME", "headers": []});
        if let Some(v) = value {
            r["value"] = base64_simd::STANDARD.encode_to_string(v).into();
        }
        r
    }

    #[test]
    fn tombstones_null_keys_signed_header_bytes_and_text_partitions_are_read() {
        let e = event(serde_json::json!({"t-1": [
            {"topic": "t", "partition": "1", "offset": 7, "key": null, "value": null, "timestamp": -1,
             "headers": [{"h": [-61, -85]}, {"u": [195, 171]}, {"empty": null}]},
        ]}));
        let r = e.all_records().next().unwrap();
        assert_eq!(r.partition, 1);
        assert_eq!((r.key_bytes().unwrap(), r.value_bytes().unwrap()), (None, None));
        let e_acute = Some("ë".as_bytes().to_vec());
        assert_eq!(r.headers().unwrap(), [("h", e_acute.clone()), ("u", e_acute), ("empty", None)]);
        assert_eq!(r.timestamp, None, "-1: no timestamp");
        let err = r.json::<serde_json::Value>().unwrap_err().to_string();
        assert_eq!(err, "record t-1@7: not the expected JSON: no value (a tombstone)");
    }

    #[test]
    fn every_failed_and_unreached_record_is_listed_by_partition_and_offset() {
        let e = event(serde_json::json!({
            "a-0": [rec("a", 0, 1, Some("{}")), rec("a", 0, 2, Some("x")), rec("a", 0, 3, Some("{}"))],
            "a-1": [rec("a", 1, 9, Some("{}"))],
        }));
        let r = process(&e, Options::default(), |r| r.json::<serde_json::Value>().map(drop)).unwrap();
        let listed: Vec<_> = response(&e, &r).batch_item_failures.into_iter().map(|f| f.item_identifier).collect();
        let id = |p: &str, offset| KafkaItemIdentifier { partition: p.into(), offset };
        assert_eq!(listed, [id("a-0", 2), id("a-0", 3), id("a-1", 9)]);
        assert_eq!(r.processed, 1);
    }

    #[tokio::test]
    async fn one_at_a_time_a_failure_stops_the_batch_so_no_later_offset_runs_before_it() {
        let e = event(serde_json::json!({"a-0": [rec("a", 0, 10, Some("x")), rec("a", 0, 11, Some("{}"))]}));
        for per_key in [None, Some(1)] {
            let options = per_key.map_or(Options::default(), |n| Options::default().per_key(n));
            let r =
                process_async(&e, options, |r| async move { r.json::<serde_json::Value>().map(drop) }).await.unwrap();
            let listed: Vec<i64> =
                response(&e, &r).batch_item_failures.iter().map(|f| f.item_identifier.offset).collect();
            assert_eq!((listed, r.processed), (vec![10, 11], 0), "{per_key:?}");
        }
    }

    #[tokio::test]
    async fn partitions_run_concurrently_and_a_failure_stops_only_its_partition() {
        let e = event(serde_json::json!({
            "a-0": [rec("a", 0, 1, Some("x")), rec("a", 0, 2, Some("{}"))],
            "a-1": [rec("a", 1, 5, Some("{}")), rec("a", 1, 6, Some("{}"))],
        }));
        let r = process_async(
            &e,
            Options::default().per_key(4),
            |r| async move { r.json::<serde_json::Value>().map(drop) },
        )
        .await
        .unwrap();
        let listed: Vec<_> = response(&e, &r)
            .batch_item_failures
            .into_iter()
            .map(|f| (f.item_identifier.partition, f.item_identifier.offset))
            .collect();
        assert_eq!(listed, [("a-0".to_owned(), 1), ("a-0".to_owned(), 2)]);
        assert_eq!(r.processed, 2);
    }

    #[test]
    fn records_that_cannot_be_named_fail_the_batch() {
        let misfiled = event(serde_json::json!({"a-0": [rec("a", 1, 1, None)]}));
        assert!(
            process(&misfiled, Options::default(), |_| Ok::<_, String>(())).unwrap_err().to_string().contains("a-1")
        );
        let disordered = event(serde_json::json!({"a-0": [rec("a", 0, 2, None), rec("a", 0, 2, None)]}));
        assert!(process(&disordered, Options::default(), |_| Ok::<_, String>(())).is_err());
        assert!(KafkaEvent::from_slice(b"[1]").unwrap_err().to_string().starts_with("not a Kafka event"));
    }

    proptest! {
        /// Any payload parses or is refused, and any record's key, value, headers and JSON read or
        /// fail naming the record: never a panic.
        #[test]
        fn any_record_reads_or_fails_naming_itself(
            key in proptest::option::of("\\PC{0,12}"),
            value in proptest::option::of("\\PC{0,12}"),
            header in proptest::collection::vec(-200i16..300, 0..6),
            partition in any::<i32>(),
            offset in any::<i64>(),
        ) {
            let r = serde_json::json!({"topic": "t", "partition": partition, "offset": offset, "key": key, "value": value, "headers": [{"h": header}]});
            let payload = serde_json::json!({"records": {format!("t-{partition}"): [r]}}).to_string();
            if let Ok(e) = KafkaEvent::from_slice(payload.as_bytes()) {
                let r = e.all_records().next().unwrap();
                for err in [r.key_bytes().err(), r.value_bytes().err(), r.json::<serde_json::Value>().err(), r.headers().err()].into_iter().flatten() {
                    prop_assert!(err.to_string().starts_with(&format!("record t-{partition}@{offset}")), "{}", err);
                }
            }
        }
    }
}
