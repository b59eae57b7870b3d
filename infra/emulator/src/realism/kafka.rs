//! Kafka in a storm: a proxy in front of the broker for the local Kafka mapping's connections,
//! and a stranger joining its consumer group.
//!
//! - [`KafkaFaultProxy`]: a TCP proxy that speaks enough of Kafka's protocol to keep clients on
//!   it. A client bootstrapped on the proxy asks the cluster for its brokers (Metadata) and for
//!   its group's coordinator (FindCoordinator), and connects to the addresses in the answers: the
//!   proxy rewrites them to its own listeners (one per broker, opened as brokers are named), or
//!   every connection after the first would go around it. On the way it slows Fetch answers
//!   (`kafka.fetch.slowed`), cuts connections half-way through a Fetch answer (`kafka.fetch.cut`;
//!   librdkafka fetches few, large answers while records flow, and long polls while none do), and plays a broker restart ([`KafkaFaultProxy::restart`]: every
//!   connection closed, new ones closed as soon as accepted for a while: what a client sees of a broker going down and
//!   coming back, `kafka.broker.restart`: each connection closed, new ones accepted and closed at once for a while).
//! - [`join_and_leave`]: a consumer joins the mapping's group, holds the partitions it is given
//!   for a while without reading them for anyone, and leaves: two rebalances mid-batch for the
//!   mapping (`kafka.group.rebalance`), with records in flight.
//!
//! Only the mapping's connections go through the proxy: the push function's producer writes to
//! the broker itself (a Produce whose answer is lost is sent again, and Kafka without an
//! idempotent producer would then hold the records twice: see ARCHITECTURE.md).
//!
//! The protocol parsing is hand-written and narrow: the frame (a 4-byte length), the request
//! header's first three fields, and the broker address fields of Metadata (API key 3, every
//! version; property-tested) and FindCoordinator (API key 10, every version; unit-tested); the rest
//! of each answer is copied
//! byte for byte. A full protocol crate would be a large build for two fields.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::Realism;

/// Kafka's API keys the proxy reads.
pub const FETCH: i16 = 1;
const METADATA: i16 = 3;
const FIND_COORDINATOR: i16 = 10;
/// A frame larger than this is refused (Kafka's own default `socket.request.max.bytes` is 100 MiB).
const MAX_FRAME: usize = 256 * 1024 * 1024;

/// A TCP proxy in front of a Kafka cluster that keeps clients on itself and injects faults.
///
/// ```no_run
/// # async fn f() -> std::io::Result<()> {
/// use std::sync::Arc;
/// use pushpull_emulator::realism::kafka::KafkaFaultProxy;
/// use pushpull_emulator::realism::{Profile, Realism, RealismConfig};
/// let realism = Arc::new(Realism::new(RealismConfig::new(Profile::Storm, 7)));
/// let proxy = KafkaFaultProxy::start(realism, &["127.0.0.1:9092".to_owned()])?;
/// // Clients bootstrapped here stay here: Metadata and FindCoordinator name the proxy.
/// println!("bootstrap.servers={}", proxy.bootstrap());
/// proxy.restart(std::time::Duration::from_secs(2)); // every connection closed, new ones too for 2 s
/// # Ok(())
/// # }
/// ```
pub struct KafkaFaultProxy {
    inner: Arc<Inner>,
    bootstrap: Vec<String>,
}

struct Inner {
    realism: Arc<Realism>,
    /// Upstream broker `host:port` → this proxy's listener for it.
    listeners: Mutex<HashMap<String, std::net::SocketAddr>>,
    /// Bumped by a restart: every connection open at that moment ends.
    restarts: watch::Sender<u64>,
    /// Connections are closed as soon as accepted until then.
    down_until: Mutex<Option<Instant>>,
    /// Every listener's accept loop (aborted when the proxy is dropped).
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Connections accepted, in all.
    connections: std::sync::atomic::AtomicU64,
    /// Requests passed to the broker, by API key.
    requests: Mutex<HashMap<i16, u64>>,
    /// Dropped: no listener is opened any more.
    closed: std::sync::atomic::AtomicBool,
}

