//! The push side: an S3 notification in, every line of each new object out to Kinesis.
//!
//! For each `ObjectCreated` record of a notification, [`PushHandler`] streams the object (never
//! whole in memory), splits it into lines ([`crate::lines`]), checks each line and picks its
//! partition key ([`crate::ndjson`]), batches records under the PutRecords limits
//! ([`crate::batch`]) and sends them ([`crate::kinesis_producer`]). Lines that cannot be sent (not
//! UTF-8, not JSON, too long) go to the quarantine ([`crate::quarantine`]) with their line number,
//! byte offset and reason, and never stop the rest.
//!
//! Exactly once, across duplicate and out-of-order notifications, retries, timeouts and crashes:
//! - each object version has a checkpoint (`objects/<bucket>/<key>/<version or ETag>.json` in
//!   `CHECKPOINT_URI`) written by compare-and-swap. The invocation that creates it owns the
//!   object for `CHECKPOINT_LEASE_MS` after each checkpoint; another invocation for the same object
//!   meanwhile fails with [`PushError::Busy`] (its retry finds the object done).
//! - progress is checkpointed every `CHECKPOINT_INTERVAL_MS`, and before the deadline. A checkpoint
//!   first sends the open batch and writes pending quarantine entries, so it always marks a line
//!   up to which everything is written. A retry resumes there (a ranged read for plain objects; a
//!   gzip stream is re-read and skipped up to there).
//! - what a crashed owner sent after its last checkpoint is found by reading the stream back from
//!   the shard positions of that checkpoint ([`RecordSink::written_since`]), and not sent again.
//! - a completed object is not processed again; an event whose `sequencer` is older than one
//!   already seen for the key is stale and skipped (`keys/<bucket>/<key>.json`).
//!
//! What is an error (the function fails, and async invoke retries) and what is not:
//! - the object is gone or was replaced before we read it (`NoSuchKey`, `NoSuchVersion`, ETag
//!   mismatch): not an error. A log line, and the event is done: a later event describes the
//!   new object, and retrying could never succeed.
//! - access denied, throttling, network or 5xx on S3; records not written to Kinesis: an error.
//! - test events, non-`ObjectCreated` events and keys under the function's own output or
//!   quarantine locations (the loop guard): skipped with a log line.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant as StdInstant, SystemTime, UNIX_EPOCH};

use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::operation::get_object::GetObjectError;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufRead;
use tokio_util::codec::FramedRead;
use tracing::{info, warn};

use crate::batch::KeyOrderedBatcher;
use crate::checkpoint::{CheckpointError, Checkpoints};
use crate::config::{Ordering, PushSettings};
use crate::kinesis_producer::{
    FaultInjectingSink, KinesisSink, OutRecord, ProduceError, Producer, RecordSink, SendReport,
};
use crate::lines::{BlockFrame, LineBlock, LineBlocks, LineCodec};
use crate::ndjson::{self, LineError};
use crate::object_reader::{ObjectReader, ObjectRef};
use crate::quarantine::{QuarantineWriter, QuarantinedLine, safe_path};
use crate::s3_notification::{EventKind, NotificationError, ObjectEvent, S3Notification, Sequencer};
use crate::store::{Etag, Store, StoreError};

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
    /// Another invocation owns this object right now (it is being processed).
    #[error(
        "s3://{bucket}/{key} is being processed by invocation {owner} (lease until {lease_until_ms} ms); retry later"
    )]
    Busy {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// The owning invocation.
        owner: String,
        /// When its lease ends, epoch milliseconds.
        lease_until_ms: u64,
    },
    /// The invocation is about to run out of time; progress was checkpointed and a retry resumes.
    #[error(
        "s3://{bucket}/{key}: stopped at line {lines_done} before the invocation deadline; progress is checkpointed and a retry resumes there"
    )]
    OutOfTime {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// Lines done so far.
        lines_done: u64,
    },
    /// Reading or writing a checkpoint failed, or another invocation took the object over.
    #[error("checkpoint of s3://{bucket}/{key}: {source}")]
    Checkpoint {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// What went wrong.
        source: CheckpointError,
    },
    /// Reading back what an interrupted invocation wrote failed.
    #[error("reading back records of s3://{bucket}/{key} written before an interruption: {message}")]
    ReadBack {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// What went wrong.
        message: String,
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
            PushError::Busy { .. } => "PushError.Busy",
            PushError::OutOfTime { .. } => "PushError.OutOfTime",
            PushError::Checkpoint { .. } => "PushError.Checkpoint",
            PushError::ReadBack { .. } => "PushError.ReadBack",
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
    /// Every line was sent or quarantined (by this invocation, or finishing an earlier one's work).
    Processed,
    /// The object was already completely processed (a duplicate notification).
    AlreadyDone,
    /// Not processed, on purpose (event kind, loop guard, stale event).
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

/// The account of one object. Counts are for the whole object, including what earlier
/// invocations did before this one resumed it.
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
    /// Bytes read (decompressed).
    pub bytes: u64,
    /// Records written to Kinesis.
    pub records: u64,
    /// Lines quarantined.
    pub quarantined: u64,
    /// PutRecords calls, retries included.
    pub put_calls: u64,
    /// Entries resent after partial failures.
    pub resent: u64,
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
            put_calls: p.put_calls,
            resent: p.resent,
            resumed_after_line: 0,
            found_written: 0,
            millis: 0,
        }
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

