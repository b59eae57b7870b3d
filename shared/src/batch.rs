//! Batching by count, bytes and time: the one batcher both sides use.
//!
//! Settings follow vector's batch settings: [`BatchConfig::max_events`],
//! [`BatchConfig::max_bytes`] and [`BatchConfig::timeout`] (the linger time: how long the first
//! item of a batch may wait for company). A batch is sealed when the next item would break the
//! count or byte limit, and handed out at once; a batch that is not full is handed out when its
//! timeout expires or the input ends.
//!
//! Two ways to use it:
//! - [`Batcher`], a plain state machine: `push`, then take sealed batches with `ready`, and
//!   `flush` when the deadline passes or input ends. No clock inside except `deadline()`.
//! - [`batched`], which wraps a `Stream` and yields batches, honouring the timeout with tokio's
//!   timer (so it can be tested with paused time).
//! - [`KeyOrderedBatcher`], a [`Batcher`] that puts at most one item of a key in a batch, so that
//!   a batch may fail in part and be resent without a later item of a key overtaking an earlier
//!   one, and still fills its batches (a later item of a key waits for the next batch instead of
//!   closing this one).
//!
//! ```
//! use pushpull::batch::{BatchConfig, Batcher};
//! use std::time::Duration;
//!
//! let config = BatchConfig::new(3, 10, Duration::from_millis(100)).unwrap();
//! let mut batcher = Batcher::new(config);
//! for word in ["ab", "cd", "ef", "gh"] {
//!     batcher.push(word.to_string()).unwrap();
//! }
//! assert_eq!(batcher.ready(), Some(vec!["ab".into(), "cd".into(), "ef".into()])); // 3 events
//! assert_eq!(batcher.ready(), None);
//! assert_eq!(batcher.flush(), Some(vec!["gh".into()]));
//! ```
use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::time::{Instant, Sleep};

/// The size an item counts for against [`BatchConfig::max_bytes`].
pub trait ByteSize {
    /// Size in bytes, as the destination counts it.
    fn byte_size(&self) -> usize;
}

impl ByteSize for String {
    fn byte_size(&self) -> usize {
        self.len()
    }
}
impl ByteSize for Vec<u8> {
    fn byte_size(&self) -> usize {
        self.len()
    }
}
impl ByteSize for bytes::Bytes {
    fn byte_size(&self) -> usize {
        self.len()
    }
}

/// Limits of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    max_events: usize,
    max_bytes: usize,
    timeout: Duration,
}

/// A [`BatchConfig`] that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchConfigError {
    /// `max_events` was zero.
    #[error("max_events must be at least 1")]
    ZeroEvents,
    /// `max_bytes` was zero.
    #[error("max_bytes must be at least 1")]
    ZeroBytes,
}

impl BatchConfig {
    /// At most `max_events` items and `max_bytes` bytes a batch; a batch that is not full is
    /// released `timeout` after its first item arrived (zero: as soon as input pauses).
    pub fn new(max_events: usize, max_bytes: usize, timeout: Duration) -> Result<Self, BatchConfigError> {
        if max_events == 0 {
            return Err(BatchConfigError::ZeroEvents);
        }
        if max_bytes == 0 {
            return Err(BatchConfigError::ZeroBytes);
        }
        Ok(BatchConfig { max_events, max_bytes, timeout })
    }
    /// Most items in one batch.
    pub fn max_events(&self) -> usize {
        self.max_events
    }
    /// Most bytes in one batch (sum of [`ByteSize::byte_size`]).
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }
    /// Linger time of a batch that is not full.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// An item larger than [`BatchConfig::max_bytes`] on its own; it is handed back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("item of {size} bytes exceeds the batch limit of {max_bytes} bytes")]
pub struct Oversized<T> {
    /// The item that did not fit.
    pub item: T,
    /// Its size.
    pub size: usize,
    /// The limit it broke.
    pub max_bytes: usize,
}

/// Collects items into batches under a [`BatchConfig`].
#[derive(Debug)]
pub struct Batcher<T> {
    config: BatchConfig,
    open: Vec<T>,
    open_bytes: usize,
    opened_at: Option<Instant>,
    sealed: VecDeque<Vec<T>>,
}

impl<T: ByteSize> Batcher<T> {
    /// An empty batcher.
    pub fn new(config: BatchConfig) -> Self {
        Batcher { config, open: Vec::new(), open_bytes: 0, opened_at: None, sealed: VecDeque::new() }
    }

