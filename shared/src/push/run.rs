//! The line loop: one object from its checkpoint to its end, through the line handler, the
//! batcher and the sink, checkpointing on a cadence and stopping before the deadline.
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant as StdInstant};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::AsyncBufRead;
use tokio_util::codec::FramedRead;
use tracing::{info, warn};

use super::lease::{Interrupted, ObjectProgress};
use super::line::{DataBlocks, Line, Records};
use super::source::{ObjectSource, SourceError};
use super::{ObjectError, ObjectSummary, Outcome, PushHandler};
use crate::aggregation::{AddError, Aggregator};
use crate::batch::{ByteSize, KeyOrderedBatcher};
use crate::config::Ordering;
use crate::invocation::Invocation;
use crate::lines::{BlockFrame, LineBlock, LineBlocks, LineCodec};
use crate::quarantine::{QuarantineWriter, QuarantinedLine, safe_path};
use crate::s3_notification::ObjectEvent;
use crate::shard_map::{ShardIndex, ShardMap};
use crate::sink::{OutRecord, ProduceError, RecordSink, SendReport};
use crate::store::{Etag, StoreError};

/// Records an interrupted owner wrote after its last checkpoint, by partition key, in order.
struct Written {
    by_key: HashMap<String, VecDeque<Bytes>>,
}

impl Written {
    /// Whether the line (key, data) is the next record of `key` already in the stream. Records of a
    /// key were sent in line order, so once a line of a key is missing, no later line of that key
    /// was written either.
    fn take(&mut self, key: &str, data: &[u8]) -> bool {
        let Some(queue) = self.by_key.get_mut(key) else { return false };
        match queue.iter().position(|d| d[..] == *data) {
            Some(i) => {
                queue.drain(..=i);
                true
            }
            None => {
                self.by_key.remove(key);
                false
            }
        }
    }
}

/// Lines packed into KPL aggregates (`PUT_AGGREGATION=on`): one open aggregate per shard, so
/// that each aggregate holds only lines whose keys map to its shard.
struct Aggregating {
    map: ShardMap,
    /// Each key's shard, as computed (an MD5 a line otherwise); cleared past
    /// [`SHARD_CACHE_KEYS`], for keys that never repeat (a hash of each line).
    shard_of: HashMap<compact_str::CompactString, Option<ShardIndex>, xxhash_rust::xxh3::Xxh3DefaultBuilder>,
    /// Per shard (by [`ShardIndex`]): the open aggregate and the line of its first record.
    open: Vec<(Aggregator, u64)>,
    /// When what is open must go (the linger time after the oldest open line).
    deadline: Option<tokio::time::Instant>,
}

impl Aggregating {
    fn new(map: ShardMap, max_bytes: usize) -> Self {
        Aggregating {
            open: vec![(Aggregator::new(max_bytes), 0); map.len()],
            map,
            shard_of: HashMap::default(),
            deadline: None,
        }
    }

    /// The shard `key` maps to; `None` if no shard of the map owns its hash.
    fn shard_of(&mut self, key: &compact_str::CompactString) -> Option<ShardIndex> {
        if let Some(shard) = self.shard_of.get(key) {
            return *shard;
        }
        if self.shard_of.len() >= SHARD_CACHE_KEYS {
            self.shard_of.clear();
        }
        let shard = self.map.shard_of(key);
        self.shard_of.insert(key.clone(), shard);
        shard
    }

    /// Packs `record` into its shard's aggregate. Returns the aggregate it filled, if any; hands
    /// the record back if it belongs to no shard of the map or is too large to aggregate (it is
    /// then sent as a plain record).
    fn add(&mut self, shard: ShardIndex, record: OutRecord, linger: Duration) -> Result<Option<OutRecord>, OutRecord> {
        let (agg, first_line) = &mut self.open[shard.0];
        let mut filled = None;
        match agg.add(&record.partition_key, None, record.data.clone()) {
            Ok(()) => {}
            Err(AddError::Full) => {
                filled = agg.finish().map(|f| OutRecord::aggregate(f, *first_line));
                if agg.add(&record.partition_key, None, record.data.clone()).is_err() {
                    return Err(record);
                }
            }
            Err(_) => return Err(record),
        }
        if agg.len() == 1 {
            *first_line = record.line;
            self.deadline.get_or_insert_with(|| tokio::time::Instant::now() + linger);
        }
        Ok(filled)
    }

    /// Every open aggregate, finished, with its shard.
    fn finish_all(&mut self) -> Vec<(ShardIndex, OutRecord)> {
        self.deadline = None;
        let open = self.open.iter_mut().enumerate();
        open.filter_map(|(i, (agg, line))| agg.finish().map(|f| (ShardIndex(i), OutRecord::aggregate(f, *line))))
            .collect()
    }
}

/// Most partition keys whose shard [`Aggregating`] remembers.
const SHARD_CACHE_KEYS: usize = 65_536;

/// The batcher key of everything bound for one shard when aggregating: with per-key ordering,
/// a call holds one record (aggregate) of a shard, so a resent aggregate cannot be overtaken.
fn shard_key(shard: ShardIndex) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&(shard.0 as u64).to_le_bytes()) | 1 << 63
}

/// The state of one object while its lines flow.
pub(super) struct Run<'a, O, R, S> {
    handler: &'a PushHandler<O, R, S>,
    ev: &'a ObjectEvent,
    /// The last checkpoint written, and its version.
    pub(super) progress: ObjectProgress,
    pub(super) version: Etag,
    resumed_after_line: u64,
    found_written: u64,
    batcher: KeyOrderedBatcher<OutRecord>,
    /// With `PUT_AGGREGATION=on`, the aggregates lines go into before the batcher.
    aggregating: Option<Aggregating>,
    quarantine: QuarantineWriter,
    /// Last line read and the offset after it; blank and skipped lines read since the last
    /// checkpoint.
    read_line: u64,
    read_offset: u64,
    blank_since: u64,
    skipped_since: u64,
    sent: SendReport,
    last_checkpoint: StdInstant,
    /// When this run's lease lapses (tokio's clock, for paused-time tests).
    lease_until: tokio::time::Instant,
    /// The object, as records name it for a sink that names them ([`RecordSink::names_records`]).
    origin: Option<std::sync::Arc<str>>,
}

impl<'a, O: ObjectSource, R: Records, S: RecordSink> Run<'a, O, R, S> {
    pub(super) fn new(
        handler: &'a PushHandler<O, R, S>,
        ev: &'a ObjectEvent,
        progress: ObjectProgress,
        version: Etag,
    ) -> Self {
        let q_prefix = quarantine_prefix(ev);
        let put = handler.settings.put;
        let lease_until_ms = progress.lease_until_ms;
        Run {
            handler,
            ev,
            read_line: progress.lines_done,
            read_offset: progress.bytes_done,
            resumed_after_line: progress.lines_done,
            found_written: 0,
            progress,
            version,
            batcher: KeyOrderedBatcher::new(put, put.max_events()),
            aggregating: None,
            quarantine: QuarantineWriter::new(handler.quarantine.clone(), q_prefix),
            blank_since: 0,
            skipped_since: 0,
            sent: SendReport::default(),
            last_checkpoint: StdInstant::now(),
            lease_until: tokio::time::Instant::now()
                + Duration::from_millis(progress_lease_left(&handler.settings.lease, lease_until_ms)),
            origin: handler.sink().names_records().then(|| origin_of(ev).into()),
        }
    }

    /// The account of the object after [`Run::process`].
    pub(super) fn summary(&self, outcome: Outcome, started: StdInstant) -> ObjectSummary {
        let mut summary = ObjectSummary::from_progress(self.ev, outcome, &self.progress);
        summary.resumed_after_line = self.resumed_after_line;
        summary.found_written = self.found_written;
        summary.millis = started.elapsed().as_millis() as u64;
        summary
    }

