//! Sending records to Kinesis with PutRecords: partial failures resent with backoff.
//!
//! PutRecords is not atomic: the answer says, entry by entry, what was written and what failed
//! (`ProvisionedThroughputExceededException`, `InternalFailure`). [`Producer::send`] resends only
//! the failed entries, with exponential backoff and jitter, until they are written or
//! `max_attempts` is used up. The destination is a [`RecordSink`]: [`kinesis::KinesisSink`]
//! (feature `kinesis-sink`) in production, or your own.
//!
//! ```
//! use bytes::Bytes;
//! use pushpull::sink::{OutRecord, Producer, PutOutcome, RecordSink, SinkError};
//!
//! /// Accepts everything and counts it.
//! struct Counter(std::sync::atomic::AtomicUsize);
//! impl RecordSink for Counter {
//!     async fn put_records(&self, records: &[OutRecord]) -> Result<PutOutcome, SinkError> {
//!         self.0.fetch_add(records.len(), std::sync::atomic::Ordering::Relaxed);
//!         Ok(PutOutcome::all_written("shardId-0", "1"))
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! let producer = Producer::new(Counter(Default::default()), 3);
//! let report = producer.send(vec![OutRecord::new("key", Bytes::from_static(b"{}"), 1)]).await.unwrap();
//! assert_eq!((report.records, report.calls), (1, 1));
//! # });
//! ```
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use crate::backoff::Backoff;
use crate::batch::ByteSize;
use crate::sequence::SequenceNumber;
#[doc(inline)]
pub use crate::shard_map::{ShardIndex, ShardMap};

#[cfg(feature = "kafka-sink")]
pub mod kafka;
#[cfg(feature = "kinesis-sink")]
pub mod kinesis;
#[cfg(feature = "rabbitmq-sink")]
pub mod rabbitmq;
#[cfg(feature = "redis-sink")]
pub mod redis;
#[cfg(feature = "sqs-sink")]
pub mod sqs;

/// One record to send, with the input line it came from (for error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    /// Partition key: 1 to 256 characters; picks the shard. Kept inline up to 24 bytes (no
    /// allocation per record for the usual keys).
    pub partition_key: compact_str::CompactString,
    /// The record's data.
    pub data: Bytes,
    /// The 1-based input line this record carries (an aggregate's first line); 0 from
    /// [`OutRecord::keyed`] until the push loop sets it: the line a line handler was given, or
    /// the record's place (1-based) among a whole-object handler's records.
    pub line: u64,
    /// The user records it carries: 1, or how many lines a KPL aggregate packs.
    pub user_records: u32,
    /// The object it came from (`<bucket>/<key>@<version or ETag>`), set by the push loop for a
    /// sink that names its messages ([`RecordSink::names_records`]: RabbitMQ's message id); `None`
    /// otherwise.
    pub origin: Option<std::sync::Arc<str>>,
}

impl OutRecord {
    /// A record from `line` of the input.
    pub fn new(partition_key: impl Into<compact_str::CompactString>, data: Bytes, line: u64) -> Self {
        OutRecord { partition_key: partition_key.into(), data, line, user_records: 1, origin: None }
    }

    /// A record of the line a line handler is given (or of a whole-object handler's object): the
    /// push loop notes which line it is (or its place among the object's records).
    ///
    /// ```
    /// let r = pushpull::sink::OutRecord::keyed("ann", bytes::Bytes::from_static(b"{}"));
    /// assert_eq!((r.partition_key.as_str(), r.line), ("ann", 0));
    /// ```
    pub fn keyed(partition_key: impl Into<compact_str::CompactString>, data: impl Into<Bytes>) -> Self {
        OutRecord { partition_key: partition_key.into(), data: data.into(), line: 0, user_records: 1, origin: None }
    }

    /// A KPL aggregate whose first user record came from `first_line`.
    pub fn aggregate(finished: crate::aggregation::Finished, first_line: u64) -> Self {
        OutRecord {
            partition_key: finished.partition_key.into(),
            data: finished.data,
            line: first_line,
            user_records: u32::try_from(finished.user_records).unwrap_or(u32::MAX),
            origin: None,
        }
    }

