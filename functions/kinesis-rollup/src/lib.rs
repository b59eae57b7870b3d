//! The sample pull function: roll a stream up into counts and sums per group, written to
//! `OUTPUT_URI` exactly once however often the mapping delivers a batch.
//!
//! Each record is JSON; its group is the value of `GROUP_BY_FIELD` (else the partition key) and
//! `SUM_FIELD`, when set, is summed. A record that is not base64, not a JSON object, or whose sum
//! field is not a number is reported in `batchItemFailures`.
//!
//! **Per batch** (no tumbling window), exactly once across retries and duplicate deliveries:
//! 1. `pull/<stream>/<shard>.json` in `CHECKPOINT_URI` holds the highest sequence number whose
//!    record is reflected in the output. Records at or below it are skipped.
//! 2. The records after it are processed up to the first failure (a contiguous prefix: the
//!    mapping redelivers everything from the lowest failure on).
//! 3. Their rollup is written to `<stream>/<shard>/<first sequence>.ndjson` with a conditional
//!    create. A retry starts at the same first record, so it aims at the same name: if the
//!    object exists, an earlier attempt wrote it and crashed before step 4. Its records are taken
//!    as done (up to its `last_sequence`) and only the rest of this batch is written, under the
//!    name of its own first record.
//! 4. The checkpoint advances (compare-and-swap).
//!
//! **Per tumbling window**: the mapping carries the rollup between invocations as window state
//! (capped below 1 MB); the final invocation writes `<stream>/<shard>/window-<start>.ndjson` with
//! a conditional create, so a retried final invocation cannot write it twice.
//!
//! The per-shard checkpoint assumes one batch per shard at a time: `ParallelizationFactor` 1,
//! which the template enforces for this function (tumbling windows require it too).
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
//! assert!(out.starts_with(r#"{"key":"a","count":1,"sum":0,"shard_id":"shardId-0","first_sequence":"1","last_sequence":"1"}"#));
//! # });
//! ```
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use pushpull::checkpoint::{CheckpointError, Checkpoints};
use pushpull::kinesis_event::{KinesisEvent, KinesisEventRecord, SequenceNumber, Window};
use pushpull::ndjson;
use pushpull::pull::kinesis::{
    PullError, StateError, WindowResponse, decode_window_state, encode_window_state, process_records,
};
use pushpull::pull::{BatchResponse, BatchResult, Options};
use pushpull::store::{Precondition, Store, StoreError};

pub mod settings;
pub mod sum;

pub use settings::RollupSettings;
pub use sum::{SUM_SCALE, Sum};

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
            RollupError::WindowState(_) => "RollupError.WindowState",
            RollupError::Pull(_) => "RollupError.Pull",
            RollupError::Output { .. } => "RollupError.Output",
            RollupError::ForeignOutput { .. } => "RollupError.ForeignOutput",
            RollupError::Checkpoint { .. } => "RollupError.Checkpoint",
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
        let mut out = String::new();
        let shard = serde_json::to_string(shard_id).unwrap_or_default();
        let named = self.groups.iter().map(|(k, g)| (serde_json::to_string(k).unwrap_or_default(), g));
        for (key, g) in self.missing.iter().map(|g| ("null".to_owned(), g)).chain(named) {
            let _ = write!(
                out,
                r#"{{"key":{key},"count":{},"sum":{},"shard_id":{shard},"first_sequence":"{}","last_sequence":"{}""#,
                g.count, g.sum, g.first_sequence, g.last_sequence
            );
            if let Some(w) = window {
                let _ = write!(
                    out,
                    r#","window_start":{},"window_end":{}"#,
                    serde_json::to_string(&w.start).unwrap_or_default(),
                    serde_json::to_string(&w.end).unwrap_or_default()
                );
            }
            out.push_str("}\n");
        }
        out
    }
}

