//! The Kafka sink (feature `kafka-sink`): records into one topic, a key's records into one
//! partition in order, read back after a crash as the Kinesis sink is.
//!
//! - **Partitions.** A record's partition key is its Kafka key, and its partition is chosen as
//!   Kafka's own Java client chooses it (`murmur2(key) & 0x7fffffff % partitions`,
//!   `BuiltInPartitioner.partitionForKey`), so consumers that expect keys where Java puts them find
//!   them there, and a key's records keep their order.
//! - **One call** of [`RecordSink::put_records`] produces each partition's records in one Produce
//!   request (all partitions at once); a partition that fails fails its entries (retryable), the
//!   others are written.
//! - **Exactly once across crashes** is the push side's, with [`RecordSink::written_since`]: the
//!   records written to each partition after the last checkpointed offsets are read back, and
//!   the interrupted object resumes after them. Kafka's idempotent producer would only remove the
//!   duplicates of one producer session's retries (a new Lambda process is a new producer id), and
//!   its transactions are refused by the broker `make test` runs (`tests/tests/kafka_broker.rs`),
//!   so read-back is the mechanism: ARCHITECTURE.md argues it.
//!
//! The client is rskafka: the Kafka protocol in Rust, so the function cross-compiles to Lambda's
//! arm64 with nothing built in C. Plaintext only (no TLS, no SASL) in this version.
//!
//! ```no_run
//! # async fn f() -> Result<(), pushpull::sink::SinkError> {
//! use pushpull::sink::kafka::KafkaSink;
//! use pushpull::sink::{OutRecord, RecordSink};
//! let sink = KafkaSink::connect(&["127.0.0.1:9092".to_owned()], "orders").await?;
//! let outcome = sink.put_records(&[OutRecord::keyed("customer-7", "{\"total\": 3}")]).await?;
//! assert!(outcome.failed.is_empty());
//! # Ok(())
//! # }
//! ```
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rskafka::chrono::{DateTime, TimeZone, Utc};
use rskafka::client::partition::{Compression, OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;

use super::{FailedEntry, OutRecord, PutOutcome, RecordSink, SinkError, WrittenRecord};

/// Records into one Kafka topic.
pub struct KafkaSink {
    topic: String,
    /// The topic's partitions, in partition order (index = partition number).
    partitions: Vec<Arc<PartitionClient>>,
    _client: Client,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink").field("topic", &self.topic).field("partitions", &self.partitions.len()).finish()
    }
}

/// How long one call keeps retrying a broker that does not answer before it fails (retryable).
const CALL_DEADLINE: Duration = Duration::from_secs(20);