/// Who is invoking, and until when: the owner name for checkpoints and the deadline to stop by.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The request id (owner of the checkpoints this invocation writes).
    pub request_id: String,
    /// When the invocation times out.
    pub deadline: Option<SystemTime>,
}

impl Invocation {
    /// From the Lambda context.
    pub fn from_context(ctx: &lambda_runtime::Context) -> Self {
        Invocation { request_id: ctx.request_id.clone(), deadline: Some(ctx.deadline()) }
    }

    /// An invocation with no deadline (tools, benchmarks).
    pub fn unbounded(request_id: impl Into<String>) -> Self {
        Invocation { request_id: request_id.into(), deadline: None }
    }

    fn out_of_time(&self, margin: Duration) -> bool {
        self.deadline.is_some_and(|d| SystemTime::now() + margin >= d)
    }
}

/// The checkpoint of one object version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectProgress {
    /// Bucket.
    pub bucket: String,
    /// Key.
    pub key: String,
    /// Version id, ETag, or `unversioned`.
    pub version: String,
    /// The event's sequencer.
    pub sequencer: Option<Sequencer>,
    /// Every line is written or quarantined.
    pub complete: bool,
    /// How it ended, when complete and not processed normally (`gone: ...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    /// The invocation that owns the object.
    pub owner: String,
    /// The owner's lease ends here (epoch ms); after it another invocation may take over.
    pub lease_until_ms: u64,
    /// When this checkpoint was written (epoch ms).
    pub checkpointed_at_ms: u64,
    /// Every line up to this one is written, quarantined or blank.
    pub lines_done: u64,
    /// Byte offset (in the decompressed input) just after `lines_done`.
    pub bytes_done: u64,
    /// Blank lines so far.
    pub blank_lines: u64,
    /// Records written so far.
    pub records_sent: u64,
    /// Lines quarantined so far.
    pub quarantined: u64,
    /// PutRecords calls so far.
    pub put_calls: u64,
    /// Entries resent so far.
    pub resent: u64,
    /// Highest sequence number written to each shard so far.
    pub shard_positions: BTreeMap<String, String>,
}

/// Handles S3 notifications: reads objects, sends their lines to a [`RecordSink`].
#[derive(Debug)]
pub struct PushHandler<S> {
    settings: PushSettings,
    s3: aws_sdk_s3::Client,
    producer: Producer<S>,
    quarantine: Store,
    checkpoints: Checkpoints<Store>,
}

/// The handler a deployed function runs.
pub type DeployedPushHandler = PushHandler<FaultInjectingSink<KinesisSink>>;

