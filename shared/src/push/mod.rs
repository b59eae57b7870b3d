//! The push side (feature `push`): an S3 notification in, every line of each new object out to
//! a [`RecordSink`], exactly once.
//!
//! [`PushHandler`] is put together from parts with one job each:
//! - [`source`]: where objects are read ([`source::S3Source`], [`source::FileSource`], yours);
//! - [`crate::lines`]: the object split into lines in bounded memory (gzip undone first);
//! - [`line`](mod@line): your [`line::LineHandler`] (a closure) makes a record of a line, skips it, or says
//!   why it must be quarantined ([`crate::quarantine`]); or your [`line::ObjectHandler`] makes the
//!   records of a whole object;
//! - [`crate::batch`] and [`crate::sink`]: records batched under the PutRecords limits and sent,
//!   partial failures resent;
//! - [`lease`]: the object's lease and progress checkpoints (compare-and-swap), staleness by
//!   sequencer;
//! - `run` (internal): the loop that drives one object through all of the above.
//!
//! Exactly once, across duplicate and out-of-order notifications, retries, timeouts and crashes:
//! progress is checkpointed every `CHECKPOINT_INTERVAL_MS` and before the deadline, each
//! checkpoint first sending the open batch and writing pending quarantine entries, so it always
//! marks a line up to which everything is written. A retry resumes there (a ranged read for plain
//! objects; a gzip stream is re-read and skipped up to there). What a crashed owner sent after its
//! last checkpoint is read back from the sink ([`RecordSink::written_since`]) and not sent again.
//! A completed object is not processed again; an event whose `sequencer` is older than one already
//! seen for the key is stale and skipped.
//!
//! What is an error (the function fails, and async invoke retries) and what is not:
//! - the object is gone or was replaced before we read it (`NoSuchKey`, `NoSuchVersion`, ETag
//!   mismatch): not an error. A log line, and the event is done.
//! - access denied, throttling, network or 5xx on S3; records not written: an error. The failed
//!   invocation ends its lease, so the retry takes the object over at once.
//! - test events, non-`ObjectCreated` events and keys under the function's own output or
//!   quarantine locations (the loop guard): skipped with a log line.
//!
//! ```
//! use pushpull::config::{Env, PushSettings};
//! use pushpull::invocation::Invocation;
//! use pushpull::push::{line::JsonLines, source::FileSource, PushHandler};
//! use pushpull::sink::{OutRecord, PutOutcome, RecordSink, SinkError};
//!
//! /// Keeps what it is sent.
//! #[derive(Default)]
//! struct Memory(std::sync::Mutex<Vec<OutRecord>>);
//! impl RecordSink for Memory {
//!     async fn put_records(&self, records: &[OutRecord]) -> Result<PutOutcome, SinkError> {
//!         self.0.lock().unwrap().extend_from_slice(records);
//!         Ok(PutOutcome::all_written("shardId-0", "1"))
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let dir = tempfile::tempdir().unwrap();
//! std::fs::create_dir_all(dir.path().join("objects/b")).unwrap();
//! std::fs::write(dir.path().join("objects/b/in.ndjson"), "{\"user\":\"u1\"}\n[1]\n{\"user\":\"u2\"}\n").unwrap();
//! // Quarantine and checkpoints where the settings say (here under `dir`).
//! let settings = PushSettings::from_env(Env::from_pairs([("PUT_LINGER_MS", "0")]).with_local_locations(dir.path())).unwrap();
//! let handler = PushHandler::builder(settings)
//!     .source(FileSource::new(dir.path().join("objects")))
//!     .lines(JsonLines::new(Some("user".into())))
//!     .sink(Memory::default())
//!     .build();
//! let event = r#"{"Records":[{"eventVersion":"2.1","eventSource":"aws:s3","eventName":"ObjectCreated:Put",
//!   "s3":{"bucket":{"name":"b"},"object":{"key":"in.ndjson","eTag":"e1","sequencer":"01"}}}]}"#;
//! let summary = handler.handle(event.as_bytes(), &Invocation::new("req-1")).await.unwrap();
//! assert_eq!((summary.objects[0].records, summary.objects[0].quarantined), (2, 1));
//! // The same event again: already done, nothing sent twice.
//! handler.handle(event.as_bytes(), &Invocation::new("req-2")).await.unwrap();
//! assert_eq!(handler.sink().0.lock().unwrap().len(), 2);
//! # });
//! ```
use std::time::{Duration, Instant as StdInstant};