    /// Every line from the checkpoint to the end of the object, checkpointed.
    pub(super) async fn process(
        &mut self,
        interrupted: Option<Interrupted>,
        invocation: &Invocation,
    ) -> Result<Outcome, ObjectError> {
        let (ev, settings) = (self.ev, &self.handler.settings);
        if interrupted.is_some() {
            // The interrupted owner may have written a quarantine part after its last checkpoint.
            self.quarantine.replace_next_part();
        }
        let gzip_by_name = ev.key.ends_with(".gz");
        let ranged = interrupted.is_some() && self.progress.bytes_done > 0 && !gzip_by_name;
        let start = if ranged { self.progress.bytes_done } else { 0 };
        let opened = match self.handler.source.open(ev, start).await {
            Ok(o) => o,
            Err(SourceError::Gone { reason }) => {
                warn!(bucket = %ev.bucket, key = %ev.key, reason, "object gone or replaced before it was read; nothing to do");
                let ended = Some(format!("gone: {reason}"));
                if let Err(e) = self.handler.leases.finish(ev, &mut self.progress, &self.version, ended).await {
                    // A lost race here only means a later duplicate finds the object gone too.
                    warn!(bucket = %ev.bucket, key = %ev.key, error = %e, "could not mark the gone object done");
                }
                return Ok(Outcome::Gone { reason });
            }
            Err(SourceError::RangeNotSatisfiable) if ranged => {
                // The checkpoint is at the very end of the object: nothing left to read.
                self.version = self
                    .handler
                    .leases
                    .finish(ev, &mut self.progress, &self.version, None)
                    .await
                    .map_err(ObjectError::Checkpoint)?;
                return Ok(Outcome::Processed);
            }
            Err(e) => return Err(ObjectError::Open(e)),
        };
        let body = tokio::io::BufReader::with_capacity(64 * 1024, opened.body);
        let reader: Box<dyn AsyncBufRead + Send + Unpin> = if gzip_by_name || opened.content_gzip {
            let mut decoder = async_compression::tokio::bufread::GzipDecoder::new(body);
            decoder.multiple_members(true);
            Box::new(tokio::io::BufReader::with_capacity(64 * 1024, decoder))
        } else {
            Box::new(body)
        };
        if let Some(max_bytes) = settings.aggregation {
            match self.handler.producer.sink().shard_map().await.map_err(ObjectError::ShardMap)? {
                Some(map) if !map.is_empty() => self.aggregating = Some(Aggregating::new(map, max_bytes)),
                _ => warn!(bucket = %ev.bucket, key = %ev.key,
                           "PUT_AGGREGATION is on but the sink cannot tell its shards; lines go one to a record"),
            }
        }
        if let Some(max_bytes) = self.handler.records.whole_object() {
            return self.process_whole(reader, max_bytes, interrupted).await;
        }
        // A ranged read starts at the checkpoint; a gzip stream is re-read from the start and the
        // lines up to the checkpoint are skipped.
        let codec = if ranged {
            LineCodec::new(settings.max_line_bytes).starting_at(self.progress.lines_done + 1, self.progress.bytes_done)
        } else {
            LineCodec::new(settings.max_line_bytes)
        };
        // Reading and splitting run in a task of their own and hand over blocks of whole lines, so
        // that the S3 read overlaps the checking and batching below.
        let (mut blocks_in, _reader) =
            spawn_block_reader(FramedRead::with_capacity(reader, LineBlocks::new(codec), 64 * 1024));
        let mut block = LineBlock::default();
        let mut at = 0usize;
        let mut written = match interrupted {
            Some(window) => Some(self.read_back(window).await?),
            None => None,
        };
        let mut blocks = DataBlocks::default();

        // One timer for the linger of the open batch, re-armed only when that deadline changes,
        // and the clocks read every 128 lines: this loop runs per line, millions of times.
        let linger = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(linger);
        let mut armed = None;
        let mut tick = 0u32;
        loop {
            tick = tick.wrapping_add(1);
            if tick.is_multiple_of(128) || self.quarantine.is_full() {
                if self.last_checkpoint.elapsed() >= settings.checkpoint_interval || self.quarantine.is_full() {
                    self.checkpoint(false).await?;
                }
                if invocation.out_of_time(settings.deadline_margin) {
                    self.checkpoint(false).await?;
                    warn!(bucket = %ev.bucket, key = %ev.key, lines_done = self.progress.lines_done, "stopping before the deadline; a retry resumes from the checkpoint");
                    return Err(ObjectError::OutOfTime { lines_done: self.progress.lines_done });
                }
            }
            let deadline = match (self.batcher.deadline(), self.aggregating.as_ref().and_then(|a| a.deadline)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if deadline != armed {
                if let Some(d) = deadline {
                    linger.as_mut().reset(d);
                }
                armed = deadline;
            }
            let frame = match block.frames.get(at) {
                Some(frame) => {
                    at += 1;
                    *frame
                }
                None => {
                    let next = tokio::select! {
                        biased;
                        next = blocks_in.recv() => next,
                        _ = &mut linger, if armed.is_some() => {
                            self.flush_batch().await?;
                            continue;
                        }
                    };
                    match next {
                        None => break,
                        Some(Err(source)) => {
                            return Err(ObjectError::ReadBody { message: crate::error::chain(&source), source });
                        }
                        Some(Ok(next)) => {
                            block = next;
                            at = 0;
                            continue;
                        }
                    }
                }
            };
            let (BlockFrame::TooLong { number, offset, next_offset, .. }
            | BlockFrame::Line { number, offset, next_offset, .. }) = frame;
            if number <= self.progress.lines_done {
                continue; // done before the checkpoint (gzip resume re-reads from the start)
            }
            self.read_line = number;
            self.read_offset = next_offset;
            let bad = match frame {
                BlockFrame::TooLong { len, .. } => Some((
                    format!("line of {len} bytes exceeds MAX_LINE_BYTES ({})", settings.max_line_bytes),
                    String::new(),
                )),
                BlockFrame::Line { .. } => {
                    let line = block.line(&frame);
                    if line.iter().all(u8::is_ascii_whitespace) {
                        self.blank_since += 1;
                        continue;
                    }
                    match self.handler.records.line_record(Line::new(line, number, offset, &mut blocks)) {
                        Err(reason) => Some((reason.0, QuarantinedLine::excerpt_of(line))),
                        Ok(None) => {
                            self.skipped_since += 1;
                            None
                        }
                        Ok(Some(mut record)) => match check_record(&record, settings.record_max_bytes) {
                            Err(reason) => Some((reason, QuarantinedLine::excerpt_of(line))),
                            Ok(()) => {
                                if record.line == 0 {
                                    record.line = number; // OutRecord::keyed
                                }
                                if written.as_mut().is_some_and(|w| w.take(&record.partition_key, &record.data)) {
                                    self.found_written += 1;
                                    self.sent.records += 1;
                                    continue;
                                }
                                // Pushed without an await: a future per record costs (BENCHMARKS.md).
                                if self.push_record(record) {
                                    self.send_ready().await?;
                                }
                                None
                            }
                        },
                    }
                }
            };
            if let Some((reason, excerpt)) = bad {
                self.quarantine_line(number, offset, reason, excerpt);
            }
        }
        self.checkpoint(true).await?;
        Ok(Outcome::Processed)
    }

    /// The whole object through the handler at once ([`crate::push::line::ObjectHandler`]).
    async fn process_whole(
        &mut self,
        reader: Box<dyn AsyncBufRead + Send + Unpin>,
        max_bytes: usize,
        interrupted: Option<Interrupted>,
    ) -> Result<Outcome, ObjectError> {
        use tokio::io::AsyncReadExt;
        let mut data = Vec::new();
        if let Err(source) = reader.take(max_bytes as u64 + 1).read_to_end(&mut data).await {
            return Err(ObjectError::ReadBody { message: crate::error::chain(&source), source });
        }
        let mut written = match interrupted {
            Some(window) => Some(self.read_back(window).await?),
            None => None,
        };
        (self.read_line, self.read_offset) = (1, data.len() as u64);
        let records = if data.len() > max_bytes {
            Err(format!("object larger than the handler's limit of {max_bytes} bytes"))
        } else {
            self.handler.records.object_records(&data).map_err(|r| r.0)
        };
        match records {
            Err(reason) => self.quarantine_line(1, 0, reason, QuarantinedLine::excerpt_of(&data)),
            Ok(records) => {
                for (i, mut record) in records.into_iter().enumerate() {
                    if record.line == 0 {
                        record.line = i as u64 + 1; // OutRecord::keyed: its place in the object
                    }
                    if let Err(reason) = check_record(&record, self.handler.settings.record_max_bytes) {
                        let excerpt = QuarantinedLine::excerpt_of(&record.data);
                        self.quarantine_line(record.line, 0, reason, excerpt);
                    } else if written.as_mut().is_some_and(|w| w.take(&record.partition_key, &record.data)) {
                        self.found_written += 1;
                        self.sent.records += 1;
                    } else {
                        if self.push_record(record) {
                            self.send_ready().await?;
                        }
                    }
                }
            }
        }
        self.checkpoint(true).await?;
        Ok(Outcome::Processed)
    }

    fn quarantine_line(&mut self, line: u64, offset: u64, reason: String, excerpt: String) {
        let ev = self.ev;
        warn!(bucket = %ev.bucket, key = %ev.key, line, offset, reason, "line quarantined");
        let entry = QuarantinedLine {
            bucket: ev.bucket.clone(),
            key: ev.key.clone(),
            version: ev.version_id.clone().or_else(|| ev.etag.clone()),
            line,
            offset,
            reason,
            excerpt,
        };
        self.quarantine.add(&entry);
    }

    /// What a crashed owner wrote after its last checkpoint, read back from the sink.
    async fn read_back(&mut self, window: Interrupted) -> Result<Written, ObjectError> {
        let (ev, sink) = (self.ev, self.handler.producer.sink());
        if !sink.can_read_back() {
            warn!(bucket = %ev.bucket, key = %ev.key, after_line = self.progress.lines_done,
                  "resuming an interrupted object with a sink that cannot be read back: lines sent after the last checkpoint are sent again (at least once)");
        }
        // Reading back can take longer than the lease (every shard, read under the shard's read
        // limits); the lease is renewed meanwhile, so that no other invocation takes the object
        // over from an owner that is working.
        let positions = self.progress.shard_positions.clone();
        let read = sink.written_since(&positions, window.since_ms, window.until_ms);
        tokio::pin!(read);
        let found = loop {
            tokio::select! {
                found = &mut read => break found.map_err(ObjectError::ReadBack)?,
                () = tokio::time::sleep_until(self.fence()) => self.renew().await?,
            }
        };
        let mut by_key: HashMap<String, VecDeque<Bytes>> = HashMap::new();
        for r in found {
            // An aggregate is read back as the lines it packs, each under its own key.
            match crate::aggregation::deaggregate(&r.data) {
                Ok(aggregate) => {
                    for user in aggregate.records() {
                        let data = Bytes::copy_from_slice(user.data);
                        by_key.entry(user.partition_key.to_owned()).or_default().push_back(data);
                    }
                }
                Err(_) => by_key.entry(r.partition_key).or_default().push_back(r.data),
            }
        }
        info!(bucket = %ev.bucket, key = %ev.key, after_line = self.progress.lines_done, "resuming an interrupted object");
        Ok(Written { by_key })
    }

    /// Whether batches hold at most one record of a key: per-key ordering on a sink whose calls
    /// can fail entry by entry (Kinesis). A sink whose calls keep a key's records in order and fail
    /// them together (Kafka: one Produce per partition) needs no such split.
    #[inline]
    fn ordered(&self) -> bool {
        self.handler.settings.ordering == Ordering::PerKey && !self.handler.sink().keeps_key_order_in_a_call()
    }

    /// Adds a record to the batcher (no await: this runs for every line); whether a batch is full.
    #[inline]
    fn push_record(&mut self, record: OutRecord) -> bool {
        // With per-key ordering a batch holds one record of a key; a later one waits for the next
        // batch (see KeyOrderedBatcher), so a partial failure resent before the next batch cannot
        // be overtaken. Aggregating, the key is the shard's: one aggregate of a shard a call.
        let ordered = self.ordered();
        let linger = self.handler.settings.put.timeout();
        if let Some(agg) = self.aggregating.as_mut()
            && let Some(shard) = agg.shard_of(&record.partition_key)
        {
            // A record too large to aggregate goes plain, ordered with its shard's aggregates.
            let out = agg.add(shard, record, linger).unwrap_or_else(Some);
            if let Some(out) = out {
                self.enqueue(ordered.then(|| shard_key(shard)), out);
            }
            return self.batcher.has_ready();
        }
        let key = ordered.then(|| xxhash_rust::xxh3::xxh3_64(record.partition_key.as_bytes()));
        self.enqueue(key, record);
        self.batcher.has_ready()
    }

    /// Puts a record (or an aggregate) in the batcher under `key`.
    fn enqueue(&mut self, key: Option<u64>, mut record: OutRecord) {
        if let Some(origin) = &self.origin {
            record.origin = Some(origin.clone());
        }
        if let Err(oversized) = self.batcher.push(key, record) {
            // Only possible if RECORD_MAX_BYTES > PUT_MAX_BYTES, which the configuration refuses.
            let reason = format!("record of {} bytes exceeds PUT_MAX_BYTES", oversized.size);
            let excerpt = QuarantinedLine::excerpt_of(&oversized.item.data);
            self.quarantine_line(oversized.item.line, self.read_offset, reason, excerpt);
        }
    }

    /// Sends the batches that are full.
    async fn send_ready(&mut self) -> Result<(), ObjectError> {
        while let Some(batch) = self.batcher.ready() {
            self.send(batch).await?;
        }
        Ok(())
    }

    /// Sends everything buffered, records held back for a later batch and open aggregates
    /// included.
    async fn flush_batch(&mut self) -> Result<(), ObjectError> {
        let ordered = self.ordered();
        if let Some(finished) = self.aggregating.as_mut().map(Aggregating::finish_all) {
            for (shard, record) in finished {
                self.enqueue(ordered.then(|| shard_key(shard)), record);
            }
        }
        while let Some(batch) = self.batcher.flush() {
            self.send(batch).await?;
        }
        Ok(())
    }

    /// Sends a batch, never starting a call after the fence (a quarter of the lease before it
    /// lapses): there the lease is renewed first, and if another invocation took the object over
    /// meanwhile (a stall longer than the lease: S3 backoff, resends), the renewal's
    /// compare-and-swap fails and nothing more is sent. Without the fence, a stalled owner went
    /// on sending after a retry had taken over, and lines reached the stream twice.
    async fn send(&mut self, mut batch: Vec<OutRecord>) -> Result<(), ObjectError> {
        loop {
            self.renew_if_due().await?;
            match self.handler.producer.send_until(batch, Some(self.fence())).await {
                Ok(report) => {
                    self.sent.merge(report);
                    return Ok(());
                }
                Err(ProduceError::Fenced { remaining, written }) => {
                    self.sent.merge(written);
                    batch = remaining;
                }
                Err(e) => return Err(ObjectError::Produce(e)),
            }
        }
    }

    fn fence(&self) -> tokio::time::Instant {
        self.lease_until - self.handler.settings.lease / 4
    }

    /// Renews the lease once the fence is reached, so that what follows is done under it.
    async fn renew_if_due(&mut self) -> Result<(), ObjectError> {
        if tokio::time::Instant::now() >= self.fence() {
            self.renew().await?;
        }
        Ok(())
    }

    /// Extends the lease (the checkpoint itself does not move).
    async fn renew(&mut self) -> Result<(), ObjectError> {
        let renewed = self.handler.leases.renew(self.ev, &mut self.progress, &self.version).await;
        self.version = renewed.map_err(ObjectError::Checkpoint)?;
        self.lease_until = tokio::time::Instant::now() + self.handler.settings.lease;
        Ok(())
    }

    /// Makes everything read so far durable (open batch sent, quarantine part written), then
    /// records it with compare-and-swap, renewing the lease.
    async fn checkpoint(&mut self, complete: bool) -> Result<(), ObjectError> {
        self.flush_batch().await?;
        let first_line = self.progress.lines_done + 1;
        // As before a send: the part is written only while the lease holds (see `send`).
        self.renew_if_due().await?;
        let quarantined = match self.quarantine.write_part(first_line).await {
            // The part is there already: written by a retry that took this object over while this
            // run stalled (the renewal fails: nothing is overwritten), or by this run itself, its
            // answer lost (the renewal holds: the part is this run's to replace).
            Err(StoreError::PreconditionFailed { .. }) => {
                self.renew().await?;
                self.quarantine.replace_next_part();
                self.quarantine.write_part(first_line).await
            }
            written => written,
        }
        .map_err(ObjectError::Quarantine)?;
        let sent = std::mem::take(&mut self.sent);
        let p = &mut self.progress;
        p.lines_done = self.read_line;
        p.bytes_done = self.read_offset;
        p.blank_lines += std::mem::take(&mut self.blank_since);
        p.skipped_lines += std::mem::take(&mut self.skipped_since);
        p.records_sent += sent.records as u64;
        p.put_calls += sent.calls as u64;
        p.resent += sent.resent as u64;
        p.put_records += sent.put_records as u64;
        p.put_units += sent.payload_units;
        p.quarantined += quarantined as u64;
        for (shard, seq) in sent.positions {
            p.shard_positions.insert(shard, seq.to_string());
        }
        p.complete = complete;
        self.version = self.handler.leases.save(self.ev, p, &self.version).await.map_err(ObjectError::Checkpoint)?;
        self.last_checkpoint = StdInstant::now();
        self.lease_until = tokio::time::Instant::now() + self.handler.settings.lease;
        Ok(())
    }
}

/// Where an object's quarantine parts go: bucket, key and version (or ETag), each made safe as a
/// path.
fn quarantine_prefix(ev: &ObjectEvent) -> String {
    let version = ev.version_id.as_deref().or(ev.etag.as_deref()).unwrap_or("unversioned");
    format!("{}/{}/{}", ev.bucket, safe_path(&ev.key), safe_path(version))
}

/// The object as a sink names its records' origin: `<bucket>/<key>@<version>` (the ETag when
/// the bucket is not versioned): the same for every delivery and retry of the same object.
fn origin_of(ev: &ObjectEvent) -> String {
    let version = ev.version_id.as_deref().or(ev.etag.as_deref()).unwrap_or("unversioned");
    format!("{}/{}@{version}", ev.bucket, ev.key)
}

/// What is left of a lease that ends at `lease_until_ms` (epoch ms), at most the whole lease.
fn progress_lease_left(lease: &Duration, lease_until_ms: u64) -> u64 {
    lease_until_ms.saturating_sub(crate::push::lease::now_ms()).min(lease.as_millis() as u64)
}

/// Kinesis's limits on a record, whatever handler made it.
#[inline]
fn check_record(record: &OutRecord, record_max_bytes: usize) -> Result<(), String> {
    let key = &record.partition_key;
    // Characters are counted only when the bytes could be too many (a character is 1-4 bytes).
    if key.is_empty()
        || (key.len() > super::line::MAX_PARTITION_KEY_CHARS
            && key.chars().count() > super::line::MAX_PARTITION_KEY_CHARS)
    {
        return Err(format!("partition key of {} characters (Kinesis takes 1 to 256)", key.chars().count()));
    }
    let size = record.byte_size();
    if size > record_max_bytes {
        return Err(format!(
            "record of {size} bytes (data and partition key) exceeds RECORD_MAX_BYTES ({record_max_bytes})"
        ));
    }
    Ok(())
}

/// Aborts a task when dropped (an early return must not leave the reader running).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type BlockResult = Result<LineBlock, std::io::Error>;

/// Reads blocks of lines in a task; a few blocks (of up to the read buffer's size) wait at most,
/// so a slow consumer holds the read back instead of buffering the object. The end of the input
/// closes the channel.
fn spawn_block_reader<R>(
    mut blocks: FramedRead<R, LineBlocks>,
) -> (tokio::sync::mpsc::Receiver<BlockResult>, AbortOnDrop)
where
    R: tokio::io::AsyncRead + Send + Unpin + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<BlockResult>(4);
    let task = tokio::spawn(async move {
        while let Some(block) = blocks.next().await {
            let failed = block.is_err();
            if tx.send(block).await.is_err() || failed {
                return;
            }
        }
    });
    (rx, AbortOnDrop(task))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

