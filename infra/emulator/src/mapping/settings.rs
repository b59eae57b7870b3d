//! The event source mapping's settings: read from the template, overridden by flags, and
//! checked against the ranges AWS enforces (`CreateEventSourceMapping` refuses the same values,
//! with the same wording: "Value 'x' at 'batchSize' failed to satisfy constraint: ...").
use std::time::Duration;

use serde_json::Value;

use crate::template::{Template, TemplateError, scalar};

/// Where a new shard starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StartingPosition {
    /// The oldest record kept.
    TrimHorizon,
    /// Only records written after the mapping starts.
    Latest,
    /// Records from this time (unix seconds) on.
    AtTimestamp(f64),
}

impl std::fmt::Display for StartingPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartingPosition::TrimHorizon => f.write_str("TRIM_HORIZON"),
            StartingPosition::Latest => f.write_str("LATEST"),
            StartingPosition::AtTimestamp(t) => write!(f, "AT_TIMESTAMP {t}"),
        }
    }
}

/// Where failed or expired batches go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// An SQS queue (ARN): the failure record, no records.
    Sqs(String),
    /// An S3 bucket (ARN): the failure record with the invocation payload.
    S3(String),
    /// An SNS topic (ARN): the failure record as the message.
    Sns(String),
    /// A Lambda function (ARN; async invoke only): invoked with the record as its event.
    Lambda(String),
    /// An EventBridge event bus (ARN; async invoke only): the record as an event's `detail`.
    EventBridge(String),
    /// A topic on the source's own cluster (`kafka://TOPIC`; Kafka mappings only): one message
    /// per failed record, keyed as the record.
    Kafka(String),
}

impl Destination {
    /// From a destination ARN: an SQS queue, SNS topic or S3 bucket, the types AWS allows.
    pub fn from_arn(arn: &str) -> Result<Self, InvalidSetting> {
        match arn.split(':').nth(2) {
            Some("sqs") => Ok(Destination::Sqs(arn.to_owned())),
            Some("s3") => Ok(Destination::S3(arn.to_owned())),
            Some("sns") => Ok(Destination::Sns(arn.to_owned())),
            _ => Err(InvalidSetting(format!(
                "Value '{arn}' at 'destinationConfig.onFailure.destination' failed to satisfy constraint: \
                 Member must be an SQS queue, SNS topic or S3 bucket ARN"
            ))),
        }
    }

    /// An asynchronous invocation's destination: also a Lambda function or an EventBridge event
    /// bus. AWS (invocation-async-retain-records): "Amazon SQS – A standard SQS queue; Amazon SNS –
    /// A standard SNS topic; Amazon S3 – An Amazon S3 bucket (on failure only); AWS Lambda – A
    /// Lambda function; Amazon EventBridge – An EventBridge event bus".
    pub fn from_async_arn(arn: &str) -> Result<Self, InvalidSetting> {
        let service = arn.split(':').nth(2);
        match service {
            Some("lambda") if arn.split(':').nth(5) == Some("function") => Ok(Destination::Lambda(arn.to_owned())),
            Some("events") if arn.split(':').nth(5).is_some_and(|r| r.starts_with("event-bus/")) => {
                Ok(Destination::EventBridge(arn.to_owned()))
            }
            Some("sqs" | "s3" | "sns") => Self::from_arn(arn),
            _ => Err(InvalidSetting(format!(
                "Value '{arn}' at 'destinationConfig.onFailure.destination' failed to satisfy constraint: \
                 Member must be an SQS queue, SNS topic, S3 bucket, Lambda function or EventBridge event bus ARN"
            ))),
        }
    }

    /// The ARN.
    pub fn arn(&self) -> &str {
        match self {
            Destination::Sqs(a)
            | Destination::S3(a)
            | Destination::Sns(a)
            | Destination::Lambda(a)
            | Destination::EventBridge(a)
            | Destination::Kafka(a) => a,
        }
    }
}

/// `ProvisionedPollerConfig` as `MIN,MAX` (empty fields take AWS's defaults, 1 and 200):
/// API_ProvisionedPollerConfig, "MinimumPollers ... Valid Range: Minimum value of 1. Maximum value
/// of 200."; "MaximumPollers ... Valid Range: Minimum value of 1. Maximum value of 2000."; and
/// (kafka-scaling-modes) "MaximumPollers must be greater than or equal to MinimumPollers".
fn provisioned_pollers(text: Option<&str>) -> Result<Option<(u32, u32)>, InvalidSetting> {
    let Some(text) = text.map(str::trim).filter(|t| !t.is_empty()) else { return Ok(None) };
    let (min, max) = text.split_once(',').unwrap_or((text, ""));
    let number = |v: &str, field: &str, default: u32, top: u32| -> Result<u32, InvalidSetting> {
        let v = v.trim();
        let n = if v.is_empty() {
            default
        } else {
            v.parse().map_err(|_| constraint(v, field, "Member must be an integer"))?
        };
        if !(1..=top).contains(&n) {
            return Err(constraint(n, field, &format!("Member must have value between 1 and {top}")));
        }
        Ok(n)
    };
    let min = number(min, "provisionedPollerConfig.minimumPollers", 1, 200)?;
    let max = number(max, "provisionedPollerConfig.maximumPollers", 200, 2000)?;
    if max < min {
        return Err(InvalidSetting(format!(
            "MaximumPollers ({max}) must be greater than or equal to MinimumPollers ({min})"
        )));
    }
    Ok(Some((min, max)))
}

/// Where a Kafka mapping reads: the `SelfManagedEventSource` (or MSK cluster) and topic of a
/// `SelfManagedKafka` / `MSK` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSource {
    /// `KAFKA_BOOTSTRAP_SERVERS`: `host:port`, 1 to 10 of them.
    pub bootstrap_servers: Vec<String>,
    /// The topic (a mapping reads one: `Topics` has exactly one member).
    pub topic: String,
    /// `ConsumerGroupId`; `None`: the mapping's UUID.
    pub consumer_group_id: Option<String>,
    /// An MSK cluster's ARN (the event says `aws:kafka` and carries it); `None`: self-managed.
    pub cluster_arn: Option<String>,
}

/// An Amazon MQ for RabbitMQ event source: the broker and the queue (AWS's `Queues`, one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RabbitMqSource {
    /// `amqp[s]://USER:PASS@HOST:PORT/VHOST`: AWS's broker endpoint with the `BASIC_AUTH` secret's
    /// credentials and the `VIRTUAL_HOST`.
    pub url: String,
    /// The queue.
    pub queue: String,
    /// The Amazon MQ broker's ARN (the event's `eventSourceArn`); `None`: a name of ours.
    pub broker_arn: Option<String>,
}

impl RabbitMqSource {
    /// The URL's scheme, user information (if any), host and port, and path (if any).
    fn parts(&self) -> (&str, Option<&str>, &str, Option<&str>) {
        let (scheme, rest) = self.url.split_once("://").unwrap_or(("", self.url.as_str()));
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (rest, None),
        };
        // The user information ends at the authority's last `@` (a password may hold one).
        match authority.rsplit_once('@') {
            Some((user, host)) => (scheme, Some(user), host, path),
            None => (scheme, None, authority, path),
        }
    }

    /// The virtual host the URL names, percent-decoded, as AMQP's URI rules read it: no path is
    /// the default `/`; an empty path (`amqp://host/`) the empty name.
    pub fn vhost(&self) -> String {
        match self.parts().3 {
            None => "/".to_owned(),
            Some(v) => {
                let v = v.split(['?', '#']).next().unwrap_or(v);
                percent_encoding::percent_decode_str(v).decode_utf8_lossy().into_owned()
            }
        }
    }

    /// `scheme://host:port`: the broker without credentials or virtual host.
    pub fn endpoint(&self) -> String {
        let (scheme, _, host, _) = self.parts();
        format!("{scheme}://{host}")
    }

    /// The user name and password the URL carries, percent-decoded.
    pub fn credentials(&self) -> (String, String) {
        let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
        match self.parts().1 {
            Some(u) => u.split_once(':').map_or((decode(u), String::new()), |(u, p)| (decode(u), decode(p))),
            None => (String::new(), String::new()),
        }
    }

    /// The URL without its password, for logs and errors.
    pub fn redacted(&self) -> String {
        pushpull::pull::rabbitmq::redacted(&self.url)
    }

    /// The mapping's `EventSourceArn`: the broker's ARN, or for a broker that has none a name of
    /// ours built from its host and port.
    pub fn event_source_arn(&self) -> String {
        self.broker_arn.clone().unwrap_or_else(|| {
            let host = self.parts().2.replace([':', '.'], "-");
            format!("arn:aws:mq:{}:{}:broker:local:b-{host}", crate::localstack::REGION, crate::localstack::ACCOUNT)
        })
    }

    /// AWS's constraints: an `amqp://` or `amqps://` URL (Amazon MQ's brokers take `amqps://`
    /// only; TLS with the system's root certificates), a queue of 1 to 1,000 characters (API
    /// CreateEventSourceMapping, Queues: "Length Constraints: Minimum length of 1. Maximum length of
    /// 1000.").
    pub fn check(&self) -> Result<(), InvalidSetting> {
        if !self.url.starts_with("amqp://") && !self.url.starts_with("amqps://") {
            return Err(InvalidSetting(format!(
                "the RabbitMQ URL {} is not amqp[s]://USER:PASS@HOST:PORT/VHOST",
                self.redacted()
            )));
        }
        if self.queue.is_empty() || self.queue.len() > 1000 {
            return Err(constraint(&self.queue, "queues", "Member must have length between 1 and 1000"));
        }
        Ok(())
    }
}

