//! The Redis Streams source: Redis's pull, on the mapping core. AWS has no Redis event source;
//! this one reads as a Redis user's consumer reads, and batches, retries and invokes as the other
//! mappings do.
//!
//! - **Reading**: one consumer of the mapping's group (created with the stream if missing, at the
//!   stream's start, or its end with `StartingPosition: LATEST`) reads `XREADGROUP ... COUNT n
//!   BLOCK ms STREAMS <stream> >`: a blocking read, Redis's long poll, so an idle stream costs one
//!   call per `BLOCK`. It reads again only while it holds fewer than two batches a lane, in all
//!   (2 × BatchSize × ParallelizationFactor entries: one being invoked, one ready behind it): the
//!   consumer sets the pace, and what it has not read waits in the stream. Two batches in all,
//!   whatever the lanes, left the function idle between a batch and the read that replaced it:
//!   `make bench-pushpull` drained about 600 messages a second through two lanes into a function
//!   that takes 1,000. At start it first reads its own
//!   pending entries (`... STREAMS <stream> 0`, then on from the last one read): those a previous
//!   run of the same consumer read and never acknowledged.
//! - **Lanes**: ParallelizationFactor lanes, by the entries' partition key (`pushpull-key`, else
//!   the entry): a key's entries keep their order.
//! - **Acknowledgement**: an entry is acknowledged (`XACK`) once its batch succeeded or a filter
//!   dropped it; a partial batch response's named entries stay pending, the rest are acknowledged.
//! - **Failures**: a failing batch is retried `MaximumRetryAttempts` times (default 2) with the
//!   core's backoff, then left pending. Every `claim_idle / 2` (at least 100 ms, at most 5 s) the
//!   consumer claims the group's entries pending longer than `claim_idle` (`XAUTOCLAIM ... JUSTID`,
//!   then `XCLAIM` of those it does not hold in its lanes): its own failed ones, and those of a
//!   consumer that died (a crashed mapping, a killed worker); an entry delivered more than
//!   `max_deliveries` times is moved to `<stream>:dead-letter` with its reason and fields (`XADD`,
//!   then `XACK`) instead. Entries in the lanes are never claimed from under them: a throttled
//!   invocation is retried as on a stream (until `MaximumRecordAge`, if set).
//! - **Redis going away**: the reader connects again every second (counted in `reconnects`);
//!   entries in flight whose acknowledgement fails stay pending and are claimed again: at least
//!   once, never lost (with Redis's append-only file, a restart keeps the stream and the group).
pub(crate) mod record;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::streams::{StreamAutoClaimReply, StreamId, StreamInfoGroupsReply, StreamPendingCountReply, StreamReadReply};
use tokio::sync::watch;
use tracing::{info, warn};

use self::record::{StreamPartition, StreamRec};
use super::lane::Lanes;
use super::settings::{RedisStreamSource, StartingPosition};
use super::{Ctx, MappingError};

/// How often a lost connection is tried again.
pub const RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// How often the group's lag is asked (the caught-up check and the idle stop).
const DEPTH_CHECK: Duration = Duration::from_millis(500);
/// The field of a dead-letter entry that says why it is there.
pub use self::record::{DEAD_ID_FIELD, REASON_FIELD};

fn err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> MappingError {
    MappingError::Redis(format!("{what}: {e}"))
}

/// Whether `e` is Redis refusing what the mapping asks (a key of another type, a command it does
/// not know): connecting again cannot mend it.
fn refused(e: &redis::RedisError) -> bool {
    !(e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal())
        && e.code().is_some_and(|c| c != "LOADING" && c != "NOGROUP")
}

