//! A local Kinesis event source mapping: polls a stream and invokes a function through the
//! Invoke API with the semantics of AWS's mapping (aws-semantics.md).
//!
//! - One reader per shard (GetRecords at most 5 times a second, again at once while behind,
//!   backing off to `max_idle_poll` on an empty shard) feeding `ParallelizationFactor` lanes;
//!   records go to lanes by partition key, so order holds per key.
//! - A lane invokes when its batch is full (BatchSize, or the 6 MiB payload), or when the
//!   batching window has passed since its previous invocation ended, whichever first.
//! - Answers are judged by the partial batch response rule ([`outcome::judge`]); failures are
//!   retried (MaximumRetryAttempts), bisected (BisectBatchOnFunctionError), expired
//!   (MaximumRecordAgeInSeconds) and finally sent to the OnFailure destination.
//! - Tumbling windows: state carried between invocations; a final invocation per window once
//!   the window is over and the reader has caught up past its end.
//! - The position per shard is checkpointed ([`progress`]); parents finish before children.
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pushpull::checkpoint::Checkpoints;
use pushpull::store::Store;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::invoke::InvokeClient;

pub mod destination;
pub mod event;
pub mod filter;
mod lease;
pub mod outcome;
pub mod progress;
pub mod settings;
mod shard;

pub use settings::{Destination, MappingSettings, RawSettings, StartingPosition};

/// AWS clients the mapping uses.
#[derive(Debug, Clone)]
pub struct Clients {
    /// Kinesis (the source).
    pub kinesis: aws_sdk_kinesis::Client,
    /// SQS (a failure destination).
    pub sqs: aws_sdk_sqs::Client,
    /// S3 (a failure destination).
    pub s3: aws_sdk_s3::Client,
    /// SNS (a failure destination).
    pub sns: aws_sdk_sns::Client,
    /// EventBridge (an async-invoke failure destination).
    pub events: aws_sdk_eventbridge::Client,
}

impl From<&crate::localstack::Local> for Clients {
    fn from(l: &crate::localstack::Local) -> Self {
        Clients {
            kinesis: l.kinesis.clone(),
            sqs: l.sqs.clone(),
            s3: l.s3.clone(),
            sns: l.sns.clone(),
            events: l.events.clone(),
        }
    }
}

/// The mapping stopped on an error it cannot ride out.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    /// A Kinesis call failed for good (stream gone, no permission...).
    #[error("{0}")]
    Kinesis(String),
    /// The position could not be checkpointed (another runner owns it, or the store failed).
    #[error("checkpoint of {shard_id}: {source}")]
    Checkpoint {
        /// The shard.
        shard_id: String,
        /// Why.
        source: pushpull::checkpoint::CheckpointError,
    },
    /// The function cannot be invoked at all (unknown function, refused payload).
    #[error("{0}")]
    Invoke(crate::invoke::InvokeError),
    /// The failure destination refused the record for good.
    #[error("failure destination: {0}")]
    Destination(String),
    /// Another runner took the shard's lease (this one was paused or slow past the failover
    /// time): its checkpoint write was refused, and it stops reading the shard at once.
    #[error("the lease of {shard_id} was taken by another runner")]
    LeaseLost {
        /// The shard.
        shard_id: String,
    },
}

impl MappingError {
    /// A checkpoint write of `shard_id` failed: a conflict is a lost lease (fenced by the
    /// compare-and-swap), anything else a store error.
    pub(crate) fn checkpoint(shard_id: &str, source: pushpull::checkpoint::CheckpointError) -> Self {
        match source {
            pushpull::checkpoint::CheckpointError::Conflict { .. } => {
                MappingError::LeaseLost { shard_id: shard_id.to_owned() }
            }
            source => MappingError::Checkpoint { shard_id: shard_id.to_owned(), source },
        }
    }
}

/// How the runner behaves beyond the mapping's own settings.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// Where shard positions are checkpointed.
    pub checkpoints: Store,
    /// Key prefix of this mapping's checkpoints (default `esm/<function>/<stream>`).
    pub checkpoint_prefix: String,
    /// `invokeIdentityArn` in events.
    pub role_arn: String,
    /// How often shards are re-listed (new shards after resharding).
    pub list_shards_every: Duration,
    /// The least time between two GetRecords on one shard (Kinesis allows 5 a second).
    pub poll_interval: Duration,
    /// The longest wait between GetRecords on an empty shard (AWS polls about once a second).
    pub max_idle_poll: Duration,
    /// The wait after a GetRecords that returned records but found the shard caught up
    /// (MillisBehindLatest 0): `poll_interval` for the least delay, about a second to poll as
    /// AWS does and spare a busy local Kinesis.
    pub caught_up_poll: Duration,
    /// The cadence on a shard that is not behind ([`Polling`]).
    pub polling: Polling,
    /// First delay before retrying a failed batch; doubles up to `max_retry_backoff`.
    pub retry_backoff: Duration,
    /// Longest delay between retries.
    pub max_retry_backoff: Duration,
    /// Stop once every shard is caught up and nothing happened for this long.
    pub stop_when_idle: Option<Duration>,
    /// Told of every record's first invocation (for end-to-end latency).
    pub delivered: Option<tokio::sync::mpsc::UnboundedSender<Delivered>>,
    /// This runner's name in the shards' leases (`--worker-id`; default host and pid). Runners of
    /// one mapping share its shards; a runner restarted under the same name takes its own leases
    /// back at once.
    pub worker_id: String,
    /// A lease whose counter has not moved for this long (as this runner saw it) may be taken:
    /// its owner is presumed dead. Owners renew every third of it.
    pub failover: Duration,
    /// On stop, how long the batches in flight may take to finish before they are stopped (their
    /// records are then re-delivered by the next owner).
    pub stop_grace: Duration,
}

