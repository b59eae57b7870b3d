//! The rollup on Amazon MQ for RabbitMQ events (`aws:rmq`): every message counted exactly once,
//! though RabbitMQ keeps no offsets and delivers a message again after any failure.
//!
//! A queue has no positions to checkpoint: a requeued message comes back after later ones, a
//! broker restart requeues what was unacknowledged, and the push function's retry publishes the
//! lines after its last checkpoint again. What identifies a message is its `message-id`, which
//! the push function sets to its object and line (`<bucket>/<key>@<version>#<line>`,
//! `pushpull::pull::rabbitmq::message_id`). So the checkpoint (`pull/rabbitmq/<vhost>/<queue>.json`
//! in `CHECKPOINT_URI`) holds, per object, the set of lines counted, as ranges (an object's lines
//! arrive mostly in order, so an object costs a few numbers), and a message already in it is
//! skipped, whatever order or how often it comes.
//!
//! Per invocation, for each queue of the event:
//! 1. Load the checkpoint, and finish any write-ahead note left in it (its writer died, or is
//!    slow): the note holds its output's whole body, so whoever finds it writes the output (if it
//!    is not there: a conditional create, so two writers of the same note write it once), moves
//!    its lines into the sets and drops it (compare-and-swap). Nothing ever waits for a writer
//!    that may be gone (a queue blocked until a dead writer's deadline would bring its messages
//!    back until the queue's delivery limit dead-lettered them).
//! 2. Skip the messages already counted (and a second copy within the batch).
//! 3. Roll the rest up; a message that cannot be (not base64, not a JSON object, a sum that is
//!    not a number) is **set aside**, not failed: Amazon MQ has no partial batch response, and
//!    failing the invocation would bring the whole batch back until the queue's delivery limit
//!    dead-letters the good messages with the bad. It goes to `rejected/<queue>/<note>.ndjson` in
//!    `OUTPUT_URI` (written with the note's output, by whoever finishes the note: once) with its
//!    message id, its reason and its data, and counts as done.
//! 4. Note the output (its name, body and lines, and the set-aside messages) in the checkpoint
//!    (compare-and-swap); write the set-aside messages and the output `<queue>/<note>.ndjson` (each
//!    row names the note as `writer`); move the lines into the checkpoint's sets and drop the note
//!    (compare-and-swap). A
//!    crash before the note leaves nothing counted (the messages come back); after it, the note
//!    is finished by whoever reads the checkpoint next: never both, never neither.
//!
//! A message without a `message-id` cannot be recognised again: it is counted each time it is
//! delivered (at least once), with a warning. One whose id is not of the push function's form is
//! remembered by its whole id.
use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use pushpull::pull::rabbitmq::{PARTITION_KEY_HEADER, parse_message_id};
use pushpull::pull::rabbitmq::{RabbitMqEvent, queue_and_vhost};
use pushpull::store::{Precondition, StoreError};

use super::{BatchResponse, Response, RollupError, RollupHandler, intent_id};
use pushpull::kinesis_event::{KinesisData, KinesisEventRecord};

/// Times an invocation starts again after another changed the queue's checkpoint first.
const MAX_CHECKPOINT_RACES: u32 = 50;

/// Sorted, disjoint, non-adjacent inclusive ranges of line numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Lines(Vec<[u64; 2]>);

impl Lines {
    /// Whether `line` is in the set.
    pub fn contains(&self, line: u64) -> bool {
        let i = self.0.partition_point(|r| r[1] < line);
        self.0.get(i).is_some_and(|r| r[0] <= line)
    }

    /// Adds `line`.
    pub fn insert(&mut self, line: u64) {
        self.insert_range([line, line]);
    }