    /// The limits in force.
    pub fn config(&self) -> &BatchConfig {
        &self.config
    }

    /// Adds an item. If it would break the open batch's count or byte limit, the open batch is
    /// sealed first (take it with [`Batcher::ready`]). An item bigger than `max_bytes` on its own
    /// is refused and handed back.
    pub fn push(&mut self, item: T) -> Result<(), Oversized<T>> {
        let size = item.byte_size();
        if size > self.config.max_bytes {
            return Err(Oversized { item, size, max_bytes: self.config.max_bytes });
        }
        if !self.open.is_empty() && self.open_bytes + size > self.config.max_bytes {
            self.seal();
        }
        if self.open.is_empty() {
            self.opened_at = Some(Instant::now());
        }
        self.open.push(item);
        self.open_bytes += size;
        if self.open.len() >= self.config.max_events {
            self.seal();
        }
        Ok(())
    }

    /// A sealed (full) batch, oldest first.
    pub fn ready(&mut self) -> Option<Vec<T>> {
        self.sealed.pop_front()
    }

    /// Seals the open batch, whatever its size, and returns the oldest batch waiting.
    pub fn flush(&mut self) -> Option<Vec<T>> {
        self.seal();
        self.sealed.pop_front()
    }

    /// When the open batch's linger time runs out; `None` when nothing is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.opened_at.map(|t| t + self.config.timeout)
    }

    /// Whether nothing is buffered, open or sealed.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty() && self.sealed.is_empty()
    }

    /// Items in the open batch.
    pub fn open_len(&self) -> usize {
        self.open.len()
    }

    /// Batches sealed and not yet taken.
    pub fn ready_len(&self) -> usize {
        self.sealed.len()
    }

    /// The oldest item buffered (of the oldest sealed batch, else of the open one).
    pub fn peek(&self) -> Option<&T> {
        self.sealed.front().and_then(|b| b.first()).or_else(|| self.open.first())
    }

    /// Closes the open batch now, at a boundary the caller knows of (a new tumbling window, a new
    /// file); it waits in [`Batcher::ready`] and the next item opens a new batch.
    pub fn seal(&mut self) {
        if !self.open.is_empty() {
            self.sealed.push_back(std::mem::take(&mut self.open));
            self.open_bytes = 0;
            self.opened_at = None;
        }
    }
}

/// A [`Batcher`] that keeps items of one key in order across batches by never putting two items
/// of a key in the same batch.
///
/// Why: a batch sent with one call (Kinesis `PutRecords`) can fail in part. If two items of a key
/// shared a batch and only the first failed, resending it would put it after the second. With one
/// item of a key per batch, and batches sent one after another, resending a batch's failures
/// before the next batch keeps every key's order.
///
/// An item whose key is in the open batch (or already waiting) waits in order for a later batch,
/// instead of closing this one, so batches still fill up when keys repeat. At most
/// `max_waiting` items, and at most a batch's `max_bytes`, wait; past that the open batch is
/// sealed early to make room (a stream of one key gets batches of one item, which is the price of
/// its order). Items without a key (`None`) are never held back.
///
/// ```
/// use pushpull::batch::{BatchConfig, KeyOrderedBatcher};
/// use std::time::Duration;
///
/// let config = BatchConfig::new(3, 1_000, Duration::from_millis(100)).unwrap();
/// let mut batcher = KeyOrderedBatcher::new(config, 100);
/// for (key, item) in [(1, "a1"), (1, "a2"), (2, "b1"), (3, "c1"), (1, "a3")] {
///     batcher.push(Some(key), item.to_string()).unwrap();
/// }
/// assert_eq!(batcher.ready(), Some(vec!["a1".into(), "b1".into(), "c1".into()]));
/// assert_eq!(batcher.flush(), Some(vec!["a2".into()]));
/// assert_eq!(batcher.flush(), Some(vec!["a3".into()]));
/// assert_eq!(batcher.flush(), None);
/// ```
#[derive(Debug)]
pub struct KeyOrderedBatcher<T> {
    batcher: Batcher<T>,
    /// Keys of the items in the open batch.
    open_keys: HashSet<u64, KeyHashing>,
    /// Items held back: first and last slot of each key's list, in push order.
    waiting: HashMap<u64, (usize, usize), KeyHashing>,
    /// The held-back items, each key's linked through `next` (one allocation for all keys).
    slots: Vec<Slot<T>>,
    /// Slots free for reuse.
    free: Vec<usize>,
    /// Keys with items held back, each once, oldest first.
    queue: VecDeque<u64>,
    waiting_len: usize,
    waiting_bytes: usize,
    max_waiting: usize,
}

