//! Redis events (feature `redis`): what `pushpull-local` sends a function from a Redis stream
//! (its Streams mapping: `XREADGROUP`, pull) or a Redis pub/sub channel (its relay: `SUBSCRIBE`,
//! push). AWS has no Redis event source, so the event is ours, shaped like AWS's queue events:
//!
//! ```json
//! {"Records": [
//!   {"eventSource": "pushpull:redis-streams", "stream": "records", "group": "rollup",
//!    "id": "1733600000000-0", "timestamp": 1733600000000, "deliveryCount": 1,
//!    "data": "eyJuIjoxfQ==", "fields": {"pushpull-origin": "in/a.ndjson@v1#7", "pushpull-key": "ann"}},
//!   {"eventSource": "pushpull:redis-pubsub", "channel": "records", "pattern": null,
//!    "id": "1733600000123-42", "timestamp": 1733600000123, "data": "eyJuIjoyfQ=="}
//! ]}
//! ```
//!
//! - `data`: base64 of the stream entry's `data` field, or of the pub/sub message.
//! - `id`: a stream entry's id (`<ms>-<seq>`, Redis's own); for pub/sub, the relay's
//!   (`<relay start, ms>-<n>`: Redis gives a published message no id).
//! - `timestamp`: unix milliseconds: when the entry was added (its id's time), or when the relay
//!   read the message.
//! - `fields`: a stream entry's other fields, as text; the Redis sink writes the partition key
//!   ([`PARTITION_KEY_FIELD`]) and the line's name ([`ORIGIN_FIELD`],
//!   [`crate::message_name::message_id`]).
//! - `deliveryCount`: how many times the group delivered the entry (Streams only; 1 the first time).
//!
//! A stream's batch answers with a partial batch response (`batchItemFailures`, each
//! `itemIdentifier` an entry id): the entries named stay pending and come again; every other is
//! acknowledged (`XACK`), as SQS deletes every message not named ([`crate::pull::ResponseRule::Queue`]).
//!
//! ```
//! use pushpull::pull::redis::RedisEvent;
//!
//! let event = RedisEvent::from_slice(br#"{"Records":[{"eventSource":"pushpull:redis-streams",
//!   "stream":"records","id":"1-0","data":"eyJuIjoxfQ==","fields":{"pushpull-origin":"in/a@v1#7"}}]}"#).unwrap();
//! let r = &event.records[0];
//! assert_eq!(r.data_bytes().unwrap(), br#"{"n":1}"#);
//! assert_eq!(r.origin(), Some(("in/a@v1", 7)));
//! assert_eq!(r.source_name(), "records");
//! ```
use std::collections::BTreeMap;
use std::fmt::Display;
use std::future::Future;

use serde::{Deserialize, Serialize};

use super::{BatchResult, DecodeError, Options, ResponseRule, parse_json};

/// `eventSource` of a Redis stream's records.
pub const STREAMS_EVENT_SOURCE: &str = "pushpull:redis-streams";
/// `eventSource` of a Redis pub/sub channel's records.
pub const PUBSUB_EVENT_SOURCE: &str = "pushpull:redis-pubsub";
/// The stream entry field that holds the record's data.
pub const DATA_FIELD: &str = "data";
/// The stream entry field that holds the record's partition key.
pub const PARTITION_KEY_FIELD: &str = "pushpull-key";
/// The stream entry field that names the line a record came from.
pub const ORIGIN_FIELD: &str = "pushpull-origin";

/// A Redis event: the records of one batch (a stream), or of one message (a channel).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RedisEvent {
    /// The records.
    #[serde(rename = "Records", default)]
    pub records: Vec<RedisRecord>,
}

/// A payload that is not a Redis event.
#[derive(Debug, thiserror::Error)]
#[error("not a Redis event: {0}")]
pub struct RedisEventError(#[source] serde_json::Error);

impl RedisEvent {
    /// Parses an invocation payload.
    pub fn from_slice(payload: &[u8]) -> Result<Self, RedisEventError> {
        serde_json::from_slice(payload).map_err(RedisEventError)
    }
}

/// One stream entry or one pub/sub message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RedisRecord {
    /// [`STREAMS_EVENT_SOURCE`] or [`PUBSUB_EVENT_SOURCE`].
    pub event_source: String,
    /// The stream (Streams).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// The consumer group (Streams).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The channel (pub/sub).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// The pattern the relay subscribed with, when it was one (`PSUBSCRIBE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// The entry's id, or the relay's id of the message: what a partial batch response names.
    pub id: String,
    /// Unix milliseconds: when the entry was added, or when the relay read the message.
    #[serde(default)]
    pub timestamp: u64,
    /// Times the group delivered the entry (Streams).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_count: Option<u64>,
    /// The data, base64.
    #[serde(default)]
    pub data: String,
    /// A stream entry's other fields, as text.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
}

impl RedisRecord {
    /// The stream or the channel.
    pub fn source_name(&self) -> &str {
        self.stream.as_deref().or(self.channel.as_deref()).unwrap_or_default()
    }