/// Runs the Redis Streams mapping on `source` until `stop` turns true or it is idle (if so
/// configured). A stream key of another type, or a Redis that refuses the group, stops it with an
/// error naming the stream; a connection lost is opened again.
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    source: RedisStreamSource,
    stop: watch::Receiver<bool>,
) -> Result<(), MappingError> {
    let client =
        redis::Client::open(source.url.as_str()).map_err(|e| err(format!("Redis URL {}", source.redacted()), e))?;
    // The first connection and the group: a failure here is the caller's (a wrong URL, a key of
    // another type).
    let mut reader =
        record::connect(&client).await.map_err(|e| err(format!("connecting to {}", source.redacted()), e))?;
    create_group(&mut reader, &source, ctx.settings.starting_position).await?;
    info!(stream = %source.stream, group = %source.group, consumer = %source.consumer, redis = %source.redacted(), "redis streams mapping: reading");
    let partition = StreamPartition::new(source.clone(), client.clone());
    let name = source.stream.clone();
    if let Ok(mut c) = ctx.caught_up.lock() {
        c.insert(name.clone(), None);
    }
    let factor = ctx.settings.parallelization_factor.max(1) as usize;
    let lanes = Lanes::new();
    let (senders, status, running) = lanes.spawn(&ctx, partition.clone(), factor, None);
    let (quit_tx, quit) = watch::channel(false);
    let read_at = Arc::new(AtomicU64::new(0));
    let reading = {
        let (ctx, partition, read_at) = (ctx.clone(), partition.clone(), read_at.clone());
        async move {
            let result = read(&ctx, &client, reader, &partition, &senders, quit, &read_at).await;
            status.send_modify(|s| s.handing_over = true);
            drop(senders);
            result.map(|()| None::<()>)
        }
    };
    let checker = {
        let (ctx, partition, read_at) = (ctx.clone(), partition.clone(), read_at.clone());
        tokio::spawn(async move { check_lag(&ctx, &partition, &read_at).await })
    };
    let grace = ctx.options.stop_grace;
    let watchdog = {
        let ctx = ctx.clone();
        async move {
            ctx.stopped_or_idle(stop).await;
            let _ = quit_tx.send(true);
            tokio::time::sleep(grace).await;
        }
    };
    let result = tokio::select! {
        r = running.drive(reading, Duration::from_secs(3600), || async { Ok(()) }) => r.map(|_| ()),
        () = watchdog => {
            warn!(?grace, "batches still in flight after the grace period: stopped; their entries stay pending and are claimed again");
            Ok(())
        }
    };
    checker.abort();
    let mut s = ctx.stats();
    s.counts.delete_failures = partition.ack_failures.load(Ordering::SeqCst);
    s.counts.to_destination = partition.dead_lettered.load(Ordering::SeqCst);
    drop(s);
    if let Ok(mut c) = ctx.caught_up.lock() {
        c.remove(&name);
    }
    result
}

/// `XGROUP CREATE <stream> <group> 0|$ MKSTREAM`; a group that exists keeps its place.
async fn create_group(
    connection: &mut redis::aio::MultiplexedConnection,
    source: &RedisStreamSource,
    position: StartingPosition,
) -> Result<(), MappingError> {
    let start = if matches!(position, StartingPosition::Latest) { "$" } else { "0" };
    let created = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&source.stream)
        .arg(&source.group)
        .arg(start)
        .arg("MKSTREAM")
        .query_async::<()>(connection)
        .await;
    match created {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(err(format!("XGROUP CREATE {} {} on {}", source.stream, source.group, source.redacted()), e)),
    }
}