impl KafkaFaultProxy {
    /// Starts a listener on 127.0.0.1 for each of `bootstrap` (`host:port`); brokers named in the
    /// cluster's answers get theirs as they are named. Must be called within a tokio runtime.
    pub fn start(realism: Arc<Realism>, bootstrap: &[String]) -> std::io::Result<Self> {
        let inner = Arc::new(Inner {
            realism,
            listeners: Mutex::new(HashMap::new()),
            restarts: watch::channel(0).0,
            down_until: Mutex::new(None),
            tasks: Mutex::new(Vec::new()),
            connections: std::sync::atomic::AtomicU64::new(0),
            requests: Mutex::new(HashMap::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        let bootstrap = bootstrap.iter().map(|b| listen(&inner, b).map(|a| a.to_string())).collect::<Result<_, _>>()?;
        Ok(KafkaFaultProxy { inner, bootstrap })
    }

    /// The proxy's addresses for the bootstrap servers it was given, comma-separated.
    pub fn bootstrap(&self) -> String {
        self.bootstrap.join(",")
    }

    /// Plays a broker restart: every connection through the proxy is closed at once, and new ones
    /// are closed as soon as they are accepted for `outage`. Counted as `kafka.broker.restart`.
    pub fn restart(&self, outage: Duration) {
        if let Ok(mut d) = self.inner.down_until.lock() {
            *d = Some(Instant::now() + outage);
        }
        self.inner.restarts.send_modify(|n| *n += 1);
        self.inner.realism.count("kafka.broker.restart", 1);
        info!(?outage, "realism: the Kafka broker restarts (every connection closed)");
    }

    /// Connections accepted so far (those closed at once included).
    pub fn connections(&self) -> u64 {
        self.inner.connections.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Requests of API key `api_key` (Kafka's protocol: [`FETCH`] is 1) passed to the broker so
    /// far, on every connection: what a client asks of the broker, as a bench counts it.
    pub fn requests(&self, api_key: i16) -> u64 {
        self.inner
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&api_key)
            .copied()
            .unwrap_or(0)
    }

    /// Requests of every kind passed to the broker so far.
    pub fn requests_total(&self) -> u64 {
        self.inner.requests.lock().unwrap_or_else(std::sync::PoisonError::into_inner).values().sum()
    }
}

impl Drop for KafkaFaultProxy {
    fn drop(&mut self) {
        self.inner.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Ok(tasks) = self.inner.tasks.lock() {
            tasks.iter().for_each(tokio::task::AbortHandle::abort);
        }
        // Open connections end too.
        self.inner.restarts.send_modify(|n| *n += 1);
    }
}

/// The proxy's listener for `upstream`, opened if it has none.
fn listen(inner: &Arc<Inner>, upstream: &str) -> std::io::Result<std::net::SocketAddr> {
    let mut listeners = inner.listeners.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(addr) = listeners.get(upstream) {
        return Ok(*addr);
    }
    if inner.closed.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(std::io::Error::other("the proxy is stopped"));
    }
    let std_listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let listener = TcpListener::from_std(std_listener)?;
    let task = tokio::spawn(accept(inner.clone(), listener, upstream.to_owned()));
    if let Ok(mut tasks) = inner.tasks.lock() {
        tasks.push(task.abort_handle());
    }
    debug!(%upstream, proxy = %addr, "realism: a Kafka broker behind the proxy");
    listeners.insert(upstream.to_owned(), addr);
    Ok(addr)
}

async fn accept(inner: Arc<Inner>, listener: TcpListener, upstream: String) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(e) => {
                // Out of descriptors, say: not a busy loop.
                debug!(error = %e, "realism: accepting a Kafka connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        inner.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let down = inner.down_until.lock().ok().and_then(|d| *d).is_some_and(|until| Instant::now() < until);
        if down {
            drop(client); // closed at once: the broker is restarting
            continue;
        }
        // Subscribed before the connection is served: a restart from now on ends it.
        let restarted = inner.restarts.subscribe();
        let (inner, upstream) = (inner.clone(), upstream.clone());
        tokio::spawn(async move {
            if let Err(e) = serve(&inner, client, &upstream, restarted).await {
                debug!(%upstream, error = %e, "realism: a Kafka connection ended");
            }
        });
    }
}

/// Requests sent on one connection and not yet answered: correlation id → (API key, version).
type Pending = Arc<Mutex<HashMap<i32, (i16, i16)>>>;

async fn serve(
    inner: &Arc<Inner>,
    client: TcpStream,
    upstream: &str,
    mut restarted: watch::Receiver<u64>,
) -> std::io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let pending: Pending = Arc::default();
    let up = {
        let pending = pending.clone();
        async move {
            while let Some(frame) = read_frame(&mut client_read).await? {
                if let Some(header) = RequestHeader::parse(&frame) {
                    *inner
                        .requests
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .entry(header.api_key)
                        .or_default() += 1;
                    pending
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(header.correlation_id, (header.api_key, header.api_version));
                }
                write_frame(&mut server_write, &frame).await?;
            }
            Ok::<(), std::io::Error>(())
        }
    };
    let down = async {
        while let Some(frame) = read_frame(&mut server_read).await? {
            let request = frame
                .get(..4)
                .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .and_then(|c| pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&c));
            let frame = match request {
                Some((METADATA, version)) => rewrite_or_keep(frame, |f, to| rewrite_metadata(f, version, to), inner),
                Some((FIND_COORDINATOR, version)) => {
                    rewrite_or_keep(frame, |f, to| rewrite_find_coordinator(f, version, to), inner)
                }
                Some((FETCH, _)) => {
                    let rates = &inner.realism.config().rates;
                    if inner.realism.fire("kafka.fetch.slowed", rates.kafka_fetch_slowed) {
                        let ms = 200.0 + 800.0 * inner.realism.draw("kafka.fetch.slowed.by");
                        tokio::time::sleep(Duration::from_millis(ms as u64)).await;
                    }
                    if inner.realism.fire("kafka.fetch.cut", rates.kafka_fetch_cut) {
                        // Half the answer, then the connection drops.
                        let half = frame.len() / 2;
                        client_write.write_all(&(frame.len() as i32).to_be_bytes()).await?;
                        client_write.write_all(&frame[..half]).await?;
                        client_write.flush().await?;
                        return Err(std::io::Error::other("realism: cut mid-fetch"));
                    }
                    frame
                }
                _ => frame,
            };
            write_frame(&mut client_write, &frame).await?;
        }
        Ok::<(), std::io::Error>(())
    };
    tokio::select! {
        r = up => r,
        r = down => r,
        _ = restarted.changed() => Err(std::io::Error::other("realism: broker restart")),
    }
}

/// Rewrites `frame`'s broker addresses to the proxy's listeners; a frame that does not parse is
/// passed on as it is (and said in the log: clients may then go around the proxy).
fn rewrite_or_keep(
    frame: Vec<u8>,
    rewrite: impl FnOnce(&[u8], &mut Readdress<'_>) -> Result<Vec<u8>, Malformed>,
    inner: &Arc<Inner>,
) -> Vec<u8> {
    let mut to_proxy = |host: &str, port: i32| {
        if host.is_empty() || port < 0 {
            return None; // no coordinator (an error answer): nothing to rewrite
        }
        match listen(inner, &format!("{host}:{port}")) {
            Ok(addr) => Some((addr.ip().to_string(), i32::from(addr.port()))),
            Err(e) => {
                warn!(host, port, error = %e, "realism: no listener for a Kafka broker");
                None
            }
        }
    };
    match rewrite(&frame, &mut to_proxy) {
        Ok(rewritten) => rewritten,
        Err(e) => {
            warn!(error = %e, "realism: a Kafka answer the proxy could not read is passed on unchanged");
            frame
        }
    }
}

async fn read_frame(r: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = i32::from_be_bytes(len);
    let len = usize::try_from(len)
        .ok()
        .filter(|l| *l <= MAX_FRAME)
        .ok_or_else(|| std::io::Error::other(format!("a Kafka frame of length {len}")))?;
    let mut frame = vec![0u8; len];
    r.read_exact(&mut frame).await?;
    Ok(Some(frame))
}

async fn write_frame(w: &mut (impl AsyncWriteExt + Unpin), frame: &[u8]) -> std::io::Result<()> {
    w.write_all(&(frame.len() as i32).to_be_bytes()).await?;
    w.write_all(frame).await?;
    w.flush().await
}

/// The first fields of a request's header (every version has them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RequestHeader {
    api_key: i16,
    api_version: i16,
    correlation_id: i32,
}

impl RequestHeader {
    fn parse(frame: &[u8]) -> Option<Self> {
        let b = frame.get(..8)?;
        Some(RequestHeader {
            api_key: i16::from_be_bytes([b[0], b[1]]),
            api_version: i16::from_be_bytes([b[2], b[3]]),
            correlation_id: i32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        })
    }
}

/// Where a broker at `(host, port)` is to be named instead (`None`: as it is).
pub type Readdress<'a> = dyn FnMut(&str, i32) -> Option<(String, i32)> + 'a;

/// An answer that does not read as its API and version say it should.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed Kafka answer: {0}")]
pub struct Malformed(&'static str);

/// A reader over an answer, copying what it reads into `out` unless told otherwise.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Malformed> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.buf.len()).ok_or(Malformed(what))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn i16(&mut self, what: &'static str) -> Result<i16, Malformed> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, Malformed> {
        let b = self.take(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn uvarint(&mut self, what: &'static str) -> Result<u64, Malformed> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.take(1, what)?[0];
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Malformed(what))
    }

    /// A string (compact: varint length + 1; else i16 length); `None` for null.
    fn string(&mut self, compact: bool, what: &'static str) -> Result<Option<&'a str>, Malformed> {
        let len = if compact {
            match self.uvarint(what)? {
                0 => return Ok(None),
                n => usize::try_from(n - 1).map_err(|_| Malformed(what))?,
            }
        } else {
            match self.i16(what)? {
                -1 => return Ok(None),
                n => usize::try_from(n).map_err(|_| Malformed(what))?,
            }
        };
        std::str::from_utf8(self.take(len, what)?).map(Some).map_err(|_| Malformed(what))
    }

    /// Skips a tagged-field section, returning its bytes.
    fn tagged(&mut self) -> Result<&'a [u8], Malformed> {
        let start = self.at;
        for _ in 0..self.uvarint("tagged fields")? {
            self.uvarint("tag")?;
            let size = self.uvarint("tag size")?;
            self.take(usize::try_from(size).map_err(|_| Malformed("tag size"))?, "tag")?;
        }
        Ok(&self.buf[start..self.at])
    }

    fn array_len(&mut self, compact: bool, what: &'static str) -> Result<usize, Malformed> {
        let n = if compact {
            self.uvarint(what)?.checked_sub(1).ok_or(Malformed(what))? as i64
        } else {
            i64::from(self.i32(what)?)
        };
        usize::try_from(n.max(0)).map_err(|_| Malformed(what))
    }

    fn rest(&self) -> &'a [u8] {
        &self.buf[self.at..]
    }
}

fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_string(out: &mut Vec<u8>, s: &str, compact: bool) {
    if compact {
        put_uvarint(out, s.len() as u64 + 1);
    } else {
        out.extend_from_slice(&(s.len() as i16).to_be_bytes());
    }
    out.extend_from_slice(s.as_bytes());
}

/// The response header (correlation id; and tagged fields in a flexible version's header v1),
/// copied.
fn header<'a>(c: &mut Cursor<'a>, flexible: bool) -> Result<&'a [u8], Malformed> {
    let start = c.at;
    c.i32("correlation id")?;
    if flexible {
        c.tagged()?;
    }
    Ok(&c.buf[start..c.at])
}

/// A Metadata answer (API key 3) of `version` with each broker's host and port as `to` maps them
/// (`None`: kept). Flexible from version 9; throttle time from 3; rack from 1.
pub fn rewrite_metadata(frame: &[u8], version: i16, to: &mut Readdress<'_>) -> Result<Vec<u8>, Malformed> {
    let flexible = version >= 9;
    let mut c = Cursor { buf: frame, at: 0 };
    let mut out = Vec::with_capacity(frame.len() + 64);
    out.extend_from_slice(header(&mut c, flexible)?);
    if version >= 3 {
        out.extend_from_slice(c.take(4, "throttle time")?);
    }
    let start = c.at;
    let n = c.array_len(flexible, "brokers")?;
    out.extend_from_slice(&frame[start..c.at]);
    for _ in 0..n {
        out.extend_from_slice(c.take(4, "node id")?);
        let host = c.string(flexible, "broker host")?.ok_or(Malformed("a broker without a host"))?;
        let port = c.i32("broker port")?;
        let (host, port) = to(host, port).unwrap_or_else(|| (host.to_owned(), port));
        put_string(&mut out, &host, flexible);
        out.extend_from_slice(&port.to_be_bytes());
        let rest_start = c.at;
        if version >= 1 {
            c.string(flexible, "rack")?;
        }
        if flexible {
            c.tagged()?;
        }
        out.extend_from_slice(&frame[rest_start..c.at]);
    }
    out.extend_from_slice(c.rest());
    Ok(out)
}

