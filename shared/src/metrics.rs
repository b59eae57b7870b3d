//! What the library counts, through the [`metrics`] facade: one name a measure, the same for every
//! function that uses the library.
//!
//! The library records into whatever recorder the process installed; with none, a record costs one
//! atomic load. A Lambda function installs [`crate::emf`] (feature `emf`, in `runtime`), which
//! writes one CloudWatch Embedded Metric Format document per invocation to stdout, where
//! CloudWatch Logs turns it into metrics. A user's own handler records into the same document
//! with the facade's macros:
//!
//! ```
//! metrics::counter!("OrdersRejected").increment(1);
//! ```
//!
//! Dimensions are kept few, as CloudWatch bills and limits per dimension combination: the
//! function's name (set once by [`crate::emf`]), plus the stream ([`STREAM`]) for pull metrics
//! and the bucket ([`BUCKET`]) for push metrics. Never a partition key, user or object key.
//!
//! | metric | unit | recorded by |
//! |---|---|---|
//! | [`RECORDS_IN`] | Count | pull: records in the batch (user records inside aggregates counted one by one) |
//! | [`RECORDS_PROCESSED`] | Count | pull: records handled successfully |
//! | [`RECORDS_FAILED`] | Count | pull: records reported failed (partial batch response), or not reached (the deadline; an SQS FIFO message held back behind a failure in its group) |
//! | [`BATCH_SIZE`] | Count | pull: records in the invocation's batch (one value per invocation) |
//! | [`OLDEST_RECORD_AGE`] | Milliseconds | pull: now minus the oldest record's arrival time, when processing starts |
//! | [`OBJECTS`] | Count | push: S3 objects handled (one per notification record) |
//! | [`LINES_IN`] | Count | push: lines read, blank ones included |
//! | [`BYTES_READ`] | Bytes | push: object bytes read (decompressed) |
//! | [`RECORDS_SENT`] | Count | push: lines written to Kinesis |
//! | [`PUT_RECORDS_CALLS`] | Count | push: PutRecords calls, retries included |
//! | [`RESENT_ENTRIES`] | Count | push: entries resent after partial PutRecords failures |
//! | [`QUARANTINED_LINES`] | Count | push: lines sent to quarantine |
//! | [`CHECKPOINT_WRITES`] | Count | both: checkpoints written |
//! | [`CHECKPOINT_CONFLICTS`] | Count | both: checkpoint writes refused because another writer moved it |
//! | [`COLD_START`] | Count | [`crate::emf`]: 1 on a process's first invocation |
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Pull: records in the batch.
pub const RECORDS_IN: &str = "RecordsIn";
/// Pull: records handled successfully.
pub const RECORDS_PROCESSED: &str = "RecordsProcessed";
/// Pull: records reported failed, or not reached before the deadline.
pub const RECORDS_FAILED: &str = "RecordsFailed";
/// Pull: Kinesis records in the invocation's batch.
pub const BATCH_SIZE: &str = "BatchSize";
/// Pull: age of the batch's oldest record when processing starts.
pub const OLDEST_RECORD_AGE: &str = "OldestRecordAge";
/// Push: S3 objects handled.
pub const OBJECTS: &str = "Objects";
/// Push: lines read.
pub const LINES_IN: &str = "LinesIn";
/// Push: bytes read.
pub const BYTES_READ: &str = "BytesRead";
/// Push: lines written to the sink.
pub const RECORDS_SENT: &str = "RecordsSent";
/// Push: PutRecords calls.
pub const PUT_RECORDS_CALLS: &str = "PutRecordsCalls";
/// Push: entries resent after partial failures.
pub const RESENT_ENTRIES: &str = "ResentEntries";
/// Push: lines quarantined.
pub const QUARANTINED_LINES: &str = "QuarantinedLines";
/// Checkpoints written.
pub const CHECKPOINT_WRITES: &str = "CheckpointWrites";
/// Checkpoint writes refused by their condition.
pub const CHECKPOINT_CONFLICTS: &str = "CheckpointConflicts";
/// 1 on a process's first invocation.
pub const COLD_START: &str = "ColdStart";

/// The dimension naming the source of pull metrics: the Kinesis stream, the DynamoDB table whose
/// stream it is, or the SQS queue.
pub const STREAM: &str = "Stream";
/// The dimension naming the bucket of push metrics.
pub const BUCKET: &str = "Bucket";

/// Gives every metric above its unit (CloudWatch shows units; EMF carries them). Called by
/// [`crate::emf`]; a user with another recorder may call it once after installing it.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_histogram};
    for name in [
        RECORDS_IN,
        RECORDS_PROCESSED,
        RECORDS_FAILED,
        OBJECTS,
        LINES_IN,
        RECORDS_SENT,
        PUT_RECORDS_CALLS,
        RESENT_ENTRIES,
        QUARANTINED_LINES,
        CHECKPOINT_WRITES,
        CHECKPOINT_CONFLICTS,
        COLD_START,
    ] {
        describe_counter!(name, Unit::Count, "");
    }
    describe_counter!(BYTES_READ, Unit::Bytes, "");
    describe_histogram!(BATCH_SIZE, Unit::Count, "");
    describe_histogram!(OLDEST_RECORD_AGE, Unit::Milliseconds, "");
}

