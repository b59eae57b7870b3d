//! The Kafka source: a member of the mapping's consumer group on the broker's own protocol.
//!
//! One consumer (librdkafka) joins the group (`ConsumerGroupId`, else the mapping's UUID) and
//! subscribes to the topic; the group's coordinator assigns it partitions, and each assigned
//! partition gets a task with one lane of the core ([`crate::mapping::lane`]): batching, invoke,
//! retries, bisection, record age, partial batch responses and the failure destination are the
//! core's, as for Kinesis. Order holds per partition (AWS, with-msk-configure.html: "Lambda reads
//! messages sequentially for each Kafka topic partition").
//!
//! - **Reading**: a thread of its own polls the consumer and hands each partition's records to its
//!   task; a partition whose task is still busy is paused at the broker (Kafka's `pause`) instead
//!   of blocking the poll, so that the group never sees this member stall.
//! - **Commits**: the offset after the done prefix of a partition, after each batch
//!   ([`partition`]), asynchronously; and synchronously when the partition is handed over.
//! - **Rebalances**: before a partition is revoked (another member joined, or this one leaves),
//!   its lane finishes the batch in flight and its offset is committed, so the next owner starts
//!   exactly after it: nothing is processed twice in a hand-over; a member killed with `kill -9`
//!   leaves its batch in flight uncommitted, and the next owner reads it again (at least once).
//! - **Starting position**: AWS (kafka-consumer-group-id.html): "if you specify a consumer group
//!   ID, and Kafka finds a valid existing consumer group with the same ID, Lambda ignores the
//!   StartingPosition ... Lambda begins processing records according to the committed offset of
//!   the consumer group." A partition without a committed offset starts at TRIM_HORIZON (earliest),
//!   LATEST, or AT_TIMESTAMP (the first offset at or after the time).
pub mod admin;
pub(crate) mod dead_letter;
pub(crate) mod partition;
pub(crate) mod record;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol};
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, Timestamp, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use self::partition::{Commit, KafkaPartition};
use self::record::{Envelope, KRec};
use super::clock::now_unix;
use super::lane::Lanes;
use super::settings::{KafkaSource, StartingPosition};
use super::{Ctx, MappingError};

/// Records read per partition before they are handed on, at most.
const HAND_ON: usize = 1000;

/// The group's view of this member, for the summary.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GroupView {
    /// The consumer group's id.
    pub group_id: String,
    /// The broker coordinating the group, as the consumer last saw it (`host:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    /// Every assignment and revocation this member saw, in order.
    pub rebalances: Vec<GroupEvent>,
    /// The group's generation at this member's latest assignment (the coordinator counts one up
    /// for each rebalance of the group, whoever caused it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i32>,
    /// This member's id in the group, as the coordinator gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_id: Option<String>,
    /// The group's members as the coordinator last described them (DescribeGroups, every few
    /// seconds): this one and any other runner or consumer in the group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<GroupMember>,
}

/// A member of the group, as the coordinator describes it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GroupMember {
    /// The member id.
    pub id: String,
    /// The client's `client.id`.
    pub client_id: String,
    /// The client's host, as the coordinator saw it.
    pub host: String,
}

/// Partitions assigned to this member, or revoked from it, by the group's coordinator.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GroupEvent {
    /// When, unix seconds.
    pub at: f64,
    /// `assigned`, `revoked`, or `coordinator` (a broker became the group's coordinator: its
    /// address is the event's `broker`).
    pub event: String,
    /// The coordinator, for a `coordinator` event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    /// The group's generation, for an `assigned` event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i32>,
    /// The partitions.
    pub partitions: Vec<i32>,
}

impl GroupView {
    /// Assignments received.
    pub fn assignments(&self) -> usize {
        self.rebalances.iter().filter(|e| e.event == "assigned").count()
    }

    /// The partitions of the latest assignment.
    pub fn last_assigned(&self) -> &[i32] {
        self.rebalances.iter().rev().find(|e| e.event == "assigned").map_or(&[], |e| &e.partitions)
    }

    fn note(&mut self, event: &str, mut partitions: Vec<i32>) {
        partitions.sort_unstable();
        self.rebalances.push(GroupEvent {
            at: now_unix(),
            event: event.to_owned(),
            partitions,
            broker: None,
            generation: None,
        });
    }
}

/// What the consumer's thread and the rebalance callbacks share.
struct Shared {
    ctx: Arc<Ctx>,
    runtime: tokio::runtime::Handle,
    envelope: Arc<Envelope>,
    topic: Arc<str>,
    starting_position: StartingPosition,
    tasks: Mutex<HashMap<i32, Task>>,
    /// Records read and not yet handed to their partition's task.
    waiting: Mutex<HashMap<i32, Vec<KRec>>>,
    consumer: OnceLock<Weak<BaseConsumer<Member>>>,
    view: Arc<Mutex<GroupView>>,
    /// The first error of a task or a callback: it ends the mapping.
    failed: Mutex<Option<MappingError>>,
    /// Partitions read to their end (and nothing read since): the caught-up checker asks the
    /// broker about them.
    at_end: Mutex<std::collections::HashSet<i32>>,
}