/// An SQS event source: the queue as `GetQueueAttributes` describes it
/// ([`crate::mapping::sqs::describe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqsSource {
    /// The queue's URL (what SQS's calls take).
    pub queue_url: String,
    /// The queue's ARN (the mapping's `EventSourceArn`, the records' `eventSourceARN`).
    pub queue_arn: String,
    /// The queue's `VisibilityTimeout`: how long a received message stays hidden.
    pub visibility_timeout: Duration,
    /// The queue's redrive policy (`maxReceiveCount` and dead-letter queue), if it has one: SQS's
    /// own, carried out by SQS.
    pub redrive_policy: Option<String>,
    /// `WaitTimeSeconds` of the pollers' `ReceiveMessage`: 20, long polling, as AWS's pollers do;
    /// 0 (short polling) only to measure what long polling saves. Not an AWS setting.
    pub wait_time_seconds: u8,
}

impl SqsSource {
    /// A FIFO queue (its name ends in `.fifo`).
    pub fn is_fifo(&self) -> bool {
        self.queue_arn.ends_with(".fifo")
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        self.queue_arn.rsplit(':').next().unwrap_or_default()
    }
}

/// A Redis stream read by a consumer group (`pushpull_local::mapping::redis_streams`): not an AWS
/// source; its settings are ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisStreamSource {
    /// `redis://host:port/db`.
    pub url: String,
    /// The stream's key.
    pub stream: String,
    /// The consumer group (created at the stream's start, or its end with `StartingPosition:
    /// LATEST`, if it does not exist; the stream too).
    pub group: String,
    /// This mapping's consumer name within the group.
    pub consumer: String,
    /// An entry pending this long with another consumer (one that died) is claimed
    /// (`XAUTOCLAIM`); and a failed entry of this mapping's comes back after it.
    pub claim_idle: Duration,
    /// Deliveries of an entry before it is moved to [`RedisStreamSource::dead_letter`].
    pub max_deliveries: u64,
    /// `BLOCK` of each `XREADGROUP`: how long one read waits for new entries.
    pub block: Duration,
}

impl RedisStreamSource {
    /// The stream the entries delivered `max_deliveries` times go to: `<stream>:dead-letter`.
    pub fn dead_letter(&self) -> String {
        format!("{}:dead-letter", self.stream)
    }

    /// `redis://host:port` without credentials.
    pub fn redacted(&self) -> String {
        let rest = self.url.split_once("://").map_or(self.url.as_str(), |(_, r)| r);
        let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        format!("redis://{}", host.trim_end_matches('/'))
    }

    /// The mapping's `EventSourceArn`: ours, `pushpull:redis:<host:port/db>:<stream>` (Redis has
    /// no ARN).
    pub fn event_source_arn(&self) -> String {
        format!("pushpull:redis:{}:{}", self.redacted().trim_start_matches("redis://"), self.stream)
    }
}

/// A function's event of one of the wanted types, found in the template.
struct FoundEvent {
    /// The function's logical id.
    id: String,
    /// The function's `Properties`.
    props: Value,
    /// The event's `Type`.
    kind: String,
    /// `<function>.Events.<event>`, for errors.
    at: String,
    /// The event's `Properties`, resolved.
    resolved: Value,
}

impl FoundEvent {
    /// The function's name: its `FunctionName`, else the name the template gives its id.
    fn function_name(&self, t: &Template) -> Result<String, TemplateError> {
        let name = t.resolve(&self.props["FunctionName"], &self.id)?;
        Ok(scalar(&name).unwrap_or_else(|| t.name_of(&self.id)))
    }
}

/// The first event whose `Type` is one of `kinds`, of a function the template creates
/// (`function`: that logical id only).
fn first_event(t: &Template, function: Option<&str>, kinds: &[&str]) -> Result<Option<FoundEvent>, TemplateError> {
    for (id, r) in t.resources_of("AWS::Serverless::Function") {
        if function.is_some_and(|f| f != id) || !t.is_created(id)? {
            continue;
        }
        let props = &r["Properties"];
        for (name, event) in props["Events"].as_object().into_iter().flatten() {
            let kind = event["Type"].as_str().unwrap_or_default();
            if !kinds.contains(&kind) {
                continue;
            }
            let at = format!("{id}.Events.{name}");
            let resolved = t.resolve(&event["Properties"], &at)?;
            return Ok(Some(FoundEvent { id: id.clone(), props: props.clone(), kind: kind.to_owned(), at, resolved }));
        }
    }
    Ok(None)
}

/// What a SAM `MQ` event names: AWS's `Broker`, `Queues` (one) and `SourceAccessConfigurations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqEvent {
    /// The broker's ARN.
    pub broker_arn: String,
    /// The queue.
    pub queue: String,
    /// `BASIC_AUTH`: the Secrets Manager secret with the broker user's `username` and `password`.
    pub secret_arn: Option<String>,
    /// `VIRTUAL_HOST` (AWS's default: `/`).
    pub virtual_host: Option<String>,
}

impl MqEvent {
    /// The source at `endpoint` (`amqp[s]://host:port`), with the secret's credentials and the
    /// virtual host, each percent-encoded into the URL.
    pub fn source(&self, endpoint: &str, username: &str, password: &str) -> RabbitMqSource {
        let enc = |s: &str| percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string();
        let (scheme, host) = endpoint.split_once("://").unwrap_or(("amqp", endpoint));
        let vhost = self.virtual_host.as_deref().unwrap_or("/");
        RabbitMqSource {
            url: format!(
                "{scheme}://{}:{}@{}/{}",
                enc(username),
                enc(password),
                host.trim_end_matches('/'),
                enc(vhost)
            ),
            queue: self.queue.clone(),
            broker_arn: Some(self.broker_arn.clone()).filter(|a| !a.is_empty()),
        }
    }
}

impl KafkaSource {
    /// The identity of the source (the mapping's `EventSourceArn`): the cluster's ARN for MSK; for
    /// a self-managed cluster, which has none, a name of ours built from its servers and topic.
    pub fn event_source_arn(&self) -> String {
        match &self.cluster_arn {
            Some(arn) => format!("{arn}#{}", self.topic),
            None => format!(
                "arn:aws:kafka:{}:{}:self-managed/{}/{}",
                crate::localstack::REGION,
                crate::localstack::ACCOUNT,
                self.bootstrap_servers.join(","),
                self.topic
            ),
        }
    }

    /// AWS's constraints on the source: 1 to 10 servers (API_SelfManagedEventSource: "Array
    /// Members: Minimum number of 1 item. Maximum number of 10 items."), a topic of 1 to 249
    /// characters (API_CreateEventSourceMapping, Topics: "Length Constraints: Minimum length of 1.
    /// Maximum length of 249. Pattern: `^[^.]([a-zA-Z0-9\-_.]+)`"), and a ConsumerGroupId of 1 to
    /// 200 characters of `[a-zA-Z0-9-\/*:_+=.@-]` (API_AmazonManagedKafkaEventSourceConfig).
    pub fn check(&self) -> Result<(), InvalidSetting> {
        let n = self.bootstrap_servers.len();
        if n == 0 || n > 10 {
            return Err(constraint(
                self.bootstrap_servers.join(","),
                "selfManagedEventSource.endpoints.KAFKA_BOOTSTRAP_SERVERS",
                "Member must have length between 1 and 10",
            ));
        }
        if let Some(bad) = self
            .bootstrap_servers
            .iter()
            .find(|s| s.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err()))
        {
            return Err(constraint(bad, "KAFKA_BOOTSTRAP_SERVERS", "Member must be host:port"));
        }
        let t = &self.topic;
        let topic_ok = !t.is_empty()
            && t.len() <= 249
            && !t.starts_with('.')
            && t.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !topic_ok {
            return Err(constraint(
                t,
                "topics",
                "Member must satisfy regular expression pattern: ^[^.]([a-zA-Z0-9\\-_.]+)",
            ));
        }
        if let Some(g) = &self.consumer_group_id {
            let ok = !g.is_empty()
                && g.len() <= 200
                && g.chars().all(|c| c.is_ascii_alphanumeric() || "-/*:_+=.@".contains(c));
            if !ok {
                return Err(constraint(
                    g,
                    "consumerGroupId",
                    "Member must satisfy regular expression pattern: [a-zA-Z0-9-\\/*:_+=.@-]*",
                ));
            }
        }
        Ok(())
    }

    /// `records` keys and the failure records' `recordsInfo` name a partition `topic-N`.
    pub fn partition_name(&self, partition: i32) -> String {
        format!("{}-{partition}", self.topic)
    }
}

