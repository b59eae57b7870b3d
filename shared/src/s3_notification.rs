//! S3 event notifications as Lambda receives them (the push side).
//!
//! [`S3Notification::from_slice`] turns the invocation payload into either a test event
//! (`s3:TestEvent`, sent when notifications are configured: acknowledge and ignore) or a list of
//! [`ObjectEvent`]s whose keys are already URL-decoded the way S3 encodes them (form encoding:
//! `+` is a space, then percent-decoding). It never trusts
//! `aws_lambda_events::s3::S3Object::url_decoded_key`, which S3 does not fill.
//!
//! ```
//! use pushpull::s3_notification::{S3Notification, EventKind};
//!
//! let payload = br#"{"Records":[{"eventVersion":"2.1","eventSource":"aws:s3","awsRegion":"us-east-1",
//!   "eventTime":"2026-11-24T00:00:00.000Z","eventName":"ObjectCreated:Put",
//!   "s3":{"bucket":{"name":"in","arn":"arn:aws:s3:::in"},
//!         "object":{"key":"input/caf%C3%A9+menu.ndjson","size":12,"eTag":"abc","sequencer":"0A1B"}}}]}"#;
//! let S3Notification::Records(events) = S3Notification::from_slice(payload)? else { unreachable!() };
//! assert_eq!(events[0].key, "input/café menu.ndjson");
//! assert_eq!(events[0].kind, EventKind::ObjectCreated);
//! # Ok::<(), pushpull::s3_notification::NotificationError>(())
//! ```
use std::cmp::Ordering;
use std::fmt;

use serde::Deserialize;

/// Why a payload is not a usable S3 notification.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotificationError {
    /// The payload is not JSON of the expected shape.
    #[error("not an S3 notification: {0}")]
    Malformed(#[from] serde_json::Error),
    /// Neither `Records` nor a test event.
    #[error("not an S3 notification: it has neither \"Records\" nor \"Event\": \"s3:TestEvent\"")]
    Unrecognised,
    /// A record lacks a field S3 always sends.
    #[error("S3 notification record {index}: missing {field}")]
    MissingField {
        /// Position of the record in `Records`.
        index: usize,
        /// The JSON path of the missing field.
        field: &'static str,
    },
    /// A record is not from S3 or has an event version this code does not understand.
    #[error("S3 notification record {index}: {reason}")]
    Unsupported {
        /// Position of the record in `Records`.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The object key is not valid form encoding of UTF-8.
    #[error("S3 notification record {index} (bucket {bucket}): {source}")]
    Key {
        /// Position of the record in `Records`.
        index: usize,
        /// The bucket the key belongs to.
        bucket: String,
        /// What is wrong with the key.
        source: KeyDecodeError,
    },
}

/// An object key that does not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("object key {raw:?} is not valid URL-encoded UTF-8")]
pub struct KeyDecodeError {
    /// The key as it arrived in the event.
    pub raw: String,
}

/// Decodes an object key as S3 puts it in event notifications: form encoding, where `+` is a
/// space, then percent-decoding, and the result must be UTF-8.
///
/// ```
/// use pushpull::s3_notification::decode_key;
/// assert_eq!(decode_key("a+b%2Bc%20d").unwrap(), "a b+c d");
/// assert_eq!(decode_key("r%C3%A9sum%C3%A9.json").unwrap(), "résumé.json");
/// assert!(decode_key("bad%FF").is_err());
/// ```
pub fn decode_key(raw: &str) -> Result<String, KeyDecodeError> {
    let spaced = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|k| k.into_owned())
        .map_err(|_| KeyDecodeError { raw: raw.to_owned() })
}

/// What an S3 event is about, reduced to what a consumer acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// `ObjectCreated:*` (Put, Post, Copy, CompleteMultipartUpload): process the object.
    ObjectCreated,
    /// `ObjectRemoved:*`.
    ObjectRemoved,
    /// Anything else (restore, replication, lifecycle, tagging, ...).
    Other,
}

impl EventKind {
    fn of(event_name: &str) -> Self {
        // AWS sends names without the "s3:" prefix; the configuration uses it. Accept both.
        let name = event_name.strip_prefix("s3:").unwrap_or(event_name);
        if name.starts_with("ObjectCreated:") {
            EventKind::ObjectCreated
        } else if name.starts_with("ObjectRemoved:") {
            EventKind::ObjectRemoved
        } else {
            EventKind::Other
        }
    }
}

/// The `sequencer` of an S3 event: orders events for the same key only.
///
/// Compared as AWS documents: right-pad the shorter with `0`, then compare as text (hex digits
/// are compared case-insensitively); the greater is the later event.
///
/// ```
/// use pushpull::s3_notification::Sequencer;
/// assert!(Sequencer::new("0A1B") < Sequencer::new("0A1B01"));
/// assert!(Sequencer::new("0A2") > Sequencer::new("0A1FFFF"));
/// assert_eq!(Sequencer::new("0A10"), Sequencer::new("0A1"));
/// ```
#[derive(Debug, Clone, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Sequencer(String);