use serde::Serialize;
use tracing::{Instrument, debug, info, warn};

use crate::checkpoint::{CheckpointError, Checkpoints};
use crate::config::PushSettings;
use crate::invocation::Invocation;
use crate::s3_notification::{EventKind, NotificationError, ObjectEvent, S3Notification};
use crate::sink::{ProduceError, Producer, RecordSink, SinkError};
use crate::store::{Store, StoreError};

pub mod lease;
pub mod line;
mod run;
pub mod source;

use lease::{Claim, ClaimError, Leases, ObjectProgress};
use line::{LineHandler, ObjectHandler, Objects, Records};
use source::{ObjectSource, SourceError};

/// The push side failed in a way that retrying may fix, or that must reach a failure destination.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// The payload is not an S3 notification.
    #[error(transparent)]
    Notification(#[from] NotificationError),
    /// One object could not be processed.
    #[error("s3://{bucket}/{key}: {source}")]
    Object {
        /// Bucket.
        bucket: String,
        /// Key (decoded).
        key: String,
        /// What went wrong.
        source: ObjectError,
    },
}

/// What went wrong with one object.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectError {
    /// Opening the object failed.
    #[error("{0}")]
    Open(#[source] SourceError),
    /// Reading the body failed part-way.
    #[error("reading the body: {message}")]
    ReadBody {
        /// The error and its causes, on one line.
        message: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Records could not be written.
    #[error("sending lines: {0}")]
    Produce(#[source] ProduceError),
    /// Another invocation owns this object right now, or kept winning it.
    #[error("{0}")]
    Busy(#[source] ClaimError),
    /// The invocation is about to run out of time; progress was checkpointed and a retry resumes.
    #[error(
        "stopped at line {lines_done} before the invocation deadline; progress is checkpointed and a retry resumes there"
    )]
    OutOfTime {
        /// Lines done so far.
        lines_done: u64,
    },
    /// The invocation had less time left than the deadline margin when this object's turn came:
    /// nothing was claimed or read.
    #[error(
        "the invocation had {left_ms} ms left when this object's turn came, less than the deadline margin of {margin_ms} ms (DEADLINE_MARGIN_MS): nothing was done, and a retry with more time processes it (a function whose timeout is not above the margin never gets there: raise the timeout or lower DEADLINE_MARGIN_MS)"
    )]
    TooLittleTime {
        /// Time the invocation had left, in milliseconds.
        left_ms: u64,
        /// The deadline margin, in milliseconds.
        margin_ms: u64,
    },
    /// Reading or writing a checkpoint failed, or another invocation took the object over.
    #[error("checkpoint: {0}")]
    Checkpoint(#[source] CheckpointError),
    /// Reading back what an interrupted invocation wrote failed.
    #[error("reading back records written before an interruption: {0}")]
    ReadBack(#[source] SinkError),
    /// Quarantined lines could not be stored.
    #[error("quarantining lines: {0}")]
    Quarantine(#[source] StoreError),
    /// The stream's shards could not be listed (`PUT_AGGREGATION=on` packs lines by shard).
    #[error("listing the stream's shards to aggregate by: {0}")]
    ShardMap(#[source] SinkError),
}

impl PushError {
    fn object(ev: &ObjectEvent, source: ObjectError) -> Self {
        PushError::Object { bucket: ev.bucket.clone(), key: ev.key.clone(), source }
    }

    /// A stable name for the kind of failure (the Lambda `errorType`).
    pub fn kind(&self) -> &'static str {
        match self {
            PushError::Notification(_) => "PushError.Notification",
            PushError::Object { source, .. } => match source {
                ObjectError::Open(_) | ObjectError::ReadBody { .. } => "PushError.Read",
                ObjectError::Produce(_) => "PushError.Produce",
                ObjectError::Busy(_) => "PushError.Busy",
                ObjectError::OutOfTime { .. } | ObjectError::TooLittleTime { .. } => "PushError.OutOfTime",
                ObjectError::Checkpoint(_) => "PushError.Checkpoint",
                ObjectError::ReadBack(_) => "PushError.ReadBack",
                ObjectError::ShardMap(_) => "PushError.ShardMap",
                ObjectError::Quarantine(_) => "PushError.Quarantine",
            },
        }
    }
}

#[cfg(feature = "runtime")]
impl From<PushError> for lambda_runtime::Diagnostic {
    fn from(e: PushError) -> Self {
        tracing::error!(error_type = e.kind(), error = %e, "invocation failed");
        lambda_runtime::Diagnostic { error_type: e.kind().to_owned(), error_message: e.to_string() }
    }
}

/// What happened to one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// Every line was sent or quarantined (by this invocation, or finishing an earlier one's work).
    Processed,
    /// The object was already completely processed (a duplicate notification).
    AlreadyDone,
    /// Not processed, on purpose (event kind, loop guard, stale event).
    Skipped {
        /// Why.
        reason: String,
    },
    /// The object is being processed by another invocation that is alive (it renewed its
    /// lease while this one waited): a duplicate or reordered delivery of the same object
    /// version. Left to that owner, whose own event is retried if it fails.
    Deferred {
        /// The owner's request id.
        owner: String,
    },
    /// The object was gone or replaced when read.
    Gone {
        /// What S3 said.
        reason: String,
    },
}

/// The account of one object. Counts are for the whole object, including what earlier
/// invocations did before this one resumed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
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
    /// Bytes read (decompressed).
    pub bytes: u64,
    /// Records written to Kinesis.
    pub records: u64,
    /// Lines quarantined.
    pub quarantined: u64,
    /// Lines the line handler skipped on purpose.
    pub skipped_lines: u64,
    /// PutRecords calls, retries included.
    pub put_calls: u64,
    /// Entries resent after partial failures.
    pub resent: u64,
    /// Kinesis records written: `records` without aggregation, fewer with it.
    pub put_records: u64,
    /// PUT payload units of those Kinesis records (25 KB each, rounded up per record).
    pub put_units: u64,
    /// The line this invocation started after (0: from the start).
    pub resumed_after_line: u64,
    /// Lines an interrupted invocation had already written, found in the stream and not resent.
    pub found_written: u64,
    /// Milliseconds this invocation spent on the object.
    pub millis: u64,
}