impl DeployedPushHandler {
    /// The handler a deployed function runs: settings from the environment (every problem
    /// reported at once), clients from the AWS configuration, records to `STREAM_NAME`.
    pub async fn from_env(aws: &crate::aws::Aws) -> Result<Self, crate::config::ConfigErrors> {
        let settings = PushSettings::from_env(crate::config::Env::from_process())?;
        let sink = KinesisSink::new(aws.kinesis().await.clone(), &settings.stream_name);
        let sink = FaultInjectingSink::new(sink, settings.inject_put_failures);
        let quarantine = Store::connect(&settings.quarantine, aws).await;
        let checkpoints = Store::connect(&settings.checkpoint, aws).await;
        Ok(Self::new(settings, aws.s3().await.clone(), sink, quarantine, checkpoints))
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

enum Claim {
    Done(ObjectProgress),
    /// `interrupted`: the earlier owner's checkpoint, when this claim takes over from one.
    Owned {
        progress: ObjectProgress,
        version: Etag,
        interrupted: Option<Interrupted>,
    },
}

/// When an interrupted owner may have written records its checkpoint does not cover: from its
/// last checkpoint (less a margin for clock skew between this host and Kinesis's arrival stamps)
/// to the end of its lease (plus twice that margin). Taken from the earlier checkpoint before the
/// claim overwrites those fields with the new owner's.
#[derive(Debug, Clone, Copy)]
struct Interrupted {
    since_ms: u64,
    until_ms: u64,
}

impl Interrupted {
    const SKEW_MS: u64 = 5_000;

    fn of(p: &ObjectProgress) -> Self {
        Interrupted {
            since_ms: p.checkpointed_at_ms.saturating_sub(Self::SKEW_MS),
            until_ms: p.lease_until_ms.saturating_add(2 * Self::SKEW_MS),
        }
    }
}

/// Records an interrupted owner wrote after its last checkpoint, by partition key, in order.
struct Written {
    by_key: HashMap<String, VecDeque<Bytes>>,
}

impl Written {
    /// Whether the line (key, data) is the next record of `key` already in the stream. Records of a
    /// key were sent in line order, so once a line of a key is missing, no later line of that key
    /// was written either.
    fn take(&mut self, key: &str, data: &[u8]) -> bool {
        let Some(queue) = self.by_key.get_mut(key) else { return false };
        match queue.iter().position(|d| d[..] == *data) {
            Some(i) => {
                queue.drain(..=i);
                true
            }
            None => {
                self.by_key.remove(key);
                false
            }
        }
    }
}

/// The state of one object while its lines flow.
struct Run<'a> {
    ev: &'a ObjectEvent,
    progress: ObjectProgress,
    version: Etag,
    batcher: KeyOrderedBatcher<OutRecord>,
    quarantine: QuarantineWriter,
    /// Last line read and the offset after it; blank lines read since the last checkpoint.
    read_line: u64,
    read_offset: u64,
    blank_since: u64,
    sent: SendReport,
    last_checkpoint: StdInstant,
}

impl<S: RecordSink> PushHandler<S> {
    /// A handler reading with `s3`, sending to `sink`, quarantining into `quarantine`, keeping
    /// checkpoints in `checkpoints`.
    pub fn new(settings: PushSettings, s3: aws_sdk_s3::Client, sink: S, quarantine: Store, checkpoints: Store) -> Self {
        let producer = Producer::new(sink, settings.put_max_attempts);
        PushHandler { settings, s3, producer, quarantine, checkpoints: Checkpoints::new(checkpoints) }
    }

    /// The settings in force.
    pub fn settings(&self) -> &PushSettings {
        &self.settings
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
                    objects.push(self.handle_event(ev, invocation).await?);
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

    fn checkpoint_err(&self, ev: &ObjectEvent) -> impl Fn(CheckpointError) -> PushError + '_ {
        let (bucket, key) = (ev.bucket.clone(), ev.key.clone());
        move |source| PushError::Checkpoint { bucket: bucket.clone(), key: key.clone(), source }
    }

    /// Whether a newer event for the key was already seen (this one is then stale).
    async fn is_stale(&self, ev: &ObjectEvent, sequencer: &Sequencer) -> Result<bool, PushError> {
        #[derive(Serialize, Deserialize)]
        struct Latest {
            sequencer: Sequencer,
        }
        let id = format!("keys/{}/{}.json", ev.bucket, safe_path(&ev.key));
        for _ in 0..5 {
            let current = self.checkpoints.load::<Latest>(&id).await.map_err(self.checkpoint_err(ev))?;
            let write = match &current {
                Some((latest, _)) if latest.sequencer > *sequencer => return Ok(true),
                Some((latest, _)) if latest.sequencer == *sequencer => return Ok(false),
                Some((_, etag)) => self.checkpoints.replace(&id, &Latest { sequencer: sequencer.clone() }, etag).await,
                None => self.checkpoints.create(&id, &Latest { sequencer: sequencer.clone() }).await,
            };
            match write {
                Ok(_) => return Ok(false),
                Err(CheckpointError::Conflict { .. }) => continue, // someone else moved it: look again
                Err(e) => return Err(self.checkpoint_err(ev)(e)),
            }
        }
        Ok(false)
    }