    /// The data, decoded (forgiving base64, as the Kafka records').
    pub fn data_bytes(&self) -> Result<Vec<u8>, DecodeError> {
        base64_simd::forgiving_decode_to_vec(self.data.as_bytes()).map_err(|e| DecodeError {
            item: self.id.clone(),
            format: "base64",
            source: e.to_string().into(),
        })
    }

    /// The data as JSON into `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, DecodeError> {
        let bytes = self.data_bytes()?;
        parse_json(&bytes, || self.id.clone())
    }

    /// The object and line the record came from ([`ORIGIN_FIELD`]), if the sink named it.
    pub fn origin(&self) -> Option<(&str, u64)> {
        crate::message_name::parse_message_id(self.fields.get(ORIGIN_FIELD)?)
    }

    /// The partition key the sink wrote ([`PARTITION_KEY_FIELD`]).
    pub fn partition_key(&self) -> Option<&str> {
        self.fields.get(PARTITION_KEY_FIELD).map(String::as_str)
    }
}

fn result_of(event: &RedisEvent, outcomes: super::Outcomes) -> BatchResult {
    let mut result = BatchResult { rule: ResponseRule::Queue, ..Default::default() };
    result.absorb(outcomes, |i| event.records[i].id.clone());
    result
}

/// Runs `handler` on each record in order; the result lists every failed record (the queue rule:
/// the others are acknowledged).
///
/// ```
/// use pushpull::pull::{redis, Options};
/// let event = redis::RedisEvent::from_slice(br#"{"Records":[
///   {"eventSource":"pushpull:redis-streams","stream":"s","id":"1-0","data":"e30="},
///   {"eventSource":"pushpull:redis-streams","stream":"s","id":"1-1","data":"bm9wZQ=="}]}"#).unwrap();
/// let result = redis::process(&event, Options::default(), |r| r.json::<serde_json::Value>().map(drop));
/// let failed: Vec<_> = result.item_failures().into_iter().map(|f| f.item_identifier).collect();
/// assert_eq!(failed, ["1-1"]);
/// ```
pub fn process<F, E>(event: &RedisEvent, options: Options, mut handler: F) -> BatchResult
where
    F: FnMut(&RedisRecord) -> Result<(), E>,
    E: Display,
{
    let outcomes = super::run_in_order(event.records.len(), &options, |i| handler(&event.records[i]));
    result_of(event, outcomes)
}

/// Runs an async `handler` on each record: in order, or with [`Options::per_key`] that many
/// partition keys at a time (a record without one is its own key).
pub async fn process_async<F, Fut, E>(event: &RedisEvent, options: Options, handler: F) -> BatchResult
where
    F: Fn(RedisRecord) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let keys: Vec<&str> = event.records.iter().map(|r| r.partition_key().unwrap_or(r.id.as_str())).collect();
    let handler = &handler;
    let outcomes = super::run_concurrently(&keys, &options, |i| handler(event.records[i].clone())).await;
    result_of(event, outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_pubsub_record_round_trips_and_names_its_channel() {
        let r = RedisRecord {
            event_source: PUBSUB_EVENT_SOURCE.into(),
            channel: Some("c".into()),
            id: "5-1".into(),
            timestamp: 5,
            data: base64_simd::STANDARD.encode_to_string(b"\x00\xffbinary"),
            ..Default::default()
        };
        let event = RedisEvent { records: vec![r.clone()] };
        let text = serde_json::to_string(&event).unwrap();
        assert!(!text.contains("stream") && !text.contains("fields"), "{text}");
        let back = RedisEvent::from_slice(text.as_bytes()).unwrap();
        assert_eq!(back, event);
        assert_eq!(back.records[0].data_bytes().unwrap(), b"\x00\xffbinary");
        assert_eq!((back.records[0].source_name(), back.records[0].origin()), ("c", None));
    }

    #[test]
    fn data_that_is_not_base64_names_the_record() {
        let r = RedisRecord { id: "9-0".into(), data: "!!".into(), ..Default::default() };
        let e = r.data_bytes().unwrap_err();
        assert!(e.to_string().contains("record 9-0: not the expected base64"), "{e}");
    }

    #[test]
    fn not_an_event_is_an_error() {
        assert!(RedisEvent::from_slice(b"[1]").unwrap_err().to_string().starts_with("not a Redis event"));
    }

    proptest! {
        /// Any bytes survive the event: encoded as the local relay and mapping write them, read back.
        #[test]
        fn any_data_round_trips(data in proptest::collection::vec(any::<u8>(), 0..512), id in "[0-9]{1,13}-[0-9]{1,3}") {
            let r = RedisRecord { event_source: STREAMS_EVENT_SOURCE.into(), stream: Some("s".into()), id,
                data: base64_simd::STANDARD.encode_to_string(&data), ..Default::default() };
            let text = serde_json::to_string(&RedisEvent { records: vec![r] }).unwrap();
            let back = RedisEvent::from_slice(text.as_bytes()).unwrap();
            prop_assert_eq!(back.records[0].data_bytes().unwrap(), data);
        }
    }
}
