//! The Kinesis mapping's supervisor: lists the stream's shards, takes and hands over shard leases
//! by the lease plan ([`crate::mapping::plan`]), starts a task per shard it holds ([`super::run`]),
//! starts children once their parents are finished, and stops (on request, or idle) by handing its
//! shards over.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::{Kinesis, ShardEnd};
use crate::mapping::clock::{Instant, now_unix};
use crate::mapping::lease::{self, Observed};
use crate::mapping::plan::{self, Holder};
use crate::mapping::progress::Progress;
use crate::mapping::stats::LeaseEvent;
use crate::mapping::{Ctx, MappingError, StartingPosition};

/// A shard as ListShards describes it.
struct ShardInfo {
    id: String,
    parents: Vec<String>,
    closed: bool,
}

async fn list_shards(client: &aws_sdk_kinesis::Client, stream: &str) -> Result<Vec<ShardInfo>, MappingError> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let req = client.list_shards();
        let req = match &token {
            Some(t) => req.next_token(t),
            None => req.stream_name(stream),
        };
        let page = req
            .send()
            .await
            .map_err(|e| MappingError::Kinesis(format!("ListShards {stream}: {}", pushpull::aws::describe(&e))))?;
        for s in page.shards() {
            out.push(ShardInfo {
                id: s.shard_id().to_owned(),
                parents: [s.parent_shard_id(), s.adjacent_parent_shard_id()]
                    .into_iter()
                    .flatten()
                    .map(str::to_owned)
                    .collect(),
                closed: s.sequence_number_range().and_then(|r| r.ending_sequence_number()).is_some(),
            });
        }
        token = page.next_token().map(str::to_owned);
        if token.is_none() {
            return Ok(out);
        }
    }
}

type Joined = (String, Result<ShardEnd, MappingError>);

/// What the supervisor keeps between cycles.
struct Supervisor {
    src: Arc<Kinesis>,
    stream: String,
    me: String,
    tasks: JoinSet<Joined>,
    /// Shards this runner reads, with the sender that asks each to hand over.
    running: HashMap<String, watch::Sender<bool>>,
    draining: HashSet<String>,
    finished: HashSet<String>,
    seen: Observed,
    first_listing: bool,
    shards: Vec<ShardInfo>,
    next_listing: Instant,
    next_cycle: Instant,
    evaluate: bool,
    /// Shards read to their end whose children do not run yet: not caught up meanwhile.
    awaiting: HashSet<String>,
    stopping: bool,
    stop_deadline: Option<Instant>,
    /// Shards held by a runner not yet seen renewing: not idle while they may come to us.
    uncertain: usize,
    /// Another runner will hand a shard over to us: not idle yet.
    expecting: bool,
    /// Runners seen dead: they leave the registry with the next heartbeat.
    gone: Vec<String>,
}

/// Runs the mapping on `src`'s stream until `stop` turns true (or it is idle, if so configured).
pub(crate) async fn supervise(src: &Arc<Kinesis>, stop: &mut watch::Receiver<bool>) -> Result<(), MappingError> {
    let ctx = &src.core;
    let stream = ctx.settings.stream_name().to_owned();
    if !ctx.settings.enabled {
        // AWS: a mapping created with `Enabled: false` is in state Disabled and polls nothing.
        info!(stream, "the mapping is disabled (Enabled: false): no shard is read");
        if ctx.options.stop_when_idle.is_none() {
            let _ = stop.wait_for(|stopped| *stopped).await;
        }
        return Ok(());
    }
    let origin = crate::mapping::identity::register(&src.checkpoints, &ctx.options.checkpoint_prefix, &ctx.settings)
        .await
        .map_err(|source| MappingError::Checkpoint { shard_id: "mapping.json".into(), source })?;
    info!(uuid = ctx.settings.uuid(), ?origin, "positions of this mapping");
    ctx.stats().origin = Some(origin);
    let now = Instant::now();
    let mut s = Supervisor {
        src: src.clone(),
        stream,
        me: ctx.options.worker_id.clone(),
        tasks: JoinSet::new(),
        running: HashMap::new(),
        draining: HashSet::new(),
        finished: HashSet::new(),
        seen: Observed::default(),
        first_listing: true,
        shards: Vec::new(),
        next_listing: now,
        next_cycle: now,
        evaluate: true,
        awaiting: HashSet::new(),
        stopping: false,
        stop_deadline: None,
        uncertain: 0,
        expecting: false,
        gone: Vec::new(),
    };
    let result = s.run(stop).await;
    s.tasks.abort_all();
    while s.tasks.join_next().await.is_some() {}
    if result.is_ok() && s.stopping {
        lease::leave(&src.checkpoints, &ctx.options.checkpoint_prefix, &s.me).await;
    }
    result
}

