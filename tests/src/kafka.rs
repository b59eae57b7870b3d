//! The Kafka broker `make test` starts (`infra/kafka.sh`): its address, topics of a test's own,
//! records sent to them, and a group's committed offsets. The broker's address: `KAFKA_BOOTSTRAP`,
//! else `127.0.0.1:$KAFKA_PORT` (9092).
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

/// The broker's bootstrap address.
pub fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP")
        .unwrap_or_else(|_| format!("127.0.0.1:{}", std::env::var("KAFKA_PORT").unwrap_or_else(|_| "9092".into())))
}

/// A client configuration for the broker.
pub fn config() -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap()).set("broker.address.family", "v4");
    c
}

/// A topic of its own (named after `prefix`), with `partitions` partitions; panics, saying how to
/// start the broker, if it is not there.
pub async fn topic(prefix: &str, partitions: i32) -> String {
    topic_with(prefix, partitions, &[]).await
}

/// [`topic`] with topic configs (`max.message.bytes`, ...).
pub async fn topic_with(prefix: &str, partitions: i32, configs: &[(&str, &str)]) -> String {
    let name = crate::unique(prefix);
    let admin: AdminClient<DefaultClientContext> = config().create().expect("an admin client");
    let mut new = NewTopic::new(&name, partitions, TopicReplication::Fixed(1));
    for (k, v) in configs {
        new = new.set(k, v);
    }
    let created = admin
        .create_topics(&[new], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))))
        .await
        .unwrap_or_else(|e| panic!("no Kafka broker at {} ({e}): start one with `infra/kafka.sh up`", bootstrap()));
    for r in created {
        r.unwrap_or_else(|(t, e)| panic!("creating {t}: {e}"));
    }
    name
}

/// Deletes `topic`.
pub async fn delete_topic(topic: &str) {
    let admin: AdminClient<DefaultClientContext> = config().create().expect("an admin client");
    let deleted = admin
        .delete_topics(&[topic], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))))
        .await
        .unwrap_or_else(|e| panic!("deleting {topic}: {e}"));
    for r in deleted {
        r.unwrap_or_else(|(t, e)| panic!("deleting {t}: {e}"));
    }
}

/// A record to send: its partition, key and value (`None`: none, or a tombstone).
pub type Outgoing<'a> = (i32, Option<&'a [u8]>, Option<&'a [u8]>);

/// Sends `records` (partition, key, value) to `topic`, in order per partition; returns each one's
/// offset.
pub async fn send(topic: &str, records: &[Outgoing<'_>]) -> Vec<i64> {
    let producer: FutureProducer =
        config().set("linger.ms", "20").set("enable.idempotence", "true").create().expect("a producer");
    let sends = records.iter().map(|(partition, key, value)| {
        let mut r = FutureRecord::<[u8], [u8]>::to(topic).partition(*partition);
        if let Some(k) = key {
            r = r.key(*k);
        }
        if let Some(v) = value {
            r = r.payload(*v);
        }
        producer.send(r, Duration::from_secs(10))
    });
    futures_util::future::join_all(sends)
        .await
        .into_iter()
        .map(|r| r.unwrap_or_else(|(e, _)| panic!("send to {topic}: {e}")).offset)
        .collect()
}

/// The low and high watermarks of a partition.
pub fn watermarks(topic: &str, partition: i32) -> (i64, i64) {
    let c: BaseConsumer = config().set("group.id", "watermarks").create().expect("a consumer");
    c.fetch_watermarks(topic, partition, Duration::from_secs(10)).expect("watermarks")
}

/// `group`'s committed offset of each of `topic`'s first `partitions` partitions (`None`: none).
pub fn committed(group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
    let c: BaseConsumer = config().set("group.id", group).create().expect("a consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).expect("committed offsets");
    (0..partitions)
        .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        })
        .collect()
}

/// A record read back: its key and value (`None`: none).
pub type Incoming = (Option<Vec<u8>>, Option<Vec<u8>>);

/// Every record of `topic`'s first `partitions` partitions, partition by partition in offset
/// order (read up to each partition's high watermark).
pub fn read_all(topic: &str, partitions: i32) -> Vec<Incoming> {
    use rdkafka::message::Message as _;
    let c: BaseConsumer =
        config().set("group.id", "read-all").set("enable.auto.commit", "false").create().expect("a consumer");
    let mut out = Vec::new();
    for p in 0..partitions {
        let (low, high) = c.fetch_watermarks(topic, p, Duration::from_secs(10)).expect("watermarks");
        if high <= low {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(low)).expect("an offset");
        c.assign(&tpl).expect("assign");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut next = low;
        while next < high {
            assert!(std::time::Instant::now() < deadline, "{topic}-{p}: read {next} of {high} in 30 s");
            if let Some(m) = c.poll(Duration::from_millis(200)) {
                let m = m.unwrap_or_else(|e| panic!("reading {topic}-{p}: {e}"));
                out.push((m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec)));
                next = m.offset() + 1;
            }
        }
    }
    out
}

/// A TCP forwarder on 127.0.0.1 in front of several brokers: each connection goes to the first of
/// `backends` that accepts it. Brokers that share one store and advertise the forwarder's address
/// are one cluster to a client, as nisshi's own multi-broker tests run them (it gives every broker
/// node id 111: a client can tell brokers apart only by their address). Returns its address and
/// how many connections each backend took; stops when the task is aborted.
pub async fn forwarder(
    backends: Vec<String>,
) -> (String, std::sync::Arc<Vec<std::sync::atomic::AtomicU64>>, tokio::task::JoinHandle<()>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port for the forwarder");
    let address = listener.local_addr().expect("its address").to_string();
    let taken = std::sync::Arc::new(backends.iter().map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
    let counts = taken.clone();
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((mut inbound, _)) = listener.accept().await {
            let (backends, taken) = (backends.clone(), taken.clone());
            connections.spawn(async move {
                for (i, b) in backends.iter().enumerate() {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(b).await {
                        taken[i].fetch_add(1, Ordering::Relaxed);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        return;
                    }
                }
            });
        }
    });
    (address, counts, task)
}
