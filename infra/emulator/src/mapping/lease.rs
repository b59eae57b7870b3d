//! What several runners of one mapping know of each other: the runners' registry (one object,
//! `<prefix>/workers.json`, each runner's heartbeat counter, written by compare-and-swap) and each
//! lease's counter as this runner has watched it. As in the Kinesis Client Library, a lease or a
//! runner is presumed dead when its counter has not moved for the failover time *as the observer
//! saw it*, so no two clocks are ever compared.
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use pushpull::checkpoint::{CheckpointError, Checkpoints};
use pushpull::store::Store;
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::clock::Instant;
use super::progress::ShardCheckpoint;

/// A runner's entry in the registry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Beat {
    /// Bumped by every heartbeat.
    pub counter: u64,
    /// The runner is handing its shards over and leaving.
    #[serde(default)]
    pub stopping: bool,
}

/// Counters as this runner has seen them move, by key (`shard <id>` or `worker <id>`).
#[derive(Debug, Default)]
pub(crate) struct Observed {
    seen: HashMap<String, Seen>,
}

#[derive(Debug)]
struct Seen {
    counter: u64,
    at: Instant,
    changed: bool,
}

impl Observed {
    /// Notes `counter` for `key` and says whether its owner is alive: the counter moved within
    /// `failover` (a first sight counts as a move: the owner gets the whole failover time).
    pub fn is_live(&mut self, key: &str, counter: u64, failover: Duration) -> bool {
        self.is_live_at(key, counter, failover, Instant::now())
    }

    fn is_live_at(&mut self, key: &str, counter: u64, failover: Duration, now: Instant) -> bool {
        match self.seen.get_mut(key) {
            None => {
                self.seen.insert(key.to_owned(), Seen { counter, at: now, changed: false });
                true
            }
            Some(s) if s.counter != counter => {
                *s = Seen { counter, at: now, changed: true };
                true
            }
            Some(s) => now.duration_since(s.at) < failover,
        }
    }

    /// Whether `key`'s counter was seen to move (its owner is known to be alive, not merely given
    /// the benefit of the doubt).
    pub fn changed_since_first_seen(&self, key: &str) -> bool {
        self.seen.get(key).is_some_and(|s| s.changed)
    }
}

fn registry_key(prefix: &str) -> String {
    format!("{prefix}/workers.json")
}

/// Writes this runner's heartbeat into the registry, taking out the runners in `gone` (seen dead),
/// and returns every runner's entry. A store that fails is logged and the registry taken as this
/// runner alone (it then takes what is free, as a runner alone would).
pub(crate) async fn heartbeat(
    store: &Checkpoints<Store>,
    prefix: &str,
    me: &str,
    stopping: bool,
    gone: &[String],
) -> BTreeMap<String, Beat> {
    update(store, prefix, |workers| {
        workers.retain(|w, _| !gone.contains(w));
        let beat = workers.entry(me.to_owned()).or_default();
        beat.counter += 1;
        beat.stopping = stopping;
    })
    .await
    .unwrap_or_else(|e| {
        warn!(error = %e, "the runners' registry could not be written; acting alone this cycle");
        BTreeMap::from([(me.to_owned(), Beat { counter: 0, stopping })])
    })
}

/// Takes this runner out of the registry (it stopped and released its leases).
pub(crate) async fn leave(store: &Checkpoints<Store>, prefix: &str, me: &str) {
    if let Err(e) = update(store, prefix, |workers| {
        workers.remove(me);
    })
    .await
    {
        warn!(error = %e, "could not leave the runners' registry; the others will see this runner stop renewing");
    }
}

/// Releases `shard_id`'s lease if `me` still holds it (after its task was stopped in flight):
/// the checkpoint stays where the task left it.
pub(crate) async fn release(store: &Checkpoints<Store>, prefix: &str, shard_id: &str, me: &str) {
    let key = format!("{prefix}/{shard_id}.json");
    let result = async {
        let Some((mut saved, version)) = store.load::<ShardCheckpoint>(&key).await? else { return Ok(()) };
        if saved.owner.as_deref() != Some(me) {
            return Ok(());
        }
        saved.owner = None;
        saved.lease_counter += 1;
        store.replace(&key, &saved, &version).await.map(|_| ())
    }
    .await;
    if let Err(e) = result {
        warn!(shard_id, error = %e, "could not release the lease; another runner takes it after the failover time");
    }
}

async fn update(
    store: &Checkpoints<Store>,
    prefix: &str,
    change: impl Fn(&mut BTreeMap<String, Beat>),
) -> Result<BTreeMap<String, Beat>, CheckpointError> {
    let key = registry_key(prefix);
    let mut attempt = 0;
    loop {
        let loaded = store.load::<BTreeMap<String, Beat>>(&key).await?;
        let (mut workers, version) = match loaded {
            Some((w, v)) => (w, Some(v)),
            None => (BTreeMap::new(), None),
        };
        change(&mut workers);
        let written = match &version {
            Some(v) => store.replace(&key, &workers, v).await,
            None => store.create(&key, &workers).await,
        };
        match written {
            Ok(_) => return Ok(workers),
            Err(CheckpointError::Conflict { .. }) if attempt < 20 => {
                // Another runner's heartbeat came in between: read it and go again.
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(5 + fastrand::u64(..20))).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_that_stops_moving_for_the_failover_time_is_dead() {
        let mut o = Observed::default();
        let t0 = Instant::now();
        let f = Duration::from_secs(10);
        assert!(o.is_live_at("shard a", 5, f, t0), "a first sight gets the whole failover time");
        assert!(!o.changed_since_first_seen("shard a"));
        assert!(o.is_live_at("shard a", 5, f, t0 + Duration::from_secs(9)));
        assert!(!o.is_live_at("shard a", 5, f, t0 + Duration::from_secs(10)), "unchanged for 10 s");
        // It moves again: alive, and known to be.
        assert!(o.is_live_at("shard a", 6, f, t0 + Duration::from_secs(11)));
        assert!(o.changed_since_first_seen("shard a"));
        assert!(o.is_live_at("shard a", 6, f, t0 + Duration::from_secs(20)));
        assert!(!o.is_live_at("shard a", 6, f, t0 + Duration::from_secs(21)));
    }
}