impl Supervisor {
    fn ctx(&self) -> &Ctx {
        &self.src.core
    }

    async fn run(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), MappingError> {
        let mut idle_stop = false;
        loop {
            if (*stop.borrow() || idle_stop) && !self.stopping {
                self.begin_stop().await;
            }
            if self.stopping && self.running.is_empty() {
                return Ok(());
            }
            if self.stopping && self.stop_deadline.is_some_and(|d| Instant::now() >= d) {
                self.abandon().await;
                return Ok(());
            }
            if !self.stopping && Instant::now() >= self.next_listing {
                self.shards = list_shards(&self.src.client, &self.stream).await?;
                self.next_listing = Instant::now() + self.ctx().options.list_shards_every;
                self.evaluate = true;
            }
            if !self.stopping && (self.evaluate || Instant::now() >= self.next_cycle) {
                self.cycle().await?;
            }
            let idle_check = self.ctx().options.stop_when_idle;
            let wake = if self.stopping {
                self.stop_deadline.unwrap_or(self.next_cycle)
            } else {
                self.next_listing.min(self.next_cycle)
            };
            tokio::select! {
                joined = self.tasks.join_next(), if !self.tasks.is_empty() => match joined {
                    Some(Ok(joined)) => self.joined(joined)?,
                    Some(Err(join)) => {
                        self.tasks.abort_all();
                        return Err(MappingError::Kinesis(format!("a shard task failed: {join}")));
                    }
                    None => {}
                },
                _ = tokio::time::sleep_until(wake) => {}
                _ = stop.changed(), if !self.stopping => {}
                _ = tokio::time::sleep(Duration::from_millis(100)), if idle_check.is_some() && !self.stopping => {
                    if let Some(idle) = idle_check && self.uncertain == 0 && !self.expecting && self.idle_for(idle) {
                        info!("every shard is caught up and idle; stopping");
                        idle_stop = true;
                    }
                }
            }
        }
    }

    /// Hands every shard over: in-flight batches finish, are checkpointed, and the leases are
    /// released for the other runners to take at once.
    async fn begin_stop(&mut self) {
        info!(shards = self.running.len(), "stopping: handing the shards over");
        self.stopping = true;
        self.stop_deadline = Some(Instant::now() + self.ctx().options.stop_grace);
        for (id, drain) in &self.running {
            let _ = drain.send(true);
            self.draining.insert(id.clone());
        }
        let ctx = &self.src.core;
        lease::heartbeat(&self.src.checkpoints, &ctx.options.checkpoint_prefix, &self.me, true, &[]).await;
    }

    /// In-flight batches that cannot finish within the grace period (a function that keeps
    /// failing, or gone) are stopped; their records stay after the checkpoint for the next owner.
    async fn abandon(&mut self) {
        let ctx = &self.src.core;
        warn!(shards = self.running.len(), grace = ?ctx.options.stop_grace, "batches still in flight after the grace period; stopping them");
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        for id in self.running.keys() {
            lease::release(&self.src.checkpoints, &ctx.options.checkpoint_prefix, id, &self.me).await;
        }
        self.running.clear();
    }