/// The default worker id: host name and process id.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{}", std::process::id())
}

/// A record's (or a KPL aggregate's user record's) first invocation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Delivered {
    /// xxh3 of the record's data.
    pub hash: u64,
    /// When it was invoked, unix seconds.
    pub invoked_at: f64,
}

impl RunnerOptions {
    /// Polls a caught-up or empty shard every 200 ms instead of once a second: less delay for
    /// quick local loops, more GetRecords calls than AWS makes (the summary says which was used).
    pub fn fast_polling(mut self) -> Self {
        self.polling = Polling::Fast;
        self.caught_up_poll = self.poll_interval;
        self
    }

    /// Defaults for `settings`, checkpointing in `checkpoints`: AWS's polling cadence.
    pub fn new(settings: &MappingSettings, checkpoints: Store) -> Self {
        RunnerOptions {
            checkpoints,
            checkpoint_prefix: format!("esm/{}/{}", settings.function_name, settings.stream_name()),
            role_arn: format!("arn:aws:iam::{}:role/{}-role", crate::localstack::ACCOUNT, settings.function_name),
            list_shards_every: Duration::from_secs(5),
            poll_interval: Duration::from_millis(200),
            max_idle_poll: Duration::from_secs(1),
            caught_up_poll: Duration::from_secs(1),
            polling: Polling::Aws,
            retry_backoff: Duration::from_millis(100),
            max_retry_backoff: Duration::from_secs(5),
            stop_when_idle: None,
            delivered: None,
            worker_id: default_worker_id(),
            failover: Duration::from_secs(10),
            stop_grace: Duration::from_secs(30),
        }
    }
}

/// How often a shard that is not behind is polled.
///
/// AWS (with-kinesis.html): "Lambda polls each shard in your Kinesis stream for records at a base
/// rate of once per second. When more records are available, Lambda keeps processing batches
/// until the function catches up with the stream." So a shard is read again at once while it is
/// behind, and once a second once caught up, whether the last page had records or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Polling {
    /// AWS's: once a second when caught up (the default).
    #[default]
    Aws,
    /// Every `poll_interval` (200 ms) when caught up, backing off to once a second only after
    /// three empty pages: for quick local loops (`--fast-polling`).
    Fast,
}

impl std::fmt::Display for Polling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Polling::Aws => "AWS's cadence (a caught-up shard polled once a second)",
            Polling::Fast => "fast (a caught-up shard polled every 200 ms; AWS polls once a second)",
        })
    }
}

/// `HH:MM:SS.mmm` (UTC) of a unix time, for the summary.
fn iso8601_time(t: f64) -> String {
    let full = event::iso8601(t);
    full.split('T').nth(1).map(|s| s.trim_end_matches('Z').to_owned()).unwrap_or(full)
}

