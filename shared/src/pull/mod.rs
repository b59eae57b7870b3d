//! The pull side: a batch from an event source mapping, processed record by record, answered
//! with the partial batch response each source's mapping reads.
//!
//! You write one handler per record. The engine here runs it over the batch in order, or
//! concurrently with order kept per key ([`Options::per_key`]: the Kinesis partition key, the
//! DynamoDB item's keys, the SQS FIFO message group), catches each record's outcome (a handler
//! error, a record that does not decode or parse, a panic), can stop at the first failure
//! ([`Options::stop_at_first_failure`]) and can stop before the invocation times out
//! ([`Options::stop_before_deadline`]), reporting the records it did not reach as failures
//! instead of losing the whole batch to a timeout.
//!
//! The response follows each source's rule ([`ResponseRule`]):
//! - **Kinesis and DynamoDB Streams** (streams): AWS: "If the `batchItemFailures` array contains
//!   multiple items, Lambda uses the record with the lowest sequence number as the checkpoint.
//!   Lambda then retries all records starting from that checkpoint." (Lambda developer guide,
//!   "Configuring partial batch response" for Kinesis and DynamoDB event sources). So every failed
//!   record is listed, and of the records not reached only the lowest is needed, when no failure
//!   comes before it.
//! - **SQS**: each listed message is retried on its own and every other message is deleted, so
//!   every failed AND every message not reached is listed. AWS: "If you're using this feature with
//!   a FIFO queue, your function should stop processing messages after the first failure and
//!   return all failed and unprocessed messages in batchItemFailures. This helps preserve the
//!   ordering of messages in your queue." (Lambda developer guide, "Handling errors for an SQS
//!   event source in Lambda", services-sqs-errorhandling.html, "Implementing partial batch
//!   responses").
//!
//! Source modules: [`kinesis`] (feature `kinesis`), [`dynamodb`] (feature `dynamodb`),
//! [`sqs`] (feature `sqs`).
// Without a source feature the engine has no caller; its types stay for users of the core.
#![cfg_attr(
    not(any(feature = "kinesis", feature = "sqs", feature = "dynamodb", feature = "kafka", feature = "rabbitmq")),
    allow(dead_code)
)]

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::time::Duration;

use futures_util::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

#[cfg(feature = "dynamodb")]
pub mod dynamodb;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "kinesis")]
pub mod kinesis;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqs")]
pub mod sqs;

pub use crate::ndjson::{LineError, fields};
pub use crate::sequence::{Position, SequenceNumber, SequenceNumberError};

/// Starts the helper threads that read and check large batches on every vCPU now, instead of at
/// the first such batch: a function on `pushpull::lambda::run_raw` that reads with
/// [`crate::kinesis_event::KinesisEvent::from_slice_parallel`] or works with
/// [`kinesis::in_parts`] calls it in `main`, so that its first batch does not wait for a thread to
/// start (the runners of `pushpull::lambda` do). One thread fewer than the vCPUs the process may
/// use; none on one.
///
/// ```
/// pushpull::pull::start_helpers();
/// ```
pub fn start_helpers() {
    crate::parallel::start();
}

/// How a batch is processed.
///
/// ```
/// use std::time::Duration;
/// use pushpull::pull::Options;
/// let options = Options::default().per_key(16).stop_before_deadline(Duration::from_secs(2));
/// assert_eq!(options.concurrency(), 16);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Options {
    concurrency: Option<usize>,
    stop_at_first_failure: bool,
    deadline_margin: Option<Duration>,
    stop_at: Option<Instant>,
}

impl Options {
    /// Records one at a time, in batch order (the default).
    pub fn in_order(mut self) -> Self {
        self.concurrency = None;
        self
    }

    /// Up to `concurrency` keys at a time, each key's records in order (async handlers only; a
    /// synchronous handler always runs in order). A failure stops the rest of its key's records.
    pub fn per_key(mut self, concurrency: usize) -> Self {
        self.concurrency = Some(concurrency.max(1));
        self
    }