/// A setting AWS would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("InvalidParameterValueException: {0}")]
pub struct InvalidSetting(pub String);

/// Settings of one Kinesis event source mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct MappingSettings {
    /// Stream ARN.
    pub stream_arn: String,
    /// The stream consumer's ARN when the event source is one (enhanced fan-out: the mapping
    /// reads with `SubscribeToShard`); `None` reads with GetRecords (standard polling).
    pub consumer_arn: Option<String>,
    /// Function name (for the Invoke API) and its ARN (for failure records).
    pub function_name: String,
    /// 1..=10000.
    pub batch_size: u32,
    /// 0..=300 s.
    pub batching_window: Duration,
    /// Where shards start when no checkpoint says otherwise.
    pub starting_position: StartingPosition,
    /// 1..=10.
    pub parallelization_factor: u32,
    /// Split a failing batch in two.
    pub bisect_on_error: bool,
    /// -1 (forever) or 0..=10000.
    pub maximum_retry_attempts: i64,
    /// -1 (forever) or 60..=604800 s.
    pub maximum_record_age: Option<Duration>,
    /// `FunctionResponseTypes: [ReportBatchItemFailures]`.
    pub report_batch_item_failures: bool,
    /// 0 (none) ..= 900 s.
    pub tumbling_window: Option<Duration>,
    /// The OnFailure destination.
    pub on_failure: Option<Destination>,
    /// `FilterCriteria` ([`super::filter`]): records no filter matches are not invoked.
    pub filter: super::filter::FilterCriteria,
    /// `Enabled: false`: the mapping exists but reads nothing (state `Disabled`).
    pub enabled: bool,
    /// `MetricsConfig: {Metrics: [EventCount]}`: the event-count metrics are published.
    pub event_count_metrics: bool,
    /// A Kafka mapping's provisioned mode: `(MinimumPollers, MaximumPollers)`; `None`: on-demand.
    pub provisioned_pollers: Option<(u32, u32)>,
    /// An SQS mapping's `ScalingConfig.MaximumConcurrency` (2 to 1,000); `None`: the function's
    /// concurrency is the only bound.
    pub maximum_concurrency: Option<u32>,
}

impl MappingSettings {
    /// Invocations the mapping may have in flight at once, over all its partitions. AWS
    /// (kafka-scaling-modes.html): "each event poller can handle up to 5 MB/sec of throughput or
    /// up to 5 concurrent invocations", and "to maintain ordered processing within partitions,
    /// Lambda caps the MaximumPollers to the number of partitions in the topic". So in provisioned
    /// mode 5 × MaximumPollers (the partition cap is the lanes' own: one batch of a partition at a
    /// time). On-demand, AWS's number of pollers is its own ("a default number of event pollers",
    /// scaled "based on message load"): no cap beyond one batch per partition. Pollers' 5 MB/s
    /// is not modelled.
    pub fn invocation_slots(&self) -> Option<usize> {
        self.provisioned_pollers.map(|(_, max)| 5 * max as usize)
    }

    /// The mapping's identifier (`EventSourceMappingUUID`): the same for a restarted runner of
    /// the same mapping, so it resumes where it stopped and its metrics name one mapping, as AWS's
    /// UUID does; another for what CloudFormation would replace with a new mapping (AWS::Lambda::
    /// EventSourceMapping: `EventSourceArn`, `StartingPosition` and `StartingPositionTimestamp`
    /// "Update requires: Replacement"): another stream, polling against enhanced fan-out (the
    /// stream's ARN against the consumer's), another starting position. The function is part of it
    /// too: locally a mapping for another function is another mapping.
    pub fn uuid(&self) -> String {
        let identity = format!("{}\n{}\n{}", self.function_name, self.event_source_arn(), self.starting_position);
        let h = xxhash_rust::xxh3::xxh3_128(identity.as_bytes());
        let x = format!("{h:032x}");
        format!("{}-{}-{}-{}-{}", &x[..8], &x[8..12], &x[12..16], &x[16..20], &x[20..])
    }

    /// Writes the mapping's event-count metrics (`AWS/Lambda`, dimension
    /// `EventSourceMappingUUID`) to the run's metric log ([`crate::cloudwatch`]).
    ///
    /// AWS (monitoring-metrics-types, "Event source mapping metrics"): "You must opt-in the
    /// metric group to receive metrics related metrics. for example set EventCount in metrics
    /// config" (sic): without `MetricsConfig: {Metrics: [EventCount]}` none is written.
    pub fn event_counts(&self, metrics: &[(&str, u64)]) {
        if !self.event_count_metrics {
            return;
        }
        let values: Vec<(&str, &str, f64)> =
            metrics.iter().filter(|(_, n)| *n > 0).map(|(name, n)| (*name, "Count", *n as f64)).collect();
        if !values.is_empty() {
            crate::cloudwatch::put(crate::cloudwatch::LAMBDA, &[("EventSourceMappingUUID", &self.uuid())], &values);
        }
    }
}

fn constraint(value: impl std::fmt::Display, field: &str, rule: &str) -> InvalidSetting {
    InvalidSetting(format!(
        "1 validation error detected: Value '{value}' at '{field}' failed to satisfy constraint: {rule}"
    ))
}

fn range(v: i64, field: &str, lo: i64, hi: i64) -> Result<(), InvalidSetting> {
    if v < lo {
        return Err(constraint(v, field, &format!("Member must have value greater than or equal to {lo}")));
    }
    if v > hi {
        return Err(constraint(v, field, &format!("Member must have value less than or equal to {hi}")));
    }
    Ok(())
}

/// The raw settings as the template or flags give them (all text, as CloudFormation passes them).
#[derive(Debug, Clone, Default)]
pub struct RawSettings {
    /// Stream ARN.
    pub stream: Option<String>,
    /// Function name.
    pub function: Option<String>,
    /// `BatchSize`.
    pub batch_size: Option<String>,
    /// `MaximumBatchingWindowInSeconds`.
    pub batching_window: Option<String>,
    /// `StartingPosition`.
    pub starting_position: Option<String>,
    /// `StartingPositionTimestamp`.
    pub starting_position_timestamp: Option<String>,
    /// `ParallelizationFactor`.
    pub parallelization_factor: Option<String>,
    /// `BisectBatchOnFunctionError`.
    pub bisect: Option<String>,
    /// `MaximumRetryAttempts`.
    pub maximum_retry_attempts: Option<String>,
    /// `MaximumRecordAgeInSeconds`.
    pub maximum_record_age: Option<String>,
    /// `FunctionResponseTypes` (comma-separated).
    pub function_response_types: Option<String>,
    /// `TumblingWindowInSeconds`.
    pub tumbling_window: Option<String>,
    /// `DestinationConfig.OnFailure.Destination` ("" removes it).
    pub on_failure: Option<String>,
    /// `FilterCriteria` as JSON (`{"Filters": [{"Pattern": "..."}]}`; `{}` removes it).
    pub filter_criteria: Option<String>,
    /// `Enabled` (default true).
    pub enabled: Option<String>,
    /// `MetricsConfig.Metrics` (comma-separated: `EventCount`; "" for none).
    pub metrics: Option<String>,
    /// `ProvisionedPollerConfig` (Kafka) as `MIN,MAX` pollers; "" for on-demand mode.
    pub provisioned_pollers: Option<String>,
    /// `ScalingConfig.MaximumConcurrency` (SQS): 2 to 1,000; "" for none.
    pub maximum_concurrency: Option<String>,
}

impl RawSettings {
    /// Fills every field `other` sets (flags over the template).
    pub fn overlay(mut self, other: RawSettings) -> RawSettings {
        macro_rules! take {
            ($($f:ident),*) => { $( if other.$f.is_some() { self.$f = other.$f; } )* };
        }
        take!(
            stream,
            function,
            batch_size,
            batching_window,
            starting_position,
            starting_position_timestamp,
            parallelization_factor,
            bisect,
            maximum_retry_attempts,
            maximum_record_age,
            function_response_types,
            tumbling_window,
            on_failure,
            filter_criteria,
            enabled,
            metrics,
            provisioned_pollers,
            maximum_concurrency
        );
        self
    }

