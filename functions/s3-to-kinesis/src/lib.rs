//! The sample push function: S3 objects of NDJSON lines to a Kinesis stream, a Kafka topic, a
//! RabbitMQ queue, an SQS queue or Redis (a stream or a pub/sub channel), exactly once (on
//! RabbitMQ, SQS and a Redis stream: at least once, each message named by its object and line so
//! that the consumer counts it once; on a Redis channel: at most once, as pub/sub delivers).
//!
//! Everything generic is in `pushpull::push`; this crate adds what is particular to the sample:
//! its settings (`STREAM_NAME`, or `KAFKA_BOOTSTRAP_SERVERS` and `KAFKA_TOPIC`, or `RABBITMQ_URL`
//! and `RABBITMQ_QUEUE`, or `SQS_QUEUE`, or `REDIS_URL` and `REDIS_STREAM` or `REDIS_CHANNEL`, and
//! `PARTITION_KEY_FIELD`, on top of the library's), the built-in JSON line handler, the S3
//! source, the sink the settings name ([`Target`]), and (feature `fault-injection`, for the fault
//! tests only) a sink that fails entries on purpose.
use pushpull::config::{ConfigErrors, Env, PushSettings};
use pushpull::push::PushHandler;
use pushpull::push::line::JsonLines;
use pushpull::push::source::S3Source;
use pushpull::sink::kafka::KafkaSink;
use pushpull::sink::kinesis::KinesisSink;
use pushpull::sink::rabbitmq::RabbitMqSink;
use pushpull::sink::redis::{RedisSink, RedisTarget};
use pushpull::sink::sqs::SqsSink;
use pushpull::sink::{OutRecord, PutOutcome, RecordSink, SinkError, WrittenRecord};

/// Where the records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// `STREAM_NAME`: a Kinesis stream.
    Kinesis(String),
    /// `KAFKA_BOOTSTRAP_SERVERS` (comma-separated `host:port`) and `KAFKA_TOPIC`: a Kafka topic.
    Kafka {
        /// The cluster's bootstrap servers.
        bootstrap_servers: Vec<String>,
        /// The topic (it must exist).
        topic: String,
    },
    /// `RABBITMQ_URL` (`amqp[s]://user:pass@host:port/vhost`) and `RABBITMQ_QUEUE`: a queue, through
    /// the default exchange.
    RabbitMq {
        /// The broker, credentials and virtual host included.
        url: String,
        /// The queue (it must exist).
        queue: String,
    },
    /// `SQS_QUEUE`: an SQS queue's name or URL (FIFO if its name ends in `.fifo`: a group per
    /// partition key).
    Sqs(String),
    /// `REDIS_URL` (`redis://host:port/db`) and `REDIS_STREAM` (entries by `XADD`) or
    /// `REDIS_CHANNEL` (messages by `PUBLISH`).
    Redis {
        /// The server.
        url: String,
        /// The stream or the channel.
        target: RedisTarget,
    },
}

/// `RABBITMQ_USERNAME`, `RABBITMQ_PASSWORD` and `RABBITMQ_VIRTUAL_HOST`: parts that replace the
/// URL's own (the template resolves the credentials from the mapping's secret), percent-encoded
/// into it as AMQP's URI rules read them.
struct RabbitMqParts {
    username: Option<String>,
    password: Option<String>,
    virtual_host: Option<String>,
}

impl RabbitMqParts {
    fn apply(&self, url: &str) -> String {
        let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
        let (authority, path) = rest.split_once('/').map_or((rest, None), |(a, p)| (a, Some(p)));
        let (userinfo, host) = authority.rsplit_once('@').map_or((None, authority), |(u, h)| (Some(u), h));
        let (user, pass) = match userinfo {
            Some(u) => u.split_once(':').map_or((Some(u), None), |(u, p)| (Some(u), Some(p))),
            None => (None, None),
        };
        let user = self.username.as_deref().map(encode).or(user.map(str::to_owned));
        let pass = self.password.as_deref().map(encode).or(pass.map(str::to_owned));
        let path = self.virtual_host.as_deref().map(encode).or(path.map(str::to_owned));
        let mut out = format!("{scheme}://");
        if let Some(user) = user {
            out.push_str(&user);
            if let Some(pass) = pass {
                out.push(':');
                out.push_str(&pass);
            }
            out.push('@');
        }
        out.push_str(host);
        if let Some(path) = path {
            out.push('/');
            out.push_str(&path);
        }
        out
    }
}