/// One pull batch's measures, recorded with [`PullBatch::record`].
///
/// ```
/// use pushpull::metrics::PullBatch;
///
/// PullBatch { stream: "orders".into(), batch_size: 3, records_in: 3, processed: 2, failed: 1, oldest_arrival: None }
///     .record();
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PullBatch {
    /// The source's name (the dimension): the Kinesis stream, the DynamoDB table, the SQS queue.
    pub stream: String,
    /// Records (Kinesis records, stream records, messages) in the batch.
    pub batch_size: usize,
    /// Records in the batch, user records inside aggregates counted one by one.
    pub records_in: usize,
    /// Records handled successfully.
    pub processed: usize,
    /// Records reported failed or not reached.
    pub failed: usize,
    /// The oldest record's arrival, seconds since the epoch: a Kinesis record's approximate
    /// arrival, a DynamoDB change's approximate creation time, an SQS message's sent time.
    pub oldest_arrival: Option<f64>,
}

impl PullBatch {
    /// Records the batch's measures with the [`STREAM`] dimension.
    pub fn record(&self) {
        let labels = [(STREAM, self.stream.clone())];
        metrics::counter!(RECORDS_IN, &labels).increment(self.records_in as u64);
        metrics::counter!(RECORDS_PROCESSED, &labels).increment(self.processed as u64);
        metrics::counter!(RECORDS_FAILED, &labels).increment(self.failed as u64);
        metrics::histogram!(BATCH_SIZE, &labels).record(self.batch_size as f64);
        if let Some(age) = self.oldest_arrival.and_then(|at| age_at(at, SystemTime::now())) {
            metrics::histogram!(OLDEST_RECORD_AGE, &labels).record(age.as_secs_f64() * 1000.0);
        }
    }
}

/// How long before `now` a record that arrived at `arrival` (epoch seconds) arrived; `None` for a
/// time that is not finite. A clock behind the arrival time gives zero.
pub(crate) fn age_at(arrival: f64, now: SystemTime) -> Option<Duration> {
    if !arrival.is_finite() || arrival < 0.0 {
        return None;
    }
    let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs_f64();
    Some(Duration::from_secs_f64((now - arrival).max(0.0)))
}

/// The stream's name in a Kinesis stream or consumer ARN (`arn:aws:kinesis:…:stream/NAME[/consumer/…]`).
#[cfg(feature = "kinesis")]
pub(crate) fn stream_name(arn: &str) -> Option<&str> {
    let (_, rest) = arn.split_once(":stream/")?;
    Some(rest.split('/').next().unwrap_or(rest))
}

/// One checkpoint written.
pub(crate) fn checkpoint_written() {
    metrics::counter!(CHECKPOINT_WRITES).increment(1);
}

/// One checkpoint write refused by its condition.
pub(crate) fn checkpoint_conflict() {
    metrics::counter!(CHECKPOINT_CONFLICTS).increment(1);
}

/// A metric a test saw: name, labels, value.
#[cfg(test)]
pub(crate) type Seen = (String, Vec<(String, String)>, metrics_util::debugging::DebugValue);

/// What a debugging recorder saw, sorted by name.
#[cfg(test)]
pub(crate) fn seen(snapshotter: &metrics_util::debugging::Snapshotter) -> Vec<Seen> {
    let mut out: Vec<Seen> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let labels = key.key().labels().map(|l| (l.key().to_owned(), l.value().to_owned())).collect();
            (key.key().name().to_owned(), labels, value)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    fn snapshot(f: impl FnOnce()) -> Vec<Seen> {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, f);
        seen(&snapshotter)
    }

    #[test]
    fn a_pull_batch_is_recorded_with_the_stream_dimension_only() {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        let seen = snapshot(|| {
            PullBatch {
                stream: "orders".into(),
                batch_size: 2,
                records_in: 5,
                processed: 4,
                failed: 1,
                oldest_arrival: Some(now - 3.0),
            }
            .record()
        });
        let names: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(names, [BATCH_SIZE, OLDEST_RECORD_AGE, RECORDS_FAILED, RECORDS_IN, RECORDS_PROCESSED]);
        for (_, labels, _) in &seen {
            assert_eq!(labels, &[("Stream".to_owned(), "orders".to_owned())]);
        }
        let value = |n: &str| seen.iter().find(|s| s.0 == n).map(|s| &s.2).unwrap();
        assert!(matches!(value(RECORDS_IN), DebugValue::Counter(5)));
        assert!(matches!(value(RECORDS_FAILED), DebugValue::Counter(1)));
        let DebugValue::Histogram(age) = value(OLDEST_RECORD_AGE) else { panic!("not a histogram") };
        assert!((2_900.0..10_000.0).contains(&age[0].into_inner()), "{age:?}");
    }

    #[test]
    fn ages_of_odd_timestamps() {
        let now = UNIX_EPOCH + Duration::from_secs(100);
        assert_eq!(age_at(90.5, now), Some(Duration::from_millis(9_500)));
        assert_eq!(age_at(200.0, now), Some(Duration::ZERO), "a clock behind the arrival gives zero");
        assert_eq!(age_at(f64::NAN, now), None);
        assert_eq!(age_at(-1.0, now), None);
    }

    #[test]
    #[cfg(feature = "kinesis")]
    fn stream_names_from_stream_and_consumer_arns() {
        assert_eq!(stream_name("arn:aws:kinesis:us-east-1:1:stream/s/consumer/c:1"), Some("s"));
        assert_eq!(stream_name("arn:aws:sqs:us-east-1:1:q"), None);
    }
}
