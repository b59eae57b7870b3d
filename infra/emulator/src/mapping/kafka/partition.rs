//! A Kafka partition as the core sees it ([`Partition`]): its records become Kafka events, a
//! partial batch response names records by partition and offset, and a position is committed to
//! the consumer group as the offset after the last record of the done prefix.
//!
//! AWS (with-kafka-configure.html): "After Lambda processes each batch, it commits the offsets of
//! the messages in that batch." Kafka keeps one offset per partition (the next record to read), so
//! a record is committed only once every record before it is done too: a batch that failed keeps
//! the offset where it is, and whoever reads the partition next starts from it.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};

use super::record::{self, Envelope, KRec};
use crate::mapping::MappingError;
use crate::mapping::event::WindowPart;
use crate::mapping::progress::WindowCheckpoint;
use crate::mapping::source::Partition;

/// Commits a partition's offset to the consumer group (the consumer, or a list in tests).
pub(crate) trait Commit: Send + Sync + 'static {
    /// `next` is the offset of the next record to read; the commit is asynchronous (the final one
    /// at a hand-over is made synchronously by the consumer's thread).
    fn commit(&self, topic: &str, partition: i32, next: i64) -> Result<(), MappingError>;
}

/// Which records of a partition are read and not yet committed, and which of those are done.
#[derive(Debug, Default)]
pub(crate) struct Offsets {
    /// index -> (offset, done), for records read and not yet below the committed offset.
    open: BTreeMap<u64, (i64, bool)>,
    next_index: u64,
    /// The offset last committed (the next record to read).
    committed: Option<i64>,
    /// The offset of the last record read.
    last_read: Option<i64>,
}

impl Offsets {
    /// Registers a record read at `offset`; returns its index.
    pub(crate) fn read(&mut self, offset: i64) -> u64 {
        let i = self.next_index;
        self.next_index += 1;
        self.open.insert(i, (offset, false));
        self.last_read = Some(offset);
        i
    }

    /// The offset of the last record read, if any.
    pub(crate) fn last_read(&self) -> Option<i64> {
        self.last_read
    }

    /// Marks `indices` done; returns the offset to commit if the done prefix grew.
    pub(crate) fn done(&mut self, indices: impl Iterator<Item = u64>) -> Option<i64> {
        for i in indices {
            if let Some(e) = self.open.get_mut(&i) {
                e.1 = true;
            }
        }
        let mut next = None;
        while let Some(entry) = self.open.first_entry() {
            if !entry.get().1 {
                break;
            }
            next = Some(entry.get().0 + 1);
            entry.remove();
        }
        if next.is_some() {
            self.committed = next;
        }
        next
    }

    /// Records read and not done.
    #[cfg(test)]
    pub(crate) fn undone(&self) -> usize {
        self.open.values().filter(|(_, done)| !done).count()
    }

    /// The offset committed last, if any record was done.
    pub(crate) fn committed(&self) -> Option<i64> {
        self.committed
    }

    /// The offset of the first record read and not yet done; after the last one read if every
    /// one is done; the committed offset if none was read; `None` before anything.
    pub(crate) fn next_to_process(&self) -> Option<i64> {
        self.open
            .values()
            .find(|(_, done)| !done)
            .map(|(offset, _)| *offset)
            .or_else(|| self.last_read.map(|o| o + 1))
            .or(self.committed)
    }
}

/// One partition being read by this runner while the group assigns it here.
pub(crate) struct KafkaPartition {
    /// `topic-N`.
    name: String,
    topic: Arc<str>,
    number: i32,
    envelope: Arc<Envelope>,
    pub(crate) offsets: Mutex<Offsets>,
    committer: Arc<dyn Commit>,
    /// Records handed to the partition's task and not yet to its lane (the idle check counts them).
    pub(crate) in_channel: AtomicI64,
    /// Records handed to the lane and not yet done or dropped: what this partition adds to the
    /// mapping's `pending` (taken off it if the task is stopped).
    pub(crate) in_lane: AtomicI64,
    /// Handed over: no commit is made after the final one.
    pub(crate) released: AtomicBool,
}