    use super::*;
    use crate::config::{Env, PushSettings};
    use crate::push::lease::Leases;
    use crate::push::line::{JsonLines, LineHandler};
    use crate::push::source::FileSource;
    use crate::push::{ObjectError, PushError};
    use crate::sink::{PutOutcome, SinkError, WrittenRecord};
    use crate::store::Store;

    /// Keeps every record; fails the first `fail_calls` calls whole; can be read back.
    #[derive(Default)]
    struct FakeSink {
        records: Mutex<Vec<OutRecord>>,
        fail_calls: AtomicUsize,
        calls: AtomicUsize,
        /// Every call's records, for tests that look at what went together.
        batches: Mutex<Vec<Vec<OutRecord>>>,
        /// How long reading back takes.
        read_back_takes: Mutex<Duration>,
        /// How long each PutRecords call takes.
        put_takes: Mutex<Duration>,
    }

    /// Two shards splitting the hash-key space in half.
    fn two_shards() -> ShardMap {
        ShardMap::new(vec![("shardId-0".into(), 0, u128::MAX / 2), ("shardId-1".into(), u128::MAX / 2 + 1, u128::MAX)])
    }

    impl RecordSink for FakeSink {
        fn can_read_back(&self) -> bool {
            true
        }
        async fn put_records(&self, records: &[OutRecord]) -> Result<PutOutcome, SinkError> {
            self.calls.fetch_add(1, AtomicOrdering::SeqCst);
            let takes = *self.put_takes.lock().unwrap();
            if !takes.is_zero() {
                tokio::time::sleep(takes).await;
            }
            if self.fail_calls.load(AtomicOrdering::SeqCst) > 0 {
                self.fail_calls.fetch_sub(1, AtomicOrdering::SeqCst);
                return Err(SinkError::new("ResourceNotFoundException: no stream", false));
            }
            self.batches.lock().unwrap().push(records.to_vec());
            let mut all = self.records.lock().unwrap();
            all.extend_from_slice(records);
            Ok(PutOutcome::all_written("shardId-0", all.len().to_string()))
        }
        async fn shard_map(&self) -> Result<Option<ShardMap>, SinkError> {
            Ok(Some(two_shards()))
        }
        async fn written_since(
            &self,
            _: &std::collections::BTreeMap<String, String>,
            _: u64,
            _: u64,
        ) -> Result<Vec<WrittenRecord>, SinkError> {
            let takes = *self.read_back_takes.lock().unwrap();
            tokio::time::sleep(takes).await;
            let all = self.records.lock().unwrap();
            Ok(all
                .iter()
                .map(|r| WrittenRecord { partition_key: r.partition_key.to_string(), data: r.data.clone() })
                .collect())
        }
    }