/// Percent-encodes all but letters and digits (what AMQP's URI rules decode).
fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The function's settings: the library's push settings, the destination, the partition key
/// field.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The push pipeline's settings (`PUT_*`, `CHECKPOINT_*`, `*_URI`, ...).
    pub push: PushSettings,
    /// Where records are sent: `STREAM_NAME`, or `KAFKA_TOPIC` with `KAFKA_BOOTSTRAP_SERVERS`
    /// (one of the two is required).
    pub destination: Destination,
    /// `PARTITION_KEY_FIELD`: top-level JSON field whose value is the partition key; unset, or
    /// absent from a line, means a stable hash of the line.
    pub partition_key_field: Option<String>,
    /// `PUSHPULL_INJECT_PUT_FAILURES` (feature `fault-injection`): fraction of PutRecords entries
    /// to fail on purpose, as throttling would.
    pub inject_put_failures: f64,
    /// `PUSHPULL_INJECT_CRASH_ONCE=<marker file>:<records>` (feature `fault-injection`): abort
    /// the process once `records` records have been sent by it, if the marker file does not
    /// exist yet (it is created first, so only one process of a run crashes).
    pub inject_crash_once: Option<(std::path::PathBuf, u64)>,
}

impl Settings {
    /// Reads and checks every setting; every problem is reported at once.
    ///
    /// ```
    /// use pushpull::config::Env;
    /// let err = s3_to_kinesis::Settings::from_env(Env::from_pairs([("PUT_MAX_RECORDS", "900")])).unwrap_err();
    /// assert!(err.to_string().contains("STREAM_NAME is not set"), "{err}");
    /// assert!(err.to_string().contains("PUT_MAX_RECORDS=\"900\""), "{err}");
    /// ```
    pub fn from_env(mut env: Env) -> Result<Self, ConfigErrors> {
        let rabbitmq_queue = env.optional("RABBITMQ_QUEUE");
        let sqs_queue = env.optional("SQS_QUEUE");
        let redis_stream = env.optional("REDIS_STREAM");
        let redis_channel = env.optional("REDIS_CHANNEL");
        let destination = match env.optional("KAFKA_TOPIC") {
            _ if redis_stream.is_some() || redis_channel.is_some() => {
                let url = env.required("REDIS_URL", "the Redis server REDIS_STREAM or REDIS_CHANNEL is on");
                if !url.is_empty() && !url.starts_with("redis://") && !url.starts_with("rediss://") {
                    env.invalid("REDIS_URL", url.clone(), "redis[s]://host:port[/db]");
                }
                let target = match (redis_stream, redis_channel) {
                    (Some(stream), None) => RedisTarget::Stream(stream),
                    (None, Some(channel)) => RedisTarget::Channel(channel),
                    (Some(stream), Some(channel)) => {
                        env.invalid("REDIS_CHANNEL", channel, "unset when REDIS_STREAM is set: one destination");
                        RedisTarget::Stream(stream)
                    }
                    (None, None) => unreachable!("one is set"),
                };
                Destination::Redis { url, target }
            }
            _ if sqs_queue.is_some() => {
                let queue = sqs_queue.unwrap_or_default(); // set and not empty
                // SQS (API CreateQueue, QueueName): "up to 80 characters"; "alphanumeric
                // characters, hyphens (-), and underscores (_)"; a FIFO queue's ends in `.fifo`.
                let name = queue.rsplit('/').next().unwrap_or_default();
                let stem = name.strip_suffix(".fifo").unwrap_or(name);
                let name_ok = !stem.is_empty()
                    && name.len() <= 80
                    && stem.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
                if !name_ok {
                    env.invalid(
                        "SQS_QUEUE",
                        queue.clone(),
                        "an SQS queue's name or URL (1-80 of [a-zA-Z0-9_-], .fifo last)",
                    );
                }
                Destination::Sqs(queue)
            }
            _ if rabbitmq_queue.is_some() => {
                let queue = rabbitmq_queue.unwrap_or_default(); // set and not empty
                let url = env.required("RABBITMQ_URL", "the RabbitMQ broker RABBITMQ_QUEUE is on");
                if !url.is_empty() && !url.starts_with("amqp://") && !url.starts_with("amqps://") {
                    let shown = pushpull::sink::rabbitmq::redacted(&url);
                    env.invalid("RABBITMQ_URL", shown, "amqp[s]://user:password@host:port/vhost");
                }
                // AMQP names a queue with a short string: at most 255 bytes.
                if queue.len() > 255 {
                    env.invalid("RABBITMQ_QUEUE", queue.clone(), "a queue name of at most 255 bytes");
                }
                let parts = RabbitMqParts {
                    username: env.optional("RABBITMQ_USERNAME"),
                    password: env.optional("RABBITMQ_PASSWORD"),
                    virtual_host: env.optional("RABBITMQ_VIRTUAL_HOST"),
                };
                Destination::RabbitMq { url: parts.apply(&url), queue }
            }
            Some(topic) => {
                let servers = env.required("KAFKA_BOOTSTRAP_SERVERS", "the Kafka cluster KAFKA_TOPIC is on");
                let bootstrap_servers: Vec<String> =
                    servers.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
                if !servers.is_empty()
                    && bootstrap_servers
                        .iter()
                        .any(|s| s.rsplit_once(':').is_none_or(|(_, p)| p.parse::<u16>().is_err()))
                {
                    env.invalid("KAFKA_BOOTSTRAP_SERVERS", servers.clone(), "host:port[,host:port...]");
                }
                let topic_ok = !topic.is_empty()
                    && topic.len() <= 249
                    && topic.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                if !topic_ok {
                    env.invalid("KAFKA_TOPIC", topic.clone(), "a Kafka topic name: 1-249 of [a-zA-Z0-9._-]");
                }
                Destination::Kafka { bootstrap_servers, topic }
            }
            None => Destination::Kinesis(env.kinesis_stream_name(
                "STREAM_NAME",
                "the Kinesis stream the push function writes to (or set KAFKA_TOPIC, RABBITMQ_QUEUE, SQS_QUEUE, REDIS_STREAM or REDIS_CHANNEL)",
            )),
        };
        let push = PushSettings::read(&mut env);
        let partition_key_field = env.optional("PARTITION_KEY_FIELD");
        let inject_put_failures = inject_put_failures(&mut env);
        let inject_crash_once = inject_crash_once(&mut env);
        env.finish()?;
        Ok(Settings { push, destination, partition_key_field, inject_put_failures, inject_crash_once })
    }
}