impl Sequencer {
    /// Wraps a sequencer string as it appears in the event.
    pub fn new(s: impl Into<String>) -> Self {
        Sequencer(s.into())
    }
    /// The sequencer as it appeared in the event.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Ord for Sequencer {
    fn cmp(&self, other: &Self) -> Ordering {
        let (a, b) = (self.0.as_bytes(), other.0.as_bytes());
        let len = a.len().max(b.len());
        let digit = |s: &[u8], i: usize| s.get(i).map_or(b'0', u8::to_ascii_uppercase);
        (0..len).map(|i| digit(a, i).cmp(&digit(b, i))).find(|o| o.is_ne()).unwrap_or(Ordering::Equal)
    }
}
impl PartialOrd for Sequencer {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Sequencer {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

/// One record of an S3 notification, with the key decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectEvent {
    /// The event name as sent, e.g. `ObjectCreated:Put`.
    pub event_name: String,
    /// What the event is about.
    pub kind: EventKind,
    /// The bucket name.
    pub bucket: String,
    /// The object key, URL-decoded.
    pub key: String,
    /// The object size in bytes; absent for deletes.
    pub size: Option<u64>,
    /// The ETag without surrounding quotes, when sent.
    pub etag: Option<String>,
    /// The version id, on versioned buckets.
    pub version_id: Option<String>,
    /// Orders events for the same key.
    pub sequencer: Option<Sequencer>,
}

impl fmt::Display for ObjectEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)?;
        if let Some(v) = &self.version_id {
            write!(f, "?versionId={v}")?;
        }
        Ok(())
    }
}

/// An S3 notification payload.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum S3Notification {
    /// `{"Service":"Amazon S3","Event":"s3:TestEvent",...}`: sent once when notifications are
    /// configured. Acknowledge it and do nothing.
    TestEvent {
        /// The bucket named in the test event, if any.
        bucket: Option<String>,
    },
    /// The usual payload: one or more object events.
    Records(Vec<ObjectEvent>),
}

#[derive(Deserialize)]
struct RawNotification {
    #[serde(rename = "Records")]
    records: Option<Vec<RawRecord>>,
    #[serde(rename = "Event")]
    event: Option<String>,
    #[serde(rename = "Bucket")]
    bucket: Option<String>,
}

// Our own record shape rather than aws_lambda_events::s3::S3EventRecord: that type requires
// `eventTime`, `userIdentity` and friends that we never use, and a missing one would turn a
// processable event into an error.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRecord {
    event_version: Option<String>,
    event_source: Option<String>,
    event_name: Option<String>,
    s3: Option<RawEntity>,
}
#[derive(Deserialize)]
struct RawEntity {
    bucket: Option<RawBucket>,
    object: Option<RawObject>,
}
#[derive(Deserialize)]
struct RawBucket {
    name: Option<String>,
}
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawObject {
    key: Option<String>,
    size: Option<u64>,
    e_tag: Option<String>,
    version_id: Option<String>,
    sequencer: Option<String>,
}

impl S3Notification {
    /// Parses an invocation payload.
    pub fn from_slice(payload: &[u8]) -> Result<Self, NotificationError> {
        let raw: RawNotification = serde_json::from_slice(payload)?;
        Self::from_raw(raw)
    }

    /// Parses an already-decoded JSON value (what `LambdaEvent<serde_json::Value>` gives).
    pub fn from_value(payload: serde_json::Value) -> Result<Self, NotificationError> {
        let raw: RawNotification = serde_json::from_value(payload)?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawNotification) -> Result<Self, NotificationError> {
        match (raw.records, raw.event.as_deref()) {
            (Some(records), _) => records
                .into_iter()
                .enumerate()
                .map(|(i, r)| ObjectEvent::from_raw(i, r))
                .collect::<Result<Vec<_>, _>>()
                .map(S3Notification::Records),
            (None, Some("s3:TestEvent")) => Ok(S3Notification::TestEvent { bucket: raw.bucket }),
            _ => Err(NotificationError::Unrecognised),
        }
    }
}

