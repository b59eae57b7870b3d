//! The rollup on Redis events (`pushpull:redis-streams`, `pushpull:redis-pubsub`, the events of
//! `pushpull-local`'s Streams mapping and pub/sub relay): through the same queue path as Amazon
//! MQ and SQS ([`crate::mq`]).
//!
//! - **A stream** delivers at least once (an entry whose acknowledgement was lost is claimed
//!   again; the push function's retry adds the lines after its last checkpoint again): an entry
//!   is recognised by the field the Redis sink writes, `pushpull-origin` (its object and line),
//!   and counted once; the checkpoint is `pull/redis/<stream>.json`.
//! - **A channel** delivers at most once and carries nothing but the data: a message has no name,
//!   so it is counted each time it is delivered (the relay delivers it once, or, after a function
//!   error, again: a retry after a failure before the write-ahead note counts it once; after the
//!   note, twice: pub/sub gives nothing to tell them apart). The checkpoint is
//!   `pull/redis/<channel>.json`.
//!
//! A message that cannot be rolled up is set aside under `rejected/<stream or channel>/` with its
//! reason; nothing is reported failed.
use pushpull::pull::redis::RedisEvent;

use super::mq::{QueueId, QueueMessage, path_segment};
use super::{BatchResponse, Response, RollupError, RollupHandler};

impl RollupHandler {
    /// A Redis event: its records rolled up, each named record once.
    pub(crate) async fn handle_redis(&self, event: &RedisEvent) -> Result<Response, RollupError> {
        let mut groups: Vec<(&str, Vec<&pushpull::pull::redis::RedisRecord>)> = Vec::new();
        for r in &event.records {
            let source = r.source_name();
            match groups.iter_mut().find(|(s, _)| *s == source) {
                Some((_, list)) => list.push(r),
                None => groups.push((source, vec![r])),
            }
        }
        let mut metrics = pushpull::metrics::PullBatch {
            stream: groups.first().map_or("unknown", |g| g.0).to_owned(),
            batch_size: event.records.len(),
            records_in: event.records.len(),
            processed: 0,
            failed: 0,
            oldest_arrival: event.records.iter().map(|r| r.timestamp as f64 / 1000.0).reduce(f64::min),
        };
        for (source, list) in groups {
            let span = tracing::info_span!("batch", redis = %source, records = list.len());
            let _enter = span.enter();
            let id = QueueId {
                checkpoint: format!("pull/redis/{}.json", path_segment(source)),
                label: source.to_owned(),
                queue: source,
            };
            let messages: Vec<QueueMessage<'_>> = list
                .iter()
                .map(|r| {
                    let mut about = serde_json::Map::new();
                    about.insert("redis_id".into(), r.id.clone().into());
                    if let Some(n) = r.delivery_count {
                        about.insert("delivery_count".into(), n.into());
                    }
                    QueueMessage {
                        name: r.fields.get(pushpull::pull::redis::ORIGIN_FIELD).map(String::as_str),
                        partition_key: r.partition_key().unwrap_or_default().to_owned(),
                        data: std::borrow::Cow::Borrowed(r.data.as_str()),
                        about,
                    }
                })
                .collect();
            let (counted, failed) = self.handle_queue(&id, &messages).await?;
            metrics.processed += counted;
            metrics.failed += failed;
        }
        metrics.record();
        Ok(Response::Batch(BatchResponse::default()))
    }
}