    async fn claim(
        &self,
        ev: &ObjectEvent,
        id: &str,
        version: &str,
        invocation: &Invocation,
    ) -> Result<Claim, PushError> {
        let lease_ms = self.settings.lease.as_millis() as u64;
        for _ in 0..5 {
            let now = now_ms();
            let (progress, etag, interrupted) =
                match self.checkpoints.load::<ObjectProgress>(id).await.map_err(self.checkpoint_err(ev))? {
                    Some((p, _)) if p.complete => return Ok(Claim::Done(p)),
                    Some((p, _)) if p.owner != invocation.request_id && p.lease_until_ms > now => {
                        return Err(PushError::Busy {
                            bucket: ev.bucket.clone(),
                            key: ev.key.clone(),
                            owner: p.owner,
                            lease_until_ms: p.lease_until_ms,
                        });
                    }
                    Some((p, etag)) => {
                        let interrupted = Interrupted::of(&p);
                        (p, Some(etag), Some(interrupted))
                    }
                    None => {
                        let p = ObjectProgress {
                            bucket: ev.bucket.clone(),
                            key: ev.key.clone(),
                            version: version.to_owned(),
                            sequencer: ev.sequencer.clone(),
                            ..ObjectProgress::default()
                        };
                        (p, None, None)
                    }
                };
            let mut mine = progress;
            mine.owner = invocation.request_id.clone();
            mine.lease_until_ms = now + lease_ms;
            mine.checkpointed_at_ms = now;
            let written = match &etag {
                Some(etag) => self.checkpoints.replace(id, &mine, etag).await,
                None => self.checkpoints.create(id, &mine).await,
            };
            match written {
                Ok(version) => return Ok(Claim::Owned { progress: mine, version, interrupted }),
                Err(CheckpointError::Conflict { .. }) => continue,
                Err(e) => return Err(self.checkpoint_err(ev)(e)),
            }
        }
        Err(PushError::Busy {
            bucket: ev.bucket.clone(),
            key: ev.key.clone(),
            owner: "(contended)".into(),
            lease_until_ms: now_ms(),
        })
    }

