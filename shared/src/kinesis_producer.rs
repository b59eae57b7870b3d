//! Sending records to Kinesis with PutRecords: partial failures resent with backoff.
//!
//! PutRecords is not atomic: the answer says, entry by entry, what was written and what failed
//! (`ProvisionedThroughputExceededException`, `InternalFailure`). [`Producer::send`] resends only
//! the failed entries, with exponential backoff and jitter, until they are written or
//! `max_attempts` is used up. The destination is a [`RecordSink`]: [`KinesisSink`] in production,
//! anything else (a counting sink, a fault injector) in benchmarks and tests.
//!
//! ```
//! use bytes::Bytes;
//! use pushpull::kinesis_producer::{OutRecord, Producer, PutResult, RecordSink, SinkError};
//!
//! /// Accepts everything and counts it.
//! struct Counter(std::sync::atomic::AtomicUsize);
//! impl RecordSink for Counter {
//!     async fn put_records(&self, records: &[OutRecord]) -> Result<Vec<PutResult>, SinkError> {
//!         self.0.fetch_add(records.len(), std::sync::atomic::Ordering::Relaxed);
//!         Ok(records.iter().map(|_| PutResult::Written).collect())
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! let producer = Producer::new(Counter(Default::default()), 3);
//! let report = producer.send(vec![OutRecord::new("key", Bytes::from_static(b"{}"), 1)]).await.unwrap();
//! assert_eq!((report.records, report.calls), (1, 1));
//! # });
//! ```
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use crate::batch::ByteSize;

/// One record to send, with the input line it came from (for error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    /// Partition key: 1 to 256 characters; picks the shard.
    pub partition_key: String,
    /// The record's data.
    pub data: Bytes,
    /// The 1-based input line this record carries.
    pub line: u64,
}

impl OutRecord {
    /// A record from `line` of the input.
    pub fn new(partition_key: impl Into<String>, data: Bytes, line: u64) -> Self {
        OutRecord { partition_key: partition_key.into(), data, line }
    }
}

impl ByteSize for OutRecord {
    /// Kinesis counts the data and the partition key against its limits.
    fn byte_size(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }
}

/// What happened to one entry of a PutRecords call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutResult {
    /// Written (Kinesis assigned it a sequence number).
    Written,
    /// Not written; may be resent.
    Failed {
        /// `ProvisionedThroughputExceededException`, `InternalFailure`, ...
        code: String,
        /// Kinesis's message.
        message: String,
    },
}

/// A whole PutRecords call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    /// What the service or transport said.
    pub message: String,
    /// Whether the same call may succeed later (throttling, network, 5xx).
    pub retryable: bool,
}

/// Where batches of records go.
pub trait RecordSink: Send + Sync {
    /// Sends `records` in one call; the answer has one [`PutResult`] per record, in order.
    fn put_records(&self, records: &[OutRecord]) -> impl Future<Output = Result<Vec<PutResult>, SinkError>> + Send;
}

/// A Kinesis stream.
#[derive(Debug, Clone)]
pub struct KinesisSink {
    client: aws_sdk_kinesis::Client,
    stream_name: String,
}

impl KinesisSink {
    /// Records go to `stream_name`.
    pub fn new(client: aws_sdk_kinesis::Client, stream_name: impl Into<String>) -> Self {
        KinesisSink { client, stream_name: stream_name.into() }
    }
}

impl RecordSink for KinesisSink {
    async fn put_records(&self, records: &[OutRecord]) -> Result<Vec<PutResult>, SinkError> {
        use aws_sdk_kinesis::types::PutRecordsRequestEntry;
        let entries = records
            .iter()
            .map(|r| {
                PutRecordsRequestEntry::builder()
                    .partition_key(&r.partition_key)
                    .data(aws_sdk_kinesis::primitives::Blob::new(r.data.to_vec()))
                    .build()
                    .map_err(|e| SinkError { message: format!("line {}: {e}", r.line), retryable: false })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let out =
            self.client.put_records().stream_name(&self.stream_name).set_records(Some(entries)).send().await.map_err(
                |e| SinkError {
                    message: format!("PutRecords to stream {}: {}", self.stream_name, crate::aws::describe(&e)),
                    retryable: crate::aws::is_retryable(&e),
                },
            )?;
        if out.records().len() != records.len() {
            return Err(SinkError {
                message: format!(
                    "PutRecords to stream {}: {} results for {} records",
                    self.stream_name,
                    out.records().len(),
                    records.len()
                ),
                retryable: true,
            });
        }
        Ok(out
            .records()
            .iter()
            .map(|r| match r.error_code() {
                None => PutResult::Written,
                Some(code) => PutResult::Failed {
                    code: code.to_owned(),
                    message: r.error_message().unwrap_or_default().to_owned(),
                },
            })
            .collect())
    }
}

/// What one [`Producer::send`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Records written.
    pub records: usize,
    /// PutRecords calls made, retries included.
    pub calls: usize,
    /// Entries resent after a partial failure or a failed call.
    pub resent: usize,
}

impl std::ops::AddAssign for SendReport {
    fn add_assign(&mut self, o: Self) {
        self.records += o.records;
        self.calls += o.calls;
        self.resent += o.resent;
    }
}

/// Records could not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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
    /// The call was refused in a way retrying cannot fix (no such stream, access denied).
    #[error("{failed} records (first: line {first_line}) refused: {message}")]
    Rejected {
        /// How many records were not written.
        failed: usize,
        /// The input line of the first of them.
        first_line: u64,
        /// What the service said.
        message: String,
    },
}