/// The sink the settings name: a Kinesis stream or a Kafka topic.
#[derive(Debug)]
pub enum Target {
    /// Records to a stream.
    Kinesis(KinesisSink),
    /// Records to a topic.
    Kafka(KafkaSink),
    /// Records to a queue (boxed: a lapin connection and channel are large, and there is one
    /// sink per process).
    RabbitMq(Box<RabbitMqSink>),
    /// Records to an SQS queue.
    Sqs(SqsSink),
    /// Records to a Redis stream or channel (boxed: the client's connection settings are large).
    Redis(Box<RedisSink>),
}

impl RecordSink for Target {
    fn can_read_back(&self) -> bool {
        match self {
            Target::Kinesis(s) => s.can_read_back(),
            Target::Kafka(s) => s.can_read_back(),
            Target::RabbitMq(s) => s.can_read_back(),
            Target::Sqs(s) => s.can_read_back(),
            Target::Redis(s) => s.can_read_back(),
        }
    }

    fn keeps_key_order_in_a_call(&self) -> bool {
        match self {
            Target::Kinesis(s) => s.keeps_key_order_in_a_call(),
            Target::Kafka(s) => s.keeps_key_order_in_a_call(),
            Target::RabbitMq(s) => s.keeps_key_order_in_a_call(),
            Target::Sqs(s) => s.keeps_key_order_in_a_call(),
            Target::Redis(s) => s.keeps_key_order_in_a_call(),
        }
    }