    /// Streams one object's lines to the sink, resuming from its checkpoint if an earlier
    /// invocation was interrupted.
    pub async fn process_object(&self, ev: &ObjectEvent, invocation: &Invocation) -> Result<ObjectSummary, PushError> {
        let started = StdInstant::now();
        if let Some(sequencer) = &ev.sequencer
            && self.is_stale(ev, sequencer).await?
        {
            info!(bucket = %ev.bucket, key = %ev.key, sequencer = sequencer.as_str(), "stale event: a newer event for this key was already seen");
            return Ok(ObjectSummary::new(ev, Outcome::Skipped { reason: "stale event (older sequencer)".into() }));
        }
        let version = ev.version_id.clone().or_else(|| ev.etag.clone()).unwrap_or_else(|| "unversioned".into());
        let id = format!("objects/{}/{}/{}.json", ev.bucket, safe_path(&ev.key), safe_path(&version));
        let (progress, cp_version, interrupted) = match self.claim(ev, &id, &version, invocation).await? {
            Claim::Done(p) => {
                info!(bucket = %ev.bucket, key = %ev.key, "already processed; duplicate notification ignored");
                return Ok(ObjectSummary::from_progress(ev, Outcome::AlreadyDone, &p));
            }
            Claim::Owned { progress, version, interrupted } => (progress, version, interrupted),
        };
        let resumed_after_line = progress.lines_done;

        let read_err =
            |operation, message| PushError::Read { bucket: ev.bucket.clone(), key: ev.key.clone(), operation, message };
        let gzip_by_name = ev.key.ends_with(".gz");
        let ranged = interrupted.is_some() && progress.bytes_done > 0 && !gzip_by_name;
        let mut get = self.s3.get_object().bucket(&ev.bucket).key(&ev.key);
        if let Some(v) = &ev.version_id {
            get = get.version_id(v);
        } else if let Some(etag) = &ev.etag {
            // Unversioned bucket: read only the object the event announced.
            get = get.if_match(format!("\"{etag}\""));
        }
        if ranged {
            get = get.range(format!("bytes={}-", progress.bytes_done));
        }
        let object = match get.send().await {
            Ok(o) => o,
            Err(e) => {
                if let Some(reason) = gone_reason(&e) {
                    warn!(bucket = %ev.bucket, key = %ev.key, reason, "object gone or replaced before it was read; nothing to do");
                    let mut done = progress;
                    done.complete = true;
                    done.ended = Some(format!("gone: {reason}"));
                    // Best effort: a lost race here only means a later duplicate finds it gone too.
                    let _ = self.checkpoints.replace(&id, &done, &cp_version).await;
                    return Ok(ObjectSummary::new(ev, Outcome::Gone { reason: reason.to_owned() }));
                }
                if ranged && is_range_not_satisfiable(&e) {
                    // The checkpoint is at the very end of the object: nothing left to read.
                    return self.finish(ev, &id, progress, cp_version, started).await;
                }
                return Err(read_err("GetObject", crate::aws::describe(&e)));
            }
        };
        let gzip = gzip_by_name || object.content_encoding().is_some_and(|c| c.eq_ignore_ascii_case("gzip"));
        let object_ref = ObjectRef {
            bucket: ev.bucket.clone(),
            key: ev.key.clone(),
            version_id: ev.version_id.clone(),
            etag: object.e_tag().map(str::to_owned),
        };
        let start = if ranged { progress.bytes_done } else { 0 };
        let body = tokio::io::BufReader::with_capacity(
            64 * 1024,
            ObjectReader::new(self.s3.clone(), object_ref, start, object.body),
        );
        let reader: Box<dyn AsyncBufRead + Send + Unpin> = if gzip {
            let mut decoder = async_compression::tokio::bufread::GzipDecoder::new(body);
            decoder.multiple_members(true);
            Box::new(tokio::io::BufReader::with_capacity(64 * 1024, decoder))
        } else {
            Box::new(body)
        };
        // A ranged read starts at the checkpoint; a gzip stream is re-read from the start and the
        // lines up to the checkpoint are skipped.
        let codec = if ranged {
            LineCodec::new(self.settings.max_line_bytes).starting_at(progress.lines_done + 1, progress.bytes_done)
        } else {
            LineCodec::new(self.settings.max_line_bytes)
        };
        // Reading and splitting run in a task of their own and hand over blocks of whole lines, so
        // that the S3 read overlaps the checking and batching below.
        let (mut blocks_in, _reader) =
            spawn_block_reader(FramedRead::with_capacity(reader, LineBlocks::new(codec), 64 * 1024));
        let mut block = LineBlock::default();
        let mut at = 0usize;

        let mut written = if let Some(window) = interrupted {
            let positions = &progress.shard_positions;
            let found =
                self.producer.sink().written_since(positions, window.since_ms, window.until_ms).await.map_err(|e| {
                    PushError::ReadBack { bucket: ev.bucket.clone(), key: ev.key.clone(), message: e.message }
                })?;
            let mut by_key: HashMap<String, VecDeque<Bytes>> = HashMap::new();
            for r in found {
                by_key.entry(r.partition_key).or_default().push_back(r.data);
            }
            info!(bucket = %ev.bucket, key = %ev.key, after_line = progress.lines_done, "resuming an interrupted object");
            Some(Written { by_key })
        } else {
            None
        };
        let mut found_written = 0u64;

        let version_label = ev.version_id.clone().or_else(|| ev.etag.clone());
        let q_prefix = format!(
            "{}/{}/{}",
            ev.bucket,
            safe_path(&ev.key),
            safe_path(version_label.as_deref().unwrap_or("unversioned"))
        );
        let mut run = Run {
            ev,
            read_line: progress.lines_done,
            read_offset: progress.bytes_done,
            progress,
            version: cp_version,
            batcher: KeyOrderedBatcher::new(self.settings.put, self.settings.put.max_events()),
            quarantine: QuarantineWriter::new(self.quarantine.clone(), q_prefix),
            blank_since: 0,
            sent: SendReport::default(),
            last_checkpoint: StdInstant::now(),
        };
        let field = self.settings.partition_key_field.as_deref();
        let mut blocks = DataBlocks::default();

        // One timer for the linger of the open batch, re-armed only when that deadline changes,
        // and the clocks read every 128 lines: this loop runs per line, millions of times.
        let linger = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(linger);
        let mut armed = None;
        let mut tick = 0u32;
        loop {
            tick = tick.wrapping_add(1);
            if tick.is_multiple_of(128) || run.quarantine.is_full() {
                if run.last_checkpoint.elapsed() >= self.settings.checkpoint_interval || run.quarantine.is_full() {
                    self.checkpoint(&id, &mut run, false).await?;
                }
                if invocation.out_of_time(self.settings.deadline_margin) {
                    self.checkpoint(&id, &mut run, false).await?;
                    warn!(bucket = %ev.bucket, key = %ev.key, lines_done = run.progress.lines_done, "stopping before the deadline; a retry resumes from the checkpoint");
                    return Err(PushError::OutOfTime {
                        bucket: ev.bucket.clone(),
                        key: ev.key.clone(),
                        lines_done: run.progress.lines_done,
                    });
                }
            }
            let deadline = run.batcher.deadline();
            if deadline != armed {
                if let Some(d) = deadline {
                    linger.as_mut().reset(d);
                }
                armed = deadline;
            }
            let frame = match block.frames.get(at) {
                Some(frame) => {
                    at += 1;
                    *frame
                }
                None => {
                    let next = tokio::select! {
                        biased;
                        next = blocks_in.recv() => next,
                        _ = &mut linger, if armed.is_some() => {
                            self.flush_batch(&mut run).await?;
                            continue;
                        }
                    };
                    match next {
                        None => break,
                        Some(Err(e)) => return Err(read_err("read body", crate::aws::error_chain(&e))),
                        Some(Ok(next)) => {
                            block = next;
                            at = 0;
                            continue;
                        }
                    }
                }
            };
            let (BlockFrame::TooLong { number, offset, next_offset, .. }
            | BlockFrame::Line { number, offset, next_offset, .. }) = frame;
            if number <= run.progress.lines_done {
                continue; // done before the checkpoint (gzip resume re-reads from the start)
            }
            run.read_line = number;
            run.read_offset = next_offset;
            let bad = match frame {
                BlockFrame::TooLong { len, .. } => Some((
                    format!("line of {len} bytes exceeds MAX_LINE_BYTES ({})", self.settings.max_line_bytes),
                    String::new(),
                )),
                BlockFrame::Line { .. } => {
                    let line = block.line(&frame);
                    if line.iter().all(u8::is_ascii_whitespace) {
                        run.blank_since += 1;
                        continue;
                    }
                    match to_record(line, number, field, self.settings.record_max_bytes, &mut blocks) {
                        Err(reason) => Some((reason, QuarantinedLine::excerpt_of(line))),
                        Ok(record) => {
                            if written.as_mut().is_some_and(|w| w.take(&record.partition_key, &record.data)) {
                                found_written += 1;
                                run.sent.records += 1;
                                continue;
                            }
                            self.add_record(&mut run, record).await?;
                            None
                        }
                    }
                }
            };
            if let Some((reason, excerpt)) = bad {
                warn!(bucket = %ev.bucket, key = %ev.key, line = number, offset, reason, "line quarantined");
                let entry = QuarantinedLine {
                    bucket: ev.bucket.clone(),
                    key: ev.key.clone(),
                    version: version_label.clone(),
                    line: number,
                    offset,
                    reason,
                    excerpt,
                };
                run.quarantine.add(&entry);
            }
        }
        self.checkpoint(&id, &mut run, true).await?;
        Ok(processed_summary(ev, &run.progress, resumed_after_line, found_written, started))
    }

