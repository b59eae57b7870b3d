//! The Kinesis source: one task per shard whose lease this runner holds. Its reader (GetRecords,
//! [`poll`], or SubscribeToShard, [`subscribe`]) registers each page in the shard's checkpoint
//! ([`shard::Shard`]) and hands it to the core ([`crate::mapping::intake`]), whose lanes batch and
//! invoke ([`crate::mapping::lane`]); the shard's lifecycle and leases are the supervisor's
//! ([`supervisor`]).
use std::sync::Arc;
use std::sync::atomic::Ordering;

use aws_sdk_kinesis::types::ShardIteratorType;
use bytes::Bytes;
use pushpull::checkpoint::Checkpoints;
use pushpull::store::Store;
use tokio::sync::{mpsc, watch};
use tracing::info;

use super::clock::now_unix;
use super::event::Rec;
use super::lane::{Lanes, ReaderStatus};
use super::progress::Progress;
use super::{Ctx, MappingError, StartingPosition};

mod poll;
pub(crate) mod shard;
mod subscribe;
pub(crate) mod supervisor;

use shard::Shard;

/// What the shard tasks of a Kinesis mapping share: the core's context and the stream's client
/// and checkpoint store.
pub(crate) struct Kinesis {
    pub core: Arc<Ctx>,
    pub client: aws_sdk_kinesis::Client,
    pub checkpoints: Checkpoints<Store>,
}

/// How a shard task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShardEnd {
    /// Closed and every record done: its children may start.
    Finished,
    /// Asked to hand over (rebalancing, or the runner stopping): in-flight batches finished,
    /// checkpointed, and the lease released.
    HandedOver,
}

/// What a shard's reader (GetRecords or SubscribeToShard) works with: the source, the shard, its
/// lanes and their status, and the signal to hand the shard over.
pub(crate) struct Reader<'a> {
    pub src: &'a Arc<Kinesis>,
    pub shard: &'a Arc<Shard>,
    pub lanes: &'a [mpsc::Sender<Vec<Rec>>],
    pub status: &'a watch::Sender<ReaderStatus>,
    pub drain: watch::Receiver<bool>,
}

/// Where a reader starts (or starts again).
#[derive(Debug, Clone)]
pub(crate) enum Position {
    None,
    Sequence(String),
    Time(f64),
}

/// A starting time for Kinesis: never in the future (Kinesis refuses that).
pub(crate) fn starting_time(t: f64) -> aws_smithy_types::DateTime {
    aws_smithy_types::DateTime::from_secs_f64(t.min(now_unix()))
}

/// Reads `shard_id` while holding its lease (taken in `progress`): renews the lease every
/// `options.failover / 3`, and on `drain` finishes what is in flight and releases it.
pub(crate) async fn run(
    src: Arc<Kinesis>,
    shard_id: String,
    progress: Progress,
    start: StartingPosition,
    drain: watch::Receiver<bool>,
) -> Result<ShardEnd, MappingError> {
    let ctx = &src.core;
    let shard = Arc::new(Shard::new(
        Arc::from(shard_id.as_str()),
        &ctx.settings.stream_arn,
        &ctx.options.role_arn,
        progress,
        ctx.options.failover,
    ));
    let lanes = Lanes::new();
    let r = read_and_invoke(&src, &shard, start, drain, &lanes).await;
    if r.is_err() {
        // The lanes are gone with what they held: take it off the mapping's counts (the next
        // owner reads it again from the checkpoint).
        // Only those not done: the done ones left `pending` when they were done.
        let undone = shard.progress.lock().await.undone_len();
        ctx.pending.fetch_sub(undone as i64, Ordering::SeqCst);
        lanes.forget_windows(ctx);
    }
    r
}