/// A FindCoordinator answer (API key 10) of `version` with the coordinator's host and port as `to`
/// maps them. Versions 0-3 name one coordinator (flexible from 3); 4 and later a list, one per
/// key asked about.
pub fn rewrite_find_coordinator(frame: &[u8], version: i16, to: &mut Readdress<'_>) -> Result<Vec<u8>, Malformed> {
    let flexible = version >= 3;
    let mut c = Cursor { buf: frame, at: 0 };
    let mut out = Vec::with_capacity(frame.len() + 64);
    out.extend_from_slice(header(&mut c, flexible)?);
    if version >= 1 {
        out.extend_from_slice(c.take(4, "throttle time")?);
    }
    let mut address = |c: &mut Cursor<'_>, out: &mut Vec<u8>| -> Result<(), Malformed> {
        out.extend_from_slice(c.take(4, "node id")?);
        let host = c.string(flexible, "coordinator host")?.unwrap_or_default();
        let port = c.i32("coordinator port")?;
        let (host, port) = to(host, port).unwrap_or_else(|| (host.to_owned(), port));
        put_string(out, &host, flexible);
        out.extend_from_slice(&port.to_be_bytes());
        Ok(())
    };
    if version < 4 {
        let start = c.at;
        c.i16("error code")?;
        if version >= 1 {
            c.string(flexible, "error message")?;
        }
        out.extend_from_slice(&frame[start..c.at]);
        address(&mut c, &mut out)?;
    } else {
        let start = c.at;
        let n = c.array_len(true, "coordinators")?;
        out.extend_from_slice(&frame[start..c.at]);
        for _ in 0..n {
            let key_start = c.at;
            c.string(true, "coordinator key")?;
            out.extend_from_slice(&frame[key_start..c.at]);
            address(&mut c, &mut out)?;
            let rest_start = c.at;
            c.i16("error code")?;
            c.string(true, "error message")?;
            c.tagged()?;
            out.extend_from_slice(&frame[rest_start..c.at]);
        }
    }
    out.extend_from_slice(c.rest());
    Ok(out)
}

