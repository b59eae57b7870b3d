//! How a runner behaves beyond the mapping's own settings: polling cadence, retry backoff,
//! leases, the idle stop.
use std::time::Duration;

use pushpull::store::Store;

use super::MappingSettings;

/// How the runner behaves beyond the mapping's own settings.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// Where shard positions are checkpointed.
    pub checkpoints: Store,
    /// Key prefix of this mapping's checkpoints (default `esm/<function>/<stream>/<mapping UUID>`:
    /// positions belong to one mapping, [`MappingSettings::uuid`]).
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
    /// A Kafka mapping dials these (`host:port,...`) instead of its bootstrap servers: the realism
    /// layer's proxy in front of them ([`crate::realism::kafka`]). Its events still name the
    /// bootstrap servers, as AWS's name the mapping's.
    pub kafka_via: Option<String>,
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
            checkpoint_prefix: format!("esm/{}/{}/{}", settings.function_name, settings.stream_name(), settings.uuid()),
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
            kafka_via: None,
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
