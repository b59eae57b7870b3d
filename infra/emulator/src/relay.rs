//! A Redis pub/sub → Lambda relay: Redis's push, as teams run it on a server in front of a
//! function (AWS has no Redis event source).
//!
//! One subscriber (`SUBSCRIBE <channel>`, or `PSUBSCRIBE <pattern>`) invokes the function
//! synchronously (`RequestResponse`), at most `concurrency` invocations at once (the function's
//! reserved concurrency), and **reads the next message off the socket only when a slot is free**;
//! an invocation carries that message and those that have arrived behind it (up to
//! [`MAX_BATCH`]), never waiting for more. So a function slower than the publisher backs up into Redis, not into this
//! process: Redis buffers what its subscriber has not read, and when that passes its
//! `client-output-buffer-limit pubsub` it disconnects the subscriber (Redis's docs, "Client
//! output buffer limits": "the client is disconnected"). What was published meanwhile is gone:
//! "Pub/Sub exhibits at-most-once message delivery semantics" (Redis, pub/sub docs). The relay
//! counts the disconnection, subscribes again, and goes on; what it lost, only the publisher's
//! count can say (published minus delivered). An asynchronous invoke, or an unbounded buffer in
//! the client (redis-rs's async `PubSub` buffers without bound), would hide the lesson: this relay
//! reads the socket itself, with redis-rs's RESP parser, a message at a time.
//!
//! **The event** is [`pushpull::pull::redis`]'s: `{"Records": [{"eventSource":
//! "pushpull:redis-pubsub", "channel", "pattern", "id", "timestamp", "data"}, ...]}`, `id` `<relay
//! start ms>-<n>`.
//!
//! **A failing invocation** (what we chose; Redis keeps nothing to retry from): a function error
//! is retried [`FUNCTION_RETRIES`] times, 100 ms then 200 ms apart (its messages are then counted
//! `failed` and logged with their ids); a throttle (429), a 5xx or a connection that failed is
//! retried with backoff for up to [`THROTTLE_PATIENCE`], holding its slot (so the relay reads no
//! further meanwhile); any other refusal of the Invoke API (an unknown function, a payload too
//! large) gives the messages up at once.
use std::io::{BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use pushpull::pull::redis::{PUBSUB_EVENT_SOURCE, RedisEvent, RedisRecord};
use serde::Serialize;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::invoke::Invoker;
use crate::mapping::outcome::Answer;

/// The most messages one invocation carries: those already read off the socket when a slot
/// frees, up to this many.
pub const MAX_BATCH: usize = 100;
/// Retries of a message whose invocation returned a function error.
pub const FUNCTION_RETRIES: u32 = 2;
/// How long a throttled (or unreachable) invocation is retried before the message is given up.
pub const THROTTLE_PATIENCE: Duration = Duration::from_secs(60);
/// How long after a disconnection the relay subscribes again.
pub const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(100);

/// What the relay listens to and whom it invokes.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// `redis://host:port[/db]` (no password: the local server has none).
    pub url: String,
    /// The channel, or with `pattern` a glob pattern (`PSUBSCRIBE`).
    pub channel: String,
    /// Subscribe with `PSUBSCRIBE`.
    pub pattern: bool,
    /// The function to invoke.
    pub function: String,
    /// Invocations at once (the function's reserved concurrency), at least 1.
    pub concurrency: usize,
    /// Each message the function took, as the mappings report theirs (`RunnerOptions::delivered`).
    pub delivered: Option<tokio::sync::mpsc::UnboundedSender<crate::mapping::Delivered>>,
    /// The most messages an invocation carries (0: [`MAX_BATCH`]).
    pub max_batch: usize,
}

/// What the relay did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RelayCounts {
    /// Messages read off the socket.
    pub received: u64,
    /// Messages the function took (an invocation answered without a function error).
    pub delivered: u64,
    /// Messages given up (function errors past the retries, or throttled past the patience).
    pub failed: u64,
    /// Invocations, retries included.
    pub invocations: u64,
    /// Invocations that returned a function error.
    pub function_errors: u64,
    /// Invocations throttled (429) or not answered by the Invoke API.
    pub throttles: u64,
    /// Subscriptions made (1 + one after each disconnection).
    pub subscriptions: u64,
    /// Times Redis closed the subscriber's connection (its output buffer limit for a slow
    /// subscriber, a restart).
    pub disconnects: u64,
    /// The most invocations in flight at once.
    pub in_flight_max: u64,
    /// Delay from the message being read to the function's answer, ms: p50, p99, max.
    pub delay_ms: [f64; 3],
}