    fn names_records(&self) -> bool {
        match self {
            Target::Kinesis(s) => s.names_records(),
            Target::Kafka(s) => s.names_records(),
            Target::RabbitMq(s) => s.names_records(),
            Target::Sqs(s) => s.names_records(),
            Target::Redis(s) => s.names_records(),
        }
    }

    async fn put_records(&self, records: &[OutRecord]) -> Result<PutOutcome, SinkError> {
        match self {
            Target::Kinesis(s) => s.put_records(records).await,
            Target::Kafka(s) => s.put_records(records).await,
            Target::RabbitMq(s) => s.put_records(records).await,
            Target::Sqs(s) => s.put_records(records).await,
            Target::Redis(s) => s.put_records(records).await,
        }
    }

    async fn written_since(
        &self,
        positions: &std::collections::BTreeMap<String, String>,
        since_ms: u64,
        until_ms: u64,
    ) -> Result<Vec<WrittenRecord>, SinkError> {
        match self {
            Target::Kinesis(s) => s.written_since(positions, since_ms, until_ms).await,
            Target::Kafka(s) => s.written_since(positions, since_ms, until_ms).await,
            Target::RabbitMq(s) => s.written_since(positions, since_ms, until_ms).await,
            Target::Sqs(s) => s.written_since(positions, since_ms, until_ms).await,
            Target::Redis(s) => s.written_since(positions, since_ms, until_ms).await,
        }
    }

    async fn shard_map(&self) -> Result<Option<pushpull::sink::ShardMap>, SinkError> {
        match self {
            Target::Kinesis(s) => s.shard_map().await,
            Target::Kafka(s) => s.shard_map().await,
            Target::RabbitMq(s) => s.shard_map().await,
            Target::Sqs(s) => s.shard_map().await,
            Target::Redis(s) => s.shard_map().await,
        }
    }
}

#[cfg(feature = "fault-injection")]
fn inject_put_failures(env: &mut Env) -> f64 {
    let f = env.parse_or("PUSHPULL_INJECT_PUT_FAILURES", 0.0f64);
    if !(0.0..=1.0).contains(&f) {
        env.invalid("PUSHPULL_INJECT_PUT_FAILURES", f.to_string(), "a fraction from 0 to 1");
    }
    f
}

#[cfg(feature = "fault-injection")]
fn inject_crash_once(env: &mut Env) -> Option<(std::path::PathBuf, u64)> {
    let v = env.optional("PUSHPULL_INJECT_CRASH_ONCE")?;
    match v.rsplit_once(':').and_then(|(p, n)| Some((std::path::PathBuf::from(p), n.parse().ok()?))) {
        Some(x) => Some(x),
        None => {
            env.invalid("PUSHPULL_INJECT_CRASH_ONCE", v, "<marker file>:<records>");
            None
        }
    }
}

#[cfg(not(feature = "fault-injection"))]
fn inject_crash_once(env: &mut Env) -> Option<(std::path::PathBuf, u64)> {
    if let Some(v) = env.optional("PUSHPULL_INJECT_CRASH_ONCE") {
        env.invalid(
            "PUSHPULL_INJECT_CRASH_ONCE",
            v,
            "unset: this build has no fault injection (feature fault-injection)",
        );
    }
    None
}

#[cfg(not(feature = "fault-injection"))]
fn inject_put_failures(env: &mut Env) -> f64 {
    if let Some(v) = env.optional("PUSHPULL_INJECT_PUT_FAILURES") {
        env.invalid(
            "PUSHPULL_INJECT_PUT_FAILURES",
            v,
            "unset: this build has no fault injection (feature fault-injection)",
        );
    }
    0.0
}