    /// The PUT payload units Kinesis bills for it: one per 25 KB of data and partition key, per
    /// record. AWS: "A PUT Payload Unit is counted in 25KB payload 'chunks' that comprise a
    /// record. For example, a 5KB record contains one PUT Payload Unit, a 45KB record contains
    /// two PUT Payload Units, and a 1MB record contains 40 PUT Payload Units"
    /// (aws.amazon.com/kinesis/pricing). The example fits a KB of 1,000 bytes (1 MB / 25 KB = 40),
    /// which also gives the higher count of the two readings, so that is what we count.
    ///
    /// ```
    /// use pushpull::sink::OutRecord;
    /// let units = |bytes: usize| OutRecord::new("k", bytes::Bytes::from(vec![0; bytes - 1]), 1).payload_units();
    /// assert_eq!((units(5_000), units(45_000), units(1_000_000), units(25_001)), (1, 2, 40, 2));
    /// ```
    pub fn payload_units(&self) -> u64 {
        self.byte_size().div_ceil(PAYLOAD_UNIT_BYTES).max(1) as u64
    }
}

/// The size of one PUT payload unit (see [`OutRecord::payload_units`]).
pub const PAYLOAD_UNIT_BYTES: usize = 25_000;

impl ByteSize for OutRecord {
    /// Kinesis counts the data and the partition key against its limits.
    fn byte_size(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }
}

/// One entry of a PutRecords call that was not written; it may be resent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedEntry {
    /// Its position in the call.
    pub index: usize,
    /// `ProvisionedThroughputExceededException`, `InternalFailure`, ...
    pub code: String,
    /// Kinesis's message.
    pub message: String,
}

/// The answer to one PutRecords call: which entries failed, and how far each shard got. Lean on
/// purpose (no per-entry result for the written ones): this is on the path of every record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutOutcome {
    /// The entries not written, in call order.
    pub failed: Vec<FailedEntry>,
    /// For each shard written to, the sequence number of the last entry written there (within a
    /// call, a shard's sequence numbers rise with the entries' order).
    pub last_written: Vec<(String, String)>,
}

impl PutOutcome {
    /// Every entry written; `shard_id` got sequence numbers up to `sequence_number`.
    pub fn all_written(shard_id: impl Into<String>, sequence_number: impl Into<String>) -> Self {
        PutOutcome { failed: Vec::new(), last_written: vec![(shard_id.into(), sequence_number.into())] }
    }

    /// Notes that an entry was written to `shard_id` as `sequence_number`.
    pub fn note_written(&mut self, shard_id: &str, sequence_number: &str) {
        match self.last_written.iter_mut().find(|(s, _)| s == shard_id) {
            Some((_, seq)) => {
                seq.clear();
                seq.push_str(sequence_number);
            }
            None => self.last_written.push((shard_id.to_owned(), sequence_number.to_owned())),
        }
    }
}

/// A record already in the stream, as read back: for telling whether records of an
/// interrupted invocation were written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenRecord {
    /// Its partition key.
    pub partition_key: String,
    /// Its data.
    pub data: Bytes,
}

/// A whole call to the sink failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
#[non_exhaustive]
pub struct SinkError {
    /// What the service or transport said, with the operation and the stream.
    pub message: String,
    /// Whether the same call may succeed later (throttling, network, 5xx).
    pub retryable: bool,
    /// The underlying error (the SDK's), when there is one.
    #[source]
    pub source: Option<std::sync::Arc<dyn std::error::Error + Send + Sync>>,
}

impl SinkError {
    /// A failure described by `message`.
    pub fn new(message: impl Into<String>, retryable: bool) -> Self {
        SinkError { message: message.into(), retryable, source: None }
    }

    /// The same, keeping `source` as its cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(std::sync::Arc::new(source));
        self
    }
}

/// Where batches of records go.
pub trait RecordSink: Send + Sync {
    /// Sends `records` in one call and says which entries failed.
    fn put_records(&self, records: &[OutRecord]) -> impl Future<Output = Result<PutOutcome, SinkError>> + Send;

    /// Whether one call keeps the records of a key in order and writes or fails them together
    /// (Kafka: a key's records go to one partition, in one Produce request). Then per-key
    /// ordering needs no more than one call at a time; otherwise (Kinesis: PutRecords fails entry
    /// by entry) a call holds at most one record of a key. The default is false.
    fn keeps_key_order_in_a_call(&self) -> bool {
        false
    }

