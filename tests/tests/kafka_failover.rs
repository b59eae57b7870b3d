//! The group coordinator's failover: two brokers (nisshi, started by `infra/kafka.sh` on ports of
//! their own) on one storage (a LocalStack S3 bucket), behind one forwarder as nisshi's own
//! multi-broker tests run them (nisshi gives every broker node id 111 and answers Metadata and
//! FindCoordinator with itself, so librdkafka, which keeps a coordinator by node id, could never
//! move to the other broker's address: seen in its debug log, `GroupCoordinator/111` reconnecting
//! to the dead broker while the live one answered "coordinator is ... id 111"). The Kafka mapping
//! (`pushpull-local esm`) is invoking when the broker coordinating its group (the one the
//! forwarder sends everything to) is killed with -9: the forwarder's new connections go to the
//! other broker, which loads the group from the shared storage; the runner goes on there and
//! every record is processed (at least once: the batch in flight when the coordinator died may
//! come again).
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use pushpull_local::invoke::InvokeServer;
use pushpull_local::runtime_api::FunctionSpec;
use pushpull_tests::runners::Group;
use pushpull_tests::{function, local, unique};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

const KAFKA_SH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../infra/kafka.sh");

/// A broker started by `infra/kafka.sh` on `port` with S3 storage; stopped (by its pid file) when
/// dropped.
struct Broker {
    port: u16,
}

fn broker_env(port: u16, advertised: u16, bucket: &str) -> Vec<(String, String)> {
    let endpoint = pushpull_local::localstack::endpoint();
    [
        ("KAFKA_PORT", port.to_string()),
        ("KAFKA_ADVERTISED_PORT", advertised.to_string()),
        ("KAFKA_STORAGE_ENGINE", format!("s3://{bucket}/")),
        ("AWS_ENDPOINT", endpoint),
        ("AWS_ALLOW_HTTP", "true".to_owned()),
        ("AWS_ACCESS_KEY_ID", "test".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
        ("AWS_DEFAULT_REGION", "us-east-1".to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

impl Broker {
    fn up(port: u16, advertised: u16, bucket: &str) -> Broker {
        let out = Command::new(KAFKA_SH).arg("up").envs(broker_env(port, advertised, bucket)).output().unwrap();
        assert!(out.status.success(), "kafka.sh up on {port}: {}", String::from_utf8_lossy(&out.stderr));
        Broker { port }
    }

    /// Where `kafka.sh` keeps this broker's pid file and log.
    fn run_dir(&self) -> PathBuf {
        // As infra/kafka.sh finds it: PUSHPULL_HOME, else $XDG_CACHE_HOME/pushpull, else
        // ~/.cache/pushpull.
        let home = std::env::var("PUSHPULL_HOME").map(PathBuf::from).unwrap_or_else(|_| {
            let cache = std::env::var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into())).join(".cache"));
            cache.join("pushpull")
        });
        home.join(format!("kafka-{}", self.port))
    }

    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.run_dir().join("pid")).ok()?.trim().parse().ok()
    }

    /// kill -9 of the broker's process group (it was started with setsid).
    fn kill(&self) {
        let pid = self.pid().expect("the broker's pid file");
        assert!(Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status().unwrap().success());
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = Command::new(KAFKA_SH).arg("down").env("KAFKA_PORT", self.port.to_string()).status();
        let _ = std::fs::remove_dir_all(self.run_dir());
    }
}

/// A free port on 127.0.0.1, held until the returned listener is dropped.
fn free_port() -> (u16, std::net::TcpListener) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (l.local_addr().unwrap().port(), l)
}