impl ObjectEvent {
    fn from_raw(index: usize, r: RawRecord) -> Result<Self, NotificationError> {
        let missing = |field| NotificationError::MissingField { index, field };
        if let Some(src) = r.event_source.as_deref().filter(|s| *s != "aws:s3") {
            return Err(NotificationError::Unsupported { index, reason: format!("eventSource {src:?} is not aws:s3") });
        }
        // eventVersion 2.x (2.1 .. 2.6 seen in the docs) share one layout.
        if let Some(v) = r.event_version.as_deref().filter(|v| v.split('.').next() != Some("2")) {
            return Err(NotificationError::Unsupported {
                index,
                reason: format!("eventVersion {v:?} (only 2.x is understood)"),
            });
        }
        let event_name = r.event_name.ok_or_else(|| missing("eventName"))?;
        let s3 = r.s3.ok_or_else(|| missing("s3"))?;
        let bucket = s3.bucket.and_then(|b| b.name).ok_or_else(|| missing("s3.bucket.name"))?;
        let object = s3.object.ok_or_else(|| missing("s3.object"))?;
        let raw_key = object.key.ok_or_else(|| missing("s3.object.key"))?;
        let key =
            decode_key(&raw_key).map_err(|source| NotificationError::Key { index, bucket: bucket.clone(), source })?;
        let invalid = |reason: String| NotificationError::Unsupported { index, reason };
        if key.is_empty() {
            return Err(invalid(format!("bucket {bucket}: the object key is empty")));
        }
        // S3's sequencers are hexadecimal. Another one would be recorded as the key's newest and
        // make every genuine later event for the key look stale: refused instead.
        if let Some(seq) = object.sequencer.as_deref().filter(|s| !s.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Err(invalid(format!(
                "s3://{bucket}/{key}: sequencer {seq:?} is not hexadecimal, as S3's sequencers are"
            )));
        }
        Ok(ObjectEvent {
            kind: EventKind::of(&event_name),
            event_name,
            bucket,
            key,
            size: object.size,
            etag: object.e_tag.map(|e| e.trim_matches('"').to_owned()).filter(|e| !e.is_empty()),
            version_id: object.version_id.filter(|v| !v.is_empty() && v != "null"),
            sequencer: object.sequencer.filter(|s| !s.is_empty()).map(Sequencer),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, key: &str) -> String {
        format!(
            r#"{{"eventVersion":"2.1","eventSource":"aws:s3","awsRegion":"us-east-1","eventTime":"2026-11-24T00:00:00.000Z",
            "eventName":"{name}","s3":{{"s3SchemaVersion":"1.0","bucket":{{"name":"b","arn":"arn:aws:s3:::b"}},
            "object":{{"key":"{key}","size":5,"eTag":"\"e1\"","versionId":"v1","sequencer":"00AB"}}}}}}"#
        )
    }

    #[test]
    fn decodes_plus_as_space_then_percent() {
        assert_eq!(decode_key("dir/my+file.json").unwrap(), "dir/my file.json");
        assert_eq!(decode_key("a%2Bb").unwrap(), "a+b");
        assert_eq!(decode_key("%E6%97%A5%E6%9C%AC").unwrap(), "日本");
        assert_eq!(decode_key("100%25").unwrap(), "100%");
        assert_eq!(decode_key("plain").unwrap(), "plain");
        assert!(decode_key("%C3%28").is_err());
    }

    #[test]
    fn test_event_is_recognised() {
        let n = S3Notification::from_slice(
            br#"{"Service":"Amazon S3","Event":"s3:TestEvent","Time":"2026-11-24T00:00:00.000Z","Bucket":"b","RequestId":"r","HostId":"h"}"#,
        )
        .unwrap();
        assert_eq!(n, S3Notification::TestEvent { bucket: Some("b".into()) });
    }