    struct World {
        dir: tempfile::TempDir,
        handler: PushHandler<FileSource, JsonLines, FakeSink>,
    }

    fn world(env: &[(&str, &str)], object: &str) -> World {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("objects/b")).unwrap();
        std::fs::write(dir.path().join("objects/b/k.ndjson"), object).unwrap();
        let settings =
            PushSettings::from_env(Env::from_pairs(env.iter().copied()).with_local_locations(dir.path())).unwrap();
        let handler = PushHandler::new(
            settings,
            FileSource::new(dir.path().join("objects")),
            JsonLines::new(Some("user".into())),
            FakeSink::default(),
            Store::file(dir.path().join("q")),
            Store::file(dir.path().join("cp")),
        );
        World { dir, handler }
    }

    fn event() -> Vec<u8> {
        br#"{"Records":[{"eventVersion":"2.1","eventSource":"aws:s3","eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"b"},"object":{"key":"k.ndjson","eTag":"e1","sequencer":"01"}}}]}"#.to_vec()
    }

    fn lines(n: usize) -> String {
        (1..=n).map(|i| format!("{{\"user\":\"u{}\",\"i\":{i}}}\n", i % 5)).collect()
    }

    /// One invocation's metrics: this invocation's share of the object, with the bucket as the
    /// only dimension besides the function's.
    #[tokio::test]
    async fn an_invocation_records_its_share_of_the_object_by_bucket() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let object = format!("{}not json\n", lines(20));
        let w = world(&[("PUT_MAX_RECORDS", "10")], &object);
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        {
            let _local = metrics::set_default_local_recorder(&recorder);
            w.handler.handle(&event(), &Invocation::new("one")).await.unwrap();
        }
        let seen = crate::metrics::seen(&snapshotter);
        let count = |name: &str| {
            let found = seen.iter().find(|s| s.0 == name).unwrap_or_else(|| panic!("no {name} in {seen:?}"));
            if name != crate::metrics::CHECKPOINT_WRITES {
                assert_eq!(found.1, [("Bucket".to_owned(), "b".to_owned())], "{name}");
            }
            let DebugValue::Counter(n) = found.2 else { panic!("{name} is not a counter") };
            n
        };
        assert_eq!(count(crate::metrics::OBJECTS), 1);
        assert_eq!(count(crate::metrics::LINES_IN), 21);
        assert_eq!(count(crate::metrics::RECORDS_SENT), 20);
        assert_eq!(count(crate::metrics::QUARANTINED_LINES), 1);
        // Per-key order (the default): one line of each of the 5 users per call.
        assert_eq!(count(crate::metrics::PUT_RECORDS_CALLS), 4);
        assert_eq!(count(crate::metrics::BYTES_READ), object.len() as u64);
        assert!(count(crate::metrics::CHECKPOINT_WRITES) >= 2, "claim and finish at least");
    }

    /// Every log line about an object carries its bucket, key and version (a span the handler
    /// opens), in the Powertools format.
    #[cfg(feature = "runtime")]
    #[tokio::test]
    async fn log_lines_about_an_object_carry_its_bucket_key_and_version() {
        use crate::telemetry::test_support::{Buffer, subscriber};
        let buffer = Buffer::default();
        let subscriber = subscriber(&buffer, crate::telemetry::PowertoolsJson::from_env());
        let w = world(&[], &format!("{}not json\n", lines(3)));
        {
            let _default = tracing::subscriber::set_default(subscriber);
            // Another test's thread may have hit these callsites with no subscriber at all and
            // cached "never" for them (tokio-rs/tracing#2874); ask again.
            tracing::callsite::rebuild_interest_cache();
            w.handler.handle(&event(), &Invocation::new("one")).await.unwrap();
        }
        let lines = buffer.lines();
        assert!(lines.len() >= 2, "{lines:?}");
        for line in &lines {
            assert_eq!(
                (&line["bucket"], &line["key"], &line["version"]),
                (&"b".into(), &"k.ndjson".into(), &"e1".into()),
                "{line:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_failed_invocation_releases_its_lease_and_the_retry_sends_every_line_once() {
        let w = world(&[("PUT_MAX_RECORDS", "10"), ("PUT_MAX_ATTEMPTS", "1")], &lines(100));
        w.handler.sink().fail_calls.store(1, AtomicOrdering::SeqCst);
        let err = w.handler.handle(&event(), &Invocation::new("first")).await.unwrap_err();
        assert!(matches!(err, PushError::Object { source: ObjectError::Produce(_), .. }), "{err}");
        // Not busy: the failed invocation ended its lease.
        let summary = w.handler.handle(&event(), &Invocation::new("retry")).await.unwrap();
        assert_eq!(summary.objects[0].records, 100);
        let records = w.handler.sink().records.lock().unwrap();
        let mut seen: Vec<u64> = records.iter().map(|r| r.line).collect();
        seen.sort();
        assert_eq!(seen, (1..=100).collect::<Vec<_>>(), "each line once");
    }

    #[tokio::test]
    async fn a_duplicate_waits_for_a_silent_owners_lease_and_then_finishes_the_object() {
        let w = world(&[("CHECKPOINT_LEASE_MS", "400"), ("CHECKPOINT_INTERVAL_MS", "100")], &lines(50));
        // An owner that claimed the object and went silent (its process died): its lease runs
        // 300 ms more. The duplicate does not answer Busy at once: it waits and takes over.
        let ev = object_event();
        let silent = ObjectProgress {
            bucket: "b".into(),
            key: "k.ndjson".into(),
            owner: "silent".into(),
            lease_until_ms: crate::push::lease::now_ms() + 300,
            checkpointed_at_ms: crate::push::lease::now_ms(),
            ..Default::default()
        };
        let id = Leases::<Store>::object_id(&ev).0;
        let body = serde_json::to_vec(&silent).unwrap().into();
        Store::file(w.dir.path().join("cp")).put(&id, body, crate::store::Precondition::IfAbsent).await.unwrap();
        let s = w.handler.handle(&event(), &Invocation::new("duplicate")).await.unwrap();
        assert_eq!((s.objects[0].outcome.clone(), s.objects[0].records), (Outcome::Processed, 50));
    }

    #[tokio::test]
    async fn a_duplicate_leaves_the_object_to_an_owner_that_keeps_renewing_its_lease() {
        let w = world(&[("CHECKPOINT_LEASE_MS", "200"), ("CHECKPOINT_INTERVAL_MS", "50")], &lines(50));
        let ev = object_event();
        let id = Leases::<Store>::object_id(&ev).0;
        let store = Store::file(w.dir.path().join("cp"));
        let alive = |until: u64| ObjectProgress {
            bucket: "b".into(),
            key: "k.ndjson".into(),
            owner: "alive".into(),
            lease_until_ms: until,
            checkpointed_at_ms: crate::push::lease::now_ms(),
            ..Default::default()
        };
        let body = serde_json::to_vec(&alive(crate::push::lease::now_ms() + 200)).unwrap().into();
        store.put(&id, body, crate::store::Precondition::IfAbsent).await.unwrap();
        // The owner renews its lease every 50 ms while the duplicate waits (at most 400 ms).
        let renewing = tokio::spawn(async move {
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let body = serde_json::to_vec(&alive(crate::push::lease::now_ms() + 200)).unwrap().into();
                store.put(&id, body, crate::store::Precondition::None).await.unwrap();
            }
        });
        let s = w.handler.handle(&event(), &Invocation::new("duplicate")).await.unwrap();
        renewing.abort();
        assert_eq!(s.objects[0].outcome, Outcome::Deferred { owner: "alive".into() });
        assert!(w.handler.sink().records.lock().unwrap().is_empty(), "nothing sent by the duplicate");
    }

    /// A sink whose first call hangs (a stalled connection), then fails every entry as throttled;
    /// every later call writes. Counts what it wrote.
    struct StallsThenThrottles {
        calls: AtomicUsize,
        written: AtomicUsize,
        stall: Duration,
    }

    impl RecordSink for StallsThenThrottles {
        async fn put_records(&self, records: &[OutRecord]) -> Result<PutOutcome, SinkError> {
            if self.calls.fetch_add(1, AtomicOrdering::SeqCst) == 0 {
                tokio::time::sleep(self.stall).await;
                let failed = (0..records.len())
                    .map(|index| crate::sink::FailedEntry {
                        index,
                        code: "ProvisionedThroughputExceededException".into(),
                        message: "Rate exceeded".into(),
                    })
                    .collect();
                return Ok(PutOutcome { failed, last_written: Default::default() });
            }
            self.written.fetch_add(records.len(), AtomicOrdering::SeqCst);
            Ok(PutOutcome::all_written("shardId-0", "1"))
        }
        async fn written_since(
            &self,
            _: &std::collections::BTreeMap<String, String>,
            _: u64,
            _: u64,
        ) -> Result<Vec<WrittenRecord>, SinkError> {
            Ok(Vec::new())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_owner_stalled_past_its_lease_sends_nothing_more_once_another_took_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("objects/b")).unwrap();
        std::fs::write(dir.path().join("objects/b/k.ndjson"), lines(20)).unwrap();
        let env = [("CHECKPOINT_LEASE_MS", "1000"), ("CHECKPOINT_INTERVAL_MS", "100"), ("PUT_MAX_ATTEMPTS", "50")];
        let settings =
            PushSettings::from_env(Env::from_pairs(env.iter().copied()).with_local_locations(dir.path())).unwrap();
        let sink = StallsThenThrottles { calls: 0.into(), written: 0.into(), stall: Duration::from_millis(1300) };
        let handler = PushHandler::new(
            settings,
            FileSource::new(dir.path().join("objects")),
            JsonLines::new(Some("user".into())),
            sink,
            Store::file(dir.path().join("q")),
            Store::file(dir.path().join("cp")),
        );
        // While the first call hangs, the lease lapses and another invocation takes the object.
        let store = Store::file(dir.path().join("cp"));
        let thief = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1100)).await;
            let id = Leases::<Store>::object_id(&object_event()).0;
            let (current, _) = store.get(&id).await.unwrap().map(|o| (o.body, o.etag)).unwrap();
            let mut p: ObjectProgress = serde_json::from_slice(&current).unwrap();
            p.owner = "thief".into();
            p.lease_until_ms = crate::push::lease::now_ms() + 60_000;
            store.put(&id, serde_json::to_vec(&p).unwrap().into(), crate::store::Precondition::None).await.unwrap();
        });
        let summary = handler.handle(&event(), &Invocation::new("stalled")).await.unwrap();
        thief.await.unwrap();
        // Left to the invocation that took it over, without spending this event's retries.
        assert!(matches!(summary.objects[0].outcome, Outcome::Deferred { .. }), "{:?}", summary.objects[0]);
        assert_eq!(handler.sink().written.load(AtomicOrdering::SeqCst), 0, "nothing written after the takeover");
    }

    #[tokio::test]
    async fn two_deliveries_at_once_send_every_line_once_and_both_succeed() {
        let w = world(&[("PUT_MAX_RECORDS", "5")], &lines(200));
        let (event, first, duplicate) = (event(), Invocation::new("first"), Invocation::new("duplicate"));
        let (a, b) = tokio::join!(w.handler.handle(&event, &first), w.handler.handle(&event, &duplicate));
        let outcomes = [a.unwrap().objects[0].outcome.clone(), b.unwrap().objects[0].outcome.clone()];
        assert_eq!(outcomes.iter().filter(|o| **o == Outcome::Processed).count(), 1, "{outcomes:?}");
        assert_eq!(w.handler.sink().records.lock().unwrap().len(), 200, "each line once");
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_time_checkpoints_and_the_retry_resumes_after_the_checkpoint() {
        let w = world(&[("DEADLINE_MARGIN_MS", "10000"), ("PUT_MAX_RECORDS", "5")], &lines(1000));
        // 100 ms a call: within the margin after 20 calls (100 lines), so the first clock check,
        // at line 128, checkpoints and stops, long before the hard stop at half the margin.
        *w.handler.sink().put_takes.lock().unwrap() = Duration::from_millis(100);
        let late = Invocation::new("late").with_time_left(Duration::from_secs(12));
        let err = w.handler.handle(&event(), &late).await.unwrap_err();
        let PushError::Object { source: ObjectError::OutOfTime { lines_done }, .. } = err else { panic!("{err}") };
        assert!((1..1000).contains(&lines_done), "stopped at the first clock check: {lines_done}");
        *w.handler.sink().put_takes.lock().unwrap() = Duration::ZERO;
        let summary = w.handler.handle(&event(), &Invocation::new("retry")).await.unwrap();
        assert_eq!((summary.objects[0].resumed_after_line, summary.objects[0].records), (lines_done, 1000));
        assert_eq!(w.handler.sink().records.lock().unwrap().len(), 1000, "nothing twice");
    }

    /// Reading back every shard can take longer than the lease: the owner renews its lease
    /// meanwhile, so that no other invocation takes over an object whose owner is working.
    #[tokio::test(start_paused = true)]
    async fn a_long_read_back_renews_the_lease() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let writes = |takes: Duration| async move {
            let w = world(&[("CHECKPOINT_LEASE_MS", "1000"), ("CHECKPOINT_INTERVAL_MS", "500")], &lines(5));
            crashed_owner(&w.dir.path().join("cp")).await;
            *w.handler.sink().read_back_takes.lock().unwrap() = takes;
            let recorder = DebuggingRecorder::new();
            let snapshotter = recorder.snapshotter();
            {
                let _local = metrics::set_default_local_recorder(&recorder);
                w.handler.handle(&event(), &Invocation::new("retry")).await.unwrap();
            }
            let seen = crate::metrics::seen(&snapshotter);
            match seen.iter().find(|s| s.0 == crate::metrics::CHECKPOINT_WRITES).map(|s| &s.2) {
                Some(DebugValue::Counter(n)) => *n,
                _ => 0,
            }
        };
        let quick = writes(Duration::ZERO).await;
        let slow = writes(Duration::from_millis(3_500)).await;
        // The fence is 3/4 of the lease: 3.5 s of reading back takes 4 renewals.
        assert!(slow >= quick + 4, "{slow} checkpoint writes with a 3.5 s read-back, {quick} with an instant one");
    }

    #[tokio::test]
    async fn a_crash_after_sending_is_read_back_and_not_resent() {
        let w = world(
            &[("PUT_MAX_RECORDS", "7"), ("CHECKPOINT_LEASE_MS", "100"), ("CHECKPOINT_INTERVAL_MS", "10")],
            &lines(50),
        );
        // What a crashed owner did: sent lines 1-20, checkpointed nothing, lease lapsed.
        crashed_owner(&w.dir.path().join("cp")).await;
        let mut blocks = DataBlocks::default();
        let crashed: Vec<OutRecord> = lines(20)
            .lines()
            .enumerate()
            .map(|(i, l)| {
                JsonLines::new(Some("user".into()))
                    .to_record(Line::new(l.as_bytes(), i as u64 + 1, 0, &mut blocks))
                    .unwrap()
                    .unwrap()
            })
            .collect();
        w.handler.sink().records.lock().unwrap().extend(crashed);
        let summary = w.handler.handle(&event(), &Invocation::new("retry")).await.unwrap();
        assert_eq!((summary.objects[0].found_written, summary.objects[0].records), (20, 50));
        assert_eq!(w.handler.sink().records.lock().unwrap().len(), 50, "the 20 are not sent again");
    }

    /// An owner killed (or fenced) between writing its quarantine part and recording its
    /// checkpoint leaves a part named after the line after its last checkpoint. The next owner
    /// resumes at that line, and its first part replaces that one even when it holds no entries
    /// (its first checkpoint comes before the bad line): every bad line is quarantined once.
    #[tokio::test]
    async fn a_part_left_by_an_interrupted_owner_is_replaced_and_no_bad_line_is_counted_twice() {
        // Long enough that checkpoints (every 10 ms) come before the bad line.
        let object = lines(100_000).replacen("{\"user\":\"u0\",\"i\":99000}", "not json", 1);
        let w = world(&[("CHECKPOINT_LEASE_MS", "1000"), ("CHECKPOINT_INTERVAL_MS", "10")], &object);
        crashed_owner(&w.dir.path().join("cp")).await;
        // What the crashed owner wrote before it could record its checkpoint: the bad line, in the
        // part after its last checkpoint (none: the part of line 1).
        let prefix = quarantine_prefix(&object_event());
        let mut orphan = QuarantineWriter::new(Store::file(w.dir.path().join("q")), prefix);
        orphan.add(&serde_json::json!({ "line": 99000, "from": "the crashed owner" }));
        assert_eq!(orphan.write_part(1).await.unwrap(), 1);

        let summary = w.handler.handle(&event(), &Invocation::new("retry")).await.unwrap();
        assert_eq!(summary.objects[0].quarantined, 1);
        let entries = quarantine_entries(&w.dir.path().join("q"));
        assert_eq!(entries.len(), 1, "the bad line once: {entries:?}");
        assert_eq!(entries[0]["line"], 99000);
        assert!(entries[0].get("from").is_none(), "the crashed owner's part was replaced");
    }

    #[tokio::test]
    async fn a_part_found_already_written_is_replaced_once_the_run_confirms_its_lease() {
        let object = lines(100_000).replacen("{\"user\":\"u1\",\"i\":1}", "not json", 1);
        let w = world(&[("CHECKPOINT_LEASE_MS", "1000"), ("CHECKPOINT_INTERVAL_MS", "10")], &object);
        // A part at line 1 that this run, a fresh owner, did not expect: as if its own write of it
        // had succeeded and the answer been lost. It is written only if absent, so the run finds
        // it, confirms its lease and replaces it.
        let prefix = quarantine_prefix(&object_event());
        let mut earlier = QuarantineWriter::new(Store::file(w.dir.path().join("q")), prefix);
        earlier.replace_next_part();
        earlier.add(&serde_json::json!({ "line": 1, "from": "an earlier write" }));
        assert_eq!(earlier.write_part(1).await.unwrap(), 1);

        let summary = w.handler.handle(&event(), &Invocation::new("fresh")).await.unwrap();
        assert_eq!(summary.objects[0].quarantined, 1);
        let entries = quarantine_entries(&w.dir.path().join("q"));
        assert_eq!(entries.len(), 1, "the bad line once: {entries:?}");
        assert!(entries[0].get("from").is_none(), "replaced by the run holding the lease");
    }

    /// Every quarantine entry under `dir`, part by part.
    fn quarantine_entries(dir: &std::path::Path) -> Vec<serde_json::Value> {
        walkdir(dir)
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Every file under `dir`.
    fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() { out.extend(walkdir(&p)) } else { out.push(p) }
        }
        out
    }

    /// Unpacks what the sink got into (partition key, line) in the order written.
    fn unpacked(records: &[OutRecord]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for r in records {
            match crate::aggregation::deaggregate(&r.data) {
                Ok(a) => out.extend(
                    a.records().map(|u| (u.partition_key.to_owned(), String::from_utf8(u.data.to_vec()).unwrap())),
                ),
                Err(_) => out.push((r.partition_key.to_string(), String::from_utf8(r.data.to_vec()).unwrap())),
            }
        }
        out
    }

    #[tokio::test]
    async fn aggregated_lines_go_one_aggregate_per_shard_a_call_each_only_with_keys_of_its_shard() {
        let object = lines(5000);
        let w = world(&[("PUT_AGGREGATION", "on"), ("PUT_AGGREGATION_MAX_BYTES", "4096")], &object);
        let summary = w.handler.handle(&event(), &Invocation::new("agg")).await.unwrap();
        let o = &summary.objects[0];
        let batches = w.handler.sink().batches.lock().unwrap().clone();
        let records = w.handler.sink().records.lock().unwrap().clone();
        assert_eq!(o.records, 5000, "lines written");
        assert_eq!(o.put_records as usize, records.len());
        assert!(records.len() < 5000 / 40, "packed: {} Kinesis records", records.len());
        assert_eq!(o.put_units, records.len() as u64, "each aggregate under 25 KiB is one unit");
        let map = two_shards();
        for batch in &batches {
            let mut shards: Vec<_> = batch.iter().map(|r| map.shard_of(&r.partition_key)).collect();
            shards.dedup();
            assert_eq!(shards.len(), batch.len(), "one aggregate of a shard per call (per-key order)");
            for r in batch {
                assert!(r.data.len() + r.partition_key.len() <= 4096);
                let a = crate::aggregation::deaggregate(&r.data).unwrap();
                assert_eq!(a.len(), r.user_records as usize);
                assert!(a.records().all(|u| map.shard_of(u.partition_key) == map.shard_of(&r.partition_key)));
            }
        }
        // Every line once, each key's lines in line order.
        let got = unpacked(&records);
        assert_eq!(got.len(), 5000);
        let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
        for (k, l) in got {
            by_key.entry(k).or_default().push(l);
        }
        for (k, ls) in by_key {
            let want: Vec<String> =
                object.lines().filter(|l| l.contains(&format!("\"{k}\""))).map(str::to_owned).collect();
            assert_eq!(ls, want, "key {k}");
        }
    }

    #[tokio::test]
    async fn a_crash_after_sending_aggregates_is_read_back_through_them() {
        let w = world(
            &[("PUT_AGGREGATION", "on"), ("CHECKPOINT_LEASE_MS", "100"), ("CHECKPOINT_INTERVAL_MS", "10")],
            &lines(50),
        );
        crashed_owner(&w.dir.path().join("cp")).await;
        // What the crashed owner wrote: lines 1-20 in aggregates by shard.
        let map = two_shards();
        let mut aggs = [Aggregator::new(1 << 20), Aggregator::new(1 << 20)];
        for l in lines(20).lines() {
            let key = serde_json::from_str::<serde_json::Value>(l).unwrap()["user"].as_str().unwrap().to_owned();
            aggs[map.shard_of(&key).unwrap().0].add(&key, None, Bytes::from(l.to_owned())).unwrap();
        }
        let crashed: Vec<OutRecord> =
            aggs.iter_mut().filter_map(|a| a.finish()).map(|f| OutRecord::aggregate(f, 1)).collect();
        let before = crashed.len();
        w.handler.sink().records.lock().unwrap().extend(crashed);
        let summary = w.handler.handle(&event(), &Invocation::new("retry")).await.unwrap();
        assert_eq!((summary.objects[0].found_written, summary.objects[0].records), (20, 50));
        let records = w.handler.sink().records.lock().unwrap().clone();
        let lines_out = unpacked(&records);
        assert_eq!(lines_out.len(), 50, "the 20 are not sent again");
        assert!(records.len() > before);
    }

    #[tokio::test]
    async fn bad_lines_are_quarantined_and_gone_objects_are_done() {
        let w = world(&[], "{\"user\":\"a\"}\nnot json\n\n[1]\n");
        let s = w.handler.handle(&event(), &Invocation::new("r")).await.unwrap();
        assert_eq!((s.objects[0].records, s.objects[0].quarantined, s.objects[0].blank_lines), (1, 2, 1));
        let part = std::fs::read_to_string(w.dir.path().join("q/b/k.ndjson/e1/part-00000000000000000001.ndjson"))
            .or_else(|_| {
                let dir = w.dir.path().join("q/b");
                let found = walk(&dir);
                std::fs::read_to_string(&found[0])
            })
            .unwrap();
        assert!(part.contains("\"line\":2") && part.contains("JSON but not an object (an array)"), "{part}");
        std::fs::remove_file(w.dir.path().join("objects/b/k.ndjson")).unwrap();
        let other = br#"{"Records":[{"eventVersion":"2.1","eventSource":"aws:s3","eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"b"},"object":{"key":"k.ndjson","eTag":"e2","sequencer":"02"}}}]}"#;
        let s = w.handler.handle(other, &Invocation::new("r2")).await.unwrap();
        assert_eq!(s.objects[0].outcome, Outcome::Gone { reason: "NoSuchKey".into() });
    }

    #[tokio::test]
    async fn whole_objects_go_through_the_handler_at_once_and_a_resume_sends_nothing_twice() {
        use crate::push::line::{LineReject, WholeObject};
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("objects/b")).unwrap();
        let doc: Vec<serde_json::Value> = (0..30).map(|i| serde_json::json!({"id": i % 4, "n": i})).collect();
        std::fs::write(dir.path().join("objects/b/k.ndjson"), serde_json::to_vec(&doc).unwrap()).unwrap();
        let array = |bytes: &[u8]| -> Result<Vec<OutRecord>, LineReject> {
            let items: Vec<serde_json::Value> =
                serde_json::from_slice(bytes).map_err(|e| format!("not a JSON array: {e}"))?;
            Ok(items
                .iter()
                .enumerate()
                .map(|(i, v)| OutRecord::new(v["id"].to_string(), v.to_string().into(), i as u64 + 1))
                .collect())
        };
        let env =
            Env::from_pairs([("PUT_MAX_RECORDS", "7"), ("PUT_MAX_ATTEMPTS", "1")]).with_local_locations(dir.path());
        let settings = PushSettings::from_env(env).unwrap();
        let handler = PushHandler::new(
            settings,
            FileSource::new(dir.path().join("objects")),
            crate::push::line::Objects(WholeObject::new(1 << 20, array)),
            FakeSink::default(),
            Store::file(dir.path().join("q")),
            Store::file(dir.path().join("cp")),
        );
        // A crashed owner sent the first 10 records and checkpointed nothing; its lease lapsed.
        crashed_owner(&dir.path().join("cp")).await;
        let sent_before: Vec<OutRecord> =
            array(&serde_json::to_vec(&doc).unwrap()).unwrap().into_iter().take(10).collect();
        handler.sink().records.lock().unwrap().extend(sent_before);
        let s = handler.handle(&event(), &Invocation::new("r1")).await.unwrap();
        assert_eq!((s.objects[0].records, s.objects[0].lines, s.objects[0].found_written), (30, 1, 10));
        let mut ns: Vec<i64> = handler
            .sink()
            .records
            .lock()
            .unwrap()
            .iter()
            .map(|r| serde_json::from_slice::<serde_json::Value>(&r.data).unwrap()["n"].as_i64().unwrap())
            .collect();
        ns.sort();
        assert_eq!(ns, (0..30).collect::<Vec<_>>());
        // Not a JSON array: quarantined whole, with the reason.
        std::fs::write(dir.path().join("objects/b/k.ndjson"), b"{oops").unwrap();
        let other = br#"{"Records":[{"eventVersion":"2.1","eventSource":"aws:s3","eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"b"},"object":{"key":"k.ndjson","eTag":"e2","sequencer":"02"}}}]}"#;
        let s = handler.handle(other, &Invocation::new("r2")).await.unwrap();
        assert_eq!((s.objects[0].records, s.objects[0].quarantined), (0, 1));
    }

    /// The object event of `event()`.
    fn object_event() -> crate::s3_notification::ObjectEvent {
        match crate::s3_notification::S3Notification::from_slice(&event()).unwrap() {
            crate::s3_notification::S3Notification::Records(mut r) => r.remove(0),
            _ => unreachable!(),
        }
    }

    /// The checkpoint a crashed owner of `event()` leaves: nothing done, its lease lapsed.
    async fn crashed_owner(checkpoints: &std::path::Path) {
        let ev = object_event();
        let dead = ObjectProgress {
            bucket: "b".into(),
            key: "k.ndjson".into(),
            owner: "dead".into(),
            lease_until_ms: 1,
            checkpointed_at_ms: 1,
            ..Default::default()
        };
        let id = Leases::<Store>::object_id(&ev).0;
        let body = serde_json::to_vec(&dead).unwrap().into();
        Store::file(checkpoints).put(&id, body, crate::store::Precondition::IfAbsent).await.unwrap();
    }

    /// A sink whose calls hang (a stalled connection) or fail retryably for ever (throttling).
    struct Stuck {
        hang: bool,
    }

    impl RecordSink for Stuck {
        async fn put_records(&self, _: &[OutRecord]) -> Result<PutOutcome, SinkError> {
            if self.hang {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            Err(SinkError::new("ProvisionedThroughputExceededException: Rate exceeded", true))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_call_or_a_long_backoff_never_runs_past_the_deadline() {
        for hang in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("objects/b")).unwrap();
            std::fs::write(dir.path().join("objects/b/k.ndjson"), lines(10)).unwrap();
            let env =
                Env::from_pairs([("DEADLINE_MARGIN_MS", "4000"), ("PUT_MAX_ATTEMPTS", "100"), ("PUT_LINGER_MS", "0")]);
            let handler = PushHandler::new(
                PushSettings::from_env(env.with_local_locations(dir.path())).unwrap(),
                FileSource::new(dir.path().join("objects")),
                JsonLines::new(Some("user".into())),
                Stuck { hang },
                Store::file(dir.path().join("q")),
                Store::file(dir.path().join("cp")),
            );
            let started = tokio::time::Instant::now();
            let invocation = Invocation::new("r").with_time_left(Duration::from_secs(30));
            let err = handler.handle(&event(), &invocation).await.unwrap_err();
            let PushError::Object { source: ObjectError::OutOfTime { lines_done: 0 }, .. } = err else {
                panic!("{err}")
            };
            assert_eq!(started.elapsed(), Duration::from_secs(28), "stopped at half the 4 s margin (hang: {hang})");
            // The lease was ended: a retry is not busy.
            let claim = handler.leases.claim(&object_event(), "retry").await;
            assert!(matches!(claim, Ok(crate::push::lease::Claim::Owned { .. })), "{claim:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_invocation_with_less_time_than_the_margin_says_so_and_claims_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("objects/b")).unwrap();
        std::fs::write(dir.path().join("objects/b/k.ndjson"), lines(10)).unwrap();
        let env = Env::from_pairs([("DEADLINE_MARGIN_MS", "4000")]);
        let handler = PushHandler::new(
            PushSettings::from_env(env.with_local_locations(dir.path())).unwrap(),
            FileSource::new(dir.path().join("objects")),
            JsonLines::new(Some("user".into())),
            Stuck { hang: false },
            Store::file(dir.path().join("q")),
            Store::file(dir.path().join("cp")),
        );
        let invocation = Invocation::new("r").with_time_left(Duration::from_millis(2500));
        let err = handler.handle(&event(), &invocation).await.unwrap_err();
        let PushError::Object { source: ObjectError::TooLittleTime { left_ms: 2500, margin_ms: 4000 }, .. } = &err
        else {
            panic!("{err}")
        };
        assert_eq!(err.kind(), "PushError.OutOfTime");
        let said = err.to_string();
        assert!(
            said.contains("2500 ms left") && said.contains("DEADLINE_MARGIN_MS") && said.contains("b/k.ndjson"),
            "{said}"
        );
        // Nothing was claimed: a retry owns the object at once.
        let claim = handler.leases.claim(&object_event(), "retry").await;
        assert!(matches!(claim, Ok(crate::push::lease::Claim::Owned { .. })), "{claim:?}");
    }

    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
        }
        out
    }
}
