//! Local event source mappings: poll a source and invoke a function through the Invoke API with
//! the semantics of AWS's mappings (aws-semantics.md).
//!
//! **The core** knows no broker. A source hands it the records it read from one of its
//! partitions (`intake`); per partition, `ParallelizationFactor` lanes (`lane`) batch them
//! (BatchSize, the batching window, the 6 MB payload, tumbling-window boundaries), invoke, judge
//! the answer by the partial batch response rule ([`outcome::judge`]), retry
//! (MaximumRetryAttempts), bisect (BisectBatchOnFunctionError), expire
//! (MaximumRecordAgeInSeconds) and hand what is given up to the OnFailure destination
//! ([`destination`]); records are committed through the source's [`source::Partition`]. Leases
//! among several runners follow a pure plan ([`plan`]). Every timer runs on tokio's clock
//! ([`clock`]), so the core's rules are unit tests under paused time.
//!
//! **The Kinesis source** (`kinesis`): one reader per shard (GetRecords at most 5 times a
//! second, again at once while behind, once a second when caught up; or SubscribeToShard through
//! a stream consumer), records to lanes by partition key so order holds per key, the position per
//! shard checkpointed ([`progress`]) and leased among runners; parents finish before children.
//!
//! A next source (a Kafka partition's offset, a RabbitMQ delivery tag, an SQS receipt handle) is
//! a module beside `kinesis` implementing [`source::Partition`].
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use pushpull::checkpoint::Checkpoints;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::invoke::Invoker;

pub mod clock;
pub mod destination;
pub mod event;
pub mod filter;
pub mod identity;
mod intake;
pub mod kafka;
pub(crate) mod kinesis;
pub(crate) mod lane;
mod lease;
mod options;
pub mod outcome;
pub mod plan;
pub mod progress;
pub mod rabbitmq;
pub mod redis_streams;
#[cfg(test)]
mod rules;
pub mod settings;
pub mod source;
pub mod sqs;
mod stats;
#[cfg(test)]
pub(crate) mod testkit;