impl ObjectSummary {
    fn new(ev: &ObjectEvent, outcome: Outcome) -> Self {
        Self::from_progress(ev, outcome, &ObjectProgress::default())
    }

    fn from_progress(ev: &ObjectEvent, outcome: Outcome, p: &ObjectProgress) -> Self {
        ObjectSummary {
            bucket: ev.bucket.clone(),
            key: ev.key.clone(),
            outcome,
            lines: p.lines_done,
            blank_lines: p.blank_lines,
            bytes: p.bytes_done,
            records: p.records_sent,
            quarantined: p.quarantined,
            skipped_lines: p.skipped_lines,
            put_calls: p.put_calls,
            resent: p.resent,
            put_records: p.put_records,
            put_units: p.put_units,
            resumed_after_line: 0,
            found_written: 0,
            millis: 0,
        }
    }
}

/// The function's response: one summary per record of the notification.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PushSummary {
    /// True for an `s3:TestEvent`.
    pub test_event: bool,
    /// One entry per notification record.
    pub objects: Vec<ObjectSummary>,
}

/// Handles S3 notifications: reads objects from an [`ObjectSource`], makes records of their
/// lines with a [`LineHandler`] (or of whole objects with an [`ObjectHandler`]), sends them to a
/// [`RecordSink`]. Put together with [`PushHandler::builder`]; `pushpull::lambda::run_s3_lines`
/// does it from the environment for S3 to Kinesis.
#[derive(Debug)]
pub struct PushHandler<O, R, S> {
    settings: PushSettings,
    source: O,
    records: R,
    producer: Producer<S>,
    quarantine: Store,
    leases: Leases<Store>,
}

/// Puts a [`PushHandler`] together: settings first, then a source, a line or object handler
/// and a sink, in any order. The quarantine and checkpoints are where the settings say
/// (`QUARANTINE_URI`, `CHECKPOINT_URI`), the one place they are named, so that the loop guard and
/// the writes cannot disagree.
///
/// ```
/// use pushpull::config::{Env, PushSettings};
/// use pushpull::push::{PushHandler, line::WholeObject, source::FileSource};
/// use pushpull::sink::{OutRecord, PutOutcome, RecordSink, SinkError};
/// # struct Sink;
/// # impl RecordSink for Sink {
/// #     async fn put_records(&self, _r: &[OutRecord]) -> Result<PutOutcome, SinkError> {
/// #         Ok(PutOutcome::all_written("shardId-0", "1"))
/// #     }
/// # }
/// let dir = tempfile::tempdir().unwrap();
/// let settings = PushSettings::from_env(Env::from_pairs([("PUT_LINGER_MS", "0")]).with_local_locations(dir.path())).unwrap();
/// // Whole JSON documents, one record each, up to 1 MiB.
/// let handler = PushHandler::builder(settings)
///     .source(FileSource::new(dir.path()))
///     .objects(WholeObject::new(1 << 20, |doc: &[u8]| Ok(vec![OutRecord::keyed("doc", doc.to_vec())])))
///     .sink(Sink)
///     .build();
/// assert!(handler.settings().quarantine.to_string().ends_with("quarantine"));
/// ```
#[derive(Debug)]
#[must_use = "a builder does nothing until built"]
pub struct PushBuilder<O, R, S> {
    settings: PushSettings,
    source: O,
    records: R,
    sink: S,
}