impl KafkaPartition {
    pub(crate) fn new(topic: Arc<str>, number: i32, envelope: Arc<Envelope>, committer: Arc<dyn Commit>) -> Self {
        KafkaPartition {
            name: format!("{topic}-{number}"),
            topic,
            number,
            envelope,
            offsets: Mutex::new(Offsets::default()),
            committer,
            in_channel: AtomicI64::new(0),
            in_lane: AtomicI64::new(0),
            released: AtomicBool::new(false),
        }
    }

    pub(crate) fn offsets(&self) -> std::sync::MutexGuard<'_, Offsets> {
        self.offsets.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Partition for KafkaPartition {
    type Record = KRec;

    fn id(&self) -> &str {
        &self.name
    }

    fn encoded_len(&self, record: &KRec) -> usize {
        record::encoded_len(record)
    }

    fn event(&self, records: &[KRec], _window: Option<&WindowPart<'_>>) -> String {
        // No tumbling windows on Kafka (the settings refuse them).
        record::event_json(&self.envelope, &self.name, records)
    }

    fn batch_info(&self, records: &[KRec]) -> (&'static str, Value) {
        record::batch_info(&self.envelope, &self.name, records)
    }

    fn item_index(&self, batch: &[KRec], identifier: &Value) -> Result<usize, String> {
        record::item_index(&self.name, batch, identifier)
    }

    /// AWS (kafka-filtering.html): "Amazon MSK and self-managed Apache Kafka event source mappings
    /// only support filtering on the `value` key", the value "decoded into UTF-8" and read as JSON
    /// if it is JSON, else as a plain string.
    fn filter_fields(&self, record: &KRec) -> Map<String, Value> {
        let mut m = Map::new();
        if let Some(text) = record.value.as_deref().and_then(|v| std::str::from_utf8(v).ok()) {
            let value = serde_json::from_str::<Value>(text).unwrap_or_else(|_| Value::String(text.to_owned()));
            m.insert("value".to_owned(), value);
        }
        m
    }

    fn dropped(&self, count: usize) {
        self.in_lane.fetch_sub(count as i64, Ordering::SeqCst);
    }

    async fn done(&self, records: &[KRec], _window: Option<WindowCheckpoint>) -> Result<(), MappingError> {
        self.in_lane.fetch_sub(records.len() as i64, Ordering::SeqCst);
        // Committed under the lock: two batches finishing at once send their offsets in order.
        let mut offsets = self.offsets();
        let next = offsets.done(records.iter().map(|r| r.index));
        match next {
            Some(next) if !self.released.load(Ordering::SeqCst) => {
                self.committer.commit(&self.topic, self.number, next)
            }
            _ => Ok(()),
        }
    }

    async fn fence(&self) -> Result<(), MappingError> {
        // The group protocol fences: a revoked partition's lanes finish before the rebalance
        // completes, so no invocation outlives this runner's assignment.
        Ok(())
    }

    async fn window_closed(&self) -> Result<(), MappingError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_offset_moves_over_a_done_prefix_only() {
        let mut o = Offsets::default();
        let idx: Vec<u64> = [10, 11, 13, 14].iter().map(|off| o.read(*off)).collect();
        // Done out of order (a later batch first): nothing is committed yet.
        assert_eq!(o.done([idx[2]].into_iter()), None);
        assert_eq!(o.undone(), 3);
        // The first two done: the offset after 11 (offsets need not be dense: 12 is missing).
        assert_eq!(o.done([idx[0], idx[1]].into_iter()), Some(14));
        assert_eq!(o.done([idx[3]].into_iter()), Some(15));
        assert_eq!(o.committed(), Some(15));
        assert_eq!(o.undone(), 0);
    }

    /// OffsetLag counts from the first record not done (a later one done first does not move it).
    #[test]
    fn the_next_offset_to_process_is_the_first_not_done() {
        let mut o = Offsets::default();
        assert_eq!(o.next_to_process(), None, "nothing read, nothing committed");
        let idx: Vec<u64> = [10, 11, 12].iter().map(|off| o.read(*off)).collect();
        assert_eq!(o.next_to_process(), Some(10));
        o.done([idx[1]].into_iter());
        assert_eq!(o.next_to_process(), Some(10));
        o.done([idx[0]].into_iter());
        assert_eq!(o.next_to_process(), Some(12));
        o.done([idx[2]].into_iter());
        assert_eq!(o.next_to_process(), Some(13), "all done: after the last read");
    }
}