/// The sink the deployed function sends to.
#[cfg(not(feature = "fault-injection"))]
pub type Sink = Target;
/// The sink the fault tests' build sends to.
#[cfg(feature = "fault-injection")]
pub type Sink = faults::FaultInjectingSink<Target>;

/// The handler the function runs.
pub type Handler = PushHandler<S3Source, JsonLines, Sink>;

/// The handler, its clients from the AWS configuration, records to the destination; fails if a
/// Kafka or RabbitMQ destination cannot be reached or its topic or queue does not exist.
pub async fn handler(settings: Settings, aws: &pushpull::aws::Aws) -> Result<Handler, SinkError> {
    let sink = match &settings.destination {
        Destination::Kinesis(stream) => Target::Kinesis(KinesisSink::new(aws.kinesis().await.clone(), stream)),
        Destination::Kafka { bootstrap_servers, topic } => {
            Target::Kafka(KafkaSink::connect(bootstrap_servers, topic).await?)
        }
        Destination::RabbitMq { url, queue } => Target::RabbitMq(Box::new(RabbitMqSink::connect(url, queue).await?)),
        Destination::Sqs(queue) => Target::Sqs(SqsSink::connect(aws.sqs().await.clone(), queue).await?),
        Destination::Redis { url, target } => Target::Redis(Box::new(RedisSink::connect(url, target.clone()).await?)),
    };
    #[cfg(feature = "fault-injection")]
    let sink = faults::FaultInjectingSink::new(sink, settings.inject_put_failures)
        .crash_once(settings.inject_crash_once.clone());
    let source = S3Source::new(aws.s3().await.clone());
    // The quarantine and checkpoints where the settings name them (the loop guard reads the same).
    Ok(PushHandler::builder(settings.push)
        .source(source)
        .lines(JsonLines::new(settings.partition_key_field))
        .sink(sink)
        .connect(aws)
        .await)
}

/// Fault injection for the fault tests (feature `fault-injection`).
#[cfg(feature = "fault-injection")]
pub mod faults {
    use std::collections::BTreeMap;
    use std::future::Future;

    use pushpull::sink::{FailedEntry, OutRecord, PutOutcome, RecordSink, SinkError, WrittenRecord};

    /// Fails a fraction of the entries of every call, as a throttled stream does
    /// (`ProvisionedThroughputExceededException`): the failed entries are not sent, the rest are.
    /// For fault-injection tests of the code above a sink; never for production.
    #[derive(Debug)]
    pub struct FaultInjectingSink<S> {
        inner: S,
        fail_fraction: f64,
        crash_once: Option<(std::path::PathBuf, u64)>,
        sent: std::sync::atomic::AtomicU64,
    }

    impl<S> FaultInjectingSink<S> {
        /// Fails each entry with probability `fail_fraction` (0.0 to 1.0).
        pub fn new(inner: S, fail_fraction: f64) -> Self {
            FaultInjectingSink {
                inner,
                fail_fraction: fail_fraction.clamp(0.0, 1.0),
                crash_once: None,
                sent: Default::default(),
            }
        }

        /// Aborts the process (as a crash would) once this sink has sent `records` lines, if `marker`
        /// does not exist yet; creates it first, so one process of a run crashes.
        pub fn crash_once(mut self, at: Option<(std::path::PathBuf, u64)>) -> Self {
            self.crash_once = at;
            self
        }

        fn maybe_crash(&self, sent_now: usize) {
            let total = self.sent.fetch_add(sent_now as u64, std::sync::atomic::Ordering::SeqCst) + sent_now as u64;
            if let Some((marker, at)) = &self.crash_once
                && total >= *at
                && std::fs::OpenOptions::new().write(true).create_new(true).open(marker).is_ok()
            {
                eprintln!("fault injection: aborting after {total} records sent (PUSHPULL_INJECT_CRASH_ONCE)");
                std::process::abort();
            }
        }
    }

    impl<S: RecordSink> RecordSink for FaultInjectingSink<S> {
        fn can_read_back(&self) -> bool {
            self.inner.can_read_back()
        }

        fn names_records(&self) -> bool {
            self.inner.names_records()
        }