impl PushHandler<(), (), ()> {
    /// A [`PushBuilder`] with these settings.
    pub fn builder(settings: PushSettings) -> PushBuilder<(), (), ()> {
        PushBuilder { settings, source: (), records: (), sink: () }
    }
}

impl<O, R, S> PushBuilder<O, R, S> {
    /// Where objects are read.
    pub fn source<O2: ObjectSource>(self, source: O2) -> PushBuilder<O2, R, S> {
        PushBuilder { settings: self.settings, source, records: self.records, sink: self.sink }
    }

    /// Records are made line by line by `handler` (a closure over a [`line::Line`], or
    /// [`line::JsonLines`]).
    pub fn lines<H: LineHandler>(self, handler: H) -> PushBuilder<O, H, S> {
        PushBuilder { settings: self.settings, source: self.source, records: handler, sink: self.sink }
    }

    /// Records are made of whole objects by `handler`.
    pub fn objects<H: ObjectHandler>(self, handler: H) -> PushBuilder<O, Objects<H>, S> {
        PushBuilder { settings: self.settings, source: self.source, records: Objects(handler), sink: self.sink }
    }

    /// Where records are sent.
    pub fn sink<S2: RecordSink>(self, sink: S2) -> PushBuilder<O, R, S2> {
        PushBuilder { settings: self.settings, source: self.source, records: self.records, sink }
    }
}

impl<O: ObjectSource, R: Records, S: RecordSink> PushBuilder<O, R, S> {
    /// The handler. An `s3://` quarantine or checkpoint location connects at its first call with
    /// a client of its own ([`Store::at`]); [`PushBuilder::connect`] shares one.
    pub fn build(self) -> PushHandler<O, R, S> {
        let (quarantine, checkpoints) = (Store::at(&self.settings.quarantine), Store::at(&self.settings.checkpoint));
        PushHandler::new(self.settings, self.source, self.records, self.sink, quarantine, checkpoints)
    }

    /// The handler, its `s3://` stores on `aws`'s S3 client (one client, one configuration load
    /// for the whole function).
    #[cfg(feature = "s3")]
    pub async fn connect(self, aws: &crate::aws::Aws) -> PushHandler<O, R, S> {
        let quarantine = Store::connect(&self.settings.quarantine, aws).await;
        let checkpoints = Store::connect(&self.settings.checkpoint, aws).await;
        PushHandler::new(self.settings, self.source, self.records, self.sink, quarantine, checkpoints)
    }
}

impl<O: ObjectSource, R: Records, S: RecordSink> PushHandler<O, R, S> {
    /// A handler whose stores are given apart from the settings (the crate's tests, which look
    /// into them).
    pub(crate) fn new(
        settings: PushSettings,
        source: O,
        records: R,
        sink: S,
        quarantine: Store,
        checkpoints: Store,
    ) -> Self {
        let producer = Producer::new(sink, settings.put_max_attempts);
        let leases = Leases::new(Checkpoints::new(checkpoints), settings.lease);
        PushHandler { settings, source, records, producer, quarantine, leases }
    }

    /// The settings in force.
    pub fn settings(&self) -> &PushSettings {
        &self.settings
    }

    /// The sink records go to.
    pub fn sink(&self) -> &S {
        self.producer.sink()
    }