/// Sends batches through a [`RecordSink`], resending failed entries with backoff.
#[derive(Debug)]
pub struct Producer<S> {
    sink: S,
    max_attempts: u32,
    base_delay: Duration,
    max_delay: Duration,
}

impl<S: RecordSink> Producer<S> {
    /// `max_attempts` counts the first try (at least 1). Backoff starts at 50 ms, doubles, and is
    /// capped at 5 s, each delay drawn uniformly from its upper half (jitter).
    pub fn new(sink: S, max_attempts: u32) -> Self {
        Producer {
            sink,
            max_attempts: max_attempts.max(1),
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(5),
        }
    }

    /// Changes the backoff's first delay and cap.
    pub fn with_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.base_delay = base;
        self.max_delay = max.max(base);
        self
    }

    /// The sink records go to.
    pub fn sink(&self) -> &S {
        &self.sink
    }

    fn delay(&self, retry: u32) -> Duration {
        let exp = self.base_delay.saturating_mul(1u32 << retry.min(16)).min(self.max_delay);
        exp.mul_f64(0.5 + fastrand::f64() / 2.0)
    }

    /// Sends one batch (at most one PutRecords call's worth) until every record is written.
    ///
    /// Order: a resent record goes after records of the same call that were written, so a key
    /// whose earlier record failed can be overtaken by its later record in the same call.
    pub async fn send(&self, mut pending: Vec<OutRecord>) -> Result<SendReport, ProduceError> {
        let mut report = SendReport::default();
        let total = pending.len();
        let mut attempt = 0;
        while !pending.is_empty() {
            attempt += 1;
            report.calls += 1;
            let (code, message) = match self.sink.put_records(&pending).await {
                Ok(results) => {
                    let mut failed = Vec::new();
                    let mut last = None;
                    for (record, result) in pending.into_iter().zip(results) {
                        if let PutResult::Failed { code, message } = result {
                            failed.push(record);
                            last = Some((code, message));
                        }
                    }
                    pending = failed;
                    match last {
                        None => break,
                        Some(last) => last,
                    }
                }
                Err(e) if !e.retryable => {
                    let first_line = pending.first().map_or(0, |r| r.line);
                    return Err(ProduceError::Rejected { failed: pending.len(), first_line, message: e.message });
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
            tokio::time::sleep(self.delay(attempt - 1)).await;
        }
        report.records = total;
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
        async fn put_records(&self, records: &[OutRecord]) -> Result<Vec<PutResult>, SinkError> {
            let mut seen = self.seen.lock().unwrap();
            let attempt = seen.len();
            seen.push(records.iter().map(|r| r.line).collect());
            if let Some(e) = &self.call_error {
                return Err(e.clone());
            }
            Ok(records
                .iter()
                .map(|r| {
                    if attempt < self.times && self.fail.contains(&&r.data[..]) {
                        PutResult::Failed {
                            code: "ProvisionedThroughputExceededException".into(),
                            message: "slow down".into(),
                        }
                    } else {
                        PutResult::Written
                    }
                })
                .collect())
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
        assert_eq!(report, SendReport { records: 5, calls: 3, resent: 4 });
        assert_eq!(*p.sink().seen.lock().unwrap(), vec![vec![1, 2, 3, 4, 5], vec![2, 4], vec![2, 4]]);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_max_attempts_naming_the_first_line() {
        let sink = Scripted { fail: vec![b"r3"], times: 99, seen: Default::default(), call_error: None };
        let err = Producer::new(sink, 3).send(recs(4)).await.unwrap_err();
        assert_eq!(
            err,
            ProduceError::Exhausted {
                failed: 1,
                first_line: 3,
                attempts: 3,
                code: "ProvisionedThroughputExceededException".into(),
                message: "slow down".into()
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn non_retryable_call_errors_stop_at_once() {
        let e = SinkError { message: "ResourceNotFoundException: no stream".into(), retryable: false };
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
            let d = p.delay(retry).as_millis() as u64;
            assert!((lo..=hi).contains(&d), "retry {retry}: {d} ms");
        }
    }
}