        /// Failing entries one by one breaks what the inner sink keeps together.
        fn keeps_key_order_in_a_call(&self) -> bool {
            self.fail_fraction <= 0.0 && self.inner.keeps_key_order_in_a_call()
        }

        async fn put_records(&self, records: &[OutRecord]) -> Result<PutOutcome, SinkError> {
            if self.fail_fraction <= 0.0 {
                let out = self.inner.put_records(records).await?;
                // Lines sent: an aggregate counts the lines it packs.
                let failed: usize =
                    out.failed.iter().filter_map(|f| records.get(f.index)).map(|r| r.user_records as usize).sum();
                self.maybe_crash(records.iter().map(|r| r.user_records as usize).sum::<usize>() - failed);
                return Ok(out);
            }
            let fail: Vec<bool> = records.iter().map(|_| fastrand::f64() < self.fail_fraction).collect();
            let passed: Vec<usize> = (0..records.len()).filter(|&i| !fail[i]).collect();
            let pass: Vec<OutRecord> = passed.iter().map(|&i| records[i].clone()).collect();
            let inner = if pass.is_empty() { PutOutcome::default() } else { self.inner.put_records(&pass).await? };
            let mut failed: Vec<FailedEntry> = (0..records.len())
                .filter(|&i| fail[i])
                .map(|index| FailedEntry {
                    index,
                    code: "ProvisionedThroughputExceededException".into(),
                    message: "Rate exceeded for shard (injected)".into(),
                })
                .collect();
            failed.extend(inner.failed.into_iter().map(|f| FailedEntry { index: passed[f.index], ..f }));
            failed.sort_by_key(|f| f.index);
            Ok(PutOutcome { failed, last_written: inner.last_written })
        }

        fn shard_map(&self) -> impl Future<Output = Result<Option<pushpull::sink::ShardMap>, SinkError>> + Send {
            self.inner.shard_map()
        }