    /// The Kinesis mapping of `function` (a logical id; the first function with one if `None`)
    /// in `template`: a `Type: Kinesis` event of a serverless function, or an
    /// `AWS::Lambda::EventSourceMapping` whose source is a stream.
    pub fn from_template(t: &Template, function: Option<&str>) -> Result<RawSettings, TemplateError> {
        let err = |reason: String| TemplateError::Resolve { at: "Resources".into(), reason };
        if let Some(found) = first_event(t, function, &["Kinesis"])? {
            let mut raw = Self::from_properties(&found.resolved);
            raw.stream = found.resolved.get("Stream").and_then(scalar);
            raw.function = Some(found.function_name(t)?);
            return Ok(raw);
        }
        for (id, r) in t.resources_of("AWS::Lambda::EventSourceMapping") {
            let p = t.resolve(&r["Properties"], id)?;
            let source = p.get("EventSourceArn").and_then(scalar).unwrap_or_default();
            if !source.contains(":kinesis:") {
                continue;
            }
            let f = p.get("FunctionName").and_then(scalar).unwrap_or_default();
            if function.is_some_and(|want| !f.ends_with(want)) {
                continue;
            }
            let mut raw = Self::from_properties(&p);
            raw.stream = Some(source);
            raw.function = Some(f.rsplit(':').next().unwrap_or_default().to_owned());
            return Ok(raw);
        }
        Err(err(match function {
            Some(f) => format!("function {f} has no Kinesis event source in the template"),
            None => "no function in the template has a Kinesis event source".to_owned(),
        }))
    }

    /// The template's Kafka mapping, if a function whose resource is created has a
    /// `SelfManagedKafka` or `MSK` event (`function`: that function's logical id only): its
    /// settings as for a Kinesis event, and the cluster and topic. `KafkaBootstrapServers` and
    /// `Topics` are lists (one topic per mapping, as AWS allows); an `MSK` event's `Stream` is the
    /// cluster's ARN and its servers are `KAFKA_BOOTSTRAP_SERVERS` of the environment.
    pub fn from_template_kafka(
        t: &Template,
        function: Option<&str>,
    ) -> Result<Option<(RawSettings, KafkaSource)>, TemplateError> {
        let err = |at: &str, reason: String| TemplateError::Resolve { at: at.to_owned(), reason };
        let Some(found) = first_event(t, function, &["SelfManagedKafka", "MSK"])? else { return Ok(None) };
        let (kind, at, p) = (found.kind.as_str(), &found.at, &found.resolved);
        let list = |k: &str| -> Vec<String> {
            match p.get(k) {
                Some(Value::Array(a)) => a.iter().filter_map(scalar).collect(),
                Some(v) => scalar(v).map(|s| s.split(',').map(|x| x.trim().to_owned()).collect()).unwrap_or_default(),
                None => Vec::new(),
            }
        };
        let topics = list("Topics");
        let [topic] = topics.as_slice() else {
            return Err(err(at, format!("Topics must name one topic (AWS takes one per mapping), not {topics:?}")));
        };
        let (bootstrap_servers, cluster_arn) = match kind {
            "MSK" => {
                let servers = std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_default();
                (
                    servers.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect(),
                    p.get("Stream").and_then(scalar),
                )
            }
            _ => (list("KafkaBootstrapServers"), None),
        };
        let mut raw = Self::from_properties(p);
        raw.function = Some(found.function_name(t)?);
        let source = KafkaSource {
            bootstrap_servers,
            topic: topic.clone(),
            consumer_group_id: p.get("ConsumerGroupId").and_then(scalar).filter(|g| !g.is_empty()),
            cluster_arn,
        };
        Ok(Some((raw, source)))
    }

    /// The first `MQ` event of a function the template creates (`function`: that one only): its
    /// settings and what it names (broker, queue, BASIC_AUTH secret, virtual host). The broker's
    /// address and the secret's credentials are the caller's to find ([`MqEvent::source`]).
    pub fn from_template_mq(
        t: &Template,
        function: Option<&str>,
    ) -> Result<Option<(RawSettings, MqEvent)>, TemplateError> {
        let err = |at: &str, reason: String| TemplateError::Resolve { at: at.to_owned(), reason };
        let Some(found) = first_event(t, function, &["MQ"])? else { return Ok(None) };
        let (at, p) = (&found.at, &found.resolved);
        let queues: Vec<String> = match p.get("Queues") {
            Some(Value::Array(a)) => a.iter().filter_map(scalar).collect(),
            _ => Vec::new(),
        };
        let [queue] = queues.as_slice() else {
            return Err(err(at, format!("Queues must name one queue (AWS takes one per mapping), not {queues:?}")));
        };
        let mut event = MqEvent {
            broker_arn: p.get("Broker").and_then(scalar).unwrap_or_default(),
            queue: queue.clone(),
            secret_arn: None,
            virtual_host: None,
        };
        for c in p.get("SourceAccessConfigurations").and_then(Value::as_array).into_iter().flatten() {
            match (c.get("Type").and_then(scalar).as_deref(), c.get("URI").and_then(scalar)) {
                (Some("BASIC_AUTH"), uri) => event.secret_arn = uri,
                (Some("VIRTUAL_HOST"), uri) => event.virtual_host = uri,
                (other, _) => {
                    return Err(err(
                        at,
                        format!("SourceAccessConfigurations: {other:?} is not BASIC_AUTH or VIRTUAL_HOST"),
                    ));
                }
            }
        }
        let mut raw = Self::from_properties(p);
        raw.function = Some(found.function_name(t)?);
        Ok(Some((raw, event)))
    }

    /// The first `SQS` event of a function the template creates (`function`: that one only): its
    /// settings, the queue it names (an ARN) and the function's timeout (which the queue's
    /// visibility timeout must not be shorter than).
    pub fn from_template_sqs(
        t: &Template,
        function: Option<&str>,
    ) -> Result<Option<(RawSettings, String, Duration)>, TemplateError> {
        let Some(found) = first_event(t, function, &["SQS"])? else { return Ok(None) };
        let p = &found.resolved;
        let queue = p.get("Queue").and_then(scalar).ok_or_else(|| TemplateError::Resolve {
            at: found.at.clone(),
            reason: "an SQS event needs Queue (the queue's ARN)".into(),
        })?;
        let timeout =
            t.functions()?.into_iter().find(|f| f.logical_id == found.id).map_or(Duration::from_secs(3), |f| f.timeout);
        let mut raw = Self::from_properties(p);
        raw.function = Some(found.function_name(t)?);
        Ok(Some((raw, queue, timeout)))
    }

