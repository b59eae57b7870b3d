//! A Redis stream entry as the core's record, the stream (one consumer of its group) as its
//! partition, and the event ([`pushpull::pull::redis`]).
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use base64::Engine as _;
use bytes::Bytes;
use pushpull::pull::redis::{DATA_FIELD, PARTITION_KEY_FIELD, RedisRecord, STREAMS_EVENT_SOURCE};
use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tracing::warn;

use crate::mapping::MappingError;
use crate::mapping::event::WindowPart;
use crate::mapping::outcome::Condition;
use crate::mapping::progress::WindowCheckpoint;
use crate::mapping::settings::RedisStreamSource;
use crate::mapping::source::{Partition, Record};

/// The field of a dead-letter entry that says why it is there.
pub const REASON_FIELD: &str = "pushpull-reason";
/// The field of a dead-letter entry that names the entry it was.
pub const DEAD_ID_FIELD: &str = "pushpull-id";

/// One entry read from the stream.
pub(crate) struct StreamRec {
    index: u64,
    pub(crate) id: String,
    data: Bytes,
    key: Vec<u8>,
    /// The entry's time (its id's milliseconds), unix seconds.
    added: f64,
    /// Its fields other than `data`, for the dead-letter stream.
    fields: Vec<(String, String)>,
    json: String,
}

/// The milliseconds of an entry id (`<ms>-<seq>`).
pub(crate) fn id_millis(id: &str) -> u64 {
    id.split('-').next().and_then(|ms| ms.parse().ok()).unwrap_or(0)
}