pub(crate) fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The mapping's counters: kept while running (in [`Stats`]) and reported (in [`Summary`]).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Counts {
    /// Shards read from.
    pub shards_started: u64,
    /// Shards finished (closed and fully processed).
    pub shards_finished: u64,
    /// GetRecords calls.
    pub get_records: u64,
    /// GetRecords calls that returned nothing.
    pub empty_polls: u64,
    /// Records read from the stream.
    pub records_read: u64,
    /// Invocations (with retries and final window invocations).
    pub invocations: u64,
    /// Smallest batch.
    pub batch_size_min: u32,
    /// Largest batch.
    pub batch_size_max: u32,
    /// Whole-batch failures (function errors, timeouts, crashes, unusable responses).
    pub function_errors: u64,
    /// Answers that reported some records failed.
    pub partial_failures: u64,
    /// Retries of a batch or of its failed rest.
    pub retries: u64,
    /// Batches split in two.
    pub bisections: u64,
    /// Invoke API throttles and transport errors (retried, not counted as attempts).
    pub throttles: u64,
    /// Other failures to invoke (an error status such as 413 or 404): retried like throttles.
    #[serde(default)]
    pub invoke_errors: u64,
    /// Records sent to the failure destination after their retries ran out.
    pub to_destination: u64,
    /// Records older than MaximumRecordAgeInSeconds (sent to the destination unprocessed).
    pub expired: u64,
    /// Records given up on with no destination configured (AWS drops them too).
    pub discarded: u64,
    /// Final invocations of tumbling windows.
    pub windows_final: u64,
    /// Records no filter of `FilterCriteria` matched (not invoked; AWS's `FilteredOutEventCount`).
    #[serde(default)]
    pub filtered_out: u64,
    /// Iterator age (ms): the largest seen.
    pub iterator_age_ms_max: f64,
    /// Iterator age at the last batch.
    pub iterator_age_ms_last: f64,
    /// Shard leases this runner took.
    pub leases_taken: u64,
    /// Of those, leases taken from another runner that had stopped renewing them.
    pub lease_takeovers: u64,
    /// Leases handed over (rebalancing, or stopping): released after a last checkpoint.
    pub leases_released: u64,
    /// Leases found taken by another runner (this one was paused or slow past the failover time).
    pub leases_lost: u64,
    /// Enhanced fan-out: successful `SubscribeToShard` calls (one a shard, then one every 5
    /// minutes and after each error).
    #[serde(default)]
    pub subscriptions: u64,
    /// Enhanced fan-out: `SubscribeToShardEvent`s received.
    #[serde(default)]
    pub subscription_events: u64,
    /// Enhanced fan-out: refused `SubscribeToShard` calls and subscriptions that broke off.
    #[serde(default)]
    pub subscription_errors: u64,
}

/// A change of a shard's lease, as this runner saw it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LeaseEvent {
    /// The shard.
    pub shard_id: String,
    /// `taken`, `released`, `lost` or `finished`.
    pub event: &'static str,
    /// For `taken`: the runner that held it before, if another.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// When, unix seconds.
    pub at: f64,
}

/// Counters kept while running.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) counts: Counts,
    batches: u64,
    batch_records: u64,
    pub(crate) delays: Delays,
    /// When the last invocation ended, from the start of the run.
    pub(crate) last_invoke_end: Duration,
    pub(crate) leases: Vec<LeaseEvent>,
}

/// What the mapping did: printed at the end of a run, and returned to tests.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Summary {
    /// The counters.
    #[serde(flatten)]
    pub counts: Counts,
    /// Records handed to the function on their first delivery.
    pub records_delivered: u64,
    /// Mean batch size.
    pub batch_size_mean: f64,
    /// Delay from a record's arrival in the stream to its first invocation, percentiles (ms, to 3
    /// significant digits).
    pub delay_ms_p50: f64,
    /// 95th percentile.
    pub delay_ms_p95: f64,
    /// 99th percentile.
    pub delay_ms_p99: f64,
    /// Largest delay.
    pub delay_ms_max: f64,
    /// Seconds from the start of the run to the end of its last invocation (the time the work
    /// took, without the idle wait before stopping).
    pub active_s: f64,
    /// This runner's worker id.
    pub worker_id: String,
    /// Every lease this runner took, released, lost or finished, in order.
    pub leases: Vec<LeaseEvent>,
    /// `Enabled` or `Disabled` (`Enabled: false`: the mapping reads nothing).
    #[serde(default)]
    pub state: String,
    /// The polling cadence used.
    #[serde(default)]
    pub polling: Polling,
    /// The stream consumer read through with enhanced fan-out (`SubscribeToShard`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
}

/// Delays from arrival to first invocation, in a histogram (microseconds, 3 significant digits):
/// a few kilobytes however long the mapping runs, where a list grew by 8 bytes a record.
#[derive(Debug)]
pub(crate) struct Delays(hdrhistogram::Histogram<u64>);

impl Default for Delays {
    fn default() -> Self {
        // An auto-resizing histogram; 3 significant digits is always a valid precision.
        Delays(hdrhistogram::Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits")))
    }
}

impl Delays {
    /// Notes one record's delay.
    pub(crate) fn record(&mut self, ms: f64) {
        let us = (ms.max(0.0) * 1000.0) as u64;
        // `record` grows the histogram as needed; only past its hard limit is the value clamped.
        if self.0.record(us).is_err() {
            self.0.saturating_record(us);
        }
    }

    fn count(&self) -> u64 {
        self.0.len()
    }

    /// The `q` quantile in ms; 0 when empty.
    fn quantile_ms(&self, q: f64) -> f64 {
        if self.0.is_empty() { 0.0 } else { self.0.value_at_quantile(q) as f64 / 1000.0 }
    }

    fn max_ms(&self) -> f64 {
        if self.0.is_empty() { 0.0 } else { self.0.max() as f64 / 1000.0 }
    }
}

impl Stats {
    pub(crate) fn batch(&mut self, size: u32) {
        let c = &mut self.counts;
        c.batch_size_min = if self.batches == 0 { size } else { c.batch_size_min.min(size) };
        c.batch_size_max = c.batch_size_max.max(size);
        self.batches += 1;
        self.batch_records += u64::from(size);
    }