    fn from_properties(p: &Value) -> RawSettings {
        let get = |k: &str| p.get(k).and_then(scalar);
        RawSettings {
            stream: None,
            function: None,
            batch_size: get("BatchSize"),
            batching_window: get("MaximumBatchingWindowInSeconds"),
            starting_position: get("StartingPosition"),
            starting_position_timestamp: get("StartingPositionTimestamp"),
            parallelization_factor: get("ParallelizationFactor"),
            bisect: get("BisectBatchOnFunctionError"),
            maximum_retry_attempts: get("MaximumRetryAttempts"),
            maximum_record_age: get("MaximumRecordAgeInSeconds"),
            function_response_types: p
                .get("FunctionResponseTypes")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(scalar).collect::<Vec<_>>().join(",")),
            tumbling_window: get("TumblingWindowInSeconds"),
            on_failure: p.pointer("/DestinationConfig/OnFailure/Destination").and_then(scalar),
            filter_criteria: p.get("FilterCriteria").map(Value::to_string),
            enabled: get("Enabled"),
            metrics: p
                .pointer("/MetricsConfig/Metrics")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(scalar).collect::<Vec<_>>().join(",")),
            provisioned_pollers: p.get("ProvisionedPollerConfig").map(|c| {
                let n = |k: &str| c.get(k).and_then(scalar).unwrap_or_default();
                format!("{},{}", n("MinimumPollers"), n("MaximumPollers"))
            }),
            maximum_concurrency: p.pointer("/ScalingConfig/MaximumConcurrency").and_then(scalar),
        }
    }

    /// Checks everything as `CreateEventSourceMapping` would and applies AWS's defaults.
    pub fn validate(self) -> Result<MappingSettings, InvalidSetting> {
        if self.provisioned_pollers.as_deref().is_some_and(|p| !p.trim().is_empty()) {
            return Err(InvalidSetting(
                "ProvisionedPollerConfig is a setting of Kafka event sources (MSK and self-managed), not of a stream"
                    .into(),
            ));
        }
        let source = self.stream.clone().filter(|s| !s.is_empty()).ok_or_else(|| {
            InvalidSetting("an event source (stream ARN) is required: --stream, or Stream in the template".into())
        })?;
        if !source.starts_with("arn:") || !source.contains(":kinesis:") || !source.contains(":stream/") {
            return Err(constraint(
                &source,
                "eventSourceArn",
                "Member must be a Kinesis stream or stream consumer ARN",
            ));
        }
        // A consumer's ARN is its stream's ARN, "/consumer/", its name, ":", its creation time.
        let (stream_arn, consumer_arn) = match source.split_once("/consumer/") {
            Some((stream, consumer)) if !consumer.is_empty() => (stream.to_owned(), Some(source.clone())),
            Some(_) => {
                return Err(constraint(&source, "eventSourceArn", "Member must be a Kinesis stream consumer ARN"));
            }
            None => (source, None),
        };
        self.common(stream_arn, consumer_arn, Duration::ZERO)
    }

    /// The settings of a Kafka mapping reading `source` (MSK or self-managed): AWS's ranges, a
    /// 500 ms batching window by default, and no Kinesis-only setting.
    ///
    /// AWS (API_CreateEventSourceMapping, MaximumBatchingWindowInSeconds): "For Amazon MSK,
    /// Self-managed Apache Kafka, Amazon MQ, and DocumentDB event sources, the default batching
    /// window is 500 ms." ParallelizationFactor and TumblingWindowInSeconds are documented for
    /// Kinesis and DynamoDB streams only: a Kafka mapping refuses them, as this one does.
    pub fn validate_kafka(self, source: &KafkaSource) -> Result<MappingSettings, InvalidSetting> {
        for (value, name) in [
            (&self.parallelization_factor, "ParallelizationFactor"),
            (&self.tumbling_window, "TumblingWindowInSeconds"),
        ] {
            if value.as_deref().map(str::trim).is_some_and(|v| !v.is_empty() && v != "0" && v != "1") {
                return Err(InvalidSetting(format!(
                    "{name} is a setting of Kinesis and DynamoDB streams, not of a Kafka event source"
                )));
            }
        }
        source.check()?;
        let mut raw = self;
        raw.parallelization_factor = None;
        raw.tumbling_window = None;
        // A Kafka mapping may also fail to a topic of its cluster (API OnFailure, Destination:
        // "kafka://..."); AWS (kafka-on-failure-destination.html): "Lambda prevents infinite loops
        // by blocking configurations where the source and destination topics are the same."
        let on_failure = raw.on_failure.clone();
        let dead_letter_topic = match on_failure.as_deref().map(str::trim) {
            Some(d) if d.starts_with("kafka://") => {
                let topic = &d["kafka://".len()..];
                KafkaSource { topic: topic.to_owned(), ..source.clone() }.check().map_err(|_| {
                    constraint(
                        d,
                        "destinationConfig.onFailure.destination",
                        "Member must be kafka://TOPIC of a valid topic name",
                    )
                })?;
                if topic == source.topic {
                    return Err(InvalidSetting(format!(
                        "the on-failure destination {d} is the source topic: Lambda blocks configurations where the source and destination topics are the same"
                    )));
                }
                raw.on_failure = None;
                Some(d.to_owned())
            }
            _ => None,
        };
        let pollers = raw.provisioned_pollers.take();
        let mut settings = raw.common(source.event_source_arn(), None, Duration::from_millis(500))?;
        settings.provisioned_pollers = provisioned_pollers(pollers.as_deref())?;
        if let Some(d) = dead_letter_topic {
            settings.on_failure = Some(Destination::Kafka(d));
        }
        // AWS (kafka-retry-configurations.html): "When you configure both infinite retries and an
        // on-failure destination, Lambda automatically applies a maximum of 10 retry attempts."
        if settings.maximum_retry_attempts < 0 && settings.on_failure.is_some() {
            settings.maximum_retry_attempts = 10;
        }
        Ok(settings)
    }

    /// The settings of an Amazon MQ for RabbitMQ mapping on `source`. AWS's Amazon MQ mappings
    /// have BatchSize (1-10,000, default 100), MaximumBatchingWindowInSeconds (default 500 ms),
    /// FilterCriteria and Enabled (services-mq-params.html); none of the streams' settings,
    /// StartingPosition, error-handling controls, partial batch responses or destinations (API
    /// CreateEventSourceMapping names each for other sources only): they are refused. A failed
    /// batch is retried [`crate::mapping::rabbitmq::RETRIES_BEFORE_REQUEUE`] times, then requeued.
    pub fn validate_rabbitmq(self, source: &RabbitMqSource) -> Result<MappingSettings, InvalidSetting> {
        self.refuse_stream_settings("an Amazon MQ event source", true, "")?;
        source.check()?;
        let raw = RawSettings {
            starting_position: Some("TRIM_HORIZON".into()),
            maximum_retry_attempts: Some(crate::mapping::rabbitmq::RETRIES_BEFORE_REQUEUE.to_string()),
            ..self
        };
        raw.common(source.event_source_arn(), None, Duration::from_millis(500))
    }

    /// The settings of a Redis Streams mapping (ours: AWS has no Redis source). A stream's
    /// settings as for Kinesis where they mean the same: BatchSize (1-10,000, default 100), the
    /// batching window, ParallelizationFactor (lanes by the entries' partition key), StartingPosition
    /// (`TRIM_HORIZON` default, `LATEST`: only when the group is created),
    /// MaximumRetryAttempts (retries in the poller before the entry is left pending, to come back
    /// after `claim_idle`; default 2), FunctionResponseTypes, FilterCriteria (on `data`);
    /// refused: tumbling windows, record age, bisection, destinations (the dead-letter stream
    /// stands for one), provisioned pollers.
    pub fn validate_redis_streams(self, source: &RedisStreamSource) -> Result<MappingSettings, InvalidSetting> {
        let set = |v: &Option<String>| v.as_deref().map(str::trim).is_some_and(|v| !v.is_empty());
        for (value, name) in [
            (&self.tumbling_window, "TumblingWindowInSeconds"),
            (&self.starting_position_timestamp, "StartingPositionTimestamp"),
            (&self.maximum_record_age, "MaximumRecordAgeInSeconds"),
            (&self.bisect, "BisectBatchOnFunctionError"),
            (&self.on_failure, "DestinationConfig"),
            (&self.provisioned_pollers, "ProvisionedPollerConfig"),
            (&self.maximum_concurrency, "ScalingConfig"),
        ] {
            if set(value) {
                let hint = if name == "DestinationConfig" {
                    format!(" (an entry delivered {} times goes to {})", source.max_deliveries, source.dead_letter())
                } else {
                    String::new()
                };
                return Err(InvalidSetting(format!("{name} is not a setting of a Redis Streams source{hint}")));
            }
        }
        if source.stream.is_empty() || source.group.is_empty() || source.consumer.is_empty() {
            return Err(InvalidSetting("a Redis Streams source needs a stream, a group and a consumer name".into()));
        }
        if source.max_deliveries == 0 {
            return Err(InvalidSetting("max deliveries must be at least 1".into()));
        }
        let starting_position = self.starting_position.clone().filter(|p| !p.trim().is_empty());
        if let Some(p) = &starting_position
            && !matches!(p.trim(), "TRIM_HORIZON" | "LATEST")
        {
            return Err(InvalidSetting(format!(
                "StartingPosition {p} is not one of a Redis Streams source's: TRIM_HORIZON, LATEST"
            )));
        }
        let raw = RawSettings {
            starting_position: Some(starting_position.unwrap_or_else(|| "TRIM_HORIZON".into())),
            maximum_retry_attempts: Some(
                self.maximum_retry_attempts.clone().filter(|m| !m.trim().is_empty()).unwrap_or_else(|| "2".into()),
            ),
            ..self
        };
        raw.common(source.event_source_arn(), None, Duration::ZERO)
    }

    /// Refuses what a queue's mapping (`kind`) does not have: the streams' settings, retries,
    /// record age, bisection, destinations, provisioned pollers, and with
    /// `refuse_response_types` partial batch responses; `destination_hint` follows a refused
    /// destination.
    fn refuse_stream_settings(
        &self,
        kind: &str,
        refuse_response_types: bool,
        destination_hint: &str,
    ) -> Result<(), InvalidSetting> {
        let set = |v: &Option<String>| v.as_deref().map(str::trim).is_some_and(|v| !v.is_empty());
        let response_types = if refuse_response_types { &self.function_response_types } else { &None };
        for (value, name) in [
            (&self.parallelization_factor, "ParallelizationFactor"),
            (&self.tumbling_window, "TumblingWindowInSeconds"),
            (&self.starting_position, "StartingPosition"),
            (&self.starting_position_timestamp, "StartingPositionTimestamp"),
            (&self.maximum_retry_attempts, "MaximumRetryAttempts"),
            (&self.maximum_record_age, "MaximumRecordAgeInSeconds"),
            (&self.bisect, "BisectBatchOnFunctionError"),
            (response_types, "FunctionResponseTypes"),
            (&self.on_failure, "DestinationConfig"),
            (&self.provisioned_pollers, "ProvisionedPollerConfig"),
        ] {
            if set(value) {
                let hint = if name == "DestinationConfig" { destination_hint } else { "" };
                return Err(InvalidSetting(format!("{name} is not a setting of {kind}{hint}")));
            }
        }
        Ok(())
    }

    /// The settings of an SQS mapping on `source`, for a function whose timeout is
    /// `function_timeout`: AWS's rules (services-sqs-parameters.html, with-sqs.html), each named in
    /// `docs/sqs-aws-rules.md`. BatchSize 1-10,000 (FIFO: 1-10), default 10, above 10 only with a
    /// batching window of at least 1 s; no batching window on a FIFO queue; the queue's visibility
    /// timeout not shorter than the function's timeout; `MaximumConcurrency` 2-1,000; none of
    /// the streams' settings. A failed message is not retried by the poller: it stays in the queue
    /// and comes back after its visibility timeout (MaximumRetryAttempts 0 in the core, and the
    /// source takes it back).
    pub fn validate_sqs(
        self,
        source: &SqsSource,
        function_timeout: Duration,
    ) -> Result<MappingSettings, InvalidSetting> {
        self.refuse_stream_settings(
            "an SQS event source",
            false,
            " (a failed message goes to the queue's own dead-letter queue, by its redrive policy)",
        )?;
        let fifo = source.is_fifo();
        let batch_size = match self.batch_size.as_deref().map(str::trim) {
            None | Some("") => 10,
            Some(b) => b.parse::<i64>().map_err(|_| constraint(b, "batchSize", "Member must be an integer"))?,
        };
        range(batch_size, "batchSize", 1, if fifo { 10 } else { 10_000 })?;
        let window = match self.batching_window.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(w) => Some(
                w.parse::<i64>()
                    .map_err(|_| constraint(w, "maximumBatchingWindowInSeconds", "Member must be an integer"))?,
            ),
        };
        if fifo && window.is_some() {
            return Err(InvalidSetting(
                "Batching window is not supported for FIFO queues (MaximumBatchingWindowInSeconds)".into(),
            ));
        }
        if batch_size > 10 && window.unwrap_or(0) < 1 {
            return Err(InvalidSetting(
                "Maximum batch window in seconds must be greater than 0 if maximum batch size is greater than 10"
                    .into(),
            ));
        }
        let maximum_concurrency = match self.maximum_concurrency.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(m) => {
                let m = m
                    .parse::<i64>()
                    .map_err(|_| constraint(m, "scalingConfig.maximumConcurrency", "Member must be an integer"))?;
                range(m, "scalingConfig.maximumConcurrency", 2, 1000)?;
                Some(m as u32)
            }
        };
        if function_timeout > source.visibility_timeout {
            return Err(InvalidSetting(format!(
                "Queue visibility timeout: {} seconds is less than Function timeout: {} seconds",
                source.visibility_timeout.as_secs(),
                function_timeout.as_secs()
            )));
        }
        // AWS (services-sqs-configure.html): "We recommend setting your queue's visibility timeout
        // to six times your function timeout, plus the value of MaximumBatchingWindowInSeconds."
        let advised = function_timeout * 6 + Duration::from_secs(window.unwrap_or(0).max(0) as u64);
        if source.visibility_timeout < advised {
            tracing::warn!(
                queue = source.name(),
                visibility_timeout = source.visibility_timeout.as_secs(),
                advised = advised.as_secs(),
                "the queue's visibility timeout is shorter than AWS advises (six times the function's timeout plus the batching window): a batch retried after a throttle may come back while it is still being worked on"
            );
        }
        let raw = RawSettings {
            batch_size: Some(batch_size.to_string()),
            starting_position: Some("TRIM_HORIZON".into()),
            maximum_retry_attempts: Some("0".into()),
            maximum_concurrency: None,
            ..self
        };
        let mut settings = raw.common(source.queue_arn.clone(), None, Duration::ZERO)?;
        settings.maximum_concurrency = maximum_concurrency;
        Ok(settings)
    }

    fn common(
        self,
        stream_arn: String,
        consumer_arn: Option<String>,
        default_window: Duration,
    ) -> Result<MappingSettings, InvalidSetting> {
        fn int(v: &Option<String>, field: &str, default: i64) -> Result<i64, InvalidSetting> {
            match v.as_deref().map(str::trim) {
                None | Some("") => Ok(default),
                Some(s) => s.parse::<i64>().map_err(|_| constraint(s, field, "Member must be an integer")),
            }
        }
        fn boolean(v: &Option<String>, field: &str) -> Result<bool, InvalidSetting> {
            match v.as_deref().map(|s| s.trim().to_ascii_lowercase()) {
                None => Ok(false),
                Some(s) if s == "true" => Ok(true),
                Some(s) if s == "false" || s.is_empty() => Ok(false),
                Some(s) => Err(constraint(s, field, "Member must be a boolean")),
            }
        }
        let function_name = self
            .function
            .filter(|f| !f.is_empty())
            .ok_or_else(|| InvalidSetting("a function name is required: --function-name".into()))?;

        let batch_size = int(&self.batch_size, "batchSize", 100)?;
        range(batch_size, "batchSize", 1, 10_000)?;
        let window = match self.batching_window.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(_) => Some(int(&self.batching_window, "maximumBatchingWindowInSeconds", 0)?),
        };
        if let Some(w) = window {
            range(w, "maximumBatchingWindowInSeconds", 0, 300)?;
        }
        let batching_window = window.map_or(default_window, |w| Duration::from_secs(w as u64));
        let factor = int(&self.parallelization_factor, "parallelizationFactor", 1)?;
        range(factor, "parallelizationFactor", 1, 10)?;
        let retries = int(&self.maximum_retry_attempts, "maximumRetryAttempts", -1)?;
        range(retries, "maximumRetryAttempts", -1, 10_000)?;
        let age = int(&self.maximum_record_age, "maximumRecordAgeInSeconds", -1)?;
        range(age, "maximumRecordAgeInSeconds", -1, 604_800)?;
        if (0..60).contains(&age) {
            return Err(constraint(age, "maximumRecordAgeInSeconds", "Member must be -1 or between 60 and 604800"));
        }
        let tumbling = int(&self.tumbling_window, "tumblingWindowInSeconds", 0)?;
        range(tumbling, "tumblingWindowInSeconds", 0, 900)?;
        if tumbling > 0 && factor > 1 {
            return Err(InvalidSetting(format!(
                "TumblingWindowInSeconds needs ParallelizationFactor 1 (window state is per shard); got {factor}"
            )));
        }
        let starting_position = match self.starting_position.as_deref() {
            Some("TRIM_HORIZON") => StartingPosition::TrimHorizon,
            Some("LATEST") => StartingPosition::Latest,
            Some("AT_TIMESTAMP") => {
                let ts = self.starting_position_timestamp.as_deref().ok_or_else(|| {
                    InvalidSetting("StartingPositionTimestamp is required with StartingPosition AT_TIMESTAMP".into())
                })?;
                let ts: f64 = ts.trim().parse().map_err(|_| {
                    constraint(ts, "startingPositionTimestamp", "Member must be a timestamp (unix seconds)")
                })?;
                StartingPosition::AtTimestamp(ts)
            }
            None => {
                return Err(InvalidSetting("StartingPosition is required for a stream or Kafka event source".into()));
            }
            Some(other) => {
                return Err(constraint(
                    other,
                    "startingPosition",
                    "Member must satisfy enum value set: [TRIM_HORIZON, LATEST, AT_TIMESTAMP]",
                ));
            }
        };
        let mut report_batch_item_failures = false;
        for t in self.function_response_types.as_deref().unwrap_or("").split(',').map(str::trim) {
            match t {
                "" => {}
                "ReportBatchItemFailures" => report_batch_item_failures = true,
                other => {
                    return Err(constraint(
                        other,
                        "functionResponseTypes",
                        "Member must satisfy enum value set: [ReportBatchItemFailures]",
                    ));
                }
            }
        }
        let on_failure = match self.on_failure.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(arn) => Some(Destination::from_arn(arn)?),
        };
        let filter = match self.filter_criteria.as_deref().map(str::trim) {
            None | Some("") => super::filter::FilterCriteria::none(),
            Some(text) => {
                let v: Value = serde_json::from_str(text)
                    .map_err(|e| InvalidSetting(format!("FilterCriteria is not JSON ({e}): {text}")))?;
                super::filter::FilterCriteria::parse(&v).map_err(|e| InvalidSetting(e.0))?
            }
        };
        // MetricsConfig (API_EventSourceMappingMetricsConfig): "Include EventCount to receive event
        // source mapping metrics related to the number of events processed by your event source
        // mapping"; the API's values are EventCount, ErrorCount and KafkaMetrics.
        let mut event_count_metrics = false;
        for m in self.metrics.as_deref().unwrap_or_default().split(',').map(str::trim).filter(|m| !m.is_empty()) {
            match m {
                "EventCount" => event_count_metrics = true,
                "ErrorCount" | "KafkaMetrics" => {}
                other => {
                    return Err(constraint(
                        other,
                        "metricsConfig.metrics",
                        "Member must satisfy enum value set: [EventCount, ErrorCount, KafkaMetrics]",
                    ));
                }
            }
        }
        Ok(MappingSettings {
            event_count_metrics,
            provisioned_pollers: None,
            maximum_concurrency: None,
            stream_arn,
            consumer_arn,
            function_name,
            batch_size: batch_size as u32,
            batching_window,
            starting_position,
            parallelization_factor: factor as u32,
            bisect_on_error: boolean(&self.bisect, "bisectBatchOnFunctionError")?,
            maximum_retry_attempts: retries,
            maximum_record_age: (age >= 0).then(|| Duration::from_secs(age as u64)),
            report_batch_item_failures,
            tumbling_window: (tumbling > 0).then(|| Duration::from_secs(tumbling as u64)),
            on_failure,
            filter,
            enabled: match self.enabled.as_deref().map(str::trim) {
                None | Some("") => true,
                Some(_) => boolean(&self.enabled, "enabled")?,
            },
        })
    }
}

