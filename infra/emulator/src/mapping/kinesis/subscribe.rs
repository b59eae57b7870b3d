//! Enhanced fan-out: SubscribeToShard on one shard through a stream consumer.
use std::time::Duration;

use aws_sdk_kinesis::types::ShardIteratorType;
use tracing::{debug, warn};

use super::{Position, Reader, ShardEnd, closed, hand_over, not_caught_up, starting_time, take_page};
use crate::mapping::MappingError;
use crate::mapping::clock::{Instant, now_unix};
use crate::mapping::source::Partition;

/// Reads `shard` through the stream consumer `consumer` with enhanced fan-out: `SubscribeToShard`,
/// then the records Kinesis pushes, page by page, to the same lanes, checkpoints and windows as
/// polling. AWS (API Reference, SubscribeToShard): events come "for up to 5 minutes, after which
/// time you need to call SubscribeToShard again"; a subscription that ends, or breaks, is made
/// again after the last record read (`AFTER_SEQUENCE_NUMBER`), so nothing is skipped or read
/// twice. A call refused because a subscription to the pair succeeded under 5 s ago
/// (`ResourceInUseException`) is made again a second later.
pub(super) async fn subscribe(
    reader: Reader<'_>,
    consumer: String,
    kind: ShardIteratorType,
    position: Position,
) -> Result<ShardEnd, MappingError> {
    let Reader { src, shard, lanes, status, mut drain } = reader;
    let ctx = &src.core;
    let id = shard.id();
    use aws_sdk_kinesis::types::{StartingPosition as Start, SubscribeToShardEventStream};
    if *drain.borrow() {
        return hand_over(id, status);
    }
    // LATEST is "now" at the first call: a later call before any record was read starts at
    // that time, not at a later "now" that would skip what arrived in between.
    let first_call = now_unix();
    let mut subscribed = false;
    let mut last_read: Option<String> = None;
    let mut failures = 0u32;
    // AWS (API Reference, SubscribeToShard): "You can make one call to SubscribeToShard per second
    // per registered consumer per shard": calls for this shard are a second apart at least.
    let mut last_call: Option<Instant> = None;
    loop {
        if *drain.borrow() {
            return hand_over(id, status);
        }
        if let Some(t) = last_call {
            tokio::select! {
                _ = tokio::time::sleep_until(t + Duration::from_secs(1)) => {}
                changed = drain.changed() => {
                    if changed.is_err() || *drain.borrow() {
                        return hand_over(id, status);
                    }
                    continue;
                }
            }
        }
        last_call = Some(Instant::now());
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
        let start = start.build().map_err(|e| MappingError::Kinesis(format!("SubscribeToShard {id}: {e}")))?;
        let call = src.client.subscribe_to_shard().consumer_arn(&consumer).shard_id(id).starting_position(start);
        let sent = tokio::select! {
            r = call.send() => r,
            changed = drain.changed() => {
                // Asked to hand over (or the runner is gone: its sender dropped).
                if changed.is_err() || *drain.borrow() {
                    return hand_over(id, status);
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
                    return Err(MappingError::Kinesis(format!("SubscribeToShard {consumer} {id}: {msg}")));
                }
                // Refused for its timing (a subscription under 5 s old, a call under a second
                // after the last): called again after a second, not a failure.
                let in_use =
                    service.is_some_and(|se| se.is_resource_in_use_exception() || se.is_limit_exceeded_exception());
                failures += u32::from(!in_use);
                if failures > 50 {
                    return Err(MappingError::Kinesis(format!("SubscribeToShard {consumer} {id}: {msg}")));
                }
                debug!(shard_id = id, error = %msg, "SubscribeToShard refused; calling again");
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
                        return hand_over(id, status);
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
                    if !take_page(ctx, shard, lanes, status, records, behind, called_at).await? {
                        return Ok(ShardEnd::Finished); // the lanes stopped: the shard task is ending
                    }
                    if let Some(r) = records.last() {
                        last_read = Some(r.sequence_number().to_owned());
                    }
                    // The shard's end: no continuation, and its children named.
                    if e.continuation_sequence_number().is_empty() || !e.child_shards().is_empty() {
                        return Ok(closed(ctx, id, status));
                    }
                }
                Ok(Some(_)) => {} // an event kind this reader does not know
                Ok(None) => {
                    not_caught_up(ctx, id);
                    debug!(shard_id = id, "subscription ended (its 5 minutes); subscribing again");
                    break;
                }
                Err(e) => {
                    not_caught_up(ctx, id);
                    ctx.stats().counts.subscription_errors += 1;
                    failures += 1;
                    warn!(shard_id = id, error = %pushpull::aws::describe(&e), "subscription broke off; subscribing again");
                    tokio::time::sleep(Duration::from_millis(200) * failures.min(10)).await;
                    break;
                }
            }
        }
    }
}