    fn summary(&self) -> Summary {
        let d = &self.delays;
        Summary {
            counts: self.counts.clone(),
            records_delivered: d.count(),
            batch_size_mean: if self.batches == 0 { 0.0 } else { self.batch_records as f64 / self.batches as f64 },
            delay_ms_p50: d.quantile_ms(0.5),
            delay_ms_p95: d.quantile_ms(0.95),
            delay_ms_p99: d.quantile_ms(0.99),
            delay_ms_max: d.max_ms(),
            active_s: self.last_invoke_end.as_secs_f64(),
            worker_id: String::new(),
            leases: self.leases.clone(),
            state: String::new(),
            polling: Polling::default(),
            consumer: None,
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.consumer {
            Some(c) => writeln!(f, "  state            {}; enhanced fan-out through {c}", self.state)?,
            None => writeln!(f, "  state            {}; polling: {}", self.state, self.polling)?,
        }
        writeln!(
            f,
            "  shards           {} read, {} finished",
            self.counts.shards_started, self.counts.shards_finished
        )?;
        if self.consumer.is_some() {
            writeln!(
                f,
                "  SubscribeToShard {} subscriptions, {} events, {} errors; {} records",
                self.counts.subscriptions,
                self.counts.subscription_events,
                self.counts.subscription_errors,
                self.counts.records_read
            )?;
        } else {
            writeln!(
                f,
                "  GetRecords       {} calls ({} empty), {} records",
                self.counts.get_records, self.counts.empty_polls, self.counts.records_read
            )?;
        }
        writeln!(
            f,
            "  invocations      {} for {} records; batch size min {} mean {:.1} max {}",
            self.counts.invocations,
            self.records_delivered,
            self.counts.batch_size_min,
            self.batch_size_mean,
            self.counts.batch_size_max
        )?;
        writeln!(
            f,
            "  failures         {} function errors, {} partial, {} retries, {} bisections, {} throttles, {} other invoke errors",
            self.counts.function_errors,
            self.counts.partial_failures,
            self.counts.retries,
            self.counts.bisections,
            self.counts.throttles,
            self.counts.invoke_errors
        )?;
        writeln!(
            f,
            "  given up         {} to the failure destination, {} expired, {} discarded",
            self.counts.to_destination, self.counts.expired, self.counts.discarded
        )?;
        writeln!(f, "  windows          {} final invocations", self.counts.windows_final)?;
        if self.counts.filtered_out > 0 {
            writeln!(f, "  filtered out     {} records (FilterCriteria: not invoked)", self.counts.filtered_out)?;
        }
        writeln!(
            f,
            "  leases           {} taken ({} from a runner that stopped renewing), {} released, {} lost; as {}",
            self.counts.leases_taken,
            self.counts.lease_takeovers,
            self.counts.leases_released,
            self.counts.leases_lost,
            self.worker_id
        )?;
        // Per shard: when this runner held it.
        let mut held: Vec<(String, String)> = Vec::new();
        for e in &self.leases {
            let at = iso8601_time(e.at);
            let text = match (e.event, &e.from) {
                ("taken", Some(from)) => format!("taken {at} (from {from})"),
                (event, _) => format!("{event} {at}"),
            };
            match held.iter_mut().find(|(s, _)| *s == e.shard_id) {
                Some((_, t)) => *t = format!("{t}, {text}"),
                None => held.push((e.shard_id.clone(), text)),
            }
        }
        for (shard, text) in held {
            writeln!(f, "    {shard}: {text}")?;
        }
        writeln!(
            f,
            "  iterator age     max {:.0} ms, last {:.0} ms",
            self.counts.iterator_age_ms_max, self.counts.iterator_age_ms_last
        )?;
        write!(
            f,
            "  delay (put->invoke) p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            self.delay_ms_p50, self.delay_ms_p95, self.delay_ms_p99, self.delay_ms_max
        )
    }
}

/// What every shard task shares.
pub(crate) struct Ctx {
    pub settings: MappingSettings,
    pub options: RunnerOptions,
    pub clients: Clients,
    pub invoker: InvokeClient,
    pub checkpoints: Checkpoints<Store>,
    pub destination: Option<destination::FailureDestination>,
    pub stats: Mutex<Stats>,
    /// Records read and not yet done, over all shards.
    pub pending: AtomicI64,
    /// Tumbling windows opened and not yet finalized.
    pub open_windows: AtomicI64,
    pub last_activity: Mutex<Instant>,
    pub started: Instant,
    /// Per shard: when the last GetRecords was made, if it found the shard caught up and empty.
    pub caught_up: Mutex<HashMap<String, Option<f64>>>,
}

impl Ctx {
    pub fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn summary(&self) -> Summary {
        let mut s = self.stats().summary();
        s.worker_id = self.options.worker_id.clone();
        s.state = if self.settings.enabled { "Enabled" } else { "Disabled" }.to_owned();
        s.polling = self.options.polling;
        s.consumer = self.settings.consumer_arn.clone();
        s
    }