fn text(v: &redis::Value) -> Option<Vec<u8>> {
    match v {
        redis::Value::BulkString(b) => Some(b.clone()),
        redis::Value::SimpleString(s) => Some(s.as_bytes().to_vec()),
        redis::Value::VerbatimString { text, .. } => Some(text.as_bytes().to_vec()),
        redis::Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

impl StreamRec {
    /// The record of entry `entry`, delivered `deliveries` times.
    pub(crate) fn from_entry(
        index: u64,
        entry: &redis::streams::StreamId,
        source: &RedisStreamSource,
        deliveries: u64,
    ) -> Self {
        let data = entry.map.get(DATA_FIELD).and_then(text).unwrap_or_default();
        let fields = entry
            .map
            .iter()
            .filter(|(k, _)| k.as_str() != DATA_FIELD)
            .filter_map(|(k, v)| Some((k.clone(), String::from_utf8_lossy(&text(v)?).into_owned())))
            .collect::<std::collections::BTreeMap<_, _>>();
        let key =
            fields.get(PARTITION_KEY_FIELD).map_or_else(|| entry.id.as_bytes().to_vec(), |k| k.as_bytes().to_vec());
        let millis = id_millis(&entry.id);
        let record = RedisRecord {
            event_source: STREAMS_EVENT_SOURCE.to_owned(),
            stream: Some(source.stream.clone()),
            group: Some(source.group.clone()),
            channel: None,
            pattern: None,
            id: entry.id.clone(),
            timestamp: millis,
            delivery_count: Some(deliveries),
            data: base64::engine::general_purpose::STANDARD.encode(&data),
            fields,
        };
        StreamRec {
            index,
            id: entry.id.clone(),
            data: Bytes::from(data),
            key,
            added: millis as f64 / 1000.0,
            fields: record.fields.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            json: serde_json::to_string(&record).unwrap_or_default(),
        }
    }

    /// The record's data and fields, for the dead-letter stream.
    pub(crate) fn data(&self) -> &[u8] {
        &self.data
    }
}

impl Record for StreamRec {
    fn index(&self) -> u64 {
        self.index
    }
    /// The partition key the sink wrote, else the entry itself.
    fn ordering_key(&self) -> &[u8] {
        &self.key
    }
    fn data(&self) -> &[u8] {
        &self.data
    }
    fn arrival(&self) -> f64 {
        self.added
    }
    fn position(&self) -> &str {
        &self.id
    }
}

/// A connection for acknowledgements, opened again after it fails.
pub(crate) struct Link {
    client: redis::Client,
    open: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

impl Link {
    pub(crate) fn new(client: redis::Client) -> Self {
        Link { client, open: tokio::sync::Mutex::new(None) }
    }

    /// Runs `cmd` on the connection (opened if it is not), dropping the connection if it fails.
    pub(crate) async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let mut open = self.open.lock().await;
        let mut connection = match open.take() {
            Some(c) => c,
            None => connect(&self.client).await?,
        };
        let result = cmd.query_async::<T>(&mut connection).await;
        if !matches!(&result, Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout()) {
            *open = Some(connection);
        }
        result
    }

    /// [`Link::query`] for a pipeline: each command's answer.
    pub(crate) async fn query_pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> redis::RedisResult<Vec<T>> {
        let mut open = self.open.lock().await;
        let mut connection = match open.take() {
            Some(c) => c,
            None => connect(&self.client).await?,
        };
        let result = pipe.query_async::<Vec<T>>(&mut connection).await;
        if !matches!(&result, Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout()) {
            *open = Some(connection);
        }
        result
    }
}

/// A connection without the client's 500 ms response timeout (a `BLOCK` read outlasts it), with
/// a 5 s connection timeout.
pub(crate) async fn connect(client: &redis::Client) -> redis::RedisResult<MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_response_timeout(None)
        .set_connection_timeout(Some(std::time::Duration::from_secs(5)));
    client.get_multiplexed_async_connection_with_config(&config).await
}

/// The mapping's stream as the core's partition: acknowledgements through `XACK`.
pub(crate) struct StreamPartition {
    pub(crate) source: RedisStreamSource,
    pub(crate) link: Link,
    /// Entries read and not yet acknowledged or given back: the reader reads more only while it
    /// holds fewer than two batches.
    pub(crate) held: AtomicUsize,
    pub(crate) freed: Notify,
    /// Acknowledgements Redis did not take (the connection failed): those entries stay pending and
    /// come again.
    pub(crate) ack_failures: AtomicU64,
    /// Entries moved to the dead-letter stream.
    pub(crate) dead_lettered: AtomicU64,
    /// The ids of the entries in the lanes (read, not yet acknowledged or given back): a claim
    /// leaves them be.
    in_hand: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl StreamPartition {
    pub(crate) fn new(source: RedisStreamSource, client: redis::Client) -> Arc<Self> {
        Arc::new(StreamPartition {
            source,
            link: Link::new(client),
            held: AtomicUsize::new(0),
            freed: Notify::new(),
            ack_failures: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            in_hand: std::sync::Mutex::new(std::collections::HashSet::new()),
        })
    }

    /// `records` go to the lanes.
    pub(crate) fn take(&self, records: &[StreamRec]) {
        self.held.fetch_add(records.len(), Ordering::SeqCst);
        if let Ok(mut h) = self.in_hand.lock() {
            h.extend(records.iter().map(|r| r.id.clone()));
        }
    }

    /// Whether entry `id` is in the lanes.
    pub(crate) fn holds(&self, id: &str) -> bool {
        self.in_hand.lock().is_ok_and(|h| h.contains(id))
    }

    fn release(&self, records: &[StreamRec]) {
        if let Ok(mut h) = self.in_hand.lock() {
            for r in records {
                h.remove(&r.id);
            }
        }
        self.held.fetch_sub(records.len(), Ordering::SeqCst);
        self.freed.notify_waiters();
    }

    /// `XACK`s `ids`; what Redis does not take stays pending (counted, warned).
    pub(crate) async fn ack(&self, ids: &[&str]) {
        for chunk in ids.chunks(1000) {
            let mut cmd = redis::cmd("XACK");
            cmd.arg(&self.source.stream).arg(&self.source.group).arg(chunk);
            if let Err(e) = self.link.query::<u64>(&cmd).await {
                warn!(stream = %self.source.stream, entries = chunk.len(), error = %e, "XACK failed; these entries stay pending and come again");
                self.ack_failures.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
        }
    }
}

impl StreamPartition {
    /// Moves `entries` to the dead-letter stream (`<stream>:dead-letter`: the data, the entry's
    /// id, the reason), then acknowledges them. One the dead-letter stream refuses stays pending
    /// (warned).
    pub(crate) async fn dead_letter(&self, entries: &[(&StreamRec, String)]) {
        let source = &self.source;
        let target = source.dead_letter();
        let mut moved = Vec::new();
        for (rec, reason) in entries {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&target).arg("*").arg(DATA_FIELD).arg(rec.data());
            for (k, v) in &rec.fields {
                cmd.arg(k).arg(v);
            }
            cmd.arg(DEAD_ID_FIELD).arg(&rec.id).arg(REASON_FIELD).arg(reason);
            match self.link.query::<String>(&cmd).await {
                Ok(_) => {
                    warn!(stream = %source.stream, id = %rec.id, dead_letter = %target, %reason, "entry moved to the dead-letter stream");
                    moved.push(rec.id.as_str());
                }
                Err(e) => {
                    warn!(stream = %source.stream, id = %rec.id, error = %e, "could not move the entry to the dead-letter stream; it stays pending")
                }
            }
        }
        self.ack(&moved).await;
        self.dead_lettered.fetch_add(moved.len() as u64, Ordering::SeqCst);
    }
}

/// The event for `records`.
pub(crate) fn event_json(records: &[StreamRec]) -> String {
    crate::mapping::event::records_event(records.iter().map(|r| r.json.as_str()))
}

impl Partition for StreamPartition {
    type Record = StreamRec;

    fn id(&self) -> &str {
        &self.source.stream
    }

    fn encoded_len(&self, record: &StreamRec) -> usize {
        record.json.len() + 1
    }

    fn event(&self, records: &[StreamRec], _window: Option<&WindowPart<'_>>) -> String {
        event_json(records)
    }

    fn batch_info(&self, records: &[StreamRec]) -> (&'static str, Value) {
        let first = records.first().map(|r| r.id.as_str());
        let last = records.last().map(|r| r.id.as_str());
        (
            "RedisStreamBatchInfo",
            json!({"stream": self.source.stream, "group": self.source.group, "firstId": first, "lastId": last, "batchSize": records.len()}),
        )
    }

    /// Our rule, as SQS's: each `itemIdentifier` is an entry id; one that names no entry of the
    /// batch fails the whole batch.
    fn item_index(&self, batch: &[StreamRec], identifier: &Value) -> Result<usize, String> {
        let id = identifier.as_str().ok_or_else(|| format!("itemIdentifier {identifier} is not an entry id"))?;
        batch
            .iter()
            .position(|r| r.id == id)
            .ok_or_else(|| format!("itemIdentifier {id:?} names no entry of the batch"))
    }

    /// A consumer group acknowledges entries one by one: the entries a partial batch response
    /// names stay pending, every other is acknowledged.
    fn failures_stand_alone(&self) -> bool {
        true
    }

    async fn done(&self, records: &[StreamRec], _window: Option<WindowCheckpoint>) -> Result<(), MappingError> {
        let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
        self.ack(&ids).await;
        self.release(records);
        Ok(())
    }

    /// Given up after the retries: left pending with the group; claimed again (`XAUTOCLAIM`) once
    /// it has been idle `claim_idle`, and moved to the dead-letter stream after `max_deliveries`.
    /// An entry larger than the 6 MB payload alone can never be invoked: moved to the dead-letter
    /// stream at once.
    async fn take_back(&self, records: &[StreamRec], condition: Condition) -> Result<bool, MappingError> {
        if condition == Condition::MaximumPayloadSizeExceeded {
            let reason = format!("larger than the 6 MB invocation payload ({condition:?})");
            let entries: Vec<(&StreamRec, String)> = records.iter().map(|r| (r, reason.clone())).collect();
            self.dead_letter(&entries).await;
        }
        self.release(records);
        Ok(true)
    }

    async fn fence(&self) -> Result<(), MappingError> {
        Ok(())
    }

    async fn window_closed(&self) -> Result<(), MappingError> {
        Ok(())
    }
}