    /// Whether the push loop should set each record's [`OutRecord::origin`] (its object), for a
    /// sink that names messages by object and line. The default is false (nothing set).
    fn names_records(&self) -> bool {
        false
    }

    /// Whether [`RecordSink::written_since`] can read records back. A sink that cannot makes a
    /// resumed object at-least-once (records sent after the last checkpoint of a crashed
    /// invocation are sent again), and the push side says so in a warning each time.
    fn can_read_back(&self) -> bool {
        false
    }

    /// Records written after `positions` (shard id → sequence number; shards not named are read
    /// from `since_ms`, epoch milliseconds) that arrived no later than `until_ms`. Used after a
    /// crash to find out which records of the interrupted work were written. The default, for
    /// sinks that cannot be read back, finds nothing.
    fn written_since(
        &self,
        positions: &BTreeMap<String, String>,
        since_ms: u64,
        until_ms: u64,
    ) -> impl Future<Output = Result<Vec<WrittenRecord>, SinkError>> + Send {
        let _ = (positions, since_ms, until_ms);
        async { Ok(Vec::new()) }
    }

    /// The open shards and their hash-key ranges, for aggregating only records bound for the
    /// same shard. A sink that cannot tell (the default) gets no aggregation.
    fn shard_map(&self) -> impl Future<Output = Result<Option<ShardMap>, SinkError>> + Send {
        async { Ok(None) }
    }
}

/// What one [`Producer::send`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SendReport {
    /// User records written (lines: an aggregate counts the lines it packs).
    pub records: usize,
    /// Kinesis records written (aggregates count one each).
    pub put_records: usize,
    /// PUT payload units of the Kinesis records written ([`OutRecord::payload_units`]).
    pub payload_units: u64,
    /// PutRecords calls made, retries included.
    pub calls: usize,
    /// Entries resent after a partial failure or a failed call.
    pub resent: usize,
    /// The highest sequence number written to each shard.
    pub positions: BTreeMap<String, SequenceNumber>,
}

impl SendReport {
    /// Adds another report's counts and keeps the higher position of each shard.
    pub fn merge(&mut self, o: SendReport) {
        self.records += o.records;
        self.put_records += o.put_records;
        self.payload_units += o.payload_units;
        self.calls += o.calls;
        self.resent += o.resent;
        for (shard, seq) in o.positions {
            let slot = self.positions.entry(shard).or_insert_with(|| seq.clone());
            if seq > *slot {
                *slot = seq;
            }
        }
    }
}

/// Records could not be written.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ProduceError {
    /// Entries still failed after every attempt.
    #[error(
        "{failed} records (first: line {first_line}) not written after {attempts} attempts; last error {code}: {message}"
    )]
    Exhausted {
        /// How many records were not written.
        failed: usize,
        /// The input line of the first of them.
        first_line: u64,
        /// Attempts made.
        attempts: u32,
        /// The last error code.
        code: String,
        /// The last error message.
        message: String,
    },
    /// The sender's time ran out ([`Producer::send_until`]: its lease needs renewing) before
    /// every record was written: the records not written are handed back, with what was.
    #[error("{} records not sent before the sender's fence", remaining.len())]
    Fenced {
        /// The records not written yet, in order.
        remaining: Vec<OutRecord>,
        /// What was written before the fence.
        written: SendReport,
    },
    /// The call was refused in a way retrying cannot fix (no such stream, access denied).
    #[error("{failed} records (first: line {first_line}) refused: {}", source.message)]
    Rejected {
        /// How many records were not written.
        failed: usize,
        /// The input line of the first of them.
        first_line: u64,
        /// What the sink said, with its own cause.
        source: SinkError,
    },
}

/// Sends batches through a [`RecordSink`], resending failed entries with backoff.
#[derive(Debug)]
pub struct Producer<S> {
    sink: S,
    max_attempts: u32,
    backoff: Backoff,
}

