//! A Kinesis shard as the core sees it ([`Partition`]): its records become Kinesis events, a
//! partial batch response names records by sequence number, and a position is committed as the
//! shard's checkpoint ("everything up to sequence number S is done", [`Progress`]), which also
//! renews the shard's lease.
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Mutex;

use crate::mapping::MappingError;
use crate::mapping::event::{self, Rec, WindowPart};
use crate::mapping::progress::{self, Progress, WindowCheckpoint};
use crate::mapping::source::Partition;

/// One shard being read, with its checkpoint and lease.
#[derive(Debug)]
pub(crate) struct Shard {
    id: Arc<str>,
    stream_arn: String,
    role_arn: String,
    pub(crate) progress: Mutex<Progress>,
    /// When the lease was last written (see [`progress::age`]): read before each invocation
    /// without the lock the reader holds while it registers a page.
    written_at: Arc<AtomicU64>,
    failover: Duration,
}

impl Shard {
    /// `id` of `stream_arn`, read under the lease `progress` holds.
    pub(crate) fn new(id: Arc<str>, stream_arn: &str, role_arn: &str, progress: Progress, failover: Duration) -> Self {
        let written_at = progress.written_at();
        Shard {
            id,
            stream_arn: stream_arn.to_owned(),
            role_arn: role_arn.to_owned(),
            progress: Mutex::new(progress),
            written_at,
            failover,
        }
    }

    /// The shard id, shared by its records.
    pub(crate) fn shared_id(&self) -> &Arc<str> {
        &self.id
    }

    /// How often the lease is renewed when nothing else writes the checkpoint.
    pub(crate) fn renew_every(&self) -> Duration {
        self.failover / 3
    }

    async fn save(&self, p: &mut Progress) -> Result<(), MappingError> {
        p.save().await.map_err(|source| MappingError::checkpoint(&self.id, source))
    }
}

impl Partition for Shard {
    type Record = Rec;

    fn id(&self) -> &str {
        &self.id
    }

    fn encoded_len(&self, record: &Rec) -> usize {
        record.encoded_len(&self.stream_arn)
    }

    fn event(&self, records: &[Rec], window: Option<&WindowPart<'_>>) -> String {
        event::event_json(records, &self.id, &self.stream_arn, &self.role_arn, window)
    }

    fn batch_info(&self, records: &[Rec]) -> (&'static str, Value) {
        event::batch_info(&self.id, &self.stream_arn, records)
    }

    fn item_index(&self, batch: &[Rec], identifier: &Value) -> Result<usize, String> {
        match identifier {
            Value::String(s) if !s.is_empty() => event::item_index(batch, s),
            other => Err(format!("itemIdentifier {other} is not a sequence number")),
        }
    }

    fn delivered_items(&self, record: &Rec, each: &mut dyn FnMut(&[u8])) {
        // Line by line: a KPL aggregate delivers each user record it packs (the mapping itself
        // passes it on whole, as AWS's does).
        match pushpull::aggregation::deaggregate(&record.data) {
            Ok(aggregate) => aggregate.records().for_each(|u| each(u.data)),
            Err(_) => each(&record.data),
        }
    }

    async fn done(&self, records: &[Rec], window: Option<WindowCheckpoint>) -> Result<(), MappingError> {
        let mut p = self.progress.lock().await;
        let moved = p.done(records.iter().map(|r| r.index));
        if window.is_some() {
            p.set_window(window);
        }
        if moved { self.save(&mut p).await } else { Ok(()) }
    }

    async fn fence(&self) -> Result<(), MappingError> {
        // No invocation on a lease not confirmed within half the failover time.
        if progress::age(&self.written_at) >= self.failover / 2 {
            let mut p = self.progress.lock().await;
            if p.written_ago() >= self.failover / 2 {
                self.save(&mut p).await?;
            }
        }
        Ok(())
    }

    async fn window_closed(&self) -> Result<(), MappingError> {
        let mut p = self.progress.lock().await;
        p.set_window(None);
        self.save(&mut p).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::filter::FilterCriteria;
    use pushpull::checkpoint::Checkpoints;
    use pushpull::store::Store;

    /// AWS (with-kinesis-filtering): "Kinesis event source mappings only support filtering on the
    /// `data` key." A pattern on `partitionKey` matches no Kinesis record; one on `data` does.
    #[tokio::test]
    async fn kinesis_records_are_filtered_on_their_data_only() {
        let dir = tempfile::tempdir().unwrap();
        let progress = Progress::load(Checkpoints::new(Store::file(dir.path())), "esm/f/s", "shardId-0").await.unwrap();
        let shard = Shard::new(
            Arc::from("shardId-0"),
            "arn:aws:kinesis:us-east-1:0:stream/s",
            "r",
            progress,
            Duration::from_secs(10),
        );
        let rec = Rec {
            shard_id: Arc::from("shardId-0"),
            sequence_number: "1".into(),
            seq: "1".parse().unwrap(),
            partition_key: "1".into(),
            data: bytes::Bytes::from_static(br#"{"city":"Los Angeles"}"#),
            arrival: 0.0,
            encryption: None,
            index: 0,
        };
        let parse = |p: serde_json::Value| {
            FilterCriteria::parse(&serde_json::json!({"Filters": [{"Pattern": p.to_string()}]})).unwrap()
        };
        let on_key = parse(serde_json::json!({"partitionKey": ["1"]}));
        assert!(!on_key.passes(&rec.data, &shard.filter_fields(&rec)));
        let on_data = parse(serde_json::json!({"data": {"city": ["Los Angeles"]}}));
        assert!(on_data.passes(&rec.data, &shard.filter_fields(&rec)));
    }
}