    /// Adds every line of `range` (inclusive), merging what touches it.
    pub fn insert_range(&mut self, [lo, hi]: [u64; 2]) {
        // The first range that ends at or after lo - 1 (touching counts).
        let start = self.0.partition_point(|r| r[1].saturating_add(1) < lo);
        let mut end = start;
        let (mut lo, mut hi) = (lo, hi);
        while end < self.0.len() && self.0[end][0] <= hi.saturating_add(1) {
            lo = lo.min(self.0[end][0]);
            hi = hi.max(self.0[end][1]);
            end += 1;
        }
        self.0.splice(start..end, [[lo, hi]]);
    }

    /// Adds every line of `other`.
    pub fn extend(&mut self, other: &Lines) {
        for r in &other.0 {
            self.insert_range(*r);
        }
    }

    /// How many lines.
    #[cfg(test)]
    fn len(&self) -> u64 {
        self.0.iter().map(|r| r[1] - r[0] + 1).sum()
    }
}

/// What a queue's output holds: the lines counted per object, and other message ids counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Counted {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    lines: BTreeMap<String, Lines>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    ids: BTreeSet<String>,
}

impl Counted {
    fn contains(&self, id: &MessageKey<'_>) -> bool {
        match id {
            MessageKey::Line(origin, line) => self.lines.get(*origin).is_some_and(|l| l.contains(*line)),
            MessageKey::Other(id) => self.ids.contains(*id),
            MessageKey::None => false,
        }
    }

    fn insert(&mut self, id: &MessageKey<'_>) {
        match id {
            MessageKey::Line(origin, line) => self.lines.entry((*origin).to_owned()).or_default().insert(*line),
            MessageKey::Other(id) => {
                self.ids.insert((*id).to_owned());
            }
            MessageKey::None => {}
        }
    }

    fn extend(&mut self, other: &Counted) {
        for (origin, lines) in &other.lines {
            self.lines.entry(origin.clone()).or_default().extend(lines);
        }
        self.ids.extend(other.ids.iter().cloned());
    }
}

/// The queue's checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct QueueCheckpoint {
    #[serde(flatten)]
    counted: Counted,
    /// Outputs about to be written, by output name: what each counts once it exists.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pending: BTreeMap<String, Note>,
}

/// A write-ahead note: an output about to be written, whole, so that anyone can finish it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Note {
    /// What the output counts.
    counts: Counted,
    /// The output's body (a few rows: one per group of the batch).
    body: String,
    /// The messages set aside with it (`rejected/<queue>/<note>.ndjson`), if any: written with
    /// the output, by whoever finishes the note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rejected: Option<String>,
}

/// How a message is recognised when it comes again.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum MessageKey<'a> {
    /// The push function's id: object and line.
    Line(&'a str, u64),
    /// An id of another form.
    Other(&'a str),
    /// No id: not recognisable.
    None,
}

fn key_of<'a>(name: Option<&'a str>) -> MessageKey<'a> {
    match name {
        None | Some("") => MessageKey::None,
        Some(id) => match parse_message_id(id) {
            Some((origin, line)) => MessageKey::Line(origin, line),
            None => MessageKey::Other(id),
        },
    }
}

/// A queue's message as the rollup reads it, whatever the broker.
pub(crate) struct QueueMessage<'a> {
    /// Its name: RabbitMQ's `message-id`, the SQS sink's `pushpull-origin` attribute.
    pub name: Option<&'a str>,
    /// The partition key the push function gave it.
    pub partition_key: String,
    /// The body, base64.
    pub data: std::borrow::Cow<'a, str>,
    /// What a set-aside record says of it besides its name, reason and data (RabbitMQ: its
    /// virtual host and whether it was redelivered; SQS: its receive count).
    pub about: serde_json::Map<String, serde_json::Value>,
}

/// Where a queue's counts live and how its records name it.
pub(crate) struct QueueId<'a> {
    /// The checkpoint's id in `CHECKPOINT_URI`.
    pub checkpoint: String,
    /// The queue as logs and errors name it (`queue::vhost`, a queue's name).
    pub label: String,
    /// The queue's name: the outputs' and set-aside records' directory.
    pub queue: &'a str,
}