    #[test]
    fn records_are_decoded_and_classified() {
        let payload = format!(
            r#"{{"Records":[{},{}]}}"#,
            record("ObjectCreated:Put", "in/a+b%C3%A9.ndjson"),
            record("ObjectRemoved:Delete", "in/x")
        );
        let S3Notification::Records(ev) = S3Notification::from_slice(payload.as_bytes()).unwrap() else {
            panic!("expected records")
        };
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].key, "in/a bé.ndjson");
        assert_eq!(ev[0].kind, EventKind::ObjectCreated);
        assert_eq!(ev[0].etag.as_deref(), Some("e1"));
        assert_eq!(ev[0].version_id.as_deref(), Some("v1"));
        assert_eq!(ev[1].kind, EventKind::ObjectRemoved);
        assert_eq!(ev[0].to_string(), "s3://b/in/a bé.ndjson?versionId=v1");
    }

    #[test]
    fn unknown_payloads_and_bad_keys_are_errors_not_panics() {
        assert!(matches!(S3Notification::from_slice(b"{}"), Err(NotificationError::Unrecognised)));
        assert!(matches!(S3Notification::from_slice(b"[1]"), Err(NotificationError::Malformed(_))));
        let bad = format!(r#"{{"Records":[{}]}}"#, record("ObjectCreated:Put", "k%FF"));
        let err = S3Notification::from_slice(bad.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("bucket b"), "{err}");
        let v1 = r#"{"Records":[{"eventVersion":"1.0","eventSource":"aws:s3","eventName":"ObjectCreated:Put"}]}"#;
        assert!(matches!(S3Notification::from_slice(v1.as_bytes()), Err(NotificationError::Unsupported { .. })));
        let nokey = r#"{"Records":[{"eventVersion":"2.2","eventSource":"aws:s3","eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"b"},"object":{}}}]}"#;
        assert!(matches!(
            S3Notification::from_slice(nokey.as_bytes()),
            Err(NotificationError::MissingField { field: "s3.object.key", .. })
        ));
    }

    #[test]
    fn an_empty_key_or_a_sequencer_s3_never_writes_is_refused_by_name() {
        let one = |key: &str, seq: &str| {
            format!(
                r#"{{"Records":[{{"eventVersion":"2.1","eventSource":"aws:s3","eventName":"ObjectCreated:Put","s3":{{"bucket":{{"name":"b"}},"object":{{"key":"{key}","sequencer":"{seq}"}}}}}}]}}"#
            )
        };
        let e = S3Notification::from_slice(one("", "0A").as_bytes()).unwrap_err().to_string();
        assert!(e.contains("bucket b: the object key is empty"), "{e}");
        let e = S3Notification::from_slice(one("in/k", "zz-9").as_bytes()).unwrap_err().to_string();
        assert!(e.contains("s3://b/in/k: sequencer \"zz-9\" is not hexadecimal"), "{e}");
        assert!(S3Notification::from_slice(one("in/k", "00AbF1").as_bytes()).is_ok());
    }

    #[test]
    fn sequencer_orders_as_aws_documents() {
        let s = Sequencer::new;
        assert!(s("0055AED6DCD90281E5") < s("0055AED6DCD90281E6"));
        assert!(s("0055AED6DCD90281E5") < s("0055AED6DCD90281E500001"));
        assert_eq!(s("00AB"), s("00AB0000"));
        assert!(s("00ab") < s("00AC"));
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// S3's form encoding of a key: space as `+`, every other byte outside [A-Za-z0-9._~/-]
        /// percent-encoded.
        fn form_encode(key: &str) -> String {
            key.bytes()
                .map(|b| match b {
                    b' ' => "+".to_owned(),
                    b if b.is_ascii_alphanumeric() || b"._~/-".contains(&b) => (b as char).to_string(),
                    b => format!("%{b:02X}"),
                })
                .collect()
        }

        proptest! {
            /// Every key S3 can send (UTF-8, up to 1,024 bytes) decodes back to itself.
            #[test]
            fn keys_round_trip(key in "\\PC{0,300}") {
                prop_assert_eq!(decode_key(&form_encode(&key)).unwrap(), key);
            }

            /// Any text decodes or is refused with the raw key; never a panic.
            #[test]
            fn any_raw_key_decodes_or_is_refused(raw in "\\PC{0,100}") {
                if let Err(e) = decode_key(&raw) {
                    prop_assert_eq!(e.raw, raw);
                }
            }

            /// Sequencers order as AWS documents: pad the shorter with 0, compare as hex text.
            #[test]
            fn sequencers_order_as_padded_hex(a in "[0-9A-F]{1,24}", b in "[0-9A-F]{1,24}") {
                let width = a.len().max(b.len());
                let pad = |s: &str| format!("{s:0<width$}");
                prop_assert_eq!(Sequencer::new(a.clone()).cmp(&Sequencer::new(b.clone())), pad(&a).cmp(&pad(&b)));
                prop_assert_eq!(Sequencer::new(a.to_lowercase()), Sequencer::new(a.clone()));
            }

            /// Any bytes: a notification or an error; never a panic.
            #[test]
            fn any_payload_parses_or_is_refused(payload in prop::collection::vec(any::<u8>(), 0..300)) {
                let _ = S3Notification::from_slice(&payload);
            }

            /// Generated notifications parse with their keys decoded and their kinds classified.
            #[test]
            fn generated_notifications_parse(key in "\\PC{1,60}", created in any::<bool>(), seq in "[0-9A-F]{16}") {
                let name = if created { "ObjectCreated:Put" } else { "ObjectRemoved:Delete" };
                let payload = serde_json::json!({"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "eventName": name,
                    "s3": {"bucket": {"name": "b"}, "object": {"key": form_encode(&key), "sequencer": seq}}}]});
                let Ok(S3Notification::Records(events)) = S3Notification::from_slice(payload.to_string().as_bytes()) else {
                    return Err(TestCaseError::fail("not parsed"));
                };
                prop_assert_eq!(&events[0].key, &key);
                prop_assert_eq!(events[0].kind == EventKind::ObjectCreated, created);
            }
        }
    }
}