/// The wall clock as Kafka's record timestamps take it (chrono's clock feature is not built).
fn now() -> DateTime<Utc> {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn error(what: String, e: impl std::error::Error + Send + Sync + 'static, retryable: bool) -> SinkError {
    SinkError::new(format!("{what}: {e}"), retryable).with_source(e)
}

impl KafkaSink {
    /// Connects to the cluster at `bootstrap` and finds `topic`'s partitions; the topic must exist.
    pub async fn connect(bootstrap: &[String], topic: &str) -> Result<Self, SinkError> {
        let servers = bootstrap.join(",");
        let backoff = rskafka::BackoffConfig { deadline: Some(CALL_DEADLINE), ..Default::default() };
        let client = ClientBuilder::new(bootstrap.to_vec())
            .client_id("pushpull")
            .backoff_config(backoff)
            .build()
            .await
            .map_err(|e| error(format!("Kafka cluster {servers}"), e, true))?;
        let topics = client.list_topics().await.map_err(|e| error(format!("topics of {servers}"), e, true))?;
        let Some(found) = topics.into_iter().find(|t| t.name == topic) else {
            return Err(SinkError::new(format!("Kafka topic {topic} does not exist on {servers}"), false));
        };
        let mut partitions = Vec::new();
        for (expected, n) in found.partitions.iter().enumerate() {
            if *n != expected as i32 {
                return Err(SinkError::new(
                    format!("topic {topic}: partitions are not 0..{}", found.partitions.len()),
                    false,
                ));
            }
            let pc = client
                .partition_client(topic, *n, UnknownTopicHandling::Retry)
                .await
                .map_err(|e| error(format!("partition {topic}-{n}"), e, true))?;
            partitions.push(Arc::new(pc));
        }
        if partitions.is_empty() {
            return Err(SinkError::new(format!("Kafka topic {topic} has no partitions"), false));
        }
        Ok(KafkaSink { topic: topic.to_owned(), partitions, _client: client })
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The partition `key` goes to: Kafka's Java client's choice.
    pub fn partition_of(&self, key: &[u8]) -> usize {
        partition_for_key(key, self.partitions.len())
    }
}

/// Kafka's Java client: `Utils.toPositive(Utils.murmur2(keyBytes)) % numPartitions`.
pub(crate) fn partition_for_key(key: &[u8], partitions: usize) -> usize {
    (murmur2(key) & 0x7fff_ffff) as usize % partitions.max(1)
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`), seed 0x9747b28c.
pub(crate) fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

impl RecordSink for KafkaSink {
    fn can_read_back(&self) -> bool {
        true
    }

    /// A key's records go to one partition, in one Produce request, written or failed together.
    fn keeps_key_order_in_a_call(&self) -> bool {
        true
    }

    async fn put_records(&self, records: &[OutRecord]) -> Result<PutOutcome, SinkError> {
        let now = now();
        let mut by_partition: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, r) in records.iter().enumerate() {
            by_partition.entry(self.partition_of(r.partition_key.as_bytes())).or_default().push(i);
        }
        let calls = by_partition.iter().map(|(p, indices)| {
            let batch: Vec<Record> = indices
                .iter()
                .map(|i| Record {
                    key: Some(records[*i].partition_key.as_bytes().to_vec()),
                    value: Some(records[*i].data.to_vec()),
                    headers: BTreeMap::new(),
                    timestamp: now,
                })
                .collect();
            let client = self.partitions[*p].clone();
            async move { (*p, client.produce(batch, Compression::NoCompression).await) }
        });
        let mut outcome = PutOutcome::default();
        for (p, result) in futures_util::future::join_all(calls).await {
            let indices = &by_partition[&p];
            match result {
                Ok(offsets) => {
                    if let Some(last) = offsets.iter().max() {
                        outcome.note_written(&p.to_string(), &last.to_string());
                    }
                }
                Err(e) => {
                    let message = format!("Produce to {}-{p}: {e}", self.topic);
                    outcome.failed.extend(indices.iter().map(|i| FailedEntry {
                        index: *i,
                        code: "KafkaProduceFailed".to_owned(),
                        message: message.clone(),
                    }));
                }
            }
        }
        Ok(outcome)
    }

    /// `positions` name partitions by number (`"0"`, `"1"`, ...), as [`RecordSink::put_records`]
    /// reports them; a partition not named is read from the first record at or after `since_ms`.
    async fn written_since(
        &self,
        positions: &BTreeMap<String, String>,
        since_ms: u64,
        until_ms: u64,
    ) -> Result<Vec<WrittenRecord>, SinkError> {
        let mut out = Vec::new();
        for (p, client) in self.partitions.iter().enumerate() {
            let name = format!("{}-{p}", self.topic);
            let end = client
                .get_offset(OffsetAt::Latest)
                .await
                .map_err(|e| error(format!("latest offset of {name}"), e, true))?;
            // A partition without a checkpointed offset is read from `since_ms` on: records older
            // than it are not ours to find.
            let (start, from_ms) = match positions.get(&p.to_string()).map(|o| o.parse::<i64>()) {
                Some(Ok(o)) => (o + 1, 0),
                Some(Err(_)) => {
                    return Err(SinkError::new(format!("{name}: checkpointed offset is not a number"), false));
                }
                None => {
                    let at = Utc.timestamp_millis_opt(since_ms as i64).single().unwrap_or_else(now);
                    let start = match client.get_offset(OffsetAt::Timestamp(at)).await {
                        Ok(o) if o >= 0 => o,
                        // No record at or after the time: nothing written since.
                        Ok(_) => end,
                        // No answer by time: from the start, filtered by time below.
                        Err(_) => client
                            .get_offset(OffsetAt::Earliest)
                            .await
                            .map_err(|e| error(format!("earliest offset of {name}"), e, true))?,
                    };
                    (start, since_ms)
                }
            };
            let mut next = start;
            while next < end {
                let (records, _high) = client
                    .fetch_records(next, 1..4 * 1024 * 1024, 100)
                    .await
                    .map_err(|e| error(format!("Fetch {name} from {next}"), e, true))?;
                let Some(last) = records.last().map(|r| r.offset) else { break };
                for r in records {
                    let t = r.record.timestamp.timestamp_millis().max(0) as u64;
                    if t > until_ms || t < from_ms {
                        continue;
                    }
                    let key = r.record.key.map(|k| String::from_utf8_lossy(&k).into_owned()).unwrap_or_default();
                    out.push(WrittenRecord {
                        partition_key: key,
                        data: Bytes::from(r.record.value.unwrap_or_default()),
                    });
                }
                next = last + 1;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kafka's own test vectors (`UtilsTest.testMurmur2` in Apache Kafka's clients module).
    #[test]
    fn murmur2_is_kafka_s() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            (b"abc", 479_470_107),
        ];
        for (key, want) in cases {
            assert_eq!(murmur2(key) as i32, want, "{:?}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn a_key_always_goes_to_one_partition_within_range() {
        for key in ["a", "customer-7", ""] {
            let p = partition_for_key(key.as_bytes(), 12);
            assert!(p < 12);
            assert_eq!(p, partition_for_key(key.as_bytes(), 12));
        }
    }
}