pub use clock::now_unix;
pub use kafka::{GroupEvent, GroupView};
pub use options::{Delivered, Polling, RunnerOptions, default_worker_id};
pub use settings::{
    Destination, KafkaSource, MappingSettings, MqEvent, RabbitMqSource, RawSettings, RedisStreamSource, SqsSource,
    StartingPosition,
};
use stats::Stats;
pub use stats::{Counts, LeaseEvent, Summary};

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
    /// The Kafka consumer failed for good (no broker, topic gone, bad configuration).
    #[error("{0}")]
    Kafka(String),
    /// The RabbitMQ consumer failed for good (no broker, queue gone, refused credentials).
    #[error("{0}")]
    RabbitMq(String),
    /// SQS refused the mapping for good (no such queue, no access).
    #[error("{0}")]
    Sqs(String),
    /// Redis refused the mapping for good (a key of another type, a bad URL).
    #[error("{0}")]
    Redis(String),
    /// A lane's task failed (it panicked or was cancelled).
    #[error("a lane of {partition} failed: {reason}")]
    Lane {
        /// The partition.
        partition: String,
        /// What the task's join said.
        reason: String,
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

/// What the core shares among a mapping's partitions and lanes; it holds no source's client.
pub(crate) struct Ctx {
    pub settings: MappingSettings,
    pub options: RunnerOptions,
    pub invoker: Arc<dyn Invoker>,
    pub destination: Option<Arc<dyn destination::FailureSink>>,
    pub stats: Mutex<Stats>,
    /// Records read and not yet done, over all shards.
    pub pending: AtomicI64,
    /// Tumbling windows opened and not yet finalized.
    pub open_windows: AtomicI64,
    pub last_activity: Mutex<clock::Instant>,
    pub started: clock::Instant,
    /// Per partition: when the last read was made, if it found the partition caught up and empty.
    pub caught_up: Mutex<HashMap<String, Option<f64>>>,
    /// A Kafka mapping's view of its consumer group (for the summary).
    pub group: Mutex<Option<Arc<Mutex<kafka::GroupView>>>>,
    /// Invocations the mapping may have in flight at once, over all its partitions (a Kafka
    /// mapping in provisioned mode: [`MappingSettings::invocation_slots`]); `None`: one per lane.
    pub invocation_slots: Option<Arc<tokio::sync::Semaphore>>,
}

impl Ctx {
    /// Whether the source is a Kafka topic (its mapping publishes OffsetLag, not IteratorAge).
    pub(crate) fn is_kafka(&self) -> bool {
        self.group.lock().is_ok_and(|g| g.is_some())
    }

    /// Whether it reads a stream (Kinesis, DynamoDB), which AWS publishes `IteratorAge` for: not
    /// a Kafka topic, not an Amazon MQ or SQS queue.
    pub(crate) fn reads_a_stream(&self) -> bool {
        let arn = self.settings.event_source_arn();
        !self.is_kafka()
            && !arn.starts_with("arn:aws:mq:")
            && !arn.starts_with("arn:aws:sqs:")
            && !arn.starts_with("pushpull:redis:")
    }

    /// Returns once `stop` turns true or, if the mapping stops when idle, once it has been idle
    /// that long ([`Ctx::idle_for`]): a queue mapping's watchdog.
    pub(crate) async fn stopped_or_idle(&self, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = stop.changed() => if *stop.borrow() { return },
                () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {
                    if let Some(idle) = self.options.stop_when_idle
                        && self.idle_for(idle)
                    {
                        info!("the queue is empty and the mapping idle; stopping");
                        return;
                    }
                }
            }
        }
    }

    /// A queue mapping has nothing left to do: nothing read is undone, every partition was last
    /// found caught up, and nothing happened for `idle`.
    pub(crate) fn idle_for(&self, idle: std::time::Duration) -> bool {
        if self.pending.load(Ordering::SeqCst) > 0 {
            return false;
        }
        let caught_up =
            self.caught_up.lock().map(|c| !c.is_empty() && c.values().all(Option::is_some)).unwrap_or(false);
        let quiet = self.last_activity.lock().map(|t| t.elapsed() >= idle).unwrap_or(false);
        caught_up && quiet
    }

    /// The core's context for `settings`, invoking through `invoker` and giving up to
    /// `destination`.
    pub fn new(
        settings: MappingSettings,
        options: RunnerOptions,
        invoker: Arc<dyn Invoker>,
        destination: Option<Arc<dyn destination::FailureSink>>,
    ) -> Self {
        let now = clock::Instant::now();
        let settings_slots = settings.invocation_slots().map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
        Ctx {
            settings,
            options,
            invoker,
            destination,
            stats: Mutex::new(Stats::default()),
            pending: AtomicI64::new(0),
            open_windows: AtomicI64::new(0),
            last_activity: Mutex::new(now),
            started: now,
            caught_up: Mutex::new(HashMap::new()),
            group: Mutex::new(None),
            invocation_slots: settings_slots,
        }
    }

    pub fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn summary(&self) -> Summary {
        let mut s = self.stats().summary();
        s.worker_id = self.options.worker_id.clone();
        s.state = if self.settings.enabled { "Enabled" } else { "Disabled" }.to_owned();
        s.polling = self.options.polling;
        s.parallelization_factor = self.settings.parallelization_factor;
        s.consumer = self.settings.consumer_arn.clone();
        s.mapping_uuid = self.settings.uuid();
        s.group = self.group.lock().ok().and_then(|g| g.as_ref().and_then(|g| g.lock().ok().map(|g| g.clone())));
        let source = self.settings.event_source_arn();
        s.amazon_mq = source.starts_with("arn:aws:mq:").then(|| source.to_owned());
        s.sqs = source.starts_with("arn:aws:sqs:").then(|| source.to_owned());
        s
    }

    pub fn touch(&self) {
        if let Ok(mut t) = self.last_activity.lock() {
            *t = clock::Instant::now();
        }
    }
}

