//! Object leases and progress checkpoints: who owns an object version now, how far it got, and
//! whether an event is stale.
//!
//! Each object version has a checkpoint (`objects/<bucket>/<key>/<version or ETag>.json`)
//! written by compare-and-swap. The invocation that writes it owns the object until
//! `lease_until_ms`; another invocation meanwhile is told [`ClaimError::Busy`]. A lease not
//! renewed (the owner crashed or timed out) may be taken over, and the new owner resumes from
//! the checkpoint. `keys/<bucket>/<key>.json` keeps the newest S3 `sequencer` seen for a key, so
//! an older event for it is recognised as stale.
//!
//! ```
//! use std::time::Duration;
//! use pushpull::checkpoint::Checkpoints;
//! use pushpull::push::lease::{Claim, ClaimError, Leases};
//! use pushpull::s3_notification::S3Notification;
//! use pushpull::store::Store;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let dir = tempfile::tempdir().unwrap();
//! let leases = Leases::new(Checkpoints::new(Store::file(dir.path())), Duration::from_secs(60));
//! let event = r#"{"Records":[{"eventVersion":"2.1","eventSource":"aws:s3","eventName":"ObjectCreated:Put",
//!   "s3":{"bucket":{"name":"b"},"object":{"key":"k","eTag":"e1","sequencer":"01"}}}]}"#;
//! let S3Notification::Records(events) = S3Notification::from_slice(event.as_bytes()).unwrap() else { unreachable!() };
//! let Claim::Owned { .. } = leases.claim(&events[0], "invocation-1").await.unwrap() else { panic!() };
//! // A second invocation for the same object while the lease runs: busy.
//! assert!(matches!(leases.claim(&events[0], "invocation-2").await, Err(ClaimError::Busy { .. })));
//! # });
//! ```
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::checkpoint::{CheckpointError, CheckpointStore, Checkpoints};
use crate::quarantine::safe_path;
use crate::s3_notification::{ObjectEvent, Sequencer};
use crate::store::Etag;

/// The checkpoint of one object version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ObjectProgress {
    /// Bucket.
    pub bucket: String,
    /// Key.
    pub key: String,
    /// Version id, ETag, or `unversioned`.
    pub version: String,
    /// The event's sequencer.
    pub sequencer: Option<Sequencer>,
    /// Every line is written or quarantined.
    pub complete: bool,
    /// How it ended, when complete and not processed normally (`gone: ...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    /// The invocation that owns the object.
    pub owner: String,
    /// The owner's lease ends here (epoch ms); after it another invocation may take over.
    pub lease_until_ms: u64,
    /// When this checkpoint was written (epoch ms).
    pub checkpointed_at_ms: u64,
    /// Every line up to this one is written, quarantined, skipped or blank.
    pub lines_done: u64,
    /// Byte offset (in the decompressed input) just after `lines_done`.
    pub bytes_done: u64,
    /// Blank lines so far.
    pub blank_lines: u64,
    /// Records written so far.
    pub records_sent: u64,
    /// Lines quarantined so far.
    pub quarantined: u64,
    /// Lines the line handler skipped on purpose so far.
    #[serde(default)]
    pub skipped_lines: u64,
    /// PutRecords calls so far.
    pub put_calls: u64,
    /// Entries resent so far.
    pub resent: u64,
    /// Kinesis records written so far (fewer than `records_sent` with aggregation).
    #[serde(default)]
    pub put_records: u64,
    /// PUT payload units of the Kinesis records written so far.
    #[serde(default)]
    pub put_units: u64,
    /// Highest sequence number written to each shard so far.
    pub shard_positions: BTreeMap<String, String>,
}

/// What a claim found.
#[derive(Debug)]
#[non_exhaustive]
pub enum Claim {
    /// The object was already completely processed.
    Done(ObjectProgress),
    /// This invocation owns the object now.
    Owned {
        /// The progress to resume from (nothing done, for a new object).
        progress: ObjectProgress,
        /// The checkpoint's version, for the next compare-and-swap.
        version: Etag,
        /// The earlier owner's window, when this claim takes over from an interrupted one.
        interrupted: Option<Interrupted>,
    },
}