struct Task {
    tx: mpsc::Sender<Vec<KRec>>,
    /// Set when the partition is revoked: the reader stops handing records to the lane at once.
    revoke: watch::Sender<bool>,
    partition: Arc<KafkaPartition>,
    join: tokio::task::JoinHandle<Result<(), MappingError>>,
    paused: bool,
}

/// The consumer's context: the rebalance callbacks.
struct Member(Arc<Shared>);

impl ClientContext for Member {
    /// Statistics (every second): which broker coordinates the group, noted when it changes
    /// (librdkafka's logical `GroupCoordinator` broker names it once connected).
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(now) = statistics
            .brokers
            .values()
            .find(|b| b.name.starts_with("GroupCoordinator") && b.state == "UP" && !b.nodename.is_empty())
            .map(|b| b.nodename.clone())
        else {
            return;
        };
        let mut v = self.0.view();
        if v.coordinator.as_deref() != Some(now.as_str()) {
            info!(coordinator = %now, before = ?v.coordinator, "the group's coordinator");
            v.rebalances.push(GroupEvent {
                at: now_unix(),
                event: "coordinator".to_owned(),
                partitions: Vec::new(),
                broker: Some(now.clone()),
                generation: None,
            });
            v.coordinator = Some(now);
        }
    }

    /// librdkafka's own log lines (its errors and warnings; with `PUSHPULL_KAFKA_DEBUG`, its
    /// debug contexts) in this process's log, under the target `librdkafka`.
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, line: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => tracing::error!(target: "librdkafka", fac, "{line}"),
            L::Warning => warn!(target: "librdkafka", fac, "{line}"),
            L::Notice | L::Info => info!(target: "librdkafka", fac, "{line}"),
            L::Debug => tracing::debug!(target: "librdkafka", fac, "{line}"),
        }
    }
}

impl ConsumerContext for Member {
    /// rdkafka's own steps, with two of ours: AT_TIMESTAMP puts each new partition's starting
    /// offset in the assignment itself (a seek after it may come before the partition is ready),
    /// and an assigned partition is resumed (librdkafka keeps a pause made before it was revoked).
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if let StartingPosition::AtTimestamp(t) = self.0.starting_position {
                    self.0.start_at_time(consumer, tpl, t);
                }
                let assigned = if cooperative { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) };
                if let Err(e) = assigned {
                    self.0.fail(MappingError::Kafka(format!("assigning {:?}: {e}", tpl.to_topic_map())));
                }
                if let Err(e) = consumer.resume(tpl) {
                    warn!(error = %e, "resuming the assigned partitions failed");
                }
                self.post_rebalance(consumer, &Rebalance::Assign(tpl));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.pre_rebalance(consumer, &Rebalance::Revoke(tpl));
                let unassigned = if cooperative { consumer.incremental_unassign(tpl) } else { consumer.unassign() };
                if let Err(e) = unassigned {
                    warn!(error = %e, "unassigning failed");
                }
            }
            other => warn!(error = ?other, "rebalance failed"),
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let numbers: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            info!(partitions = ?numbers, lost = consumer.assignment_lost(), "partitions revoked: finishing what is in flight");
            self.0.release(consumer, &numbers);
            self.0.view().note("revoked", numbers);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let numbers: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                let membership = membership(consumer);
                info!(partitions = ?numbers, generation = ?membership.as_ref().map(|m| m.0), "partitions assigned");
                for n in &numbers {
                    self.0.take(*n);
                }
                self.0.ctx.touch();
                let mut view = self.0.view();
                view.note("assigned", numbers);
                if let Some((generation, member)) = membership {
                    if let Some(last) = view.rebalances.last_mut() {
                        last.generation = Some(generation);
                    }
                    view.generation = Some(generation);
                    view.member_id = Some(member);
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => warn!(error = %e, "rebalance failed"),
        }
    }

    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            // A commit refused (a rebalance under way): the next one, or the hand-over's, carries
            // the offset on.
            warn!(error = %e, offsets = ?offsets.to_topic_map(), "offset commit failed");
        }
    }
}