/// The mapping: [`Runner::run`] runs it to the end; [`Runner::start`] runs it in the background.
pub struct Runner;

impl Runner {
    /// Runs the mapping until `stop` turns true (or it is idle, if so configured), and returns
    /// what it did. On `stop` the batches in flight finish, are checkpointed, and the leases are
    /// released; a runner killed instead re-delivers what was in flight after the failover time.
    pub async fn run(
        settings: MappingSettings,
        options: RunnerOptions,
        clients: Clients,
        invoker: impl Invoker,
        mut stop: watch::Receiver<bool>,
    ) -> Result<Summary, MappingError> {
        let src = Self::kinesis(settings, options, clients, Arc::new(invoker));
        let result = kinesis::supervisor::supervise(&src, &mut stop).await;
        let summary = src.core.summary();
        result.map(|()| summary)
    }

    /// Starts the mapping in the background.
    pub fn start(
        settings: MappingSettings,
        options: RunnerOptions,
        clients: Clients,
        invoker: impl Invoker,
    ) -> RunningMapping {
        let src = Self::kinesis(settings, options, clients, Arc::new(invoker));
        let (stop, mut rx) = watch::channel(false);
        let ctx = src.core.clone();
        let task = tokio::spawn(async move { kinesis::supervisor::supervise(&src, &mut rx).await });
        RunningMapping { ctx, stop, task }
    }

    /// Runs a Kafka mapping on `source` until `stop` turns true (or it is idle, if so
    /// configured): a member of its consumer group ([`kafka`]).
    pub async fn run_kafka(
        settings: MappingSettings,
        source: KafkaSource,
        options: RunnerOptions,
        clients: Clients,
        invoker: impl Invoker,
        stop: watch::Receiver<bool>,
    ) -> Result<Summary, MappingError> {
        let ctx = Self::core(settings, options, clients, Arc::new(invoker));
        let result = kafka::run(ctx.clone(), source, stop).await;
        let summary = ctx.summary();
        result.map(|()| summary)
    }

    /// Runs an Amazon MQ for RabbitMQ mapping on `source` until `stop` turns true (or it is idle,
    /// if so configured), and says what it did ([`rabbitmq`]).
    pub async fn run_rabbitmq(
        settings: MappingSettings,
        source: RabbitMqSource,
        options: RunnerOptions,
        clients: Clients,
        invoker: impl Invoker,
        stop: watch::Receiver<bool>,
    ) -> Result<Summary, MappingError> {
        let ctx = Self::core(settings, options, clients, Arc::new(invoker));
        let result = rabbitmq::run(ctx.clone(), source, stop).await;
        let summary = ctx.summary();
        result.map(|()| summary)
    }

    /// Runs an SQS mapping on `source` until `stop` turns true (or it is idle, if so configured),
    /// and says what it did ([`sqs`]).
    pub async fn run_sqs(
        settings: MappingSettings,
        source: SqsSource,
        options: RunnerOptions,
        clients: Clients,
        invoker: impl Invoker,
        stop: watch::Receiver<bool>,
    ) -> Result<Summary, MappingError> {
        let sqs = clients.sqs.clone();
        let ctx = Self::core(settings, options, clients, Arc::new(invoker));
        let result = sqs::run(ctx.clone(), sqs, source, stop).await;
        let summary = ctx.summary();
        result.map(|()| summary)
    }

    /// Runs a Redis Streams mapping on `source` until `stop` turns true (or it is idle, if so
    /// configured), and says what it did ([`redis_streams`]).
    pub async fn run_redis_streams(
        settings: MappingSettings,
        source: RedisStreamSource,
        options: RunnerOptions,
        clients: Clients,
        invoker: impl Invoker,
        stop: watch::Receiver<bool>,
    ) -> Result<Summary, MappingError> {
        let ctx = Self::core(settings, options, clients, Arc::new(invoker));
        let result = redis_streams::run(ctx.clone(), source, stop).await;
        let summary = ctx.summary();
        result.map(|()| summary)
    }