        fn written_since(
            &self,
            positions: &BTreeMap<String, String>,
            since_ms: u64,
            until_ms: u64,
        ) -> impl Future<Output = Result<Vec<WrittenRecord>, SinkError>> + Send {
            self.inner.written_since(positions, since_ms, until_ms)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_are_checked() {
        let err = Settings::from_env(Env::from_pairs([("STREAM_NAME", "bad name!")])).unwrap_err().to_string();
        assert!(err.contains("STREAM_NAME=\"bad name!\""), "{err}");
        let env = Env::from_pairs([("STREAM_NAME", "ingest"), ("PARTITION_KEY_FIELD", "user")]);
        let ok = Settings::from_env(env.with_local_locations("/tmp/s")).unwrap();
        assert_eq!(ok.destination, Destination::Kinesis("ingest".into()));
        assert_eq!(ok.partition_key_field.as_deref(), Some("user"));
    }

    #[test]
    fn a_kafka_topic_is_the_destination_when_named() {
        let env = Env::from_pairs([("KAFKA_TOPIC", "orders"), ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092, b:9093")]);
        let ok = Settings::from_env(env.with_local_locations("/tmp/s")).unwrap();
        let servers = vec!["127.0.0.1:9092".to_owned(), "b:9093".to_owned()];
        assert_eq!(ok.destination, Destination::Kafka { bootstrap_servers: servers, topic: "orders".into() });
        let err = Settings::from_env(Env::from_pairs([("KAFKA_TOPIC", "orders")])).unwrap_err().to_string();
        assert!(err.contains("KAFKA_BOOTSTRAP_SERVERS is not set"), "{err}");
        let env = Env::from_pairs([("KAFKA_TOPIC", "bad topic"), ("KAFKA_BOOTSTRAP_SERVERS", "nohost")]);
        let err = Settings::from_env(env).unwrap_err().to_string();
        assert!(
            err.contains("KAFKA_TOPIC=\"bad topic\"") && err.contains("KAFKA_BOOTSTRAP_SERVERS=\"nohost\""),
            "{err}"
        );
    }

    #[test]
    fn an_sqs_queue_is_the_destination_when_named_and_its_name_is_checked() {
        let env = |q: &str| Env::from_pairs([("SQS_QUEUE", q)]).with_local_locations("/tmp/s");
        let s = Settings::from_env(env("orders.fifo")).unwrap();
        assert_eq!(s.destination, Destination::Sqs("orders.fifo".into()));
        let url = "http://sqs.us-east-1.127.0.0.1:4566/000000000000/orders";
        let s = Settings::from_env(env(url)).unwrap();
        assert_eq!(s.destination, Destination::Sqs(url.into()));
        for bad in ["a b", ".fifo", &"q".repeat(81)] {
            let err = Settings::from_env(env(bad)).unwrap_err().to_string();
            assert!(err.contains("SQS_QUEUE"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_redis_stream_or_channel_is_the_destination_when_named() {
        let env = |pairs: &[(&str, &str)]| Env::from_pairs(pairs.iter().copied()).with_local_locations("/tmp/s");
        let url = "redis://127.0.0.1:6390/";
        let s = Settings::from_env(env(&[("REDIS_URL", url), ("REDIS_STREAM", "records")])).unwrap();
        assert_eq!(
            s.destination,
            Destination::Redis { url: url.into(), target: RedisTarget::Stream("records".into()) }
        );
        let s = Settings::from_env(env(&[("REDIS_URL", url), ("REDIS_CHANNEL", "records")])).unwrap();
        assert_eq!(
            s.destination,
            Destination::Redis { url: url.into(), target: RedisTarget::Channel("records".into()) }
        );
        let err = Settings::from_env(env(&[("REDIS_CHANNEL", "c")])).unwrap_err().to_string();
        assert!(err.contains("REDIS_URL is not set"), "{err}");
        let err = Settings::from_env(env(&[("REDIS_URL", "http://h"), ("REDIS_STREAM", "s"), ("REDIS_CHANNEL", "c")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("REDIS_URL=\"http://h\"") && err.contains("REDIS_CHANNEL=\"c\""), "{err}");
    }

    #[test]
    fn a_rabbitmq_queue_is_the_destination_when_named_and_its_password_is_never_shown() {
        let url = "amqp://u:p@127.0.0.1:5672/v";
        let env = Env::from_pairs([("RABBITMQ_QUEUE", "records"), ("RABBITMQ_URL", url)]);
        let ok = Settings::from_env(env.with_local_locations("/tmp/s")).unwrap();
        assert_eq!(ok.destination, Destination::RabbitMq { url: url.into(), queue: "records".into() });
        let err = Settings::from_env(Env::from_pairs([("RABBITMQ_QUEUE", "records")])).unwrap_err().to_string();
        assert!(err.contains("RABBITMQ_URL is not set"), "{err}");
        let long = "q".repeat(256);
        let env = Env::from_pairs([("RABBITMQ_QUEUE", long.as_str()), ("RABBITMQ_URL", "http://u:secret@h/v")]);
        let err = Settings::from_env(env).unwrap_err().to_string();
        assert!(
            err.contains(&format!("RABBITMQ_QUEUE=\"{long}\"")) && err.contains("RABBITMQ_URL=\"http://u:***@h/v\""),
            "{err}"
        );
        assert!(!err.contains("secret"), "{err}");
        // The template's form: the endpoint, with the secret's credentials and the virtual host
        // beside it.
        let env = Env::from_pairs([
            ("RABBITMQ_QUEUE", "records"),
            ("RABBITMQ_URL", "amqps://b-1.mq.us-east-1.amazonaws.com:5671"),
            ("RABBITMQ_USERNAME", "ann"),
            ("RABBITMQ_PASSWORD", "p@ss:word/"),
            ("RABBITMQ_VIRTUAL_HOST", "/"),
        ]);
        let ok = Settings::from_env(env.with_local_locations("/tmp/s")).unwrap();
        let url = "amqps://ann:p%40ss%3Aword%2F@b-1.mq.us-east-1.amazonaws.com:5671/%2F".to_owned();
        assert_eq!(ok.destination, Destination::RabbitMq { url, queue: "records".into() });
    }
}
