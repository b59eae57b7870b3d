//! The mapping's own position per shard: which records are done (processed, or handed to the
//! failure destination), checkpointed as "everything up to sequence number S", so that a killed
//! runner resumes after S and re-delivers at most what was in flight.
//!
//! With ParallelizationFactor > 1 batches of a shard finish out of order; the checkpoint only
//! moves over a prefix of records that are all done, so it is right for every factor.
use std::collections::BTreeMap;

use pushpull::checkpoint::{CheckpointError, Checkpoints};
use pushpull::store::{Etag, Store};
use serde::{Deserialize, Serialize};

/// What is stored per shard.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardCheckpoint {
    /// The shard.
    pub shard_id: String,
    /// Every record up to and including this sequence number is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// With no record done yet: the position as a time (unix seconds), so that a mapping that
    /// started at LATEST keeps its place across a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<f64>,
    /// The shard is closed and every record of it is done: its children may start.
    #[serde(default)]
    pub finished: bool,
    /// The open tumbling window and the state carried for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowCheckpoint>,
    /// The lease: the runner (`--worker-id`) reading the shard; none once released or finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Bumped by every write of the owner (its renewal, and every checkpoint): a lease whose
    /// counter has not moved for the failover time, as another runner sees it, may be taken.
    #[serde(default)]
    pub lease_counter: u64,
    /// The shard's parents (children start only once these are finished).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<String>,
}

/// A tumbling window in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowCheckpoint {
    /// Window start, unix seconds.
    pub start: i64,
    /// The state the last successful invocation returned.
    pub state: super::event::WindowState,
}

/// Tracks done records of one shard and writes its checkpoint when the done prefix grows.
#[derive(Debug)]
pub struct Progress {
    checkpoints: Checkpoints<Store>,
    key: String,
    version: Option<Etag>,
    saved: ShardCheckpoint,
    /// Records read and not yet below the checkpoint: index -> (sequence number, done).
    open: BTreeMap<u64, (String, bool)>,
    next_index: u64,
    /// The runner this progress writes as: every save renews its lease.
    worker: Option<String>,
    /// When the last save succeeded (monotonic ms), shared with the lanes: they check the lease's age
    /// before each invocation without taking the lock the reader holds while it reads a page.
    written_at: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Milliseconds on a monotonic clock (since the first call): a lease's age must not jump with
/// the wall clock.
/// On tokio's clock ([`super::clock`]), so that lease ages run under paused time in tests.
fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    super::clock::Instant::now().into_std().saturating_duration_since(start).as_millis() as u64
}

/// How long ago the save noted in `written_at` succeeded.
pub fn age(written_at: &std::sync::atomic::AtomicU64) -> std::time::Duration {
    std::time::Duration::from_millis(
        monotonic_ms().saturating_sub(written_at.load(std::sync::atomic::Ordering::Relaxed)),
    )
}

/// The checkpoint could not be written: someone else moved it (another runner), or the store failed.
pub type ProgressError = CheckpointError;