impl MappingSettings {
    /// `EventSourceArn`: the consumer's ARN with enhanced fan-out, else the stream's.
    pub fn event_source_arn(&self) -> &str {
        self.consumer_arn.as_deref().unwrap_or(&self.stream_arn)
    }

    /// The stream's name (the last part of its ARN).
    pub fn stream_name(&self) -> &str {
        self.stream_arn.rsplit('/').next().unwrap_or_default()
    }

    /// The function's ARN in the local account.
    pub fn function_arn(&self) -> String {
        let region = self.stream_arn.split(':').nth(3).unwrap_or(crate::localstack::REGION);
        format!("arn:aws:lambda:{region}:{}:function:{}", crate::localstack::ACCOUNT, self.function_name)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_rabbitmq_url_is_named_without_its_password() {
        let s = |url: &str| super::RabbitMqSource { url: url.into(), queue: "q".into(), broker_arn: None };
        let at_in_password = s("amqp://u:p@ss@broker.local:5672/%2fprod");
        assert_eq!(at_in_password.redacted(), "amqp://u:***@broker.local:5672/%2fprod");
        assert_eq!(at_in_password.vhost(), "/prod");
        assert!(at_in_password.event_source_arn().ends_with(":broker:local:b-broker-local-5672"));
        let bare = s("amqp://127.0.0.1:5672");
        assert_eq!((bare.redacted().as_str(), bare.vhost().as_str()), ("amqp://127.0.0.1:5672", "/"));
        assert!(bare.event_source_arn().ends_with(":b-127-0-0-1-5672"));
        assert_eq!(s("amqp://h/").vhost(), "", "an empty path is the empty virtual host");
    }

    use super::*;

    fn base() -> RawSettings {
        RawSettings {
            stream: Some("arn:aws:kinesis:us-east-1:000000000000:stream/s".into()),
            function: Some("f".into()),
            starting_position: Some("TRIM_HORIZON".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_awss() {
        let s = base().validate().unwrap();
        assert_eq!(s.batch_size, 100);
        assert_eq!(s.batching_window, Duration::ZERO);
        assert_eq!(s.parallelization_factor, 1);
        assert_eq!(s.maximum_retry_attempts, -1);
        assert_eq!(s.maximum_record_age, None);
        assert!(!s.bisect_on_error && !s.report_batch_item_failures);
        assert_eq!(s.tumbling_window, None);
        assert_eq!(s.on_failure, None);
    }

    #[test]
    fn a_stream_consumer_is_an_event_source_of_its_stream() {
        let stream = "arn:aws:kinesis:us-east-1:000000000000:stream/s";
        let consumer = format!("{stream}/consumer/c:1795696200");
        let s = RawSettings { stream: Some(consumer.clone()), ..base() }.validate().unwrap();
        assert_eq!((s.stream_arn.as_str(), s.consumer_arn.as_deref()), (stream, Some(consumer.as_str())));
        assert_eq!((s.stream_name(), s.event_source_arn()), ("s", consumer.as_str()));
        let polling = RawSettings { stream: Some(stream.into()), ..base() }.validate().unwrap();
        assert_eq!(polling.consumer_arn, None);
        assert_ne!(s.uuid(), polling.uuid(), "another event source, another mapping");
        let e = RawSettings { stream: Some(format!("{stream}/consumer/")), ..base() }.validate().unwrap_err();
        assert!(e.0.contains("stream consumer ARN"), "{e}");
    }

    #[test]
    fn async_invoke_allows_five_destination_types_and_a_kinesis_mapping_three() {
        let a = "us-east-1:000000000000";
        let lambda = format!("arn:aws:lambda:{a}:function:f");
        let bus = format!("arn:aws:events:{a}:event-bus/default");
        for arn in [format!("arn:aws:sqs:{a}:q"), format!("arn:aws:sns:{a}:t"), "arn:aws:s3:::b".into()] {
            assert_eq!(Destination::from_async_arn(&arn).unwrap(), Destination::from_arn(&arn).unwrap());
        }
        assert_eq!(Destination::from_async_arn(&lambda).unwrap(), Destination::Lambda(lambda.clone()));
        assert_eq!(Destination::from_async_arn(&bus).unwrap(), Destination::EventBridge(bus.clone()));
        assert!(Destination::from_arn(&lambda).is_err() && Destination::from_arn(&bus).is_err());
        let table = format!("arn:aws:dynamodb:{a}:table/t");
        assert!(
            Destination::from_async_arn(&table).unwrap_err().0.contains("Lambda function or EventBridge event bus")
        );
        assert!(Destination::from_async_arn(&format!("arn:aws:events:{a}:rule/r")).is_err(), "a rule is not a bus");
    }

    #[test]
    fn ranges_are_awss() {
        let bad = |f: fn(&mut RawSettings)| {
            let mut r = base();
            f(&mut r);
            r.validate().unwrap_err().0
        };
        assert!(bad(|r| r.batch_size = Some("0".into())).contains("'0' at 'batchSize'"));
        assert!(bad(|r| r.batch_size = Some("10001".into())).contains("less than or equal to 10000"));
        assert!(bad(|r| r.batching_window = Some("301".into())).contains("maximumBatchingWindowInSeconds"));
        assert!(bad(|r| r.parallelization_factor = Some("11".into())).contains("parallelizationFactor"));
        assert!(bad(|r| r.maximum_retry_attempts = Some("-2".into())).contains("maximumRetryAttempts"));
        assert!(bad(|r| r.maximum_record_age = Some("59".into())).contains("-1 or between 60 and 604800"));
        assert!(bad(|r| r.maximum_record_age = Some("604801".into())).contains("maximumRecordAgeInSeconds"));
        assert!(bad(|r| r.tumbling_window = Some("901".into())).contains("tumblingWindowInSeconds"));
        assert!(bad(|r| r.starting_position = Some("OLDEST".into())).contains("enum value set"));
        assert!(bad(|r| r.starting_position = None).contains("StartingPosition is required"));
        assert!(bad(|r| r.starting_position = Some("AT_TIMESTAMP".into())).contains("StartingPositionTimestamp"));
        assert!(bad(|r| r.function_response_types = Some("Nope".into())).contains("functionResponseTypes"));
        assert!(bad(|r| r.on_failure = Some("arn:aws:lambda:x:y:function:z".into())).contains("onFailure"));
        assert!(bad(|r| r.bisect = Some("yes".into())).contains("bisectBatchOnFunctionError"));
        assert!(
            bad(|r| {
                r.tumbling_window = Some("60".into());
                r.parallelization_factor = Some("2".into());
            })
            .contains("ParallelizationFactor 1")
        );
        // The edges AWS accepts.
        let mut r = base();
        r.batch_size = Some("10000".into());
        r.maximum_record_age = Some("60".into());
        r.maximum_retry_attempts = Some("10000".into());
        r.batching_window = Some("300".into());
        r.tumbling_window = Some("900".into());
        assert!(r.validate().is_ok());
    }

    #[test]
    fn reads_the_projects_template_and_flags_win() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../template.yaml");
        let t = Template::load(&path, "pushpull-local", &["BatchSize=250".into()]).unwrap();
        let raw = RawSettings::from_template(&t, None).unwrap();
        let s = raw.clone().validate().unwrap();
        assert_eq!(s.stream_arn, "arn:aws:kinesis:us-east-1:000000000000:stream/pushpull-local-record-stream");
        assert_eq!(s.function_name, "pushpull-local-kinesis-rollup");
        assert_eq!(s.batch_size, 250);
        assert_eq!(s.batching_window, Duration::from_secs(1));
        assert!(s.bisect_on_error && s.report_batch_item_failures);
        assert_eq!(s.maximum_retry_attempts, 10);
        assert!(s.event_count_metrics, "MetricsConfig: {{Metrics: [EventCount]}}");
        assert_eq!(
            s.on_failure,
            Some(Destination::Sqs("arn:aws:sqs:us-east-1:000000000000:pushpull-local-pull-failure-queue".into()))
        );
        let flags = RawSettings { batch_size: Some("7".into()), on_failure: Some(String::new()), ..Default::default() };
        let s = raw.overlay(flags).validate().unwrap();
        assert_eq!((s.batch_size, s.on_failure), (7, None));
    }

    /// API_EventSourceMappingMetricsConfig: "Include EventCount to receive event source mapping
    /// metrics"; without it none (AWS: "You must opt-in the metric group").
    #[test]
    fn reads_the_templates_kafka_variant() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../template.yaml");
        // The Kinesis variant has no Kafka mapping.
        let t = Template::load(&path, "st", &[]).unwrap();
        assert!(RawSettings::from_template_kafka(&t, None).unwrap().is_none());
        let overrides = ["Broker=kafka".into(), "KafkaConsumerGroupId=rollups".into(), "BatchSize=50".into()];
        let t = Template::load(&path, "st", &overrides).unwrap();
        assert!(RawSettings::from_template(&t, None).is_err(), "no Kinesis mapping is created");
        let (raw, source) = RawSettings::from_template_kafka(&t, None).unwrap().unwrap();
        assert_eq!(source.bootstrap_servers, ["127.0.0.1:9092"]);
        assert_eq!(source.topic, "st-records");
        assert_eq!(source.consumer_group_id.as_deref(), Some("rollups"));
        assert_eq!(source.cluster_arn, None);
        let m = raw.validate_kafka(&source).unwrap();
        assert_eq!(m.function_name, "st-kinesis-rollup");
        assert_eq!(m.batch_size, 50);
        assert_eq!(m.batching_window, Duration::from_secs(1));
        assert!(m.report_batch_item_failures && m.bisect_on_error);
        assert_eq!(m.maximum_retry_attempts, 10);
        assert_eq!(
            m.on_failure,
            Some(Destination::Sqs("arn:aws:sqs:us-east-1:000000000000:st-pull-failure-queue".into()))
        );
        assert!(m.stream_arn.ends_with("self-managed/127.0.0.1:9092/st-records"), "{}", m.stream_arn);
        // The template's provisioned mode: MinimumPollers 1, MaximumPollers KafkaMaximumPollers.
        assert_eq!(m.provisioned_pollers, Some((1, 2)));
    }

    /// The template's RabbitMQ variant: an `MQ` event (SAM sam-property-function-mq.html: `Broker`,
    /// `Queues`, `SourceAccessConfigurations` of `BASIC_AUTH` and `VIRTUAL_HOST`), and the source the
    /// secret's credentials make of it, each part percent-encoded.
    #[test]
    fn reads_the_templates_rabbitmq_variant() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../template.yaml");
        let t = Template::load(&path, "st", &[]).unwrap();
        assert!(RawSettings::from_template_mq(&t, None).unwrap().is_none());
        let secret = "arn:aws:secretsmanager:us-east-1:000000000000:secret:st-rabbitmq-AbCdEf";
        let overrides =
            ["Broker=rabbitmq".into(), format!("RabbitMqSecretArn={secret}"), "RabbitMqVirtualHost=pushpull".into()];
        let t = Template::load(&path, "st", &overrides).unwrap();
        assert!(RawSettings::from_template(&t, None).is_err(), "no Kinesis mapping is created");
        assert!(RawSettings::from_template_kafka(&t, None).unwrap().is_none());
        let (raw, event) = RawSettings::from_template_mq(&t, None).unwrap().unwrap();
        assert_eq!(event.queue, "st-records");
        assert_eq!(event.secret_arn.as_deref(), Some(secret));
        assert_eq!(event.virtual_host.as_deref(), Some("pushpull"));
        assert!(event.broker_arn.starts_with("arn:aws:mq:"), "{}", event.broker_arn);
        let source = event.source("amqp://127.0.0.1:5672", "ann", "p@ss/word");
        assert_eq!(source.url, "amqp://ann:p%40ss%2Fword@127.0.0.1:5672/pushpull");
        assert_eq!(source.credentials(), ("ann".to_owned(), "p@ss/word".to_owned()));
        assert_eq!((source.endpoint().as_str(), source.vhost().as_str()), ("amqp://127.0.0.1:5672", "pushpull"));
        let m = raw.validate_rabbitmq(&source).unwrap();
        assert_eq!(m.function_name, "st-kinesis-rollup");
        assert_eq!(m.event_source_arn(), event.broker_arn);
    }

    #[test]
    fn reads_the_templates_sqs_variant() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../template.yaml");
        let t = Template::load(&path, "st", &[]).unwrap();
        assert!(RawSettings::from_template_sqs(&t, None).unwrap().is_none());
        let t = Template::load(&path, "st", &["Broker=sqs".into()]).unwrap();
        assert!(RawSettings::from_template(&t, None).is_err(), "no Kinesis mapping is created");
        let (raw, queue, timeout) = RawSettings::from_template_sqs(&t, None).unwrap().unwrap();
        assert_eq!(queue, "arn:aws:sqs:us-east-1:000000000000:st-records");
        assert_eq!(timeout, Duration::from_secs(60));
        let source = SqsSource {
            queue_url: "http://127.0.0.1:4566/000000000000/st-records".into(),
            queue_arn: queue.clone(),
            visibility_timeout: Duration::from_secs(660),
            redrive_policy: None,
            wait_time_seconds: 20,
        };
        let m = raw.clone().validate_sqs(&source, timeout).unwrap();
        assert_eq!(
            (m.function_name.as_str(), m.batch_size, m.maximum_concurrency),
            ("st-kinesis-rollup", 500, Some(10))
        );
        assert!(m.report_batch_item_failures);
        // FIFO: the queue's name, BatchSize 10, no window; a larger batch is refused by the rules.
        let fifo =
            Template::load(&path, "st", &["Broker=sqs".into(), "SqsFifo=true".into(), "BatchSize=10".into()]).unwrap();
        let (raw, queue, _) = RawSettings::from_template_sqs(&fifo, None).unwrap().unwrap();
        assert!(queue.ends_with(":st-records.fifo"), "{queue}");
        assert!(raw.batching_window.is_none());
        let e = Template::load(&path, "st", &["Broker=sqs".into(), "SqsFifo=true".into()]).unwrap_err().to_string();
        assert!(e.contains("at most 10"), "{e}");
    }