/// The consumer's generation and member id in its group, from librdkafka's group metadata (the
/// Rust binding does not expose them; the C functions are public API of librdkafka 2.x).
fn membership<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> Option<(i32, String)> {
    use rdkafka::bindings as rd;
    // SAFETY: the handle is the live consumer's own; `rd_kafka_consumer_group_metadata` returns a
    // copy owned by the caller (or null), read here and destroyed before returning; the member id
    // is a NUL-terminated string owned by that copy, copied out before it is destroyed.
    unsafe {
        let md = rd::rd_kafka_consumer_group_metadata(consumer.client().native_ptr());
        if md.is_null() {
            return None;
        }
        let generation = rd::rd_kafka_consumer_group_metadata_generation_id(md);
        let id = rd::rd_kafka_consumer_group_metadata_member_id(md);
        let member =
            if id.is_null() { String::new() } else { std::ffi::CStr::from_ptr(id).to_string_lossy().into_owned() };
        rd::rd_kafka_consumer_group_metadata_destroy(md);
        Some((generation, member))
    }
}

/// Commits through the consumer, asynchronously.
struct ConsumerCommit(Arc<Shared>);

impl Commit for ConsumerCommit {
    fn commit(&self, topic: &str, partition: i32, next: i64) -> Result<(), MappingError> {
        let Some(consumer) = self.0.consumer.get().and_then(Weak::upgrade) else { return Ok(()) };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(next))
            .map_err(|e| MappingError::Kafka(format!("commit {topic}-{partition}@{next}: {e}")))?;
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            warn!(partition = %format!("{topic}-{partition}"), next, error = %e, "offset commit failed");
        }
        Ok(())
    }
}

impl Shared {
    fn view(&self) -> std::sync::MutexGuard<'_, GroupView> {
        self.view.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn assigned(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self.tasks.lock().map(|t| t.keys().copied().collect()).unwrap_or_default();
        v.sort_unstable();
        v
    }

    fn fail(&self, e: MappingError) {
        if let Ok(mut f) = self.failed.lock()
            && f.is_none()
        {
            *f = Some(e);
        }
    }

    /// Starts reading partition `n`: its task, with one lane.
    fn take(self: &Arc<Self>, n: i32) {
        // An end reached before (under an earlier assignment) says nothing of this one: it starts
        // at the committed offset, maybe well before the end. Removed before the partition is
        // marked not caught up, so that a check under way cannot mark it caught up after.
        if let Ok(mut e) = self.at_end.lock() {
            e.remove(&n);
        }
        let committer: Arc<dyn Commit> = Arc::new(ConsumerCommit(self.clone()));
        let part = Arc::new(KafkaPartition::new(self.topic.clone(), n, self.envelope.clone(), committer));
        let (tx, mut rx) = mpsc::channel::<Vec<KRec>>(2);
        let (revoke, mut revoked) = watch::channel(false);
        let ctx = self.ctx.clone();
        let p = part.clone();
        let join = self.runtime.spawn(async move {
            let lanes = Lanes::new();
            let (senders, status, running) = lanes.spawn(&ctx, p.clone(), 1, None);
            let reader = {
                let (ctx, p) = (ctx.clone(), p.clone());
                async move {
                    loop {
                        let records = tokio::select! {
                            biased;
                            _ = revoked.changed() => break,
                            r = rx.recv() => match r {
                                Some(r) => r,
                                None => break,
                            },
                        };
                        let n = records.len() as i64;
                        p.in_lane.fetch_add(n, Ordering::SeqCst);
                        let go_on = super::intake::dispatch(&ctx, &*p, &senders, records).await;
                        p.in_channel.fetch_sub(n, Ordering::SeqCst);
                        if !go_on? {
                            break;
                        }
                    }
                    // Revoked: the lane finishes the invocation in flight, drops the rest (not
                    // committed: the next owner reads it) and ends; so does what is queued here.
                    status.send_modify(|s| {
                        s.handing_over = true;
                        s.revoked = true;
                    });
                    drop(senders);
                    rx.close();
                    while let Ok(left) = rx.try_recv() {
                        p.in_channel.fetch_sub(left.len() as i64, Ordering::SeqCst);
                    }
                    Ok::<(), MappingError>(())
                }
            };
            let r = running.drive(reader, Duration::from_secs(3600), || async { Ok(()) }).await;
            if r.is_err() {
                ctx.pending.fetch_sub(p.in_lane.swap(0, Ordering::SeqCst), Ordering::SeqCst);
                lanes.forget_windows(&ctx);
            }
            r.map(|_| ())
        });
        if let Ok(mut c) = self.ctx.caught_up.lock() {
            c.insert(part.id_owned(), None);
        }
        if let Ok(mut t) = self.tasks.lock() {
            t.insert(n, Task { tx, revoke, partition: part, join, paused: false });
        }
    }