#[derive(Debug)]
struct Slot<T> {
    item: Option<T>,
    next: usize,
}

/// Keys are hashes already (callers pass a hash of the partition key): used as they are.
type KeyHashing = std::hash::BuildHasherDefault<KeyHasher>;

#[derive(Debug, Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; fold anything else in all the same.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl<T: ByteSize> KeyOrderedBatcher<T> {
    /// Batches under `config`, with at most `max_waiting` items held back for a later batch.
    pub fn new(config: BatchConfig, max_waiting: usize) -> Self {
        KeyOrderedBatcher {
            batcher: Batcher::new(config),
            open_keys: HashSet::default(),
            waiting: HashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            queue: VecDeque::new(),
            waiting_len: 0,
            waiting_bytes: 0,
            max_waiting,
        }
    }

    /// Adds an item of `key` (any stable hash of it; `None`: no order to keep). Sealed batches are
    /// taken with [`KeyOrderedBatcher::ready`]. An item bigger than `max_bytes` on its own is
    /// refused and handed back.
    pub fn push(&mut self, key: Option<u64>, item: T) -> Result<(), Oversized<T>> {
        let size = item.byte_size();
        let max_bytes = self.batcher.config().max_bytes();
        if size > max_bytes {
            return Err(Oversized { item, size, max_bytes });
        }
        match key {
            // A key with items held back is always in the open batch too (see `refill`).
            Some(k) if self.open_keys.contains(&k) => {
                let slot = match self.free.pop() {
                    Some(i) => {
                        self.slots[i] = Slot { item: Some(item), next: usize::MAX };
                        i
                    }
                    None => {
                        self.slots.push(Slot { item: Some(item), next: usize::MAX });
                        self.slots.len() - 1
                    }
                };
                match self.waiting.entry(k) {
                    std::collections::hash_map::Entry::Occupied(mut e) => {
                        let (_, tail) = e.get_mut();
                        self.slots[*tail].next = slot;
                        *tail = slot;
                    }
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert((slot, slot));
                        self.queue.push_back(k);
                    }
                }
                self.waiting_len += 1;
                self.waiting_bytes += size;
                // Bounded by count and by bytes (a batch's worth), whatever the items' sizes: each
                // seal lets at least one held-back item into the fresh open batch.
                while self.waiting_len > self.max_waiting || self.waiting_bytes > max_bytes {
                    self.seal_and_refill();
                }
            }
            _ => {
                if self.add_open(key, item) {
                    self.refill();
                }
            }
        }
        Ok(())
    }

    /// A sealed (full) batch, oldest first.
    pub fn ready(&mut self) -> Option<Vec<T>> {
        self.batcher.ready()
    }

    /// Whether a sealed batch waits in [`KeyOrderedBatcher::ready`].
    pub fn has_ready(&self) -> bool {
        self.batcher.ready_len() > 0
    }

    /// Seals the open batch, whatever its size, and returns the oldest batch waiting; items held
    /// back fill the next open batch. Call until `None` to drain everything.
    pub fn flush(&mut self) -> Option<Vec<T>> {
        // Nothing waits while the open batch is empty (see `refill`), so one seal is enough.
        if self.batcher.ready_len() == 0 {
            self.seal_and_refill();
        }
        self.batcher.ready()
    }

    fn seal_and_refill(&mut self) {
        self.batcher.seal();
        self.open_keys.clear();
        self.refill();
    }

    /// When the open batch's linger time runs out; `None` when nothing is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.batcher.deadline()
    }

    /// Whether nothing is buffered, open, sealed or held back.
    pub fn is_empty(&self) -> bool {
        self.batcher.is_empty() && self.waiting.is_empty()
    }

    /// Items held back for a later batch.
    pub fn waiting_len(&self) -> usize {
        self.waiting_len
    }

    /// Puts an item in the open batch; true if that sealed a batch (before or after the item).
    fn add_open(&mut self, key: Option<u64>, item: T) -> bool {
        let sealed_before = self.batcher.ready_len();
        // Cannot be oversized: `push` checked.
        let _ = self.batcher.push(item);
        let sealed = self.batcher.ready_len() > sealed_before;
        if sealed {
            self.open_keys.clear();
        }
        // The item is in the open batch unless the count limit sealed it right away.
        if let Some(k) = key
            && self.batcher.open_len() > 0
        {
            self.open_keys.insert(k);
        }
        sealed
    }

    /// After a seal: moves the first held-back item of each waiting key (oldest key first) into
    /// the open batch, starting over whenever that seals another batch. Afterwards every key with
    /// items still held back has one in the open batch.
    fn refill(&mut self) {
        'pass: loop {
            for _ in 0..self.queue.len() {
                let Some(k) = self.queue.pop_front() else { break 'pass };
                if self.open_keys.contains(&k) {
                    self.queue.push_back(k);
                    continue;
                }
                let Some(&(head, tail)) = self.waiting.get(&k) else { continue };
                let Some(item) = self.slots[head].item.take() else { continue };
                self.free.push(head);
                self.waiting_len -= 1;
                self.waiting_bytes -= item.byte_size();
                if head == tail {
                    self.waiting.remove(&k);
                } else {
                    self.waiting.insert(k, (self.slots[head].next, tail));
                    self.queue.push_back(k);
                }
                if self.add_open(Some(k), item) {
                    continue 'pass;
                }
            }
            break;
        }
    }
}

