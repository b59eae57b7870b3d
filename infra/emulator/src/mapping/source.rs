//! What a source supplies to the mapping's core, and what the core asks of it.
//!
//! The core (`lane`, `intake`) knows batching, invocation, retries, bisection,
//! record age, tumbling windows, failure destinations, filters and metrics; it knows no broker.
//! A source reads records from one of its *partitions* (a Kinesis shard; next a Kafka partition,
//! a RabbitMQ queue, an SQS queue) and hands them to the core with:
//! - [`Record`]: each record's place (its index among what was read from the partition), its
//!   ordering key, data and arrival time;
//! - [`Partition`]: how the partition's records become an event and a failure record, how an
//!   `itemIdentifier` of a partial batch response names a record, and how a position is
//!   committed once records are done (a shard's sequence number now; a partition's offset, a
//!   delivery tag's ack, a receipt handle's delete next).
use std::future::Future;

use serde_json::{Map, Value};

use super::MappingError;
use super::event::WindowPart;
use super::progress::WindowCheckpoint;

/// One record of a partition, as the core handles it.
pub trait Record: Send + Sync + 'static {
    /// Its place among the records the mapping read from its partition (0, 1, ...).
    fn index(&self) -> u64;
    /// Records of one key keep their order: they go to one lane (ParallelizationFactor).
    fn ordering_key(&self) -> &[u8];
    /// The payload (a filter's `data`).
    fn data(&self) -> &[u8];
    /// When it arrived in the source, unix seconds (record age, windows, delay).
    fn arrival(&self) -> f64;
    /// Its position as the source writes it (a sequence number, an offset), for logs.
    fn position(&self) -> &str;
}

/// One partition of a source: a Kinesis shard, a Kafka partition, a queue.
pub trait Partition: Send + Sync + 'static {
    /// Its records.
    type Record: Record;

    /// Its name in logs and failure records (a shard id, `topic-partition`, a queue).
    fn id(&self) -> &str;

    /// Bytes `record` takes in this partition's event (what counts toward the 6 MB payload): an
    /// upper bound.
    fn encoded_len(&self, record: &Self::Record) -> usize;

    /// The invocation payload for `records` (all of this partition), with the tumbling window's
    /// part if one is open.
    fn event(&self, records: &[Self::Record], window: Option<&WindowPart<'_>>) -> String;

    /// The source's part of a failure record (its key and value: AWS's `KinesisBatchInfo` and
    /// its like), for `records` given up on.
    fn batch_info(&self, records: &[Self::Record]) -> (&'static str, Value);

    /// The index in `batch` of the record a partial batch response's `itemIdentifier` names (a
    /// sequence number for Kinesis; `{"partition": "topic-N", "offset": N}` for Kafka), or why it
    /// names none (the whole batch then fails).
    fn item_index(&self, batch: &[Self::Record], identifier: &Value) -> Result<usize, String>;

    /// Whether a partial batch response fails only the records it names (a queue: SQS deletes
    /// every message not named), rather than every record from the lowest it names on (a stream
    /// or a partition's offsets: the default).
    fn failures_stand_alone(&self) -> bool {
        false
    }

    /// Until when (unix seconds) the core may go on trying to invoke `records` when invoking
    /// fails (a throttle): an SQS message's visibility timeout; `None` (the default): until
    /// `MaximumRecordAgeInSeconds`, if any.
    fn invoke_until(&self, _records: &[Self::Record]) -> Option<f64> {
        None
    }

    /// The record's fields other than its data that a filter pattern may name. AWS names them per
    /// source; the default is none (only `data` is filtered on).
    fn filter_fields(&self, _record: &Self::Record) -> Map<String, Value> {
        Map::new()
    }

    /// Calls `each` with every item `record` delivers to the function (for the delay figures): the
    /// record's data by default; a source whose records pack several (KPL aggregates) says so.
    fn delivered_items(&self, record: &Self::Record, each: &mut dyn FnMut(&[u8])) {
        each(record.data());
    }

    /// A lane dropped `count` records it held, undone, because the partition was taken away
    /// ([`super::lane::ReaderStatus::revoked`]): the next owner reads them again.
    fn dropped(&self, _count: usize) {}

    /// `records` are done (processed, filtered out, or given up on): their position is committed
    /// once everything before it is done too, with the open window's state.
    fn done(
        &self,
        records: &[Self::Record],
        window: Option<WindowCheckpoint>,
    ) -> impl Future<Output = Result<(), MappingError>> + Send;

    /// Records the core gives up on (`condition`): a source whose broker takes them back (a
    /// RabbitMQ queue: nack and requeue) does so and says `true`; the core then neither sends
    /// them to a failure destination nor counts them done. The default: `false`.
    fn take_back(
        &self,
        _records: &[Self::Record],
        _condition: super::outcome::Condition,
    ) -> impl Future<Output = Result<bool, MappingError>> + Send {
        async { Ok(false) }
    }

    /// Before an invocation: confirms this runner still owns the partition (a lease fence), so a
    /// runner paused past its lease does not invoke with records another runner now owns.
    fn fence(&self) -> impl Future<Output = Result<(), MappingError>> + Send;

    /// The open window's state is written with the position, and the window closed.
    fn window_closed(&self) -> impl Future<Output = Result<(), MappingError>> + Send;
}