    /// Starts a Redis Streams mapping in the background.
    pub fn start_redis_streams(
        settings: MappingSettings,
        source: RedisStreamSource,
        options: RunnerOptions,
        clients: Clients,
        invoker: impl Invoker,
    ) -> RunningMapping {
        let ctx = Self::core(settings, options, clients, Arc::new(invoker));
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(redis_streams::run(ctx.clone(), source, rx));
        RunningMapping { ctx, stop, task }
    }

    /// Starts an SQS mapping in the background.
    pub fn start_sqs(
        settings: MappingSettings,
        source: SqsSource,
        options: RunnerOptions,
        clients: Clients,
        invoker: impl Invoker,
    ) -> RunningMapping {
        let sqs = clients.sqs.clone();
        let ctx = Self::core(settings, options, clients, Arc::new(invoker));
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(sqs::run(ctx.clone(), sqs, source, rx));
        RunningMapping { ctx, stop, task }
    }

    /// Starts an Amazon MQ for RabbitMQ mapping in the background.
    pub fn start_rabbitmq(
        settings: MappingSettings,
        source: RabbitMqSource,
        options: RunnerOptions,
        clients: Clients,
        invoker: impl Invoker,
    ) -> RunningMapping {
        let ctx = Self::core(settings, options, clients, Arc::new(invoker));
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(rabbitmq::run(ctx.clone(), source, rx));
        RunningMapping { ctx, stop, task }
    }

    /// Starts a Kafka mapping in the background.
    pub fn start_kafka(
        settings: MappingSettings,
        source: KafkaSource,
        options: RunnerOptions,
        clients: Clients,
        invoker: impl Invoker,
    ) -> RunningMapping {
        let ctx = Self::core(settings, options, clients, Arc::new(invoker));
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(kafka::run(ctx.clone(), source, rx));
        RunningMapping { ctx, stop, task }
    }

    /// The core's context, with the failure destination of `settings`.
    fn core(
        settings: MappingSettings,
        options: RunnerOptions,
        clients: Clients,
        invoker: Arc<dyn Invoker>,
    ) -> Arc<Ctx> {
        let mapping_id = settings.uuid();
        let destination = settings.on_failure.clone().map(|d| {
            Arc::new(destination::FailureDestination::new(d, clients, mapping_id)) as Arc<dyn destination::FailureSink>
        });
        info!(source = settings.event_source_arn(), function = %settings.function_name, settings = ?settings, "mapping starting");
        Arc::new(Ctx::new(settings, options, invoker, destination))
    }

    fn kinesis(
        settings: MappingSettings,
        options: RunnerOptions,
        clients: Clients,
        invoker: Arc<dyn Invoker>,
    ) -> Arc<kinesis::Kinesis> {
        // AWS names the S3 failure objects by the mapping's UUID.
        let mapping_id = settings.uuid();
        let destination = settings.on_failure.clone().map(|d| {
            Arc::new(destination::FailureDestination::new(d, clients.clone(), mapping_id))
                as Arc<dyn destination::FailureSink>
        });
        let named = settings.filter.metadata_keys();
        if !named.is_empty() {
            warn!(keys = ?named, "FilterCriteria names keys other than data; AWS (with-kinesis-filtering): \"Kinesis event source mappings only support filtering on the data key\": a pattern on them matches no record");
        }
        let checkpoints = Checkpoints::new(options.checkpoints.clone());
        let core = Arc::new(Ctx::new(settings, options, invoker, destination));
        info!(stream = core.settings.stream_name(), function = %core.settings.function_name, settings = ?core.settings, "mapping starting");
        Arc::new(kinesis::Kinesis { core, client: clients.kinesis, checkpoints })
    }
}

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

    /// How many shards or partitions it reads now (a Kafka member: those its group assigned it).
    pub fn reading(&self) -> usize {
        self.ctx.caught_up.lock().map_or(0, |c| c.len())
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