/// A claim that did not succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClaimError {
    /// Another invocation owns the object until its lease ends.
    #[error("being processed by invocation {owner} (lease until {lease_until_ms} ms); retry later")]
    Busy {
        /// The owner.
        owner: String,
        /// When its lease ends, epoch milliseconds.
        lease_until_ms: u64,
    },
    /// Other invocations kept winning the checkpoint (five compare-and-swap conflicts in a row).
    #[error("the checkpoint kept changing under five claims in a row (contention); retry later")]
    Contended,
    /// Reading or writing the checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// When an interrupted owner may have written records its checkpoint does not cover: from its
/// last checkpoint (less a margin for clock skew between this host and Kinesis's arrival stamps)
/// to the end of its lease (plus twice that margin). Taken from the earlier checkpoint before the
/// claim overwrites those fields with the new owner's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted {
    /// From here (epoch ms).
    pub since_ms: u64,
    /// To here (epoch ms).
    pub until_ms: u64,
}

impl Interrupted {
    const SKEW_MS: u64 = 5_000;

    fn of(p: &ObjectProgress) -> Self {
        Interrupted {
            since_ms: p.checkpointed_at_ms.saturating_sub(Self::SKEW_MS),
            until_ms: p.lease_until_ms.saturating_add(2 * Self::SKEW_MS),
        }
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Leases and checkpoints of objects, in a [`CheckpointStore`].
#[derive(Debug, Clone)]
pub struct Leases<S> {
    checkpoints: Checkpoints<S>,
    lease: Duration,
}

impl<S: CheckpointStore> Leases<S> {
    /// Leases of `lease` length after each checkpoint.
    pub fn new(checkpoints: Checkpoints<S>, lease: Duration) -> Self {
        Leases { checkpoints, lease }
    }

    /// The checkpoint id and version label of the object an event announces.
    pub fn object_id(ev: &ObjectEvent) -> (String, String) {
        let version = ev.version_id.clone().or_else(|| ev.etag.clone()).unwrap_or_else(|| "unversioned".into());
        (format!("objects/{}/{}/{}.json", ev.bucket, safe_path(&ev.key), safe_path(&version)), version)
    }

    /// Whether a newer event for the key was already seen (this one is then stale); records this
    /// one as the newest otherwise.
    pub async fn is_stale(&self, ev: &ObjectEvent, sequencer: &Sequencer) -> Result<bool, CheckpointError> {
        #[derive(Serialize, Deserialize)]
        struct Latest {
            sequencer: Sequencer,
        }
        let id = format!("keys/{}/{}.json", ev.bucket, safe_path(&ev.key));
        for _ in 0..5 {
            let current = self.checkpoints.load::<Latest>(&id).await?;
            let write = match &current {
                Some((latest, _)) if latest.sequencer > *sequencer => return Ok(true),
                Some((latest, _)) if latest.sequencer == *sequencer => return Ok(false),
                Some((_, etag)) => self.checkpoints.replace(&id, &Latest { sequencer: sequencer.clone() }, etag).await,
                None => self.checkpoints.create(&id, &Latest { sequencer: sequencer.clone() }).await,
            };
            match write {
                Ok(_) => return Ok(false),
                Err(CheckpointError::Conflict { .. }) => continue, // someone else moved it: look again
                Err(e) => return Err(e),
            }
        }
        // Five writers in a row moved the newest sequencer: not stale as far as we can tell. The
        // object lease still keeps two owners apart.
        warn!(bucket = %ev.bucket, key = %ev.key, sequencer = sequencer.as_str(), "sequencer record kept changing; treating the event as current");
        Ok(false)
    }

    /// Takes the object for `owner`, or says why not.
    pub async fn claim(&self, ev: &ObjectEvent, owner: &str) -> Result<Claim, ClaimError> {
        let (id, version) = Self::object_id(ev);
        let lease_ms = self.lease.as_millis() as u64;
        for _ in 0..5 {
            let now = now_ms();
            let (progress, etag, interrupted) = match self.checkpoints.load::<ObjectProgress>(&id).await? {
                Some((p, _)) if p.complete => return Ok(Claim::Done(p)),
                Some((p, _)) if p.owner != owner && p.lease_until_ms > now => {
                    return Err(ClaimError::Busy { owner: p.owner, lease_until_ms: p.lease_until_ms });
                }
                Some((p, etag)) => {
                    let interrupted = Interrupted::of(&p);
                    (p, Some(etag), Some(interrupted))
                }
                None => {
                    let p = ObjectProgress {
                        bucket: ev.bucket.clone(),
                        key: ev.key.clone(),
                        version: version.clone(),
                        sequencer: ev.sequencer.clone(),
                        ..ObjectProgress::default()
                    };
                    (p, None, None)
                }
            };
            let mut mine = progress;
            mine.owner = owner.to_owned();
            mine.lease_until_ms = now + lease_ms;
            // Taking over, the claim does not move `checkpointed_at_ms`: until this owner has
            // read back and checkpointed progress of its own, nothing after the last progress
            // checkpoint is verified, and a later take-over must read back from there (moving it
            // here lost what an owner wrote if the next one stalled before its first checkpoint).
            if etag.is_none() {
                mine.checkpointed_at_ms = now;
            }
            let written = match &etag {
                Some(etag) => self.checkpoints.replace(&id, &mine, etag).await,
                None => self.checkpoints.create(&id, &mine).await,
            };
            match written {
                Ok(version) => return Ok(Claim::Owned { progress: mine, version, interrupted }),
                Err(CheckpointError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ClaimError::Contended)
    }

    /// Writes `progress` over the checkpoint at `version`, renewing the lease; returns the new
    /// version.
    pub async fn save(
        &self,
        ev: &ObjectEvent,
        progress: &mut ObjectProgress,
        version: &Etag,
    ) -> Result<Etag, CheckpointError> {
        let now = now_ms();
        progress.checkpointed_at_ms = now;
        progress.lease_until_ms = now + self.lease.as_millis() as u64;
        self.checkpoints.replace(&Self::object_id(ev).0, progress, version).await
    }

    /// Extends the lease without moving the checkpoint: `checkpointed_at_ms` stays, so that the
    /// read-back window of an interrupted run still starts at its last checkpoint. A conflict
    /// means another invocation took the object over: the caller must stop sending at once.
    pub async fn renew(
        &self,
        ev: &ObjectEvent,
        progress: &mut ObjectProgress,
        version: &Etag,
    ) -> Result<Etag, CheckpointError> {
        progress.lease_until_ms = now_ms() + self.lease.as_millis() as u64;
        self.checkpoints.replace(&Self::object_id(ev).0, progress, version).await
    }

    /// Ends the lease now (after a failed invocation), so that a retry takes the object over at
    /// once instead of answering busy until the lease runs out. The progress stays.
    pub async fn release(
        &self,
        ev: &ObjectEvent,
        progress: &ObjectProgress,
        version: &Etag,
    ) -> Result<Etag, CheckpointError> {
        let mut released = progress.clone();
        released.lease_until_ms = now_ms();
        self.checkpoints.replace(&Self::object_id(ev).0, &released, version).await
    }

    /// Marks the object complete with how it ended.
    pub async fn finish(
        &self,
        ev: &ObjectEvent,
        progress: &mut ObjectProgress,
        version: &Etag,
        ended: Option<String>,
    ) -> Result<Etag, CheckpointError> {
        progress.complete = true;
        progress.ended = ended;
        progress.checkpointed_at_ms = now_ms();
        self.checkpoints.replace(&Self::object_id(ev).0, progress, version).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3_notification::S3Notification;
    use crate::store::Store;

    fn event(key: &str, sequencer: &str) -> ObjectEvent {
        let payload = format!(
            r#"{{"Records":[{{"eventVersion":"2.1","eventSource":"aws:s3","eventName":"ObjectCreated:Put","s3":{{"bucket":{{"name":"b"}},"object":{{"key":"{key}","eTag":"e","sequencer":"{sequencer}"}}}}}}]}}"#
        );
        match S3Notification::from_slice(payload.as_bytes()).unwrap() {
            S3Notification::Records(mut r) => r.remove(0),
            S3Notification::TestEvent { .. } => unreachable!(),
        }
    }

    fn leases(dir: &tempfile::TempDir, lease: Duration) -> Leases<Store> {
        Leases::new(Checkpoints::new(Store::file(dir.path())), lease)
    }

    /// Ends the lease in the stored checkpoint (the owner went silent and its lease ran out).
    async fn lapse(l: &Leases<Store>, ev: &ObjectEvent) {
        let id = Leases::<Store>::object_id(ev).0;
        let (mut p, etag) = l.checkpoints.load::<ObjectProgress>(&id).await.unwrap().unwrap();
        p.lease_until_ms = now_ms().saturating_sub(1);
        l.checkpoints.replace(&id, &p, &etag).await.unwrap();
    }

    /// A owns the object and sends lines, then dies without a checkpoint. B takes over (its
    /// read-back window starts at A's last checkpoint) but stalls before it checkpoints any
    /// progress; C takes over from B. C must still look back to A's last checkpoint: B verified
    /// nothing, so a window starting at B's claim would miss what A wrote, and C would send it
    /// again (the storm test once found 3,000 lines twice in the stream this way).
    #[tokio::test]
    async fn a_take_over_of_a_take_over_still_reads_back_from_the_last_progress() {
        let dir = tempfile::tempdir().unwrap();
        let l = leases(&dir, Duration::from_secs(60));
        let ev = event("k", "01");
        let Claim::Owned { .. } = l.claim(&ev, "A").await.unwrap() else { panic!("A owns it") };
        // A's last checkpoint was a minute ago (it went on sending after it), and its lease ran out.
        let id = Leases::<Store>::object_id(&ev).0;
        let (mut a, etag) = l.checkpoints.load::<ObjectProgress>(&id).await.unwrap().unwrap();
        a.checkpointed_at_ms = now_ms() - 60_000;
        l.checkpoints.replace(&id, &a, &etag).await.unwrap();
        lapse(&l, &ev).await;
        let Claim::Owned { interrupted: Some(b_window), .. } = l.claim(&ev, "B").await.unwrap() else {
            panic!("B takes over an interrupted object")
        };
        assert!(b_window.since_ms <= a.checkpointed_at_ms);
        lapse(&l, &ev).await;
        let Claim::Owned { interrupted: Some(c_window), .. } = l.claim(&ev, "C").await.unwrap() else {
            panic!("C takes over")
        };
        assert!(
            c_window.since_ms <= a.checkpointed_at_ms,
            "C's read-back starts at {} but A may have written from {}",
            c_window.since_ms,
            a.checkpointed_at_ms
        );
        assert!(c_window.until_ms >= b_window.until_ms, "and reaches to the end of B's lease");
    }

    #[tokio::test]
    async fn a_lapsed_lease_is_taken_over_with_the_earlier_owners_window() {
        let dir = tempfile::tempdir().unwrap();
        // A zero-length lease has lapsed as soon as it is written.
        let l = leases(&dir, Duration::ZERO);
        let ev = event("k", "01");
        let Claim::Owned { mut progress, version, interrupted: None } = l.claim(&ev, "a").await.unwrap() else {
            panic!()
        };
        progress.lines_done = 40;
        l.save(&ev, &mut progress, &version).await.unwrap();
        let Claim::Owned { progress, interrupted: Some(window), .. } = l.claim(&ev, "b").await.unwrap() else {
            panic!()
        };
        assert_eq!((progress.lines_done, progress.owner.as_str()), (40, "b"));
        assert!(window.since_ms < window.until_ms);
    }

    #[tokio::test]
    async fn a_released_lease_is_taken_at_once_and_a_finished_object_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let l = leases(&dir, Duration::from_secs(600));
        let ev = event("k", "01");
        let Claim::Owned { mut progress, version, .. } = l.claim(&ev, "a").await.unwrap() else { panic!() };
        let version = l.release(&ev, &progress, &version).await.unwrap();
        let Claim::Owned { .. } = l.claim(&ev, "b").await.unwrap() else { panic!("not released") };
        assert!(
            matches!(l.finish(&ev, &mut progress, &version, None).await, Err(CheckpointError::Conflict { .. })),
            "b owns it now"
        );
    }

    #[tokio::test]
    async fn older_sequencers_are_stale() {
        let dir = tempfile::tempdir().unwrap();
        let l = leases(&dir, Duration::from_secs(60));
        assert!(!l.is_stale(&event("k", "0B"), &Sequencer::new("0B")).await.unwrap());
        assert!(l.is_stale(&event("k", "0A"), &Sequencer::new("0A")).await.unwrap());
        assert!(!l.is_stale(&event("k", "0B"), &Sequencer::new("0B")).await.unwrap(), "the same event again");
        assert!(!l.is_stale(&event("other", "01"), &Sequencer::new("01")).await.unwrap(), "per key");
    }
}