impl RollupHandler {
    /// An Amazon MQ for RabbitMQ event: each queue's messages rolled up exactly once (see the
    /// module's documentation). Amazon MQ has no partial batch response: the answer is empty.
    pub(crate) async fn handle_mq(&self, event: &RabbitMqEvent<'_>) -> Result<Response, RollupError> {
        let mut metrics = pushpull::pull::rabbitmq::batch_metrics(event);
        for (name, messages) in &event.rmq_messages_by_queue {
            let (queue, vhost) = queue_and_vhost(name);
            let span = tracing::info_span!("batch", queue = %queue, vhost = %vhost, messages = messages.len());
            let _enter = span.enter();
            let id = QueueId {
                checkpoint: format!("pull/rabbitmq/{}/{}.json", path_segment(vhost), path_segment(queue)),
                label: format!("{queue}::{vhost}"),
                queue,
            };
            let messages: Vec<QueueMessage<'_>> = messages
                .iter()
                .map(|m| {
                    let mut about = serde_json::Map::new();
                    about.insert("vhost".into(), vhost.into());
                    about.insert("redelivered".into(), m.redelivered.into());
                    QueueMessage {
                        name: m.basic_properties.message_id.as_deref(),
                        partition_key: m.header_text(PARTITION_KEY_HEADER).unwrap_or_default(),
                        data: std::borrow::Cow::Borrowed(m.data.as_ref()),
                        about,
                    }
                })
                .collect();
            let (counted, failed) = self.handle_queue(&id, &messages).await?;
            metrics.processed += counted;
            metrics.failed += failed;
        }
        metrics.record();
        Ok(Response::Batch(BatchResponse::default()))
    }

