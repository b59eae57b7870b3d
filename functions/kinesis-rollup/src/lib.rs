//! The sample pull function: roll a stream up into counts and sums per group, written to
//! `OUTPUT_URI` exactly once however often the mapping delivers a batch.
//!
//! Each record is JSON; its group is the value of `GROUP_BY_FIELD` (else the partition key) and
//! `SUM_FIELD`, when set, is summed. A record that is not base64, not a JSON object, or whose sum
//! field is not a number is reported in `batchItemFailures`.
//!
//! **Per batch** (no tumbling window), exactly once across retries, duplicate deliveries and
//! concurrent batches of a shard:
//! 1. `pull/<stream>/<shard>.json` in `CHECKPOINT_URI` holds what is reflected in the output: per
//!    partition key, its last record counted (`ROLLUP_POSITIONS=per-key`, the default), or per
//!    shard, the highest (`per-shard`, exact only at `ParallelizationFactor` 1). A record at or
//!    below its key's position (or the shard's) is skipped. Per key is exact at every factor
//!    (the storm end-to-end test runs at 1 and 10): AWS keeps order per partition key, so a
//!    key's records come in order whichever of the shard's concurrent batches carries them, while a per-shard position moved by a faster batch
//!    would hide a slower batch's lower sequence numbers.
//! 2. The records left are processed up to the first failure (the mapping redelivers everything
//!    from the lowest failure on).
//! 3. Their rollup is written to `<stream>/<shard>/<first sequence>.ndjson` with a conditional
//!    create. Per shard, a retry starts at the same first record, so it aims at the same name: if
//!    the object exists, an earlier attempt wrote it and crashed before step 4; its records are
//!    taken as done (up to its `last_sequence`) and only the rest of this batch is written, under
//!    the name of its own first record. Per key, a retry may carry other records (a bisected
//!    half, a batch regrouped after a failover), so the output's positions are noted in the
//!    checkpoint before it is written (a write-ahead note, `pending`, with an id the output's
//!    rows carry as `writer`): whoever next reads the checkpoint and finds that output written,
//!    by that note, moves its keys' positions.
//! 4. The checkpoint advances (compare-and-swap). Per key, a concurrent batch of other keys may
//!    have moved it meanwhile: it is read again and ours applied over it; the same key moved by
//!    two invocations at once fails the invocation, and its retry skips what the other counted.
//!
//! **Per tumbling window**: the mapping carries the rollup between invocations as window state
//! (capped below 1 MB); the final invocation writes `<stream>/<shard>/window-<start>.ndjson` with
//! a conditional create, so a retried final invocation cannot write it twice.
//!
//! The template sets `ROLLUP_POSITIONS=per-shard` at `ParallelizationFactor` 1 (a few bytes per
//! shard whatever the keys) and `per-key` above it (one entry per partition key of the shard).
//! Tumbling windows need factor 1 (the window's state is per shard).
//!
//! ```
//! use pushpull::config::Env;
//! use kinesis_rollup::{RollupHandler, RollupSettings};
//! use pushpull::store::Store;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let dir = tempfile::tempdir().unwrap();
//! let settings = RollupSettings::from_env(Env::from_pairs([("GROUP_BY_FIELD", "user")]).with_local_locations(dir.path())).unwrap();
//! let handler = RollupHandler::new(settings, Store::file(dir.path().join("out")), Store::file(dir.path().join("cp")));
//! let payload = r#"{"Records":[
//!  {"kinesis":{"partitionKey":"p","sequenceNumber":"1","data":"eyJ1c2VyIjoiYSJ9","approximateArrivalTimestamp":1},"eventID":"shardId-0:1","eventSourceARN":"arn:aws:kinesis:us-east-1:1:stream/s"},
//!  {"kinesis":{"partitionKey":"p","sequenceNumber":"2","data":"bm9wZQ==","approximateArrivalTimestamp":1},"eventID":"shardId-0:2","eventSourceARN":"arn:aws:kinesis:us-east-1:1:stream/s"}]}"#;
//! let response = handler.handle(payload.as_bytes()).await.unwrap();
//! assert_eq!(serde_json::to_string(&response).unwrap(), r#"{"batchItemFailures":[{"itemIdentifier":"2"}]}"#);
//! let out = std::fs::read_to_string(dir.path().join("out/s/shardId-0/1.ndjson")).unwrap();
//! // Per key (the default) each row names the write-ahead note it was written under.
//! assert!(out.starts_with(r#"{"key":"a","count":1,"sum":0,"shard_id":"shardId-0","first_sequence":"1","last_sequence":"1","writer":""#));
//! # });
//! ```
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use tracing::{Instrument, info, warn};

use pushpull::checkpoint::{CheckpointError, Checkpoints};
use pushpull::kinesis_event::{KinesisEvent, KinesisEventRecord, SequenceNumber, Window};
use pushpull::pull::Position;
use pushpull::pull::kinesis::{
    PullError, StateError, WindowResponse, decode_window_state, encode_window_state, process_records,
};
use pushpull::pull::{BatchResponse, BatchResult, Options};
use pushpull::store::{Precondition, Store, StoreError};

pub use settings::Positions;

mod mq;
mod redis;
pub mod settings;
mod sqs;
pub mod sum;

pub use settings::RollupSettings;
pub use sum::{SUM_SCALE, Sum, SumError};

