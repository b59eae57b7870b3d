//! Enhanced fan-out served locally: `SubscribeToShard` answered by the proxy itself, with records
//! pushed the moment they are written.
//!
//! Neither LocalStack nor kinesis-mock pushes: LocalStack 2026.3 answers `SubscribeToShard` with a
//! shim that polls, and kinesis-mock (0.6.0 on) wakes every second to look for new records. Here a
//! subscription reads its shard from LocalStack with GetRecords of its own (AWS's side: not counted
//! against the shard's 5 reads a second, as a consumer's pipe is not), and waits between reads on
//! a signal that the proxy raises whenever a PutRecord or PutRecords to the stream passes through
//! it, so a record written through the proxy reaches the subscriber in milliseconds. Records
//! written straight to LocalStack, around the proxy, are found by a read every
//! [`FALLBACK_READ`].
//!
//! AWS's rules kept (API Reference, SubscribeToShard):
//! - "your consumer starts receiving events of type SubscribeToShardEvent over the HTTP/2
//!   connection for up to 5 minutes, after which time you need to call SubscribeToShard again";
//!   the lifetime is [`super::RealismConfig::subscription_lifetime`].
//! - "If you call SubscribeToShard again with the same ConsumerARN and ShardId within 5 seconds
//!   of a successful call, you'll get a ResourceInUseException. If you call SubscribeToShard 5
//!   seconds or more after a successful call, the second call takes over the subscription and
//!   the previous connection expires or fails with a ResourceInUseException."
//! - "You can make one call to SubscribeToShard per second per registered consumer per shard":
//!   a second call for the pair within a second of the last one, whatever that one's outcome, is
//!   refused with `LimitExceededException`.
//! - Each consumer's pipe carries up to 2 MiB a second per shard ("receive records from a stream
//!   with throughput of up to 2 MB of data per second per shard", Developer Guide, enhanced
//!   fan-out), when the profile has Kinesis's limits.
//! - At the shard's end the last event carries `ChildShards` and no `ContinuationSequenceNumber`.
//!
//! Chosen where AWS does not say: an event with no records (a heartbeat, `MillisBehindLatest` 0)
//! every [`HEARTBEAT`] while the shard is idle. The connection is HTTP/2 without TLS when the
//! caller speaks it (the local mapping does: [`crate::http2`]); an HTTP/1.1 caller gets the same
//! event-stream frames in a chunked body.
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use bytes::Bytes;
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use super::Realism;

/// How often a subscription reads its shard when no write through the proxy signalled it.
pub const FALLBACK_READ: Duration = Duration::from_millis(200);
/// How often an idle subscription sends an event with no records.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Within this long of a successful `SubscribeToShard`, another for the same consumer and shard
/// is refused; after it, the new one takes over.
pub const TAKE_OVER_AFTER: Duration = Duration::from_secs(5);

/// An error from LocalStack, by its `__type`.
#[derive(Debug, Clone)]
pub struct AdminError {
    /// The exception's name (`ResourceNotFoundException`).
    pub kind: String,
    /// Its message.
    pub message: String,
}

/// A boxed future of a Kinesis call's JSON answer.
pub type AdminFuture<'a> = Pin<Box<dyn Future<Output = Result<Value, AdminError>> + Send + 'a>>;

/// Kinesis calls of AWS's own side (not limited, not checked against a role).
pub trait Admin: Send + Sync {
    /// Calls `op` with `body` on LocalStack.
    fn admin<'a>(&'a self, op: &'static str, body: Value) -> AdminFuture<'a>;
}

/// The subscriptions, and the signal of new records per stream.
#[derive(Default)]
pub struct Fanout {
    wakes: Mutex<HashMap<String, watch::Sender<u64>>>,
    active: Mutex<HashMap<(String, String), (Instant, u64)>>,
    /// The last call per (consumer, shard), refused or not.
    calls: Mutex<HashMap<(String, String), Instant>>,
    generation: std::sync::atomic::AtomicU64,
}

impl Fanout {
    /// Records were written to `stream`: every subscription to it reads at once.
    pub fn wake(&self, stream: &str) {
        let wakes = self.wakes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = wakes.get(stream) {
            tx.send_modify(|n| *n += 1);
        }
    }