impl Group {
    fn merge(&mut self, g: Group) {
        self.count += g.count;
        self.sum.0 += g.sum.0;
        self.first_sequence = self.first_sequence.clone().min(g.first_sequence);
        self.last_sequence = self.last_sequence.clone().max(g.last_sequence);
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
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ShardCheckpoint {
    last_sequence: Option<SequenceNumber>,
}

/// Handles Kinesis batches for the sample pipeline.
#[derive(Debug, Clone)]
pub struct RollupHandler {
    settings: RollupSettings,
    output: Store,
    checkpoints: Checkpoints<Store>,
}

impl RollupHandler {
    /// A handler writing rollups to `output` and checkpoints to `checkpoints`.
    pub fn new(settings: RollupSettings, output: Store, checkpoints: Store) -> Self {
        RollupHandler { settings, output, checkpoints: Checkpoints::new(checkpoints) }
    }

    /// The handler a deployed function runs, its stores at the settings' locations. The AWS
    /// configuration is loaded only if a location is on S3.
    pub async fn connect(settings: RollupSettings, aws: &pushpull::aws::Aws) -> Self {
        let output = Store::connect(&settings.output, aws).await;
        let checkpoints = Store::connect(&settings.checkpoint, aws).await;
        Self::new(settings, output, checkpoints)
    }

    /// Processes one invocation payload.
    pub async fn handle(&self, payload: &[u8]) -> Result<Response, RollupError> {
        #[cfg(feature = "fault-injection")]
        if self.settings.faults.failures > 0.0 && fastrand::f64() < self.settings.faults.failures {
            warn!("injected failure (PUSHPULL_INJECT_FAILURES)");
            return Err(RollupError::Injected);
        }
        let event = KinesisEvent::from_slice(payload)?;
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
        if let Some(window) = &event.window {
            return self.handle_window(&event, window, &stream, &shard_id).await;
        }
        let cp_id = format!("pull/{stream}/{shard_id}.json");
        let cp_err = |source| RollupError::Checkpoint { shard_id: shard_id.clone(), source };
        let (checkpoint, cp_version) = match self.checkpoints.load::<ShardCheckpoint>(&cp_id).await.map_err(cp_err)? {
            Some((c, v)) => (c, Some(v)),
            None => (ShardCheckpoint::default(), None),
        };
        // Records already reflected in the output (a retry, a duplicate delivery) are skipped.
        let mut skipped = 0usize;
        let mut first_fresh = None;
        for (i, r) in event.records.iter().enumerate() {
            let seq = r
                .sequence_number()
                .map_err(|source| PullError::SequenceNumber { event_id: r.event_id.to_string(), source })?;
            if checkpoint.last_sequence.as_ref().is_some_and(|last| seq <= *last) {
                skipped += 1;
            } else {
                first_fresh = Some(i);
                break;
            }
        }
        let Some(first_fresh) = first_fresh else {
            info!(
                shard_id,
                skipped,
                "every record of the batch is at or below the shard checkpoint (counted, or given up by the mapping)"
            );
            return Ok(Response::Batch(BatchResponse::default()));
        };
        let fresh = &event.records[first_fresh..];
        let (rollup, covered, result) = self.roll_up(fresh)?;
        let groups = rollup.groups.len();
        let mut new_last = checkpoint.last_sequence.clone();
        if covered > 0 {
            new_last = Some(self.write_batch_output(&stream, &shard_id, fresh, rollup, covered).await?);
            let value = ShardCheckpoint { last_sequence: new_last.clone() };
            match &cp_version {
                Some(v) => self.checkpoints.replace(&cp_id, &value, v).await,
                None => self.checkpoints.create(&cp_id, &value).await,
            }
            .map_err(cp_err)?;
        }
        for f in &result.failures {
            warn!(shard_id, sequence_number = %f.item_identifier, reason = %f.reason, "record failed");
        }
        info!(shard_id, records = event.records.len(), skipped, rolled_up = covered, failed = result.failures.len(), groups,
              checkpoint = ?new_last.as_ref().map(|s| s.to_string()), "batch rolled up");
        Ok(Response::Batch(result.response()))
    }

    /// Checks every record (so that every bad one is reported) and rolls up those before the
    /// first failure: the mapping redelivers everything from the lowest failure on, so counting a
    /// record after it now would count it twice. Returns the rollup, how many records (from the
    /// start of `records`) it covers, and the batch result.
    ///
    /// Large batches are checked in contiguous parts on as many threads as the function has
    /// vCPUs (Lambda gives 2 from 1,769 MB of memory); the parts are merged in record order, so
    /// the result is the same as one pass.
    fn roll_up(&self, records: &[KinesisEventRecord<'_>]) -> Result<(Rollup, usize, BatchResult), RollupError> {
        let threads = std::thread::available_parallelism().map_or(1, usize::from).min(records.len() / PART_MIN);
        let parts: Vec<Result<Part, PullError>> = if threads <= 1 {
            vec![self.scan(records, 0)]
        } else {
            let size = records.len().div_ceil(threads);
            std::thread::scope(|s| {
                let handles: Vec<_> = records
                    .chunks(size)
                    .enumerate()
                    .map(|(i, chunk)| s.spawn(move || self.scan(chunk, i * size)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
            })
        };
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
        let covered = result.failures.iter().map(|f| f.index).min().unwrap_or(records.len());
        let mut acc: Vec<Option<(u64, Sum, usize, usize)>> = Vec::new();
        let mut missing: Option<(u64, Sum, usize, usize)> = None;
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
            // A part's items stop at its first failure, which is at or after `covered`.
            for (j, (id, amount)) in part.items.iter().enumerate() {
                let i = part.base + j;
                if i >= covered {
                    break;
                }
                let slot = match id {
                    &MISSING => &mut missing,
                    id => &mut acc[global[*id as usize]],
                };
                let slot = slot.get_or_insert((0, Sum(0), i, i));
                slot.0 += 1;
                slot.1.0 += amount.0;
                slot.3 = i;
            }
        }
        let group = |(count, sum, first, last)| Group {
            count,
            sum,
            first_sequence: seq_at(records, first),
            last_sequence: seq_at(records, last),
        };
        let mut rollup = Rollup { missing: missing.map(group), ..Rollup::default() };
        for (name, slot) in names.into_iter().zip(acc) {
            if let Some(slot) = slot {
                rollup.groups.insert(name.to_owned(), group(slot));
            }
        }
        Ok((rollup, covered, result))
    }

    /// Checks `records` (which start at index `base` of the batch) and notes each record's group
    /// and amount up to the first failure. Groups are interned: a record costs no allocation
    /// unless it starts a new group.
    fn scan(&self, records: &[KinesisEventRecord<'_>], base: usize) -> Result<Part, PullError> {
        let mut index_of: HashMap<String, u32> = HashMap::new();
        let mut names: Vec<String> = Vec::new();
        let mut items: Vec<(u32, Sum)> = Vec::with_capacity(records.len());
        let (group_field, sum_field) = (self.settings.group_by_field.as_deref(), self.settings.sum_field.as_deref());
        let mut result = process_records(records, Options::default(), |record| -> Result<(), String> {
            let [group, amount] = ndjson::fields(record.data, [group_field, sum_field]).map_err(|e| e.to_string())?;
            // As the push side decides for lines: a record is a JSON object (an array, a string
            // or a number has no fields to group or sum by).
            if record.data.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
                return Err("JSON but not an object".to_owned());
            }
            let amount = match (sum_field, amount) {
                (Some(field), Some(v)) => {
                    Sum::parse(&v).ok_or_else(|| format!("{field} is not a number below 10^18 in magnitude: {v}"))?
                }
                _ => Sum(0),
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
            // Records are handled in order, so items[i] belongs to records[i] up to the first
            // failure, which is where the rollup stops anyway.
            if items.len() == record.index {
                items.push((id, amount));
            }
            Ok(())
        })?;
        for f in &mut result.failures {
            f.index += base;
        }
        Ok(Part { base, names, items, result })
    }

    /// Writes the rollup of `records[..covered]` exactly once; returns the highest sequence
    /// number now reflected in the output.
    async fn write_batch_output(
        &self,
        stream: &str,
        shard_id: &str,
        records: &[KinesisEventRecord<'_>],
        rollup: Rollup,
        covered: usize,
    ) -> Result<SequenceNumber, RollupError> {
        let mut start = 0usize;
        let mut rollup = rollup;
        loop {
            let key = format!("{stream}/{shard_id}/{}.ndjson", seq_at(records, start));
            let body = rollup.to_ndjson(shard_id, None);
            match self.output.put(&key, body.into(), Precondition::IfAbsent).await {
                Ok(_) => {
                    #[cfg(feature = "fault-injection")]
                    if self.settings.faults.crash_after_output {
                        // Fault injection (PUSHPULL_INJECT_CRASH=after-output): die between the
                        // output and the checkpoint, the crash point the protocol must survive.
                        warn!(key, "injected crash after writing the output");
                        std::process::abort();
                    }
                    return Ok(seq_at(records, covered - 1));
                }
                Err(StoreError::PreconditionFailed { .. }) => {
                    // An earlier attempt wrote this output and died before the checkpoint. The
                    // highest last_sequence among its groups is where that attempt's batch ended.
                    let uri = self.output.uri(&key);
                    let existing = self
                        .output
                        .get(&key)
                        .await
                        .map_err(|source| RollupError::Output { uri: uri.clone(), source })?;
                    let Some(existing_last) = existing.as_ref().and_then(|o| max_last_sequence(&o.body)) else {
                        return Err(RollupError::ForeignOutput { uri, reason: "no parseable last_sequence".into() });
                    };
                    info!(key, existing_last = %existing_last, "output already written by an interrupted attempt; not writing it again");
                    match (start..covered).find(|&i| seq_at(records, i) > existing_last) {
                        None => return Ok(existing_last.max(seq_at(records, covered - 1))),
                        Some(n) => {
                            // Only the records after the existing output remain to be written.
                            start = n;
                            rollup = self.roll_up(&records[n..covered])?.0;
                        }
                    }
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
    ) -> Result<Response, RollupError> {
        let mut state: Rollup = decode_window_state(event.state.as_ref())?;
        let (batch, _, result) = self.roll_up(&event.records)?;
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
        Ok(Response::Window(response))
    }
}

/// The group id of records without the group-by field.
const MISSING: u32 = u32::MAX;

/// Below this many records per thread, one thread checks the whole batch: a part must be large
/// enough that the thread's start and the merge are small beside it.
const PART_MIN: usize = 2_000;

/// What [`RollupHandler::scan`] found in one contiguous part of a batch.
struct Part {
    /// Index of the part's first record in the batch.
    base: usize,
    /// The part's groups, in order of first sight.
    names: Vec<String>,
    /// Group (index into `names`) and amount of each record, up to the part's first failure.
    items: Vec<(u32, Sum)>,
    /// The part's result, failure indices relative to the batch.
    result: BatchResult,
}

/// The sequence number of `records[i]`, already checked by `process_records`.
fn seq_at(records: &[KinesisEventRecord<'_>], i: usize) -> SequenceNumber {
    records[i].sequence_number().unwrap_or_else(|_| unreachable!("checked by process_records"))
}

fn max_last_sequence(body: &[u8]) -> Option<SequenceNumber> {
    body.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice::<serde_json::Value>(l).ok())
        .filter_map(|v| v["last_sequence"].as_str().and_then(|s| s.parse::<SequenceNumber>().ok()))
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
                let line = if bad.contains(&i) { "not json".to_owned() } else { format!(r#"{{"user":"u{}","amount":1.5}}"#, i % 7) };
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
        let n = 3 * PART_MIN; // parts on any machine with two or more cores
        for bad in [vec![], vec![n - 10], vec![PART_MIN / 2, n - 1], vec![2 * PART_MIN + 3, 5]] {
            let payload = batch(n, &bad);
            let event = KinesisEvent::from_slice(payload.as_bytes()).unwrap();
            let (rollup, covered, result) = h.roll_up(&event.records).unwrap();
            let first_bad = bad.iter().copied().min().unwrap_or(n);
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
                assert_eq!(g.sum, Sum(i128::from(g.count) * 1_500_000_000));
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
}