    /// Marks an object complete whose checkpoint already covers all of it.
    async fn finish(
        &self,
        ev: &ObjectEvent,
        id: &str,
        mut progress: ObjectProgress,
        version: Etag,
        started: StdInstant,
    ) -> Result<ObjectSummary, PushError> {
        let resumed_after_line = progress.lines_done;
        progress.complete = true;
        progress.checkpointed_at_ms = now_ms();
        self.checkpoints.replace(id, &progress, &version).await.map_err(self.checkpoint_err(ev))?;
        Ok(processed_summary(ev, &progress, resumed_after_line, 0, started))
    }

    /// Adds a record to the batcher and sends whatever batches are full.
    async fn add_record(&self, run: &mut Run<'_>, record: OutRecord) -> Result<(), PushError> {
        // With per-key ordering a batch holds one record of a key; a later one waits for the next
        // batch (see KeyOrderedBatcher), so a partial failure resent before the next batch cannot
        // be overtaken.
        let key = (self.settings.ordering == Ordering::PerKey)
            .then(|| xxhash_rust::xxh3::xxh3_64(record.partition_key.as_bytes()));
        if let Err(oversized) = run.batcher.push(key, record) {
            // Only possible if RECORD_MAX_BYTES > PUT_MAX_BYTES, which the configuration refuses.
            let reason = format!("record of {} bytes exceeds PUT_MAX_BYTES", oversized.size);
            let entry = QuarantinedLine {
                bucket: run.ev.bucket.clone(),
                key: run.ev.key.clone(),
                version: None,
                line: oversized.item.line,
                offset: run.read_offset,
                reason,
                excerpt: QuarantinedLine::excerpt_of(&oversized.item.data),
            };
            run.quarantine.add(&entry);
            return Ok(());
        }
        while let Some(batch) = run.batcher.ready() {
            self.send(run, batch).await?;
        }
        Ok(())
    }

