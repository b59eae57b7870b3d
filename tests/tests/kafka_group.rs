//! The Kafka mapping's runners as members of one consumer group, on the broker's own protocol:
//! `pushpull-local esm` processes on one topic and group share its partitions as the group's
//! coordinator assigns them. Each runner invokes its own Invoke API (its own `scripted` log), so
//! the tests know who processed what.
//!
//! | behaviour | test |
//! |---|---|
//! | a member joining takes half the partitions; one stopped by SIGTERM finishes its batches in flight, commits and leaves, the other takes its partitions: every record processed exactly once; the summaries name each assignment's generation and the group's members | `a_member_joining_and_one_leaving_on_sigterm_rebalance_and_process_every_record_once` |
//! | a member killed with -9 is dropped after the session timeout and its partitions go on elsewhere: nothing lost, repeats only of what it had in flight | `a_member_killed_with_sigkill_loses_its_partitions_to_the_other_after_the_session_timeout` |
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use pushpull_local::invoke::InvokeServer;
use pushpull_local::runtime_api::FunctionSpec;
use pushpull_tests::kafka::{bootstrap, committed, send, topic};
use pushpull_tests::runners::Group;
use pushpull_tests::{function, unique};
use serde_json::{Value, json};

const PARTITIONS: i32 = 4;
const PER_PARTITION: usize = 30;
/// The group's session timeout (`--failover-ms`).
const SESSION_MS: u64 = 6000;

/// One runner: its process (a one-member [`Group`] of processes), its Invoke API and its log.
struct Member {
    runner: Group,
    _server: InvokeServer,
    dir: tempfile::TempDir,
    pid: Option<u32>,
}

async fn member(topic: &str) -> Member {
    let dir = tempfile::tempdir().unwrap();
    let mut spec: FunctionSpec = function("scripted", &[("SCRIPT_DIR", dir.path().to_str().unwrap())]);
    spec.timeout = Duration::from_secs(10);
    let server = InvokeServer::start(vec![spec], 0, 10).await.unwrap();
    let runner = Group::new(topic, "scripted", &server.endpoint(), dir.path(), SESSION_MS, 2);
    Member { runner, _server: server, dir, pid: None }
}