    #[test]
    fn provisioned_pollers_are_in_awss_ranges_and_only_for_kafka() {
        assert_eq!(provisioned_pollers(None).unwrap(), None);
        assert_eq!(provisioned_pollers(Some("")).unwrap(), None);
        assert_eq!(provisioned_pollers(Some("2,8")).unwrap(), Some((2, 8)));
        assert_eq!(provisioned_pollers(Some(",")).unwrap(), Some((1, 200)), "AWS's defaults");
        assert!(provisioned_pollers(Some("0,8")).unwrap_err().to_string().contains("minimumPollers"));
        assert!(provisioned_pollers(Some("201,300")).unwrap_err().to_string().contains("between 1 and 200"));
        assert!(provisioned_pollers(Some("1,2001")).unwrap_err().to_string().contains("between 1 and 2000"));
        assert!(provisioned_pollers(Some("5,4")).unwrap_err().to_string().contains("greater than or equal"));
        let kinesis = RawSettings {
            stream: Some("arn:aws:kinesis:us-east-1:000000000000:stream/s".into()),
            function: Some("f".into()),
            starting_position: Some("LATEST".into()),
            provisioned_pollers: Some("1,2".into()),
            ..Default::default()
        };
        assert!(kinesis.validate().unwrap_err().to_string().contains("Kafka event sources"));
    }