#[tokio::test]
async fn the_group_goes_on_when_its_coordinator_is_killed() {
    let l = local().await;
    let bucket = unique("nisshi-failover");
    l.ensure_bucket(&bucket).await.unwrap();
    // The brokers' ports are chosen, and held, before the forwarder takes one of its own.
    let ((pa, hold_a), (pb, hold_b)) = (free_port(), free_port());
    let (bootstrap, taken, forwarder) =
        pushpull_tests::kafka::forwarder(vec![format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}")]).await;
    let advertised: u16 = bootstrap.rsplit(':').next().unwrap().parse().unwrap();
    drop((hold_a, hold_b));
    let brokers = [Broker::up(pa, advertised, &bucket), Broker::up(pb, advertised, &bucket)];
    let topic = unique("failover");
    let partitions = pushpull_local::mapping::kafka::admin::ensure_topic(&bootstrap, &topic, 2).await.unwrap();
    assert_eq!(partitions, 2);
    // 40 records a partition, each invocation of two taking 200 ms: about 4 s of work a partition.
    let producer: FutureProducer =
        pushpull_tests::kafka::config().set("bootstrap.servers", &bootstrap).create().unwrap();
    let mut ids = BTreeSet::new();
    for i in 0..40 {
        for p in 0..2 {
            let id = format!("p{p}-{i}");
            let value = json!({"id": id, "sleep_ms": 200}).to_string();
            producer
                .send(FutureRecord::<str, str>::to(&topic).partition(p).payload(&value), Duration::from_secs(10))
                .await
                .unwrap_or_else(|(e, _)| panic!("send: {e}"));
            ids.insert(id);
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let mut spec: FunctionSpec = function("scripted", &[("SCRIPT_DIR", dir.path().to_str().unwrap())]);
    spec.timeout = Duration::from_secs(10);
    let server = InvokeServer::start(vec![spec], 0, 10).await.unwrap();
    let mut runner = Group::new(&topic, "scripted", &server.endpoint(), dir.path(), 6000, 2);
    let group = unique("failover-group");
    let args: Vec<String> = [
        "--kafka-bootstrap-servers",
        &bootstrap,
        "--kafka-topic",
        &topic,
        "--consumer-group-id",
        &group,
        "--maximum-batching-window",
        "0",
        "--no-progress",
        "--stop-when-idle",
        "10",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let pid = runner.spawn("a", &args);
    let log = dir.path().join("log.ndjson");
    let invocations = || -> Vec<(f64, Vec<String>)> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .map(|v| {
                (
                    v["t"].as_f64().unwrap(),
                    v["ids"].as_array().unwrap().iter().map(|i| i.as_str().unwrap().to_owned()).collect(),
                )
            })
            .collect()
    };
    // A few invocations made: the group is joined on the first broker (the forwarder's choice).
    let deadline = Instant::now() + Duration::from_secs(60);
    while invocations().len() < 3 {
        assert!(Instant::now() < deadline, "no invocations in 60 s\n{}", runner.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    use std::sync::atomic::Ordering;
    assert_eq!(taken[1].load(Ordering::Relaxed), 0, "everything went to the first broker so far");
    let killed_at = pushpull_local::mapping::now_unix();
    brokers[0].kill();
    // Records written after the kill (through the forwarder: to the surviving broker) can only
    // reach the function through the group on that broker.
    for i in 0..5 {
        for p in 0..2 {
            let id = format!("after-p{p}-{i}");
            let value = json!({"id": id}).to_string();
            producer
                .send(FutureRecord::<str, str>::to(&topic).partition(p).payload(&value), Duration::from_secs(30))
                .await
                .unwrap_or_else(|(e, _)| panic!("send after the kill: {e}"));
            ids.insert(id);
        }
    }
    assert!(runner.wait(pid, Duration::from_secs(180)).await.success(), "{}", runner.logs());

    let all = invocations();
    let seen: BTreeSet<String> = all.iter().flat_map(|(_, ids)| ids.clone()).collect();
    assert_eq!(seen, ids, "every record processed\n{}", runner.logs());
    let next = all
        .iter()
        .filter(|(_, ids)| ids.iter().any(|i| i.starts_with("after-")))
        .map(|(t, _)| *t)
        .fold(f64::INFINITY, f64::min);
    assert!(next.is_finite(), "nothing written after the coordinator died was invoked\n{}", runner.logs());
    // Measured, not asserted (a benchmark's figure): the target is 5 s.
    println!("coordinator killed -> first invocation of a record written after it: {:.1} s", next - killed_at);
    assert!(taken[1].load(Ordering::Relaxed) > 0, "the second broker served the group\n{}", runner.logs());
    forwarder.abort();
}