/// The reading loop: own pending entries first, then claims and new entries, until `quit`.
async fn read(
    ctx: &Arc<Ctx>,
    client: &redis::Client,
    mut connection: redis::aio::MultiplexedConnection,
    partition: &Arc<StreamPartition>,
    lanes: &[tokio::sync::mpsc::Sender<Vec<StreamRec>>],
    mut quit: watch::Receiver<bool>,
    read_at: &AtomicU64,
) -> Result<(), MappingError> {
    let source = &partition.source;
    let batch = ctx.settings.batch_size as usize;
    // Two batches a lane at most: one being invoked, one ready behind it.
    let hold = 2 * batch * ctx.settings.parallelization_factor.max(1) as usize;
    let mut index = 0u64;
    let claim_every = (source.claim_idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut next_claim = tokio::time::Instant::now() + claim_every;
    // Own pending entries first, from this id on (each read goes on after the last entry it got:
    // reading from 0 again would hand out those still in the lanes once more).
    let mut own_pending: Option<String> = Some("0".to_owned());
    let mut cursor = "0-0".to_owned();
    loop {
        // The consumer sets the pace: at most two batches a lane held.
        loop {
            let freed = partition.freed.notified();
            if partition.held.load(Ordering::SeqCst) < hold {
                break;
            }
            tokio::select! {
                _ = quit.wait_for(|q| *q) => return Ok(()),
                () = freed => {}
            }
        }
        if *quit.borrow() {
            return Ok(());
        }
        let want = hold.saturating_sub(partition.held.load(Ordering::SeqCst)).max(1);
        let step: Result<Vec<(StreamId, u64)>, redis::RedisError> = async {
            if let Some(from) = own_pending.clone() {
                // What this consumer read before and never acknowledged (a previous run).
                let reply: Option<StreamReadReply> =
                    xreadgroup(source, want, None, &from).query_async(&mut connection).await?;
                let entries: Vec<StreamId> = reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids).collect();
                own_pending = entries.last().map(|e| e.id.clone());
                return with_counts(&partition.link, source, entries).await;
            }
            if tokio::time::Instant::now() >= next_claim {
                next_claim = tokio::time::Instant::now() + claim_every;
                // Ids only first (`JUSTID`: no delivery counted): the entries this mapping still
                // holds in its lanes stay with them; the others (failed ones given back, those of
                // a consumer that died) are claimed whole.
                let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                    .arg(&source.stream)
                    .arg(&source.group)
                    .arg(&source.consumer)
                    .arg(source.claim_idle.as_millis() as u64)
                    .arg(&cursor)
                    .arg("COUNT")
                    .arg(want)
                    .arg("JUSTID")
                    .query_async(&mut connection)
                    .await?;
                cursor = if reply.next_stream_id.is_empty() { "0-0".to_owned() } else { reply.next_stream_id };
                if !reply.deleted_ids.is_empty() {
                    // Entries deleted from the stream while pending: nothing to deliver; Redis
                    // (XAUTOCLAIM) already removed them from the pending list.
                    warn!(stream = %source.stream, ids = ?reply.deleted_ids, "pending entries were deleted from the stream");
                }
                let ids: Vec<String> =
                    reply.claimed.into_iter().map(|e| e.id).filter(|id| !partition.holds(id)).collect();
                if !ids.is_empty() {
                    let mut claim = redis::cmd("XCLAIM");
                    claim.arg(&source.stream).arg(&source.group).arg(&source.consumer).arg(0).arg(&ids);
                    let claimed: redis::streams::StreamClaimReply = claim.query_async(&mut connection).await?;
                    ctx.stats().counts.requeued += claimed.ids.len() as u64;
                    return with_counts(&partition.link, source, claimed.ids).await;
                }
            }
            let block = source.block.min(next_claim.saturating_duration_since(tokio::time::Instant::now())).max(Duration::from_millis(1));
            let reply: Option<StreamReadReply> =
                xreadgroup(source, want, Some(block), ">").query_async(&mut connection).await?;
            Ok(reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids).map(|e| (e, 1)).collect())
        }
        .await;
        ctx.stats().counts.receives += 1;
        let entries = match step {
            Ok(entries) => entries,
            Err(e) if refused(&e) => {
                return Err(err(
                    format!("reading {} (group {}) on {}", source.stream, source.group, source.redacted()),
                    e,
                ));
            }
            Err(e) => {
                ctx.stats().counts.receive_errors += 1;
                warn!(stream = %source.stream, error = %e, "redis streams mapping: the connection failed; connecting again");
                match reconnect(ctx, client, source, &mut quit).await {
                    Some(c) => connection = c,
                    None => return Ok(()),
                }
                continue;
            }
        };
        if entries.is_empty() {
            ctx.stats().counts.empty_receives += 1;
            continue;
        }
        read_at.store(super::clock::now_unix().to_bits(), Ordering::SeqCst);
        if let Ok(mut c) = ctx.caught_up.lock() {
            c.insert(source.stream.clone(), None);
        }
        let mut records = Vec::with_capacity(entries.len());
        let mut dead = Vec::new();
        for (entry, deliveries) in entries {
            let rec = StreamRec::from_entry(index, &entry, source, deliveries);
            index += 1;
            if deliveries > source.max_deliveries {
                dead.push((rec, deliveries));
            } else {
                records.push(rec);
            }
        }
        if !dead.is_empty() {
            dead_letter(partition, dead).await;
        }
        partition.take(&records);
        if !super::intake::dispatch(ctx, &**partition, lanes, records).await? {
            return Ok(());
        }
    }
}