    /// One lease cycle: heartbeat, the live runners, the shards to take, one to hand over.
    async fn cycle(&mut self) -> Result<(), MappingError> {
        let src = self.src.clone();
        let ctx = &src.core;
        let (prefix, failover) = (&ctx.options.checkpoint_prefix, ctx.options.failover);
        self.evaluate = false;
        self.next_cycle = Instant::now() + failover / 3;
        let workers = lease::heartbeat(&src.checkpoints, prefix, &self.me, false, &self.gone).await;
        let live: Vec<String> = workers
            .iter()
            .filter(|(w, beat)| {
                **w == self.me || (!beat.stopping && self.seen.is_live(&format!("worker {w}"), beat.counter, failover))
            })
            .map(|(w, _)| w.clone())
            .collect();
        // Runners seen dead leave the registry with the next heartbeat (one that was only slow
        // writes itself back in).
        self.gone = workers.keys().filter(|w| !live.contains(w)).cloned().collect();
        let listed: HashSet<String> = self.shards.iter().map(|s| s.id.clone()).collect();
        let mut open = Vec::new();
        let mut loaded: HashMap<String, Progress> = HashMap::new();
        for s in &self.shards {
            if self.running.contains_key(&s.id) || self.finished.contains(&s.id) {
                continue;
            }
            // A parent still in the stream finishes before its children start.
            if s.parents.iter().any(|p| listed.contains(p) && !self.finished.contains(p)) {
                continue;
            }
            let progress = Progress::load(src.checkpoints.clone(), prefix, &s.id)
                .await
                .map_err(|source| MappingError::Checkpoint { shard_id: s.id.clone(), source })?;
            if progress.saved().finished {
                self.finished.insert(s.id.clone());
                self.evaluate = true;
                continue;
            }
            let key = format!("shard {}", s.id);
            let holder = match &progress.saved().owner {
                Some(owner)
                    if *owner != self.me && self.seen.is_live(&key, progress.saved().lease_counter, failover) =>
                {
                    Holder::Other { worker: owner.clone(), confirmed: self.seen.changed_since_first_seen(&key) }
                }
                _ => Holder::Free,
            };
            open.push((s.id.clone(), holder));
            loaded.insert(s.id.clone(), progress);
        }
        let held = self.running.len() - self.draining.len();
        let takes = plan::takes(live.len(), held, &open);
        self.uncertain = takes.uncertain;
        let mut taken = 0;
        for id in &takes.candidates {
            if taken == takes.want {
                break;
            }
            let (Some(progress), Some(info)) = (loaded.remove(id), self.shards.iter().position(|s| s.id == *id)) else {
                continue;
            };
            match self.take(info, progress, &listed).await? {
                Took::Reading | Took::Finished => taken += 1,
                Took::Lost => {}
            }
        }
        let mine: Vec<String> = self.running.keys().filter(|id| !self.draining.contains(*id)).cloned().collect();
        let others: Vec<String> = live.iter().filter(|w| **w != self.me).cloned().collect();
        // Short of its share (none free to take, or another runner took one first): nothing is
        // handed over while it waits for more.
        let short = takes.target.saturating_sub(held) > taken;
        let balance = plan::balance(&mine, !self.draining.is_empty(), short, &others, &takes);
        self.expecting = balance.expecting;
        if let Some(id) = balance.hand_over {
            info!(shard_id = %id, mine = mine.len(), target = takes.target, workers = live.len(), "rebalancing: handing a shard over");
            if let Some(d) = self.running.get(&id) {
                let _ = d.send(true);
            }
            self.draining.insert(id);
        }
        self.first_listing = false;
        // A shard read to its end counts as not caught up until its children run: the records
        // written after a split are in shards not read yet.
        let (shards, running, finished) = (&self.shards, &self.running, &self.finished);
        self.awaiting.retain(|id| {
            let waiting = shards
                .iter()
                .any(|c| c.parents.contains(id) && !running.contains_key(&c.id) && !finished.contains(&c.id));
            if !waiting && let Ok(mut c) = ctx.caught_up.lock() {
                c.remove(id);
            }
            waiting
        });
        Ok(())
    }

    /// Takes the lease of `self.shards[info]` and starts reading it.
    async fn take(
        &mut self,
        info: usize,
        mut progress: Progress,
        listed: &HashSet<String>,
    ) -> Result<Took, MappingError> {
        let src = self.src.clone();
        let ctx = &src.core;
        let s = &self.shards[info];
        let from = progress.saved().owner.clone().filter(|o| *o != self.me);
        match progress.acquire(&self.me, &s.parents).await {
            Ok(()) => {}
            Err(pushpull::checkpoint::CheckpointError::Conflict { .. }) => return Ok(Took::Lost), // another runner was first
            Err(source) => return Err(MappingError::Checkpoint { shard_id: s.id.clone(), source }),
        }
        {
            let mut st = ctx.stats();
            st.counts.leases_taken += 1;
            st.counts.lease_takeovers += u64::from(from.is_some());
            st.leases.push(LeaseEvent { shard_id: s.id.clone(), event: "taken", from: from.clone(), at: now_unix() });
        }
        info!(shard_id = %s.id, from = ?from, "lease taken");
        let Some(start) = self.start_position(info, listed, &mut progress).await? else {
            let id = self.shards[info].id.clone();
            self.finished.insert(id);
            self.evaluate = true;
            return Ok(Took::Finished);
        };
        let id = self.shards[info].id.clone();
        // Not caught up until its first read says so.
        if let Ok(mut c) = ctx.caught_up.lock() {
            c.insert(id.clone(), None);
        }
        ctx.stats().counts.shards_started += 1;
        let (drain_tx, drain_rx) = watch::channel(false);
        self.running.insert(id.clone(), drain_tx);
        let src2 = self.src.clone();
        self.tasks.spawn(async move {
            let r = super::run(src2, id.clone(), progress, start, drain_rx).await;
            (id, r)
        });
        Ok(Took::Reading)
    }