    #[test]
    fn event_count_metrics_are_opt_in() {
        assert!(!base().validate().unwrap().event_count_metrics);
        let with = |m: &str| RawSettings { metrics: Some(m.into()), ..base() }.validate();
        assert!(with("EventCount").unwrap().event_count_metrics);
        assert!(with("ErrorCount, EventCount").unwrap().event_count_metrics);
        assert!(!with("").unwrap().event_count_metrics);
        let e = with("Counts").unwrap_err();
        assert!(e.0.contains("enum value set"), "{e}");
    }

    /// SAM's `FilterCriteria` on a Kinesis event, parameters resolved, as AWS's CLI shape.
    #[test]
    fn reads_filter_criteria_from_the_template() {
        let text = r#"
Parameters:
  OrderType: {Type: String, Default: buy}
Resources:
  S:
    Type: AWS::Kinesis::Stream
  F:
    Type: AWS::Serverless::Function
    Properties:
      Events:
        K:
          Type: Kinesis
          Properties:
            Stream: !GetAtt S.Arn
            StartingPosition: TRIM_HORIZON
            FilterCriteria:
              Filters:
                - Pattern: !Sub '{"data": {"order": {"type": ["${OrderType}"]}}}'
"#;
        let t = Template::parse(text, "st", &["OrderType=sell".into()]).unwrap();
        let s = RawSettings::from_template(&t, None).unwrap().validate().unwrap();
        let fields = serde_json::Map::new();
        assert!(s.filter.passes(br#"{"order": {"type": "sell"}}"#, &fields));
        assert!(!s.filter.passes(br#"{"order": {"type": "buy"}}"#, &fields));
        // `{}` from a flag removes it, as `--filter-criteria "{}"` does on AWS.
        let raw = RawSettings::from_template(&t, None).unwrap();
        let none = RawSettings { filter_criteria: Some("{}".into()), ..Default::default() };
        assert!(raw.overlay(none).validate().unwrap().filter.is_empty());
    }
}
