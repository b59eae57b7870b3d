//! Where a source hands the core the records it read from a partition: counted, filtered
//! (FilterCriteria), and spread over the partition's lanes by ordering key, so that records of a
//! key keep their order at every ParallelizationFactor.
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;

use super::source::{Partition, Record};
use super::{Ctx, MappingError};

/// Hands `records` (read from `partition`, in order) to its `lanes`. AWS (Lambda developer guide,
/// "Control which events Lambda sends to your function"): "Once your filter criteria processes an
/// Kinesis or DynamoDB record, the streams iterator advances past this record", and a record no
/// filter matches is never invoked: it is done at once, and counted as `FilteredOutEventCount`.
/// False when the lanes are gone (the partition's task is ending).
pub(crate) async fn dispatch<P: Partition>(
    ctx: &Ctx,
    partition: &P,
    lanes: &[mpsc::Sender<Vec<P::Record>>],
    records: Vec<P::Record>,
) -> Result<bool, MappingError> {
    let n = records.len();
    ctx.stats().counts.records_read += n as u64;
    ctx.settings.event_counts(&[("PolledEventCount", n as u64)]);
    if n == 0 {
        return Ok(true);
    }
    ctx.touch();
    ctx.pending.fetch_add(n as i64, Ordering::SeqCst);
    let factor = lanes.len().max(1);
    let mut per_lane: Vec<Vec<P::Record>> = (0..factor).map(|_| Vec::new()).collect();
    let mut filtered_out = Vec::new();
    let filter = &ctx.settings.filter;
    for rec in records {
        if !filter.is_empty() && !filter.passes(rec.data(), &partition.filter_fields(&rec)) {
            filtered_out.push(rec);
            continue;
        }
        let lane = if factor == 1 { 0 } else { lane_of(rec.ordering_key(), factor) };
        per_lane[lane].push(rec);
    }
    if !filtered_out.is_empty() {
        let count = filtered_out.len();
        ctx.pending.fetch_sub(count as i64, Ordering::SeqCst);
        ctx.stats().counts.filtered_out += count as u64;
        ctx.settings.event_counts(&[("FilteredOutEventCount", count as u64)]);
        partition.done(&filtered_out, None).await?;
    }
    for (lane, recs) in lanes.iter().zip(per_lane) {
        if !recs.is_empty() && lane.send(recs).await.is_err() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The lane of an ordering key among `factor`: stable, so a key's records stay on one lane.
pub(crate) fn lane_of(key: &[u8], factor: usize) -> usize {
    (xxhash_rust::xxh3::xxh3_64(key) % factor as u64) as usize
}
