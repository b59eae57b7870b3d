//! `--broker redis-streams` and `--broker redis-pubsub`: the sample pipeline through Redis. Redis is
//! no Lambda event source: locally, what a team would run beside its functions stands in for one
//! (the Streams mapping, `pushpull_local::mapping::redis_streams`; the pub/sub relay,
//! `pushpull_local::relay`). The template's functions are used as they are (its Kinesis variant);
//! the push function's environment names the Redis stream or channel instead of the stream.
use std::time::Duration;

use crate::mapping::{MappingError, RunningMapping, Summary};
use crate::relay::{RelayCounts, RunningRelay};

use super::{PipelineError, QueueRun};

/// How a `--broker redis-*` run goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisBroker {
    /// `redis://host:port/`.
    pub url: String,
    /// Pub/sub (the relay) rather than a stream (the Streams mapping).
    pub pubsub: bool,
    /// `--overload`: the rollup function made slower than the publisher
    /// ([`OVERLOAD_FUNCTION_DELAY`]) and Redis's buffer for a slow pub/sub subscriber small
    /// ([`OVERLOAD_PUBSUB_LIMIT`]), so that the cut comes within seconds.
    pub overload: bool,
    /// `infra/redis.sh`, which sets the pub/sub limit of the server it started (`None`: another
    /// server, left as it is).
    pub control: Option<std::path::PathBuf>,
}

/// `--overload`: every rollup invocation waits this long first (`PUSHPULL_INJECT_DELAY_MS`); with
/// one invocation at a time ([`OVERLOAD_CONCURRENCY`]) the relay takes under 500 messages a second,
/// a fifth of what the push function publishes.
pub const OVERLOAD_FUNCTION_DELAY: Duration = Duration::from_millis(200);
/// `--overload`: the relay's slots (the function's reserved concurrency).
pub const OVERLOAD_CONCURRENCY: usize = 1;
/// `--overload`: `client-output-buffer-limit pubsub` (hard, soft, soft seconds): past 64 KB for a
/// second, or past 256 KB at once, Redis cuts the subscriber off.
pub const OVERLOAD_PUBSUB_LIMIT: [&str; 3] = ["256kb", "64kb", "1"];
/// Redis's default `client-output-buffer-limit pubsub`, set back after an overload run.
pub const DEFAULT_PUBSUB_LIMIT: [&str; 3] = ["32mb", "8mb", "60"];
/// `--overload`: the input this many times over.
pub const OVERLOAD_COPIES: usize = 8;

/// `--overload`'s input: every file of `input_dir` [`OVERLOAD_COPIES`] times, under names of their
/// own (`copy-<n>-<name>`), in `<run_dir>/overload-input` (the sample's 1,250 lines become 10,000:
/// about 1 MB on the wire, far past what the kernels' socket buffers and Redis's overload limit
/// for a slow subscriber hold together).
pub(super) fn overload_input(
    input_dir: &std::path::Path,
    run_dir: &std::path::Path,
) -> Result<std::path::PathBuf, PipelineError> {
    let out = run_dir.join("overload-input");
    let io = |what: String| move |e| PipelineError::io(what, e);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).map_err(io(out.display().to_string()))?;
    for entry in std::fs::read_dir(input_dir).map_err(io(input_dir.display().to_string()))? {
        let path = entry.map_err(io(input_dir.display().to_string()))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).filter(|_| path.is_file()) else { continue };
        for n in 0..OVERLOAD_COPIES {
            let to = out.join(format!("copy-{n}-{name}"));
            std::fs::copy(&path, &to).map_err(io(to.display().to_string()))?;
        }
    }
    Ok(out)
}

/// Invocations at once: the relay's slots, the function's reserved concurrency.
pub const RELAY_CONCURRENCY: usize = 4;

/// What a Redis run did, besides the queue's figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisRun {
    /// The stream or channel: `url`, `queue` (its name), `dead_letters` (a stream's dead-letter
    /// stream), `deliveries`, `left` (a stream's entries unread or pending), `dead_lettered`.
    pub queue: QueueRun,
    /// Pub/sub rather than a stream.
    pub pubsub: bool,
    /// Records the push function sent.
    pub published: u64,
    /// Published and never delivered (pub/sub: at most once).
    pub lost: u64,
    /// Times Redis cut the relay off (pub/sub).
    pub disconnects: u64,
}