    /// Handles one invocation payload.
    pub async fn handle(&self, payload: &[u8], invocation: &Invocation) -> Result<PushSummary, PushError> {
        match S3Notification::from_slice(payload)? {
            S3Notification::TestEvent { bucket } => {
                info!(bucket = bucket.as_deref().unwrap_or(""), "s3:TestEvent acknowledged; nothing to do");
                Ok(PushSummary { test_event: true, objects: Vec::new() })
            }
            S3Notification::Records(events) => {
                let mut objects = Vec::with_capacity(events.len());
                for ev in &events {
                    metrics::counter!(crate::metrics::OBJECTS, crate::metrics::BUCKET => ev.bucket.clone())
                        .increment(1);
                    // Every log line about the object carries bucket, key and version.
                    let span = tracing::info_span!("object", bucket = %ev.bucket, key = %ev.key,
                        version = ev.version_id.as_deref().or(ev.etag.as_deref()).unwrap_or(""));
                    objects.push(self.handle_event(ev, invocation).instrument(span).await?);
                }
                Ok(PushSummary { test_event: false, objects })
            }
        }
    }

    async fn handle_event(&self, ev: &ObjectEvent, invocation: &Invocation) -> Result<ObjectSummary, PushError> {
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
        // Boxed: the object pipeline is a deep future, and boxing it here keeps the handler's own
        // future small (and the compiler's layout queries shallow).
        Box::pin(self.process_object(ev, invocation)).await
    }

    /// Claims the object; if another invocation owns it (a duplicate or out-of-order delivery of
    /// the same object's event while the first still runs: S3 and async invoke are at least
    /// once), waits for that owner to finish (then `Done`) or for its lease to lapse (a dead
    /// owner: then this invocation takes over), checking a few times per lease, for at most twice
    /// the lease and never past the deadline margin; then `Busy`, and the event is retried later.
    /// Answering `Busy` at once would spend the event's retries while the owner is still at work,
    /// and a duplicate would end in the failure destination although its object was processed.
    ///
    /// If the owner renewed its lease while this invocation waited, it is alive and at work: the
    /// object is left to it (`Ok(Err(owner))`: [`Outcome::Deferred`]); its own event is retried by
    /// Lambda if it fails, so nothing depends on this one.
    async fn claim_or_wait(
        &self,
        ev: &ObjectEvent,
        invocation: &Invocation,
    ) -> Result<Result<Claim, String>, ClaimError> {
        let lease = self.settings.lease;
        let give_up = tokio::time::Instant::now() + lease * 2;
        let give_up = invocation.stop_at(self.settings.deadline_margin).map_or(give_up, |d| d.min(give_up));
        let poll = (lease / 4).clamp(Duration::from_millis(25), Duration::from_secs(1));
        let mut first_seen: Option<u64> = None;
        loop {
            match self.leases.claim(ev, invocation.request_id()).await {
                Err(ClaimError::Busy { owner, lease_until_ms }) => {
                    let renewed = first_seen.is_some_and(|first| lease_until_ms > first);
                    first_seen.get_or_insert(lease_until_ms);
                    if tokio::time::Instant::now() + poll >= give_up {
                        if renewed {
                            info!(bucket = %ev.bucket, key = %ev.key, owner, "object being processed by a live invocation; left to it");
                            return Ok(Err(owner));
                        }
                        return Err(ClaimError::Busy { owner, lease_until_ms });
                    }
                    debug!(bucket = %ev.bucket, key = %ev.key, owner, lease_until_ms, "object owned by another invocation; waiting");
                    tokio::time::sleep(poll).await;
                }
                other => return other.map(Ok),
            }
        }
    }