/// Why an invocation failed as a whole (the mapping retries it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RollupError {
    /// A failure injected on purpose (`PUSHPULL_INJECT_FAILURES`, feature `fault-injection`).
    #[cfg(feature = "fault-injection")]
    #[error("injected failure (PUSHPULL_INJECT_FAILURES)")]
    Injected,
    /// The payload is not a Kinesis event.
    #[error(transparent)]
    Event(#[from] pushpull::kinesis_event::EventError),
    /// A Kafka record's key is not base64.
    #[error(transparent)]
    KafkaRecord(#[from] pushpull::pull::DecodeError),
    /// A payload naming `bootstrapServers` (a Kafka event) that does not read as one.
    #[error(transparent)]
    KafkaEvent(#[from] pushpull::pull::kafka::KafkaEventError),
    /// The window state the mapping passed back is not a rollup this function wrote.
    #[error("window state is not a rollup: {0}")]
    WindowState(#[from] serde_json::Error),
    /// A record cannot be reported.
    #[error(transparent)]
    Pull(#[from] PullError),
    /// Writing the rollup failed.
    #[error("writing rollup {uri}: {source}")]
    Output {
        /// Where.
        uri: String,
        /// What went wrong.
        source: StoreError,
    },
    /// An output object exists but is not one this function wrote.
    #[error("output {uri} exists but has no last_sequence: {reason}")]
    ForeignOutput {
        /// Where.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Another invocation is counting a partition key of this batch at this moment (per key): it
    /// claimed the key for an output it is writing. Retried by the mapping, which then finds the
    /// key's new position.
    #[error("shard {shard_id}: key {key:?} is being counted by another invocation (its output {output})")]
    Busy {
        /// The shard.
        shard_id: String,
        /// The partition key.
        key: String,
        /// The other invocation's output.
        output: String,
    },
    /// A payload naming `rmqMessagesByQueue` (an Amazon MQ for RabbitMQ event) that does not
    /// read as one.
    #[error(transparent)]
    RabbitMqEvent(#[from] pushpull::pull::rabbitmq::RabbitMqEventError),
    /// A payload naming `aws:sqs` (an SQS event) that does not read as one.
    #[error(transparent)]
    SqsEvent(#[from] pushpull::pull::sqs::SqsEventError),
    /// A payload naming `pushpull:redis-streams` or `pushpull:redis-pubsub` (a Redis event of
    /// pushpull-local's) that does not read as one.
    #[error(transparent)]
    RedisEvent(#[from] pushpull::pull::redis::RedisEventError),
    /// Reading or advancing the shard checkpoint failed.
    #[error("checkpoint of shard {shard_id}: {source}")]
    Checkpoint {
        /// The shard.
        shard_id: String,
        /// What went wrong.
        source: CheckpointError,
    },
    /// The window's state would pass the cap.
    #[error("window {start} of shard {shard_id}: {source}")]
    State {
        /// The window start.
        start: String,
        /// The shard.
        shard_id: String,
        /// The sizes.
        source: StateError,
    },
}

impl From<RollupError> for lambda_runtime::Diagnostic {
    fn from(e: RollupError) -> Self {
        let error_type = match e {
            #[cfg(feature = "fault-injection")]
            RollupError::Injected => "RollupError.Injected",
            RollupError::Event(_) => "RollupError.Event",
            RollupError::KafkaRecord(_) => "RollupError.KafkaRecord",
            RollupError::KafkaEvent(_) => "RollupError.KafkaEvent",
            RollupError::WindowState(_) => "RollupError.WindowState",
            RollupError::Pull(_) => "RollupError.Pull",
            RollupError::Output { .. } => "RollupError.Output",
            RollupError::Busy { .. } => "RollupError.Busy",
            RollupError::ForeignOutput { .. } => "RollupError.ForeignOutput",
            RollupError::Checkpoint { .. } => "RollupError.Checkpoint",
            RollupError::RabbitMqEvent(_) => "RollupError.RabbitMqEvent",
            RollupError::SqsEvent(_) => "RollupError.SqsEvent",
            RollupError::RedisEvent(_) => "RollupError.RedisEvent",
            RollupError::State { .. } => "RollupError.State",
        };
        tracing::error!(error_type, error = %e, "invocation failed");
        lambda_runtime::Diagnostic { error_type: error_type.to_owned(), error_message: e.to_string() }
    }
}

/// Counts for one group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Records in the group.
    pub count: u64,
    /// Sum of `SUM_FIELD` over them (0 when unset).
    pub sum: Sum,
    /// The group's first record.
    pub first_sequence: SequenceNumber,
    /// The group's last record.
    pub last_sequence: SequenceNumber,
    /// When the first record is a user record of a KPL aggregate: its sub-sequence number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_sub_sequence: Option<u64>,
    /// When the last record is a user record of a KPL aggregate: its sub-sequence number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sub_sequence: Option<u64>,
}

/// Totals by group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollup {
    /// Per group key.
    pub groups: BTreeMap<String, Group>,
    /// Records without the `GROUP_BY_FIELD` (or with `null` there): written with `"key": null`,
    /// so that no string value can be mistaken for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<Group>,
}

impl Rollup {
    /// The rollup as NDJSON lines, one per group.
    pub fn to_ndjson(&self, shard_id: &str, window: Option<&Window>) -> String {
        self.ndjson(shard_id, window, None)
    }

    /// [`Rollup::to_ndjson`], each row also naming the intent that wrote it (per key).
    fn ndjson(&self, shard_id: &str, window: Option<&Window>, writer: Option<&str>) -> String {
        let mut out = String::new();
        let shard = serde_json::to_string(shard_id).unwrap_or_default();
        let named = self.groups.iter().map(|(k, g)| (serde_json::to_string(k).unwrap_or_default(), g));
        for (key, g) in self.missing.iter().map(|g| ("null".to_owned(), g)).chain(named) {
            let _ = write!(
                out,
                r#"{{"key":{key},"count":{},"sum":{},"shard_id":{shard},"first_sequence":"{}","last_sequence":"{}""#,
                g.count, g.sum, g.first_sequence, g.last_sequence
            );
            if let Some(sub) = g.first_sub_sequence {
                let _ = write!(out, r#","first_sub_sequence":{sub}"#);
            }
            if let Some(sub) = g.last_sub_sequence {
                let _ = write!(out, r#","last_sub_sequence":{sub}"#);
            }
            if let Some(w) = window {
                let _ = write!(
                    out,
                    r#","window_start":{},"window_end":{}"#,
                    serde_json::to_string(&w.start).unwrap_or_default(),
                    serde_json::to_string(&w.end).unwrap_or_default()
                );
            }
            if let Some(writer) = writer {
                let _ = write!(out, r#","writer":{}"#, serde_json::to_string(writer).unwrap_or_default());
            }
            out.push_str("}\n");
        }
        out
    }
}

impl Group {
    /// Where the group's first record is.
    pub fn first(&self) -> Position {
        Position { sequence: self.first_sequence.clone(), sub: self.first_sub_sequence }
    }

    /// Where the group's last record is.
    pub fn last(&self) -> Position {
        Position { sequence: self.last_sequence.clone(), sub: self.last_sub_sequence }
    }

    fn merge(&mut self, g: Group) {
        self.count += g.count;
        self.sum += &g.sum;
        let (first, last) = (self.first().min(g.first()), self.last().max(g.last()));
        (self.first_sequence, self.first_sub_sequence) = (first.sequence, first.sub);
        (self.last_sequence, self.last_sub_sequence) = (last.sequence, last.sub);
    }
}

impl Rollup {
    /// Adds `other`'s counts and sums to these.
    pub fn merge(&mut self, other: Rollup) {
        for (key, g) in other.groups {
            match self.groups.get_mut(&key) {
                Some(s) => s.merge(g),
                None => {
                    self.groups.insert(key, g);
                }
            }
        }
        match (&mut self.missing, other.missing) {
            (Some(s), Some(g)) => s.merge(g),
            (s @ None, g) => *s = g,
            (Some(_), None) => {}
        }
    }
}

/// What the function answers: the partial batch response, or with windows the state as well.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum Response {
    /// Without tumbling windows.
    Batch(BatchResponse),
    /// With tumbling windows.
    Window(WindowResponse),
    /// For a Kafka event: failures named by partition and offset.
    Kafka(pushpull::pull::kafka::KafkaBatchResponse),
}

/// The shard's checkpoint: what is in the output. Per shard (`ROLLUP_POSITIONS=per-shard`), the
/// last record (or user record of an aggregate) counted; per key (the default), the last one of
/// each partition key. A record at or below either is counted already.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct ShardCheckpoint {
    last_sequence: Option<SequenceNumber>,
    /// Set when the last record counted is a user record of a KPL aggregate: a retried
    /// aggregate counts only the user records after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_sub_sequence: Option<u64>,
    /// Per partition key: its last record (or user record) counted.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    keys: BTreeMap<String, KeyPosition>,
    /// Per key, outputs about to be written, by output name: the key positions each will have
    /// counted once it exists (a write-ahead note, so that whoever finds the output written and
    /// the positions not yet moved moves them; [`RollupHandler::settle`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pending: BTreeMap<String, Intent>,
}

/// An output about to be written, per key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Intent {
    /// The key positions the output counts up to.
    positions: BTreeMap<String, KeyPosition>,
    /// Names this intent; every row of its output carries it as `writer`, so that an output
    /// under the same name written by another invocation never moves this intent's positions.
    /// (A note of the older format has none and is trusted.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    /// Its invocation's deadline plus [`NOTE_MARGIN_S`] (unix seconds), when the invocation
    /// knew it: Lambda stops an invocation at its deadline, so a note whose output is missing
    /// after this never gets one, and is dropped then rather than after [`INTENT_TTL_S`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    until: Option<f64>,
    /// When it was noted (unix seconds): one whose output never appeared is dropped after
    /// [`INTENT_TTL_S`], longer than any invocation can live.
    at: f64,
}

/// A Lambda invocation lives at most 15 minutes; an intent whose output is not written after
/// this long never will be.
const INTENT_TTL_S: f64 = 960.0;

/// How long after its invocation's deadline a note may still see its output land: a PUT sent
/// just before the deadline, answered by S3 after it.
const NOTE_MARGIN_S: f64 = 30.0;

/// A partition key's last record counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct KeyPosition {
    sequence: SequenceNumber,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<u64>,
}

impl ShardCheckpoint {
    fn position(&self) -> Option<Position> {
        self.last_sequence.clone().map(|sequence| Position { sequence, sub: self.last_sub_sequence })
    }

    /// What is counted of `key`: the higher of the shard's position and the key's.
    fn done_for(&self, key: &str) -> Option<Position> {
        let of_key = self.keys.get(key).map(|k| Position { sequence: k.sequence.clone(), sub: k.sub });
        self.position().max(of_key)
    }

    /// Notes that everything up to `last` of `covered` (in sequence order) is counted: the
    /// shard's position, or each record's key's.
    fn advance(&mut self, positions: Positions, covered: &[KinesisEventRecord<'_>], last: &Position) {
        match positions {
            Positions::PerShard => {
                self.last_sequence = Some(last.sequence.clone());
                self.last_sub_sequence = last.sub;
            }
            Positions::PerKey => {
                for r in covered {
                    let Ok(seq) = r.sequence_number() else { continue };
                    let at = match seq.cmp(&last.sequence) {
                        std::cmp::Ordering::Less => Position::whole(seq),
                        std::cmp::Ordering::Equal => last.clone(),
                        std::cmp::Ordering::Greater => break,
                    };
                    let key = r.kinesis.partition_key.as_ref();
                    if self.keys.get(key).is_none_or(|k| Position { sequence: k.sequence.clone(), sub: k.sub } < at) {
                        self.keys.insert(key.to_owned(), KeyPosition { sequence: at.sequence, sub: at.sub });
                    }
                }
            }
        }
        // A key at or below the shard's position says nothing more.
        if let Some(shard) = self.position() {
            self.keys.retain(|_, k| Position { sequence: k.sequence.clone(), sub: k.sub } > shard);
        }
    }

    /// `ours` (changed from `base`) applied to `now`, another invocation's newer checkpoint of the
    /// same shard: the keys and intents `ours` changed, if `now` holds those keys where `base`
    /// did or where `ours` does (a batch of other keys ran at once, as concurrent batches of a
    /// shard do, or settled our intent); `None` if `now` moved one of them elsewhere (the same
    /// records counted twice at once: the caller fails, and the retry skips them).
    fn merge(base: &ShardCheckpoint, ours: &ShardCheckpoint, now: &ShardCheckpoint) -> Option<ShardCheckpoint> {
        if now.position() != base.position() && ours.position() != base.position() {
            return None;
        }
        let mut merged = now.clone();
        // A new intent of ours claims its keys: none may have moved since we read them, and no
        // other invocation may be about to write an output for them.
        for (name, intent) in ours.pending.iter().filter(|(n, _)| !base.pending.contains_key(*n)) {
            if now.pending.get(name) == Some(intent) {
                continue; // our own write of it landed (its answer was lost, and the retry conflicted)
            }
            for key in intent.positions.keys() {
                // `base` had no note on our keys (checked before ours was noted): any in `now`
                // is another invocation's, whatever its name.
                if now.keys.get(key) != base.keys.get(key) || now.claimant(key).is_some() {
                    return None;
                }
            }
        }
        for (key, pos) in &ours.keys {
            if base.keys.get(key) == Some(pos) {
                continue; // not ours to move
            }
            let theirs = now.keys.get(key);
            if theirs != base.keys.get(key) && theirs != Some(pos) {
                return None;
            }
            merged.keys.insert(key.clone(), pos.clone());
        }
        for (name, intent) in &ours.pending {
            if base.pending.get(name) != Some(intent) {
                merged.pending.insert(name.clone(), intent.clone());
            }
        }
        for name in base.pending.keys().filter(|n| !ours.pending.contains_key(*n)) {
            merged.pending.remove(name);
        }
        if ours.position() != base.position() {
            merged.last_sequence = ours.last_sequence.clone();
            merged.last_sub_sequence = ours.last_sub_sequence;
        }
        Some(merged)
    }

    /// The output about to be written for `key`, if an intent names it.
    fn claimant(&self, key: &str) -> Option<&String> {
        self.pending.iter().find(|(_, i)| i.positions.contains_key(key)).map(|(name, _)| name)
    }

    /// Moves the keys to `positions` where they are below.
    fn apply(&mut self, positions: &BTreeMap<String, KeyPosition>) {
        for (key, pos) in positions {
            let at = Position { sequence: pos.sequence.clone(), sub: pos.sub };
            if self.keys.get(key).is_none_or(|k| Position { sequence: k.sequence.clone(), sub: k.sub } < at) {
                self.keys.insert(key.clone(), pos.clone());
            }
        }
    }
}

/// Handles Kinesis batches for the sample pipeline.
#[derive(Debug, Clone)]
pub struct RollupHandler {
    settings: RollupSettings,
    output: Store,
    checkpoints: Checkpoints<Store>,
    /// [`NOTE_MARGIN_S`] unless set.
    note_margin_s: f64,
}

impl RollupHandler {
    /// A handler writing rollups to `output` and checkpoints to `checkpoints`.
    pub fn new(settings: RollupSettings, output: Store, checkpoints: Store) -> Self {
        RollupHandler { settings, output, checkpoints: Checkpoints::new(checkpoints), note_margin_s: NOTE_MARGIN_S }
    }

    /// How long after its invocation's deadline a write-ahead note still waits for its output
    /// ([`NOTE_MARGIN_S`] by default): longer than any S3 write sent before the deadline takes to
    /// land. Tests that kill invocations at short deadlines set it short.
    pub fn with_note_margin(mut self, margin: std::time::Duration) -> Self {
        self.note_margin_s = margin.as_secs_f64();
        self
    }

    /// The handler a deployed function runs, its stores at the settings' locations. The AWS
    /// configuration is loaded only if a location is on S3.
    pub async fn connect(settings: RollupSettings, aws: &pushpull::aws::Aws) -> Self {
        let output = Store::connect(&settings.output, aws).await;
        let checkpoints = Store::connect(&settings.checkpoint, aws).await;
        Self::new(settings, output, checkpoints)
    }

    /// Processes one invocation payload, without knowing its deadline (a write-ahead note it
    /// leaves behind if it dies lives [`INTENT_TTL_S`]); see [`RollupHandler::handle_until`].
    pub async fn handle(&self, payload: &[u8]) -> Result<Response, RollupError> {
        self.handle_until(payload, None).await
    }

    /// Processes one invocation payload whose deadline is `deadline` (unix seconds, the
    /// Runtime API's `Lambda-Runtime-Deadline-Ms` / 1000): a note this invocation leaves behind
    /// if it dies stops claiming its keys [`NOTE_MARGIN_S`] after it.
    pub async fn handle_until(&self, payload: &[u8], deadline: Option<f64>) -> Result<Response, RollupError> {
        #[cfg(feature = "fault-injection")]
        if self.settings.faults.delay_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(self.settings.faults.delay_ms)).await;
        }
        #[cfg(feature = "fault-injection")]
        if self.settings.faults.failures > 0.0 && fastrand::f64() < self.settings.faults.failures {
            warn!("injected failure (PUSHPULL_INJECT_FAILURES)");
            return Err(RollupError::Injected);
        }
        // A Kafka event (MSK or self-managed) names its cluster's servers; a Kinesis event never
        // holds that key outside a string (where its quotes would be escaped), so the payload is
        // read once, as what it is. One that names them and does not read as Kafka is an error,
        // never an empty batch (its offsets would be committed unprocessed).
        // An Amazon MQ for RabbitMQ event keys its messages by queue under `rmqMessagesByQueue`.
        if memchr::memmem::find(payload, b"\"rmqMessagesByQueue\"").is_some() {
            let mq = pushpull::pull::rabbitmq::RabbitMqEvent::from_slice(payload)?;
            return self.handle_mq(&mq).await;
        }
        // An SQS event's records say `"eventSource": "aws:sqs"` (a Kinesis record's data is base64,
        // a Kafka record's too: the text cannot occur in them).
        if memchr::memmem::find(payload, b"\"aws:sqs\"").is_some() {
            let sqs = pushpull::pull::sqs::SqsEvent::from_slice(payload)?;
            return self.handle_sqs(&sqs).await;
        }
        // A Redis event of pushpull-local's says `"eventSource": "pushpull:redis-..."` (as `aws:sqs`,
        // the text cannot occur in a base64 record).
        if memchr::memmem::find(payload, b"\"pushpull:redis-").is_some() {
            let redis = pushpull::pull::redis::RedisEvent::from_slice(payload)?;
            return self.handle_redis(&redis).await;
        }
        if memchr::memmem::find(payload, b"\"bootstrapServers\"").is_some() {
            let kafka = pushpull::pull::kafka::KafkaEvent::from_slice(payload)?;
            return self.handle_kafka(&kafka, deadline).await;
        }
        let event = KinesisEvent::from_slice_parallel(payload)?;
        if event.records.is_empty() && event.window.is_none() {
            // A Kafka event without `bootstrapServers` (AWS's always has it) keys its records by
            // partition under `records`.
            if let Ok(kafka) = pushpull::pull::kafka::KafkaEvent::from_slice(payload)
                && !kafka.is_empty()
            {
                return self.handle_kafka(&kafka, deadline).await;
            }
        }
        // The stream's ARN is on each record, and on the event itself with tumbling windows (a
        // window's final invocation has no records).
        let stream = event
            .records
            .first()
            .map(|r| &*r.event_source_arn)
            .or(event.event_source_arn.as_deref())
            .and_then(|arn| arn.split_once(":stream/").map(|(_, s)| s.to_owned()))
            .unwrap_or_else(|| "stream".to_owned());
        let shard_id = event.shard().unwrap_or("shard").to_owned();
        // Every log line of the batch carries where it is (pushpull::telemetry merges span fields).
        let span = tracing::info_span!(
            "batch",
            stream = %stream,
            shard_id = %shard_id,
            first_sequence = event.records.first().map_or("", |r| &*r.kinesis.sequence_number),
            last_sequence = event.records.last().map_or("", |r| &*r.kinesis.sequence_number),
        );
        self.handle_batch(&event, stream, shard_id, deadline).instrument(span).await
    }

    /// A Kafka event (`SelfManagedKafka` or `aws:kafka`): each partition's records are rolled up
    /// as a shard's are, the topic in place of the stream, the `topic-N` partition in place of the
    /// shard, offsets in place of sequence numbers, the record's key in place of the partition key
    /// (per-shard positions are exact: one consumer reads a partition at a time, in offset order).
    /// Exactly once per partition offset, as per sequence number on Kinesis. A record without a
    /// value (a tombstone) is not a JSON object: it is reported as failed, as a bad line is.
    async fn handle_kafka(
        &self,
        event: &pushpull::pull::kafka::KafkaEvent<'_>,
        deadline: Option<f64>,
    ) -> Result<Response, RollupError> {
        use std::borrow::Cow;
        let mut failures = Vec::new();
        for (name, records) in &event.records {
            let topic = records.first().map_or_else(
                || name.rsplit_once('-').map_or(name.as_ref(), |(t, _)| t).to_owned(),
                |r| r.topic.to_string(),
            );
            let mut converted = Vec::with_capacity(records.len());
            for r in records {
                let key = r.key_bytes()?;
                converted.push(KinesisEventRecord {
                    kinesis: pushpull::kinesis_event::KinesisData {
                        partition_key: Cow::Owned(
                            key.map(|k| String::from_utf8_lossy(&k).into_owned()).unwrap_or_default(),
                        ),
                        sequence_number: Cow::Owned(r.offset.to_string()),
                        data: Cow::Borrowed(r.value.as_deref().unwrap_or_default()),
                        approximate_arrival_timestamp: r.timestamp.map_or(0.0, |t| t as f64 / 1000.0),
                    },
                    event_id: Cow::Borrowed(name.as_ref()),
                    event_source_arn: Cow::Borrowed(""),
                });
            }
            let batch = KinesisEvent { records: converted, ..KinesisEvent::default() };
            let span = tracing::info_span!(
                "batch",
                topic = %topic,
                partition = %name,
                first_offset = records.first().map_or(-1, |r| r.offset),
                last_offset = records.last().map_or(-1, |r| r.offset),
            );
            let response = self.handle_batch(&batch, topic, name.to_string(), deadline).instrument(span).await?;
            if let Response::Batch(b) = response {
                // Named by the offset text we gave as its sequence number.
                for f in b.batch_item_failures {
                    if let Some(r) = records.iter().find(|r| r.offset.to_string() == f.item_identifier) {
                        failures.push(pushpull::pull::kafka::KafkaItemFailure { item_identifier: r.item_identifier() });
                    }
                }
            }
        }
        Ok(Response::Kafka(pushpull::pull::kafka::KafkaBatchResponse { batch_item_failures: failures }))
    }

    async fn handle_batch(
        &self,
        event: &KinesisEvent<'_>,
        stream: String,
        shard_id: String,
        deadline: Option<f64>,
    ) -> Result<Response, RollupError> {
        let mut metrics = pushpull::pull::kinesis::batch_metrics(event);
        if let Some(window) = &event.window {
            let (response, processed, failed) = self.handle_window(event, window, &stream, &shard_id).await?;
            metrics.processed = processed;
            metrics.failed = failed;
            metrics.record();
            return Ok(response);
        }
        let cp_id = format!("pull/{stream}/{shard_id}.json");
        let cp_err = |source| RollupError::Checkpoint { shard_id: shard_id.clone(), source };
        let (loaded, cp_version) = match self.checkpoints.load::<ShardCheckpoint>(&cp_id).await.map_err(cp_err)? {
            Some((c, v)) => (c, Some(v)),
            None => (ShardCheckpoint::default(), None),
        };
        // Per key: outputs found written whose positions were not yet moved (their writer died
        // in between) count now.
        let checkpoint = self.settle(&loaded).await?;
        // Records already reflected in the output (a retry, a duplicate delivery, a redelivery
        // after the mapping's runner failed over) are skipped, by their key's position or the
        // shard's; an aggregate counted in part is fresh, and its counted user records are
        // skipped in it (`resume`: (index among the fresh records, sub-sequence number counted)).
        // Fresh: from `tail` on (one position: a prefix is counted), else the records at `fresh_at`.
        let mut tail: Option<usize> = None;
        let mut fresh_at: Vec<usize> = Vec::new();
        let mut resume: Vec<(usize, u64)> = Vec::new();
        let seq_of = |r: &KinesisEventRecord<'_>| {
            r.sequence_number().map_err(|source| PullError::SequenceNumber { event_id: r.event_id.to_string(), source })
        };
        if checkpoint.keys.is_empty() {
            // One position for every record (per shard, or nothing counted yet per key): the
            // counted records are a prefix of the batch, and only the first fresh one can be an
            // aggregate counted in part.
            let done = checkpoint.position();
            let mut first = event.records.len();
            for (i, r) in event.records.iter().enumerate() {
                let seq = seq_of(r)?;
                if done.as_ref().is_none_or(|d| Position::whole(seq.clone()) > *d) {
                    if let Some(sub) = done.as_ref().filter(|d| d.sequence == seq).and_then(|d| d.sub) {
                        resume.push((0, sub));
                    }
                    first = i;
                    break;
                }
            }
            tail = Some(first);
        } else {
            for (i, r) in event.records.iter().enumerate() {
                let seq = seq_of(r)?;
                let done = checkpoint.done_for(&r.kinesis.partition_key);
                if done.as_ref().is_some_and(|d| Position::whole(seq.clone()) <= *d) {
                    continue;
                }
                if let Some(sub) = done.filter(|d| d.sequence == seq).and_then(|d| d.sub) {
                    resume.push((fresh_at.len(), sub));
                }
                fresh_at.push(i);
            }
        }
        let fresh_count = tail.map_or(fresh_at.len(), |t| event.records.len() - t);
        let skipped = event.records.len() - fresh_count;
        let first_fresh = tail.filter(|t| *t < event.records.len()).or_else(|| fresh_at.first().copied());
        let Some(first_fresh) = first_fresh else {
            self.persist_settled(&cp_id, &loaded, cp_version.as_ref(), &checkpoint).await.map_err(cp_err)?;
            info!(shard_id, skipped, "every record of the batch is counted already (or was given up by the mapping)");
            metrics.record();
            return Ok(Response::Batch(BatchResponse::default()));
        };
        // The fresh records: the batch's tail (always so per shard), else those picked out.
        let picked: Vec<KinesisEventRecord<'_>>;
        let fresh: &[KinesisEventRecord<'_>] = if fresh_count == event.records.len() - first_fresh {
            &event.records[first_fresh..]
        } else {
            picked = fresh_at.iter().map(|&i| event.records[i].clone()).collect();
            &picked
        };
        let (rollup, covered, result) = self.roll_up(fresh, &resume)?;
        let groups = rollup.groups.len();
        let mut new_last = None;
        if let Some(covered) = covered {
            let last = match self.settings.positions {
                Positions::PerShard => {
                    let last = self.write_batch_output(&stream, &shard_id, fresh, &resume, rollup, covered).await?;
                    let mut value = checkpoint.clone();
                    value.advance(Positions::PerShard, fresh, &last);
                    self.save_checkpoint(&cp_id, &checkpoint, cp_version, value).await.map_err(cp_err)?;
                    last
                }
                Positions::PerKey => {
                    let last = position_at(fresh, covered.last);
                    let name = output_name(&stream, &shard_id, &position_at(fresh, covered.first));
                    // 1. The intent, with the positions the output will count up to. It claims
                    // its keys: another invocation counting one of them at this moment (a
                    // duplicate delivery, a batch of a runner that was killed while its function
                    // still ran) has claimed it first, and this one fails before writing
                    // anything; its retry finds that one's positions.
                    let mut moved = ShardCheckpoint::default();
                    moved.advance(Positions::PerKey, fresh, &last);
                    // Any note on one of our keys, our output's name included: another invocation
                    // with the same first record (a redelivery grouped otherwise) may count other
                    // records under that name.
                    if let Some((key, other)) = moved.keys.keys().find_map(|k| checkpoint.claimant(k).map(|o| (k, o))) {
                        return Err(RollupError::Busy { shard_id, key: key.clone(), output: other.clone() });
                    }
                    let mut noted = checkpoint.clone();
                    let id = intent_id();
                    let intent = Intent {
                        positions: moved.keys.clone(),
                        id: Some(id.clone()),
                        until: deadline.map(|d| d + self.note_margin_s),
                        at: now_unix(),
                    };
                    noted.pending.insert(name.clone(), intent);
                    // Written over the checkpoint as loaded (so the settled intents are written
                    // too), merged, on a conflict, as a change from the settled one.
                    // What was written is the base of step 3, not `noted`: on a conflict it is
                    // `noted` merged into another invocation's newer checkpoint, whose keys and
                    // intents step 3 must keep.
                    let (version, noted) =
                        self.save_checkpoint(&cp_id, &checkpoint, cp_version, noted).await.map_err(cp_err)?;
                    // 2. The output, naming its intent. If the name is taken, whose output is it?
                    let body = rollup.ndjson(&shard_id, None, Some(&id));
                    match self.output.put(&name, body.into(), Precondition::IfAbsent).await {
                        Ok(_) => {}
                        Err(StoreError::PreconditionFailed { uri }) => {
                            let taken = || RollupError::Output {
                                uri: uri.clone(),
                                source: StoreError::PreconditionFailed { uri: uri.clone() },
                            };
                            match self.output_at(&name).await? {
                                // Ours: an earlier try of this write, its answer lost.
                                Some(existing) if writer_of(&existing).as_deref() == Some(id.as_str()) => {
                                    info!(output = %name, "our output was written by an earlier try of this write");
                                }
                                // Another invocation's, counting from the same record: our note is
                                // withdrawn (its positions must never count for that output) and we
                                // fail; the retry finds the positions. An output without a writer is
                                // one written with per-shard positions (before a switch to per-key):
                                // it counts every record of the shard from its first to its last,
                                // and those of ours move their keys.
                                Some(existing) => {
                                    let mut withdrawn = noted.clone();
                                    withdrawn.pending.remove(&name);
                                    if writer_of(&existing).is_none()
                                        && let Some(existing_last) = max_last_position(&existing)
                                    {
                                        let mut counted = ShardCheckpoint::default();
                                        counted.advance(
                                            Positions::PerKey,
                                            fresh,
                                            &existing_last.clone().min(last.clone()),
                                        );
                                        withdrawn.apply(&counted.keys);
                                        info!(output = %name, existing_last = %existing_last, "an output written per shard holds these records: their keys move");
                                    }
                                    self.save_checkpoint(&cp_id, &noted, Some(version), withdrawn)
                                        .await
                                        .map_err(cp_err)?;
                                    return Err(taken());
                                }
                                // Not there: a conflicting write of ours still in flight (S3's 409).
                                // The note stays: whoever settles it applies it if the write lands.
                                None => return Err(taken()),
                            }
                        }
                        Err(source) => return Err(RollupError::Output { uri: self.output.uri(&name), source }),
                    }
                    #[cfg(feature = "fault-injection")]
                    if self.settings.faults.crash_after_output {
                        warn!(key = name, "injected crash after writing the output");
                        std::process::abort();
                    }
                    // 3. The positions moved, the intent done.
                    let mut done = noted.clone();
                    done.pending.remove(&name);
                    done.apply(&moved.keys);
                    self.save_checkpoint(&cp_id, &noted, Some(version), done).await.map_err(cp_err)?;
                    last
                }
            };
            new_last = Some(last);
        } else {
            self.persist_settled(&cp_id, &loaded, cp_version.as_ref(), &checkpoint).await.map_err(cp_err)?;
        }
        for f in &result.failures {
            warn!(shard_id, sequence_number = %f.item_identifier, reason = %f.reason, "record failed");
        }
        info!(shard_id, records = event.records.len(), skipped, rolled_up = covered.map_or(0, |c| c.count), failed = result.failures.len(), groups,
              last = ?new_last.as_ref().map(|s| s.to_string()), "batch rolled up");
        metrics.processed = covered.map_or(0, |c| c.count);
        metrics.failed = result.failures.len() + result.unprocessed.len();
        metrics.record();
        Ok(Response::Batch(result.response()))
    }

    /// `loaded` with the intents settled: an intent whose output exists has its positions moved
    /// (its writer died between the output and the checkpoint, or is about to move them itself:
    /// the same positions either way) and is dropped, unless another invocation wrote that output
    /// (its `writer` is not the note's id: dropped, nothing moved); one whose output is missing
    /// stays while its writer may still be at work (until its deadline and [`NOTE_MARGIN_S`], or
    /// [`INTENT_TTL_S`] when the deadline is unknown). Written with this invocation's own
    /// checkpoint.
    async fn settle(&self, loaded: &ShardCheckpoint) -> Result<ShardCheckpoint, RollupError> {
        let mut out = loaded.clone();
        for (name, intent) in &loaded.pending {
            let Some(existing) = self.output_at(name).await? else {
                // Not written (yet): the note claims its keys until its writer must be dead.
                let expires = intent.until.unwrap_or(intent.at + INTENT_TTL_S);
                if now_unix() > expires {
                    info!(output = %name, "a note whose output never appeared: dropped");
                    out.pending.remove(name);
                }
                continue;
            };
            match (writer_of(&existing), &intent.id) {
                (writer, Some(id)) if writer.as_deref() != Some(id.as_str()) => {
                    warn!(output = %name, writer = writer.as_deref().unwrap_or(""), intent = id, "an output under this name was written by another invocation: the note is dropped, its positions not moved");
                    out.pending.remove(name);
                }
                _ => {
                    info!(output = %name, "an output written without its checkpoint: its positions count now");
                    out.apply(&intent.positions);
                    out.pending.remove(name);
                }
            }
        }
        Ok(out)
    }

    /// Output `name`'s body, if it exists.
    async fn output_at(&self, name: &str) -> Result<Option<Vec<u8>>, RollupError> {
        let output =
            self.output.get(name).await.map_err(|source| RollupError::Output { uri: self.output.uri(name), source })?;
        Ok(output.map(|o| o.body.to_vec()))
    }

    /// Writes `settled` if settling changed `loaded` (loaded at `version`) and nothing else will
    /// write it this invocation; another invocation that wrote first has settled it too, or the
    /// next one will.
    async fn persist_settled(
        &self,
        id: &str,
        loaded: &ShardCheckpoint,
        version: Option<&pushpull::store::Etag>,
        settled: &ShardCheckpoint,
    ) -> Result<(), CheckpointError> {
        if settled == loaded {
            return Ok(());
        }
        let write = match version {
            Some(v) => self.checkpoints.replace(id, settled, v).await,
            None => self.checkpoints.create(id, settled).await,
        };
        match write {
            Ok(_) | Err(CheckpointError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Writes the shard's checkpoint, advanced from `base` (loaded at `version`) to `value`: a
    /// compare-and-swap. Per key, batches of other keys of the shard run at once (a
    /// ParallelizationFactor above 1) and move the checkpoint in between: their keys are kept and
    /// ours applied again ([`ShardCheckpoint::merge`]); the same keys moved at once is a conflict.
    async fn save_checkpoint(
        &self,
        id: &str,
        base: &ShardCheckpoint,
        version: Option<pushpull::store::Etag>,
        value: ShardCheckpoint,
    ) -> Result<(pushpull::store::Etag, ShardCheckpoint), CheckpointError> {
        let ours = value.clone();
        let (mut version, mut value) = (version, value);
        let mut attempts = 0;
        loop {
            let written = match &version {
                Some(v) => self.checkpoints.replace(id, &value, v).await,
                None => self.checkpoints.create(id, &value).await,
            };
            attempts += 1;
            match written {
                Ok(etag) => return Ok((etag, value)),
                Err(conflict @ CheckpointError::Conflict { .. })
                    if self.settings.positions == Positions::PerKey && attempts < 32 =>
                {
                    let Some((now, v)) = self.checkpoints.load::<ShardCheckpoint>(id).await? else {
                        return Err(conflict);
                    };
                    let Some(merged) = ShardCheckpoint::merge(base, &ours, &now) else {
                        return Err(conflict);
                    };
                    (version, value) = (Some(v), merged);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Checks every record (so that every bad one is reported) and rolls up those before the
    /// first failure: the mapping redelivers everything from the lowest failure on, so counting a
    /// record after it now would count it twice. A user record of a KPL aggregate that fails
    /// stops the rollup there, after the user records before it in the same aggregate (the
    /// checkpoint records their sub-sequence number, so the redelivered aggregate counts only the
    /// rest). User records at or before `after` (an aggregate counted in part) are skipped.
    /// Returns the rollup, what it covers, and the batch result.
    ///
    /// Large batches are checked in contiguous parts on as many threads as the function has
    /// vCPUs (Lambda gives 2 from 1,769 MB of memory); the parts are merged in record order, so
    /// the result is the same as one pass.
    fn roll_up(
        &self,
        records: &[KinesisEventRecord<'_>],
        resume: &[(usize, u64)],
    ) -> Result<(Rollup, Option<Covered>, BatchResult), RollupError> {
        let parts: Vec<Result<Part, PullError>> =
            pushpull::pull::kinesis::in_parts(records, |base, part| self.scan(part, base, resume));
        // Merge: one result, groups re-interned in order of first sight across the parts.
        let mut result = BatchResult::default();
        let mut index_of: HashMap<&str, usize> = HashMap::new();
        let mut names: Vec<&str> = Vec::new();
        let mut parts_ok = Vec::with_capacity(parts.len());
        for part in parts {
            let mut part = part?;
            result.processed += part.result.processed;
            result.unprocessed.append(&mut part.result.unprocessed);
            result.failures.append(&mut part.result.failures);
            parts_ok.push(part);
        }
        // Where the rollup stops: at the first failed record, or inside it at its first failed
        // user record when it is an aggregate.
        let stop: (usize, u32) = match result.failures.iter().map(|f| f.index).min() {
            None => (records.len(), 0),
            Some(i) => (i, parts_ok.iter().find_map(|p| p.failed_user.filter(|f| f.0 == i)).map_or(0, |f| f.1)),
        };
        type Slot = (u64, Sum, At, At);
        let mut acc: Vec<Option<Slot>> = Vec::new();
        let mut missing: Option<Slot> = None;
        let mut covered: Option<Covered> = None;
        for part in &parts_ok {
            let global: Vec<usize> = part
                .names
                .iter()
                .map(|name| {
                    *index_of.entry(name.as_str()).or_insert_with(|| {
                        names.push(name.as_str());
                        names.len() - 1
                    })
                })
                .collect();
            acc.resize(names.len(), None);
            for item in &part.items {
                // A plain record, and an aggregate's first user record, stand at sub 0.
                if (item.index as usize, if item.sub == NO_SUB { 0 } else { item.sub }) >= stop {
                    break;
                }
                let at = At { index: item.index as usize, sub: (item.sub != NO_SUB).then_some(u64::from(item.sub)) };
                let slot = match item.id {
                    MISSING => &mut missing,
                    id => &mut acc[global[id as usize]],
                };
                let slot = slot.get_or_insert((0, Sum::ZERO, at, at));
                slot.0 += 1;
                slot.1 += &item.amount;
                slot.3 = at;
                let c = covered.get_or_insert(Covered { first: at, last: at, count: 0 });
                c.last = at;
                c.count += 1;
            }
        }
        let group = |(count, sum, first, last): Slot| Group {
            count,
            sum,
            first_sequence: seq_at(records, first.index),
            last_sequence: seq_at(records, last.index),
            first_sub_sequence: first.sub,
            last_sub_sequence: last.sub,
        };
        let mut rollup = Rollup { missing: missing.map(group), ..Rollup::default() };
        for (name, slot) in names.into_iter().zip(acc) {
            if let Some(slot) = slot {
                rollup.groups.insert(name.to_owned(), group(slot));
            }
        }
        Ok((rollup, covered, result))
    }

    /// Checks `records` (which start at index `base` of the batch) and notes the group and
    /// amount of each record (each user record of an aggregate) that passes. Groups are
    /// interned: a record costs no allocation unless it starts a new group.
    fn scan(
        &self,
        records: &[KinesisEventRecord<'_>],
        base: usize,
        resume: &[(usize, u64)],
    ) -> Result<Part, PullError> {
        let mut index_of: HashMap<String, u32> = HashMap::new();
        let mut names: Vec<String> = Vec::new();
        let mut items: Vec<Item> = Vec::with_capacity(records.len());
        let mut failed_user: Option<(usize, u32)> = None;
        // An aggregate counted in part by an earlier invocation: its user records up to the one
        // counted last are skipped.
        let mut result = process_records(records, Options::default(), |record| -> Result<(), String> {
            let at = base + record.index;
            let resume_after = if resume.is_empty() {
                None
            } else {
                resume.binary_search_by_key(&at, |r| r.0).ok().map(|i| resume[i].1)
            };
            if record.sub_sequence_number.zip(resume_after).is_some_and(|(s, done)| s <= done) {
                return Ok(()); // counted already
            }
            let sub = record.sub_sequence_number.map_or(NO_SUB, |s| u32::try_from(s).unwrap_or(NO_SUB - 1));
            match self.check(&record, &mut index_of, &mut names) {
                Ok((id, amount)) => {
                    items.push(Item { amount, id, index: (base + record.index) as u32, sub });
                    Ok(())
                }
                Err(e) => {
                    if sub != NO_SUB {
                        failed_user.get_or_insert((base + record.index, sub));
                    }
                    Err(e)
                }
            }
        })?;
        for f in &mut result.failures {
            f.index += base;
        }
        Ok(Part { names, items, failed_user, result })
    }

    /// One record's (or user record's) group id and amount, or why it fails.
    fn check(
        &self,
        record: &pushpull::pull::kinesis::Record<'_>,
        index_of: &mut HashMap<String, u32>,
        names: &mut Vec<String>,
    ) -> Result<(u32, Sum), String> {
        let (group_field, sum_field) = (self.settings.group_by_field.as_deref(), self.settings.sum_field.as_deref());
        let [group, amount] =
            pushpull::pull::fields(record.data, [group_field, sum_field]).map_err(|e| e.to_string())?;
        // As the push side decides for lines: a record is a JSON object (an array, a string
        // or a number has no fields to group or sum by).
        if record.data.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err("JSON but not an object".to_owned());
        }
        let amount = match (sum_field, amount) {
            (Some(field), Some(v)) => Sum::parse(&v).map_err(|e| format!("{field}: {e}"))?,
            _ => Sum::ZERO,
        };
        let group: Option<&str> = match group_field {
            Some(_) => group.as_deref(),
            None => Some(record.partition_key),
        };
        let id = match group {
            None => MISSING,
            Some(group) => match index_of.get(group) {
                Some(&id) => id,
                None => {
                    names.push(group.to_owned());
                    index_of.insert(group.to_owned(), (names.len() - 1) as u32);
                    (names.len() - 1) as u32
                }
            },
        };
        Ok((id, amount))
    }

    /// Writes the rollup of what `covered` says exactly once; returns the last place now
    /// reflected in the output.
    async fn write_batch_output(
        &self,
        stream: &str,
        shard_id: &str,
        records: &[KinesisEventRecord<'_>],
        resume: &[(usize, u64)],
        rollup: Rollup,
        covered: Covered,
    ) -> Result<Position, RollupError> {
        let (mut records, mut resume, mut rollup, mut covered) = (records, resume.to_vec(), rollup, covered);
        loop {
            let key = output_name(stream, shard_id, &position_at(records, covered.first));
            let body = rollup.to_ndjson(shard_id, None);
            let ours = position_at(records, covered.last);
            match self.output.put(&key, body.into(), Precondition::IfAbsent).await {
                Ok(_) => {
                    #[cfg(feature = "fault-injection")]
                    if self.settings.faults.crash_after_output {
                        // Fault injection (PUSHPULL_INJECT_CRASH=after-output): die between the
                        // output and the checkpoint, the crash point the protocol must survive.
                        warn!(key, "injected crash after writing the output");
                        std::process::abort();
                    }
                    return Ok(ours);
                }
                Err(StoreError::PreconditionFailed { .. }) => {
                    // An earlier attempt wrote this output and died before the checkpoint. The
                    // highest last position among its groups is where that attempt's batch ended.
                    let uri = self.output.uri(&key);
                    let existing = self
                        .output
                        .get(&key)
                        .await
                        .map_err(|source| RollupError::Output { uri: uri.clone(), source })?;
                    let Some(existing_last) = existing.as_ref().and_then(|o| max_last_position(&o.body)) else {
                        return Err(RollupError::ForeignOutput { uri, reason: "no parseable last_sequence".into() });
                    };
                    info!(key, existing_last = %existing_last, "output already written by an interrupted attempt; not writing it again");
                    if existing_last >= ours {
                        return Ok(existing_last);
                    }
                    // Only what comes after the existing output remains to be written.
                    let n = records
                        .iter()
                        .position(|r| r.sequence_number().is_ok_and(|s| Position::whole(s) > existing_last))
                        .unwrap_or(records.len());
                    records = &records[n..];
                    resume = resume.into_iter().filter(|r| r.0 >= n).map(|(i, sub)| (i - n, sub)).collect();
                    // The first record left may be the aggregate the existing output counted in
                    // part: its user records up to `existing_last` are counted.
                    if let (Some(first), Some(sub)) = (records.first(), existing_last.sub)
                        && first.sequence_number().is_ok_and(|s| s == existing_last.sequence)
                    {
                        match resume.first_mut() {
                            Some(r) if r.0 == 0 => r.1 = r.1.max(sub),
                            _ => resume.insert(0, (0, sub)),
                        }
                    }
                    let (rest, rest_covered, _) = self.roll_up(records, &resume)?;
                    let Some(rest_covered) = rest_covered else { return Ok(existing_last) };
                    (rollup, covered) = (rest, rest_covered);
                }
                Err(source) => return Err(RollupError::Output { uri: self.output.uri(&key), source }),
            }
        }
    }

    async fn handle_window(
        &self,
        event: &KinesisEvent<'_>,
        window: &Window,
        stream: &str,
        shard_id: &str,
    ) -> Result<(Response, usize, usize), RollupError> {
        let mut state: Rollup = decode_window_state(event.state.as_ref())?;
        let (batch, _, result) = self.roll_up(&event.records, &[])?;
        state.merge(batch);
        let mut response = WindowResponse { batch_item_failures: result.item_failures(), ..Default::default() };
        if event.is_final_invoke_for_window && result.failures.is_empty() {
            let key = format!("{stream}/{shard_id}/window-{}.ndjson", window.start);
            let body = state.to_ndjson(shard_id, Some(window));
            match self.output.put(&key, body.into(), Precondition::IfAbsent).await {
                Ok(_) => {
                    info!(key, groups = state.groups.len(), early = event.is_window_terminated_early, "window written")
                }
                Err(StoreError::PreconditionFailed { .. }) => {
                    info!(key, "window already written by an earlier attempt")
                }
                Err(source) => return Err(RollupError::Output { uri: self.output.uri(&key), source }),
            }
        } else {
            response.state = encode_window_state(&state).map_err(|source| RollupError::State {
                start: window.start.clone(),
                shard_id: shard_id.to_owned(),
                source,
            })?;
        }
        let failed = result.failures.len() + result.unprocessed.len();
        Ok((Response::Window(response), result.processed, failed))
    }
}

/// The group id of records without the group-by field.
const MISSING: u32 = u32::MAX;

/// What [`RollupHandler::scan`] found in one contiguous part of a batch.
struct Part {
    /// The part's groups, in order of first sight.
    names: Vec<String>,
    /// Each record (user record) that passed, in order.
    items: Vec<Item>,
    /// The part's first failed user record of an aggregate: batch index, sub-sequence number.
    failed_user: Option<(usize, u32)>,
    /// The part's result, failure indices relative to the batch.
    result: BatchResult,
}

/// A record (or user record) that passed: its group (index into [`Part::names`]) and amount.
struct Item {
    amount: Sum,
    id: u32,
    /// Batch index.
    index: u32,
    /// Sub-sequence number in its aggregate, [`NO_SUB`] for a plain record.
    sub: u32,
}

/// [`Item::sub`] of a plain record.
const NO_SUB: u32 = u32::MAX;

/// A record of the batch, or a user record of an aggregate in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct At {
    index: usize,
    sub: Option<u64>,
}

/// The contiguous run of records (user records) a rollup counts, from the start of the records
/// it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Covered {
    first: At,
    last: At,
    count: usize,
}

/// The sequence number of `records[i]`, already checked by `process_records`.
fn seq_at(records: &[KinesisEventRecord<'_>], i: usize) -> SequenceNumber {
    records[i].sequence_number().unwrap_or_else(|_| unreachable!("checked by process_records"))
}

fn position_at(records: &[KinesisEventRecord<'_>], at: At) -> Position {
    Position { sequence: seq_at(records, at.index), sub: at.sub }
}

/// An output's name: by its first record, and by the user record too when it starts inside an
/// aggregate (after a part of it was counted).
fn output_name(stream: &str, shard_id: &str, first: &Position) -> String {
    match first.sub {
        Some(sub) if sub > 0 => format!("{stream}/{shard_id}/{}.{sub}.ndjson", first.sequence),
        _ => format!("{stream}/{shard_id}/{}.ndjson", first.sequence),
    }
}

/// A new intent's id: the time in nanoseconds and 64 random bits, so that two invocations never
/// draw the same one.
fn intent_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{nanos:x}-{:016x}", fastrand::u64(..))
}

/// The `writer` of an output's first row.
fn writer_of(body: &[u8]) -> Option<String> {
    let first = body.split(|b| *b == b'\n').find(|l| !l.is_empty())?;
    serde_json::from_slice::<serde_json::Value>(first).ok()?.get("writer")?.as_str().map(str::to_owned)
}

/// Unix seconds now.
fn now_unix() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The highest `last_sequence` (with its `last_sub_sequence`) among an output's groups.
fn max_last_position(body: &[u8]) -> Option<Position> {
    body.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let sequence = v["last_sequence"].as_str()?.parse::<SequenceNumber>().ok()?;
            Some(Position { sequence, sub: v["last_sub_sequence"].as_u64() })
        })
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch of `n` records, `{"user":"u<i % 7>","amount":1.5}`, with the records at `bad`
    /// not JSON.
    fn batch(n: usize, bad: &[usize]) -> String {
        use base64::Engine as _;
        let records: Vec<String> = (0..n)
            .map(|i| {
                // ~180 bytes of base64 a record: 6,000 records are parts on two or more cores.
                let line = if bad.contains(&i) {
                    "not json".to_owned()
                } else {
                    format!(r#"{{"user":"u{}","amount":1.5,"note":"{}"}}"#, i % 7, "n".repeat(100))
                };
                let data = base64::engine::general_purpose::STANDARD.encode(line);
                format!(
                    r#"{{"kinesis":{{"partitionKey":"p","sequenceNumber":"{}","data":"{data}","approximateArrivalTimestamp":1}},"eventID":"shardId-0:{}","eventSourceARN":"arn:aws:kinesis:us-east-1:1:stream/s"}}"#,
                    1000 + i,
                    1000 + i
                )
            })
            .collect();
        format!(r#"{{"Records":[{}]}}"#, records.join(","))
    }

    #[test]
    fn a_batch_checked_in_parts_rolls_up_as_one_pass_would() {
        let settings = RollupSettings::from_env(
            pushpull::config::Env::from_pairs([("GROUP_BY_FIELD", "user"), ("SUM_FIELD", "amount")])
                .with_local_locations("/tmp/r"),
        )
        .unwrap();
        let h = RollupHandler::new(settings, Store::file("/nonexistent/out"), Store::file("/nonexistent/cp"));
        let n = 6_000; // parts on any machine with two or more cores
        for bad in [vec![], vec![n - 10], vec![1_000, n - 1], vec![4_003, 5]] {
            let payload = batch(n, &bad);
            let event = KinesisEvent::from_slice(payload.as_bytes()).unwrap();
            let bytes: usize = event.records.iter().map(|r| r.kinesis.data.len()).sum();
            assert!(bytes >= 2 * pushpull::pull::kinesis::IN_PARTS_MIN_BYTES, "{bytes} bytes: not enough for parts");
            let (rollup, covered, result) = h.roll_up(&event.records, &[]).unwrap();
            let first_bad = bad.iter().copied().min().unwrap_or(n);
            let covered = covered.map_or(0, |c| c.count);
            assert_eq!(covered, first_bad, "{bad:?}");
            let mut failed: Vec<usize> = result.failures.iter().map(|f| f.index).collect();
            failed.sort();
            let mut expected_failed = bad.clone();
            expected_failed.sort();
            assert_eq!(failed, expected_failed, "every bad record is reported, at its batch index");
            assert_eq!(result.processed, n - bad.len());
            // One pass over the covered prefix, by hand.
            let mut expected: BTreeMap<String, (u64, usize, usize)> = BTreeMap::new();
            for i in 0..covered {
                let e = expected.entry(format!("u{}", i % 7)).or_insert((0, i, i));
                e.0 += 1;
                e.2 = i;
            }
            let got: BTreeMap<String, (u64, usize, usize)> = rollup
                .groups
                .iter()
                .map(|(k, g)| {
                    let at = |s: &SequenceNumber| s.as_str().parse::<usize>().unwrap() - 1000;
                    (k.clone(), (g.count, at(&g.first_sequence), at(&g.last_sequence)))
                })
                .collect();
            assert_eq!(got, expected, "{bad:?}");
            for g in rollup.groups.values() {
                let want = format!("{}.{}", g.count * 3 / 2, if g.count % 2 == 1 { 5 } else { 0 });
                assert_eq!(g.sum, Sum::parse(&want).unwrap());
            }
        }
    }

    #[tokio::test]
    async fn records_without_the_group_field_are_counted_under_a_null_key() {
        use base64::Engine as _;
        let dir = tempfile::tempdir().unwrap();
        let settings = RollupSettings::from_env(
            pushpull::config::Env::from_pairs([("GROUP_BY_FIELD", "user")]).with_local_locations("/tmp/r"),
        )
        .unwrap();
        let h = RollupHandler::new(settings, Store::file(dir.path().join("out")), Store::file(dir.path().join("cp")));
        let lines = [r#"{"user":"a"}"#, r#"{"other":1}"#, r#"{"user":null}"#, r#"{"user":""}"#];
        let records: Vec<String> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let n = i + 1;
                let data = base64::engine::general_purpose::STANDARD.encode(l);
                format!(
                    r#"{{"kinesis":{{"partitionKey":"p","sequenceNumber":"{n}","data":"{data}","approximateArrivalTimestamp":1}},"eventID":"shardId-0:{n}","eventSourceARN":"arn:aws:kinesis:us-east-1:1:stream/s"}}"#
                )
            })
            .collect();
        let payload = format!(r#"{{"Records":[{}]}}"#, records.join(","));
        h.handle(payload.as_bytes()).await.unwrap();
        let out = std::fs::read_to_string(dir.path().join("out/s/shardId-0/1.ndjson")).unwrap();
        let keys: Vec<(serde_json::Value, u64)> = out
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| (v["key"].clone(), v["count"].as_u64().unwrap()))
            .collect();
        assert_eq!(keys, [(serde_json::Value::Null, 2), ("".into(), 1), ("a".into(), 1)], "{out}");
    }

    /// A record of shard 0 of stream `s`: plain JSON, or a KPL aggregate of `lines`.
    fn kinesis_record(seq: u64, lines: &[&str], aggregated: bool) -> String {
        use base64::Engine as _;
        let data = if aggregated {
            let mut agg = pushpull::aggregation::Aggregator::new(1 << 20);
            for (i, l) in lines.iter().enumerate() {
                agg.add(&format!("k{i}"), None, bytes::Bytes::from(l.to_string())).unwrap();
            }
            agg.finish().unwrap().data.to_vec()
        } else {
            lines[0].as_bytes().to_vec()
        };
        let data = base64::engine::general_purpose::STANDARD.encode(data);
        format!(
            r#"{{"kinesis":{{"partitionKey":"p","sequenceNumber":"{seq}","data":"{data}","approximateArrivalTimestamp":1}},"eventID":"shardId-0:{seq}","eventSourceARN":"arn:aws:kinesis:us-east-1:1:stream/s"}}"#
        )
    }

    fn event_of(records: &[String]) -> String {
        format!(r#"{{"Records":[{}]}}"#, records.join(","))
    }

    fn handler_with(dir: &std::path::Path, positions: Positions) -> RollupHandler {
        let mut settings = RollupSettings::from_env(
            pushpull::config::Env::from_pairs([("GROUP_BY_FIELD", "user"), ("SUM_FIELD", "amount")])
                .with_local_locations(dir),
        )
        .unwrap();
        settings.positions = positions;
        RollupHandler::new(settings, Store::file(dir.join("out")), Store::file(dir.join("cp")))
    }

    /// The last record counted that a checkpoint names, in either form: (sequence, sub).
    fn counted(cp: &str) -> (String, Option<u64>) {
        let c: ShardCheckpoint = serde_json::from_str(cp).unwrap();
        let last =
            c.keys.values().map(|k| Position { sequence: k.sequence.clone(), sub: k.sub }).max().max(c.position());
        let last = last.expect("something counted");
        (last.sequence.to_string(), last.sub)
    }

    /// Every output object's rows: (file, key, count).
    fn outputs(dir: &std::path::Path) -> Vec<(String, String, u64)> {
        let mut rows = Vec::new();
        let mut files: Vec<_> =
            std::fs::read_dir(dir.join("out/s/shardId-0")).map_or(vec![], |d| d.flatten().collect());
        files.sort_by_key(|f| f.file_name());
        for f in files {
            for l in std::fs::read_to_string(f.path()).unwrap().lines() {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let name = f.file_name().to_string_lossy().into_owned();
                rows.push((name, v["key"].as_str().unwrap().to_owned(), v["count"].as_u64().unwrap()));
            }
        }
        rows
    }

    /// A payload naming `bootstrapServers` that does not read as a Kafka event fails the
    /// invocation: read as an empty batch, its offsets would be committed unprocessed.
    #[tokio::test]
    async fn a_kafka_event_that_does_not_read_is_an_error_not_an_empty_batch() {
        let dir = tempfile::tempdir().unwrap();
        let h = handler_with(dir.path(), Positions::PerShard);
        let payload = br#"{"eventSource":"SelfManagedKafka","bootstrapServers":"b:9092","records":{"t-x":[{"topic":"t","partition":"x","offset":1}]}}"#;
        let e = h.handle_until(payload, None).await.unwrap_err();
        assert!(matches!(e, RollupError::KafkaEvent(_)), "{e}");
    }

    /// A Kafka event rolls up as a shard's batch: the topic for the stream, `topic-N` for the
    /// shard, offsets for sequence numbers; a bad record is named by partition and offset, and the
    /// redelivery AWS makes from it counts nothing twice (per partition, at both position modes).
    #[tokio::test]
    async fn a_kafka_event_rolls_up_once_per_partition_offset() {
        for positions in [Positions::PerShard, Positions::PerKey] {
            let dir = tempfile::tempdir().unwrap();
            let h = handler_with(dir.path(), positions);
            let b64 = |s: &str| {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.encode(s)
            };
            let rec = |offset: u64, value: &str| {
                format!(
                    r#"{{"topic":"orders","partition":2,"offset":{offset},"timestamp":1700000000000,"timestampType":"CREATE_TIME","key":"{}","value":"{}","headers":[]}}"#,
                    b64("k"),
                    b64(value)
                )
            };
            let (a, bad, b) = (r#"{"user":"a","amount":"1.25"}"#, "not json", r#"{"user":"b","amount":"2"}"#);
            let event = |recs: &[String]| {
                format!(
                    r#"{{"eventSource":"SelfManagedKafka","bootstrapServers":"127.0.0.1:9092","records":{{"orders-2":[{}]}}}}"#,
                    recs.join(",")
                )
            };
            let first = event(&[rec(10, a), rec(11, bad), rec(12, b)]);
            let response = h.handle(first.as_bytes()).await.unwrap();
            assert_eq!(
                serde_json::to_value(&response).unwrap(),
                serde_json::json!({"batchItemFailures": [{"itemIdentifier": {"partition": "orders-2", "offset": 11}}]}),
                "{positions:?}"
            );
            // AWS redelivers from the failed record on (here fixed), and the first batch again.
            let fixed = r#"{"user":"a","amount":"1"}"#;
            for again in [event(&[rec(11, fixed), rec(12, b)]), first.clone()] {
                h.handle(again.as_bytes()).await.unwrap();
            }
            let mut rows: Vec<(String, u64, String)> = Vec::new();
            for f in std::fs::read_dir(dir.path().join("out/orders/orders-2")).unwrap().flatten() {
                for l in std::fs::read_to_string(f.path()).unwrap().lines() {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    rows.push((
                        v["key"].as_str().unwrap().to_owned(),
                        v["count"].as_u64().unwrap(),
                        v["sum"].to_string(),
                    ));
                }
            }
            rows.sort();
            let total = |k: &str| rows.iter().filter(|r| r.0 == k).map(|r| r.1).sum::<u64>();
            assert_eq!((total("a"), total("b")), (2, 1), "{positions:?}: {rows:?}");
        }
    }

    fn failed(response: &Response) -> Vec<String> {
        let Response::Batch(b) = response else { panic!("not a batch response") };
        b.batch_item_failures.iter().map(|f| f.item_identifier.clone()).collect()
    }

    fn line(user: &str) -> String {
        format!(r#"{{"user":"{user}","amount":1}}"#)
    }

    /// AWS identifies only the Kinesis record in a partial batch response, so a failed user
    /// record fails its whole aggregate; the user records before it are counted once, and every
    /// redelivery of the aggregate counts only what comes after the checkpoint's sub-sequence
    /// number.
    #[tokio::test]
    async fn a_failed_user_record_stops_the_rollup_inside_its_aggregate_and_redeliveries_count_nothing_twice() {
        for positions in [Positions::PerKey, Positions::PerShard] {
            failed_user_record_in(positions).await;
        }
    }

    async fn failed_user_record_in(positions: Positions) {
        let dir = tempfile::tempdir().unwrap();
        let h = handler_with(dir.path(), positions);
        let (a, b, c, d) = (line("a"), line("b"), line("c"), line("d"));
        let r1 = kinesis_record(1, &[&a], false);
        let agg = kinesis_record(2, &[&b, &c, "not json", &d], true);
        let r3 = kinesis_record(3, &[&a], false);
        let batch = event_of(&[r1.clone(), agg.clone(), r3.clone()]);
        assert_eq!(failed(&h.handle(batch.as_bytes()).await.unwrap()), ["2"]);
        assert_eq!(
            outputs(dir.path()),
            [
                ("1.ndjson".into(), "a".into(), 1),
                ("1.ndjson".into(), "b".into(), 1),
                ("1.ndjson".into(), "c".into(), 1)
            ]
        );
        let cp = std::fs::read_to_string(dir.path().join("cp/pull/s/shardId-0.json")).unwrap();
        assert_eq!(counted(&cp), ("2".into(), Some(1)), "{cp}");
        // The mapping retries from the aggregate, whole batch and bisected halves alike.
        for retry in [event_of(&[agg.clone(), r3.clone()]), event_of(std::slice::from_ref(&agg)), batch.clone()] {
            assert_eq!(failed(&h.handle(retry.as_bytes()).await.unwrap()), ["2"]);
            assert_eq!(outputs(dir.path()).len(), 3, "nothing more written");
        }
        // The mapping gives up on the aggregate (retries or age) and goes on after it.
        assert!(failed(&h.handle(event_of(&[r3]).as_bytes()).await.unwrap()).is_empty());
        let total: u64 = outputs(dir.path()).iter().map(|r| r.2).sum();
        assert_eq!(total, 4, "a, b, c, then a: d is behind the failed user record, in the failure destination");
    }

    /// A crash between the output and the checkpoint, in the middle of an aggregate and after it:
    /// the redelivered batch finds its output written and counts only what is not in it.
    #[tokio::test]
    async fn a_crash_between_output_and_checkpoint_inside_an_aggregate_counts_nothing_twice() {
        for positions in [Positions::PerKey, Positions::PerShard] {
            crash_inside_an_aggregate_in(positions).await;
        }
    }

    async fn crash_inside_an_aggregate_in(positions: Positions) {
        let dir = tempfile::tempdir().unwrap();
        let h = handler_with(dir.path(), positions);
        let cp = dir.path().join("cp/pull/s/shardId-0.json");
        let (a, b) = (line("a"), line("b"));
        let agg5 = kinesis_record(5, &[&a, &b, &a, &b], true);
        let agg6 = kinesis_record(6, &[&b, &b], true);
        // First delivery: everything counted; then the function dies after writing the output.
        let batch = event_of(&[agg5.clone(), agg6.clone()]);
        let files = output_files(dir.path());
        assert!(failed(&h.handle(batch.as_bytes()).await.unwrap()).is_empty());
        die_after_output(dir.path(), positions, None, &files);
        assert!(failed(&h.handle(batch.as_bytes()).await.unwrap()).is_empty());
        assert_eq!(outputs(dir.path()).iter().map(|r| r.2).sum::<u64>(), 6);
        let saved = std::fs::read_to_string(&cp).unwrap();
        assert_eq!(counted(&saved), ("6".into(), Some(1)), "{saved}");

        // Inside an aggregate: a checkpoint at 7/1 is lost after an output that went to 8/0
        // (written by an attempt the store kept, whose checkpoint never landed).
        let dir = tempfile::tempdir().unwrap();
        let h = handler_with(dir.path(), positions);
        let cp = dir.path().join("cp/pull/s/shardId-0.json");
        let agg7 = kinesis_record(7, &[&a, &b, "not json"], true);
        assert_eq!(failed(&h.handle(event_of(std::slice::from_ref(&agg7)).as_bytes()).await.unwrap()), ["7"]);
        let at_7_1 = std::fs::read_to_string(&cp).unwrap();
        // The failure is gone on a later delivery? It cannot be (same bytes): the mapping moves
        // on past 7, and the next batch is counted after the checkpoint.
        let agg8 = kinesis_record(8, &[&a, &a], true);
        let files = output_files(dir.path());
        assert!(failed(&h.handle(event_of(std::slice::from_ref(&agg8)).as_bytes()).await.unwrap()).is_empty());
        // Crash: the second batch's checkpoint never landed.
        die_after_output(dir.path(), positions, Some(at_7_1), &files);
        assert!(failed(&h.handle(event_of(&[agg8]).as_bytes()).await.unwrap()).is_empty());
        let rows = outputs(dir.path());
        assert_eq!(rows.iter().map(|r| r.2).sum::<u64>(), 4, "{rows:?}");
    }

    fn output_files(dir: &std::path::Path) -> Vec<String> {
        let mut files: Vec<String> = std::fs::read_dir(dir.join("out/s/shardId-0"))
            .map_or(vec![], |d| d.flatten().map(|f| f.file_name().to_string_lossy().into_owned()).collect());
        files.sort();
        files
    }

    /// The function died between writing its output and moving its checkpoint: the checkpoint is
    /// put back as it was before the invocation (`before`; none: there was none), and per key with
    /// the write-ahead note the invocation had written first (the positions its output counts up
    /// to, under the output's name).
    fn die_after_output(dir: &std::path::Path, positions: Positions, before: Option<String>, files: &[String]) {
        let cp = dir.join("cp/pull/s/shardId-0.json");
        let after: ShardCheckpoint = serde_json::from_str(&std::fs::read_to_string(&cp).unwrap()).unwrap();
        let mut state: ShardCheckpoint =
            before.as_deref().map_or_else(ShardCheckpoint::default, |b| serde_json::from_str(b).unwrap());
        if positions == Positions::PerKey {
            let new: Vec<String> = output_files(dir).into_iter().filter(|f| !files.contains(f)).collect();
            assert_eq!(new.len(), 1, "one output written: {new:?}");
            let moved = after.keys.iter().filter(|(k, v)| state.keys.get(*k) != Some(v));
            let body = std::fs::read(dir.join("out/s/shardId-0").join(&new[0])).unwrap();
            let intent = Intent {
                positions: moved.map(|(k, v)| (k.clone(), v.clone())).collect(),
                id: Some(writer_of(&body).expect("the output names its writer")),
                until: None,
                at: now_unix(),
            };
            state.pending.insert(format!("s/shardId-0/{}", new[0]), intent);
        }
        std::fs::write(&cp, serde_json::to_string(&state).unwrap()).unwrap();
    }

    fn keyed(seq: u64, key: &str, user: &str) -> String {
        let data = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, line(user));
        format!(
            r#"{{"kinesis":{{"partitionKey":"{key}","sequenceNumber":"{seq}","data":"{data}","approximateArrivalTimestamp":1}},"eventID":"shardId-0:{seq}","eventSourceARN":"arn:aws:kinesis:us-east-1:1:stream/s"}}"#
        )
    }

    /// AWS (with-kinesis): "When you increase the number of concurrent batches per shard, Lambda
    /// still ensures in-order processing at the partition-key level": with a ParallelizationFactor
    /// above 1, two batches of one shard (two keys' lanes) arrive in either order, and a
    /// redelivery after the mapping failed over regroups them. Per key, every record is counted
    /// once; per shard, the faster lane's position hides the slower lane's records (why the
    /// template asks for per-key positions above factor 1).
    #[tokio::test]
    async fn concurrent_batches_of_a_shard_count_every_record_once_per_key() {
        let k1: Vec<String> = [1, 3, 5].iter().map(|&s| keyed(s, "k1", "a")).collect();
        let k2: Vec<String> = [2, 4, 6].iter().map(|&s| keyed(s, "k2", "b")).collect();
        let all: Vec<String> = (1..=6)
            .map(|s| keyed(s, if s % 2 == 1 { "k1" } else { "k2" }, if s % 2 == 1 { "a" } else { "b" }))
            .collect();
        let total = |dir: &std::path::Path| outputs(dir).iter().map(|r| r.2).sum::<u64>();

        let dir = tempfile::tempdir().unwrap();
        let h = handler_with(dir.path(), Positions::PerKey);
        // The k2 lane is faster; then k1's; then everything again, regrouped (a failover).
        for batch in [&k2, &k1, &all] {
            assert!(failed(&h.handle(event_of(batch).as_bytes()).await.unwrap()).is_empty());
        }
        assert_eq!(total(dir.path()), 6, "{:?}", outputs(dir.path()));
        let cp = std::fs::read_to_string(dir.path().join("cp/pull/s/shardId-0.json")).unwrap();
        let c: ShardCheckpoint = serde_json::from_str(&cp).unwrap();
        assert_eq!(c.keys.len(), 2, "one position per key: {cp}");

        // Per shard, the same deliveries lose k1's records: the loss per-key positions prevent.
        let dir = tempfile::tempdir().unwrap();
        let h = handler_with(dir.path(), Positions::PerShard);
        for batch in [&k2, &k1] {
            h.handle(event_of(batch).as_bytes()).await.unwrap();
        }
        assert_eq!(total(dir.path()), 3);
    }

    /// Batches of other keys moving the checkpoint in between are kept; the same key moved by two
    /// invocations at once is a conflict (the same records counted twice: the caller fails and its
    /// retry skips them).
    #[test]
    fn checkpoints_of_concurrent_batches_merge_by_key() {
        let pos = |s: u64| KeyPosition { sequence: s.to_string().parse().unwrap(), sub: None };
        let cp = |keys: &[(&str, u64)]| ShardCheckpoint {
            keys: keys.iter().map(|(k, s)| ((*k).to_owned(), pos(*s))).collect(),
            ..Default::default()
        };
        let base = cp(&[("k1", 1), ("k2", 2)]);
        let ours = cp(&[("k1", 5), ("k2", 2)]);
        let now = cp(&[("k1", 1), ("k2", 6), ("k3", 7)]);
        assert_eq!(ShardCheckpoint::merge(&base, &ours, &now), Some(cp(&[("k1", 5), ("k2", 6), ("k3", 7)])));
        let clash = cp(&[("k1", 3), ("k2", 2)]);
        assert_eq!(ShardCheckpoint::merge(&base, &ours, &clash), None);
    }

    /// Per key, a crash between the output and the checkpoint, then the batch retried in bisected
    /// halves (BisectBatchOnFunctionError) or regrouped (a runner failed over): the write-ahead
    /// note makes the output's positions count, whichever records the retry carries.
    #[tokio::test]
    async fn after_a_crash_a_bisected_retry_counts_nothing_twice_per_key() {
        let dir = tempfile::tempdir().unwrap();
        let h = handler_with(dir.path(), Positions::PerKey);
        let recs: Vec<String> = (1..=8).map(|s| keyed(s, &format!("k{}", s % 3), "a")).collect();
        let files = output_files(dir.path());
        assert!(failed(&h.handle(event_of(&recs).as_bytes()).await.unwrap()).is_empty());
        die_after_output(dir.path(), Positions::PerKey, None, &files);
        for half in [&recs[..4], &recs[4..], &recs[2..6]] {
            assert!(failed(&h.handle(event_of(half).as_bytes()).await.unwrap()).is_empty());
        }
        let total: u64 = outputs(dir.path()).iter().map(|r| r.2).sum();
        assert_eq!(total, 8, "{:?}", outputs(dir.path()));
        let cp = std::fs::read_to_string(dir.path().join("cp/pull/s/shardId-0.json")).unwrap();
        let c: ShardCheckpoint = serde_json::from_str(&cp).unwrap();
        assert!(c.pending.is_empty() && c.keys.len() == 3, "settled: {cp}");
    }

    /// Per key, two invocations counting the same keys at once (a batch of a runner that was
    /// killed while its function still ran, and the same records redelivered by the next runner,
    /// grouped otherwise): the first to note its output claims the keys; the other fails before
    /// writing anything, and its retry counts only what the first did not.
    #[tokio::test]
    async fn an_invocation_counting_claimed_keys_fails_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let h = handler_with(dir.path(), Positions::PerKey);
        let rec = |s: u64| keyed(s, &format!("k{}", s % 2), "a");
        // Record 1 is counted; the first invocation has noted its output for records 2-4 and is
        // writing it.
        let cp = dir.path().join("cp/pull/s/shardId-0.json");
        let pos = |s: u64| KeyPosition { sequence: s.to_string().parse().unwrap(), sub: None };
        let mut claimed = ShardCheckpoint { keys: [("k1".into(), pos(1))].into(), ..Default::default() };
        claimed.pending.insert(
            "s/shardId-0/2.ndjson".into(),
            Intent {
                positions: [("k0".into(), pos(4)), ("k1".into(), pos(3))].into(),
                id: None,
                until: None,
                at: now_unix(),
            },
        );
        std::fs::create_dir_all(cp.parent().unwrap()).unwrap();
        std::fs::write(&cp, serde_json::to_string(&claimed).unwrap()).unwrap();
        // The same keys, grouped otherwise (from record 3): refused before anything is written.
        let batch: Vec<String> = (3..=6).map(rec).collect();
        let err = h.handle(event_of(&batch).as_bytes()).await.unwrap_err();
        assert!(matches!(err, RollupError::Busy { .. }), "{err}");
        assert!(output_files(dir.path()).is_empty(), "nothing written");
        // The first one's output lands (its positions not yet moved): the retry counts 5 and 6.
        std::fs::create_dir_all(dir.path().join("out/s/shardId-0")).unwrap();
        std::fs::write(
            dir.path().join("out/s/shardId-0/2.ndjson"),
            r#"{"key":"a","count":3,"sum":3,"shard_id":"shardId-0","first_sequence":"2","last_sequence":"4"}"#
                .to_owned()
                + "\n",
        )
        .unwrap();
        assert!(failed(&h.handle(event_of(&batch).as_bytes()).await.unwrap()).is_empty());
        let total: u64 = outputs(dir.path()).iter().map(|r| r.2).sum();
        assert_eq!(total, 3 + 2, "{:?}", outputs(dir.path()));
    }

    /// Per key, a note never moves positions for an output it did not write: an output under the
    /// note's name written by another invocation (whose positions, if any, are its own) leaves
    /// the keys where they were, and an invocation finding its output's name taken withdraws its
    /// note and fails rather than count records no output holds.
    #[tokio::test]
    async fn a_note_never_counts_an_output_another_invocation_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let h = handler_with(dir.path(), Positions::PerKey);
        let cp = dir.path().join("cp/pull/s/shardId-0.json");
        let pos = |s: u64| KeyPosition { sequence: s.to_string().parse().unwrap(), sub: None };
        let mut noted = ShardCheckpoint { keys: [("k1".into(), pos(1))].into(), ..Default::default() };
        noted.pending.insert(
            "s/shardId-0/2.ndjson".into(),
            Intent { positions: [("k0".into(), pos(4))].into(), id: Some("mine".into()), until: None, at: now_unix() },
        );
        std::fs::create_dir_all(cp.parent().unwrap()).unwrap();
        std::fs::write(&cp, serde_json::to_string(&noted).unwrap()).unwrap();
        std::fs::create_dir_all(dir.path().join("out/s/shardId-0")).unwrap();
        let theirs = r#"{"key":"a","count":1,"sum":1,"shard_id":"shardId-0","first_sequence":"2","last_sequence":"2","writer":"other"}"#;
        std::fs::write(dir.path().join("out/s/shardId-0/2.ndjson"), format!("{theirs}\n")).unwrap();

        let batch: Vec<String> = (2..=4).map(|s| keyed(s, "k0", "a")).collect();
        let err = h.handle(event_of(&batch).as_bytes()).await.unwrap_err();
        assert!(matches!(err, RollupError::Output { .. }), "{err}");
        let after: ShardCheckpoint = serde_json::from_str(&std::fs::read_to_string(&cp).unwrap()).unwrap();
        assert!(after.pending.is_empty(), "both notes withdrawn: {after:?}");
        assert_eq!(after.keys.get("k0"), None, "k0 not moved past records no output holds");
        assert_eq!(outputs(dir.path()).iter().map(|r| r.2).sum::<u64>(), 1, "the other output untouched");
    }

    /// Per key, a note whose invocation's deadline (and the margin after it) has passed without
    /// its output stops claiming its keys: Lambda stopped that invocation, and its keys are
    /// counted by the next batch instead of waiting 16 minutes.
    #[tokio::test]
    async fn a_dead_invocations_note_stops_claiming_its_keys_after_its_deadline() {
        let pos = |s: u64| KeyPosition { sequence: s.to_string().parse().unwrap(), sub: None };
        let batch: Vec<String> = (2..=4).map(|s| keyed(s, "k0", "a")).collect();
        for (until, claimed) in [(Some(now_unix() - 1.0), false), (Some(now_unix() + 60.0), true), (None, true)] {
            let dir = tempfile::tempdir().unwrap();
            let h = handler_with(dir.path(), Positions::PerKey);
            let cp = dir.path().join("cp/pull/s/shardId-0.json");
            let mut noted = ShardCheckpoint::default();
            noted.pending.insert(
                "s/shardId-0/2.ndjson".into(),
                Intent { positions: [("k0".into(), pos(3))].into(), id: Some("dead".into()), until, at: now_unix() },
            );
            std::fs::create_dir_all(cp.parent().unwrap()).unwrap();
            std::fs::write(&cp, serde_json::to_string(&noted).unwrap()).unwrap();
            let result = h.handle(event_of(&batch).as_bytes()).await;
            if claimed {
                assert!(matches!(result, Err(RollupError::Busy { .. })), "{until:?}: {result:?}");
            } else {
                assert!(failed(&result.unwrap()).is_empty());
                assert_eq!(outputs(dir.path()).iter().map(|r| r.2).sum::<u64>(), 3);
            }
        }
    }

    /// Per key, an output under our name written with per-shard positions (before a switch to
    /// per-key: it has no `writer`) counts every record of the shard from its first to its last:
    /// those of ours move their keys, and the retry counts only the rest.
    #[tokio::test]
    async fn an_output_written_per_shard_under_our_name_counts_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let h = handler_with(dir.path(), Positions::PerKey);
        std::fs::create_dir_all(dir.path().join("out/s/shardId-0")).unwrap();
        let per_shard =
            r#"{"key":"a","count":2,"sum":2,"shard_id":"shardId-0","first_sequence":"2","last_sequence":"3"}"#;
        std::fs::write(dir.path().join("out/s/shardId-0/2.ndjson"), format!("{per_shard}\n")).unwrap();
        let batch: Vec<String> = (2..=5).map(|s| keyed(s, &format!("k{}", s % 2), "a")).collect();
        let err = h.handle(event_of(&batch).as_bytes()).await.unwrap_err();
        assert!(matches!(err, RollupError::Output { .. }), "{err}");
        assert!(failed(&h.handle(event_of(&batch).as_bytes()).await.unwrap()).is_empty());
        assert_eq!(outputs(dir.path()).iter().map(|r| r.2).sum::<u64>(), 4, "{:?}", outputs(dir.path()));
    }

    /// A compare-and-swap whose answer was lost and whose retry conflicted finds its own note in
    /// the checkpoint: written, not a claim by someone else.
    #[test]
    fn a_note_found_already_written_is_ours() {
        let pos = |s: u64| KeyPosition { sequence: s.to_string().parse().unwrap(), sub: None };
        let base = ShardCheckpoint::default();
        let mut ours = base.clone();
        ours.pending.insert(
            "n".into(),
            Intent { positions: [("k0".into(), pos(3))].into(), id: Some("me".into()), until: None, at: 1.0 },
        );
        assert_eq!(ShardCheckpoint::merge(&base, &ours, &ours), Some(ours.clone()));
        let mut theirs = ours.clone();
        theirs.pending.get_mut("n").unwrap().id = Some("other".into());
        assert_eq!(ShardCheckpoint::merge(&base, &ours, &theirs), None, "another invocation's claim");
    }
}