impl<S: RecordSink> Producer<S> {
    /// `max_attempts` counts the first try (at least 1). Backoff starts at 50 ms, doubles, and is
    /// capped at 5 s, each delay drawn uniformly from its upper half (jitter).
    pub fn new(sink: S, max_attempts: u32) -> Self {
        Producer {
            sink,
            max_attempts: max_attempts.max(1),
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(5)).with_jitter(),
        }
    }

    /// Changes the backoff's first delay and cap.
    pub fn with_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff = Backoff::new(base, max).with_jitter();
        self
    }

    /// The sink records go to.
    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// Sends one batch (at most one PutRecords call's worth) until every record is written.
    ///
    /// Order: a resent record goes after records of the same call that were written, so a key
    /// whose earlier record failed can be overtaken by its later record in the same call.
    pub async fn send(&self, pending: Vec<OutRecord>) -> Result<SendReport, ProduceError> {
        self.send_until(pending, None).await
    }

    /// As [`Producer::send`], but no call is started at or after `fence`: the records not
    /// written by then come back in [`ProduceError::Fenced`]. A sender that owns its input by a
    /// lease sets the fence before the lease lapses, so that it never writes after another has
    /// taken over (it renews, then sends the rest).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// use pushpull::sink::{Producer, ProduceError, OutRecord};
    /// # use pushpull::sink::{PutOutcome, RecordSink, SinkError, WrittenRecord};
    /// # struct Nowhere;
    /// # impl RecordSink for Nowhere {
    /// #     async fn put_records(&self, _: &[OutRecord]) -> Result<PutOutcome, SinkError> { unreachable!() }
    /// #     async fn written_since(&self, _: &std::collections::BTreeMap<String, String>, _: u64, _: u64) -> Result<Vec<WrittenRecord>, SinkError> { Ok(vec![]) }
    /// # }
    /// let producer = Producer::new(Nowhere, 3);
    /// let record = OutRecord::new("key", bytes::Bytes::from_static(b"data"), 1);
    /// let past = tokio::time::Instant::now();
    /// let Err(ProduceError::Fenced { remaining, .. }) = producer.send_until(vec![record], Some(past)).await else { panic!() };
    /// assert_eq!(remaining.len(), 1); // nothing was sent
    /// # });
    /// ```
    pub async fn send_until(
        &self,
        mut pending: Vec<OutRecord>,
        fence: Option<tokio::time::Instant>,
    ) -> Result<SendReport, ProduceError> {
        let mut report = SendReport::default();
        let users = |records: &[OutRecord]| records.iter().map(|r| r.user_records as usize).sum::<usize>();
        let (total, total_users) = (pending.len(), users(&pending));
        let mut attempt = 0;
        while !pending.is_empty() {
            if fence.is_some_and(|f| tokio::time::Instant::now() >= f) {
                report.records = total_users - users(&pending);
                report.put_records = total - pending.len();
                return Err(ProduceError::Fenced { remaining: pending, written: report });
            }
            attempt += 1;
            report.calls += 1;
            let (code, message) = match self.sink.put_records(&pending).await {
                Ok(outcome) => {
                    for (shard, text) in outcome.last_written {
                        let Ok(seq) = text.parse::<SequenceNumber>() else {
                            // Kinesis never answers such a number; a sink of one's own might. The
                            // position is then unknown: a crash's read-back starts from the time.
                            tracing::warn!(
                                shard,
                                sequence_number = text,
                                "the sink answered a sequence number that is not one; the shard's position is not recorded"
                            );
                            continue;
                        };
                        let slot = report.positions.entry(shard).or_insert_with(|| seq.clone());
                        if seq > *slot {
                            *slot = seq;
                        }
                    }
                    let mut failed_at = vec![false; pending.len()];
                    for f in &outcome.failed {
                        if let Some(slot) = failed_at.get_mut(f.index) {
                            *slot = true;
                        }
                    }
                    report.payload_units += pending
                        .iter()
                        .zip(&failed_at)
                        .filter(|(_, failed)| !**failed)
                        .map(|(r, _)| r.payload_units())
                        .sum::<u64>();
                    let Some(last) = outcome.failed.last() else { break };
                    let last = (last.code.clone(), last.message.clone());
                    pending =
                        pending.into_iter().zip(failed_at).filter(|(_, failed)| *failed).map(|(r, _)| r).collect();
                    last
                }
                Err(e) if !e.retryable => {
                    let first_line = pending.first().map_or(0, |r| r.line);
                    return Err(ProduceError::Rejected { failed: pending.len(), first_line, source: e });
                }
                Err(e) => ("CallFailed".to_owned(), e.message),
            };
            if attempt >= self.max_attempts {
                let first_line = pending.first().map_or(0, |r| r.line);
                return Err(ProduceError::Exhausted {
                    failed: pending.len(),
                    first_line,
                    attempts: attempt,
                    code,
                    message,
                });
            }
            tracing::warn!(failed = pending.len(), attempt, code, message, "PutRecords entries failed; resending them");
            report.resent += pending.len();
            tokio::time::sleep(self.backoff.delay(attempt - 1)).await;
        }
        report.records = total_users;
        report.put_records = total;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Fails the entries whose data is in `fail` on their first `times` attempts.
    struct Scripted {
        fail: Vec<&'static [u8]>,
        times: usize,
        seen: Mutex<Vec<Vec<u64>>>,
        call_error: Option<SinkError>,
    }

    impl RecordSink for Scripted {
        async fn put_records(&self, records: &[OutRecord]) -> Result<PutOutcome, SinkError> {
            let mut seen = self.seen.lock().unwrap();
            let attempt = seen.len();
            seen.push(records.iter().map(|r| r.line).collect());
            if let Some(e) = &self.call_error {
                return Err(e.clone());
            }
            let mut outcome = PutOutcome::default();
            for (index, r) in records.iter().enumerate() {
                if attempt < self.times && self.fail.contains(&&r.data[..]) {
                    outcome.failed.push(FailedEntry {
                        index,
                        code: "ProvisionedThroughputExceededException".into(),
                        message: "slow down".into(),
                    });
                } else {
                    outcome.note_written("shardId-000000000000", &r.line.to_string());
                }
            }
            Ok(outcome)
        }
    }

    fn recs(n: u64) -> Vec<OutRecord> {
        (1..=n).map(|i| OutRecord::new("k", Bytes::from(format!("r{i}")), i)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn resends_only_failed_entries() {
        let sink = Scripted { fail: vec![b"r2", b"r4"], times: 2, seen: Default::default(), call_error: None };
        let p = Producer::new(sink, 5);
        let report = p.send(recs(5)).await.unwrap();
        assert_eq!((report.records, report.calls, report.resent), (5, 3, 4));
        assert_eq!(report.positions["shardId-000000000000"].as_str(), "5");
        assert_eq!(*p.sink().seen.lock().unwrap(), vec![vec![1, 2, 3, 4, 5], vec![2, 4], vec![2, 4]]);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_max_attempts_naming_the_first_line() {
        let sink = Scripted { fail: vec![b"r3"], times: 99, seen: Default::default(), call_error: None };
        let err = Producer::new(sink, 3).send(recs(4)).await.unwrap_err();
        let ProduceError::Exhausted { failed, first_line, attempts, code, message } = err else { panic!("{err}") };
        assert_eq!((failed, first_line, attempts), (1, 3, 3));
        assert_eq!((code.as_str(), message.as_str()), ("ProvisionedThroughputExceededException", "slow down"));
    }

    #[tokio::test(start_paused = true)]
    async fn non_retryable_call_errors_stop_at_once() {
        let e = SinkError::new("ResourceNotFoundException: no stream", false);
        let sink = Scripted { fail: vec![], times: 0, seen: Default::default(), call_error: Some(e) };
        let p = Producer::new(sink, 5);
        let err = p.send(recs(2)).await.unwrap_err();
        assert!(matches!(err, ProduceError::Rejected { failed: 2, first_line: 1, .. }));
        assert_eq!(p.sink().seen.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_and_is_capped() {
        let sink = Scripted { fail: vec![], times: 0, seen: Default::default(), call_error: None };
        let p = Producer::new(sink, 5).with_backoff(Duration::from_millis(100), Duration::from_secs(1));
        for (retry, (lo, hi)) in [(0, (50, 100)), (1, (100, 200)), (3, (400, 800)), (10, (500, 1000))] {
            let d = p.backoff.delay(retry).as_millis() as u64;
            assert!((lo..=hi).contains(&d), "retry {retry}: {d} ms");
        }
    }
}
