//! One shard: a reader polling GetRecords, and the lanes that batch and invoke.
use pushpull::batch::{BatchConfig, Batcher, ByteSize};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::types::ShardIteratorType;
use bytes::Bytes;
use tokio::sync::{Mutex, mpsc, watch};
use tracing::{debug, info, warn};

use super::event::{MAX_PAYLOAD, Rec, WindowPart, event_json};
use super::outcome::{Condition, FailureContext, Verdict, failure_record, judge};
use super::progress::{Progress, WindowCheckpoint};
use super::{Ctx, MappingError, StartingPosition, now_unix};

/// Room for the event's envelope (window fields, brackets) besides the records.
const ENVELOPE: usize = 4096;
/// AWS ends a window early when its state passes 1 MB.
const MAX_STATE: usize = 1024 * 1024;

/// What the reader last saw: the wall time (unix s) at which a GetRecords call that found the
/// shard caught up (MillisBehindLatest 0) was made.
#[derive(Debug, Clone, Copy, Default)]
struct ReaderStatus {
    /// The reader stopped to hand the shard over: lanes finish what they hold and end, without
    /// closing their tumbling window (its state is in the checkpoint for the next owner).
    handing_over: bool,
    caught_up_at: f64,
}

type Shared = Arc<Mutex<Progress>>;

/// How a shard task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ShardEnd {
    /// Closed and every record done: its children may start.
    Finished,
    /// Asked to hand over (rebalancing, or the runner stopping): in-flight batches finished,
    /// checkpointed, and the lease released.
    HandedOver,
}

/// Reads `shard_id` while holding its lease (taken in `progress`): renews the lease every
/// `options.failover / 3`, and on `drain` finishes what is in flight and releases it.
pub(super) async fn run(
    ctx: Arc<Ctx>,
    shard_id: String,
    progress: Progress,
    start: StartingPosition,
    drain: watch::Receiver<bool>,
) -> Result<ShardEnd, MappingError> {
    let progress: Shared = Arc::new(Mutex::new(progress));
    let windows = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let r = read_and_invoke(ctx.clone(), &shard_id, progress.clone(), start, drain, windows.clone()).await;
    if r.is_err() {
        // The lanes are gone with what they held: take it off the mapping's counts (the next
        // owner reads it again from the checkpoint).
        let open = progress.lock().await.open_len();
        ctx.pending.fetch_sub(open as i64, Ordering::SeqCst);
        ctx.open_windows.fetch_sub(windows.load(Ordering::SeqCst), Ordering::SeqCst);
    }
    r
}

async fn read_and_invoke(
    ctx: Arc<Ctx>,
    shard_id: &str,
    progress: Shared,
    start: StartingPosition,
    drain: watch::Receiver<bool>,
    windows: Arc<std::sync::atomic::AtomicI64>,
) -> Result<ShardEnd, MappingError> {
    let shard_id = shard_id.to_owned();
    let shard: Arc<str> = Arc::from(shard_id.as_str());
    let (saved, written_at) = {
        let p = progress.lock().await;
        (p.saved().clone(), p.written_at())
    };
    let (kind, position) = match (&saved.after, saved.since, start) {
        (Some(after), _, _) => (ShardIteratorType::AfterSequenceNumber, Position::Sequence(after.clone())),
        (None, Some(since), _) => (ShardIteratorType::AtTimestamp, Position::Time(since)),
        (None, None, StartingPosition::TrimHorizon) => (ShardIteratorType::TrimHorizon, Position::None),
        (None, None, StartingPosition::AtTimestamp(t)) => (ShardIteratorType::AtTimestamp, Position::Time(t)),
        (None, None, StartingPosition::Latest) => {
            // Keep the place as a time, so a restart does not skip what arrives meanwhile.
            let mut p = progress.lock().await;
            p.set_since(now_unix());
            p.save().await.map_err(|source| MappingError::checkpoint(&shard_id, source))?;
            (ShardIteratorType::Latest, Position::None)
        }
    };
    info!(shard_id, ?kind, "reading shard");
    let factor = ctx.settings.parallelization_factor as usize;
    let (status_tx, status_rx) = watch::channel(ReaderStatus::default());
    let mut senders = Vec::new();
    let mut lanes = tokio::task::JoinSet::new();
    for lane_no in 0..factor {
        let (tx, rx) = mpsc::channel::<Vec<Rec>>(8);
        senders.push(tx);
        let lane = Lane {
            ctx: ctx.clone(),
            shard: shard.clone(),
            progress: progress.clone(),
            rx,
            status: status_rx.clone(),
            window: None,
            lane_no,
            windows: windows.clone(),
            written_at: written_at.clone(),
        };
        lanes.spawn(lane.run(saved.window.clone()));
    }
    let reader = {
        let (ctx, shard, progress) = (ctx.clone(), shard.clone(), progress.clone());
        async move {
            match ctx.settings.consumer_arn.clone() {
                Some(consumer) => {
                    subscribe(ctx, shard, consumer, kind, position, progress, senders, status_tx, drain).await
                }
                None => read(ctx, shard, kind, position, progress, senders, status_tx, drain).await,
            }
        }
    };
    tokio::pin!(reader);
    let mut reader_end = None;
    let mut renew = tokio::time::interval(ctx.options.failover / 3);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = &mut reader, if reader_end.is_none() => reader_end = Some(r?),
            joined = lanes.join_next() => match joined {
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => return Err(e),
                Some(Err(e)) => return Err(MappingError::Kinesis(format!("lane of {shard_id} failed: {e}"))),
                None => break,
            },
            _ = renew.tick() => {
                // The lease's heartbeat (every checkpoint renews it too): a conflict means another
                // runner took the shard, and this task stops at once.
                let mut p = progress.lock().await;
                if p.written_ago() >= ctx.options.failover / 3 {
                    p.save().await.map_err(|source| MappingError::checkpoint(&shard_id, source))?;
                }
            }
        }
    }
    let mut p = progress.lock().await;
    if reader_end == Some(ShardEnd::HandedOver) {
        p.release().await.map_err(|source| MappingError::checkpoint(&shard_id, source))?;
        info!(shard_id, "lease released");
        return Ok(ShardEnd::HandedOver);
    }
    // The shard is closed and every lane has finished its records: children may start.
    if p.saved().after.is_none() && p.saved().since.is_none() {
        p.set_since(now_unix());
    }
    p.finish();
    p.save().await.map_err(|source| MappingError::checkpoint(&shard_id, source))?;
    Ok(ShardEnd::Finished)
}