    pub fn touch(&self) {
        if let Ok(mut t) = self.last_activity.lock() {
            *t = Instant::now();
        }
    }
}

/// The mapping: [`Runner::run`] runs it to the end; [`Runner::start`] runs it in the background.
pub struct Runner;

/// A mapping running in the background.
pub struct RunningMapping {
    ctx: Arc<Ctx>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), MappingError>>,
}

impl RunningMapping {
    /// What it did so far.
    pub fn summary(&self) -> Summary {
        self.ctx.summary()
    }

    /// Records read and invocations so far (cheap, unlike [`RunningMapping::summary`], which
    /// sorts every delay).
    pub fn progress(&self) -> (u64, u64) {
        let s = self.ctx.stats();
        (s.counts.records_read, s.counts.invocations)
    }

    /// Iterator age (ms) at the last batch and the largest so far.
    pub fn iterator_age_ms(&self) -> (f64, f64) {
        let s = self.ctx.stats();
        (s.counts.iterator_age_ms_last, s.counts.iterator_age_ms_max)
    }

    /// Nothing read is left undone and no tumbling window is open.
    pub fn is_idle(&self) -> bool {
        self.ctx.pending.load(Ordering::SeqCst) == 0 && self.ctx.open_windows.load(Ordering::SeqCst) == 0
    }

    /// The time (unix seconds) since which every shard being read has been found caught up and
    /// empty by its latest GetRecords: everything written before it has been read. `None` while
    /// some shard's latest read returned records (or none was made yet).
    pub fn caught_up_since(&self) -> Option<f64> {
        let c = self.ctx.caught_up.lock().ok()?;
        if c.is_empty() {
            return None;
        }
        c.values().try_fold(f64::INFINITY, |acc, v| v.map(|t| acc.min(t)))
    }

    /// Whether it stopped by itself (an error, or idle).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops it as SIGTERM stops a runner: the batches in flight finish and are checkpointed,
    /// and the leases are released for another runner to take at once.
    pub async fn stop(self) -> Result<Summary, MappingError> {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(r) => r.map(|()| self.ctx.summary()),
            Err(e) => Err(MappingError::Kinesis(format!("the mapping task failed: {e}"))),
        }
    }
}

struct ShardInfo {
    id: String,
    parents: Vec<String>,
    closed: bool,
}

async fn list_shards(clients: &Clients, stream: &str) -> Result<Vec<ShardInfo>, MappingError> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let req = clients.kinesis.list_shards();
        let req = match &token {
            Some(t) => req.next_token(t),
            None => req.stream_name(stream),
        };
        let page = req
            .send()
            .await
            .map_err(|e| MappingError::Kinesis(format!("ListShards {stream}: {}", pushpull::aws::describe(&e))))?;
        for s in page.shards() {
            out.push(ShardInfo {
                id: s.shard_id().to_owned(),
                parents: [s.parent_shard_id(), s.adjacent_parent_shard_id()]
                    .into_iter()
                    .flatten()
                    .map(str::to_owned)
                    .collect(),
                closed: s.sequence_number_range().and_then(|r| r.ending_sequence_number()).is_some(),
            });
        }
        token = page.next_token().map(str::to_owned);
        if token.is_none() {
            return Ok(out);
        }
    }
}

impl Runner {
    /// Runs the mapping until `stop` turns true (or it is idle, if so configured), and returns
    /// what it did. On `stop` the batches in flight finish, are checkpointed, and the leases are
    /// released; a runner killed instead re-delivers what was in flight after the failover time.
    pub async fn run(
        settings: MappingSettings,
        options: RunnerOptions,
        clients: Clients,
        invoker: InvokeClient,
        mut stop: watch::Receiver<bool>,
    ) -> Result<Summary, MappingError> {
        let ctx = Self::context(settings, options, clients, invoker);
        let stream = ctx.settings.stream_name().to_owned();
        let result = Self::supervise(&ctx, &stream, &mut stop).await;
        let summary = ctx.summary();
        result.map(|()| summary)
    }

    /// Starts the mapping in the background.
    pub fn start(
        settings: MappingSettings,
        options: RunnerOptions,
        clients: Clients,
        invoker: InvokeClient,
    ) -> RunningMapping {
        let ctx = Self::context(settings, options, clients, invoker);
        let (stop, mut rx) = watch::channel(false);
        let c = ctx.clone();
        let task = tokio::spawn(async move {
            let stream = c.settings.stream_name().to_owned();
            Self::supervise(&c, &stream, &mut rx).await
        });
        RunningMapping { ctx, stop, task }
    }