impl Member {
    fn start(&mut self, name: &str, topic: &str, group: &str, extra: &[&str]) {
        let mut args: Vec<String> =
            ["--kafka-bootstrap-servers", &bootstrap(), "--kafka-topic", topic].iter().map(|s| s.to_string()).collect();
        args.extend(
            ["--consumer-group-id", group, "--maximum-batching-window", "0", "--no-progress"].map(String::from),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        self.pid = Some(self.runner.spawn(name, &args));
    }

    /// (time, partition, ids) of each invocation.
    fn invocations(&self) -> Vec<(f64, String, Vec<String>)> {
        std::fs::read_to_string(self.dir.path().join("log.ndjson"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .map(|v| {
                let ids = v["ids"].as_array().unwrap().iter().map(|i| i.as_str().unwrap().to_owned()).collect();
                (v["t"].as_f64().unwrap(), v["shard"].as_str().unwrap().to_owned(), ids)
            })
            .collect()
    }

    async fn wait_invocations(&self, n: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.invocations().len() < n {
            assert!(Instant::now() < deadline, "{what}: fewer than {n} invocations\n{}", self.runner.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Every record's id, 30 a partition, each invocation taking 150 ms: work in flight whenever the
/// group changes.
async fn records(topic: &str) -> BTreeSet<String> {
    let mut values = Vec::new();
    for i in 0..PER_PARTITION {
        for p in 0..PARTITIONS {
            values.push((p, json!({"id": format!("p{p}-{i}"), "sleep_ms": 150}).to_string()));
        }
    }
    let list: Vec<pushpull_tests::kafka::Outgoing<'_>> =
        values.iter().map(|(p, v)| (*p, None, Some(v.as_bytes()))).collect();
    send(topic, &list).await;
    values.iter().map(|(_, v)| serde_json::from_str::<Value>(v).unwrap()["id"].as_str().unwrap().to_owned()).collect()
}

fn counts(members: &[&Member]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for m in members {
        for (_, _, ids) in m.invocations() {
            for id in ids {
                *out.entry(id).or_default() += 1;
            }
        }
    }
    out
}

/// AWS (kafka-consumer-group-id.html): "If you specify a consumer group ID that has other active
/// consumers, Lambda receives only a portion of the messages"; and per partition one consumer at a
/// time (kafka-scaling-modes.html: "to maintain ordered processing within partitions, Lambda caps
/// the MaximumPollers to the number of partitions in the topic"). A revoked partition's batch in
/// flight finishes and its offset is committed before the coordinator hands it on.
#[tokio::test]
async fn a_member_joining_and_one_leaving_on_sigterm_rebalance_and_process_every_record_once() {
    let topic = topic("kgroup", PARTITIONS).await;
    let group = unique("kgroup");
    let ids = records(&topic).await;
    let mut a = member(&topic).await;
    let mut b = member(&topic).await;
    a.start("a", &topic, &group, &[]);
    a.wait_invocations(3, "a alone").await;
    b.start("b", &topic, &group, &["--stop-when-idle", "3"]);
    b.wait_invocations(3, "b after joining").await;
    // a had all four partitions, then gave half to b: both were invoking at once.
    let a_pid = a.pid.unwrap();
    a.runner.terminate(a_pid);
    assert!(a.runner.wait(a_pid, Duration::from_secs(60)).await.success(), "{}", a.runner.logs());
    let b_pid = b.pid.unwrap();
    assert!(b.runner.wait(b_pid, Duration::from_secs(120)).await.success(), "{}", b.runner.logs());

    let seen = counts(&[&a, &b]);
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "processed more than once: {twice:?}");
    assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), ids, "every record processed");
    assert_eq!(committed(&group, &topic, PARTITIONS), vec![Some(PER_PARTITION as i64); PARTITIONS as usize]);
    let (sa, sb) = (a.runner.summary("a"), b.runner.summary("b"));
    let assigned = |s: &Value| -> Vec<Vec<i64>> {
        s["group"]["rebalances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["event"] == "assigned")
            .map(|e| e["partitions"].as_array().unwrap().iter().map(|p| p.as_i64().unwrap()).collect())
            .collect()
    };
    let (aa, ab) = (assigned(&sa), assigned(&sb));
    assert_eq!(aa.first().map(Vec::len), Some(4), "a alone had every partition: {aa:?}");
    assert_eq!(aa.last().map(Vec::len), Some(2), "then half: {aa:?}");
    assert_eq!(ab.first().map(Vec::len), Some(2), "b joined with half: {ab:?}");
    assert_eq!(ab.last().map(Vec::len), Some(4), "and took all once a left: {ab:?}");
    // The group's generation, counted up by the coordinator at each rebalance: b joined in a later
    // generation than a's first, and a's leaving made another.
    let generations = |s: &Value| -> Vec<i64> {
        s["group"]["rebalances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["event"] == "assigned")
            .map(|e| e["generation"].as_i64().expect("each assignment names its generation"))
            .collect()
    };
    let (ga, gb) = (generations(&sa), generations(&sb));
    assert!(ga[0] < gb[0] && gb[0] < *gb.last().unwrap(), "generations: a {ga:?}, b {gb:?}");
    assert_eq!(sb["group"]["generation"].as_i64(), gb.last().copied());
    // The members as the coordinator described them: b among them, under the id it was given.
    let b_id = sb["group"]["member_id"].as_str().expect("b's member id").to_owned();
    let members = sb["group"]["members"].as_array().cloned().unwrap_or_default();
    assert!(members.iter().any(|m| m["id"] == b_id.as_str()), "b among the members: {members:?}");
    // Order per partition held across the hand-overs: each partition's ids in offset order.
    for p in 0..PARTITIONS {
        let name = format!("{topic}-{p}");
        let mut by_time: Vec<(f64, Vec<String>)> = [&a, &b]
            .iter()
            .flat_map(|m| m.invocations())
            .filter(|(_, part, _)| *part == name)
            .map(|(t, _, ids)| (t, ids))
            .collect();
        by_time.sort_by(|x, y| x.0.total_cmp(&y.0));
        let order: Vec<String> = by_time.into_iter().flat_map(|(_, ids)| ids).collect();
        let expected: Vec<String> = (0..PER_PARTITION).map(|i| format!("p{p}-{i}")).collect();
        assert_eq!(order, expected, "partition {p} in offset order");
    }
}

/// A member killed with -9 sends no LeaveGroup: the coordinator drops it once its session times
/// out, and its partitions go to the other member, which starts at the committed offsets: the
/// batch the killed member had in flight is processed again (at least once), nothing is lost.
#[tokio::test]
async fn a_member_killed_with_sigkill_loses_its_partitions_to_the_other_after_the_session_timeout() {
    let topic = topic("kgroup-kill", PARTITIONS).await;
    let group = unique("kgroup-kill");
    let ids = records(&topic).await;
    let mut a = member(&topic).await;
    let mut b = member(&topic).await;
    a.start("a", &topic, &group, &[]);
    a.wait_invocations(2, "a alone").await;
    // Idle only well after the session timeout: until then a's partitions are still a's.
    b.start("b", &topic, &group, &["--stop-when-idle", "12"]);
    b.wait_invocations(3, "b after joining").await;
    let a_pid = a.pid.unwrap();
    let killed_at = pushpull_local::mapping::now_unix();
    a.runner.kill(a_pid);
    // a's partitions since b joined: the ones b did not invoke before the kill.
    let b_before: BTreeSet<String> =
        b.invocations().into_iter().filter(|(t, _, _)| *t < killed_at).map(|(_, p, _)| p).collect();
    let b_pid = b.pid.unwrap();
    assert!(b.runner.wait(b_pid, Duration::from_secs(120)).await.success(), "{}", b.runner.logs());

    let seen = counts(&[&a, &b]);
    assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), ids, "nothing lost\n{}", b.runner.logs());
    let repeated: usize = seen.values().map(|n| n - 1).sum();
    // At most the batch in flight in each of a's two partitions, and a batch whose asynchronous
    // commit had not landed: two batches of two records a partition.
    assert!(repeated <= 8, "{repeated} repeats: {seen:?}");
    assert_eq!(committed(&group, &topic, PARTITIONS), vec![Some(PER_PARTITION as i64); PARTITIONS as usize]);
    let taken_over = b
        .invocations()
        .into_iter()
        .filter(|(t, p, _)| *t >= killed_at && !b_before.contains(p))
        .map(|(t, _, _)| t)
        .fold(f64::INFINITY, f64::min);
    assert!(taken_over.is_finite(), "b never invoked a's partitions\n{}", b.runner.logs());
    let failover = taken_over - killed_at;
    println!("kill -9 -> a's partitions invoked by b after {failover:.1} s (session timeout {SESSION_MS} ms)");
    assert!(failover < 30.0, "a's partitions went on only after {failover:.1} s");
}