    /// Sends everything buffered, records held back for a later batch included.
    async fn flush_batch(&self, run: &mut Run<'_>) -> Result<(), PushError> {
        while let Some(batch) = run.batcher.flush() {
            self.send(run, batch).await?;
        }
        Ok(())
    }

    async fn send(&self, run: &mut Run<'_>, batch: Vec<OutRecord>) -> Result<(), PushError> {
        let report = self.producer.send(batch).await.map_err(|source| PushError::Produce {
            bucket: run.ev.bucket.clone(),
            key: run.ev.key.clone(),
            source,
        })?;
        run.sent.merge(report);
        Ok(())
    }

    /// Makes everything read so far durable (open batch sent, quarantine part written), then
    /// records it with compare-and-swap, renewing the lease.
    async fn checkpoint(&self, id: &str, run: &mut Run<'_>, complete: bool) -> Result<(), PushError> {
        self.flush_batch(run).await?;
        let first_line = run.progress.lines_done + 1;
        let quarantined = run.quarantine.write_part(first_line).await.map_err(|source| PushError::Quarantine {
            bucket: run.ev.bucket.clone(),
            key: run.ev.key.clone(),
            source,
        })?;
        let sent = std::mem::take(&mut run.sent);
        let p = &mut run.progress;
        p.lines_done = run.read_line;
        p.bytes_done = run.read_offset;
        p.blank_lines += std::mem::take(&mut run.blank_since);
        p.records_sent += sent.records as u64;
        p.put_calls += sent.calls as u64;
        p.resent += sent.resent as u64;
        p.quarantined += quarantined as u64;
        for (shard, seq) in sent.positions {
            p.shard_positions.insert(shard, seq.to_string());
        }
        let now = now_ms();
        p.checkpointed_at_ms = now;
        p.lease_until_ms = now + self.settings.lease.as_millis() as u64;
        p.complete = complete;
        run.version = self.checkpoints.replace(id, p, &run.version).await.map_err(self.checkpoint_err(run.ev))?;
        run.last_checkpoint = StdInstant::now();
        Ok(())
    }
}

/// The summary of an object whose every line is done, logged.
fn processed_summary(
    ev: &ObjectEvent,
    p: &ObjectProgress,
    resumed_after_line: u64,
    found_written: u64,
    started: StdInstant,
) -> ObjectSummary {
    let mut summary = ObjectSummary::from_progress(ev, Outcome::Processed, p);
    summary.resumed_after_line = resumed_after_line;
    summary.found_written = found_written;
    summary.millis = started.elapsed().as_millis() as u64;
    info!(bucket = %ev.bucket, key = %ev.key, lines = summary.lines, records = summary.records, quarantined = summary.quarantined,
          put_calls = summary.put_calls, resent = summary.resent, bytes = summary.bytes, resumed_after_line, found_written,
          millis = summary.millis, "object processed");
    summary
}

/// Aborts a task when dropped (an early return must not leave the reader running).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type BlockResult = Result<LineBlock, std::io::Error>;

/// Reads blocks of lines in a task; a few blocks (of up to the read buffer's size) wait at most,
/// so a slow consumer holds the read back instead of buffering the object. The end of the input
/// closes the channel.
fn spawn_block_reader<R>(
    mut blocks: FramedRead<R, LineBlocks>,
) -> (tokio::sync::mpsc::Receiver<BlockResult>, AbortOnDrop)
where
    R: tokio::io::AsyncRead + Send + Unpin + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<BlockResult>(4);
    let task = tokio::spawn(async move {
        while let Some(block) = blocks.next().await {
            let failed = block.is_err();
            if tx.send(block).await.is_err() || failed {
                return;
            }
        }
    });
    (rx, AbortOnDrop(task))
}

