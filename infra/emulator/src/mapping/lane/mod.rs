//! The core of every mapping: one lane of a partition. It batches the records the source hands
//! it (BatchSize, the batching window, the 6 MB payload, tumbling-window boundaries), invokes the
//! function, judges the answer by the partial batch response rule ([`super::outcome::judge`]), and
//! retries, bisects, ages out and finally hands records to the failure destination, as AWS's
//! stream mappings do. It knows no broker: what it needs of one is [`Partition`].
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use pushpull::batch::{BatchConfig, Batcher, ByteSize};
use tokio::sync::{mpsc, watch};

use super::clock::{Instant, now_unix};

mod deliver;
use super::event::{MAX_PAYLOAD, WindowState};
use super::progress::WindowCheckpoint;
use super::source::{Partition, Record};
use super::{Ctx, MappingError};

/// Room for the event's envelope (window fields, brackets) besides the records.
const ENVELOPE: usize = 4096;
/// AWS ends a window early when its state passes 1 MB.
const MAX_STATE: usize = 1024 * 1024;

/// What the partition's reader last saw, watched by its lanes.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ReaderStatus {
    /// The reader stopped to hand the partition over: lanes finish what they hold and end,
    /// without closing their tumbling window (its state is in the checkpoint for the next owner).
    pub handing_over: bool,
    /// The partition was taken away (a Kafka rebalance revoked it): lanes finish only the
    /// invocation in flight and drop what they hold, uncommitted, for the next owner to read.
    pub revoked: bool,
    /// The wall time (unix s) at which a read that found the partition caught up was made
    /// (`f64::INFINITY` once it is read to its end).
    pub caught_up_at: f64,
}

pub(crate) struct Window {
    start: i64,
    end: i64,
    state: WindowState,
    /// The state passed 1 MB: the next invocation is the window's final one.
    early: bool,
}

/// The lanes of one partition (ParallelizationFactor of them): started together, run beside the
/// partition's reader, and their open windows counted so that a task that dies can take them off
/// the mapping's count.
#[derive(Debug, Default)]
pub(crate) struct Lanes {
    windows: Arc<AtomicI64>,
}

/// Lanes running: see [`Running::drive`].
pub(crate) struct Running {
    set: tokio::task::JoinSet<Result<(), MappingError>>,
    partition: String,
}

impl Lanes {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Starts `factor` lanes of `partition`, each carrying `saved` (the window the checkpoint
    /// holds) on. Returns the senders the reader hands records to (one a lane; dropping them ends
    /// the lanes once they are done), the status the lanes watch, and the running lanes.
    #[allow(clippy::type_complexity)]
    pub(crate) fn spawn<P: Partition>(
        &self,
        ctx: &Arc<Ctx>,
        partition: Arc<P>,
        factor: usize,
        saved: Option<WindowCheckpoint>,
    ) -> (Vec<mpsc::Sender<Vec<P::Record>>>, watch::Sender<ReaderStatus>, Running) {
        let (status_tx, status_rx) = watch::channel(ReaderStatus::default());
        let mut senders = Vec::new();
        let mut set = tokio::task::JoinSet::new();
        for lane_no in 0..factor.max(1) {
            let (tx, rx) = mpsc::channel::<Vec<P::Record>>(8);
            senders.push(tx);
            let lane = Lane {
                ctx: ctx.clone(),
                partition: partition.clone(),
                rx,
                status: status_rx.clone(),
                window: None,
                lane_no,
                windows: self.windows.clone(),
            };
            set.spawn(lane.run(saved.clone()));
        }
        (senders, status_tx, Running { set, partition: partition.id().to_owned() })
    }

    /// The partition's task is gone with its lanes: their open windows leave the mapping's count.
    pub(crate) fn forget_windows(&self, ctx: &Ctx) {
        ctx.open_windows.fetch_sub(self.windows.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl Running {
    /// Runs `reader` beside the lanes until every lane has ended (the reader's end drops its
    /// senders), calling `renew` (the lease's heartbeat) every `every`. Returns how the reader
    /// ended; the first error of the reader, a lane or `renew` ends it all.
    pub(crate) async fn drive<E, Fut>(
        mut self,
        reader: impl Future<Output = Result<E, MappingError>>,
        every: Duration,
        renew: impl Fn() -> Fut,
    ) -> Result<Option<E>, MappingError>
    where
        Fut: Future<Output = Result<(), MappingError>>,
    {
        tokio::pin!(reader);
        let mut reader_end = None;
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = &mut reader, if reader_end.is_none() => reader_end = Some(r?),
                joined = self.set.join_next() => match joined {
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(e))) => return Err(e),
                    Some(Err(e)) => return Err(MappingError::Lane { partition: self.partition.clone(), reason: e.to_string() }),
                    None => return Ok(reader_end),
                },
                _ = ticks.tick() => renew().await?,
            }
        }
    }
}

/// A record with its size in the event and its tumbling window, for the batcher.
struct Sized<R> {
    rec: R,
    len: usize,
    window: Option<i64>,
}

impl<R> ByteSize for Sized<R> {
    fn byte_size(&self) -> usize {
        self.len
    }
}

pub(crate) struct Lane<P: Partition> {
    pub ctx: Arc<Ctx>,
    pub partition: Arc<P>,
    pub rx: mpsc::Receiver<Vec<P::Record>>,
    pub status: watch::Receiver<ReaderStatus>,
    pub window: Option<Window>,
    pub lane_no: usize,
    /// This partition's open windows (the mapping-wide count is corrected by them if its task
    /// dies).
    pub windows: Arc<AtomicI64>,
}