impl std::fmt::Display for RelayCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "  messages     {} received, {} delivered, {} failed (given up)",
            self.received, self.delivered, self.failed
        )?;
        writeln!(
            f,
            "  invocations  {} ({} function errors, {} throttled), at most {} at once",
            self.invocations, self.function_errors, self.throttles, self.in_flight_max
        )?;
        writeln!(f, "  connection   {} subscriptions, {} disconnects by Redis", self.subscriptions, self.disconnects)?;
        write!(
            f,
            "  delay        p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (read to answer)",
            self.delay_ms[0], self.delay_ms[1], self.delay_ms[2]
        )
    }
}

#[derive(Default)]
struct Shared {
    received: AtomicU64,
    delivered: AtomicU64,
    failed: AtomicU64,
    invocations: AtomicU64,
    function_errors: AtomicU64,
    throttles: AtomicU64,
    subscriptions: AtomicU64,
    disconnects: AtomicU64,
    in_flight: AtomicU64,
    in_flight_max: AtomicU64,
    delays_ms: Mutex<Vec<f64>>,
    /// When the last message was read or answered.
    last_activity: Mutex<Option<Instant>>,
    stop: AtomicBool,
    /// The socket of the subscription, for `stop` to shut it down under a blocked read.
    socket: Mutex<Option<TcpStream>>,
}

impl Shared {
    fn counts(&self) -> RelayCounts {
        let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
        let mut delays = self.delays_ms.lock().map(|d| d.clone()).unwrap_or_default();
        delays.sort_by(f64::total_cmp);
        let at =
            |q: f64| if delays.is_empty() { 0.0 } else { delays[((delays.len() - 1) as f64 * q).round() as usize] };
        RelayCounts {
            received: get(&self.received),
            delivered: get(&self.delivered),
            failed: get(&self.failed),
            invocations: get(&self.invocations),
            function_errors: get(&self.function_errors),
            throttles: get(&self.throttles),
            subscriptions: get(&self.subscriptions),
            disconnects: get(&self.disconnects),
            in_flight_max: get(&self.in_flight_max),
            delay_ms: [at(0.5), at(0.99), at(1.0)],
        }
    }

    fn touch(&self) {
        if let Ok(mut t) = self.last_activity.lock() {
            *t = Some(Instant::now());
        }
    }
}