    fn waiter(&self, stream: &str) -> watch::Receiver<u64> {
        let mut wakes = self.wakes.lock().unwrap_or_else(|p| p.into_inner());
        wakes.entry(stream.to_owned()).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    /// Notes a call for the (consumer, shard) pair at `now`: false if the last one was less than
    /// a second ago (AWS: "one call to SubscribeToShard per second per registered consumer per
    /// shard").
    fn call(&self, consumer: &str, shard: &str, now: Instant) -> bool {
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        let last = calls.insert((consumer.to_owned(), shard.to_owned()), now);
        last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
    }

    /// Takes the (consumer, shard) pair: its generation, or `None` if a subscription to it
    /// succeeded less than [`TAKE_OVER_AFTER`] ago.
    fn take(&self, consumer: &str, shard: &str, now: Instant) -> Option<u64> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let key = (consumer.to_owned(), shard.to_owned());
        if let Some((at, _)) = active.get(&key)
            && now.duration_since(*at) < TAKE_OVER_AFTER
        {
            return None;
        }
        let generation = self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        active.insert(key, (now, generation));
        Some(generation)
    }

    fn holds(&self, consumer: &str, shard: &str, generation: u64) -> bool {
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        active.get(&(consumer.to_owned(), shard.to_owned())).is_some_and(|(_, g)| *g == generation)
    }
}

/// One frame of the event stream, as `application/vnd.amazon.eventstream` writes it.
fn frame(message: Message) -> Bytes {
    let mut out = Vec::new();
    // Writing to a Vec fails only for a message over the format's 16 MiB, which an event of at
    // most 10,000 records or 10 MiB is not.
    let _ = aws_smithy_eventstream::frame::write_message_to(&message, &mut out);
    Bytes::from(out)
}

/// A `SubscribeToShardEvent` frame.
pub fn event_frame(payload: &Value) -> Bytes {
    frame(
        Message::new(payload.to_string())
            .add_header(Header::new(":message-type", HeaderValue::String("event".into())))
            .add_header(Header::new(":event-type", HeaderValue::String("SubscribeToShardEvent".into())))
            .add_header(Header::new(":content-type", HeaderValue::String("application/json".into()))),
    )
}

/// An exception frame (the subscription ends with it).
pub fn exception_frame(kind: &str, message: &str) -> Bytes {
    frame(
        Message::new(json!({ "message": message }).to_string())
            .add_header(Header::new(":message-type", HeaderValue::String("exception".into())))
            .add_header(Header::new(":exception-type", HeaderValue::String(kind.to_owned().into())))
            .add_header(Header::new(":content-type", HeaderValue::String("application/json".into()))),
    )
}

/// What a subscription was asked for.
pub struct Request {
    /// The consumer's ARN.
    pub consumer: String,
    /// The shard.
    pub shard: String,
    /// `StartingPosition` as the caller sent it.
    pub starting: Value,
}

/// A frame sent down the response body, or the connection cut.
pub type BodyFrame = Result<Frame<Bytes>, std::io::Error>;

/// Starts a subscription: `Ok(receiver of the body's frames)`, or the error to answer with.
pub async fn subscribe(
    fanout: Arc<Fanout>,
    admin: Arc<dyn Admin>,
    realism: Arc<Realism>,
    req: Request,
) -> Result<mpsc::Receiver<BodyFrame>, AdminError> {
    if !fanout.call(&req.consumer, &req.shard, Instant::now()) {
        return Err(AdminError {
            kind: "LimitExceededException".into(),
            message: format!(
                "Rate exceeded for consumer {} and shard {}: one call to SubscribeToShard per second",
                req.consumer, req.shard
            ),
        });
    }
    let described = admin.admin("DescribeStreamConsumer", json!({ "ConsumerARN": req.consumer })).await?;
    let d = &described["ConsumerDescription"];
    if d["ConsumerStatus"].as_str() != Some("ACTIVE") {
        return Err(AdminError {
            kind: "ResourceInUseException".into(),
            message: format!("Consumer {} is not ACTIVE", req.consumer),
        });
    }
    let stream = d["StreamARN"].as_str().and_then(|a| a.rsplit_once("stream/")).map(|(_, n)| n.to_owned());
    let Some(stream) = stream else {
        return Err(AdminError { kind: "ResourceNotFoundException".into(), message: "consumer has no stream".into() });
    };
    let kind = req.starting["Type"].as_str().unwrap_or_default().to_owned();
    let mut it_req = json!({ "StreamName": stream, "ShardId": req.shard, "ShardIteratorType": kind });
    if let Some(s) = req.starting.get("SequenceNumber").filter(|v| !v.is_null()) {
        it_req["StartingSequenceNumber"] = s.clone();
    }
    if let Some(t) = req.starting.get("Timestamp").filter(|v| !v.is_null()) {
        it_req["Timestamp"] = t.clone();
    }
    let Some(generation) = fanout.take(&req.consumer, &req.shard, Instant::now()) else {
        return Err(AdminError {
            kind: "ResourceInUseException".into(),
            message: format!("Another active subscription exists for consumer {} on shard {}", req.consumer, req.shard),
        });
    };
    let iterator = admin.admin("GetShardIterator", it_req).await?;
    let it = iterator["ShardIterator"].as_str().unwrap_or_default().to_owned();
    let (tx, rx) = mpsc::channel(2);
    let wake = fanout.waiter(&stream);
    let pump = Pump { fanout, admin, realism, req, stream, generation, wake, tx };
    tokio::spawn(pump.run(it));
    Ok(rx)
}