/// One attempt's worth of records, with what it has used.
struct Pending<R> {
    records: Vec<R>,
    retries: i64,
    invokes: u32,
    first: bool,
}

impl<P: Partition> Lane<P> {
    fn window_closed(&self) {
        self.ctx.open_windows.fetch_sub(1, Ordering::SeqCst);
        self.windows.fetch_sub(1, Ordering::SeqCst);
    }

    fn window_of(&self, r: &P::Record) -> Option<i64> {
        let t = self.ctx.settings.tumbling_window?.as_secs() as i64;
        Some((r.arrival().floor() as i64).div_euclid(t) * t)
    }

    pub(crate) async fn run(mut self, saved: Option<WindowCheckpoint>) -> Result<(), MappingError> {
        if let (Some(w), Some(t)) = (saved, self.ctx.settings.tumbling_window) {
            self.open_window(w.start, t.as_secs() as i64, w.state);
        }
        let settings = self.ctx.settings.clone();
        // Batches close at BatchSize, at the payload limit, and at a tumbling-window boundary. The
        // batching window is timed here, not by the batcher: for streams it starts when the
        // previous invocation ends, not when the first record arrives.
        let config = BatchConfig::new(settings.batch_size as usize, MAX_PAYLOAD - ENVELOPE, settings.batching_window)
            .map_err(|e| MappingError::Kinesis(format!("batch settings: {e}")))?;
        let mut buf: Batcher<Sized<P::Record>> = Batcher::new(config);
        let mut last_window = None;
        let mut ended = false;
        let mut opened = Instant::now();
        loop {
            if self.status.borrow().revoked {
                let mut dropped = 0;
                while let Some(batch) = buf.ready().or_else(|| buf.flush()) {
                    dropped += batch.len();
                }
                while let Ok(v) = self.rx.try_recv() {
                    dropped += v.len();
                }
                self.ctx.pending.fetch_sub(dropped as i64, Ordering::SeqCst);
                self.partition.dropped(dropped);
                if self.window.take().is_some() {
                    self.window_closed();
                }
                return Ok(());
            }
            if ended && buf.is_empty() && self.status.borrow().handing_over {
                // The next owner carries the window on from the checkpoint.
                if self.window.take().is_some() {
                    self.window_closed();
                }
                return Ok(());
            }
            if let Some(w) = &self.window {
                let later = buf.peek().is_some_and(|r| r.window != Some(w.start));
                let reader_past_end = self.status.borrow().caught_up_at >= w.end as f64;
                let over = buf.is_empty() && self.rx.is_empty() && reader_past_end;
                if later || over || w.early || (ended && buf.is_empty()) {
                    let early = w.early || (ended && buf.is_empty() && now_unix() < w.end as f64);
                    self.finalize_window(early).await?;
                    continue;
                }
            }
            if ended && buf.is_empty() {
                return Ok(());
            }
            let full = buf.ready_len() > 0;
            let due = !buf.is_empty() && (opened.elapsed() >= settings.batching_window || ended);
            if full || due {
                let batch = buf.ready().or_else(|| buf.flush()).unwrap_or_default();
                self.deliver(batch.into_iter().map(|s| s.rec).collect()).await?;
                opened = Instant::now();
                continue;
            }
            let batch_deadline = opened + settings.batching_window;
            let watching_window = self.window.is_some() && buf.is_empty();
            tokio::select! {
                msg = self.rx.recv(), if !ended => match msg {
                    Some(v) => self.buffer(&mut buf, &mut last_window, v).await?,
                    None => ended = true,
                },
                _ = tokio::time::sleep_until(batch_deadline), if !buf.is_empty() => {}
                changed = self.status.changed(), if watching_window => { if changed.is_err() { ended = true; } }
            }
            if settings.batching_window.is_zero() {
                // No window: take whatever is already waiting, without blocking.
                while let Ok(v) = self.rx.try_recv() {
                    self.buffer(&mut buf, &mut last_window, v).await?;
                }
            }
        }
    }

    /// Adds records to the batcher, closing the open batch where a tumbling window ends.
    async fn buffer(
        &mut self,
        buf: &mut Batcher<Sized<P::Record>>,
        last_window: &mut Option<i64>,
        records: Vec<P::Record>,
    ) -> Result<(), MappingError> {
        for rec in records {
            let window = self.window_of(&rec);
            if window != *last_window {
                buf.seal();
                *last_window = window;
            }
            let len = self.partition.encoded_len(&rec);
            if let Err(too_big) = buf.push(Sized { rec, len, window }) {
                // A record larger than the payload alone (Kafka's can be; Kinesis's 1 MiB cannot):
                // what comes before it is delivered, then it is given up without an invocation,
                // as AWS's Kafka mappings do ("MaximumPayloadSizeExceeded").
                buf.seal();
                while let Some(batch) = buf.ready() {
                    self.deliver(batch.into_iter().map(|s| s.rec).collect()).await?;
                }
                self.give_up(&[too_big.item.rec], super::outcome::Condition::MaximumPayloadSizeExceeded, None, 0)
                    .await?;
            }
        }
        Ok(())
    }

    fn open_window(&mut self, start: i64, len: i64, state: WindowState) {
        self.window = Some(Window { start, end: start + len, state, early: false });
        self.ctx.open_windows.fetch_add(1, Ordering::SeqCst);
        self.windows.fetch_add(1, Ordering::SeqCst);
    }
}