/// The relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The URL is not one the relay can use.
    #[error("Redis URL {url}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The first subscription failed (Redis is not there).
    #[error("subscribing to {channel} on {address}: {source}")]
    Subscribe {
        /// The channel.
        channel: String,
        /// host:port.
        address: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

/// A relay running in the background.
pub struct RunningRelay {
    shared: Arc<Shared>,
    reader: Option<std::thread::JoinHandle<()>>,
    semaphore: Arc<Semaphore>,
    concurrency: usize,
}

impl RunningRelay {
    /// What it did so far.
    pub fn counts(&self) -> RelayCounts {
        self.shared.counts()
    }

    /// Whether nothing is in flight and nothing was read or answered for `idle`.
    pub fn is_idle_for(&self, idle: Duration) -> bool {
        self.shared.in_flight.load(Ordering::SeqCst) == 0
            && self.shared.last_activity.lock().ok().and_then(|t| *t).is_none_or(|t| t.elapsed() >= idle)
    }

    /// Stops reading (unsubscribing: what is published from now on is not read), lets the
    /// invocations in flight finish, and says what it did.
    pub async fn stop(mut self) -> RelayCounts {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Ok(s) = self.shared.socket.lock()
            && let Some(s) = s.as_ref()
        {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.semaphore.add_permits(1);
        if let Some(reader) = self.reader.take() {
            let _ = tokio::task::spawn_blocking(move || reader.join()).await;
        }
        // Every slot back, and the one added above: nothing in flight.
        let _ = self.semaphore.acquire_many(self.concurrency as u32 + 1).await;
        self.shared.counts()
    }
}

/// `host:port` of a `redis://` URL.
fn address(url: &str) -> Result<String, RelayError> {
    let bad = |reason: &str| RelayError::Url { url: url.to_owned(), reason: reason.to_owned() };
    let rest = url.strip_prefix("redis://").ok_or_else(|| bad("not a redis:// URL"))?;
    if rest.contains('@') {
        return Err(bad("credentials are not supported by the relay"));
    }
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok(if host.contains(':') { host.to_owned() } else { format!("{host}:6379") })
}

/// The subscription socket's receive buffer. Small, so that what the relay has not read waits in
/// Redis, where `client-output-buffer-limit pubsub` sees it, not in the kernels' buffers.
pub const RECEIVE_BUFFER: usize = 32 * 1024;

/// The segment size the relay asks for: a real network's (Ethernet's 1,500-byte MTU). Loopback's
/// 64 KiB segments let Linux grow Redis's send buffer to megabytes (`tcp_wmem`'s 4 MiB here,
/// measured: about 3.5 MB of 1 KB messages held in the kernels before Redis's own buffer for the
/// subscriber grew at all), which would hide a slow subscriber from Redis's limit and, after a
/// cut, still be read, slowly, before the relay saw the connection closed. With 1,460-byte
/// segments and the small receive buffer, Redis's buffer for the subscriber starts growing after
/// about 140 KB, as on a network.
pub const SEGMENT_SIZE: u32 = 1460;

/// Subscribes (connecting) and returns the reader of the subscription.
fn subscribe(
    config: &RelayConfig,
    address: &str,
    shared: &Shared,
) -> std::io::Result<(BufReader<TcpStream>, redis::Parser)> {
    use std::net::ToSocketAddrs as _;
    let to = address
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{address} resolves to nothing")))?;
    let socket = socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::STREAM, None)?;
    socket.set_recv_buffer_size(RECEIVE_BUFFER)?;
    socket.set_tcp_mss(SEGMENT_SIZE)?;
    socket.connect_timeout(&to.into(), Duration::from_secs(5))?;
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true)?;
    let verb = if config.pattern { "PSUBSCRIBE" } else { "SUBSCRIBE" };
    (&stream).write_all(&redis::cmd(verb).arg(&config.channel).get_packed_command())?;
    if let Ok(mut s) = shared.socket.lock() {
        *s = Some(stream.try_clone()?);
    }
    // Subscribed once Redis confirms it: what is published from then on reaches the relay.
    let mut reader = BufReader::new(stream);
    let mut parser = redis::Parser::new();
    let confirmation = parser.parse_value(&mut reader).map_err(std::io::Error::other)?;
    let confirmed = match &confirmation {
        redis::Value::Array(items) | redis::Value::Push { data: items, .. } => items.iter().any(|v| {
            matches!(v, redis::Value::BulkString(b) if b.eq_ignore_ascii_case(b"subscribe") || b.eq_ignore_ascii_case(b"psubscribe"))
        }) || matches!(confirmation, redis::Value::Push { .. }),
        _ => false,
    };
    if !confirmed {
        return Err(std::io::Error::other(format!("Redis refused {verb} {}: {confirmation:?}", config.channel)));
    }
    Ok((reader, parser))
}

/// Starts the relay: the first subscription is made before it returns (an error if Redis is not
/// there); `invoker` calls the function.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use pushpull_emulator::relay::{start, RelayConfig};
/// use pushpull_emulator::invoke::InvokeClient;
/// let config = RelayConfig { url: "redis://127.0.0.1:6390/".into(), channel: "records".into(),
///     pattern: false, function: "rollup".into(), concurrency: 4, delivered: None, max_batch: 0 };
/// let relay = start(config, InvokeClient::new("http://127.0.0.1:9000"))?;
/// // ... publish ...
/// let counts = relay.stop().await;
/// println!("{} delivered", counts.delivered);
/// # Ok(()) }
/// ```
pub fn start(config: RelayConfig, invoker: impl Invoker) -> Result<RunningRelay, RelayError> {
    let address = address(&config.url)?;
    let shared = Arc::new(Shared::default());
    let (reader, parser) = subscribe(&config, &address, &shared).map_err(|source| RelayError::Subscribe {
        channel: config.channel.clone(),
        address: address.clone(),
        source,
    })?;
    shared.subscriptions.fetch_add(1, Ordering::SeqCst);
    shared.touch();
    let concurrency = config.concurrency.max(1);
    let semaphore = Arc::new(Semaphore::new(concurrency));
    let invoker: Arc<dyn Invoker> = Arc::new(invoker);
    let handle = tokio::runtime::Handle::current();
    info!(channel = %config.channel, redis = %address, function = %config.function, concurrency, "relay: subscribed");
    let thread = {
        let (shared, semaphore) = (shared.clone(), semaphore.clone());
        std::thread::Builder::new()
            .name("redis-relay".into())
            .spawn(move || read_loop(config, address, (reader, parser), shared, semaphore, invoker, handle))
            .map_err(|source| RelayError::Subscribe { channel: String::new(), address: String::new(), source })?
    };
    Ok(RunningRelay { shared, reader: Some(thread), semaphore, concurrency })
}