    /// Hands partitions over: each lane finishes its batch in flight, then the offset after what
    /// is done is committed synchronously (the next owner starts there).
    fn release(&self, consumer: &BaseConsumer<Member>, numbers: &[i32]) {
        let mut leaving = Vec::new();
        for n in numbers {
            if let Ok(mut w) = self.waiting.lock() {
                w.remove(n); // read, never handed on, never committed: the next owner reads them
            }
            if let Some(task) = self.tasks.lock().ok().and_then(|mut t| t.remove(n)) {
                let _ = task.revoke.send(true); // the reader hands nothing more to the lane
                drop(task.tx);
                leaving.push((*n, task.partition, task.join));
            }
        }
        let grace = self.ctx.options.stop_grace;
        let mut tpl = TopicPartitionList::new();
        for (n, partition, mut join) in leaving {
            let joined = self.runtime.block_on(async { tokio::time::timeout(grace, &mut join).await });
            match joined {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => self.fail(e),
                Ok(Err(e)) => self.fail(MappingError::Lane { partition: partition.id_owned(), reason: e.to_string() }),
                Err(_) => {
                    // Stopped: its records are the next owner's, and leave this mapping's count.
                    join.abort();
                    let _ = self.runtime.block_on(join);
                    self.ctx.pending.fetch_sub(partition.in_lane.swap(0, Ordering::SeqCst), Ordering::SeqCst);
                    warn!(
                        partition = n,
                        ?grace,
                        "a batch still in flight after the grace period: stopped, left to the next owner"
                    );
                }
            }
            // No commit after the final one (a stopped lane's would race the next owner's).
            partition.released.store(true, Ordering::SeqCst);
            if let Some(next) = partition.offsets().committed() {
                let _ = tpl.add_partition_offset(&self.topic, n, Offset::Offset(next));
            }
            if let Ok(mut c) = self.ctx.caught_up.lock() {
                c.remove(&partition.id_owned());
            }
        }
        if tpl.count() > 0
            && let Err(e) = consumer.commit(&tpl, CommitMode::Sync)
        {
            warn!(offsets = ?tpl.to_topic_map(), error = %e, "final offset commit failed");
        }
    }

    /// AT_TIMESTAMP: partitions of `tpl` without a committed offset start at the first record at
    /// or after `t` (ListOffsets by time), or at the end if there is none.
    fn start_at_time(&self, consumer: &BaseConsumer<Member>, tpl: &mut TopicPartitionList, t: f64) {
        let committed = match consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(c) => c,
            Err(e) => return self.fail(MappingError::Kafka(format!("committed offsets of {}: {e}", self.topic))),
        };
        let mut by_time = TopicPartitionList::new();
        for e in committed.elements() {
            if !matches!(e.offset(), Offset::Offset(_)) {
                let _ = by_time.add_partition_offset(e.topic(), e.partition(), Offset::Offset((t * 1000.0) as i64));
            }
        }
        if by_time.count() == 0 {
            return;
        }
        match consumer.offsets_for_times(by_time, Duration::from_secs(10)) {
            Ok(found) => {
                for e in found.elements() {
                    let to = match e.offset() {
                        Offset::Offset(o) if o >= 0 => Offset::Offset(o),
                        _ => Offset::End,
                    };
                    let _ = tpl.set_partition_offset(e.topic(), e.partition(), to);
                }
            }
            Err(e) => self.fail(MappingError::Kafka(format!("offsets of {} at {t}: {e}", self.topic))),
        }
    }
}

impl KafkaPartition {
    fn id_owned(&self) -> String {
        use crate::mapping::source::Partition as _;
        self.id().to_owned()
    }
}

/// The consumer's configuration for `source` in group `group`.
fn config(servers: &str, group: &str, settings_start: StartingPosition, session: Duration) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", servers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        // The end of a partition is reported: how the mapping knows it is caught up.
        .set("enable.partition.eof", "true")
        .set(
            "auto.offset.reset",
            match settings_start {
                StartingPosition::TrimHorizon => "earliest",
                // AT_TIMESTAMP seeks once assigned; until then nothing is read from the start.
                StartingPosition::Latest | StartingPosition::AtTimestamp(_) => "latest",
            },
        )
        .set("session.timeout.ms", session.as_millis().to_string())
        .set("heartbeat.interval.ms", (session.as_millis() / 10).max(100).to_string())
        .set("client.id", "pushpull-local-esm")
        // Statistics once a second: the group's coordinator for the summary and the logs.
        .set("statistics.interval.ms", "1000");
    recovers_quickly(&mut c);
    c
}

/// A broker that dies is noticed within seconds, and the cluster found again through the
/// bootstrap servers: librdkafka forgets the bootstrap list once a broker has answered, and by
/// default goes back to it only after five minutes without a usable broker
/// (`metadata.recovery.rebootstrap.trigger.ms`, 300000). A broker whose node id is shared (nisshi
/// gives every broker id 111, each answering Metadata and FindCoordinator with itself) can only be
/// replaced that way. AWS's pollers are its own; these are this runner's.
pub(crate) fn recovers_quickly(c: &mut ClientConfig) {
    c.set("metadata.recovery.strategy", "rebootstrap")
        .set("metadata.recovery.rebootstrap.trigger.ms", "3000")
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "1000")
        .set("socket.connection.setup.timeout.ms", "2000")
        .set("topic.metadata.refresh.interval.ms", "2000");
    if let Ok(debug) = std::env::var("PUSHPULL_KAFKA_DEBUG") {
        // Debug lines come at librdkafka's level 7: let them through to the log handler.
        c.set("debug", debug).set_log_level(rdkafka::config::RDKafkaLogLevel::Debug);
    }
}

