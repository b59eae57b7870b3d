//! The Redis sink (feature `redis-sink`): records into a Redis stream (`XADD`) or onto a pub/sub
//! channel (`PUBLISH`), one pipelined round trip a call.
//!
//! - **A stream** keeps what it is given: each record an entry with the fields `data`,
//!   `pushpull-key` (the partition key) and `pushpull-origin` (the line it came from,
//!   [`crate::message_name::message_id`]: the same on every resend, so a consumer counts each line
//!   once). A call's entries enter the stream in its order; Redis gives each its id.
//! - **A channel** keeps nothing: `PUBLISH` hands the data to whoever is subscribed at that moment
//!   and forgets it. Redis (pubsub docs): "Pub/Sub exhibits at-most-once message delivery
//!   semantics": a message published while no one listens, or to a subscriber Redis disconnects
//!   for reading too slowly (`client-output-buffer-limit pubsub`), is lost, and no error says so.
//!   The message is the record's data alone (a channel has no fields); `PUBLISH`'s answer (how
//!   many subscribers got it) is counted in [`RedisSink::unheard`] when it is 0.
//! - **Failures**: a connection that fails fails the whole call (retryable; the next call connects
//!   again); a stream that refuses an entry (`WRONGTYPE`: the key is not a stream) fails the call,
//!   not retryable, naming the key. Redis keeps no record of what a failed pipeline wrote before
//!   it failed, so a resent call may add entries twice: the names tell them apart.
//!
//! ```no_run
//! # async fn f() -> Result<(), pushpull::sink::SinkError> {
//! use pushpull::sink::redis::{RedisSink, RedisTarget};
//! use pushpull::sink::{OutRecord, RecordSink};
//! let sink = RedisSink::connect("redis://127.0.0.1:6390/", RedisTarget::Stream("records".into())).await?;
//! let outcome = sink.put_records(&[OutRecord::keyed("customer-7", "{\"total\": 3}")]).await?;
//! assert!(outcome.failed.is_empty());
//! # Ok(())
//! # }
//! ```
use std::sync::atomic::{AtomicU64, Ordering};

use redis::aio::MultiplexedConnection;
use tokio::sync::Mutex;

use super::{OutRecord, PutOutcome, RecordSink, SinkError};
use crate::message_name::message_id;

#[doc(inline)]
pub use crate::pull::redis::{DATA_FIELD, ORIGIN_FIELD, PARTITION_KEY_FIELD};

/// How long one call waits for Redis before it fails (retryable) and the connection is dropped.
const CALL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);

/// Where the records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// A stream (`XADD key * data ...`).
    Stream(String),
    /// A pub/sub channel (`PUBLISH channel data`).
    Channel(String),
}

impl RedisTarget {
    /// The stream's or the channel's name.
    pub fn name(&self) -> &str {
        match self {
            RedisTarget::Stream(n) | RedisTarget::Channel(n) => n,
        }
    }
}

impl std::fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisTarget::Stream(n) => write!(f, "stream {n}"),
            RedisTarget::Channel(n) => write!(f, "channel {n}"),
        }
    }
}

/// Records into one Redis stream or channel.
pub struct RedisSink {
    client: redis::Client,
    url: String,
    target: RedisTarget,
    open: Mutex<Option<MultiplexedConnection>>,
    unheard: AtomicU64,
}

impl std::fmt::Debug for RedisSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSink").field("url", &self.url).field("target", &self.target).finish()
    }
}

fn error(what: String, e: redis::RedisError) -> SinkError {
    let retryable = e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal();
    SinkError::new(format!("{what}: {e}"), retryable).with_source(e)
}

impl RedisSink {
    /// Connects to the Redis at `url` (`redis://host:port/db`). A URL Redis cannot be reached at is
    /// refused here, not at the first record.
    pub async fn connect(url: &str, target: RedisTarget) -> Result<Self, SinkError> {
        let client = redis::Client::open(url)
            .map_err(|e| SinkError::new(format!("Redis URL {url}: {e}"), false).with_source(e))?;
        let sink =
            RedisSink { client, url: url.to_owned(), target, open: Mutex::new(None), unheard: AtomicU64::new(0) };
        let connection = sink.connection().await?;
        *sink.open.lock().await = Some(connection);
        Ok(sink)
    }

    /// Where the records go.
    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    /// Messages published while no one was subscribed to the channel (`PUBLISH` answered 0):
    /// lost, as pub/sub loses them.
    pub fn unheard(&self) -> u64 {
        self.unheard.load(Ordering::Relaxed)
    }

    async fn connection(&self) -> Result<MultiplexedConnection, SinkError> {
        // The client's own 500 ms response timeout would fail a large pipeline on a busy machine:
        // the call's deadline is the only one.
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(Some(std::time::Duration::from_secs(5)));
        tokio::time::timeout(CALL_DEADLINE, self.client.get_multiplexed_async_connection_with_config(&config))
            .await
            .map_err(|_| SinkError::new(format!("Redis at {} did not answer in {CALL_DEADLINE:?}", self.url), true))?
            .map_err(|e| error(format!("connecting to Redis at {}", self.url), e))
    }

    fn pipeline(&self, records: &[OutRecord]) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        for r in records {
            match &self.target {
                RedisTarget::Stream(key) => {
                    let cmd = pipe.cmd("XADD").arg(key).arg("*").arg(DATA_FIELD).arg(r.data.as_ref());
                    cmd.arg(PARTITION_KEY_FIELD).arg(r.partition_key.as_str());
                    if let Some(origin) = &r.origin {
                        cmd.arg(ORIGIN_FIELD).arg(message_id(origin, r.line));
                    }
                }
                RedisTarget::Channel(channel) => {
                    pipe.cmd("PUBLISH").arg(channel).arg(r.data.as_ref());
                }
            }
        }
        pipe
    }
}

impl RecordSink for RedisSink {
    /// One pipeline: a call's records are sent in its order, and fail together.
    fn keeps_key_order_in_a_call(&self) -> bool {
        true
    }

    /// A stream entry names its line (`pushpull-origin`).
    fn names_records(&self) -> bool {
        matches!(self.target, RedisTarget::Stream(_))
    }

    async fn put_records(&self, records: &[OutRecord]) -> Result<PutOutcome, SinkError> {
        if records.is_empty() {
            return Ok(PutOutcome::default());
        }
        let mut open = self.open.lock().await;
        let mut connection = match open.take() {
            Some(c) => c,
            None => self.connection().await?,
        };
        let pipe = self.pipeline(records);
        let answered = tokio::time::timeout(CALL_DEADLINE, pipe.query_async::<Vec<redis::Value>>(&mut connection))
            .await
            .map_err(|_| SinkError::new(format!("Redis at {} did not answer in {CALL_DEADLINE:?}", self.url), true))?;
        let replies = answered.map_err(|e| error(format!("{} on Redis at {}", self.target, self.url), e))?;
        // The connection answered: kept for the next call.
        *open = Some(connection);
        if let RedisTarget::Channel(_) = self.target {
            let unheard = replies.iter().filter(|v| matches!(v, redis::Value::Int(0))).count() as u64;
            self.unheard.fetch_add(unheard, Ordering::Relaxed);
        }
        Ok(PutOutcome::default())
    }
}