    /// Rolls up one queue's `messages` exactly once; returns the messages counted and those set
    /// aside. Invocations of one queue may run at once (an SQS mapping's do; Amazon MQ's run one
    /// at a time): one that finds the checkpoint changed under it before its note is written has
    /// written nothing that counts, and starts again from the checkpoint as it now is.
    pub(crate) async fn handle_queue(
        &self,
        id: &QueueId<'_>,
        messages: &[QueueMessage<'_>],
    ) -> Result<(usize, usize), RollupError> {
        let mut attempt = 0u32;
        loop {
            match self.handle_queue_once(id, messages).await {
                Err(RollupError::Checkpoint {
                    source: pushpull::checkpoint::CheckpointError::Conflict { .. }, ..
                }) if attempt < MAX_CHECKPOINT_RACES => {
                    attempt += 1;
                    // Jittered, growing: concurrent invocations spread out.
                    let ms = fastrand::u64(5..=20) * u64::from(attempt.min(10));
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                }
                other => return other,
            }
        }
    }

    async fn handle_queue_once(
        &self,
        id: &QueueId<'_>,
        messages: &[QueueMessage<'_>],
    ) -> Result<(usize, usize), RollupError> {
        let (cp_id, queue) = (&id.checkpoint, id.queue);
        let cp_err = |source| RollupError::Checkpoint { shard_id: id.label.clone(), source };
        let (loaded, version) = match self.checkpoints.load::<QueueCheckpoint>(cp_id).await.map_err(cp_err)? {
            Some((c, v)) => (c, Some(v)),
            None => (QueueCheckpoint::default(), None),
        };
        let mut checkpoint = loaded.clone();
        for (output, note) in &loaded.pending {
            info!(output = %output, "a note left by another invocation: finishing it");
            self.write_note(queue, output, note).await?;
            checkpoint.counted.extend(&note.counts);
            checkpoint.pending.remove(output);
        }
        // The messages not counted yet, once each.
        let mut seen_here: HashSet<MessageKey<'_>> = HashSet::new();
        let mut fresh: Vec<(usize, MessageKey<'_>)> = Vec::new();
        let mut unnamed = 0;
        for (i, m) in messages.iter().enumerate() {
            let key = key_of(m.name);
            if key == MessageKey::None {
                unnamed += 1;
            } else if checkpoint.counted.contains(&key) || !seen_here.insert(key.clone()) {
                continue;
            }
            fresh.push((i, key));
        }
        if unnamed > 0 {
            warn!(unnamed, "messages without a message-id cannot be recognised again: counted at least once");
        }
        let skipped = messages.len() - fresh.len();
        if fresh.is_empty() {
            info!(skipped, "every message of the batch is counted already");
            if checkpoint != loaded {
                self.write_checkpoint(cp_id, &checkpoint, version.as_ref()).await.map_err(cp_err)?;
            }
            return Ok((0, 0));
        }
        // Rolled up as records of a shard would be (the partition key from its header, the
        // position in the batch as the sequence number); the bad ones are found first and set
        // aside, and the rest rolled up.
        let records: Vec<KinesisEventRecord<'_>> = fresh.iter().map(|(i, _)| record_of(&messages[*i], *i)).collect();
        let (mut rollup, _, result) = self.roll_up(&records, &[])?;
        let mut rejected = Vec::new();
        if !result.failures.is_empty() {
            let bad: HashSet<usize> = result.failures.iter().map(|f| f.index).collect();
            for f in &result.failures {
                let m = &messages[fresh[f.index].0];
                let mut r = serde_json::Map::new();
                r.insert("queue".into(), queue.into());
                r.extend(m.about.clone());
                r.insert("message_id".into(), m.name.into());
                r.insert("reason".into(), f.reason.clone().into());
                r.insert("data".into(), m.data.as_ref().into());
                rejected.push(serde_json::Value::Object(r));
            }
            let good: Vec<KinesisEventRecord<'_>> =
                records.iter().enumerate().filter(|(i, _)| !bad.contains(i)).map(|(_, r)| r.clone()).collect();
            rollup = self.roll_up(&good, &[])?.0;
            warn!(set_aside = rejected.len(), "messages that cannot be rolled up are set aside with their reason");
        }
        // 4. The set-aside messages, the write-ahead note, the output, then the counts.
        let id = intent_id();
        let output = format!("{queue}/{id}.ndjson");
        let mut counts = Counted::default();
        for (_, key) in &fresh {
            counts.insert(key);
        }
        let set_aside = rejected.len();
        let rejected = (!rejected.is_empty()).then(|| rejected.iter().map(|r| format!("{r}\n")).collect());
        let note = Note { counts, body: rollup.ndjson(queue, None, Some(&id)), rejected };
        checkpoint.pending.insert(output.clone(), note.clone());
        let noted = self.write_checkpoint(cp_id, &checkpoint, version.as_ref()).await.map_err(cp_err)?;
        self.write_note(queue, &output, &note).await?;
        #[cfg(feature = "fault-injection")]
        if self.settings.faults.crash_after_output {
            warn!(output, "injected crash after writing the output");
            std::process::abort();
        }
        checkpoint.pending.remove(&output);
        checkpoint.counted.extend(&note.counts);
        // A conflict here: another invocation found the note and finished it: nothing is lost by
        // stopping.
        match self.checkpoints.replace(cp_id, &checkpoint, &noted).await {
            Ok(_) | Err(pushpull::checkpoint::CheckpointError::Conflict { .. }) => {}
            Err(e) => return Err(cp_err(e)),
        }
        info!(counted = fresh.len() - set_aside, set_aside, skipped, output, "rolled up");
        Ok((fresh.len() - set_aside, set_aside))
    }

    /// Writes what a note holds: the messages it set aside (`rejected/<queue>/<note id>.ndjson`),
    /// then its output; each unless it is there.
    async fn write_note(&self, queue: &str, output: &str, note: &Note) -> Result<(), RollupError> {
        if let Some(body) = &note.rejected {
            let id = output.rsplit('/').next().unwrap_or(output);
            self.write_output(&format!("rejected/{queue}/{id}"), body).await?;
        }
        self.write_output(output, &note.body).await
    }

    /// Writes output `name` unless it is there (a note finished by two invocations is written
    /// once, with the same body either way).
    async fn write_output(&self, name: &str, body: &str) -> Result<(), RollupError> {
        match self.output.put(name, body.to_owned().into(), Precondition::IfAbsent).await {
            Ok(_) | Err(StoreError::PreconditionFailed { .. }) => Ok(()),
            Err(source) => Err(RollupError::Output { uri: self.output.uri(name), source }),
        }
    }

    async fn write_checkpoint(
        &self,
        id: &str,
        value: &QueueCheckpoint,
        version: Option<&pushpull::store::Etag>,
    ) -> Result<pushpull::store::Etag, pushpull::checkpoint::CheckpointError> {
        match version {
            Some(v) => self.checkpoints.replace(id, value, v).await,
            None => self.checkpoints.create(id, value).await,
        }
    }
}

/// `name` as one path segment of a checkpoint's id: `%`, `/` and a leading `.` percent-encoded,
/// so that no two (virtual host, queue) pairs share a checkpoint and none leaves its directory.
pub(crate) fn path_segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, c) in name.char_indices() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            '.' if i == 0 => out.push_str("%2E"),
            c => out.push(c),
        }
    }
    out
}