#[derive(Debug, Clone)]
enum Position {
    None,
    Sequence(String),
    Time(f64),
}

/// A starting time for Kinesis: never in the future (Kinesis refuses that).
fn starting_time(t: f64) -> aws_smithy_types::DateTime {
    aws_smithy_types::DateTime::from_secs_f64(t.min(now_unix()))
}

async fn iterator(
    ctx: &Ctx,
    shard: &str,
    kind: ShardIteratorType,
    position: &Position,
) -> Result<String, MappingError> {
    let mut req = ctx
        .clients
        .kinesis
        .get_shard_iterator()
        .stream_name(ctx.settings.stream_name())
        .shard_id(shard)
        .shard_iterator_type(kind);
    match position {
        Position::Sequence(s) => req = req.starting_sequence_number(s),
        Position::Time(t) => req = req.timestamp(starting_time(*t)),
        Position::None => {}
    }
    // Throttles (5 calls/s per shard) and transient errors are retried; a missing stream or
    // shard, or a bad position, is not.
    let mut attempt = 0u32;
    loop {
        match req.clone().send().await {
            Ok(out) => return Ok(out.shard_iterator().unwrap_or_default().to_owned()),
            Err(e) => {
                let service = e.as_service_error();
                let permanent = service.is_some_and(|se| {
                    se.is_resource_not_found_exception()
                        || se.is_invalid_argument_exception()
                        || se.is_access_denied_exception()
                });
                attempt += 1;
                if permanent || attempt > 30 {
                    return Err(MappingError::Kinesis(format!(
                        "GetShardIterator {}/{shard}: {}",
                        ctx.settings.stream_name(),
                        pushpull::aws::describe(&e)
                    )));
                }
                debug!(shard_id = %shard, error = %pushpull::aws::describe(&e), "GetShardIterator failed; retrying");
                tokio::time::sleep(Duration::from_millis(200) * attempt.min(10)).await;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn read(
    ctx: Arc<Ctx>,
    shard: Arc<str>,
    kind: ShardIteratorType,
    position: Position,
    progress: Shared,
    lanes: Vec<mpsc::Sender<Vec<Rec>>>,
    status: watch::Sender<ReaderStatus>,
    mut drain: watch::Receiver<bool>,
) -> Result<ShardEnd, MappingError> {
    if *drain.borrow() {
        return hand_over(&shard, &status);
    }
    let mut it = iterator(&ctx, &shard, kind, &position).await?;
    let mut last_read: Option<String> = None;
    let mut last_call = Instant::now() - ctx.options.poll_interval;
    let mut idle_wait = ctx.options.poll_interval;
    let mut failures = 0u32;
    let mut empties = 0u32;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until((last_call + ctx.options.poll_interval).into()) => {}
            _ = drain.changed() => {}
        }
        if *drain.borrow() {
            return hand_over(&shard, &status);
        }
        last_call = Instant::now();
        let called_at = now_unix();
        let out = match ctx.clients.kinesis.get_records().shard_iterator(&it).limit(10_000).send().await {
            Ok(out) => {
                failures = 0;
                out
            }
            Err(e) => {
                let msg = pushpull::aws::describe(&e);
                // Classified by the operation's typed error, not by its text.
                let service = e.as_service_error();
                // A throttled shard (5 reads/s, 2 MiB/s, shared by every reader) is waited out,
                // as long as it takes: not a failure that gives up.
                let throttled = service.is_some_and(|se| se.is_provisioned_throughput_exceeded_exception());
                if throttled {
                    debug!(shard_id = %shard, "GetRecords throttled; waiting");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
                failures += 1;
                if service.is_some_and(|se| se.is_expired_iterator_exception()) {
                    let (k, p) = match &last_read {
                        Some(s) => (ShardIteratorType::AfterSequenceNumber, Position::Sequence(s.clone())),
                        None => (ShardIteratorType::TrimHorizon, Position::None),
                    };
                    it = iterator(&ctx, &shard, k, &p).await?;
                } else if service.is_some_and(|se| se.is_resource_not_found_exception()) || failures > 50 {
                    return Err(MappingError::Kinesis(format!(
                        "GetRecords {}/{shard}: {msg}",
                        ctx.settings.stream_name()
                    )));
                } else {
                    warn!(shard_id = %shard, error = %msg, "GetRecords failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200) * failures.min(10)).await;
                }
                continue;
            }
        };
        let behind = out.millis_behind_latest().unwrap_or(0);
        let n = out.records().len();
        {
            let mut s = ctx.stats();
            s.counts.get_records += 1;
            if n == 0 {
                s.counts.empty_polls += 1;
            }
        }
        if !take_page(&ctx, &shard, &progress, &lanes, &status, out.records(), behind, called_at).await? {
            return Ok(ShardEnd::Finished); // the lanes stopped: the shard task is ending
        }
        if n > 0 {
            last_read = out.records().last().map(|r| r.sequence_number().to_owned());
        }
        match out.next_shard_iterator() {
            Some(next) if !next.is_empty() => it = next.to_owned(),
            _ => return Ok(closed(&ctx, &shard, &status)),
        }
        if n == 0 && behind == 0 {
            // Back off on a shard that stays empty (after three empty polls in a row, so that a
            // pause between two records does not delay the next one), up to about one call a second.
            empties += 1;
            // AWS's cadence: once a second at once; fast: a grace of three quick polls first.
            if ctx.options.polling == super::Polling::Aws {
                idle_wait = ctx.options.max_idle_poll;
            }
            if empties > 3 || ctx.options.polling == super::Polling::Aws {
                tokio::select! {
                    _ = tokio::time::sleep(idle_wait.saturating_sub(ctx.options.poll_interval)) => {}
                    _ = drain.changed() => {}
                }
                idle_wait = (idle_wait * 2).min(ctx.options.max_idle_poll);
            }
        } else {
            empties = 0;
            idle_wait = ctx.options.poll_interval;
            if behind == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(ctx.options.caught_up_poll.saturating_sub(ctx.options.poll_interval)) => {}
                    _ = drain.changed() => {}
                }
            }
        }
    }
}

/// The reader stops to hand the shard over: lanes finish what they hold and end.
fn hand_over(shard: &str, status: &watch::Sender<ReaderStatus>) -> Result<ShardEnd, MappingError> {
    status.send_modify(|s| s.handing_over = true);
    info!(shard_id = %shard, "handing the shard over: finishing what is in flight");
    // Dropping the senders ends the lanes once they are done.
    Ok(ShardEnd::HandedOver)
}

/// Until the next page, whether the shard is caught up is not known (a subscription is being
/// made again): an idle stop must not happen meanwhile.
fn not_caught_up(ctx: &Ctx, shard: &str) {
    if let Ok(mut c) = ctx.caught_up.lock() {
        c.insert(shard.to_string(), None);
    }
}

/// The shard is closed and read to its end.
fn closed(ctx: &Ctx, shard: &str, status: &watch::Sender<ReaderStatus>) -> ShardEnd {
    info!(shard_id = %shard, "shard closed: read to its end");
    // Not caught up: its children are still to be read (the supervisor clears this once they run).
    if let Ok(mut c) = ctx.caught_up.lock() {
        c.insert(shard.to_string(), None);
    }
    status.send_modify(|s| s.caught_up_at = f64::INFINITY);
    ShardEnd::Finished // dropping the senders ends the lanes once they are done
}

/// Reads `shard` through the stream consumer `consumer` with enhanced fan-out: `SubscribeToShard`,
/// then the records Kinesis pushes, page by page, to the same lanes, checkpoints and windows as
/// polling. AWS (API Reference, SubscribeToShard): events come "for up to 5 minutes, after which
/// time you need to call SubscribeToShard again"; a subscription that ends, or breaks, is made
/// again after the last record read (`AFTER_SEQUENCE_NUMBER`), so nothing is skipped or read
/// twice. A call refused because a subscription to the pair succeeded under 5 s ago
/// (`ResourceInUseException`) is made again a second later.
#[allow(clippy::too_many_arguments)]
async fn subscribe(
    ctx: Arc<Ctx>,
    shard: Arc<str>,
    consumer: String,
    kind: ShardIteratorType,
    position: Position,
    progress: Shared,
    lanes: Vec<mpsc::Sender<Vec<Rec>>>,
    status: watch::Sender<ReaderStatus>,
    mut drain: watch::Receiver<bool>,
) -> Result<ShardEnd, MappingError> {
    use aws_sdk_kinesis::types::{StartingPosition as Start, SubscribeToShardEventStream};
    if *drain.borrow() {
        return hand_over(&shard, &status);
    }
    // LATEST is "now" at the first call: a later call before any record was read starts at
    // that time, not at a later "now" that would skip what arrived in between.
    let first_call = now_unix();
    let mut subscribed = false;
    let mut last_read: Option<String> = None;
    let mut failures = 0u32;
    loop {
        if *drain.borrow() {
            return hand_over(&shard, &status);
        }
        let (k, p) = match (&last_read, &kind) {
            (Some(s), _) => (ShardIteratorType::AfterSequenceNumber, Position::Sequence(s.clone())),
            (None, ShardIteratorType::Latest) if subscribed => {
                (ShardIteratorType::AtTimestamp, Position::Time(first_call))
            }
            (None, _) => (kind.clone(), position.clone()),
        };
        let mut start = Start::builder().r#type(k);
        match p {
            Position::Sequence(s) => start = start.sequence_number(s),
            Position::Time(t) => start = start.timestamp(starting_time(t)),
            Position::None => {}
        }
        let start = start.build().map_err(|e| MappingError::Kinesis(format!("SubscribeToShard {shard}: {e}")))?;
        let call =
            ctx.clients.kinesis.subscribe_to_shard().consumer_arn(&consumer).shard_id(&*shard).starting_position(start);
        let sent = tokio::select! {
            r = call.send() => r,
            changed = drain.changed() => {
                // Asked to hand over (or the runner is gone: its sender dropped).
                if changed.is_err() || *drain.borrow() {
                    return hand_over(&shard, &status);
                }
                continue;
            }
        };
        let mut out = match sent {
            Ok(out) => {
                ctx.stats().counts.subscriptions += 1;
                subscribed = true;
                out
            }
            Err(e) => {
                ctx.stats().counts.subscription_errors += 1;
                let msg = pushpull::aws::describe(&e);
                let service = e.as_service_error();
                if service.is_some_and(|se| {
                    se.is_resource_not_found_exception()
                        || se.is_invalid_argument_exception()
                        || se.is_access_denied_exception()
                }) {
                    return Err(MappingError::Kinesis(format!("SubscribeToShard {consumer} {shard}: {msg}")));
                }
                let in_use = service.is_some_and(|se| se.is_resource_in_use_exception());
                failures += u32::from(!in_use);
                if failures > 50 {
                    return Err(MappingError::Kinesis(format!("SubscribeToShard {consumer} {shard}: {msg}")));
                }
                debug!(shard_id = %shard, error = %msg, "SubscribeToShard refused; calling again");
                let wait = if in_use { Duration::from_secs(1) } else { Duration::from_millis(200) * failures.min(10) };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = drain.changed() => {}
                }
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                ev = out.event_stream.recv() => ev,
                changed = drain.changed() => {
                    if changed.is_err() || *drain.borrow() {
                        return hand_over(&shard, &status);
                    }
                    continue;
                }
            };
            match next {
                Ok(Some(SubscribeToShardEventStream::SubscribeToShardEvent(e))) => {
                    failures = 0;
                    ctx.stats().counts.subscription_events += 1;
                    let called_at = now_unix();
                    let (records, behind) = (e.records(), e.millis_behind_latest());
                    if !take_page(&ctx, &shard, &progress, &lanes, &status, records, behind, called_at).await? {
                        return Ok(ShardEnd::Finished); // the lanes stopped: the shard task is ending
                    }
                    if let Some(r) = records.last() {
                        last_read = Some(r.sequence_number().to_owned());
                    }
                    // The shard's end: no continuation, and its children named.
                    if e.continuation_sequence_number().is_empty() || !e.child_shards().is_empty() {
                        return Ok(closed(&ctx, &shard, &status));
                    }
                }
                Ok(Some(_)) => {} // an event kind this reader does not know
                Ok(None) => {
                    not_caught_up(&ctx, &shard);
                    debug!(shard_id = %shard, "subscription ended (its 5 minutes); subscribing again");
                    break;
                }
                Err(e) => {
                    not_caught_up(&ctx, &shard);
                    ctx.stats().counts.subscription_errors += 1;
                    failures += 1;
                    warn!(shard_id = %shard, error = %pushpull::aws::describe(&e), "subscription broke off; subscribing again");
                    tokio::time::sleep(Duration::from_millis(200) * failures.min(10)).await;
                    break;
                }
            }
        }
    }
}

/// Hands a page of records (a GetRecords answer, or a `SubscribeToShardEvent`'s) to the lanes:
/// filtered, counted, registered in the shard's progress, and spread over the lanes by partition
/// key; then notes whether the shard is caught up. False when the lanes are gone.
#[allow(clippy::too_many_arguments)]
async fn take_page(
    ctx: &Arc<Ctx>,
    shard: &Arc<str>,
    progress: &Shared,
    lanes: &[mpsc::Sender<Vec<Rec>>],
    status: &watch::Sender<ReaderStatus>,
    records: &[aws_sdk_kinesis::types::Record],
    behind: i64,
    called_at: f64,
) -> Result<bool, MappingError> {
    let factor = lanes.len();
    let n = records.len();
    ctx.stats().counts.records_read += n as u64;
    ctx.settings.event_counts(&[("PolledEventCount", n as u64)]);
    if n > 0 {
        ctx.touch();
        ctx.pending.fetch_add(n as i64, Ordering::SeqCst);
        let mut per_lane: Vec<Vec<Rec>> = (0..factor).map(|_| Vec::new()).collect();
        let mut filtered_out = Vec::new();
        let mut p = progress.lock().await;
        for r in records {
            let seq = r.sequence_number().to_owned();
            let Ok(parsed) = seq.parse() else {
                return Err(MappingError::Kinesis(format!(
                    "shard {shard} returned sequence number {seq:?}, not a decimal number"
                )));
            };
            let index = p.read(&seq);
            let rec = Rec {
                shard_id: shard.clone(),
                seq: parsed,
                partition_key: r.partition_key().unwrap_or_default().to_owned(),
                data: Bytes::copy_from_slice(r.data().as_ref()),
                arrival: r.approximate_arrival_timestamp().map_or_else(now_unix, |t| t.as_secs_f64()),
                encryption: r.encryption_type().map(|e| e.as_str().to_owned()).filter(|e| e != "NONE"),
                sequence_number: seq,
                index,
            };
            // FilterCriteria: a record no filter matches is never invoked; the iterator
            // advances past it (it is done at once) and it is counted.
            if !ctx.settings.filter.is_empty() && !ctx.settings.filter.passes(&rec.data, &filter_fields(&rec)) {
                filtered_out.push(index);
                continue;
            }
            let lane = if factor == 1 {
                0
            } else {
                (xxhash_rust::xxh3::xxh3_64(rec.partition_key.as_bytes()) % factor as u64) as usize
            };
            per_lane[lane].push(rec);
        }
        if !filtered_out.is_empty() {
            let count = filtered_out.len();
            ctx.pending.fetch_sub(count as i64, Ordering::SeqCst);
            ctx.stats().counts.filtered_out += count as u64;
            ctx.settings.event_counts(&[("FilteredOutEventCount", count as u64)]);
            if p.done(filtered_out) {
                p.save().await.map_err(|source| MappingError::checkpoint(shard, source))?;
            }
        }
        drop(p);
        for (lane, recs) in lanes.iter().zip(per_lane) {
            if !recs.is_empty() && lane.send(recs).await.is_err() {
                return Ok(false);
            }
        }
    }
    if behind == 0 {
        status.send_modify(|s| s.caught_up_at = called_at);
    }
    if let Ok(mut c) = ctx.caught_up.lock() {
        c.insert(shard.to_string(), (behind == 0 && n == 0).then_some(called_at));
    }
    Ok(true)
}

struct Window {
    start: i64,
    end: i64,
    state: HashMap<String, String>,
    /// The state passed 1 MB: the next invocation is the window's final one.
    early: bool,
}

/// A record with its size in the event and its tumbling window, for the batcher.
struct Sized {
    rec: Rec,
    len: usize,
    window: Option<i64>,
}

impl ByteSize for Sized {
    fn byte_size(&self) -> usize {
        self.len
    }
}

struct Lane {
    ctx: Arc<Ctx>,
    shard: Arc<str>,
    progress: Shared,
    rx: mpsc::Receiver<Vec<Rec>>,
    status: watch::Receiver<ReaderStatus>,
    window: Option<Window>,
    lane_no: usize,
    /// This shard's open windows (the mapping-wide count is corrected by them if the task dies).
    windows: Arc<std::sync::atomic::AtomicI64>,
    /// When the lease was last written (see `progress::age`).
    written_at: Arc<std::sync::atomic::AtomicU64>,
}

/// One attempt's worth of records, with what it has used.
struct Pending {
    records: Vec<Rec>,
    retries: i64,
    invokes: u32,
    first: bool,
}

impl Lane {
    fn window_closed(&self) {
        self.ctx.open_windows.fetch_sub(1, Ordering::SeqCst);
        self.windows.fetch_sub(1, Ordering::SeqCst);
    }

    fn window_of(&self, r: &Rec) -> Option<i64> {
        let t = self.ctx.settings.tumbling_window?.as_secs() as i64;
        Some((r.arrival.floor() as i64).div_euclid(t) * t)
    }

    async fn run(mut self, saved: Option<WindowCheckpoint>) -> Result<(), MappingError> {
        if let (Some(w), Some(t)) = (saved, self.ctx.settings.tumbling_window) {
            self.open_window(w.start, t.as_secs() as i64, w.state);
        }
        let settings = self.ctx.settings.clone();
        // Batches close at BatchSize, at the payload limit, and at a tumbling-window boundary. The
        // batching window is timed here, not by the batcher: for streams it starts when the
        // previous invocation ends, not when the first record arrives.
        let config = BatchConfig::new(settings.batch_size as usize, MAX_PAYLOAD - ENVELOPE, settings.batching_window)
            .map_err(|e| MappingError::Kinesis(format!("batch settings: {e}")))?;
        let mut buf: Batcher<Sized> = Batcher::new(config);
        let mut last_window = None;
        let mut ended = false;
        let mut opened = Instant::now();
        loop {
            if ended && buf.is_empty() && self.status.borrow().handing_over {
                // The next owner carries the window on from the checkpoint.
                if self.window.take().is_some() {
                    self.window_closed();
                }
                return Ok(());
            }
            if let Some(w) = &self.window {
                let later = buf.peek().is_some_and(|r| r.window != Some(w.start));
                let reader_past_end = self.status.borrow().caught_up_at >= w.end as f64;
                let over = buf.is_empty() && self.rx.is_empty() && reader_past_end;
                if later || over || w.early || (ended && buf.is_empty()) {
                    let early = w.early || (ended && buf.is_empty() && now_unix() < w.end as f64);
                    self.finalize_window(early).await?;
                    continue;
                }
            }
            if ended && buf.is_empty() {
                return Ok(());
            }
            let full = buf.ready_len() > 0;
            let due = !buf.is_empty() && (opened.elapsed() >= settings.batching_window || ended);
            if full || due {
                let batch = buf.ready().or_else(|| buf.flush()).unwrap_or_default();
                self.deliver(batch.into_iter().map(|s| s.rec).collect()).await?;
                opened = Instant::now();
                continue;
            }
            let batch_deadline = opened + settings.batching_window;
            let watching_window = self.window.is_some() && buf.is_empty();
            tokio::select! {
                msg = self.rx.recv(), if !ended => match msg {
                    Some(v) => self.buffer(&mut buf, &mut last_window, v).await?,
                    None => ended = true,
                },
                _ = tokio::time::sleep_until(batch_deadline.into()), if !buf.is_empty() => {}
                changed = self.status.changed(), if watching_window => { if changed.is_err() { ended = true; } }
            }
            if settings.batching_window.is_zero() {
                // No window: take whatever is already waiting, without blocking.
                while let Ok(v) = self.rx.try_recv() {
                    self.buffer(&mut buf, &mut last_window, v).await?;
                }
            }
        }
    }

    /// Adds records to the batcher, closing the open batch where a tumbling window ends.
    async fn buffer(
        &mut self,
        buf: &mut Batcher<Sized>,
        last_window: &mut Option<i64>,
        records: Vec<Rec>,
    ) -> Result<(), MappingError> {
        let ctx = self.ctx.clone();
        for rec in records {
            let window = self.window_of(&rec);
            if window != *last_window {
                buf.seal();
                *last_window = window;
            }
            let len = rec.encoded_len(&ctx.settings.stream_arn);
            if let Err(too_big) = buf.push(Sized { rec, len, window }) {
                // Cannot happen with Kinesis's 1 MiB records; delivered alone if it does.
                buf.seal();
                while let Some(batch) = buf.ready() {
                    self.deliver(batch.into_iter().map(|s| s.rec).collect()).await?;
                }
                self.deliver(vec![too_big.item.rec]).await?;
            }
        }
        Ok(())
    }

    fn open_window(&mut self, start: i64, len: i64, state: HashMap<String, String>) {
        self.window = Some(Window { start, end: start + len, state, early: false });
        self.ctx.open_windows.fetch_add(1, Ordering::SeqCst);
        self.windows.fetch_add(1, Ordering::SeqCst);
    }

    fn backoff(&self, retries: i64) -> Duration {
        let o = &self.ctx.options;
        pushpull::backoff::Backoff::new(o.retry_backoff, o.max_retry_backoff).delay(retries.clamp(0, 16) as u32)
    }

    fn event(&self, records: &[Rec], window: Option<(&Window, bool, bool)>) -> String {
        let part = window.map(|(w, is_final, early)| WindowPart {
            start: w.start,
            end: w.end,
            state: &w.state,
            is_final,
            terminated_early: early,
        });
        event_json(records, &self.shard, &self.ctx.settings.stream_arn, &self.ctx.options.role_arn, part.as_ref())
    }

    /// Invokes. A failure to invoke (a throttle, a 5xx, a transport error, or any other error
    /// status) is retried here with backoff, not counted as an attempt, until the oldest record
    /// passes `MaximumRecordAgeInSeconds`; then `None`. AWS (Lambda developer guide, "Retain
    /// discarded batch records for a Kinesis Data Streams event source in Lambda"): "Before
    /// invocation: If a Lambda event source mapping is unable to invoke the function due to
    /// throttling or other issues, it retries until the records expire or exceed the maximum age
    /// configured on the event source mapping (MaximumRecordAgeInSeconds)."
    async fn invoke(
        &self,
        payload: String,
        oldest_arrival: f64,
    ) -> Result<Option<crate::invoke::Invoked>, MappingError> {
        let payload = Bytes::from(payload);
        let mut failed = 0i64;
        if super::progress::age(&self.written_at) >= self.ctx.options.failover / 2 {
            // The lease fence: no invocation on a lease not confirmed within half the failover
            // time (a runner that was paused finds out here that the shard was taken).
            let mut p = self.progress.lock().await;
            if p.written_ago() >= self.ctx.options.failover / 2 {
                p.save().await.map_err(|source| MappingError::checkpoint(&self.shard, source))?;
            }
        }
        loop {
            match self.ctx.invoker.invoke(&self.ctx.settings.function_name, payload.clone()).await {
                Ok(i) => {
                    let mut s = self.ctx.stats();
                    s.counts.invocations += 1;
                    s.last_invoke_end = self.ctx.started.elapsed();
                    drop(s);
                    self.ctx.touch();
                    return Ok(Some(i));
                }
                Err(e) => {
                    let throttle = e.is_throttle();
                    {
                        let mut s = self.ctx.stats();
                        if throttle { s.counts.throttles += 1 } else { s.counts.invoke_errors += 1 }
                    }
                    failed += 1;
                    if let Some(max_age) = self.ctx.settings.maximum_record_age
                        && now_unix() - oldest_arrival > max_age.as_secs_f64()
                    {
                        warn!(shard_id = %self.shard, error = %e, "could not invoke before the records passed MaximumRecordAgeInSeconds");
                        return Ok(None);
                    }
                    if throttle {
                        warn!(shard_id = %self.shard, error = %e, "invoke throttled or unreachable; retrying");
                    } else {
                        // Not the function's answer: AWS retries these too; the shard waits, the
                        // other shards go on.
                        warn!(shard_id = %self.shard, error = %e, "could not invoke; retrying until the records expire");
                    }
                    tokio::time::sleep(self.backoff(failed)).await;
                }
            }
        }
    }

    async fn done(&self, records: &[Rec]) -> Result<(), MappingError> {
        if records.is_empty() {
            return Ok(());
        }
        self.ctx.pending.fetch_sub(records.len() as i64, Ordering::SeqCst);
        let mut p = self.progress.lock().await;
        let moved = p.done(records.iter().map(|r| r.index));
        if let Some(w) = &self.window {
            p.set_window(Some(WindowCheckpoint { start: w.start, state: w.state.clone() }));
        }
        if moved {
            p.save().await.map_err(|source| MappingError::checkpoint(&self.shard, source))?;
        }
        Ok(())
    }

    async fn give_up(
        &self,
        records: &[Rec],
        condition: Condition,
        last: Option<(&str, Option<&str>)>,
        invokes: u32,
    ) -> Result<(), MappingError> {
        let window = self.window.as_ref().map(|w| (w, false, false));
        let payload = self.event(records, window);
        let fresh = uuid::Uuid::new_v4().to_string();
        let (request_id, function_error) = last.unwrap_or((&fresh, None));
        let function_arn = self.ctx.settings.function_arn();
        let ctx = FailureContext {
            request_id,
            function_arn: &function_arn,
            stream_arn: &self.ctx.settings.stream_arn,
            condition,
            invoke_count: invokes,
            function_error,
        };
        let record = failure_record(&ctx, &self.shard, records, now_unix());
        let (first, last_seq) = (&records[0].sequence_number, &records[records.len() - 1].sequence_number);
        self.ctx.settings.event_counts(&[("DroppedEventCount", records.len() as u64)]);
        match &self.ctx.destination {
            Some(d) => {
                let at = d.send(&record, Some(&payload), &self.shard).await?;
                self.ctx.settings.event_counts(&[("OnFailureDestinationDeliveredEventCount", records.len() as u64)]);
                warn!(shard_id = %self.shard, first, last = last_seq, count = records.len(), condition = condition.as_str(), destination = at, "records sent to the failure destination");
                let mut s = self.ctx.stats();
                match condition {
                    Condition::RecordAgeExceeded => s.counts.expired += records.len() as u64,
                    Condition::RetryAttemptsExhausted => s.counts.to_destination += records.len() as u64,
                }
            }
            None => {
                warn!(shard_id = %self.shard, first, last = last_seq, count = records.len(), condition = condition.as_str(), "records given up with no failure destination: discarded");
                self.ctx.stats().counts.discarded += records.len() as u64;
            }
        }
        self.done(records).await
    }

    /// Delivers one batch: retries, bisection, record age and the failure destination.
    async fn deliver(&mut self, batch: Vec<Rec>) -> Result<(), MappingError> {
        let settings = self.ctx.settings.clone();
        if let (Some(ws), Some(t)) = (batch.first().and_then(|r| self.window_of(r)), settings.tumbling_window)
            && self.window.is_none()
        {
            self.open_window(ws, t.as_secs() as i64, HashMap::new());
        }
        let mut queue = VecDeque::from([Pending { records: batch, retries: 0, invokes: 0, first: true }]);
        while let Some(mut p) = queue.pop_front() {
            if let Some(max_age) = settings.maximum_record_age {
                let oldest_allowed = now_unix() - max_age.as_secs_f64();
                let expired = p.records.iter().take_while(|r| r.arrival < oldest_allowed).count();
                if expired > 0 {
                    let old: Vec<Rec> = p.records.drain(..expired).collect();
                    self.give_up(&old, Condition::RecordAgeExceeded, None, p.invokes).await?;
                }
                if p.records.is_empty() {
                    continue;
                }
            }
            let window = self.window.as_ref().map(|w| (w, false, false));
            let payload = self.event(&p.records, window);
            if p.first {
                // IteratorAge as AWS measures it: when the mapping receives a batch, the time
                // since its last record was written, for every batch (failed or not; a retry or
                // a bisected half is not a new batch).
                self.record_age(&p.records);
                let now = now_unix();
                let mut s = self.ctx.stats();
                for r in &p.records {
                    s.delays.record((now - r.arrival) * 1000.0);
                }
                if let Some(tx) = &self.ctx.options.delivered {
                    let send = |data: &[u8]| {
                        let _ = tx.send(super::Delivered { hash: xxhash_rust::xxh3::xxh3_64(data), invoked_at: now });
                    };
                    for r in &p.records {
                        // Line by line: a KPL aggregate delivers each line it packs (the mapping
                        // itself passes it on whole, as AWS's does).
                        match pushpull::aggregation::deaggregate(&r.data) {
                            Ok(aggregate) => aggregate.records().for_each(|u| send(u.data)),
                            Err(_) => send(&r.data),
                        }
                    }
                }
            }
            self.ctx.stats().batch(p.records.len() as u32);
            debug!(shard_id = %self.shard, lane = self.lane_no, records = p.records.len(), first = %p.records[0].sequence_number, "invoking");
            let oldest = p.records.iter().map(|r| r.arrival).fold(f64::INFINITY, f64::min);
            let Some(invoked) = self.invoke(payload, oldest).await? else {
                // Never invoked and now too old: given up as AWS does, with the record age.
                let records = std::mem::take(&mut p.records);
                self.give_up(&records, Condition::RecordAgeExceeded, None, p.invokes).await?;
                continue;
            };
            p.invokes += 1;
            p.first = false;
            let verdict =
                judge(&invoked.answer, &p.records, settings.report_batch_item_failures, self.window.is_some());
            // AWS: FailedInvokeEventCount counts the events of a failed invocation and, with
            // partial batch responses, those of a response with batch item failures.
            let failed_events = match &verdict {
                Verdict::Success { .. } => 0,
                Verdict::RetryFrom { index, .. } => p.records.len() - index,
                Verdict::Failed { .. } => p.records.len(),
            };
            settings.event_counts(&[
                ("InvokedEventCount", p.records.len() as u64),
                ("FailedInvokeEventCount", failed_events as u64),
            ]);
            match verdict {
                Verdict::Success { state } => {
                    self.set_state(state);
                    self.done(&p.records).await?;
                }
                Verdict::RetryFrom { index, state } => {
                    self.ctx.stats().counts.partial_failures += 1;
                    self.set_state(state);
                    let ok: Vec<Rec> = p.records.drain(..index).collect();
                    self.done(&ok).await?;
                    info!(shard_id = %self.shard, from = %p.records[0].sequence_number, retries = p.retries, "partial failure: retrying from the lowest failed record");
                    // A partial failure answered normally: no functionError in the failure record.
                    self.retry_or_give_up(p, &mut queue, &invoked.request_id, None).await?;
                }
                Verdict::Failed { reason, function_error } => {
                    self.ctx.stats().counts.function_errors += 1;
                    warn!(shard_id = %self.shard, first = %p.records[0].sequence_number, records = p.records.len(), retries = p.retries, reason, "batch failed");
                    if settings.bisect_on_error && p.records.len() > 1 {
                        // Splitting does not use up a retry.
                        self.ctx.stats().counts.bisections += 1;
                        let second = p.records.split_off(p.records.len() / 2);
                        queue.push_front(Pending {
                            records: second,
                            retries: p.retries,
                            invokes: p.invokes,
                            first: false,
                        });
                        queue.push_front(Pending {
                            records: p.records,
                            retries: p.retries,
                            invokes: p.invokes,
                            first: false,
                        });
                    } else {
                        let fe = function_error.as_deref().or(Some("Unhandled"));
                        self.retry_or_give_up(p, &mut queue, &invoked.request_id, fe).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// After a failed attempt: retry `p` (first in line, after a backoff), or, with its retries
    /// used up, hand it to the failure destination.
    async fn retry_or_give_up(
        &self,
        mut p: Pending,
        queue: &mut VecDeque<Pending>,
        request_id: &str,
        function_error: Option<&str>,
    ) -> Result<(), MappingError> {
        let max = self.ctx.settings.maximum_retry_attempts;
        if max >= 0 && p.retries >= max {
            let last = Some((request_id, function_error));
            return self.give_up(&p.records, Condition::RetryAttemptsExhausted, last, p.invokes).await;
        }
        tokio::time::sleep(self.backoff(p.retries)).await;
        p.retries += 1;
        self.ctx.stats().counts.retries += 1;
        queue.push_front(p);
        Ok(())
    }

    fn set_state(&mut self, state: Option<HashMap<String, String>>) {
        if let (Some(w), Some(state)) = (self.window.as_mut(), state) {
            let size: usize = state.iter().map(|(k, v)| k.len() + v.len()).sum();
            w.early = size > MAX_STATE;
            w.state = state;
        }
    }

    fn record_age(&self, records: &[Rec]) {
        if let Some(last) = records.last() {
            let age = ((now_unix() - last.arrival) * 1000.0).max(0.0);
            crate::cloudwatch::put(
                crate::cloudwatch::LAMBDA,
                &[("FunctionName", &self.ctx.settings.function_name)],
                &[("IteratorAge", "Milliseconds", age)],
            );
            let mut s = self.ctx.stats();
            s.counts.iterator_age_ms_last = age;
            s.counts.iterator_age_ms_max = s.counts.iterator_age_ms_max.max(age);
        }
    }

    /// The window's final invocation (no records, the state so far); retried until it succeeds,
    /// as AWS does: the shard waits.
    async fn finalize_window(&mut self, early: bool) -> Result<(), MappingError> {
        let Some(w) = self.window.as_ref() else { return Ok(()) };
        let payload = self.event(&[], Some((w, true, early)));
        let start = w.start;
        let mut failures = 0i64;
        loop {
            // No records to age: retried until it is invoked.
            let Some(invoked) = self.invoke(payload.clone(), f64::INFINITY).await? else { continue };
            match judge(&invoked.answer, &[], self.ctx.settings.report_batch_item_failures, true) {
                Verdict::Success { .. } => break,
                other => {
                    self.ctx.stats().counts.function_errors += 1;
                    warn!(shard_id = %self.shard, window = start, verdict = ?other, "final window invocation failed; the shard waits and retries");
                    tokio::time::sleep(self.backoff(failures)).await;
                    failures += 1;
                    self.ctx.stats().counts.retries += 1;
                }
            }
        }
        info!(shard_id = %self.shard, window = start, early, "window final invocation done");
        self.ctx.stats().counts.windows_final += 1;
        self.window = None;
        self.window_closed();
        let mut p = self.progress.lock().await;
        p.set_window(None);
        p.save().await.map_err(|source| MappingError::checkpoint(&self.shard, source))
    }
}

/// A record's fields other than its data, as a filter pattern names them (the `kinesis` object
/// of the event record).
fn filter_fields(rec: &Rec) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert("kinesisSchemaVersion".into(), "1.0".into());
    m.insert("partitionKey".into(), rec.partition_key.clone().into());
    m.insert("sequenceNumber".into(), rec.sequence_number.clone().into());
    m.insert("approximateArrivalTimestamp".into(), rec.arrival.into());
    m
}
