//! The push side: an S3 notification in, every line of each new object out to Kinesis.
//!
//! For each `ObjectCreated` record of a notification, [`PushHandler`] streams the object (never
//! whole in memory), splits it into lines ([`crate::lines`]), checks each line and picks its
//! partition key ([`crate::ndjson`]), batches records under the PutRecords limits
//! ([`crate::batch`]) and sends them ([`crate::kinesis_producer`]). Lines that cannot be sent (not
//! UTF-8, not JSON, too long) go to the quarantine ([`crate::quarantine`]) with their line number,
//! byte offset and reason, and never stop the rest.
//!
//! What is an error (the function fails, and async invoke retries) and what is not:
//! - the object is gone or was replaced before we read it (`NoSuchKey`, `NoSuchVersion`, ETag
//!   mismatch): not an error. A log line, and the event is done: a later event describes the
//!   new object, and retrying could never succeed.
//! - access denied, throttling, network or 5xx on S3; records not written to Kinesis: an error.
//! - test events, non-`ObjectCreated` events and keys under the function's own output or
//!   quarantine locations (the loop guard): skipped with a log line.
use std::time::Instant as StdInstant;

use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::operation::get_object::GetObjectError;
use futures_util::StreamExt;
use serde::Serialize;
use tokio_util::codec::FramedRead;
use tracing::{info, warn};

use crate::batch::Batcher;
use crate::config::PushSettings;
use crate::kinesis_producer::{OutRecord, ProduceError, Producer, RecordSink, SendReport};
use crate::lines::{Frame, LineCodec};
use crate::ndjson::{self, LineError};
use crate::quarantine::{QuarantineWriter, QuarantinedLine, safe_path};
use crate::s3_notification::{EventKind, NotificationError, ObjectEvent, S3Notification};
use crate::store::{Store, StoreError};

/// Longest partition key Kinesis accepts (characters).
pub const MAX_PARTITION_KEY_CHARS: usize = 256;

/// The push side failed in a way that retrying may fix, or that must reach a failure destination.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The payload is not an S3 notification.
    #[error(transparent)]
    Notification(#[from] NotificationError),
    /// Reading the object failed.
    #[error("{operation} s3://{bucket}/{key}: {message}")]
    Read {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// `GetObject`, or `read body` for failures mid-stream.
        operation: &'static str,
        /// What S3 or the transport said.
        message: String,
    },
    /// Records could not be written to Kinesis.
    #[error("sending lines of s3://{bucket}/{key} to Kinesis: {source}")]
    Produce {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// What went wrong.
        source: ProduceError,
    },
    /// Quarantined lines could not be stored.
    #[error("quarantining lines of s3://{bucket}/{key}: {source}")]
    Quarantine {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// What went wrong.
        source: StoreError,
    },
}

impl PushError {
    /// A stable name for the kind of failure (the Lambda `errorType`).
    pub fn kind(&self) -> &'static str {
        match self {
            PushError::Notification(_) => "PushError.Notification",
            PushError::Read { .. } => "PushError.Read",
            PushError::Produce { .. } => "PushError.Produce",
            PushError::Quarantine { .. } => "PushError.Quarantine",
        }
    }
}

impl From<PushError> for lambda_runtime::Diagnostic {
    fn from(e: PushError) -> Self {
        tracing::error!(error_type = e.kind(), error = %e, "invocation failed");
        lambda_runtime::Diagnostic { error_type: e.kind().to_owned(), error_message: e.to_string() }
    }
}

/// What happened to one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every line was sent or quarantined.
    Processed,
    /// Not processed, on purpose (event kind, loop guard).
    Skipped {
        /// Why.
        reason: String,
    },
    /// The object was gone or replaced when read.
    Gone {
        /// What S3 said.
        reason: String,
    },
}

/// The account of one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectSummary {
    /// Bucket.
    pub bucket: String,
    /// Key (decoded).
    pub key: String,
    /// What happened.
    pub outcome: Outcome,
    /// Lines read (blank ones included).
    pub lines: u64,
    /// Blank lines (skipped: not records).
    pub blank_lines: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Records written to Kinesis.
    pub records: u64,
    /// Lines quarantined.
    pub quarantined: u64,
    /// PutRecords calls, retries included.
    pub put_calls: u64,
    /// Entries resent after partial failures.
    pub resent: u64,
    /// Milliseconds spent on the object.
    pub millis: u64,
}