/// The subscriber: takes a slot, then reads one message, then invokes with it in the background.
fn read_loop(
    config: RelayConfig,
    address: String,
    subscription: (BufReader<TcpStream>, redis::Parser),
    shared: Arc<Shared>,
    semaphore: Arc<Semaphore>,
    invoker: Arc<dyn Invoker>,
    handle: tokio::runtime::Handle,
) {
    let (mut reader, mut parser) = subscription;
    let started_ms = crate::mapping::now_unix() as u64 * 1000;
    let mut next = 0u64;
    let config = Arc::new(config);
    loop {
        // A free slot first: while every slot is busy, nothing more is read.
        let permit = match handle.block_on(semaphore.clone().acquire_owned()) {
            Ok(p) => p,
            Err(_) => return,
        };
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let value = parser.parse_value(&mut reader);
        let message = match value {
            Ok(v) => pubsub_message(v),
            Err(e) => {
                drop(permit);
                if shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                shared.disconnects.fetch_add(1, Ordering::SeqCst);
                warn!(channel = %config.channel, error = %e, "relay: Redis closed the subscription (a slow subscriber past client-output-buffer-limit, or a restart); what is published until it subscribes again is lost");
                loop {
                    std::thread::sleep(RESUBSCRIBE_AFTER);
                    if shared.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    match subscribe(&config, &address, &shared) {
                        Ok((r, p)) => {
                            reader = r;
                            parser = p;
                            shared.subscriptions.fetch_add(1, Ordering::SeqCst);
                            shared.touch();
                            break;
                        }
                        Err(e) => warn!(redis = %address, error = %e, "relay: cannot subscribe again yet"),
                    }
                }
                continue;
            }
        };
        let Some(first) = message else {
            // A subscription confirmation, or a reply of another kind.
            drop(permit);
            continue;
        };
        // With it, the messages that have arrived behind it (never a wait for more): one
        // invocation, as the mappings batch what one poll brought.
        let mut messages = vec![first];
        let max_batch = if config.max_batch == 0 { MAX_BATCH } else { config.max_batch };
        while messages.len() < max_batch && (!reader.buffer().is_empty() || waiting(reader.get_ref())) {
            match parser.parse_value(&mut reader) {
                Ok(v) => messages.extend(pubsub_message(v)),
                // The connection ended: what was read goes; the next read finds it closed.
                Err(_) => break,
            }
        }
        let read_at = Instant::now();
        shared.received.fetch_add(messages.len() as u64, Ordering::SeqCst);
        shared.touch();
        let now_ms = (crate::mapping::now_unix() * 1000.0) as u64;
        let mut hashes = Vec::with_capacity(messages.len());
        let records: Vec<RedisRecord> = messages
            .into_iter()
            .map(|(channel, pattern, data)| {
                hashes.push(xxhash_rust::xxh3::xxh3_64(&data));
                let id = format!("{started_ms}-{next}");
                next += 1;
                RedisRecord {
                    event_source: PUBSUB_EVENT_SOURCE.to_owned(),
                    channel: Some(channel),
                    pattern,
                    id,
                    timestamp: now_ms,
                    data: base64::engine::general_purpose::STANDARD.encode(&data),
                    ..RedisRecord::default()
                }
            })
            .collect();
        let ids = match (records.first(), records.last()) {
            (Some(a), Some(b)) if records.len() > 1 => format!("{}..{}", a.id, b.id),
            (Some(a), _) => a.id.clone(),
            _ => String::new(),
        };
        let payload = Bytes::from(serde_json::to_vec(&RedisEvent { records }).unwrap_or_default());
        let (shared, invoker, config) = (shared.clone(), invoker.clone(), config.clone());
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.in_flight_max.fetch_max(now, Ordering::SeqCst);
        handle.spawn(async move {
            let invoked_at = crate::mapping::now_unix();
            if deliver(&*invoker, &config.function, &ids, hashes.len() as u64, payload, &shared).await
                && let Some(tx) = &config.delivered
            {
                for hash in hashes {
                    let _ = tx.send(crate::mapping::Delivered { hash, invoked_at });
                }
            }
            if let Ok(mut d) = shared.delays_ms.lock() {
                d.push(read_at.elapsed().as_secs_f64() * 1000.0);
            }
            shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            shared.touch();
            drop(permit);
        });
    }
}