/// Wraps a stream of items into a stream of batches, released when full, when the linger time
/// of the oldest item runs out, or when the input ends. An oversized item is handed back as an
/// `Err` as soon as it arrives (ahead of the open batch), and batching goes on.
///
/// ```
/// use futures_util::{stream, StreamExt};
/// use pushpull::batch::{batched, BatchConfig};
/// use std::time::Duration;
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let config = BatchConfig::new(2, 1024, Duration::from_secs(1)).unwrap();
/// let batches: Vec<_> = batched(stream::iter(["a", "b", "c"].map(String::from)), config)
///     .map(Result::unwrap)
///     .collect()
///     .await;
/// assert_eq!(batches, vec![vec!["a".to_string(), "b".into()], vec!["c".into()]]);
/// # });
/// ```
pub fn batched<S>(input: S, config: BatchConfig) -> Batched<S>
where
    S: Stream + Unpin,
    S::Item: ByteSize,
{
    Batched {
        input,
        batcher: Batcher::new(config),
        timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        armed: None,
        done: false,
    }
}

/// The stream returned by [`batched`].
pub struct Batched<S: Stream> {
    // Nothing here is structurally pinned: the input is `Unpin` and the timer is boxed.
    input: S,
    batcher: Batcher<S::Item>,
    timer: Pin<Box<Sleep>>,
    armed: Option<Instant>,
    done: bool,
}

impl<S: Stream + Unpin> Unpin for Batched<S> {}