    /// A shard task ended.
    fn joined(&mut self, (id, end): Joined) -> Result<(), MappingError> {
        let ctx = &self.src.core;
        match end {
            Ok(ShardEnd::Finished) => {
                info!(shard_id = %id, "shard finished");
                self.running.remove(&id);
                self.draining.remove(&id);
                self.finished.insert(id.clone());
                self.awaiting.insert(id.clone());
                // List again now: its children (if it was split or merged) start at once.
                self.next_listing = Instant::now();
                let mut st = ctx.stats();
                st.counts.shards_finished += 1;
                st.leases.push(LeaseEvent { shard_id: id, event: "finished", from: None, at: now_unix() });
                self.evaluate = true;
            }
            end @ (Ok(ShardEnd::HandedOver) | Err(MappingError::LeaseLost { .. })) => {
                // No longer this runner's shard: released, or taken by another runner.
                self.running.remove(&id);
                self.draining.remove(&id);
                if let Ok(mut c) = ctx.caught_up.lock() {
                    c.remove(&id);
                }
                let mut st = ctx.stats();
                let event = if end.is_ok() {
                    st.counts.leases_released += 1;
                    "released"
                } else {
                    warn!(shard_id = %id, "lease lost to another runner: stopped reading the shard");
                    st.counts.leases_lost += 1;
                    "lost"
                };
                st.leases.push(LeaseEvent { shard_id: id, event, from: None, at: now_unix() });
            }
            Err(e) => {
                warn!(shard_id = %id, error = %e, "shard stopped");
                self.tasks.abort_all();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Where a shard whose lease was just taken starts: its checkpoint, or the starting position.
    /// `None`: with LATEST, a shard closed before the mapping started is finished at once (so that
    /// its children start at LATEST too, after a restart as well).
    async fn start_position(
        &self,
        info: usize,
        listed: &HashSet<String>,
        progress: &mut Progress,
    ) -> Result<Option<StartingPosition>, MappingError> {
        let ctx = self.ctx();
        let s = &self.shards[info];
        let saved = progress.saved();
        let unread = saved.after.is_none() && saved.since.is_none();
        Ok(Some(match ctx.settings.starting_position {
            StartingPosition::Latest if unread => {
                if self.first_listing && s.closed {
                    progress.finish();
                    progress.save().await.map_err(|source| MappingError::checkpoint(&s.id, source))?;
                    return Ok(None);
                }
                // A child of a shard this mapping read starts at its beginning.
                let mut read_parent = false;
                for p in s.parents.iter().filter(|p| listed.contains(*p)) {
                    let pp = Progress::load(self.src.checkpoints.clone(), &ctx.options.checkpoint_prefix, p)
                        .await
                        .map_err(|source| MappingError::Checkpoint { shard_id: p.clone(), source })?;
                    read_parent |= pp.saved().after.is_some() || pp.saved().since.is_some();
                }
                if read_parent { StartingPosition::TrimHorizon } else { StartingPosition::Latest }
            }
            p => p,
        }))
    }

    fn idle_for(&self, idle: Duration) -> bool {
        let ctx = self.ctx();
        if ctx.pending.load(Ordering::SeqCst) > 0 || ctx.open_windows.load(Ordering::SeqCst) > 0 {
            return false;
        }
        let caught_up = ctx
            .caught_up
            .lock()
            .map(|c| self.running.keys().all(|s| c.get(s).copied().flatten().is_some()))
            .unwrap_or(false);
        let quiet = ctx.last_activity.lock().map(|t| t.elapsed() >= idle).unwrap_or(false);
        caught_up && quiet
    }
}

/// What taking a lease came to.
enum Took {
    /// Taken; a task reads the shard.
    Reading,
    /// Taken, and the shard is finished at once (closed before a LATEST mapping started).
    Finished,
    /// Another runner was first.
    Lost,
}