impl ObjectSummary {
    fn new(ev: &ObjectEvent, outcome: Outcome) -> Self {
        ObjectSummary {
            bucket: ev.bucket.clone(),
            key: ev.key.clone(),
            outcome,
            lines: 0,
            blank_lines: 0,
            bytes: 0,
            records: 0,
            quarantined: 0,
            put_calls: 0,
            resent: 0,
            millis: 0,
        }
    }

    fn add(&mut self, r: SendReport) {
        self.records += r.records as u64;
        self.put_calls += r.calls as u64;
        self.resent += r.resent as u64;
    }
}

/// The function's response: one summary per record of the notification.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PushSummary {
    /// True for an `s3:TestEvent`.
    pub test_event: bool,
    /// One entry per notification record.
    pub objects: Vec<ObjectSummary>,
}

/// Handles S3 notifications: reads objects, sends their lines to a [`RecordSink`].
#[derive(Debug)]
pub struct PushHandler<S> {
    settings: PushSettings,
    s3: aws_sdk_s3::Client,
    producer: Producer<S>,
    quarantine: Store,
}

impl PushHandler<crate::kinesis_producer::KinesisSink> {
    /// The handler a deployed function runs: settings from the environment (every problem
    /// reported at once), clients from the AWS configuration, records to `STREAM_NAME`.
    pub async fn from_env(aws: &crate::aws::Aws) -> Result<Self, crate::config::ConfigErrors> {
        let settings = PushSettings::from_env(crate::config::Env::from_process())?;
        let sink = crate::kinesis_producer::KinesisSink::new(aws.kinesis().await.clone(), &settings.stream_name);
        let quarantine = Store::connect(&settings.quarantine, aws).await;
        Ok(Self::new(settings, aws.s3().await.clone(), sink, quarantine))
    }
}

impl<S: RecordSink> PushHandler<S> {
    /// A handler reading with `s3`, sending to `sink`, quarantining into `quarantine`.
    pub fn new(settings: PushSettings, s3: aws_sdk_s3::Client, sink: S, quarantine: Store) -> Self {
        let producer = Producer::new(sink, settings.put_max_attempts);
        PushHandler { settings, s3, producer, quarantine }
    }

    /// The settings in force.
    pub fn settings(&self) -> &PushSettings {
        &self.settings
    }

    /// Handles one invocation payload.
    pub async fn handle(&self, payload: &[u8]) -> Result<PushSummary, PushError> {
        match S3Notification::from_slice(payload)? {
            S3Notification::TestEvent { bucket } => {
                info!(bucket = bucket.as_deref().unwrap_or(""), "s3:TestEvent acknowledged; nothing to do");
                Ok(PushSummary { test_event: true, objects: Vec::new() })
            }
            S3Notification::Records(events) => {
                let mut objects = Vec::with_capacity(events.len());
                for ev in &events {
                    objects.push(self.handle_event(ev).await?);
                }
                Ok(PushSummary { test_event: false, objects })
            }
        }
    }

    async fn handle_event(&self, ev: &ObjectEvent) -> Result<ObjectSummary, PushError> {
        if ev.kind != EventKind::ObjectCreated {
            info!(bucket = %ev.bucket, key = %ev.key, event = %ev.event_name, "skipping: not an ObjectCreated event");
            return Ok(ObjectSummary::new(ev, Outcome::Skipped { reason: format!("event {}", ev.event_name) }));
        }
        if self.settings.is_own_output(&ev.bucket, &ev.key) {
            warn!(bucket = %ev.bucket, key = %ev.key, "refusing an object under this function's own output or quarantine location (loop guard); fix the trigger's prefix filter");
            return Ok(ObjectSummary::new(
                ev,
                Outcome::Skipped { reason: "under own output or quarantine location".into() },
            ));
        }
        self.process_object(ev).await
    }