    /// Stop at the first failed record: no record starts after it. Use it when handling a record
    /// twice costs (money, a non-idempotent side effect), or to keep a contiguous processed
    /// prefix; SQS FIFO queues want it (AWS, above).
    pub fn stop_at_first_failure(mut self, stop: bool) -> Self {
        self.stop_at_first_failure = stop;
        self
    }

    /// Stop `margin` before the invocation's deadline: records not finished by then are reported
    /// as failures (the mapping delivers them again) and the function answers in time. Records
    /// still running at that moment are cancelled, so a handler must be safe to cancel at an
    /// `.await` (or finish well within the margin).
    pub fn stop_before_deadline(mut self, margin: Duration) -> Self {
        self.deadline_margin = Some(margin);
        self
    }

    /// These options for one invocation: with [`Options::stop_before_deadline`], the moment to
    /// stop is the invocation's deadline less the margin.
    pub fn for_invocation(mut self, invocation: &crate::invocation::Invocation) -> Self {
        self.stop_at = self.deadline_margin.and_then(|m| invocation.stop_at(m));
        self
    }

    /// Stop at this instant (what [`Options::for_invocation`] sets).
    pub fn stop_at(mut self, at: Option<Instant>) -> Self {
        self.stop_at = at;
        self
    }

    /// How many keys run at once (1: in order).
    pub fn concurrency(&self) -> usize {
        self.concurrency.unwrap_or(1)
    }

    /// Whether the batch stops at its first failure.
    pub fn stops_at_first_failure(&self) -> bool {
        self.stop_at_first_failure
    }

    fn past_deadline(&self) -> bool {
        self.stop_at.is_some_and(|at| Instant::now() >= at)
    }
}

/// How the source's mapping reads the response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResponseRule {
    /// Kinesis, DynamoDB Streams: the mapping resumes from the lowest identifier listed.
    #[default]
    Stream,
    /// SQS: every listed message is retried, every other one deleted.
    Queue,
}

/// A record that was not processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Its position in the batch (0-based).
    pub index: usize,
    /// What the response names it by (sequence number, message id).
    pub item_identifier: String,
    /// Why it failed.
    pub reason: String,
}

/// Why a record was not attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotAttempted {
    /// An earlier record failed and the batch (or its key) stops there.
    AfterFailure,
    /// The invocation was about to time out.
    Deadline,
}

/// A record the handler did not finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unprocessed {
    /// Its position in the batch (0-based).
    pub index: usize,
    /// What the response names it by.
    pub item_identifier: String,
    /// Why it was not processed.
    pub why: NotAttempted,
}

/// The outcome of a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchResult {
    /// Records handled successfully.
    pub processed: usize,
    /// Records that failed, in batch order.
    pub failures: Vec<Failure>,
    /// Records not handled, in batch order.
    pub unprocessed: Vec<Unprocessed>,
    /// How the response is built.
    pub rule: ResponseRule,
}

impl BatchResult {
    /// Whether the batch stopped before the deadline.
    pub fn hit_deadline(&self) -> bool {
        self.unprocessed.iter().any(|u| u.why == NotAttempted::Deadline)
    }

    /// The partial batch response, by the source's rule (see the module documentation). An
    /// empty list means the whole batch succeeded.
    pub fn response(&self) -> BatchResponse {
        BatchResponse { batch_item_failures: self.item_failures() }
    }

    /// The `batchItemFailures` entries, in batch order.
    pub fn item_failures(&self) -> Vec<BatchItemFailure> {
        let mut listed: Vec<(usize, &str)> =
            self.failures.iter().map(|f| (f.index, f.item_identifier.as_str())).collect();
        match self.rule {
            ResponseRule::Stream => {
                // The mapping resumes from the lowest listed: a record not reached needs listing
                // only when no failure comes before it.
                let first_failure = self.failures.iter().map(|f| f.index).min().unwrap_or(usize::MAX);
                if let Some(u) = self.unprocessed.iter().min_by_key(|u| u.index).filter(|u| u.index < first_failure) {
                    listed.push((u.index, &u.item_identifier));
                }
            }
            ResponseRule::Queue => {
                listed.extend(self.unprocessed.iter().map(|u| (u.index, u.item_identifier.as_str())))
            }
        }
        listed.sort_unstable_by_key(|(i, _)| *i);
        listed.dedup_by_key(|(i, _)| *i);
        listed.into_iter().map(|(_, id)| BatchItemFailure { item_identifier: id.to_owned() }).collect()
    }