/// `XREADGROUP GROUP <group> <consumer> COUNT <count> [BLOCK <ms>] STREAMS <stream> <id>`.
fn xreadgroup(source: &RedisStreamSource, count: usize, block: Option<Duration>, id: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP").arg(&source.group).arg(&source.consumer).arg("COUNT").arg(count.max(1));
    if let Some(block) = block {
        cmd.arg("BLOCK").arg(block.as_millis() as u64);
    }
    cmd.arg("STREAMS").arg(&source.stream).arg(id);
    cmd
}

/// Each of `entries` (already delivered before) with its delivery count (`XPENDING` of each id,
/// pipelined), for the dead-letter rule.
async fn with_counts(
    link: &record::Link,
    source: &RedisStreamSource,
    entries: Vec<StreamId>,
) -> Result<Vec<(StreamId, u64)>, redis::RedisError> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for e in &entries {
        pipe.cmd("XPENDING").arg(&source.stream).arg(&source.group).arg(&e.id).arg(&e.id).arg(1);
    }
    let pending: Vec<StreamPendingCountReply> = link.query_pipe(&pipe).await?;
    let counts: HashMap<String, u64> =
        pending.into_iter().flat_map(|p| p.ids).map(|p| (p.id, p.times_delivered as u64)).collect();
    Ok(entries
        .into_iter()
        .map(|e| {
            let n = counts.get(&e.id).copied().or(e.delivered_count.map(|c| c as u64)).unwrap_or(1);
            (e, n)
        })
        .collect())
}

/// Moves entries delivered more than `max_deliveries` times to the dead-letter stream.
async fn dead_letter(partition: &StreamPartition, dead: Vec<(StreamRec, u64)>) {
    let source = &partition.source;
    let entries: Vec<(&StreamRec, String)> = dead
        .iter()
        .map(|(rec, deliveries)| {
            let reason = format!(
                "delivered {deliveries} times (max deliveries {}) without success by group {}",
                source.max_deliveries, source.group
            );
            (rec, reason)
        })
        .collect();
    partition.dead_letter(&entries).await;
}

/// Connects again every [`RECONNECT_EVERY`] until Redis answers; `None` on `quit`. The group is
/// created again if Redis lost it (a restart without its append-only file).
async fn reconnect(
    ctx: &Ctx,
    client: &redis::Client,
    source: &RedisStreamSource,
    quit: &mut watch::Receiver<bool>,
) -> Option<redis::aio::MultiplexedConnection> {
    loop {
        tokio::select! {
            _ = quit.wait_for(|q| *q) => return None,
            () = tokio::time::sleep(RECONNECT_EVERY) => {}
        }
        match record::connect(client).await {
            Ok(mut c) => {
                if let Err(e) = create_group(&mut c, source, ctx.settings.starting_position).await {
                    warn!(stream = %source.stream, error = %e, "redis streams mapping: the group cannot be made yet");
                    continue;
                }
                ctx.stats().counts.reconnects += 1;
                info!(stream = %source.stream, "redis streams mapping: connected again");
                return Some(c);
            }
            Err(e) => warn!(stream = %source.stream, error = %e, "redis streams mapping: Redis does not answer yet"),
        }
    }
}

/// The stream is caught up while its group has no entry left to read and none pending (`XINFO
/// GROUPS`: `lag` 0, `pending` 0) and none was read since the last look, twice in a row.
async fn check_lag(ctx: &Ctx, partition: &StreamPartition, read_at: &AtomicU64) {
    let source = &partition.source;
    let mut empty_looks = 0u32;
    loop {
        tokio::time::sleep(DEPTH_CHECK).await;
        let asked_at = super::clock::now_unix();
        let mut cmd = redis::cmd("XINFO");
        cmd.arg("GROUPS").arg(&source.stream);
        let left = match partition.link.query::<StreamInfoGroupsReply>(&cmd).await {
            Ok(reply) => reply.groups.into_iter().find(|g| g.name == source.group).map(|g| (g.lag, g.pending)),
            Err(e) => {
                warn!(stream = %source.stream, error = %e, "could not ask the group's lag");
                None
            }
        };
        let last = f64::from_bits(read_at.load(Ordering::SeqCst));
        let empty = matches!(left, Some((Some(0), 0))) && last < asked_at;
        empty_looks = if empty { empty_looks + 1 } else { 0 };
        if let Ok(mut c) = ctx.caught_up.lock() {
            c.insert(source.stream.clone(), (empty_looks >= 2).then_some(asked_at));
        }
    }
}