    /// Streams one object's lines to the sink.
    pub async fn process_object(&self, ev: &ObjectEvent) -> Result<ObjectSummary, PushError> {
        let started = StdInstant::now();
        let read_err =
            |operation, message| PushError::Read { bucket: ev.bucket.clone(), key: ev.key.clone(), operation, message };
        let mut get = self.s3.get_object().bucket(&ev.bucket).key(&ev.key);
        if let Some(version) = &ev.version_id {
            get = get.version_id(version);
        } else if let Some(etag) = &ev.etag {
            // Unversioned bucket: read only the object the event announced.
            get = get.if_match(format!("\"{etag}\""));
        }
        let object = match get.send().await {
            Ok(o) => o,
            Err(e) => {
                if let Some(reason) = gone_reason(&e) {
                    warn!(bucket = %ev.bucket, key = %ev.key, reason, "object gone or replaced before it was read; nothing to do");
                    return Ok(ObjectSummary::new(ev, Outcome::Gone { reason: reason.to_owned() }));
                }
                return Err(read_err("GetObject", crate::aws::describe(&e)));
            }
        };
        let mut summary = ObjectSummary::new(ev, Outcome::Processed);
        let version = ev.version_id.clone().or_else(|| ev.etag.clone());
        let q_prefix = format!("{}/{}/{}", ev.bucket, safe_path(&ev.key), version.as_deref().unwrap_or("unversioned"));
        let mut quarantine = QuarantineWriter::new(self.quarantine.clone(), q_prefix);
        let reader = object.body.into_async_read();
        let mut frames = FramedRead::with_capacity(reader, LineCodec::new(self.settings.max_line_bytes), 64 * 1024);
        let mut batcher = Batcher::new(self.settings.put);
        let field = self.settings.partition_key_field.as_deref();

        loop {
            let deadline = batcher.deadline();
            let frame = tokio::select! {
                biased;
                frame = frames.next() => frame,
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                    if let Some(batch) = batcher.flush() {
                        summary.add(self.send(ev, batch).await?);
                    }
                    continue;
                }
            };
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| read_err("read body", e.to_string()))?;
            summary.lines += 1;
            let bad = match frame {
                Frame::TooLong { number, offset, len } => {
                    summary.bytes += len + 1;
                    Some((
                        number,
                        offset,
                        format!("line of {len} bytes exceeds MAX_LINE_BYTES ({})", self.settings.max_line_bytes),
                        String::new(),
                    ))
                }
                Frame::Line(line) => {
                    summary.bytes += line.bytes.len() as u64 + 1;
                    if line.bytes.iter().all(u8::is_ascii_whitespace) {
                        summary.blank_lines += 1;
                        continue;
                    }
                    match to_record(&line.bytes, line.number, field, self.settings.record_max_bytes) {
                        Ok(record) => {
                            if let Err(oversized) = batcher.push(record) {
                                // Only possible when RECORD_MAX_BYTES > PUT_MAX_BYTES, which the
                                // configuration refuses; quarantine rather than lose it.
                                let reason = format!("record of {} bytes exceeds PUT_MAX_BYTES", oversized.size);
                                Some((line.number, line.offset, reason, QuarantinedLine::excerpt_of(&line.bytes)))
                            } else {
                                while let Some(batch) = batcher.ready() {
                                    summary.add(self.send(ev, batch).await?);
                                }
                                None
                            }
                        }
                        Err(reason) => {
                            Some((line.number, line.offset, reason, QuarantinedLine::excerpt_of(&line.bytes)))
                        }
                    }
                }
            };
            if let Some((line, offset, reason, excerpt)) = bad {
                warn!(bucket = %ev.bucket, key = %ev.key, line, offset, reason, "line quarantined");
                let entry = QuarantinedLine {
                    bucket: ev.bucket.clone(),
                    key: ev.key.clone(),
                    version: version.clone(),
                    line,
                    offset,
                    reason,
                    excerpt,
                };
                quarantine.add(&entry).await.map_err(|source| self.quarantine_err(ev, source))?;
            }
        }
        while let Some(batch) = batcher.flush() {
            summary.add(self.send(ev, batch).await?);
        }
        summary.quarantined = quarantine.finish().await.map_err(|source| self.quarantine_err(ev, source))?;
        summary.millis = started.elapsed().as_millis() as u64;
        info!(bucket = %ev.bucket, key = %ev.key, lines = summary.lines, records = summary.records, quarantined = summary.quarantined,
              put_calls = summary.put_calls, resent = summary.resent, bytes = summary.bytes, millis = summary.millis, "object processed");
        Ok(summary)
    }

    async fn send(&self, ev: &ObjectEvent, batch: Vec<OutRecord>) -> Result<SendReport, PushError> {
        self.producer.send(batch).await.map_err(|source| PushError::Produce {
            bucket: ev.bucket.clone(),
            key: ev.key.clone(),
            source,
        })
    }

    fn quarantine_err(&self, ev: &ObjectEvent, source: StoreError) -> PushError {
        PushError::Quarantine { bucket: ev.bucket.clone(), key: ev.key.clone(), source }
    }
}