/// A message as a record of a shard: its partition key, its place in the batch as its sequence
/// number, its base64 body as the data.
fn record_of<'a>(m: &'a QueueMessage<'_>, index: usize) -> KinesisEventRecord<'a> {
    use std::borrow::Cow;
    KinesisEventRecord {
        kinesis: KinesisData {
            partition_key: Cow::Borrowed(m.partition_key.as_str()),
            sequence_number: Cow::Owned((index + 1).to_string()),
            data: Cow::Borrowed(m.data.as_ref()),
            approximate_arrival_timestamp: 0.0,
        },
        event_id: Cow::Borrowed(""),
        event_source_arn: Cow::Borrowed(""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The ranges hold exactly the lines inserted, in any order, as disjoint sorted ranges
        /// that do not touch.
        #[test]
        fn lines_hold_exactly_what_was_inserted(lines in proptest::collection::vec(0u64..200, 0..300)) {
            let mut set = Lines::default();
            for l in &lines {
                set.insert(*l);
            }
            let want: BTreeSet<u64> = lines.iter().copied().collect();
            for l in 0..210 {
                prop_assert_eq!(set.contains(l), want.contains(&l), "line {}", l);
            }
            prop_assert_eq!(set.len(), want.len() as u64);
            for w in set.0.windows(2) {
                prop_assert!(w[0][1] + 1 < w[1][0], "{:?}", set.0);
            }
        }
    }

    use pushpull::config::Env;
    use pushpull::store::Store;

    use crate::RollupSettings;

    fn handler(dir: &std::path::Path) -> RollupHandler {
        let env = Env::from_pairs([("GROUP_BY_FIELD", "user"), ("SUM_FIELD", "n")]).with_local_locations(dir);
        RollupHandler::new(
            RollupSettings::from_env(env).unwrap(),
            Store::file(dir.join("out")),
            Store::file(dir.join("cp")),
        )
    }

    /// A message as the mapping writes it: `(message id, body)`.
    fn event(messages: &[(Option<&str>, &str)]) -> Vec<u8> {
        use base64::Engine as _;
        let list: Vec<serde_json::Value> = messages
            .iter()
            .map(|(id, body)| {
                let mut props = serde_json::json!({"deliveryMode": 2, "bodySize": body.len(),
                    "headers": {"pushpull-partition-key": {"bytes": b"pk".to_vec()}}});
                if let Some(id) = id {
                    props["messageId"] = (*id).into();
                }
                serde_json::json!({"basicProperties": props, "redelivered": false,
                    "data": base64::engine::general_purpose::STANDARD.encode(body)})
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({"eventSource": "aws:rmq",
            "eventSourceArn": "arn:aws:mq:us-east-1:000000000000:broker:b:b-1",
            "rmqMessagesByQueue": {"records::/": list}}))
        .unwrap()
    }

    /// Every group's (count, sum) over the queue's outputs.
    fn totals(dir: &std::path::Path) -> BTreeMap<String, (u64, String)> {
        let mut out: BTreeMap<String, (u64, String)> = BTreeMap::new();
        let Ok(entries) = std::fs::read_dir(dir.join("out/records")) else { return out };
        for e in entries {
            for line in std::fs::read_to_string(e.unwrap().path()).unwrap().lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                let g = out.entry(v["key"].as_str().unwrap().to_owned()).or_insert((0, String::new()));
                g.0 += v["count"].as_u64().unwrap();
                g.1 = format!("{}+{}", g.1, v["sum"]);
            }
        }
        out
    }

    fn counts(dir: &std::path::Path) -> Vec<(String, u64)> {
        totals(dir).into_iter().map(|(k, (c, _))| (k, c)).collect()
    }

    /// RabbitMQ brings a message again after a requeue (in any order) and the push function's
    /// retry publishes lines again: each is counted once.
    #[tokio::test]
    async fn redelivered_requeued_and_republished_messages_count_once() {
        let dir = tempfile::tempdir().unwrap();
        let h = handler(dir.path());
        let m =
            |line: u64, user: &str| (format!("b/in.ndjson@e1#{line}"), format!(r#"{{"user":"{user}","n":{line}}}"#));
        let all: Vec<(String, String)> = (1..=6).map(|l| m(l, if l % 2 == 0 { "ann" } else { "bob" })).collect();
        let ev = |idx: &[usize]| {
            event(&idx.iter().map(|i| (Some(all[*i].0.as_str()), all[*i].1.as_str())).collect::<Vec<_>>())
        };
        h.handle(&ev(&[0, 1, 2])).await.unwrap();
        // The same batch again, a requeued message after later ones, a copy within a batch.
        h.handle(&ev(&[0, 1, 2])).await.unwrap();
        h.handle(&ev(&[4, 1, 3, 4])).await.unwrap();
        h.handle(&ev(&[5, 2, 0])).await.unwrap();
        assert_eq!(counts(dir.path()), vec![("ann".to_owned(), 3), ("bob".to_owned(), 3)]);
        let cp = std::fs::read_to_string(dir.path().join("cp/pull/rabbitmq/%2F/records.json")).unwrap();
        assert_eq!(cp, r#"{"lines":{"b/in.ndjson@e1":[[1,6]]}}"#);
    }

    /// A message without an id cannot be recognised again: counted each time it comes.
    #[tokio::test]
    async fn a_message_without_an_id_counts_each_time_it_comes() {
        let dir = tempfile::tempdir().unwrap();
        let h = handler(dir.path());
        let ev = event(&[(None, r#"{"user":"ann","n":1}"#), (Some("other-id"), r#"{"user":"bob","n":1}"#)]);
        h.handle(&ev).await.unwrap();
        h.handle(&ev).await.unwrap();
        assert_eq!(counts(dir.path()), vec![("ann".to_owned(), 2), ("bob".to_owned(), 1)]);
    }

    /// Amazon MQ has no partial batch response: a message that cannot be rolled up is set aside
    /// with its reason (and counted as done), and the rest of its batch is rolled up.
    #[tokio::test]
    async fn a_message_that_cannot_be_rolled_up_is_set_aside_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let h = handler(dir.path());
        let ev = event(&[
            (Some("b/k@e#1"), r#"{"user":"ann","n":1}"#),
            (Some("b/k@e#2"), "not json"),
            (Some("b/k@e#3"), r#"{"user":"ann","n":"x"}"#),
            (Some("b/k@e#4"), r#"{"user":"ann","n":4}"#),
        ]);
        h.handle(&ev).await.unwrap();
        h.handle(&ev).await.unwrap();
        assert_eq!(counts(dir.path()), vec![("ann".to_owned(), 2)]);
        let rejected: Vec<serde_json::Value> = std::fs::read_dir(dir.path().join("out/rejected/records"))
            .unwrap()
            .flat_map(|e| {
                let body = std::fs::read_to_string(e.unwrap().path()).unwrap();
                body.lines().map(|l| serde_json::from_str(l).unwrap()).collect::<Vec<_>>()
            })
            .collect();
        let ids: Vec<&str> = rejected.iter().map(|r| r["message_id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["b/k@e#2", "b/k@e#3"], "set aside once each: {rejected:?}");
        assert!(rejected[1]["reason"].as_str().unwrap().contains('n'), "{rejected:?}");
    }

    /// A note as another invocation leaves it when it dies after noting its output.
    fn note_of(output: &str, lines: &str, body: &str) -> String {
        serde_json::json!({"pending": {output: {"counts": {"lines": {"b/k@e": serde_json::from_str::<serde_json::Value>(lines).unwrap()}}, "body": body}}})
            .to_string()
    }

    /// The protocol's crash points: a note left with its output written, and one left without.
    /// Whoever reads the checkpoint next finishes the note from what it holds (never waiting for
    /// a writer that may be gone): its lines count once, and the redelivered messages are skipped.
    #[tokio::test]
    async fn a_note_left_by_a_crash_is_finished_by_the_next_invocation_with_or_without_its_output() {
        for output_written in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let h = handler(dir.path());
            let cp = dir.path().join("cp/pull/rabbitmq/%2F/records.json");
            std::fs::create_dir_all(cp.parent().unwrap()).unwrap();
            let body = "{\"key\":\"ann\",\"count\":2,\"sum\":3,\"shard_id\":\"records\",\"writer\":\"w1\"}\n";
            std::fs::write(&cp, note_of("records/w1.ndjson", "[[1,2]]", body)).unwrap();
            if output_written {
                std::fs::create_dir_all(dir.path().join("out/records")).unwrap();
                std::fs::write(dir.path().join("out/records/w1.ndjson"), body).unwrap();
            }
            let ev = event(&[
                (Some("b/k@e#1"), r#"{"user":"ann","n":1}"#),
                (Some("b/k@e#2"), r#"{"user":"ann","n":2}"#),
                (Some("b/k@e#3"), r#"{"user":"bob","n":3}"#),
            ]);
            h.handle(&ev).await.unwrap();
            assert_eq!(
                counts(dir.path()),
                vec![("ann".to_owned(), 2), ("bob".to_owned(), 1)],
                "written: {output_written}"
            );
            assert_eq!(std::fs::read_to_string(&cp).unwrap(), r#"{"lines":{"b/k@e":[[1,3]]}}"#);
            // The slow writer, if alive, writes the same output under the same name: once.
            assert!(h.output.put("records/w1.ndjson", body.into(), Precondition::IfAbsent).await.is_err());
        }
    }

    #[test]
    fn checkpoint_names_keep_virtual_hosts_and_queues_apart() {
        assert_eq!(path_segment("/"), "%2F");
        assert_ne!(
            format!("{}/{}", path_segment("a/b"), path_segment("c")),
            format!("{}/{}", path_segment("a"), path_segment("b/c"))
        );
        assert_eq!(path_segment(".."), "%2E.");
        assert_eq!(path_segment("orders.v2"), "orders.v2");
    }

    #[test]
    fn an_object_read_in_order_is_one_range() {
        let mut set = Lines::default();
        for l in (1..=10_000).rev() {
            set.insert(l);
        }
        assert_eq!(serde_json::to_string(&set).unwrap(), "[[1,10000]]");
    }
}