fn is_range_not_satisfiable<R>(e: &SdkError<GetObjectError, R>) -> bool {
    use aws_sdk_s3::error::ProvideErrorMetadata;
    matches!(e, SdkError::ServiceError(se) if se.err().code() == Some("InvalidRange"))
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
/// Copies record data into shared 64 KiB blocks: a record then costs no allocation of its own,
/// and keeps alive at most the block it shares with its neighbours in the batch, never the read
/// buffer it came from (megabytes when long lines surround short ones).
#[derive(Default)]
struct DataBlocks {
    block: bytes::BytesMut,
}

impl DataBlocks {
    const SIZE: usize = 64 * 1024;

    fn copy(&mut self, data: &[u8]) -> Bytes {
        if data.len() > Self::SIZE / 8 {
            return Bytes::copy_from_slice(data);
        }
        if self.block.capacity() - self.block.len() < data.len() {
            self.block = bytes::BytesMut::with_capacity(Self::SIZE);
        }
        self.block.extend_from_slice(data);
        self.block.split().freeze()
    }
}

fn to_record(
    bytes: &[u8],
    number: u64,
    field: Option<&str>,
    record_max_bytes: usize,
    blocks: &mut DataBlocks,
) -> Result<OutRecord, String> {
    let key = match ndjson::inspect(bytes, field) {
        Ok(key) => key,
        Err(e @ LineError::Utf8 { .. }) => return Err(e.to_string()),
        Err(LineError::Json(e)) => return Err(format!("invalid JSON: {e}")),
    };
    let partition_key = match key {
        Some(k) if !k.is_empty() && k.chars().count() <= MAX_PARTITION_KEY_CHARS => {
            compact_str::CompactString::from(&*k)
        }
        // No field, field absent, empty or too long: a stable hash of the line spreads records
        // over shards and is the same on every retry.
        _ => compact_str::format_compact!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes)),
    };
    let record = OutRecord::new(partition_key, blocks.copy(bytes), number);
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
    fn record_data_shares_blocks_but_never_the_read_buffer() {
        let mut blocks = DataBlocks::default();
        let read_buffer = bytes::Bytes::from(vec![b'x'; 1 << 20]);
        let a = blocks.copy(&read_buffer[..100]);
        let b = blocks.copy(&read_buffer[100..300]);
        assert_eq!((&a[..], &b[..]), (&read_buffer[..100], &read_buffer[100..300]));
        assert_eq!(a.as_ptr().wrapping_add(100), b.as_ptr(), "neighbours share a block");
        let big = blocks.copy(&read_buffer[..DataBlocks::SIZE]);
        assert_eq!(big.len(), DataBlocks::SIZE, "long data gets its own allocation");
        for _ in 0..2_000 {
            let r = blocks.copy(&read_buffer[..90]);
            assert_eq!(r.len(), 90);
        }
        drop(read_buffer); // nothing above refers to it
        assert_eq!(&a[..3], b"xxx");
    }

    #[test]
    fn records_take_the_field_or_a_stable_hash() {
        let line = bytes::Bytes::from_static(br#"{"user":"u1","n":1}"#);
        assert_eq!(to_record(&line, 1, Some("user"), 1000, &mut DataBlocks::default()).unwrap().partition_key, "u1");
        let hashed = to_record(&line, 1, None, 1000, &mut DataBlocks::default()).unwrap().partition_key;
        assert_eq!(hashed.len(), 16);
        assert_eq!(
            hashed,
            to_record(&line, 9, Some("missing"), 1000, &mut DataBlocks::default()).unwrap().partition_key
        );
        let long = bytes::Bytes::from(format!(r#"{{"user":"{}"}}"#, "x".repeat(300)));
        assert_eq!(
            to_record(&long, 1, Some("user"), 1000, &mut DataBlocks::default()).unwrap().partition_key.len(),
            16
        );
    }

    #[test]
    fn bad_lines_get_reasons() {
        let err =
            to_record(&bytes::Bytes::from_static(b"{nope"), 3, None, 1000, &mut DataBlocks::default()).unwrap_err();
        assert!(err.starts_with("invalid JSON: key must be a string"), "{err}");
        let err =
            to_record(&bytes::Bytes::from_static(b"\"\xfe\""), 3, None, 1000, &mut DataBlocks::default()).unwrap_err();
        assert_eq!(err, "not UTF-8 (invalid byte at offset 1 of the line)");
        let err =
            to_record(&bytes::Bytes::from_static(br#"{"a":"0123456789"}"#), 3, None, 20, &mut DataBlocks::default())
                .unwrap_err();
        assert!(err.contains("exceeds RECORD_MAX_BYTES (20)"), "{err}");
    }
}