async fn read_and_invoke(
    src: &Arc<Kinesis>,
    shard: &Arc<Shard>,
    start: StartingPosition,
    drain: watch::Receiver<bool>,
    lanes: &Lanes,
) -> Result<ShardEnd, MappingError> {
    let ctx = &src.core;
    let shard_id = shard.shared_id().clone();
    let saved = shard.progress.lock().await.saved().clone();
    let (kind, position) = match (&saved.after, saved.since, start) {
        (Some(after), _, _) => (ShardIteratorType::AfterSequenceNumber, Position::Sequence(after.clone())),
        (None, Some(since), _) => (ShardIteratorType::AtTimestamp, Position::Time(since)),
        (None, None, StartingPosition::TrimHorizon) => (ShardIteratorType::TrimHorizon, Position::None),
        (None, None, StartingPosition::AtTimestamp(t)) => (ShardIteratorType::AtTimestamp, Position::Time(t)),
        (None, None, StartingPosition::Latest) => {
            // Keep the place as a time, so a restart does not skip what arrives meanwhile.
            let mut p = shard.progress.lock().await;
            p.set_since(now_unix());
            p.save().await.map_err(|source| MappingError::checkpoint(&shard_id, source))?;
            (ShardIteratorType::Latest, Position::None)
        }
    };
    info!(shard_id = %shard_id, ?kind, "reading shard");
    let (senders, status_tx, running) =
        lanes.spawn(ctx, shard.clone(), ctx.settings.parallelization_factor as usize, saved.window.clone());
    let reader = {
        let (src, shard) = (src.clone(), shard.clone());
        async move {
            let reader = Reader { src: &src, shard: &shard, lanes: &senders, status: &status_tx, drain };
            match src.core.settings.consumer_arn.clone() {
                Some(consumer) => subscribe::subscribe(reader, consumer, kind, position).await,
                None => poll::read(reader, kind, position).await,
            }
        }
    };
    let renew = {
        let shard = shard.clone();
        move || {
            let shard = shard.clone();
            async move {
                // The lease's heartbeat (every checkpoint renews it too): a conflict means
                // another runner took the shard, and this task stops at once.
                let mut p = shard.progress.lock().await;
                if p.written_ago() >= shard.renew_every() {
                    p.save().await.map_err(|source| MappingError::checkpoint(shard.shared_id(), source))?;
                }
                Ok(())
            }
        }
    };
    let reader_end = running.drive(reader, ctx.options.failover / 3, renew).await?;
    let mut p = shard.progress.lock().await;
    if reader_end == Some(ShardEnd::HandedOver) {
        p.release().await.map_err(|source| MappingError::checkpoint(&shard_id, source))?;
        info!(shard_id = %shard_id, "lease released");
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

/// Hands a page of records (a GetRecords answer, or a `SubscribeToShardEvent`'s) to the core:
/// registered in the shard's checkpoint, then filtered, counted and spread over the lanes
/// ([`crate::mapping::intake::dispatch`]); then notes whether the shard is caught up. False when
/// the lanes are gone.
async fn take_page(
    ctx: &Ctx,
    shard: &Shard,
    lanes: &[mpsc::Sender<Vec<Rec>>],
    status: &watch::Sender<ReaderStatus>,
    records: &[aws_sdk_kinesis::types::Record],
    behind: i64,
    called_at: f64,
) -> Result<bool, MappingError> {
    let n = records.len();
    let mut page = Vec::with_capacity(n);
    if n > 0 {
        let mut p = shard.progress.lock().await;
        for r in records {
            let seq = r.sequence_number().to_owned();
            let Ok(parsed) = seq.parse() else {
                return Err(MappingError::Kinesis(format!(
                    "shard {} returned sequence number {seq:?}, not a decimal number",
                    shard.shared_id()
                )));
            };
            let index = p.read(&seq);
            page.push(Rec {
                shard_id: shard.shared_id().clone(),
                seq: parsed,
                partition_key: r.partition_key().unwrap_or_default().to_owned(),
                data: Bytes::copy_from_slice(r.data().as_ref()),
                arrival: r.approximate_arrival_timestamp().map_or_else(now_unix, |t| t.as_secs_f64()),
                encryption: r.encryption_type().map(|e| e.as_str().to_owned()).filter(|e| e != "NONE"),
                sequence_number: seq,
                index,
            });
        }
    }
    if !super::intake::dispatch(ctx, shard, lanes, page).await? {
        return Ok(false);
    }
    if behind == 0 {
        status.send_modify(|s| s.caught_up_at = called_at);
    }
    if let Ok(mut c) = ctx.caught_up.lock() {
        c.insert(shard.shared_id().to_string(), (behind == 0 && n == 0).then_some(called_at));
    }
    Ok(true)
}