    /// The first failed or unprocessed record, by batch position: where a stream resumes.
    pub fn first_failed_index(&self) -> Option<usize> {
        let f = self.failures.iter().map(|f| f.index).min();
        let u = self.unprocessed.iter().map(|u| u.index).min();
        f.into_iter().chain(u).min()
    }

    fn absorb(&mut self, outcomes: Outcomes, id_of: impl Fn(usize) -> String) {
        self.processed += outcomes.processed;
        for (index, reason) in outcomes.failed {
            self.failures.push(Failure { index, item_identifier: id_of(index), reason });
        }
        for (index, why) in outcomes.unprocessed {
            self.unprocessed.push(Unprocessed { index, item_identifier: id_of(index), why });
        }
        self.failures.sort_by_key(|f| f.index);
        self.unprocessed.sort_by_key(|u| u.index);
    }
}

/// The partial batch response (`{"batchItemFailures":[{"itemIdentifier":"..."}]}`), the same
/// shape for Kinesis, DynamoDB Streams and SQS.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchResponse {
    /// The records to retry.
    pub batch_item_failures: Vec<BatchItemFailure>,
}

/// One entry of a [`BatchResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchItemFailure {
    /// The record's sequence number (streams) or message id (SQS).
    pub item_identifier: String,
}

/// What the engine saw, by batch index.
#[derive(Debug, Default)]
pub(crate) struct Outcomes {
    processed: usize,
    failed: Vec<(usize, String)>,
    unprocessed: Vec<(usize, NotAttempted)>,
}

/// A handler's result, or its panic, as the record's outcome.
fn outcome<E: std::fmt::Display>(caught: std::thread::Result<Result<(), E>>) -> Result<(), String> {
    match caught {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(format!("handler panicked: {}", crate::error::panic_message(&*panic))),
    }
}

/// Runs `handle(i)` for `i` in `0..n`, in order, catching panics; stops as `options` say.
pub(crate) fn run_in_order<F, E>(n: usize, options: &Options, mut handle: F) -> Outcomes
where
    F: FnMut(usize) -> Result<(), E>,
    E: std::fmt::Display,
{
    let mut out = Outcomes::default();
    let mut stopped = None;
    for i in 0..n {
        if stopped.is_none() && options.past_deadline() {
            stopped = Some(NotAttempted::Deadline);
        }
        if let Some(why) = stopped {
            out.unprocessed.push((i, why));
            continue;
        }
        match outcome(catch_unwind(AssertUnwindSafe(|| handle(i)))) {
            Ok(()) => out.processed += 1,
            Err(reason) => {
                out.failed.push((i, reason));
                if options.stop_at_first_failure {
                    stopped = Some(NotAttempted::AfterFailure);
                }
            }
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Slot {
    Pending,
    Done,
    Failed(String),
    Skipped(NotAttempted),
}

/// Runs `handle(i)` for `i` in `0..keys.len()`: up to `options.concurrency()` keys at a time,
/// each key's records in batch order. Catches panics; stops as `options` say; at the deadline,
/// whatever has not finished is reported unprocessed.
pub(crate) async fn run_concurrently<F, Fut, E>(keys: &[&str], options: &Options, handle: F) -> Outcomes
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    use futures_util::StreamExt;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};

    let n = keys.len();
    // Groups of indices, keys in order of first sight; in order: one group. A failure stops the
    // rest of its key (its order would break otherwise); in order, the batch goes on as the
    // synchronous path does, unless `stop_at_first_failure`.
    let per_key = options.concurrency() > 1;
    let groups: Vec<Vec<usize>> = if !per_key {
        vec![(0..n).collect()]
    } else {
        let mut at: HashMap<&str, usize> = HashMap::new();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let g = *at.entry(key).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(i);
        }
        groups
    };
    let slots = Mutex::new(vec![Slot::Pending; n]);
    let set = |i: usize, s: Slot| {
        if let Ok(mut slots) = slots.lock() {
            slots[i] = s;
        }
    };
    let any_failed = AtomicBool::new(false);
    let (handle, any_failed, set) = (&handle, &any_failed, &set);
    let all = futures_util::stream::iter(groups.into_iter().map(|group| async move {
        let mut stopped = false;
        for i in group {
            if stopped || (options.stop_at_first_failure && any_failed.load(Ordering::Acquire)) {
                set(i, Slot::Skipped(NotAttempted::AfterFailure));
                continue;
            }
            match outcome(AssertUnwindSafe(handle(i)).catch_unwind().await) {
                Ok(()) => set(i, Slot::Done),
                Err(reason) => {
                    set(i, Slot::Failed(reason));
                    any_failed.store(true, Ordering::Release);
                    stopped = per_key;
                }
            }
        }
    }))
    .buffer_unordered(options.concurrency())
    .for_each(|()| async {});
    match options.stop_at {
        Some(at) => {
            tokio::select! {
                () = all => {}
                () = tokio::time::sleep_until(at) => {}
            }
        }
        None => all.await,
    }
    let slots = slots.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut out = Outcomes::default();
    for (i, slot) in slots.into_iter().enumerate() {
        match slot {
            Slot::Done => out.processed += 1,
            Slot::Failed(reason) => out.failed.push((i, reason)),
            Slot::Skipped(why) => out.unprocessed.push((i, why)),
            Slot::Pending => out.unprocessed.push((i, NotAttempted::Deadline)),
        }
    }
    out
}