/// A stranger in the group: a consumer joins `group` (on `bootstrap`, subscribed to `topic`),
/// holds what it is assigned for `hold` without reading it for anyone or committing, and leaves.
/// The group rebalances twice; the partitions come back to their owner at its committed offsets.
/// Blocking (run it on a blocking thread); gives up when `stop` turns true. Returns the partitions
/// it held.
pub fn join_and_leave(
    bootstrap: &str,
    topic: &str,
    group: &str,
    hold: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<Vec<i32>, String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("client.id", "pushpull-realism-stranger")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()
        .map_err(|e| format!("a stranger's consumer on {bootstrap}: {e}"))?;
    consumer.subscribe(&[topic]).map_err(|e| format!("a stranger subscribing to {topic}: {e}"))?;
    let give_up = Instant::now() + Duration::from_secs(30);
    let mut held: Option<(Instant, Vec<i32>)> = None;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < give_up {
        let _ = consumer.poll(Duration::from_millis(100)); // records are nobody's: dropped
        match &held {
            None => {
                let assigned: Vec<i32> = consumer
                    .assignment()
                    .map(|a| a.elements().iter().map(|e| e.partition()).collect())
                    .unwrap_or_default();
                if !assigned.is_empty() {
                    held = Some((Instant::now(), assigned));
                }
            }
            Some((since, _)) if since.elapsed() >= hold => break,
            Some(_) => {}
        }
    }
    drop(consumer); // leaves the group
    Ok(held.map(|(_, p)| p).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A Metadata answer as a broker writes it.
    fn metadata(version: i16, brokers: &[(i32, String, i32, Option<String>)], tail: &[u8]) -> Vec<u8> {
        let flexible = version >= 9;
        let mut out = 7i32.to_be_bytes().to_vec();
        if flexible {
            out.push(0);
        }
        if version >= 3 {
            out.extend_from_slice(&0i32.to_be_bytes());
        }
        if flexible {
            put_uvarint(&mut out, brokers.len() as u64 + 1);
        } else {
            out.extend_from_slice(&(brokers.len() as i32).to_be_bytes());
        }
        for (id, host, port, rack) in brokers {
            out.extend_from_slice(&id.to_be_bytes());
            put_string(&mut out, host, flexible);
            out.extend_from_slice(&port.to_be_bytes());
            if version >= 1 {
                match (rack, flexible) {
                    (Some(r), _) => put_string(&mut out, r, flexible),
                    (None, true) => out.push(0),
                    (None, false) => out.extend_from_slice(&(-1i16).to_be_bytes()),
                }
            }
            if flexible {
                out.push(0);
            }
        }
        out.extend_from_slice(tail);
        out
    }

    /// The brokers of a Metadata answer, read back.
    fn brokers_of(frame: &[u8], version: i16) -> Vec<(String, i32)> {
        let mut seen = Vec::new();
        rewrite_metadata(frame, version, &mut |h, p| {
            seen.push((h.to_owned(), p));
            None
        })
        .unwrap();
        seen
    }

    #[test]
    fn metadata_names_the_proxy_in_every_version() {
        for version in 0..=12 {
            let brokers = vec![(111, "127.0.0.1".to_owned(), 9092, Some("rack-a".to_owned()))];
            let frame = metadata(version, &brokers, b"topics and the rest");
            let out = rewrite_metadata(&frame, version, &mut |_, _| Some(("127.0.0.1".into(), 40001))).unwrap();
            assert_eq!(brokers_of(&out, version), [("127.0.0.1".to_owned(), 40001)], "v{version}");
            assert!(out.ends_with(b"topics and the rest"));
        }
    }

    #[test]
    fn find_coordinator_names_the_proxy_in_every_version() {
        // v2 (not flexible): throttle, error code, message, node, host, port.
        let mut v2 = 9i32.to_be_bytes().to_vec();
        v2.extend_from_slice(&0i32.to_be_bytes());
        v2.extend_from_slice(&0i16.to_be_bytes());
        v2.extend_from_slice(&(-1i16).to_be_bytes());
        v2.extend_from_slice(&111i32.to_be_bytes());
        put_string(&mut v2, "localhost", false);
        v2.extend_from_slice(&9092i32.to_be_bytes());
        let out = rewrite_find_coordinator(&v2, 2, &mut |h, p| {
            assert_eq!((h, p), ("localhost", 9092));
            Some(("127.0.0.1".into(), 5))
        })
        .unwrap();
        let mut want = v2[..16].to_vec(); // correlation id, throttle, error, message, node id
        put_string(&mut want, "127.0.0.1", false);
        want.extend_from_slice(&5i32.to_be_bytes());
        assert_eq!(out, want);

        // v4 (a list of coordinators, one per group asked about).
        let mut v4 = 9i32.to_be_bytes().to_vec();
        v4.push(0); // header tags
        v4.extend_from_slice(&0i32.to_be_bytes());
        put_uvarint(&mut v4, 2);
        put_string(&mut v4, "group-1", true);
        v4.extend_from_slice(&111i32.to_be_bytes());
        put_string(&mut v4, "localhost", true);
        v4.extend_from_slice(&9092i32.to_be_bytes());
        v4.extend_from_slice(&0i16.to_be_bytes());
        v4.push(0); // null message
        v4.push(0); // tags
        v4.push(0); // body tags
        let mut asked = Vec::new();
        let out = rewrite_find_coordinator(&v4, 4, &mut |h, p| {
            asked.push((h.to_owned(), p));
            Some(("127.0.0.1".into(), 6))
        })
        .unwrap();
        assert_eq!(asked, [("localhost".to_owned(), 9092)]);
        let again = rewrite_find_coordinator(&out, 4, &mut |h, p| {
            assert_eq!((h, p), ("127.0.0.1", 6));
            None
        })
        .unwrap();
        assert_eq!(again, out);
    }

    #[test]
    fn an_error_answer_without_a_coordinator_is_kept() {
        let mut v1 = 9i32.to_be_bytes().to_vec();
        v1.extend_from_slice(&0i32.to_be_bytes());
        v1.extend_from_slice(&15i16.to_be_bytes()); // COORDINATOR_NOT_AVAILABLE
        put_string(&mut v1, "not yet", false);
        v1.extend_from_slice(&(-1i32).to_be_bytes());
        put_string(&mut v1, "", false);
        v1.extend_from_slice(&(-1i32).to_be_bytes());
        let out =
            rewrite_find_coordinator(&v1, 1, &mut |h, p| (!h.is_empty() && p >= 0).then(|| unreachable!())).unwrap();
        assert_eq!(out, v1);
    }

    proptest! {
        /// Any Metadata answer: mapping every broker to itself changes nothing; mapping them
        /// elsewhere changes exactly the addresses.
        #[test]
        fn metadata_rewrites_only_the_addresses(
            version in 0i16..=12,
            brokers in proptest::collection::vec(
                (any::<i32>(), "[a-z0-9.-]{1,40}", 0i32..65536, proptest::option::of("[a-z-]{0,12}")), 0..6),
            tail in proptest::collection::vec(any::<u8>(), 0..64),
            port in 1i32..65536,
        ) {
            let frame = metadata(version, &brokers, &tail);
            let same = rewrite_metadata(&frame, version, &mut |h, p| Some((h.to_owned(), p))).unwrap();
            prop_assert_eq!(&same, &frame);
            let moved = rewrite_metadata(&frame, version, &mut |_, _| Some(("127.0.0.1".into(), port))).unwrap();
            let want: Vec<_> = brokers
                .iter()
                .map(|(id, _, _, rack)| (*id, "127.0.0.1".to_owned(), port, rack.clone()))
                .collect();
            prop_assert_eq!(moved, metadata(version, &want, &tail));
        }

        /// Bytes that are not an answer are an error, never a panic.
        #[test]
        fn garbage_is_an_error_not_a_panic(version in 0i16..=12, bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = rewrite_metadata(&bytes, version, &mut |_, _| None);
            let _ = rewrite_find_coordinator(&bytes, version, &mut |_, _| None);
        }
    }
}