impl Progress {
    /// Loads the checkpoint of `shard_id` under `prefix` (creating nothing yet).
    pub async fn load(checkpoints: Checkpoints<Store>, prefix: &str, shard_id: &str) -> Result<Self, ProgressError> {
        let key = format!("{prefix}/{shard_id}.json");
        let (saved, version) = match checkpoints.load::<ShardCheckpoint>(&key).await? {
            Some((c, v)) => (c, Some(v)),
            None => (ShardCheckpoint { shard_id: shard_id.to_owned(), ..Default::default() }, None),
        };
        Ok(Progress {
            checkpoints,
            key,
            version,
            saved,
            open: BTreeMap::new(),
            next_index: 0,
            worker: None,
            written_at: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(monotonic_ms())),
        })
    }

    /// What is stored now.
    pub fn saved(&self) -> &ShardCheckpoint {
        &self.saved
    }

    /// Registers a record just read; returns its index.
    pub fn read(&mut self, sequence_number: &str) -> u64 {
        let i = self.next_index;
        self.next_index += 1;
        self.open.insert(i, (sequence_number.to_owned(), false));
        i
    }

    /// Marks records done. Returns whether the done prefix (the checkpoint) moved.
    pub fn done(&mut self, indices: impl IntoIterator<Item = u64>) -> bool {
        for i in indices {
            if let Some(e) = self.open.get_mut(&i) {
                e.1 = true;
            }
        }
        let mut moved = false;
        while let Some(entry) = self.open.first_entry() {
            if !entry.get().1 {
                break;
            }
            let (seq, _) = entry.remove();
            self.saved.after = Some(seq);
            self.saved.since = None;
            moved = true;
        }
        moved
    }

    /// Records read and not done.
    pub fn undone_len(&self) -> usize {
        self.open.values().filter(|(_, done)| !done).count()
    }

    /// Whether records are read and not done.
    pub fn busy(&self) -> bool {
        !self.open.is_empty()
    }

    /// Sets the window part of the checkpoint (written with the next [`Progress::save`]).
    pub fn set_window(&mut self, window: Option<WindowCheckpoint>) {
        self.saved.window = window;
    }

    /// Sets the time position (LATEST before any record).
    pub fn set_since(&mut self, since: f64) {
        self.saved.since = Some(since);
    }

    /// Marks the shard finished.
    pub fn finish(&mut self) {
        self.saved.finished = true;
        self.saved.window = None;
    }

    /// Takes the lease for `worker` (compare-and-swap on the version loaded): from here on every
    /// save writes as `worker` and renews the lease. A [`CheckpointError::Conflict`] means another
    /// runner wrote first, and the lease is not ours.
    pub async fn acquire(&mut self, worker: &str, parents: &[String]) -> Result<(), ProgressError> {
        self.worker = Some(worker.to_owned());
        self.saved.parents = parents.to_vec();
        self.save().await
    }

    /// Gives the lease up (after the last checkpoint): another runner may take it at once.
    pub async fn release(&mut self) -> Result<(), ProgressError> {
        self.worker = None;
        self.save().await
    }

    /// How long ago the last save (a lease renewal) succeeded.
    pub fn written_ago(&self) -> std::time::Duration {
        age(&self.written_at)
    }

    /// The time of the last successful save, shared (see [`age`]).
    pub fn written_at(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.written_at.clone()
    }

    /// Writes the checkpoint (compare-and-swap on the version read or last written); this renews
    /// the lease (owner and a bumped counter). A conflict means the lease was taken.
    pub async fn save(&mut self) -> Result<(), ProgressError> {
        self.saved.owner = if self.saved.finished { None } else { self.worker.clone() };
        self.saved.lease_counter += 1;
        let etag = match &self.version {
            Some(v) => self.checkpoints.replace(&self.key, &self.saved, v).await?,
            None => self.checkpoints.create(&self.key, &self.saved).await?,
        };
        self.version = Some(etag);
        self.written_at.store(monotonic_ms(), std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_checkpoint_moves_over_a_done_prefix_only_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cps = Checkpoints::new(Store::file(dir.path()));
        let mut p = Progress::load(cps.clone(), "esm/f/s", "shardId-0").await.unwrap();
        let idx: Vec<u64> = ["10", "20", "30", "40"].iter().map(|s| p.read(s)).collect();
        // Out of order (parallel batches): 20 and 40 finish first; nothing moves.
        assert!(!p.done([idx[1], idx[3]]));
        assert_eq!(p.saved().after, None);
        assert!(p.done([idx[0]]));
        assert_eq!(p.saved().after.as_deref(), Some("20"));
        p.save().await.unwrap();
        assert!(p.done([idx[2]]));
        assert_eq!(p.saved().after.as_deref(), Some("40"));
        assert!(!p.busy());
        // A second writer holding the old version loses.
        let mut other = Progress::load(cps.clone(), "esm/f/s", "shardId-0").await.unwrap();
        p.save().await.unwrap();
        let i = other.read("50");
        other.done([i]);
        assert!(matches!(other.save().await, Err(CheckpointError::Conflict { .. })));
        let again = Progress::load(cps, "esm/f/s", "shardId-0").await.unwrap();
        assert_eq!(again.saved().after.as_deref(), Some("40"));
    }
}