/// What reads the records: a mapping, or the relay.
pub(super) enum Reader {
    Mapping(RunningMapping),
    Relay(RunningRelay),
}

/// The relay is done once nothing happened for this long.
const RELAY_IDLE: Duration = Duration::from_secs(2);

impl Reader {
    pub(super) fn progress(&self) -> (u64, u64) {
        match self {
            Reader::Mapping(m) => m.progress(),
            Reader::Relay(r) => {
                let c = r.counts();
                (c.received, c.invocations)
            }
        }
    }

    pub(super) fn iterator_age_ms(&self) -> (f64, f64) {
        match self {
            Reader::Mapping(m) => m.iterator_age_ms(),
            Reader::Relay(_) => (0.0, 0.0),
        }
    }

    /// The relay: now, once it has been idle [`RELAY_IDLE`] (what was published was read).
    pub(super) fn caught_up_since(&self) -> Option<f64> {
        match self {
            Reader::Mapping(m) => m.caught_up_since(),
            Reader::Relay(r) => r.is_idle_for(RELAY_IDLE).then(crate::mapping::now_unix),
        }
    }

    pub(super) fn is_idle(&self) -> bool {
        match self {
            Reader::Mapping(m) => m.is_idle(),
            Reader::Relay(r) => r.is_idle_for(RELAY_IDLE),
        }
    }

    pub(super) fn reading(&self) -> usize {
        match self {
            Reader::Mapping(m) => m.reading(),
            Reader::Relay(_) => 1,
        }
    }

    pub(super) fn is_finished(&self) -> bool {
        match self {
            Reader::Mapping(m) => m.is_finished(),
            Reader::Relay(_) => false,
        }
    }

    /// Stops it: the mapping's summary, or the relay's counts as one.
    pub(super) async fn stop(self) -> (Result<Summary, MappingError>, Option<RelayCounts>) {
        match self {
            Reader::Mapping(m) => (m.stop().await, None),
            Reader::Relay(r) => {
                let c = r.stop().await;
                let mut s = Summary::default();
                s.counts.records_read = c.received;
                s.counts.invocations = c.invocations;
                s.counts.function_errors = c.function_errors;
                s.counts.throttles = c.throttles;
                s.counts.reconnects = c.disconnects;
                s.counts.batch_size_min = u32::from(c.received > 0);
                s.counts.batch_size_max = u32::from(c.received > 0);
                s.records_delivered = c.delivered;
                s.batch_size_mean = if c.received > 0 { 1.0 } else { 0.0 };
                [s.delay_ms_p50, s.delay_ms_p99, s.delay_ms_max] = c.delay_ms;
                s.state = "Enabled".into();
                (Ok(s), Some(c))
            }
        }
    }
}

/// `infra/redis.sh ARGS...` on the run's server (its port from `url`).
pub(super) fn control(script: &std::path::Path, url: &str, args: &[&str]) -> Result<(), PipelineError> {
    let port = url.trim_end_matches('/').rsplit(':').next().filter(|p| p.parse::<u16>().is_ok()).unwrap_or("6390");
    let status = std::process::Command::new(script)
        .args(args)
        .env("REDIS_PORT", port)
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| PipelineError::io(format!("{} {args:?}", script.display()), e))?;
    if !status.success() {
        return Err(PipelineError::Run(format!("{} {args:?} failed", script.display())));
    }
    Ok(())
}

/// What a stream holds for `group` still to handle (unread and pending), and how many entries its
/// dead-letter stream holds.
pub(super) async fn stream_left(url: &str, stream: &str, group: &str, dead: &str) -> Result<(u32, u32), PipelineError> {
    let err = |e: redis::RedisError| PipelineError::Run(format!("Redis at {url}, stream {stream}: {e}"));
    let client = redis::Client::open(url).map_err(err)?;
    let mut c = client.get_multiplexed_async_connection().await.map_err(err)?;
    let groups: redis::streams::StreamInfoGroupsReply =
        redis::cmd("XINFO").arg("GROUPS").arg(stream).query_async(&mut c).await.map_err(err)?;
    let left = groups.groups.iter().find(|g| g.name == group).map_or(0, |g| g.pending + g.lag.unwrap_or(0));
    let dead: u64 = redis::cmd("XLEN").arg(dead).query_async(&mut c).await.map_err(err)?;
    Ok((left as u32, dead as u32))
}