/// Whether bytes wait on `socket` (arrived, not yet read): a peek that does not block. The parser
/// reads ahead into its own buffer, so messages may wait there too: those go with the next
/// invocation.
fn waiting(socket: &TcpStream) -> bool {
    let mut one = [0u8; 1];
    if socket.set_nonblocking(true).is_err() {
        return false;
    }
    let waiting = matches!(socket.peek(&mut one), Ok(n) if n > 0);
    let _ = socket.set_nonblocking(false);
    waiting
}

/// `(channel, pattern, payload)` of a `message` or `pmessage` push; `None` for anything else.
fn pubsub_message(v: redis::Value) -> Option<(String, Option<String>, Vec<u8>)> {
    let items = match v {
        redis::Value::Array(items) => items,
        redis::Value::Push { kind, data } => {
            let mut items = vec![redis::Value::SimpleString(kind.to_string())];
            items.extend(data);
            items
        }
        _ => return None,
    };
    let bytes = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => Some(b.clone()),
        redis::Value::SimpleString(s) => Some(s.as_bytes().to_vec()),
        _ => None,
    };
    let text = |v: &redis::Value| bytes(v).map(|b| String::from_utf8_lossy(&b).into_owned());
    match (items.first().and_then(text).as_deref(), items.len()) {
        (Some("message"), 3) => Some((text(&items[1])?, None, bytes(&items[2])?)),
        (Some("pmessage"), 4) => Some((text(&items[2])?, Some(text(&items[1])?), bytes(&items[3])?)),
        _ => None,
    }
}

/// Invokes `function` with the event of `count` messages (`ids`), with the retries the module
/// names; whether the function took them.
async fn deliver(
    invoker: &dyn Invoker,
    function: &str,
    ids: &str,
    count: u64,
    payload: Bytes,
    shared: &Shared,
) -> bool {
    let mut errors = 0u32;
    let mut throttled_since: Option<Instant> = None;
    let mut backoff = Duration::from_millis(50);
    loop {
        shared.invocations.fetch_add(1, Ordering::SeqCst);
        match invoker.invoke(function, payload.clone()).await {
            Ok(crate::invoke::Invoked { answer: Answer::Response(_), .. }) => {
                shared.delivered.fetch_add(count, Ordering::SeqCst);
                return true;
            }
            Ok(crate::invoke::Invoked { answer: Answer::FunctionError(body), .. }) => {
                shared.function_errors.fetch_add(1, Ordering::SeqCst);
                errors += 1;
                if errors > FUNCTION_RETRIES {
                    shared.failed.fetch_add(count, Ordering::SeqCst);
                    warn!(messages = ids, function, error = %String::from_utf8_lossy(&body), "relay: the function failed on the message past its retries; given up (pub/sub keeps nothing to retry from)");
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(100) * errors).await;
            }
            Err(e) => {
                shared.throttles.fetch_add(1, Ordering::SeqCst);
                let since = *throttled_since.get_or_insert_with(Instant::now);
                if !e.is_throttle() || since.elapsed() >= THROTTLE_PATIENCE {
                    shared.failed.fetch_add(count, Ordering::SeqCst);
                    warn!(messages = ids, function, error = %e, "relay: the function could not be invoked; message given up");
                    return false;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_the_relay_can_use() {
        assert_eq!(address("redis://127.0.0.1:6390/").unwrap(), "127.0.0.1:6390");
        assert_eq!(address("redis://localhost").unwrap(), "localhost:6379");
        assert!(address("rediss://h:1").unwrap_err().to_string().contains("not a redis:// URL"));
        assert!(address("redis://u:p@h:1").unwrap_err().to_string().contains("credentials"));
    }

    #[test]
    fn messages_and_pattern_messages_are_read_and_confirmations_skipped() {
        let bulk = |s: &[u8]| redis::Value::BulkString(s.to_vec());
        let m = redis::Value::Array(vec![bulk(b"message"), bulk(b"c"), bulk(b"\x00\xff")]);
        assert_eq!(pubsub_message(m), Some(("c".into(), None, vec![0, 255])));
        let p = redis::Value::Array(vec![bulk(b"pmessage"), bulk(b"c*"), bulk(b"c1"), bulk(b"x")]);
        assert_eq!(pubsub_message(p), Some(("c1".into(), Some("c*".into()), b"x".to_vec())));
        let s = redis::Value::Array(vec![bulk(b"subscribe"), bulk(b"c"), redis::Value::Int(1)]);
        assert_eq!(pubsub_message(s), None);
    }
}