impl<S> Stream for Batched<S>
where
    S: Stream + Unpin,
    S::Item: ByteSize,
{
    type Item = Result<Vec<S::Item>, Oversized<S::Item>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(batch) = this.batcher.ready() {
                return Poll::Ready(Some(Ok(batch)));
            }
            if this.done {
                return Poll::Ready(this.batcher.flush().map(Ok));
            }
            match this.input.poll_next_unpin(cx) {
                Poll::Ready(Some(item)) => {
                    if let Err(oversized) = this.batcher.push(item) {
                        return Poll::Ready(Some(Err(oversized)));
                    }
                }
                Poll::Ready(None) => this.done = true,
                Poll::Pending => {
                    let Some(deadline) = this.batcher.deadline() else {
                        return Poll::Pending;
                    };
                    if this.armed != Some(deadline) {
                        this.timer.as_mut().reset(deadline);
                        this.armed = Some(deadline);
                    }
                    return match this.timer.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(this.batcher.flush().map(Ok)),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;
    use tokio::sync::mpsc;
    use tokio_stream_shim::ReceiverStream;

    fn cfg(events: usize, bytes: usize, ms: u64) -> BatchConfig {
        BatchConfig::new(events, bytes, Duration::from_millis(ms)).unwrap()
    }

    #[test]
    fn seals_on_count_and_bytes() {
        let mut b = Batcher::new(cfg(3, 5, 0));
        for s in ["aa", "bb", "c", "dd"] {
            b.push(s.to_string()).unwrap();
        }
        // "aa"+"bb"+"c" = 5 bytes and 3 events: sealed by count; "dd" opens the next.
        assert_eq!(b.ready().unwrap(), ["aa", "bb", "c"]);
        b.push("eeee".to_string()).unwrap(); // 2 + 4 > 5: "dd" sealed by bytes
        assert_eq!(b.ready().unwrap(), ["dd"]);
        assert_eq!(b.ready(), None);
        assert_eq!(b.flush().unwrap(), ["eeee"]);
        assert!(b.is_empty());
        assert_eq!(b.flush(), None);
    }

    #[test]
    fn a_boundary_seals_the_open_batch_and_peek_sees_the_oldest_item() {
        let mut b = Batcher::new(cfg(10, 100, 0));
        assert_eq!(b.peek(), None);
        b.push("w1-a".to_string()).unwrap();
        b.seal();
        b.seal(); // nothing open: nothing more sealed
        b.push("w2-a".to_string()).unwrap();
        assert_eq!((b.ready_len(), b.peek().map(String::as_str)), (1, Some("w1-a")));
        assert_eq!(b.ready().unwrap(), ["w1-a"]);
        assert_eq!(b.peek().map(String::as_str), Some("w2-a"));
        assert_eq!(b.flush().unwrap(), ["w2-a"]);
    }

    #[test]
    fn exactly_at_the_byte_limit_is_allowed_and_oversized_is_refused() {
        let mut b = Batcher::new(cfg(10, 4, 0));
        b.push("ab".to_string()).unwrap();
        b.push("cd".to_string()).unwrap();
        assert_eq!(b.ready(), None, "4 bytes is within a 4-byte limit");
        let err = b.push("xxxxx".to_string()).unwrap_err();
        assert_eq!((err.item.as_str(), err.size, err.max_bytes), ("xxxxx", 5, 4));
        assert_eq!(b.flush().unwrap(), ["ab", "cd"]);
    }

    #[test]
    fn one_event_batches() {
        let mut b = Batcher::new(cfg(1, 100, 0));
        b.push("a".to_string()).unwrap();
        b.push("b".to_string()).unwrap();
        assert_eq!(b.ready().unwrap(), ["a"]);
        assert_eq!(b.ready().unwrap(), ["b"]);
        assert_eq!(b.deadline(), None);
    }

    #[test]
    fn key_ordered_batches_keep_every_keys_order_and_fill_up() {
        // Items are (key, sequence) strings of 1-9 bytes; checked over many random runs.
        for seed in 0..300u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let (events, bytes, keys, max_waiting) =
                (rng.usize(1..8), rng.usize(9..60), rng.u64(1..12), rng.usize(0..10));
            let mut b = KeyOrderedBatcher::new(cfg(events, bytes, 10), max_waiting);
            let mut out: Vec<Vec<String>> = Vec::new();
            let n = rng.usize(0..200);
            let mut pushed = Vec::new();
            for i in 0..n {
                let key = rng.u64(0..keys);
                let item = format!("{key}:{i}{}", "x".repeat(rng.usize(0..5)));
                pushed.push(item.clone());
                let k = if key == 0 { None } else { Some(key) }; // key 0 stands for "no key"
                b.push(k, item).unwrap();
                assert!(b.waiting_len() <= max_waiting, "seed {seed}: at most {max_waiting} held back");
                assert!(b.waiting_bytes <= bytes, "seed {seed}: at most a batch's bytes held back");
                while let Some(batch) = b.ready() {
                    out.push(batch);
                }
                match rng.usize(0..20) {
                    0 => {
                        while let Some(batch) = b.flush() {
                            out.push(batch);
                        }
                    }
                    1 => out.extend(b.flush()), // one batch, then more pushes
                    _ => {}
                }
            }
            while let Some(batch) = b.flush() {
                out.push(batch);
            }
            assert!(b.is_empty());
            let key_of = |s: &str| s.split(':').next().unwrap().to_owned();
            let seq_of = |s: &str| s.split(':').nth(1).unwrap().trim_end_matches('x').parse::<usize>().unwrap();
            for batch in &out {
                assert!(!batch.is_empty() && batch.len() <= events, "seed {seed}: {batch:?}");
                assert!(batch.iter().map(String::len).sum::<usize>() <= bytes, "seed {seed}");
                let mut keys: Vec<String> = batch.iter().map(|s| key_of(s)).filter(|k| k != "0").collect();
                let before = keys.len();
                keys.sort();
                keys.dedup();
                assert_eq!(keys.len(), before, "seed {seed}: a key twice in one batch: {batch:?}");
            }
            let flat: Vec<&String> = out.iter().flatten().collect();
            let mut all: Vec<&String> = flat.clone();
            all.sort();
            let mut expected: Vec<&String> = pushed.iter().collect();
            expected.sort();
            assert_eq!(all, expected, "seed {seed}: every item exactly once");
            let mut last: HashMap<String, usize> = HashMap::new();
            for item in flat {
                let k = key_of(item);
                if k == "0" {
                    continue;
                }
                let seq = seq_of(item);
                assert!(last.insert(k, seq).is_none_or(|prev| prev < seq), "seed {seed}: order of a key broken");
            }
        }
    }

    #[test]
    fn key_ordered_batches_fill_when_keys_repeat() {
        // 100 keys in random order, batches of 50: closing a batch at the first repeated key would
        // give batches of about 12 (the birthday bound); holding the repeat back fills them.
        let mut rng = fastrand::Rng::with_seed(7);
        let mut b = KeyOrderedBatcher::new(cfg(50, 100_000, 10), 500);
        for i in 0..1_000u64 {
            b.push(Some(rng.u64(0..100)), format!("{i}")).unwrap();
        }
        let mut sizes = Vec::new();
        while let Some(batch) = b.ready() {
            sizes.push(batch.len());
        }
        while let Some(batch) = b.flush() {
            sizes.push(batch.len());
        }
        assert_eq!(sizes.iter().sum::<usize>(), 1_000);
        assert!(sizes.iter().filter(|n| **n == 50).count() >= 15, "{sizes:?}");
        assert!(sizes.len() <= 25, "{sizes:?}");
    }

    #[test]
    fn zero_limits_are_refused() {
        assert_eq!(BatchConfig::new(0, 1, Duration::ZERO), Err(BatchConfigError::ZeroEvents));
        assert_eq!(BatchConfig::new(1, 0, Duration::ZERO), Err(BatchConfigError::ZeroBytes));
    }

    /// Consumes `out` in a task, recording when each batch came out.
    fn collect_timed(
        mut out: Batched<ReceiverStream<String>>,
    ) -> tokio::task::JoinHandle<Vec<(Duration, Vec<String>)>> {
        let start = Instant::now();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(batch) = out.next().await {
                seen.push((start.elapsed(), batch.unwrap()));
            }
            seen
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_batch_waits_exactly_its_linger_time() {
        let (tx, rx) = mpsc::channel::<String>(16);
        let consumer = collect_timed(batched(ReceiverStream(rx), cfg(10, 1000, 500)));
        tx.send("a".into()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        tx.send("b".into()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        tx.send("c".into()).await.unwrap();
        drop(tx);
        let seen = consumer.await.unwrap();
        let ms = |n| Duration::from_millis(n);
        // The deadline counts from the first item of a batch, not the last; the end of input
        // releases the open batch at once.
        assert_eq!(seen, vec![(ms(500), vec!["a".to_string(), "b".into()]), (ms(1200), vec!["c".into()])]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_does_not_wait() {
        let (tx, rx) = mpsc::channel::<String>(16);
        let mut out = batched(ReceiverStream(rx), cfg(2, 1000, 10_000));
        let start = Instant::now();
        tx.send("a".into()).await.unwrap();
        tx.send("b".into()).await.unwrap();
        assert_eq!(out.next().await.unwrap().unwrap(), ["a", "b"]);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn end_of_input_flushes_and_oversized_items_are_reported_in_place() {
        let input = stream::iter(["a", "toolong", "b"].map(String::from));
        let got: Vec<_> = batched(input, cfg(10, 3, 1000)).collect().await;
        assert!(matches!(&got[0], Err(Oversized { item, .. }) if item == "toolong"));
        assert_eq!(got[1].as_ref().unwrap(), &["a", "b"]);
        assert_eq!(got.len(), 2);
    }

    /// A minimal `Stream` over an mpsc receiver (tokio-stream is not worth a dependency here).
    mod tokio_stream_shim {
        use super::*;
        pub struct ReceiverStream<T>(pub mpsc::Receiver<T>);
        impl<T> Stream for ReceiverStream<T> {
            type Item = T;
            fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
                self.0.poll_recv(cx)
            }
        }
    }
}