    /// Streams one object's lines to the sink, resuming from its checkpoint if an earlier
    /// invocation was interrupted.
    pub async fn process_object(&self, ev: &ObjectEvent, invocation: &Invocation) -> Result<ObjectSummary, PushError> {
        let started = StdInstant::now();
        let err = |e| PushError::object(ev, e);
        let margin = self.settings.deadline_margin;
        if invocation.out_of_time(margin) {
            let left = invocation.remaining().unwrap_or_default();
            warn!(bucket = %ev.bucket, key = %ev.key, left_ms = left.as_millis() as u64, "less time left than the deadline margin; not started");
            return Err(err(ObjectError::TooLittleTime {
                left_ms: left.as_millis() as u64,
                margin_ms: margin.as_millis() as u64,
            }));
        }
        if let Some(sequencer) = &ev.sequencer
            && self.leases.is_stale(ev, sequencer).await.map_err(|e| err(ObjectError::Checkpoint(e)))?
        {
            info!(bucket = %ev.bucket, key = %ev.key, sequencer = sequencer.as_str(), "stale event: a newer event for this key was already seen");
            return Ok(ObjectSummary::new(ev, Outcome::Skipped { reason: "stale event (older sequencer)".into() }));
        }
        let (progress, version, interrupted) = match self.claim_or_wait(ev, invocation).await {
            Ok(Err(owner)) => return Ok(ObjectSummary::new(ev, Outcome::Deferred { owner })),
            Ok(Ok(Claim::Done(p))) => {
                info!(bucket = %ev.bucket, key = %ev.key, "already processed; duplicate notification ignored");
                return Ok(ObjectSummary::from_progress(ev, Outcome::AlreadyDone, &p));
            }
            Ok(Ok(Claim::Owned { progress, version, interrupted })) => (progress, version, interrupted),
            Err(ClaimError::Checkpoint(e)) => return Err(err(ObjectError::Checkpoint(e))),
            Err(e) => return Err(err(ObjectError::Busy(e))),
        };
        let before = progress.clone();
        let mut run = run::Run::new(self, ev, progress, version);
        // The loop checkpoints and stops `DEADLINE_MARGIN_MS` before the deadline, but it looks
        // at the clock between lines: a PutRecords call that stalls, or a resend's backoff, could
        // run past the timeout. At half the margin the object is stopped wherever it is; what it
        // sent after its last checkpoint is found in the stream by the retry.
        let hard_stop = invocation.stop_at(self.settings.deadline_margin / 2);
        let outcome = match hard_stop {
            None => run.process(interrupted, invocation).await,
            Some(at) => tokio::select! {
                outcome = run.process(interrupted, invocation) => outcome,
                () = tokio::time::sleep_until(at) => {
                    warn!(bucket = %ev.bucket, key = %ev.key, "stopped at half the deadline margin, mid-call; the retry resumes from the last checkpoint");
                    Err(ObjectError::OutOfTime { lines_done: run.progress.lines_done })
                }
            },
        };
        record_metrics(&ev.bucket, &before, &run.progress);
        match outcome {
            Ok(outcome) => {
                let summary = run.summary(outcome, started);
                if summary.outcome == Outcome::Processed {
                    info!(bucket = %ev.bucket, key = %ev.key, lines = summary.lines, records = summary.records, quarantined = summary.quarantined,
                          skipped_lines = summary.skipped_lines, put_calls = summary.put_calls, resent = summary.resent, bytes = summary.bytes,
                          resumed_after_line = summary.resumed_after_line, found_written = summary.found_written, millis = summary.millis, "object processed");
                }
                Ok(summary)
            }
            Err(ObjectError::Checkpoint(CheckpointError::Conflict { .. })) => {
                // Another invocation took the object over (this one stalled past its lease; the
                // send fence stopped it before it sent anything more). That invocation is alive
                // (it just wrote the checkpoint) and its own event is retried if it fails: the
                // object is left to it, and this event does not spend its retries on it.
                warn!(bucket = %ev.bucket, key = %ev.key, lines_done = run.progress.lines_done, "another invocation took the object over; left to it");
                Ok(ObjectSummary::new(ev, Outcome::Deferred { owner: "the invocation that took it over".into() }))
            }
            Err(e) => {
                // End the lease so that the retry takes the object over at once.
                if let Err(release) = self.leases.release(ev, &run.progress, &run.version).await {
                    warn!(bucket = %ev.bucket, key = %ev.key, error = %release, "could not end the lease after a failure; a retry waits for it to run out");
                }
                Err(err(e))
            }
        }
    }
}

/// What one invocation did to an object, from the checkpoints before and after it (so a resumed
/// object counts only this invocation's share), as [`crate::metrics`] with the bucket dimension.
fn record_metrics(bucket: &str, before: &ObjectProgress, after: &ObjectProgress) {
    use crate::metrics::{
        BUCKET, BYTES_READ, LINES_IN, PUT_RECORDS_CALLS, QUARANTINED_LINES, RECORDS_SENT, RESENT_ENTRIES,
    };
    let labels = [(BUCKET, bucket.to_owned())];
    for (name, was, is) in [
        (LINES_IN, before.lines_done, after.lines_done),
        (BYTES_READ, before.bytes_done, after.bytes_done),
        (RECORDS_SENT, before.records_sent, after.records_sent),
        (PUT_RECORDS_CALLS, before.put_calls, after.put_calls),
        (RESENT_ENTRIES, before.resent, after.resent),
        (QUARANTINED_LINES, before.quarantined, after.quarantined),
    ] {
        metrics::counter!(name, &labels).increment(is.saturating_sub(was));
    }
}