struct Pump {
    fanout: Arc<Fanout>,
    admin: Arc<dyn Admin>,
    realism: Arc<Realism>,
    req: Request,
    stream: String,
    generation: u64,
    wake: watch::Receiver<u64>,
    tx: mpsc::Sender<BodyFrame>,
}

impl Pump {
    async fn send(&self, bytes: Bytes) -> bool {
        self.tx.send(Ok(Frame::data(bytes))).await.is_ok()
    }

    async fn run(mut self, mut it: String) {
        let config = self.realism.config().clone();
        let deadline = tokio::time::Instant::now() + config.subscription_lifetime;
        let pipe = config.limits.as_ref().map(|l| l.get_bytes_per_s);
        // Before any record: the position asked for, or the shard's first sequence number.
        let mut continuation = match self.req.starting["SequenceNumber"].as_str() {
            Some(s) => s.to_owned(),
            None => self.first_sequence_number().await,
        };
        let mut last_event: Option<Instant> = None;
        loop {
            if !self.fanout.holds(&self.req.consumer, &self.req.shard, self.generation) {
                let msg = format!(
                    "Subscription for consumer {} on shard {} was taken over",
                    self.req.consumer, self.req.shard
                );
                let _ = self.send(exception_frame("ResourceInUseException", &msg)).await;
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                return; // the 5 minutes are over: the body ends normally
            }
            self.wake.borrow_and_update();
            let page = match self.admin.admin("GetRecords", json!({ "ShardIterator": it, "Limit": 10_000 })).await {
                Ok(p) => p,
                Err(e) => {
                    let _ = self.send(exception_frame("InternalFailureException", &e.message)).await;
                    return;
                }
            };
            let records = page["Records"].as_array().cloned().unwrap_or_default();
            let next = page["NextShardIterator"].as_str().filter(|s| !s.is_empty()).map(str::to_owned);
            if let Some(last) = records.last().and_then(|r| r["SequenceNumber"].as_str()) {
                continuation = last.to_owned();
            }
            let idle_long = last_event.is_none_or(|t| t.elapsed() >= HEARTBEAT);
            if !records.is_empty() || next.is_none() || idle_long {
                let bytes: usize = records.iter().map(super::proxy::entry_bytes).sum();
                let mut event = json!({
                    "Records": records,
                    "MillisBehindLatest": page["MillisBehindLatest"].as_u64().unwrap_or(0),
                });
                match &next {
                    Some(_) => event["ContinuationSequenceNumber"] = Value::from(continuation.clone()),
                    None => event["ChildShards"] = self.children().await,
                }
                if self.realism.fire("kinesis.subscription.cut", config.rates.subscription_cut) {
                    let _ = self
                        .tx
                        .send(Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionReset,
                            "realism: subscription cut",
                        )))
                        .await;
                    return;
                }
                if !self.send(event_frame(&event)).await {
                    return; // the subscriber went away
                }
                last_event = Some(Instant::now());
                if let Some(rate) = pipe
                    && bytes > 0
                {
                    // The consumer's own pipe: 2 MiB a second per shard.
                    tokio::time::sleep(Duration::from_secs_f64(bytes as f64 / rate)).await;
                }
            }
            let Some(next) = next else { return };
            it = next;
            if records.is_empty() {
                tokio::select! {
                    _ = self.wake.changed() => {}
                    _ = tokio::time::sleep(FALLBACK_READ) => {}
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = self.tx.closed() => return,
                }
            }
        }
    }

    /// The shard's starting sequence number, from the stream's shard list.
    async fn first_sequence_number(&self) -> String {
        let body = json!({ "StreamName": self.stream });
        let listed = self.admin.admin("ListShards", body).await.unwrap_or_default();
        let shard = listed["Shards"].as_array().into_iter().flatten().find(|s| s["ShardId"] == self.req.shard.as_str());
        shard.and_then(|s| s["SequenceNumberRange"]["StartingSequenceNumber"].as_str()).unwrap_or("0").to_owned()
    }

    /// The shard's children (`ChildShards` of the last event), from the stream's shard list.
    async fn children(&self) -> Value {
        let mut out = Vec::new();
        let mut body = json!({ "StreamName": self.stream });
        while let Ok(v) = self.admin.admin("ListShards", body.clone()).await {
            for s in v["Shards"].as_array().into_iter().flatten() {
                let parents: Vec<&str> =
                    [&s["ParentShardId"], &s["AdjacentParentShardId"]].iter().filter_map(|p| p.as_str()).collect();
                if parents.contains(&self.req.shard.as_str()) {
                    out.push(json!({
                        "ShardId": s["ShardId"],
                        "ParentShards": parents,
                        "HashKeyRange": s["HashKeyRange"],
                    }));
                }
            }
            match v["NextToken"].as_str() {
                Some(t) => body = json!({ "NextToken": t }),
                None => break,
            }
        }
        Value::Array(out)
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        let mut active = self.fanout.active.lock().unwrap_or_else(|p| p.into_inner());
        let key = (self.req.consumer.clone(), self.req.shard.clone());
        if active.get(&key).is_some_and(|(_, g)| *g == self.generation) {
            // Ended: the pair stays taken until 5 s after the call (AWS's rule counts from the
            // call, not from the end), so only an entry older than that is dropped.
            if active.get(&key).is_some_and(|(at, _)| at.elapsed() >= TAKE_OVER_AFTER) {
                active.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_subscription_within_5_s_is_refused_and_after_it_takes_over() {
        let f = Fanout::default();
        let t0 = Instant::now();
        let g1 = f.take("c", "s-0", t0).unwrap();
        assert!(f.take("c", "s-0", t0 + Duration::from_secs(4)).is_none(), "within 5 s: ResourceInUse");
        assert!(f.take("c", "s-1", t0).is_some(), "another shard is another pair");
        assert!(f.take("d", "s-0", t0).is_some(), "another consumer is another pair");
        let g2 = f.take("c", "s-0", t0 + Duration::from_secs(5)).unwrap();
        assert!(g2 > g1 && !f.holds("c", "s-0", g1) && f.holds("c", "s-0", g2), "the old one lost it");
    }

    /// API Reference, SubscribeToShard: "You can make one call to SubscribeToShard per second per
    /// registered consumer per shard."
    #[test]
    fn one_call_a_second_per_consumer_and_shard() {
        let f = Fanout::default();
        let t0 = Instant::now();
        assert!(f.call("c", "s-0", t0));
        assert!(!f.call("c", "s-0", t0 + Duration::from_millis(900)), "within a second");
        assert!(f.call("c", "s-1", t0) && f.call("d", "s-0", t0), "other pairs are counted apart");
        assert!(f.call("c", "s-0", t0 + Duration::from_millis(1900)), "a second after the refused call");
    }

    #[test]
    fn frames_read_back_as_the_sdk_reads_them() {
        let bytes = event_frame(&json!({"Records": [], "MillisBehindLatest": 0, "ContinuationSequenceNumber": "1"}));
        let m = aws_smithy_eventstream::frame::read_message_from(bytes).unwrap();
        let header = |name: &str| m.headers().iter().find(|h| h.name().as_str() == name).map(|h| h.value().clone());
        assert_eq!(header(":event-type"), Some(HeaderValue::String("SubscribeToShardEvent".into())));
        assert_eq!(serde_json::from_slice::<Value>(m.payload()).unwrap()["ContinuationSequenceNumber"], "1");
        let e =
            aws_smithy_eventstream::frame::read_message_from(exception_frame("ResourceInUseException", "x")).unwrap();
        assert!(e.headers().iter().any(|h| h.name().as_str() == ":exception-type"));
    }
}
