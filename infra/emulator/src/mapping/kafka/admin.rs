//! The broker's side of a local Kafka run: the topic the push function writes to, created if it
//! is missing, and every record it holds read back at the end (the run's "every line once" check).
use std::collections::HashMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::mapping::MappingError;

fn config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

/// Creates `topic` with `partitions` partitions on `bootstrap`; a topic that exists already is
/// kept as it is (a second run on the same stack name). Returns its partition count.
pub async fn ensure_topic(bootstrap: &str, topic: &str, partitions: i32) -> Result<i32, MappingError> {
    let admin: AdminClient<DefaultClientContext> =
        config(bootstrap).create().map_err(|e| MappingError::Kafka(format!("admin client for {bootstrap}: {e}")))?;
    let created = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .map_err(|e| {
            MappingError::Kafka(format!(
                "no Kafka broker answers at {bootstrap} ({e}): start one with `infra/kafka.sh up`"
            ))
        })?;
    for r in created {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => return Err(MappingError::Kafka(format!("creating topic {t} on {bootstrap}: {e}"))),
        }
    }
    self::partitions(bootstrap, topic, Duration::from_secs(10)).await
}

/// How many partitions `topic` has on `bootstrap`, asked until the cluster answers with them or
/// `within` passes (a topic just created may answer "leader not available" or no partitions for
/// a moment). A cluster that does not answer, or keeps answering that the topic does not exist, is
/// an error naming the servers and the topic.
pub async fn partitions(bootstrap: &str, topic: &str, within: Duration) -> Result<i32, MappingError> {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = config(&bootstrap).create().map_err(|e| MappingError::Kafka(e.to_string()))?;
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let md = c.fetch_metadata(Some(&topic), left.max(Duration::from_millis(100))).map_err(|e| {
                MappingError::Kafka(format!(
                    "no answer from the Kafka cluster at {bootstrap} within {within:?} (metadata of topic {topic}): {e}"
                ))
            })?;
            let why = match md.topics().first() {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => return Ok(t.partitions().len() as i32),
                Some(t) => t.error().map_or("no partitions".to_owned(), |e| RDKafkaErrorCode::from(e).to_string()),
                None => "not in the cluster's metadata".to_owned(),
            };
            if std::time::Instant::now() >= deadline {
                return Err(MappingError::Kafka(format!("topic {topic} on {bootstrap}: {why} (for {within:?})")));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await
    .map_err(|e| MappingError::Kafka(e.to_string()))?
}

/// Every record of `topic`, each partition read from its start to its end: the count of each
/// distinct value (by `hash`).
pub async fn value_counts(
    bootstrap: &str,
    topic: &str,
    hash: fn(&[u8]) -> u64,
) -> Result<HashMap<u64, u32>, MappingError> {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let err = |what: &str, e: rdkafka::error::KafkaError| MappingError::Kafka(format!("{what} {topic}: {e}"));
        let c: BaseConsumer = config(&bootstrap)
            .set("group.id", "pushpull-read-back")
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| err("consumer for", e))?;
        let md = c.fetch_metadata(Some(&topic), Duration::from_secs(10)).map_err(|e| err("metadata of", e))?;
        let partitions: Vec<i32> =
            md.topics().first().map(|t| t.partitions().iter().map(|p| p.id()).collect()).unwrap_or_default();
        let mut tpl = TopicPartitionList::new();
        let mut left: HashMap<i32, i64> = HashMap::new();
        for p in &partitions {
            let (low, high) =
                c.fetch_watermarks(&topic, *p, Duration::from_secs(10)).map_err(|e| err("watermarks of", e))?;
            if high > low {
                tpl.add_partition_offset(&topic, *p, Offset::Offset(low)).map_err(|e| err("assign", e))?;
                left.insert(*p, high);
            }
        }
        let mut counts = HashMap::new();
        if left.is_empty() {
            return Ok(counts);
        }
        c.assign(&tpl).map_err(|e| err("assign", e))?;
        let mut quiet = 0;
        while !left.is_empty() {
            match c.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    quiet = 0;
                    *counts.entry(hash(m.payload().unwrap_or_default())).or_default() += 1;
                    if left.get(&m.partition()).is_some_and(|high| m.offset() + 1 >= *high) {
                        left.remove(&m.partition());
                    }
                }
                Some(Err(e)) => return Err(err("reading", e)),
                None => {
                    quiet += 1;
                    if quiet > 60 {
                        return Err(MappingError::Kafka(format!("reading {topic}: nothing for 30 s, {left:?} left")));
                    }
                }
            }
        }
        Ok(counts)
    })
    .await
    .map_err(|e| MappingError::Kafka(e.to_string()))?
}