    fn context(settings: MappingSettings, options: RunnerOptions, clients: Clients, invoker: InvokeClient) -> Arc<Ctx> {
        // AWS names the S3 failure objects by the mapping's UUID.
        let mapping_id = settings.uuid();
        let destination =
            settings.on_failure.clone().map(|d| destination::FailureDestination::new(d, clients.clone(), mapping_id));
        let ctx = Arc::new(Ctx {
            checkpoints: Checkpoints::new(options.checkpoints.clone()),
            settings,
            options,
            clients,
            invoker,
            destination,
            stats: Mutex::new(Stats::default()),
            pending: AtomicI64::new(0),
            open_windows: AtomicI64::new(0),
            last_activity: Mutex::new(Instant::now()),
            started: Instant::now(),
            caught_up: Mutex::new(HashMap::new()),
        });
        info!(stream = ctx.settings.stream_name(), function = %ctx.settings.function_name, settings = ?ctx.settings, "mapping starting");
        ctx
    }

    async fn supervise(ctx: &Arc<Ctx>, stream: &str, stop: &mut watch::Receiver<bool>) -> Result<(), MappingError> {
        if !ctx.settings.enabled {
            // AWS: a mapping created with `Enabled: false` is in state Disabled and polls nothing.
            info!(stream, "the mapping is disabled (Enabled: false): no shard is read");
            if ctx.options.stop_when_idle.is_none() {
                let _ = stop.wait_for(|stopped| *stopped).await;
            }
            return Ok(());
        }
        let me = ctx.options.worker_id.clone();
        let failover = ctx.options.failover;
        let mut tasks: JoinSet<(String, Result<shard::ShardEnd, MappingError>)> = JoinSet::new();
        // Shards this runner reads, with the sender that asks each to hand over.
        let mut running: HashMap<String, watch::Sender<bool>> = HashMap::new();
        let mut draining: HashSet<String> = HashSet::new();
        let mut finished: HashSet<String> = HashSet::new();
        let mut seen = lease::Observed::default();
        let mut first_listing = true;
        let mut shards: Vec<ShardInfo> = Vec::new();
        let mut next_listing = Instant::now();
        let mut next_cycle = Instant::now();
        let mut evaluate = true;
        let mut awaiting: HashSet<String> = HashSet::new();
        let mut stopping = false;
        // Shards held by a runner not yet seen renewing: not idle while they may come to us.
        let mut uncertain = 0usize;
        let mut expecting = false;
        // Stopping because idle: as on `stop`, the leases are released.
        let mut idle_stop = false;
        let mut stop_deadline: Option<Instant> = None;
        let mut gone: Vec<String> = Vec::new();
        loop {
            if (*stop.borrow() || idle_stop) && !stopping {
                // Hand every shard over: in-flight batches finish, are checkpointed, and the
                // leases are released for the other runners to take at once.
                info!(shards = running.len(), "stopping: handing the shards over");
                stopping = true;
                stop_deadline = Some(Instant::now() + ctx.options.stop_grace);
                for (id, drain) in &running {
                    let _ = drain.send(true);
                    draining.insert(id.clone());
                }
                lease::heartbeat(ctx, &me, true, &[]).await;
            }
            if stopping && running.is_empty() {
                break;
            }
            if stopping && stop_deadline.is_some_and(|d| Instant::now() >= d) {
                // In-flight batches that cannot finish (a function that keeps failing, or gone):
                // stop them; their records stay after the checkpoint for the next owner.
                warn!(shards = running.len(), grace = ?ctx.options.stop_grace, "batches still in flight after the grace period; stopping them");
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                for id in running.keys() {
                    lease::release(ctx, id, &me).await;
                }
                running.clear();
                break;
            }
            if !stopping && Instant::now() >= next_listing {
                shards = list_shards(&ctx.clients, stream).await?;
                next_listing = Instant::now() + ctx.options.list_shards_every;
                evaluate = true;
            }
            if !stopping && (evaluate || Instant::now() >= next_cycle) {
                evaluate = false;
                next_cycle = Instant::now() + failover / 3;
                let workers = lease::heartbeat(ctx, &me, false, &gone).await;
                let live: Vec<String> = workers
                    .iter()
                    .filter(|(w, beat)| {
                        **w == me || (!beat.stopping && seen.is_live(&format!("worker {w}"), beat.counter, failover))
                    })
                    .map(|(w, _)| w.clone())
                    .collect();
                // Runners seen dead leave the registry with the next heartbeat (one that was only
                // slow writes itself back in).
                gone = workers.keys().filter(|w| !live.contains(w)).cloned().collect();
                let listed: HashSet<&str> = shards.iter().map(|s| s.id.as_str()).collect();
                let mut candidates = Vec::new();
                let mut others: HashMap<String, usize> = HashMap::new();
                uncertain = 0;
                for s in &shards {
                    if running.contains_key(&s.id) || finished.contains(&s.id) {
                        continue;
                    }
                    // A parent still in the stream finishes before its children start.
                    if s.parents.iter().any(|p| listed.contains(p.as_str()) && !finished.contains(p)) {
                        continue;
                    }
                    let progress =
                        progress::Progress::load(ctx.checkpoints.clone(), &ctx.options.checkpoint_prefix, &s.id)
                            .await
                            .map_err(|source| MappingError::Checkpoint { shard_id: s.id.clone(), source })?;
                    if progress.saved().finished {
                        finished.insert(s.id.clone());
                        evaluate = true;
                        continue;
                    }
                    let saved = progress.saved();
                    let key = format!("shard {}", s.id);
                    match &saved.owner {
                        Some(owner) if *owner != me && seen.is_live(&key, saved.lease_counter, failover) => {
                            if !seen.changed_since_first_seen(&key) {
                                uncertain += 1;
                            }
                            *others.entry(owner.clone()).or_default() += 1;
                        }
                        _ => candidates.push((s, progress)),
                    }
                }
                let held = running.len() - draining.len();
                let total = held + candidates.len() + others.values().sum::<usize>();
                let target = total.div_ceil(live.len().max(1));
                let mut take = target.saturating_sub(held);
                for (s, mut progress) in candidates {
                    if take == 0 {
                        break;
                    }
                    let from = progress.saved().owner.clone().filter(|o| *o != me);
                    match progress.acquire(&me, &s.parents).await {
                        Ok(()) => {}
                        Err(pushpull::checkpoint::CheckpointError::Conflict { .. }) => continue, // another runner was first
                        Err(source) => return Err(MappingError::Checkpoint { shard_id: s.id.clone(), source }),
                    }
                    take -= 1;
                    {
                        let mut st = ctx.stats();
                        st.counts.leases_taken += 1;
                        st.counts.lease_takeovers += u64::from(from.is_some());
                        st.leases.push(LeaseEvent {
                            shard_id: s.id.clone(),
                            event: "taken",
                            from: from.clone(),
                            at: now_unix(),
                        });
                    }
                    info!(shard_id = %s.id, from = ?from, "lease taken");
                    let Some(start) = Self::start_position(ctx, s, &listed, &mut progress, first_listing).await? else {
                        finished.insert(s.id.clone());
                        evaluate = true;
                        continue;
                    };
                    // Not caught up until its first read says so.
                    if let Ok(mut c) = ctx.caught_up.lock() {
                        c.insert(s.id.clone(), None);
                    }
                    ctx.stats().counts.shards_started += 1;
                    let (drain_tx, drain_rx) = watch::channel(false);
                    running.insert(s.id.clone(), drain_tx);
                    let (ctx2, id) = (ctx.clone(), s.id.clone());
                    tasks.spawn(async move {
                        let r = shard::run(ctx2, id.clone(), progress, start, drain_rx).await;
                        (id, r)
                    });
                }
                // Too many here, or a runner two or more below: hand one shard over (at most one a
                // cycle, so shards do not bounce); whoever is below its share takes it.
                let mine = running.len() - draining.len();
                // Another runner will hand a shard over to us: not idle yet.
                expecting = others.values().any(|&n| n > target || n > mine + 1);
                let below =
                    live.iter().filter(|w| **w != me).any(|w| others.get(w.as_str()).copied().unwrap_or(0) + 1 < mine);
                if draining.is_empty() && take == 0 && (mine > target || below) {
                    let victim = running.keys().filter(|id| !draining.contains(*id)).max().cloned();
                    if let Some(id) = victim {
                        info!(shard_id = %id, mine, target, workers = live.len(), "rebalancing: handing a shard over");
                        if let Some(d) = running.get(&id) {
                            let _ = d.send(true);
                        }
                        draining.insert(id);
                    }
                }
                first_listing = false;
                // A shard read to its end counts as not caught up until its children run: the
                // records written after a split are in shards not read yet.
                awaiting.retain(|id| {
                    let waiting = shards
                        .iter()
                        .any(|c| c.parents.contains(id) && !running.contains_key(&c.id) && !finished.contains(&c.id));
                    if !waiting && let Ok(mut c) = ctx.caught_up.lock() {
                        c.remove(id);
                    }
                    waiting
                });
            }
            let idle_check = ctx.options.stop_when_idle;
            tokio::select! {
                joined = tasks.join_next(), if !tasks.is_empty() => match joined {
                    Some(Ok((id, Ok(shard::ShardEnd::Finished)))) => {
                        info!(shard_id = %id, "shard finished");
                        running.remove(&id);
                        draining.remove(&id);
                        finished.insert(id.clone());
                        awaiting.insert(id.clone());
                        // List again now: its children (if it was split or merged) start at once.
                        next_listing = Instant::now();
                        let mut st = ctx.stats();
                        st.counts.shards_finished += 1;
                        st.leases.push(LeaseEvent { shard_id: id, event: "finished", from: None, at: now_unix() });
                        evaluate = true;
                    }
                    Some(Ok((id, end @ (Ok(shard::ShardEnd::HandedOver) | Err(MappingError::LeaseLost { .. }))))) => {
                        // No longer this runner's shard: released, or taken by another runner.
                        running.remove(&id);
                        draining.remove(&id);
                        if let Ok(mut c) = ctx.caught_up.lock() {
                            c.remove(&id);
                        }
                        let mut st = ctx.stats();
                        let event = if end.is_ok() {
                            st.counts.leases_released += 1;
                            "released"
                        } else {
                            warn!(shard_id = %id, "lease lost to another runner: stopped reading the shard");
                            st.counts.leases_lost += 1;
                            "lost"
                        };
                        st.leases.push(LeaseEvent { shard_id: id, event, from: None, at: now_unix() });
                    }
                    Some(Ok((id, Err(e)))) => {
                        warn!(shard_id = %id, error = %e, "shard stopped");
                        tasks.abort_all();
                        return Err(e);
                    }
                    Some(Err(join)) => {
                        tasks.abort_all();
                        return Err(MappingError::Kinesis(format!("a shard task failed: {join}")));
                    }
                    None => {}
                },
                _ = tokio::time::sleep_until(next_listing.min(next_cycle).into()), if !stopping => {}
                _ = tokio::time::sleep_until(stop_deadline.unwrap_or(next_cycle).into()), if stopping => {}
                _ = stop.changed(), if !stopping => {}
                _ = tokio::time::sleep(Duration::from_millis(100)), if idle_check.is_some() && !stopping => {
                    if let Some(idle) = idle_check && uncertain == 0 && !expecting && Self::idle_for(ctx, &running, idle) {
                        info!("every shard is caught up and idle; stopping");
                        idle_stop = true;
                    }
                }
            }
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        if stopping {
            lease::leave(ctx, &me).await;
        }
        Ok(())
    }

    /// Where a shard whose lease was just taken starts: its checkpoint, or the starting position.
    /// `None`: with LATEST, a shard closed before the mapping started is finished at once (so that
    /// its children start at LATEST too, after a restart as well).
    async fn start_position(
        ctx: &Ctx,
        s: &ShardInfo,
        listed: &HashSet<&str>,
        progress: &mut progress::Progress,
        first_listing: bool,
    ) -> Result<Option<StartingPosition>, MappingError> {
        let saved = progress.saved();
        let unread = saved.after.is_none() && saved.since.is_none();
        Ok(Some(match ctx.settings.starting_position {
            StartingPosition::Latest if unread => {
                if first_listing && s.closed {
                    progress.finish();
                    progress.save().await.map_err(|source| MappingError::checkpoint(&s.id, source))?;
                    return Ok(None);
                }
                // A child of a shard this mapping read starts at its beginning.
                let mut read_parent = false;
                for p in s.parents.iter().filter(|p| listed.contains(p.as_str())) {
                    let pp = progress::Progress::load(ctx.checkpoints.clone(), &ctx.options.checkpoint_prefix, p)
                        .await
                        .map_err(|source| MappingError::Checkpoint { shard_id: p.clone(), source })?;
                    read_parent |= pp.saved().after.is_some() || pp.saved().since.is_some();
                }
                if read_parent { StartingPosition::TrimHorizon } else { StartingPosition::Latest }
            }
            p => p,
        }))
    }

    fn idle_for(ctx: &Ctx, running: &HashMap<String, watch::Sender<bool>>, idle: Duration) -> bool {
        if ctx.pending.load(Ordering::SeqCst) > 0 || ctx.open_windows.load(Ordering::SeqCst) > 0 {
            return false;
        }
        let caught_up = ctx
            .caught_up
            .lock()
            .map(|c| running.keys().all(|s| c.get(s).copied().flatten().is_some()))
            .unwrap_or(false);
        let quiet = ctx.last_activity.lock().map(|t| t.elapsed() >= idle).unwrap_or(false);
        caught_up && quiet
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_keep_their_percentiles_in_bounded_space() {
        let mut d = Delays::default();
        assert_eq!((d.count(), d.quantile_ms(0.5), d.max_ms()), (0, 0.0, 0.0));
        // 1 ms .. 1,000 ms, 1,000 times over: a million records.
        for _ in 0..1_000 {
            for ms in 1..=1_000 {
                d.record(f64::from(ms));
            }
        }
        d.record(-5.0); // clock skew: counted as 0
        assert_eq!(d.count(), 1_000_001);
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(near(d.quantile_ms(0.5), 500.0), "{}", d.quantile_ms(0.5));
        assert!(near(d.quantile_ms(0.99), 990.0), "{}", d.quantile_ms(0.99));
        assert!(near(d.max_ms(), 1_000.0), "{}", d.max_ms());
        // The counts array, not the records, sets the size: about 11,000 buckets (90 KB) for
        // values up to a second, growing by about 2,000 per doubling of the largest value.
        assert!(d.0.distinct_values() < 20_000, "{}", d.0.distinct_values());
    }
}