/// Why a GetObject failure means "nothing to do", if it does.
fn gone_reason<R>(e: &SdkError<GetObjectError, R>) -> Option<&'static str> {
    use aws_sdk_s3::error::ProvideErrorMetadata;
    let SdkError::ServiceError(se) = e else {
        return None;
    };
    match se.err().code() {
        _ if se.err().is_no_such_key() => Some("NoSuchKey"),
        Some("NoSuchKey") => Some("NoSuchKey"),
        Some("NoSuchVersion") => Some("NoSuchVersion"),
        Some("PreconditionFailed") => Some("ETag changed: the object was replaced"),
        _ => None,
    }
}

/// Checks a line and makes it a record, or says why it cannot be one.
fn to_record(
    bytes: &bytes::Bytes,
    number: u64,
    field: Option<&str>,
    record_max_bytes: usize,
) -> Result<OutRecord, String> {
    let key = match ndjson::inspect(bytes, field) {
        Ok(key) => key,
        Err(e @ LineError::Utf8 { .. }) => return Err(e.to_string()),
        Err(LineError::Json(e)) => return Err(format!("invalid JSON: {e}")),
    };
    let partition_key = match key {
        Some(k) if !k.is_empty() && k.chars().count() <= MAX_PARTITION_KEY_CHARS => k.into_owned(),
        // No field, field absent, empty or too long: a stable hash of the line spreads records
        // over shards and is the same on every retry.
        _ => format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes)),
    };
    let record = OutRecord::new(partition_key, bytes.clone(), number);
    let size = crate::batch::ByteSize::byte_size(&record);
    if size > record_max_bytes {
        return Err(format!(
            "record of {size} bytes (data and partition key) exceeds RECORD_MAX_BYTES ({record_max_bytes})"
        ));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_take_the_field_or_a_stable_hash() {
        let line = bytes::Bytes::from_static(br#"{"user":"u1","n":1}"#);
        assert_eq!(to_record(&line, 1, Some("user"), 1000).unwrap().partition_key, "u1");
        let hashed = to_record(&line, 1, None, 1000).unwrap().partition_key;
        assert_eq!(hashed.len(), 16);
        assert_eq!(hashed, to_record(&line, 9, Some("missing"), 1000).unwrap().partition_key);
        let long = bytes::Bytes::from(format!(r#"{{"user":"{}"}}"#, "x".repeat(300)));
        assert_eq!(to_record(&long, 1, Some("user"), 1000).unwrap().partition_key.len(), 16);
    }

    #[test]
    fn bad_lines_get_reasons() {
        let err = to_record(&bytes::Bytes::from_static(b"{nope"), 3, None, 1000).unwrap_err();
        assert!(err.starts_with("invalid JSON: key must be a string"), "{err}");
        let err = to_record(&bytes::Bytes::from_static(b"\"\xfe\""), 3, None, 1000).unwrap_err();
        assert_eq!(err, "not UTF-8 (invalid byte at offset 1 of the line)");
        let err = to_record(&bytes::Bytes::from_static(br#"{"a":"0123456789"}"#), 3, None, 20).unwrap_err();
        assert!(err.contains("exceeds RECORD_MAX_BYTES (20)"), "{err}");
    }
}