/// Runs the Kafka mapping on `source` until `stop` turns true (or it is idle, if so configured).
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    source: KafkaSource,
    mut stop: watch::Receiver<bool>,
) -> Result<(), MappingError> {
    let group = source.consumer_group_id.clone().unwrap_or_else(|| ctx.settings.uuid());
    let envelope = Arc::new(Envelope {
        event_source: if source.cluster_arn.is_some() { "aws:kafka" } else { "SelfManagedKafka" },
        event_source_arn: source.cluster_arn.clone(),
        bootstrap_servers: source.bootstrap_servers.join(","),
    });
    let view = Arc::new(Mutex::new(GroupView { group_id: group.clone(), ..Default::default() }));
    if let Ok(mut g) = ctx.group.lock() {
        *g = Some(view.clone());
    }
    let shared = Arc::new(Shared {
        ctx: ctx.clone(),
        runtime: tokio::runtime::Handle::current(),
        envelope,
        topic: Arc::from(source.topic.as_str()),
        starting_position: ctx.settings.starting_position,
        tasks: Mutex::new(HashMap::new()),
        waiting: Mutex::new(HashMap::new()),
        consumer: OnceLock::new(),
        view,
        failed: Mutex::new(None),
        at_end: Mutex::new(std::collections::HashSet::new()),
    });
    // The cluster must answer and hold the topic before the group is joined: a consumer would
    // otherwise wait in silence (librdkafka retries for ever). AWS shows such a mapping in a
    // PROBLEM state; a local runner stops and says why.
    // The servers dialled: the bootstrap servers, or the realism layer's proxy in front of them.
    let servers = ctx.options.kafka_via.clone().unwrap_or_else(|| source.bootstrap_servers.join(","));
    admin::partitions(&servers, &source.topic, METADATA_WITHIN).await?;
    let consumer: Arc<BaseConsumer<Member>> = Arc::new(
        config(&servers, &group, ctx.settings.starting_position, ctx.options.failover)
            .create_with_context(Member(shared.clone()))
            .map_err(|e| MappingError::Kafka(format!("consumer for {servers}: {e}")))?,
    );
    let _ = shared.consumer.set(Arc::downgrade(&consumer));
    consumer
        .subscribe(&[&source.topic])
        .map_err(|e| MappingError::Kafka(format!("subscribe to {}: {e}", source.topic)))?;
    info!(topic = %source.topic, group = %group, servers = %source.bootstrap_servers.join(","), "kafka mapping: joining the group");
    warn_on_demand_controls(&ctx.settings);
    let quit = Arc::new(AtomicBool::new(false));
    let poller = {
        let (shared, consumer, quit) = (shared.clone(), consumer.clone(), quit.clone());
        std::thread::Builder::new()
            .name("kafka-poll".into())
            .spawn(move || poll(&shared, &consumer, &quit))
            .map_err(|e| MappingError::Kafka(format!("the consumer's thread: {e}")))?
    };
    drop(consumer);
    let checker = {
        let (shared, quit, servers) = (shared.clone(), quit.clone(), servers.clone());
        std::thread::Builder::new()
            .name("kafka-caught-up".into())
            .spawn(move || check_caught_up(&shared, &servers, &quit))
            .map_err(|e| MappingError::Kafka(format!("the caught-up checker's thread: {e}")))?
    };
    let idle = ctx.options.stop_when_idle;
    loop {
        tokio::select! {
            _ = stop.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        if *stop.borrow() || poller.is_finished() {
            break;
        }
        if shared.failed.lock().map(|f| f.is_some()).unwrap_or(false) {
            break;
        }
        if let Some(idle) = idle
            && idle_for(&shared, idle)
        {
            info!("every partition is caught up and idle; stopping");
            break;
        }
    }
    quit.store(true, Ordering::SeqCst);
    let _ = tokio::task::spawn_blocking(move || checker.join()).await;
    let polled = tokio::task::spawn_blocking(move || poller.join())
        .await
        .map_err(|e| MappingError::Kafka(format!("the consumer's thread: {e}")))?;
    if let Ok(Err(e)) = polled {
        shared.fail(e);
    }
    match shared.failed.lock().ok().and_then(|mut f| f.take()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn idle_for(shared: &Shared, idle: Duration) -> bool {
    let ctx = &shared.ctx;
    if ctx.pending.load(Ordering::SeqCst) > 0 {
        return false;
    }
    let assigned = shared.assigned();
    if assigned.is_empty() || shared.waiting.lock().map(|w| w.values().any(|v| !v.is_empty())).unwrap_or(true) {
        return false;
    }
    let queued = shared
        .tasks
        .lock()
        .map(|t| t.values().any(|task| task.partition.in_channel.load(Ordering::SeqCst) > 0))
        .unwrap_or(true);
    if queued {
        return false;
    }
    let caught_up = ctx.caught_up.lock().map(|c| !c.is_empty() && c.values().all(Option::is_some)).unwrap_or(false);
    let quiet = ctx.last_activity.lock().map(|t| t.elapsed() >= idle).unwrap_or(false);
    caught_up && quiet
}

/// The consumer's thread: polls, hands records on, pauses busy partitions; on `quit` hands every
/// partition over and leaves the group.
fn poll(shared: &Arc<Shared>, consumer: &BaseConsumer<Member>, quit: &AtomicBool) -> Result<(), MappingError> {
    let mut read_since_hand_on = 0usize;
    while !quit.load(Ordering::SeqCst) && shared.failed.lock().map(|f| f.is_none()).unwrap_or(true) {
        // With records read and not handed on, only what librdkafka already holds is taken (no
        // wait): they go to their lanes as soon as the fetched ones are drained. A 50 ms wait here
        // added up to 50 ms to every record's delay (the bench's p50 was 35 ms beyond a raw
        // consumer's).
        let wait = if read_since_hand_on > 0 { Duration::ZERO } else { Duration::from_millis(50) };
        match consumer.poll(wait) {
            Some(Ok(m)) => {
                if let Ok(mut e) = shared.at_end.lock() {
                    e.remove(&m.partition());
                }
                if let Ok(mut c) = shared.ctx.caught_up.lock() {
                    c.insert(format!("{}-{}", shared.topic, m.partition()), None);
                }
                let rec = to_record(shared, &m);
                if let Some(rec) = rec
                    && let Ok(mut w) = shared.waiting.lock()
                {
                    w.entry(m.partition()).or_default().push(rec);
                    read_since_hand_on += 1;
                }
                if read_since_hand_on < HAND_ON {
                    continue;
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(n))) => {
                // Read to the end: caught up once what was read is handed on.
                if let Ok(mut e) = shared.at_end.lock() {
                    e.insert(n);
                }
            }
            Some(Err(e)) => {
                warn!(error = %e, "kafka consumer error");
                if matches!(
                    e.rdkafka_error_code(),
                    Some(
                        rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition
                            | rdkafka::types::RDKafkaErrorCode::UnknownTopic
                    )
                ) {
                    // The topic is gone: nothing more can be read (the summary says so).
                    shared.fail(MappingError::Kafka(format!("topic {}: {e}", shared.topic)));
                }
            }
            None => {}
        }
        read_since_hand_on = 0;
        hand_on(shared, consumer);
        check_tasks(shared);
    }
    // Leaving: every partition is handed over (its batch in flight finished and committed).
    let numbers = shared.assigned();
    shared.release(consumer, &numbers);
    consumer.unsubscribe();
    Ok(())
}

/// AWS offers a Kafka mapping its error-handling controls only in provisioned mode
/// (kafka-retry-configurations.html: "Under Event poller configuration, select provisioned mode to
/// configure error handling controls"; kafka-on-failure-destination.html: "A Kafka on-failure
/// destination is only available for event source mappings with provisioned mode enabled"). What
/// its API answers when they come without it is not documented: the local mapping applies them
/// and says, once, which ones AWS would not offer.
fn warn_on_demand_controls(s: &crate::mapping::MappingSettings) {
    if s.provisioned_pollers.is_some() {
        return;
    }
    let mut controls = Vec::new();
    if s.bisect_on_error {
        controls.push("BisectBatchOnFunctionError");
    }
    if s.maximum_retry_attempts >= 0 {
        controls.push("MaximumRetryAttempts");
    }
    if s.maximum_record_age.is_some() {
        controls.push("MaximumRecordAgeInSeconds");
    }
    if s.report_batch_item_failures {
        controls.push("ReportBatchItemFailures");
    }
    if s.on_failure.is_some() {
        controls.push("DestinationConfig.OnFailure");
    }
    if !controls.is_empty() {
        warn!(
            settings = %controls.join(", "),
            "kafka mapping in on-demand mode (no ProvisionedPollerConfig): AWS offers these only in provisioned mode; applied here"
        );
    }
}

/// How long the cluster has to answer the first metadata request of a mapping.
const METADATA_WITHIN: Duration = Duration::from_secs(15);

/// How often partitions read to their end are checked against the broker's high watermark.
const CAUGHT_UP_CHECK: Duration = Duration::from_millis(500);

/// Partitions read to their end are caught up as of now if the broker's high watermark, asked
/// now, is no further than the last record read (records written after the last fetch would be
/// past it), and nothing read waits to be handed to the lane. As an empty GetRecords says of a
/// shard at the time it was made.
fn renew_caught_up(shared: &Shared, checker: &BaseConsumer) {
    let at_end: Vec<i32> = shared.at_end.lock().map(|e| e.iter().copied().collect()).unwrap_or_default();
    for n in at_end {
        let asked_at = now_unix();
        let Ok((_, high)) = checker.fetch_watermarks(&shared.topic, n, Duration::from_secs(2)) else { continue };
        let Some((last_read, queued)) = shared.tasks.lock().ok().and_then(|t| {
            t.get(&n)
                .map(|task| (task.partition.offsets().last_read(), task.partition.in_channel.load(Ordering::SeqCst)))
        }) else {
            continue; // no longer ours
        };
        // Nothing read yet: the end of partition was reached where the consumer started.
        let read_to_high = last_read.is_none_or(|o| o + 1 >= high);
        let waiting = shared.waiting.lock().map(|w| w.get(&n).is_some_and(|v| !v.is_empty())).unwrap_or(true);
        if !(read_to_high && queued == 0 && !waiting) {
            continue;
        }
        // Under the lock the consumer's thread takes after it reads a record: a record read
        // meanwhile leaves the partition not caught up.
        if let Ok(mut c) = shared.ctx.caught_up.lock()
            && shared.at_end.lock().is_ok_and(|e| e.contains(&n))
        {
            c.insert(format!("{}-{n}", shared.topic), Some(asked_at));
        }
    }
}

/// The caught-up checks, on a thread and a connection of their own so that the broker round trips
/// never hold up the consumer's poll.
fn check_caught_up(shared: &Shared, servers: &str, quit: &AtomicBool) {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", servers);
    recovers_quickly(&mut config);
    let checker: BaseConsumer = match config.create() {
        Ok(c) => c,
        Err(e) => return shared.fail(MappingError::Kafka(format!("the caught-up checker for {servers}: {e}"))),
    };
    let group = shared.view().group_id.clone();
    let mut described = std::time::Instant::now();
    let mut lag_reported = std::time::Instant::now();
    while !quit.load(Ordering::SeqCst) {
        std::thread::sleep(CAUGHT_UP_CHECK);
        renew_caught_up(shared, &checker);
        if described.elapsed() >= DESCRIBE_GROUP_EVERY {
            described = std::time::Instant::now();
            describe_group(shared, &checker, &group);
        }
        if lag_reported.elapsed() >= OFFSET_LAG_EVERY {
            lag_reported = std::time::Instant::now();
            report_offset_lag(shared, &checker);
        }
    }
}

/// How often `OffsetLag` is reported. AWS: "Lambda sends metric data to CloudWatch in 1-minute
/// intervals"; local runs last seconds, so more often (the alarm takes the minute's Maximum).
const OFFSET_LAG_EVERY: Duration = Duration::from_secs(2);

/// Reports `OffsetLag` (AWS/Lambda, by FunctionName): AWS (monitoring-metrics-types): "the
/// difference in offset between the last record written to a topic and the last record that your
/// function's consumer group processed. Though a Kafka topic can have multiple partitions, this
/// metric measures the offset lag at the topic level." Here: the sum, over the partitions this
/// member holds, of the high watermark minus the next offset to process. A partition nothing was
/// read from yet counts from the group's committed offset (asked of the coordinator), or without
/// one from where the starting position puts it. With one runner, the topic's lag; with several,
/// each reports its own.
fn report_offset_lag(shared: &Shared, checker: &BaseConsumer) {
    let held: Vec<(i32, Option<i64>)> = shared
        .tasks
        .lock()
        .map(|t| t.iter().map(|(n, task)| (*n, task.partition.offsets().next_to_process())).collect())
        .unwrap_or_default();
    if held.is_empty() {
        return;
    }
    // The group's committed offsets of the partitions not read yet.
    let unread: Vec<i32> = held.iter().filter(|(_, next)| next.is_none()).map(|(n, _)| *n).collect();
    let mut committed = HashMap::new();
    if !unread.is_empty() {
        let Some(consumer) = shared.consumer.get().and_then(Weak::upgrade) else { return };
        let mut tpl = TopicPartitionList::new();
        for n in &unread {
            tpl.add_partition(&shared.topic, *n);
        }
        let Ok(found) = consumer.committed_offsets(tpl, Duration::from_secs(2)) else { return };
        for e in found.elements() {
            if let Offset::Offset(o) = e.offset() {
                committed.insert(e.partition(), o);
            }
        }
    }
    let mut lag = 0u64;
    for (n, next) in held {
        let Ok((low, high)) = checker.fetch_watermarks(&shared.topic, n, Duration::from_secs(2)) else { return };
        let next = match next.or_else(|| committed.get(&n).copied()) {
            Some(next) => next,
            None if shared.starting_position == StartingPosition::TrimHorizon => low,
            None => high,
        };
        lag += u64::try_from(high - next).unwrap_or(0);
    }
    crate::cloudwatch::put(
        crate::cloudwatch::LAMBDA,
        &[("FunctionName", &shared.ctx.settings.function_name)],
        &[("OffsetLag", "Count", lag as f64)],
    );
    let mut s = shared.ctx.stats();
    s.counts.offset_lag_max = s.counts.offset_lag_max.max(lag);
}

/// How often the group's members are asked of its coordinator, for the summary.
const DESCRIBE_GROUP_EVERY: Duration = Duration::from_secs(3);

/// The group's members, as its coordinator describes them (DescribeGroups), into the view.
fn describe_group(shared: &Shared, checker: &BaseConsumer, group: &str) {
    let Ok(list) = checker.fetch_group_list(Some(group), Duration::from_secs(2)) else { return };
    let Some(g) = list.groups().iter().find(|g| g.name() == group) else { return };
    let members: Vec<GroupMember> = g
        .members()
        .iter()
        .map(|m| GroupMember {
            id: m.id().to_owned(),
            client_id: m.client_id().to_owned(),
            host: m.client_host().to_owned(),
        })
        .collect();
    if !members.is_empty() {
        shared.view().members = members;
    }
}

/// A task that ended by itself failed: the mapping stops with its error.
fn check_tasks(shared: &Shared) {
    let finished: Vec<i32> = shared
        .tasks
        .lock()
        .map(|t| t.iter().filter(|(_, task)| task.join.is_finished()).map(|(n, _)| *n).collect())
        .unwrap_or_default();
    for n in finished {
        let Some(task) = shared.tasks.lock().ok().and_then(|mut t| t.remove(&n)) else { continue };
        match shared.runtime.block_on(task.join) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => shared.fail(e),
            Err(e) => shared.fail(MappingError::Lane { partition: task.partition.id_owned(), reason: e.to_string() }),
        }
    }
}

/// Hands waiting records to their partitions' tasks; a task still busy has its partition paused
/// at the broker until it catches up.
fn hand_on(shared: &Shared, consumer: &BaseConsumer<Member>) {
    let Ok(mut waiting) = shared.waiting.lock() else { return };
    let Ok(mut tasks) = shared.tasks.lock() else { return };
    for (n, task) in tasks.iter_mut() {
        let records = waiting.remove(n).unwrap_or_default();
        let mut pause = None;
        if !records.is_empty() {
            let count = records.len() as i64;
            task.partition.in_channel.fetch_add(count, Ordering::SeqCst);
            match task.tx.try_send(records) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(records)) => {
                    task.partition.in_channel.fetch_sub(count, Ordering::SeqCst);
                    waiting.insert(*n, records);
                    pause = Some(true);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    task.partition.in_channel.fetch_sub(count, Ordering::SeqCst);
                }
            }
        }
        if pause.is_none() && task.paused && task.tx.capacity() > 0 {
            pause = Some(false);
        }
        let Some(pause) = pause else { continue };
        if pause == task.paused {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&shared.topic, *n);
        let r = if pause { consumer.pause(&tpl) } else { consumer.resume(&tpl) };
        match r {
            Ok(()) => task.paused = pause,
            Err(e) => warn!(partition = n, pause, error = %e, "pause/resume failed"),
        }
    }
}

/// A message as the core's record, registered with its partition's offsets.
fn to_record(shared: &Shared, m: &rdkafka::message::BorrowedMessage<'_>) -> Option<KRec> {
    let tasks = shared.tasks.lock().ok()?;
    let task = tasks.get(&m.partition())?;
    let (timestamp, timestamp_type) = match m.timestamp() {
        Timestamp::CreateTime(t) => (Some(t), "CREATE_TIME"),
        Timestamp::LogAppendTime(t) => (Some(t), "LOG_APPEND_TIME"),
        Timestamp::NotAvailable => (None, "NO_TIMESTAMP_TYPE"),
    };
    let headers = m
        .headers()
        .map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.map(Bytes::copy_from_slice))).collect())
        .unwrap_or_default();
    let index = task.partition.offsets().read(m.offset());
    Some(KRec {
        topic: shared.topic.clone(),
        partition: m.partition(),
        offset: m.offset(),
        offset_text: m.offset().to_string(),
        timestamp,
        timestamp_type,
        key: m.key().map(Bytes::copy_from_slice),
        value: m.payload().map(Bytes::copy_from_slice),
        headers,
        arrival: timestamp.map_or_else(now_unix, |t| t as f64 / 1000.0),
        index,
    })
}