/// A record's data is not what the handler expected (the JSON of a Kinesis record or an SQS
/// message, a DynamoDB item image).
#[derive(Debug, thiserror::Error)]
#[error("record {item}: not the expected {format}: {source}")]
#[non_exhaustive]
pub struct DecodeError {
    /// The record's identifier (sequence number, message id).
    pub item: String,
    /// What was read: `JSON`, `item`.
    pub format: &'static str,
    /// What serde said.
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

#[cfg(any(feature = "kinesis", feature = "sqs", feature = "kafka", feature = "rabbitmq", feature = "redis"))]
pub(crate) fn parse_json<'a, T: Deserialize<'a>>(
    data: &'a [u8],
    item: impl FnOnce() -> String,
) -> Result<T, DecodeError> {
    serde_json::from_slice(data).map_err(|source| DecodeError { item: item(), format: "JSON", source: source.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(r: &BatchResult) -> Vec<String> {
        r.item_failures().into_iter().map(|f| f.item_identifier).collect()
    }

    fn result(outcomes: Outcomes, rule: ResponseRule) -> BatchResult {
        let mut r = BatchResult { rule, ..Default::default() };
        r.absorb(outcomes, |i| format!("id{i}"));
        r
    }

    #[test]
    fn in_order_stops_at_first_failure_when_asked() {
        let options = Options::default().stop_at_first_failure(true);
        let out = run_in_order(4, &options, |i| if i == 1 { Err("bad") } else { Ok(()) });
        let r = result(out, ResponseRule::Stream);
        assert_eq!((r.processed, r.failures.len(), r.unprocessed.len()), (1, 1, 2));
        assert_eq!(ids(&r), ["id1"], "streams: the failure covers what follows it");
        let out = run_in_order(4, &options, |i| if i == 1 { Err("bad") } else { Ok(()) });
        assert_eq!(ids(&result(out, ResponseRule::Queue)), ["id1", "id2", "id3"], "queues: every one");
    }

    #[test]
    fn panics_fail_only_their_record() {
        let out = run_in_order(3, &Options::default(), |i| {
            if i == 0 {
                panic!("boom");
            }
            Ok::<_, String>(())
        });
        let r = result(out, ResponseRule::Stream);
        assert_eq!(r.failures[0].reason, "handler panicked: boom");
        assert_eq!(r.processed, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_stops_the_batch_and_reports_the_rest() {
        let invocation = crate::invocation::Invocation::new("r").with_time_left(Duration::from_secs(10));
        let options =
            Options::default().per_key(2).stop_before_deadline(Duration::from_secs(2)).for_invocation(&invocation);
        let keys = ["a", "a", "b", "b", "a"];
        // Each record takes 3 s: by the stop (8 s) each key has done two records and is in its
        // third; "b" has only two.
        let out = run_concurrently(&keys, &options, |i| {
            async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Ok::<_, String>(i)
            }
            .map(|r| r.map(|_| ()))
        })
        .await;
        let r = result(out, ResponseRule::Queue);
        assert_eq!(r.processed, 4);
        assert_eq!(r.unprocessed.iter().map(|u| (u.index, u.why)).collect::<Vec<_>>(), [(4, NotAttempted::Deadline)]);
        assert!(r.hit_deadline());
        assert_eq!(Instant::now() - (invocation.deadline().unwrap() - Duration::from_secs(10)), Duration::from_secs(8));
    }

    #[tokio::test(start_paused = true)]
    async fn in_order_sync_checks_the_deadline_before_each_record() {
        let invocation = crate::invocation::Invocation::new("r").with_time_left(Duration::from_secs(5));
        let options = Options::default().stop_before_deadline(Duration::from_secs(1)).for_invocation(&invocation);
        tokio::time::advance(Duration::from_secs(4)).await;
        let out = run_in_order(3, &options, |_| Ok::<_, String>(()));
        let r = result(out, ResponseRule::Stream);
        assert_eq!((r.processed, r.unprocessed.len()), (0, 3));
        assert_eq!(ids(&r), ["id0"]);
    }

    #[tokio::test]
    async fn per_key_keeps_order_within_a_key_and_stops_a_key_at_its_failure() {
        let seen = Mutex::new(Vec::new());
        let keys = ["a", "b", "a", "a", "b"];
        let out = run_concurrently(&keys, &Options::default().per_key(4), |i| {
            let seen = &seen;
            async move {
                tokio::task::yield_now().await;
                seen.lock().unwrap().push(i);
                if i == 2 { Err("bad") } else { Ok(()) }
            }
        })
        .await;
        let seen = seen.into_inner().unwrap();
        let of = |k: &str| seen.iter().copied().filter(|i| keys[*i] == k).collect::<Vec<_>>();
        assert_eq!(of("a"), [0, 2], "3 is not attempted after 2 failed");
        assert_eq!(of("b"), [1, 4]);
        let r = result(out, ResponseRule::Stream);
        assert_eq!((r.processed, r.failures.len(), r.unprocessed.len()), (3, 1, 1));
        assert_eq!(ids(&r), ["id2"]);
    }

    #[tokio::test]
    async fn in_order_async_goes_on_after_a_failure_unless_told_to_stop() {
        let keys = ["a", "b", "c"];
        let fail_first = |i: usize| async move { if i == 0 { Err("bad") } else { Ok(()) } };
        let r = result(run_concurrently(&keys, &Options::default(), fail_first).await, ResponseRule::Queue);
        assert_eq!((r.processed, ids(&r)), (2, vec!["id0".to_owned()]), "a standard queue retries only the failure");
        let stop = Options::default().stop_at_first_failure(true);
        let r = result(run_concurrently(&keys, &stop, fail_first).await, ResponseRule::Queue);
        assert_eq!((r.processed, ids(&r)), (0, vec!["id0".to_owned(), "id1".to_owned(), "id2".to_owned()]));
    }

    #[test]
    fn the_response_has_the_aws_shape() {
        let r = result(
            run_in_order(2, &Options::default(), |i| if i == 1 { Err("x") } else { Ok(()) }),
            ResponseRule::Stream,
        );
        assert_eq!(
            serde_json::to_string(&r.response()).unwrap(),
            r#"{"batchItemFailures":[{"itemIdentifier":"id1"}]}"#
        );
        let ok = result(run_in_order(2, &Options::default(), |_| Ok::<_, String>(())), ResponseRule::Stream);
        assert_eq!(serde_json::to_string(&ok.response()).unwrap(), r#"{"batchItemFailures":[]}"#);
    }
}
