//! Standard polling: GetRecords on one shard.
use std::time::Duration;

use aws_sdk_kinesis::types::ShardIteratorType;
use tracing::{debug, warn};

use super::{Kinesis, Position, Reader, ShardEnd, closed, hand_over, starting_time, take_page};
use crate::mapping::clock::{Instant, now_unix};
use crate::mapping::source::Partition;
use crate::mapping::{MappingError, Polling};

pub(super) async fn iterator(
    src: &Kinesis,
    shard: &str,
    kind: ShardIteratorType,
    position: &Position,
) -> Result<String, MappingError> {
    let mut req = src
        .client
        .get_shard_iterator()
        .stream_name(src.core.settings.stream_name())
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
                        src.core.settings.stream_name(),
                        pushpull::aws::describe(&e)
                    )));
                }
                debug!(shard_id = shard, error = %pushpull::aws::describe(&e), "GetShardIterator failed; retrying");
                tokio::time::sleep(Duration::from_millis(200) * attempt.min(10)).await;
            }
        }
    }
}

/// Polls `shard` with GetRecords from `position` and hands each page to the lanes, at AWS's
/// cadence ([`crate::mapping::Polling`]) or faster; waits out throttles, renews an expired
/// iterator after the last record read, and ends when the shard is closed and read or when asked
/// to hand over (`drain`).
pub(super) async fn read(
    reader: Reader<'_>,
    kind: ShardIteratorType,
    position: Position,
) -> Result<ShardEnd, MappingError> {
    let Reader { src, shard, lanes, status, mut drain } = reader;
    let ctx = &src.core;
    let id = shard.id();
    if *drain.borrow() {
        return hand_over(id, status);
    }
    let mut it = iterator(src, id, kind, &position).await?;
    let mut last_read: Option<String> = None;
    let mut last_call = Instant::now() - ctx.options.poll_interval;
    let mut idle_wait = ctx.options.poll_interval;
    let mut failures = 0u32;
    let mut empties = 0u32;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(last_call + ctx.options.poll_interval) => {}
            _ = drain.changed() => {}
        }
        if *drain.borrow() {
            return hand_over(id, status);
        }
        last_call = Instant::now();
        let called_at = now_unix();
        let out = match src.client.get_records().shard_iterator(&it).limit(10_000).send().await {
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
                    debug!(shard_id = id, "GetRecords throttled; waiting");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
                failures += 1;
                if service.is_some_and(|se| se.is_expired_iterator_exception()) {
                    let (k, p) = match &last_read {
                        Some(s) => (ShardIteratorType::AfterSequenceNumber, Position::Sequence(s.clone())),
                        None => (ShardIteratorType::TrimHorizon, Position::None),
                    };
                    it = iterator(src, id, k, &p).await?;
                } else if service.is_some_and(|se| se.is_resource_not_found_exception()) || failures > 50 {
                    return Err(MappingError::Kinesis(format!(
                        "GetRecords {}/{id}: {msg}",
                        ctx.settings.stream_name()
                    )));
                } else {
                    warn!(shard_id = id, error = %msg, "GetRecords failed; retrying");
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
        if !take_page(ctx, shard, lanes, status, out.records(), behind, called_at).await? {
            return Ok(ShardEnd::Finished); // the lanes stopped: the shard task is ending
        }
        if n > 0 {
            last_read = out.records().last().map(|r| r.sequence_number().to_owned());
        }
        match out.next_shard_iterator() {
            Some(next) if !next.is_empty() => it = next.to_owned(),
            _ => return Ok(closed(ctx, id, status)),
        }
        if n == 0 && behind == 0 {
            // Back off on a shard that stays empty (after three empty polls in a row, so that a
            // pause between two records does not delay the next one), up to about one call a second.
            empties += 1;
            // AWS's cadence: once a second at once; fast: a grace of three quick polls first.
            if ctx.options.polling == Polling::Aws {
                idle_wait = ctx.options.max_idle_poll;
            }
            if empties > 3 || ctx.options.polling == Polling::Aws {
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
