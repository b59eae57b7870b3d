//! The whole pipeline on a laptop, as the template deploys it: the bucket, stream and queues the
//! template names (resources are called `<stack>-<logical-id>` locally, the bucket by its
//! `BucketName`); both functions served behind the Invoke API with the template's environment;
//! the bucket notifying an SQS queue whose events are delivered to the push function with
//! async-invoke semantics ([`crate::async_invoke`]); the Kinesis event source mapping
//! ([`crate::mapping`]) invoking the pull function. [`run`] uploads a directory of NDJSON files
//! and waits until every line is rolled up or quarantined; [`Report`] says what happened and
//! [`Report::check`] whether the rollup equals the input exactly.
mod redis;
use self::redis::Reader;
pub use self::redis::{RedisBroker, RedisRun};

use std::collections::{BTreeMap, HashMap};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kinesis_rollup::Sum;
use pushpull::store::Store;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use crate::async_invoke::{AsyncSettings, AsyncSummary, DeliveryOptions};
use crate::cloudwatch::MetricLog;
use crate::invoke::InvokeServer;
use crate::localstack::{ACCOUNT, Local, REGION, function_env};
use crate::mapping::{Clients, Delivered, RabbitMqSource, RawSettings, Runner, RunnerOptions, Summary};
use crate::observed::{Names, Observed};
use crate::progress::{Display, LiveProgress, Update};
use crate::realism::iam::Policies;
use crate::realism::kafka::{KafkaFaultProxy, join_and_leave};
use crate::realism::proxy::RealismProxy;
use crate::realism::{FaultTable, Realism, RealismConfig};
use crate::runtime_api::{FunctionSpec, workspace_binary};
use crate::template::{Template, scalar};

/// Anything that stops the pipeline, with what was being done; each keeps its source.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The template could not be read or resolved.
    #[error("template: {0}")]
    Template(#[from] crate::template::TemplateError),
    /// The mapping's settings are ones AWS would refuse.
    #[error("mapping settings: {0}")]
    Settings(#[from] crate::mapping::settings::InvalidSetting),
    /// A call to the local AWS failed.
    #[error(transparent)]
    Local(#[from] crate::localstack::LocalError),
    /// A call made here to the local AWS failed (the SDK's error kept).
    #[error("{call}: {message}")]
    Aws {
        /// The call and what it was on.
        call: String,
        /// AWS's words for why.
        message: String,
        /// The SDK's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A file, directory or server socket.
    #[error("{what}: {source}")]
    Io {
        /// Which.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// JSON that does not parse (an output line, a quarantine entry).
    #[error("{what}: {source}")]
    Json {
        /// Where it was read.
        what: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The event source mapping stopped on an error.
    #[error("event source mapping: {0}")]
    Mapping(#[from] crate::mapping::MappingError),
    /// The S3 event delivery stopped on an error.
    #[error(transparent)]
    Delivery(#[from] crate::async_invoke::DeliveryError),
    /// A task of the run failed (it panicked or was cancelled).
    #[error("{what}: {source}")]
    Task {
        /// Which.
        what: &'static str,
        /// Why.
        #[source]
        source: tokio::task::JoinError,
    },
    /// The run's picture could not be drawn.
    #[error("report: {0}")]
    Report(#[from] crate::report::ReportError),
    /// LocalStack is not answering.
    #[error(transparent)]
    NotRunning(#[from] crate::localstack::NotRunning),
    /// The run did not come to an end it can report (stopped parts, a timeout, bad input).
    #[error("{0}")]
    Run(String),
}

impl PipelineError {
    fn aws<E, R>(call: impl Into<String>, e: aws_smithy_runtime_api::client::result::SdkError<E, R>) -> Self
    where
        E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        PipelineError::Aws { call: call.into(), message: pushpull::aws::describe(&e), source: Box::new(e) }
    }

    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        PipelineError::Io { what: what.into(), source }
    }

    fn json(what: impl Into<String>, source: serde_json::Error) -> Self {
        PipelineError::Json { what: what.into(), source }
    }
}

/// The template's functions as specs for the Invoke server: binaries from `cargo build`,
/// environment, timeout and memory from the template, pointed at LocalStack. `extra_env` is
/// added per binary name.
pub fn template_specs(
    t: &Template,
    extra_env: &[(&str, Vec<(String, String)>)],
    verbose: bool,
) -> Result<Vec<FunctionSpec>, PipelineError> {
    let mut specs = Vec::new();
    for f in t.functions()? {
        let binary = workspace_binary(&f.binary);
        if !binary.exists() {
            return Err(PipelineError::Run(format!(
                "{} is not built: run `cargo build --workspace --bins`",
                binary.display()
            )));
        }
        let mut spec = FunctionSpec::new(f.name, binary);
        spec.env = f.env;
        spec.env.extend(function_env());
        for (bin, env) in extra_env {
            if *bin == f.binary {
                spec.env.extend(env.iter().cloned());
            }
        }
        spec.timeout = f.timeout;
        spec.memory_mb = f.memory_mb;
        spec.echo_output = verbose;
        specs.push(spec);
    }
    Ok(specs)
}

/// What the template names, created in LocalStack.
#[derive(Debug, Clone)]
pub struct Resources {
    /// The data bucket.
    pub bucket: String,
    /// Objects created under this prefix go to the push function.
    pub input_prefix: String,
    /// The stream.
    pub stream: String,
    /// Its ARN.
    pub stream_arn: String,
    /// The queue standing in for Lambda's async-invoke queue (the bucket notifies it).
    pub s3_events_queue: String,
    /// The push function's OnFailure queue URL.
    pub push_failure_queue: Option<String>,
    /// The pull mapping's OnFailure queue URL.
    pub pull_failure_queue: Option<String>,
    /// The push function's name.
    pub push_function: String,
    /// The pull function's name.
    pub pull_function: String,
}

fn props<'a>(t: &'a Template, kind: &'a str) -> impl Iterator<Item = (&'a String, &'a Value)> + 'a {
    t.resources_of(kind).map(|(id, r)| (id, &r["Properties"]))
}

/// Registers the template's stream consumers (`AWS::Kinesis::StreamConsumer` whose condition
/// holds) on their streams, and records their ARNs in `t` for `GetAtt X.ConsumerARN`. The
/// streams must exist. Registering what exists is fine.
pub async fn register_consumers(t: &mut Template, local: &Local) -> Result<(), PipelineError> {
    let consumers: Vec<(String, Value)> =
        t.resources_of("AWS::Kinesis::StreamConsumer").map(|(id, r)| (id.clone(), r["Properties"].clone())).collect();
    for (id, p) in consumers {
        if !t.is_created(&id)? {
            continue;
        }
        let p = t.resolve(&p, &id)?;
        let stream_arn = p.get("StreamARN").and_then(scalar).unwrap_or_default();
        let name = p.get("ConsumerName").and_then(scalar).unwrap_or_else(|| t.name_of(&id));
        let arn = local.ensure_consumer(&stream_arn, &name).await?;
        t.arns.insert(id, arn);
    }
    Ok(())
}

/// Creates the template's queues with the attributes it gives them (a redrive policy once every
/// queue exists, for its dead-letter queue's ARN); returns their URLs by ARN.
async fn ensure_queues(t: &Template, local: &Local) -> Result<HashMap<String, String>, PipelineError> {
    use aws_sdk_sqs::types::QueueAttributeName as A;
    const ATTRIBUTES: [(&str, A); 7] = [
        ("FifoQueue", A::FifoQueue),
        ("ContentBasedDeduplication", A::ContentBasedDeduplication),
        ("VisibilityTimeout", A::VisibilityTimeout),
        ("MessageRetentionPeriod", A::MessageRetentionPeriod),
        ("DelaySeconds", A::DelaySeconds),
        ("MaximumMessageSize", A::MaximumMessageSize),
        ("ReceiveMessageWaitTimeSeconds", A::ReceiveMessageWaitTimeSeconds),
    ];
    let mut urls = HashMap::new();
    let mut redrives = Vec::new();
    for (id, p) in props(t, "AWS::SQS::Queue") {
        let name = t.name_of(id);
        let p = t.resolve(p, id)?;
        let attributes: HashMap<A, String> =
            ATTRIBUTES.into_iter().filter_map(|(key, a)| p.get(key).and_then(scalar).map(|v| (a, v))).collect();
        let created = local.sqs.create_queue().queue_name(&name).set_attributes(Some(attributes.clone())).send().await;
        let url = match created {
            Ok(out) => out.queue_url().unwrap_or_default().to_owned(),
            // It exists with other attributes (an earlier run, other parameters): as CloudFormation
            // updates a queue, its attributes are set to the template's (FIFO cannot change).
            Err(e) if e.as_service_error().is_some_and(|e| e.is_queue_name_exists()) => {
                let out = local
                    .sqs
                    .get_queue_url()
                    .queue_name(&name)
                    .send()
                    .await
                    .map_err(|e| PipelineError::aws(format!("GetQueueUrl {name}"), e))?;
                let url = out.queue_url().unwrap_or_default().to_owned();
                let mut changed = attributes;
                changed.remove(&A::FifoQueue);
                local
                    .sqs
                    .set_queue_attributes()
                    .queue_url(&url)
                    .set_attributes(Some(changed))
                    .send()
                    .await
                    .map_err(|e| PipelineError::aws(format!("SetQueueAttributes {name}"), e))?;
                url
            }
            Err(e) => return Err(PipelineError::aws(format!("CreateQueue {name}"), e)),
        };
        if let Some(policy) = p.get("RedrivePolicy").filter(|v| v.is_object()) {
            redrives.push((url.clone(), policy.to_string()));
        }
        urls.insert(format!("arn:aws:sqs:{REGION}:{ACCOUNT}:{name}"), url);
    }
    for (url, policy) in redrives {
        local
            .sqs
            .set_queue_attributes()
            .queue_url(&url)
            .attributes(A::RedrivePolicy, &policy)
            .send()
            .await
            .map_err(|e| PipelineError::aws(format!("SetQueueAttributes RedrivePolicy of {url}"), e))?;
    }
    Ok(urls)
}

/// Creates the bucket (with its notification to the async-invoke stand-in queue), the stream,
/// its consumers and the queues the template names; returns them. Creating what exists is fine.
pub async fn provision(t: &mut Template, local: &Local) -> Result<Resources, PipelineError> {
    let (bucket_id, bucket_props) =
        props(t, "AWS::S3::Bucket").next().ok_or_else(|| PipelineError::Run("the template has no bucket".into()))?;
    let bucket = match bucket_props.get("BucketName") {
        Some(n) => scalar(&t.resolve(n, bucket_id)?).unwrap_or_default(),
        None => t.name_of(bucket_id),
    };
    local.ensure_bucket(&bucket).await?;
    let (stream, stream_arn) = match props(t, "AWS::Kinesis::Stream").next() {
        Some((stream_id, stream_props)) => {
            let shards: i32 = stream_props
                .get("ShardCount")
                .and_then(|v| t.resolve(v, stream_id).ok())
                .and_then(|v| scalar(&v))
                .and_then(|s| s.parse().ok())
                .unwrap_or(1);
            let stream = t.name_of(stream_id);
            let arn = local.ensure_stream(&stream, shards).await?;
            (stream, arn)
        }
        // The template's Kafka variant: the records travel through a topic (the rollup names
        // its outputs after it), which the broker holds; `run` creates it.
        None => {
            if let Some((_, source)) = RawSettings::from_template_kafka(t, None)? {
                (source.topic.clone(), source.event_source_arn())
            } else if let Some((_, mq)) = RawSettings::from_template_mq(t, None)? {
                // The template's RabbitMQ variant: the records travel through a queue, which
                // names the rollup's outputs.
                (mq.queue.clone(), mq.broker_arn.clone())
            } else if let Some((_, arn, _)) = RawSettings::from_template_sqs(t, None)? {
                // The template's SQS variant: likewise.
                (arn.rsplit(':').next().unwrap_or_default().to_owned(), arn)
            } else {
                return Err(PipelineError::Run(
                    "the template has neither a stream nor a Kafka, MQ or SQS mapping".into(),
                ));
            }
        }
    };
    register_consumers(t, local).await?;
    let t = &*t;
    let queue_urls = ensure_queues(t, local).await?;
    // The functions by what triggers them: the push function an S3 event, the pull function a
    // Kinesis event (their binaries' names are the template's).
    let push = t.function_with_event("S3")?;
    let pull = match t.function_with_event("Kinesis") {
        Ok(f) => f,
        Err(_) => t
            .function_with_event("SelfManagedKafka")
            .or_else(|_| t.function_with_event("MSK"))
            .or_else(|_| t.function_with_event("MQ"))
            .or_else(|_| t.function_with_event("SQS"))?,
    };
    let (push_function, pull_function) = (push.name.clone(), pull.name.clone());
    // The push function's S3 event: its prefix filter becomes the bucket's notification filter.
    let input_prefix = t.parameters.get("InputPrefix").cloned().unwrap_or_else(|| "input/".into());
    let queue = format!("{}-s3-events", t.stack);
    let s3_events_queue = local.notify_queue(&bucket, &queue, &input_prefix).await?;
    let push_cfg = AsyncSettings::from_template(t, &push.binary, 1.0)?;
    let pull_cfg = match (RawSettings::from_template_kafka(t, None)?, RawSettings::from_template_mq(t, None)?) {
        (Some((raw, _)), _) | (None, Some((raw, _))) => raw,
        (None, None) => match RawSettings::from_template_sqs(t, None)? {
            Some((raw, _, _)) => raw,
            None => RawSettings::from_template(t, None)?,
        },
    };
    Ok(Resources {
        bucket,
        input_prefix,
        stream,
        stream_arn,
        s3_events_queue,
        push_failure_queue: push_cfg.on_failure.and_then(|a| queue_urls.get(&a).cloned()),
        pull_failure_queue: pull_cfg.on_failure.and_then(|a| queue_urls.get(&a).cloned()),
        push_function,
        pull_function,
    })
}

/// Totals per group: (records, sum).
pub type Totals = BTreeMap<String, (u64, Sum)>;

/// A top-level field's JSON text as written (a number not rounded through `f64`, as
/// `serde_json::Value` would round it), or `None` if the line is not an object or lacks it.
fn raw_field(line: &[u8], field: &str) -> Option<String> {
    let map: BTreeMap<String, Box<serde_json::value::RawValue>> = serde_json::from_slice(line).ok()?;
    map.get(field).map(|v| v.get().to_owned())
}

/// How the totals name the rollup's group of records without the group-by field (`"key": null`).
pub const MISSING_GROUP: &str = "(no group)";

/// What the input files hold, judged as the push function judges lines.
#[derive(Debug, Clone, Default)]
pub struct Expected {
    /// Good lines per group.
    pub totals: Totals,
    /// Good lines.
    pub good: u64,
    /// Lines that are not JSON (or not UTF-8).
    pub bad: u64,
    /// Each good line's xxh3 and the file it is in (for end-to-end latency).
    pub lines: HashMap<u64, usize>,
    /// How many times each good line (by xxh3) is in the input: the times it must be in the stream.
    pub line_counts: HashMap<u64, u32>,
    /// The files, sorted.
    pub files: Vec<PathBuf>,
}

fn read_file(path: &Path) -> Result<Vec<u8>, PipelineError> {
    let raw = std::fs::read(path).map_err(|e| PipelineError::io(path.display().to_string(), e))?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| PipelineError::io(path.display().to_string(), e))?;
        return Ok(out);
    }
    Ok(raw)
}

/// Reads the files of `dir` and counts what the rollup should end with.
pub fn expected(dir: &Path, group_by: &str, sum_field: &str) -> Result<Expected, PipelineError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| PipelineError::io(dir.display().to_string(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut out = Expected { files: files.clone(), ..Default::default() };
    for (i, f) in files.iter().enumerate() {
        let body = read_file(f)?;
        for line in body.split(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            // The push side quarantines what is not a JSON object (JsonLines).
            let Some(v) = serde_json::from_slice::<Value>(line).ok().filter(Value::is_object) else {
                out.bad += 1;
                continue;
            };
            out.good += 1;
            let hash = xxhash_rust::xxh3::xxh3_64(line);
            out.lines.insert(hash, i);
            *out.line_counts.entry(hash).or_default() += 1;
            // The rollup counts a record without the field (or with null) under `"key": null`.
            let key = v
                .get(group_by)
                .filter(|g| !g.is_null())
                .map_or_else(|| MISSING_GROUP.to_owned(), |g| g.as_str().map_or_else(|| g.to_string(), str::to_owned));
            // As the rollup reads the amount: absent or null is 0, a string holding a number
            // counts, anything else fails the record (it is not counted at all).
            let amount = match raw_field(line, sum_field) {
                None => Some(Sum::ZERO),
                Some(raw) if raw == "null" => Some(Sum::ZERO),
                Some(raw) => {
                    let text = serde_json::from_str::<String>(&raw).unwrap_or(raw);
                    Sum::parse(&text).ok()
                }
            };
            if let Some(amount) = amount {
                let e = out.totals.entry(key).or_default();
                e.0 += 1;
                e.1 += &amount;
            }
        }
    }
    Ok(out)
}

async fn get(local: &Local, bucket: &str, key: &str) -> Result<bytes::Bytes, PipelineError> {
    let out = local
        .s3
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| PipelineError::aws(format!("GetObject s3://{bucket}/{key}"), e))?;
    out.body.collect().await.map(|b| b.into_bytes()).map_err(|e| PipelineError::Aws {
        call: format!("GetObject s3://{bucket}/{key} (body)"),
        message: e.to_string(),
        source: Box::new(e),
    })
}

async fn list(local: &Local, bucket: &str, prefix: &str) -> Result<Vec<String>, PipelineError> {
    let mut keys = Vec::new();
    let mut token = None;
    loop {
        let out = local
            .s3
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .set_continuation_token(token)
            .send()
            .await
            .map_err(|e| PipelineError::aws(format!("ListObjectsV2 s3://{bucket}/{prefix}"), e))?;
        keys.extend(out.contents().iter().filter_map(|o| o.key().map(str::to_owned)));
        token = out.next_continuation_token().map(str::to_owned);
        if token.is_none() {
            return Ok(keys);
        }
    }
}

/// The rollup as the pull function wrote it: every output object of the stream, summed.
pub async fn rollup_totals(local: &Local, r: &Resources) -> Result<(Totals, usize), PipelineError> {
    let mut totals = Totals::new();
    let keys = list(local, &r.bucket, &format!("output/{}/", r.stream)).await?;
    for key in &keys {
        let body = get(local, &r.bucket, key).await?;
        for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let v: Value = serde_json::from_slice(line).map_err(|e| PipelineError::json(key, e))?;
            let key = if v["key"].is_null() {
                MISSING_GROUP.to_owned()
            } else {
                v["key"].as_str().unwrap_or_default().to_owned()
            };
            let g = totals.entry(key).or_default();
            g.0 += v["count"].as_u64().unwrap_or(0);
            if let Some(sum) = raw_field(line, "sum").and_then(|s| Sum::parse_total(&s).ok()) {
                g.1 += &sum;
            }
        }
    }
    Ok((totals, keys.len()))
}

/// Every quarantine entry (bucket, key, line, offset, reason).
pub async fn quarantine(local: &Local, r: &Resources) -> Result<Vec<Value>, PipelineError> {
    let mut out = Vec::new();
    for key in list(local, &r.bucket, "quarantine/").await? {
        let body = get(local, &r.bucket, &key).await?;
        for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            out.push(serde_json::from_slice(line).map_err(|e| PipelineError::json(key.clone(), e))?);
        }
    }
    Ok(out)
}

/// Messages now in a queue (none for no queue). A failed read is an error, never 0: the summary
/// must not report an empty failure queue it could not see.
pub async fn queue_depth(local: &Local, url: Option<&str>) -> Result<u64, PipelineError> {
    let Some(url) = url else { return Ok(0) };
    let attribute = aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages;
    let out = local
        .sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(attribute.clone())
        .send()
        .await
        .map_err(|e| PipelineError::aws(format!("GetQueueAttributes {url}"), e))?;
    let value = out.attributes().and_then(|a| a.get(&attribute)).map(String::as_str).unwrap_or("0");
    value.parse().map_err(|e| PipelineError::Run(format!("ApproximateNumberOfMessages of {url} ({value:?}): {e}")))
}

/// Every message `url` holds: visible, in flight and delayed.
async fn queue_holds(local: &Local, url: &str) -> Result<u64, PipelineError> {
    crate::mapping::sqs::held(&local.sqs, url)
        .await
        .map_err(|e| PipelineError::aws(format!("GetQueueAttributes {url}"), e))
}

/// Uploads the files of `expected` under the input prefix; returns (key, upload time) per file.
pub async fn upload(local: &Local, r: &Resources, files: &[PathBuf]) -> Result<Vec<(String, f64)>, PipelineError> {
    let mut out = Vec::new();
    for path in files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| PipelineError::Run(format!("{}: not a UTF-8 file name", path.display())))?;
        let key = format!("{}{name}", r.input_prefix);
        let body = std::fs::read(path).map_err(|e| PipelineError::io(path.display().to_string(), e))?;
        local
            .s3
            .put_object()
            .bucket(&r.bucket)
            .key(&key)
            .body(body.into())
            .send()
            .await
            .map_err(|e| PipelineError::aws(format!("PutObject {key}"), e))?;
        out.push((key, crate::mapping::now_unix()));
    }
    Ok(out)
}

/// Whether `realism` injects anything into a Kafka run.
fn kafka_faults_on(realism: &RealismConfig) -> bool {
    realism.rates.kafka_fetch_slowed > 0.0
        || realism.rates.kafka_fetch_cut > 0.0
        || realism.kafka_disruption_every.is_some()
}

/// What happens to a Kafka run's cluster every so often: the broker restarts
/// ([`KafkaFaultProxy::restart`]: every connection closed, new ones closed at once for 2 s), and, meanwhile, a
/// stranger joins the mapping's consumer group for 3 s and leaves ([`join_and_leave`]: two
/// rebalances with batches in flight).
/// A stranger's thread: the partitions it held, or why it could not join.
type StrangerThread = tokio::task::JoinHandle<Result<Vec<i32>, String>>;

/// RabbitMQ in a storm: every `every`, the broker closes every connection (the mapping's and the
/// push function's), and with `restarts` every other time it restarts instead (connections closed,
/// unacknowledged messages requeued, durable queues and persistent messages kept), by
/// `infra/rabbitmq.sh` (`control`). Seeded by the run's seed only in its timing: what it cuts
/// is whatever is in flight.
fn rabbitmq_disruptions(
    control: PathBuf,
    realism: Arc<Realism>,
    every: Duration,
    restarts: bool,
    calm: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut turn = 0u64;
        loop {
            tokio::time::sleep(every).await;
            // Asked to end: between disruptions, never in the middle of one (a restart cut
            // between its stop and its start would leave the broker down).
            if calm.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            turn += 1;
            let (command, fault) = match restarts && turn.is_multiple_of(2) {
                true => ("restart-app", "rabbitmq.broker.restart"),
                false => ("close-connections", "rabbitmq.connections.closed"),
            };
            let out = tokio::process::Command::new(&control).arg(command).kill_on_drop(true).output().await;
            match out {
                Ok(o) if o.status.success() => {
                    realism.count(fault, 1);
                    tracing::info!(command, "realism: RabbitMQ disrupted");
                }
                Ok(o) => {
                    tracing::warn!(command, stderr = %String::from_utf8_lossy(&o.stderr), "realism: RabbitMQ disruption failed")
                }
                Err(e) => tracing::warn!(command, error = %e, "realism: could not run {}", control.display()),
            }
        }
    })
}

struct Disruptions {
    tasks: [tokio::task::JoinHandle<()>; 2],
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// The stranger's thread, while one is in the group.
    stranger: Arc<std::sync::Mutex<Option<StrangerThread>>>,
}

impl Disruptions {
    /// Starts them.
    fn start(proxy: Arc<KafkaFaultProxy>, realism: Arc<Realism>, k: KafkaRun, every: Duration) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // A restart every `2 × every` (with `every` 4 s, one every 4 s kept the broker down or
        // reconnecting half the time: a newly assigned partition was often revoked again before
        // its first fetch, and the run's records waited half a minute); a stranger `every` after
        // the last one left, the first at `every / 2`.
        let restarts = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every * 2).await;
                proxy.restart(Duration::from_secs(2));
            }
        });
        let stranger = Arc::new(std::sync::Mutex::new(None));
        let strangers = tokio::spawn({
            let (stop, stranger) = (stop.clone(), stranger.clone());
            async move {
                tokio::time::sleep(every / 2).await;
                loop {
                    let (k, stop) = (k.clone(), stop.clone());
                    let thread = tokio::task::spawn_blocking(move || {
                        join_and_leave(&k.bootstrap_servers, &k.topic, &k.group, Duration::from_secs(3), &stop)
                    });
                    let abort = thread.abort_handle();
                    if let Ok(mut s) = stranger.lock() {
                        *s = Some(thread);
                    }
                    // Waits for the thread's end without owning it (stop() may take it).
                    while !abort.is_finished() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    let joined = match stranger.lock().ok().and_then(|mut s| s.take()) {
                        Some(thread) => thread.await,
                        None => return,
                    };
                    match joined {
                        Ok(Ok(held)) if !held.is_empty() => {
                            realism.count("kafka.group.rebalance", 2);
                            tracing::info!(partitions = ?held, "realism: a stranger joined the consumer group, held partitions for 3 s and left");
                        }
                        Ok(Ok(_)) => {
                            tracing::info!("realism: a stranger joined the consumer group and was given nothing")
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "realism: a stranger could not join the consumer group")
                        }
                        Err(e) => tracing::warn!(error = %e, "realism: the stranger's thread failed"),
                    }
                    tokio::time::sleep(every).await;
                }
            }
        });
        Disruptions { tasks: [restarts, strangers], stop, stranger }
    }

    /// Stops them; a stranger in the group leaves before this returns.
    async fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
        let thread = self.stranger.lock().ok().and_then(|mut s| s.take());
        if let Some(thread) = thread {
            let _ = thread.await;
        }
    }
}

/// How to run it.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// What carries the records between the two functions: the template's stream, or a Kafka
    /// topic (`<stack>-records`) read by the local Kafka mapping.
    pub broker: Broker,
    /// The SAM template.
    pub template: PathBuf,
    /// Local stack name (resource names).
    pub stack: String,
    /// Template parameter overrides (Key=Value).
    pub overrides: Vec<String>,
    /// The NDJSON files to upload (`.gz` ones are gzip).
    pub input_dir: PathBuf,
    /// Async-invoke retry delays are AWS's times this (0.01: 0.6 s and 1.2 s).
    pub delay_scale: f64,
    /// Extra environment per binary (fault injection).
    pub extra_env: Vec<(&'static str, Vec<(String, String)>)>,
    /// Mapping settings over the template's.
    pub mapping: RawSettings,
    /// Show progress: bars on a terminal, else a line a second ([`crate::progress`]).
    pub progress: bool,
    /// Echo the functions' logs.
    pub verbose: bool,
    /// Give up after this long.
    pub timeout: Duration,
    /// Once done, print the report and keep everything running until Ctrl-C.
    pub keep_running: bool,
    /// The mapping's wait between polls of a shard that is caught up but receiving
    /// ([`RunnerOptions::caught_up_poll`]); `None`: the cadence's own.
    pub caught_up_poll: Option<Duration>,
    /// Poll caught-up shards every 200 ms instead of AWS's once a second
    /// ([`crate::mapping::Polling`]).
    pub fast_polling: bool,
    /// AWS's limits and faults ([`crate::realism`]); off by default.
    pub realism: RealismConfig,
    /// Where the run's EMF lines (`metrics.ndjson`) and summary (`summary.json`) go.
    pub run_dir: PathBuf,
    /// Also draw the run ([`crate::report`]) into this directory: `run.png` and `summary.json`.
    pub report_dir: Option<PathBuf>,
}

/// What carries the records from the push function to the pull function.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Broker {
    /// The template's Kinesis stream, read by the Kinesis mapping.
    #[default]
    Kinesis,
    /// A Kafka topic on the cluster at `bootstrap_servers`, read by the Kafka mapping (a member of
    /// its consumer group).
    Kafka {
        /// `host:port[,host:port...]`.
        bootstrap_servers: String,
    },
    /// A queue on the RabbitMQ broker at `url`, read by the local Amazon MQ mapping: the
    /// template's RabbitMQ variant, its `BASIC_AUTH` secret made in LocalStack from the URL's
    /// credentials.
    RabbitMq {
        /// `amqp://user:pass@host:port/vhost`.
        url: String,
        /// `infra/rabbitmq.sh`, which closes the broker's connections and restarts it under
        /// realism (`None`: no such disruptions).
        control: Option<PathBuf>,
    },
    /// An SQS queue the template creates in LocalStack (with its dead-letter queue), read by the
    /// local SQS mapping: the template's SQS variant.
    Sqs {
        /// A FIFO queue (`SqsFifo=true`; BatchSize 10 unless the overrides set it).
        fifo: bool,
    },
    /// Redis: a stream read by the local Streams mapping, or a pub/sub channel read by the local
    /// relay ([`redis`]); the template's functions as they are.
    Redis(RedisBroker),
}

impl PipelineConfig {
    /// A quiet run of `template` as `stack` on the files in `input_dir`: AWS's async-invoke retry
    /// delays, the template's settings as they are, no progress lines, 15 minutes at most.
    pub fn new(template: impl Into<PathBuf>, stack: impl Into<String>, input_dir: impl Into<PathBuf>) -> Self {
        PipelineConfig {
            broker: Broker::Kinesis,
            template: template.into(),
            stack: stack.into(),
            overrides: Vec::new(),
            input_dir: input_dir.into(),
            delay_scale: 1.0,
            extra_env: Vec::new(),
            mapping: RawSettings::default(),
            progress: false,
            verbose: false,
            timeout: Duration::from_secs(900),
            keep_running: false,
            caught_up_poll: None,
            fast_polling: false,
            realism: RealismConfig::new(crate::realism::Profile::Off, 0),
            run_dir: std::env::temp_dir().join(format!(
                "pushpull-run-{}-{}",
                std::process::id(),
                crate::cloudwatch::now_ms()
            )),
            report_dir: None,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The resources used.
    pub bucket: String,
    /// The stream.
    pub stream: String,
    /// The push function's summary of each object.
    pub objects: Vec<Value>,
    /// The event source mapping.
    pub mapping: Summary,
    /// The async-invoke delivery of S3 events.
    pub delivery: AsyncSummary,
    /// What the input holds.
    pub expected_good: u64,
    /// Bad lines in the input.
    pub expected_bad: u64,
    /// Expected totals per group.
    pub expected: Totals,
    /// The rollup per group, from the output objects.
    pub rollup: Totals,
    /// Output objects.
    pub outputs: usize,
    /// Quarantine entries.
    pub quarantined: Vec<Value>,
    /// Messages in the push and pull failure queues.
    pub failure_queues: (u64, u64),
    /// Upload to first pull invocation, per line: p50, p95, p99, max (ms).
    pub latency_ms: [f64; 4],
    /// Wall time.
    pub elapsed: Duration,
    /// What the realism layer injected (none when it was off).
    pub faults: Option<FaultTable>,
    /// The run as CloudWatch would show it, from its EMF lines, with the template's alarms.
    pub observed: Observed,
    /// Where the run's metrics and summary are.
    pub run_dir: PathBuf,
    /// The input's good lines as the stream holds them, read back at the end of the run.
    pub stream_lines: StreamLines,
    /// With `--broker kafka`: the broker's bootstrap address, the topic and the consumer group.
    pub kafka: Option<KafkaRun>,
    /// With `--broker rabbitmq`: the broker, the queue and what was left in it.
    pub rabbitmq: Option<QueueRun>,
    /// With `--broker sqs`: the queue and what was left in it.
    pub sqs: Option<QueueRun>,
    /// With `--broker redis-streams` or `redis-pubsub`: the stream or channel, and what was lost.
    pub redis: Option<RedisRun>,
}

/// Where a queue's messages were (RabbitMQ, SQS).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueRun {
    /// RabbitMQ: the broker's AMQP URL as a client uses it (the sample's local credentials and
    /// virtual host: reachable after the run with `KEEP_RUNNING=1`); another broker's without its
    /// password. SQS: the queue's URL.
    pub url: String,
    /// The queue.
    pub queue: String,
    /// Its dead-letter queue (messages delivered more than the queue's delivery limit).
    pub dead_letters: String,
    /// Messages the mapping handed to the function, redeliveries and republished copies included.
    pub deliveries: u64,
    /// Messages left in the queue at the end.
    pub left: u32,
    /// Messages in the dead-letter queue at the end.
    pub dead_lettered: u32,
}

impl Report {
    /// The queue a RabbitMQ or SQS run went through.
    fn queue_run(&self) -> Option<&QueueRun> {
        self.rabbitmq.as_ref().or(self.sqs.as_ref()).or(self.redis.as_ref().map(|r| &r.queue))
    }
}

/// Where a Kafka run's records were.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KafkaRun {
    /// The broker's own address (reachable after the run with `KEEP_RUNNING=1`).
    pub bootstrap_servers: String,
    /// `<stack>-records`.
    pub topic: String,
    /// The mapping's consumer group.
    pub group: String,
}

/// The input's good lines in the stream (by xxh3 of each line; a KPL aggregate counted as the
/// user records it packs), every shard read from its start. A line the input holds n times must
/// be there n times.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StreamLines {
    /// Good lines in the stream once (as often as in the input).
    pub once: u64,
    /// Copies of good lines beyond what the input holds (a line sent twice).
    pub extra: u64,
    /// Copies of good lines the stream lacks (a line lost).
    pub missing: u64,
    /// Distinct records in the stream that are no line of this input (an earlier run's, on the
    /// same stream).
    pub other: u64,
}

impl StreamLines {
    /// Compares the input's good lines with the stream's records (counts by xxh3).
    pub fn of(expected: &HashMap<u64, u32>, in_stream: &HashMap<u64, u32>) -> Self {
        let mut out = StreamLines::default();
        for (h, &want) in expected {
            let have = in_stream.get(h).copied().unwrap_or(0);
            match have.cmp(&want) {
                std::cmp::Ordering::Less => {
                    out.once += u64::from(have);
                    out.missing += u64::from(want - have);
                }
                std::cmp::Ordering::Equal => out.once += u64::from(want),
                std::cmp::Ordering::Greater => {
                    out.once += u64::from(want);
                    out.extra += u64::from(have - want);
                }
            }
        }
        out.other = in_stream.keys().filter(|h| !expected.contains_key(h)).count() as u64;
        out
    }
}

impl Report {
    /// The summary as JSON (`summary.json` in the run and report directories): what the run did
    /// and what CloudWatch would show of it.
    pub fn summary_json(&self) -> Value {
        serde_json::json!({
            "elapsed_s": self.elapsed.as_secs_f64(),
            "bucket": self.bucket,
            "stream": self.stream,
            "objects": self.objects.len(),
            "lines": self.total("lines"),
            "records_sent": self.total("records"),
            "put_calls": self.total("put_calls"),
            "quarantined": self.quarantined.len(),
            "rolled_up": self.rollup.values().map(|g| g.0).sum::<u64>(),
            "expected_good": self.expected_good,
            "exact": self.check().is_ok(),
            "stream_lines": self.stream_lines,
            "failure_queues": {"push": self.failure_queues.0, "pull": self.failure_queues.1},
            "latency_ms": {"p50": self.latency_ms[0], "p95": self.latency_ms[1], "p99": self.latency_ms[2], "max": self.latency_ms[3]},
            "faults": self.faults.as_ref().map(|f| f.counts.clone()),
            "observed": self.observed,
            "rabbitmq": self.rabbitmq.as_ref().map(|m| serde_json::json!({
                "url": m.url, "queue": m.queue, "dead_letters": m.dead_letters,
                "deliveries": m.deliveries, "left": m.left, "dead_lettered": m.dead_lettered,
            })),
            "sqs": self.sqs.as_ref().map(|m| serde_json::json!({
                "queue_url": m.url, "queue": m.queue, "dead_letters": m.dead_letters,
                "deliveries": m.deliveries, "left": m.left, "dead_lettered": m.dead_lettered,
            })),
            "kafka": self.kafka.as_ref().map(|k| serde_json::json!({
                "bootstrap_servers": k.bootstrap_servers, "topic": k.topic, "group": k.group,
            })),
        })
    }

    /// Writes [`Report::summary_json`] to `summary.json` in `dir`.
    pub fn write_summary(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let text = serde_json::to_string_pretty(&self.summary_json()).map_err(std::io::Error::other)?;
        std::fs::write(dir.join("summary.json"), text + "\n")
    }

    /// A count summed over the objects processed in this run.
    fn total(&self, field: &str) -> u64 {
        self.objects.iter().filter(|o| o["outcome"] == "processed").map(|o| o[field].as_u64().unwrap_or(0)).sum()
    }

    /// Whether every good line is in the stream once, the rollup equals the input exactly, and
    /// every bad line is quarantined with a reason.
    pub fn check(&self) -> Result<(), String> {
        let counted: u64 = self.rollup.values().map(|g| g.0).sum();
        // Pub/sub's loss first: it is why the rest differs.
        if let Some(r) = self.redis.as_ref().filter(|r| r.lost > 0) {
            return Err(format!(
                "lost {}: {} published, {} delivered (Redis pub/sub delivers at most once; Redis cut the relay off {} times)",
                r.lost, r.published, r.queue.deliveries, r.disconnects
            ));
        }
        if self.rollup != self.expected {
            let diff: Vec<String> = self
                .expected
                .keys()
                .chain(self.rollup.keys())
                .filter(|k| self.expected.get(*k) != self.rollup.get(*k))
                .take(5)
                .map(|k| format!("{k}: expected {:?}, rolled up {:?}", self.expected.get(k), self.rollup.get(k)))
                .collect();
            return Err(format!(
                "the rollup counts {counted} records, the input has {} good lines; first differences: {diff:?}",
                self.expected_good
            ));
        }
        let s = &self.stream_lines;
        if s.extra > 0 || s.missing > 0 {
            return Err(format!(
                "the stream holds {} extra copies of good lines and misses {} (of {})",
                s.extra, s.missing, self.expected_good
            ));
        }
        if let Some(m) = self.queue_run()
            && (m.left > 0 || m.dead_lettered > 0)
        {
            return Err(format!(
                "{} messages left in queue {} and {} dead-lettered in {}",
                m.left, m.queue, m.dead_lettered, m.dead_letters
            ));
        }
        if self.quarantined.len() as u64 != self.expected_bad {
            return Err(format!(
                "{} lines quarantined, the input has {} bad lines",
                self.quarantined.len(),
                self.expected_bad
            ));
        }
        if let Some(q) = self
            .quarantined
            .iter()
            .find(|q| q["reason"].as_str().is_none_or(str::is_empty) || q["line"].as_u64().is_none())
        {
            return Err(format!("a quarantine entry without line or reason: {q}"));
        }
        Ok(())
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let counted: u64 = self.rollup.values().map(|g| g.0).sum();
        let outcomes = |o: &str| self.objects.iter().filter(|x| x["outcome"] == o).count();
        writeln!(f, "summary ({:.1} s)", self.elapsed.as_secs_f64())?;
        writeln!(
            f,
            "  objects          {} ({} processed, {} already done before)",
            self.objects.len(),
            outcomes("processed"),
            outcomes("already_done")
        )?;
        writeln!(f, "  lines            {} read this run ({} blank)", self.total("lines"), self.total("blank_lines"))?;
        writeln!(
            f,
            "  records sent     {} in {} PutRecords calls ({} entries resent)",
            self.total("records"),
            self.total("put_calls"),
            self.total("resent")
        )?;
        writeln!(
            f,
            "  quarantined      {} lines in s3://{}/quarantine/ (input has {} bad)",
            self.quarantined.len(),
            self.bucket,
            self.expected_bad
        )?;
        writeln!(
            f,
            "  S3 events        {} delivered, {} invocations, {} retries, {} to the failure queue",
            self.delivery.events,
            self.delivery.invocations,
            self.delivery.retries,
            self.delivery.retries_exhausted + self.delivery.expired
        )?;
        writeln!(f, "  pull mapping")?;
        writeln!(f, "{}", self.mapping)?;
        writeln!(f, "  failure queues   push {}, pull {} messages", self.failure_queues.0, self.failure_queues.1)?;
        writeln!(
            f,
            "  latency          upload -> pull invocation per line: p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            self.latency_ms[0], self.latency_ms[1], self.latency_ms[2], self.latency_ms[3]
        )?;
        writeln!(
            f,
            "  rollup           {counted} records in {} groups from {} output objects (input: {} good lines){}",
            self.rollup.len(),
            self.outputs,
            self.expected_good,
            if self.check().is_ok() { ": exact" } else { ": MISMATCH" }
        )?;
        writeln!(f, "                   {:>10} {:>8} {:>14}", "group", "count", "sum")?;
        for (k, (c, s)) in self.rollup.iter().take(20) {
            writeln!(f, "                   {k:>10} {c:>8} {:>14}", s.to_string())?;
        }
        if self.rollup.len() > 20 {
            writeln!(f, "                   ... {} more groups", self.rollup.len() - 20)?;
        }
        if let Some(faults) = &self.faults {
            write!(f, "{faults}")?;
        }
        write!(f, "{}", self.observed)?;
        writeln!(
            f,
            "  run directory    {} (metrics.ndjson: every EMF line of the run; summary.json)",
            self.run_dir.display()
        )?;
        if let Some(k) = &self.kafka {
            writeln!(
                f,
                "  kafka            broker {} (its own address), topic {}, consumer group {}",
                k.bootstrap_servers, k.topic, k.group
            )?;
        }
        if let Some(m) = &self.rabbitmq {
            writeln!(
                f,
                "  rabbitmq         broker {} (as a client uses it), queue {}, dead letters {}",
                m.url, m.queue, m.dead_letters
            )?;
        }
        if let Some(m) = &self.sqs {
            writeln!(f, "  sqs              queue {}, dead letters {}", m.url, m.dead_letters)?;
        }
        if let Some(r) = &self.redis {
            match r.pubsub {
                true => writeln!(
                    f,
                    "  redis            channel {} on {}: {} published, {} delivered, lost {} ({} cut-offs by Redis)",
                    r.queue.queue, r.queue.url, r.published, r.queue.deliveries, r.lost, r.disconnects
                )?,
                false => writeln!(
                    f,
                    "  redis            stream {} on {}, dead letters {}: {} sent, {} deliveries",
                    r.queue.queue, r.queue.url, r.queue.dead_letters, r.published, r.queue.deliveries
                )?,
            }
        }
        let s = &self.stream_lines;
        if let Some(m) = self.queue_run() {
            writeln!(
                f,
                "  queue lines      {} good lines delivered, {} never; {} deliveries in all (redeliveries and republished copies: the rollup counts each message id once); {} left in the queue, {} dead-lettered",
                s.once, s.missing, m.deliveries, m.left, m.dead_lettered
            )?;
        } else {
            let place = if self.kafka.is_some() { "topic" } else { "stream" };
            write!(
                f,
                "  {place} lines{}{} good lines in the {place} once each, {} extra copies, {} missing",
                if self.kafka.is_some() { "      " } else { "     " },
                s.once,
                s.extra,
                s.missing
            )?;
            if s.other > 0 {
                write!(f, " ({} other records: earlier runs on this stream)", s.other)?;
            }
            writeln!(f)?;
        }
        let place = if self.kafka.is_some() {
            "topic"
        } else if self.queue_run().is_some() {
            "queue"
        } else {
            "stream"
        };
        match self.check() {
            Ok(()) if self.queue_run().is_some() => writeln!(
                f,
                "  totals           exact: every good line through the queue, the rollup equals the input (each message counted once), every bad line quarantined once"
            ),
            Ok(()) => writeln!(
                f,
                "  totals           exact: every good line in the {place} once, the rollup equals the input, every bad line quarantined once"
            ),
            Err(e) => writeln!(f, "  totals           NOT exact: {e}"),
        }
    }
}

/// The `p` quantile (0..=1) of sorted values, nearest rank; 0 when empty.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn percentiles(mut v: Vec<f64>) -> [f64; 4] {
    v.sort_by(f64::total_cmp);
    [0.5, 0.95, 0.99, 1.0].map(|q| percentile(&v, q))
}

/// Runs the pipeline once over `config.input_dir` and reports. Everything it starts (function
/// processes, the mapping, the S3 event delivery) is stopped before it returns.
pub async fn run(config: PipelineConfig) -> Result<Report, PipelineError> {
    let started = Instant::now();
    let started_ms = crate::cloudwatch::now_ms();
    // `--broker kafka` is the template's Kafka variant on the broker the run was given.
    let mut overrides = config.overrides.clone();
    if let Broker::Kafka { bootstrap_servers } = &config.broker {
        overrides.push("Broker=kafka".into());
        overrides.push(format!("KafkaBootstrapServers={bootstrap_servers}"));
    }
    // `--broker rabbitmq`: the template's RabbitMQ variant; the broker user's credentials go into
    // a secret (the mapping's BASIC_AUTH), as on AWS.
    let mut rabbitmq_control = None;
    if let Broker::RabbitMq { url, control } = &config.broker {
        let given = RabbitMqSource { url: url.clone(), queue: String::new(), broker_arn: None };
        let (username, password) = given.credentials();
        let secret = crate::localstack::secrets::put(
            &format!("{}-rabbitmq", config.stack),
            &serde_json::json!({"username": username, "password": password}),
        )
        .await
        .map_err(|e| PipelineError::Run(format!("the broker's secret in LocalStack's Secrets Manager: {e}")))?;
        overrides.push("Broker=rabbitmq".into());
        overrides.push(format!("RabbitMqEndpoint={}", given.endpoint()));
        overrides.push(format!("RabbitMqSecretArn={secret}"));
        overrides.push(format!("RabbitMqVirtualHost={}", given.vhost()));
        rabbitmq_control = control.clone();
    }
    if let Broker::Sqs { fifo } = &config.broker {
        overrides.push("Broker=sqs".into());
        if *fifo {
            overrides.push("SqsFifo=true".into());
            // A FIFO queue's mapping takes at most 10 messages a batch.
            if !overrides.iter().any(|o| o.starts_with("BatchSize=")) {
                overrides.push("BatchSize=10".into());
            }
        }
    }
    let mut t = Template::load(&config.template, &config.stack, &overrides)?;
    let metric_log = MetricLog::install(&config.run_dir.join("metrics.ndjson"))
        .map_err(|e| PipelineError::io(format!("run directory {}", config.run_dir.display()), e))?;
    let local = Local::connect().await.map_err(PipelineError::NotRunning)?;
    let r = provision(&mut t, &local).await?;
    let t = t;
    let group_by = t.parameters.get("GroupByField").cloned().unwrap_or_default();
    let sum_field = t.parameters.get("SumField").cloned().unwrap_or_default();
    // --overload: the input many times over (under other names), enough to outrun the function.
    let input_dir = match &config.broker {
        Broker::Redis(b) if b.overload => redis::overload_input(&config.input_dir, &config.run_dir)?,
        _ => config.input_dir.clone(),
    };
    let expected = expected(&input_dir, &group_by, &sum_field)?;

    let push_binary = t.function_with_event("S3")?.binary;
    let extra_env: Vec<(&str, Vec<(String, String)>)> =
        config.extra_env.iter().map(|(binary, env)| (*binary, env.clone())).collect();
    // The template's Kafka variant (Broker=kafka): the push function's environment names the
    // topic and servers, and the rollup's SelfManagedKafka event is the mapping.
    let kafka_mapping = RawSettings::from_template_kafka(&t, None)?;
    let mut topic_partitions = 0;
    if let Some((_, source)) = &kafka_mapping {
        // As many partitions as the template gives the stream shards.
        let partitions = t.parameters.get("ShardCount").and_then(|n| n.parse().ok()).unwrap_or(4);
        topic_partitions =
            crate::mapping::kafka::admin::ensure_topic(&source.bootstrap_servers.join(","), &source.topic, partitions)
                .await
                .map_err(|e| PipelineError::Run(e.to_string()))?;
    }
    // The template's RabbitMQ variant (Broker=rabbitmq): the MQ event names the broker, the
    // queue, the secret with the broker user's credentials and the virtual host; the queue is set
    // up as the sample's provisioning sets it up (a quorum queue with a delivery limit and a
    // dead-letter queue).
    let mq_mapping = match RawSettings::from_template_mq(&t, None)? {
        None => None,
        Some((raw, event)) => {
            let Broker::RabbitMq { url, .. } = &config.broker else {
                return Err(PipelineError::Run(
                    "the template's MQ mapping needs the broker: run with --broker rabbitmq".into(),
                ));
            };
            let secret_arn = event.secret_arn.clone().ok_or_else(|| {
                PipelineError::Run("the MQ event has no BASIC_AUTH in its SourceAccessConfigurations".into())
            })?;
            let secret =
                crate::localstack::secrets::json(&secret_arn).await.map_err(|e| PipelineError::Run(e.to_string()))?;
            let field = |k: &str| secret[k].as_str().unwrap_or_default().to_owned();
            let endpoint = RabbitMqSource { url: url.clone(), queue: String::new(), broker_arn: None }.endpoint();
            let source = event.source(&endpoint, &field("username"), &field("password"));
            let dead_letters = crate::mapping::rabbitmq::admin::ensure_queue(&source)
                .await
                .map_err(|e| PipelineError::Run(e.to_string()))?;
            Some((raw, source, dead_letters))
        }
    };
    // The template's SQS variant (Broker=sqs): the queue provisioning created, as SQS describes it.
    let sqs_mapping = match RawSettings::from_template_sqs(&t, None)? {
        None => None,
        Some((raw, arn, timeout)) => {
            let source = crate::mapping::sqs::describe(&local.sqs, &arn, crate::mapping::sqs::LONG_POLL_SECONDS)
                .await
                .map_err(|e| PipelineError::Run(e.to_string()))?;
            Some((raw, source, timeout))
        }
    };
    let mut specs = template_specs(&t, &extra_env, config.verbose)?;
    // Redis: the push function sends to the stream or channel; with --overload the rollup is slow.
    let redis_broker = match &config.broker {
        Broker::Redis(b) => Some(b.clone()),
        _ => None,
    };
    let redis_name = format!("{}-records", config.stack);
    if let Some(b) = &redis_broker {
        for spec in &mut specs {
            if spec.binary.file_name().is_some_and(|n| n == std::ffi::OsStr::new(&push_binary)) {
                spec.env.push(("REDIS_URL".into(), b.url.clone()));
                let key = if b.pubsub { "REDIS_CHANNEL" } else { "REDIS_STREAM" };
                spec.env.push((key.into(), redis_name.clone()));
            } else if b.overload && spec.name == r.pull_function {
                let ms = redis::OVERLOAD_FUNCTION_DELAY.as_millis().to_string();
                spec.env.push(("PUSHPULL_INJECT_DELAY_MS".into(), ms));
            }
        }
        if let (true, true, Some(script)) = (b.pubsub, b.overload, &b.control) {
            let [hard, soft, seconds] = redis::OVERLOAD_PUBSUB_LIMIT;
            redis::control(script, &b.url, &["set-pubsub-limit", hard, soft, seconds])?;
        }
    }
    // CloudFormation resolves dynamic references (`{{resolve:secretsmanager:...}}`) at
    // deployment: the functions' environment gets the secrets' values.
    for spec in &mut specs {
        for (_, value) in &mut spec.env {
            if value.contains("{{resolve:") {
                *value = crate::localstack::secrets::resolve_references(value)
                    .await
                    .map_err(|e| PipelineError::Run(format!("function {}: {e}", spec.name)))?;
            }
        }
    }
    let realism = Arc::new(Realism::new(config.realism.clone()));
    let mut mq_source = None;
    let mut sqs_source = None;
    let (settings, kafka_source) = match (kafka_mapping, mq_mapping, sqs_mapping) {
        (Some((raw, source)), _, _) => (raw.overlay(config.mapping.clone()).validate_kafka(&source)?, Some(source)),
        (None, Some((raw, source, dead_letters)), _) => {
            let settings = raw.overlay(config.mapping.clone()).validate_rabbitmq(&source)?;
            mq_source = Some((source, dead_letters));
            (settings, None)
        }
        (None, None, Some((raw, source, timeout))) => {
            let settings = raw.overlay(config.mapping.clone()).validate_sqs(&source, timeout)?;
            sqs_source = Some(source);
            (settings, None)
        }
        (None, None, None) if redis_broker.as_ref().is_some_and(|b| !b.pubsub) => {
            // The template's batch settings; the rest of its Kinesis mapping (its destination,
            // bisection, record age) has no meaning on a Redis stream.
            let t_raw = RawSettings::from_template(&t, None)?;
            let raw = RawSettings {
                function: t_raw.function,
                batch_size: t_raw.batch_size,
                batching_window: t_raw.batching_window,
                function_response_types: t_raw.function_response_types,
                ..RawSettings::default()
            };
            let b = redis_broker.as_ref().map(|b| b.url.clone()).unwrap_or_default();
            let source = redis_source(&b, &redis_name, &r.pull_function);
            (raw.overlay(config.mapping.clone()).validate_redis_streams(&source)?, None)
        }
        (None, None, None) => (RawSettings::from_template(&t, None)?.overlay(config.mapping.clone()).validate()?, None),
    };
    let sqs = match &sqs_source {
        None => None,
        Some(source) => Some(QueueRun {
            url: source.queue_url.clone(),
            queue: source.name().to_owned(),
            dead_letters: dead_letter_queue(&local, source).await?.unwrap_or_default(),
            ..QueueRun::default()
        }),
    };
    let rabbitmq = mq_source.as_ref().map(|(source, dead_letters)| QueueRun {
        // The sample's own broker with its local credentials, as a client would use it; another
        // broker's password is not printed.
        url: if rabbitmq_control.is_some() { source.url.clone() } else { source.redacted() },
        queue: source.queue.clone(),
        dead_letters: dead_letters.clone(),
        ..QueueRun::default()
    });
    // Enhanced fan-out is served by the proxy (true push: `realism::fanout`), so a mapping on a
    // stream consumer reads through it even with the realism layer off.
    let fan_out = settings.consumer_arn.is_some();
    let proxy = match config.realism.is_on() || fan_out {
        true => {
            let policies = Policies::from_template(&t)?;
            let proxy = RealismProxy::start(realism.clone(), policies.clone(), &crate::localstack::endpoint())
                .await
                .map_err(|e| PipelineError::io("realism proxy", e))?;
            for spec in &mut specs {
                spec.env.push(("AWS_ENDPOINT_URL".into(), proxy.endpoint()));
                if let Some(key) = policies.key_of_function(&spec.name).filter(|_| config.realism.iam) {
                    spec.env.push(("AWS_ACCESS_KEY_ID".into(), key));
                }
            }
            Some((proxy, policies))
        }
        false => None,
    };
    let throttling = config.realism.is_on().then(|| realism.clone());
    let server = InvokeServer::start_with(specs, 0, 10, throttling.clone())
        .await
        .map_err(|e| PipelineError::io("Invoke API server", e))?;
    let mut clients = Clients::from(&local);
    let mut mapping_sqs = None;
    if let Some((proxy, policies)) = &proxy {
        // The mapping reads the stream as AWS's does: with the function's role, under the
        // shard's limits (shared with every other reader).
        let key = policies.key_of_function(&r.pull_function).filter(|_| config.realism.iam);
        let key = key.as_deref().unwrap_or("test");
        clients.kinesis = match fan_out {
            // SubscribeToShard is HTTP/2.
            true => crate::http2::kinesis(&proxy.endpoint(), key).await,
            false => Local::at(&proxy.endpoint(), key).await.kinesis,
        };
        // An SQS mapping receives and deletes through it too, with SQS's faults (its own client:
        // the S3 event delivery's queue is not the mapping's).
        if sqs_source.is_some() {
            mapping_sqs = Some(Local::at(&proxy.endpoint(), key).await.sqs);
        }
    }

    let mapping_enabled = settings.enabled;
    let mut options = RunnerOptions::new(&settings, Store::s3(local.s3.clone(), &r.bucket, "checkpoints/esm"));
    if config.fast_polling {
        options = options.fast_polling();
    }
    let (delivered_tx, mut delivered_rx) = mpsc::unbounded_channel::<Delivered>();
    options.delivered = Some(delivered_tx);
    if let Some(poll) = config.caught_up_poll {
        options.caught_up_poll = poll;
    }
    let kafka = kafka_source.as_ref().map(|k| KafkaRun {
        bootstrap_servers: k.bootstrap_servers.join(","),
        topic: k.topic.clone(),
        group: k.consumer_group_id.clone().unwrap_or_else(|| settings.uuid()),
    });
    // Kafka in a storm: the mapping dials the broker through the fault proxy.
    let kafka_proxy = match &kafka_source {
        Some(k) if kafka_faults_on(&config.realism) => Some(Arc::new(
            KafkaFaultProxy::start(realism.clone(), &k.bootstrap_servers)
                .map_err(|e| PipelineError::io("Kafka realism proxy", e))?,
        )),
        _ => None,
    };
    if let Some(p) = &kafka_proxy {
        options.kafka_via = Some(p.bootstrap());
    }
    let mapping = match (kafka_source, &mq_source, &sqs_source, &redis_broker) {
        (Some(source), _, _, _) => {
            Reader::Mapping(Runner::start_kafka(settings, source, options, clients.clone(), server.client()))
        }
        (None, Some((source, _)), _, _) => {
            Reader::Mapping(Runner::start_rabbitmq(settings, source.clone(), options, clients.clone(), server.client()))
        }
        (None, None, Some(source), _) => {
            let clients = Clients { sqs: mapping_sqs.unwrap_or_else(|| clients.sqs.clone()), ..clients.clone() };
            Reader::Mapping(Runner::start_sqs(settings, source.clone(), options, clients, server.client()))
        }
        (None, None, None, Some(b)) if b.pubsub => {
            let relay = crate::relay::RelayConfig {
                url: b.url.clone(),
                channel: redis_name.clone(),
                pattern: false,
                function: settings.function_name.clone(),
                concurrency: if b.overload { redis::OVERLOAD_CONCURRENCY } else { redis::RELAY_CONCURRENCY },
                delivered: options.delivered.clone(),
                max_batch: 0,
            };
            Reader::Relay(crate::relay::start(relay, server.client()).map_err(|e| PipelineError::Run(e.to_string()))?)
        }
        (None, None, None, Some(b)) => {
            let source = redis_source(&b.url, &redis_name, &r.pull_function);
            Reader::Mapping(Runner::start_redis_streams(settings, source, options, clients.clone(), server.client()))
        }
        (None, None, None, None) => Reader::Mapping(Runner::start(settings, options, clients.clone(), server.client())),
    };
    let redis_run = redis_broker.as_ref().map(|b| RedisRun {
        queue: QueueRun {
            url: b.url.clone(),
            queue: redis_name.clone(),
            dead_letters: if b.pubsub { String::new() } else { format!("{redis_name}:dead-letter") },
            ..QueueRun::default()
        },
        pubsub: b.pubsub,
        ..RedisRun::default()
    });

    let (responses_tx, mut responses_rx) = mpsc::unbounded_channel();
    let push = AsyncSettings::from_template(&t, &push_binary, config.delay_scale)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let delivery = {
        let (clients, invoker, queue) = (clients.clone(), server.client(), r.s3_events_queue.clone());
        let options = DeliveryOptions { responses: Some(responses_tx), realism: throttling, ..Default::default() };
        tokio::spawn(
            async move { crate::async_invoke::deliver(push, clients, invoker, &queue, options, stop_rx).await },
        )
    };

    // SQS publishes its queues' depths to CloudWatch by itself; locally they are sampled.
    let sampler = {
        let (local, queues) = (local.clone(), [r.push_failure_queue.clone(), r.pull_failure_queue.clone()]);
        tokio::spawn(async move {
            loop {
                sample_queues(&local, &queues).await;
                tokio::time::sleep(QUEUE_SAMPLE_EVERY).await;
            }
        })
    };
    let uploads = upload(&local, &r, &expected.files).await?;
    // A stranger in the consumer group and broker restarts, by turns.
    let disruptions = match (&kafka_proxy, &kafka, config.realism.kafka_disruption_every) {
        (Some(proxy), Some(k), Some(every)) => {
            Some(Disruptions::start(proxy.clone(), realism.clone(), k.clone(), every))
        }
        _ => None,
    };
    // The broker's connections closed and the broker restarted, by turns.
    let mut calm_since: Option<Instant> = None;
    let rabbitmq_calm = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut rabbitmq_disruptions = match (&rabbitmq_control, config.realism.rabbitmq_disruption_every, &rabbitmq) {
        (Some(control), Some(every), Some(_)) => Some(rabbitmq_disruptions(
            control.clone(),
            realism.clone(),
            every,
            config.realism.rabbitmq_restarts,
            rabbitmq_calm.clone(),
        )),
        _ => None,
    };
    let on_a_stream = kafka.is_none() && rabbitmq.is_none() && sqs.is_none() && redis_run.is_none();
    let reshard = config.realism.reshard_after.filter(|_| on_a_stream).map(|after| {
        let (local, stream, realism) = (local.clone(), r.stream.clone(), realism.clone());
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            match split_a_shard(&local, &stream).await {
                Ok(shard) => {
                    realism.count("kinesis.reshard", 1);
                    tracing::info!(stream, shard, "realism: split a shard mid-run");
                }
                Err(e) => tracing::warn!(stream, error = %e, "realism: could not split a shard"),
            }
            // And half as long later, two adjacent shards merged.
            tokio::time::sleep(after / 2).await;
            match merge_two_shards(&local, &stream).await {
                Ok((a, b)) => {
                    realism.count("kinesis.reshard", 1);
                    tracing::info!(stream, a, b, "realism: merged two shards mid-run");
                }
                Err(e) => tracing::warn!(stream, error = %e, "realism: could not merge two shards"),
            }
        })
    });
    let mut summaries: HashMap<String, Value> = HashMap::new();
    let mut latencies = Vec::new();
    let display = if config.progress { Display::Auto } else { Display::Off };
    let mut live = LiveProgress::new(display, Some(uploads.len() as u64), Some(expected.good));
    let mut pushed_at: Option<f64> = None;
    // RabbitMQ keeps no record of what it delivered: the lines seen by the mapping, counted.
    let mut delivered: HashMap<u64, u32> = HashMap::new();
    let result = loop {
        while let Ok((_, response)) = responses_rx.try_recv() {
            let v: Value = serde_json::from_slice(&response).unwrap_or(Value::Null);
            for o in v["objects"].as_array().into_iter().flatten() {
                // A delivery left to a live owner says nothing about the object being done.
                if o["outcome"].get("deferred").is_some() {
                    continue;
                }
                if let Some(k) = o["key"].as_str() {
                    // A duplicate event's `already_done` does not replace the run that processed it.
                    let processed = summaries.get(k).is_some_and(|s| s["outcome"] == "processed");
                    if !processed || o["outcome"] == "processed" {
                        summaries.insert(k.to_owned(), o.clone());
                    }
                }
            }
        }
        while let Ok(d) = delivered_rx.try_recv() {
            if let Some(&file) = expected.lines.get(&d.hash) {
                latencies.push((d.invoked_at - uploads[file].1) * 1000.0);
            }
            if rabbitmq.is_some() || sqs.is_some() || redis_run.is_some() {
                *delivered.entry(d.hash).or_insert(0) += 1;
            }
        }
        let (records_read, invocations) = mapping.progress();
        let pushed = uploads.iter().filter(|(k, _)| summaries.contains_key(k)).count();
        let sent: u64 = summaries
            .values()
            .filter(|o| o["outcome"] == "processed")
            .map(|o| o["records"].as_u64().unwrap_or(0))
            .sum();
        live.update(&Update {
            elapsed: started.elapsed(),
            objects: Some((pushed as u64, uploads.len() as u64)),
            records_sent: Some(sent),
            records_pulled: records_read,
            invocations,
            iterator_age_ms: mapping.iterator_age_ms(),
        });
        if pushed == uploads.len() && pushed_at.is_none() {
            pushed_at = Some(crate::mapping::now_unix());
        }
        // Done: every object pushed, then every shard read to its end since, and nothing undone.
        // On Kafka, the mapping must hold every partition: while a stranger holds some (or their
        // hand-back is under way), the ones it still holds being caught up says nothing of them.
        let holds_all = kafka.is_none() || mapping.reading() == topic_partitions as usize;
        if pushed_at.is_some_and(|t| mapping.caught_up_since().is_some_and(|c| c > t)) && mapping.is_idle() && holds_all
        {
            // RabbitMQ in a storm: a quorum queue just restarted counts the messages it requeued
            // only once it has recovered them (a queue found empty then held 892 of them). So the
            // storm ends here, and the run is done once the queue has stayed empty for
            // `RABBITMQ_CALM` after the last disruption, the mapping idle and caught up.
            if let Some(d) = rabbitmq_disruptions.take() {
                rabbitmq_calm.store(true, std::sync::atomic::Ordering::SeqCst);
                // Its disruption under way finishes (a restart's start included).
                let _ = d.await;
                calm_since = Some(Instant::now());
                tracing::info!("realism: the RabbitMQ storm ends; the queue must stay empty for {RABBITMQ_CALM:?}");
            }
            let calm = match (calm_since, &mq_source) {
                (Some(since), Some((source, _))) => {
                    since.elapsed() >= RABBITMQ_CALM
                        && crate::mapping::rabbitmq::admin::depth(source, &source.queue).await.is_ok_and(|d| d == 0)
                }
                _ => true,
            };
            if calm {
                break Ok(());
            }
        }
        // A disabled mapping (`Enabled: false`) reads nothing: done once everything is pushed.
        if !mapping_enabled && pushed_at.is_some() {
            break Ok(());
        }
        if mapping.is_finished() {
            break Err(PipelineError::Run("the event source mapping stopped".into()));
        }
        if delivery.is_finished() {
            break Err(PipelineError::Run("the S3 event delivery stopped".into()));
        }
        if started.elapsed() > config.timeout {
            break Err(PipelineError::Run(format!(
                "not done after {:?}: {pushed}/{} objects pushed, {sent} records sent, {} pulled; the mapping {} caught up, {} idle, reads {} partitions",
                config.timeout,
                uploads.len(),
                records_read,
                if mapping.caught_up_since().is_some() { "is" } else { "is not" },
                if mapping.is_idle() { "is" } else { "not" },
                mapping.reading(),
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    live.finish();
    if result.is_ok() && config.keep_running {
        let (rollup, outputs) = rollup_totals(&local, &r).await?;
        println!(
            "rollup so far: {} records in {} groups from {outputs} output objects",
            rollup.values().map(|g| g.0).sum::<u64>(),
            rollup.len()
        );
        println!(
            "still running: put NDJSON objects under s3://{}/{} (endpoint {}); Ctrl-C stops everything",
            r.bucket,
            r.input_prefix,
            crate::localstack::endpoint()
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    if let Some(r) = reshard {
        r.abort();
    }
    if let Some(d) = disruptions {
        d.stop().await;
    }
    if let Some(d) = rabbitmq_disruptions {
        // Not aborted: a restart cut between its stop and its start would leave the broker down.
        rabbitmq_calm.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = d.await;
    }
    let _ = stop_tx.send(true);
    let delivery = delivery.await.map_err(|source| PipelineError::Task { what: "S3 event delivery", source })?;
    let sent: u64 =
        summaries.values().filter(|o| o["outcome"] == "processed").map(|o| o["records"].as_u64().unwrap_or(0)).sum();
    let (mapping, relay_counts) = mapping.stop().await;
    drop(server);
    // --overload's small limit for a slow subscriber back to Redis's default.
    if let Some(b) = redis_broker.as_ref().filter(|b| b.pubsub && b.overload)
        && let Some(script) = &b.control
    {
        let [hard, soft, seconds] = redis::DEFAULT_PUBSUB_LIMIT;
        if let Err(e) = redis::control(script, &b.url, &["set-pubsub-limit", hard, soft, seconds]) {
            tracing::warn!(error = %e, "could not set Redis's pub/sub limit back");
        }
    }
    let delivery = match (result, delivery) {
        (Err(run), Err(e)) => return Err(PipelineError::Run(format!("{run}: the S3 event delivery: {e}"))),
        (Err(e), _) => return Err(e),
        (Ok(()), delivery) => delivery?,
    };
    let mapping = mapping?;

    sampler.abort();
    sample_queues(&local, &[r.push_failure_queue.clone(), r.pull_failure_queue.clone()]).await;
    let (observed, data, names) = observe(&t, &r, &metric_log, started_ms)?;
    if let Some(dir) = &config.report_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| PipelineError::io(format!("report directory {}", dir.display()), e))?;
        crate::report::draw(&data, &names, &observed, started_ms, &dir.join("run.png"))?;
    }
    let mut r = r;
    let mut rabbitmq = rabbitmq;
    let mut sqs = sqs;
    let mut redis_run = redis_run;
    let in_broker = match &kafka {
        None if rabbitmq.is_some() || sqs.is_some() || redis_run.is_some() => {
            // Each good line delivered at least once; copies beyond the input's are the push
            // function's republished lines and the broker's redeliveries, which the rollup
            // recognised by their message ids (counted in the summary, not in the stream check).
            if let (Some(m), Some((source, _))) = (rabbitmq.as_mut(), &mq_source) {
                use crate::mapping::rabbitmq::admin::depth;
                m.deliveries = delivered.values().map(|&n| u64::from(n)).sum();
                m.left = depth(source, &m.queue).await.map_err(|e| PipelineError::Run(e.to_string()))?;
                m.dead_lettered =
                    depth(source, &m.dead_letters).await.map_err(|e| PipelineError::Run(e.to_string()))?;
            }
            if let Some(m) = redis_run.as_mut() {
                // The rollup names its outputs after the stream or channel.
                r.stream = m.queue.queue.clone();
                m.queue.deliveries = delivered.values().map(|&n| u64::from(n)).sum();
                m.published = sent;
                match &relay_counts {
                    Some(c) => {
                        m.disconnects = c.disconnects;
                        m.lost = sent.saturating_sub(c.delivered);
                    }
                    None => {
                        let group = &r.pull_function;
                        let (left, dead) =
                            redis::stream_left(&m.queue.url, &m.queue.queue, group, &m.queue.dead_letters).await?;
                        (m.queue.left, m.queue.dead_lettered) = (left, dead);
                    }
                }
            }
            if let Some(m) = sqs.as_mut() {
                m.deliveries = delivered.values().map(|&n| u64::from(n)).sum();
                // In flight and delayed too: all of them are still to be handled.
                m.left = queue_holds(&local, &m.url).await? as u32;
                if !m.dead_letters.is_empty() {
                    m.dead_lettered = queue_holds(&local, &m.dead_letters).await? as u32;
                }
            }
            // An object an earlier run on this stack finished (`already_done`) sends nothing now:
            // its lines went through the queue then, and its rollup is in the outputs.
            let sent_now = |h: &u64| {
                expected
                    .lines
                    .get(h)
                    .is_none_or(|&file| summaries.get(&uploads[file].0).is_none_or(|o| o["outcome"] == "processed"))
            };
            expected
                .line_counts
                .iter()
                .map(|(h, &want)| match sent_now(h) {
                    true => (*h, delivered.get(h).copied().unwrap_or(0).min(want)),
                    false => (*h, want),
                })
                .collect()
        }
        None => stream_records(&local, &r.stream).await?,
        Some(k) => {
            // The rollup names its outputs after the topic.
            r.stream = k.topic.clone();
            crate::mapping::kafka::admin::value_counts(&k.bootstrap_servers, &k.topic, xxhash_rust::xxh3::xxh3_64)
                .await
                .map_err(|e| PipelineError::Run(e.to_string()))?
        }
    };
    let (rollup, outputs) = rollup_totals(&local, &r).await?;
    let stream_lines = StreamLines::of(&expected.line_counts, &in_broker);
    let report = Report {
        bucket: r.bucket.clone(),
        stream: r.stream.clone(),
        objects: uploads.iter().filter_map(|(k, _)| summaries.get(k).cloned()).collect(),
        mapping,
        delivery,
        expected_good: expected.good,
        expected_bad: expected.bad,
        expected: expected.totals,
        rollup,
        outputs,
        quarantined: quarantine(&local, &r).await?,
        failure_queues: (
            queue_depth(&local, r.push_failure_queue.as_deref()).await?,
            queue_depth(&local, r.pull_failure_queue.as_deref()).await?,
        ),
        latency_ms: percentiles(latencies),
        elapsed: started.elapsed(),
        faults: proxy.map(|(p, _)| p.realism().faults()),
        observed,
        run_dir: config.run_dir.clone(),
        stream_lines,
        kafka,
        rabbitmq,
        sqs,
        redis: redis_run,
    };
    for dir in std::iter::once(&config.run_dir).chain(config.report_dir.as_ref()) {
        report.write_summary(dir).map_err(|e| PipelineError::io(format!("summary in {}", dir.display()), e))?;
    }
    Ok(report)
}

/// The Streams source of a `--broker redis-streams` run: the group is the rollup function's name;
/// an entry pending 10 s is claimed again (a run is short), five deliveries at most.
fn redis_source(url: &str, stream: &str, function: &str) -> crate::mapping::RedisStreamSource {
    crate::mapping::RedisStreamSource {
        url: url.to_owned(),
        stream: stream.to_owned(),
        group: function.to_owned(),
        consumer: "pushpull-local".into(),
        claim_idle: Duration::from_secs(10),
        max_deliveries: 5,
        block: Duration::from_secs(1),
    }
}

/// The URL of `source`'s dead-letter queue (its redrive policy's `deadLetterTargetArn`), if it has
/// one.
async fn dead_letter_queue(local: &Local, source: &crate::mapping::SqsSource) -> Result<Option<String>, PipelineError> {
    let Some(policy) = &source.redrive_policy else { return Ok(None) };
    let v: Value = serde_json::from_str(policy).unwrap_or(Value::Null);
    let Some(name) = v["deadLetterTargetArn"].as_str().and_then(|a| a.rsplit(':').next()) else { return Ok(None) };
    let out = local
        .sqs
        .get_queue_url()
        .queue_name(name)
        .send()
        .await
        .map_err(|e| PipelineError::aws(format!("GetQueueUrl {name}"), e))?;
    Ok(out.queue_url().map(str::to_owned))
}

/// How long a RabbitMQ queue must stay empty after the storm's last disruption before a run is
/// done (a restarted quorum queue recovers what it requeued within seconds).
const RABBITMQ_CALM: Duration = Duration::from_secs(8);

/// How often the failure queues' depths are sampled (SQS publishes them once a minute; a local
/// run is short).
const QUEUE_SAMPLE_EVERY: Duration = Duration::from_secs(5);

fn queue_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

/// Writes each queue's `ApproximateNumberOfMessagesVisible` (`AWS/SQS`) to the run's metrics.
async fn sample_queues(local: &Local, queues: &[Option<String>]) {
    for url in queues.iter().flatten() {
        if let Ok(depth) = queue_depth(local, Some(url)).await {
            crate::cloudwatch::put(
                crate::cloudwatch::SQS,
                &[("QueueName", queue_name(url))],
                &[("ApproximateNumberOfMessagesVisible", "Count", depth as f64)],
            );
        }
    }
}

/// Closes the run's metric log and computes what CloudWatch would show, alarms included.
fn observe(
    t: &Template,
    r: &Resources,
    log: &MetricLog,
    started_ms: u64,
) -> Result<(Observed, Vec<crate::cloudwatch::Datum>, Names), PipelineError> {
    log.finish().map_err(|e| PipelineError::io("metrics log", e))?;
    let data = crate::cloudwatch::read(log.path()).map_err(|e| PipelineError::io("metrics log", e))?;
    let alarms = crate::alarms::from_template(t)?;
    let verdicts: Vec<_> = alarms.iter().map(|a| a.evaluate(&data)).collect();
    let names = Names {
        namespace: t.parameters.get("MetricsNamespace").cloned().unwrap_or_else(|| "pushpull".into()),
        push_function: r.push_function.clone(),
        pull_function: r.pull_function.clone(),
        queues: (
            r.push_failure_queue.as_deref().map(|u| queue_name(u).to_owned()),
            r.pull_failure_queue.as_deref().map(|u| queue_name(u).to_owned()),
        ),
    };
    let observed = Observed::from_data(&data, &names, &verdicts, started_ms);
    Ok((observed, data, names))
}

/// Splits the first open shard of `stream` in two at the middle of its hash key range (AWS:
/// `SplitShard`); returns the shard split.
pub async fn split_a_shard(local: &Local, stream: &str) -> Result<String, String> {
    let (start, end, shard) =
        open_shards(local, stream).await?.into_iter().next().ok_or_else(|| format!("{stream} has no open shard"))?;
    let middle = start + (end - start) / 2 + 1;
    local
        .kinesis
        .split_shard()
        .stream_name(stream)
        .shard_to_split(&shard)
        .new_starting_hash_key(middle.to_string())
        .send()
        .await
        .map_err(|e| format!("SplitShard {stream}/{shard}: {}", pushpull::aws::describe(&e)))?;
    Ok(shard)
}

/// The open shards of `stream` (no ending sequence number): (first hash key, last, id), by range.
async fn open_shards(local: &Local, stream: &str) -> Result<Vec<(u128, u128, String)>, String> {
    let listed = local
        .kinesis
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .map_err(|e| format!("ListShards {stream}: {}", pushpull::aws::describe(&e)))?;
    let mut open: Vec<(u128, u128, String)> = listed
        .shards()
        .iter()
        .filter(|s| s.sequence_number_range().and_then(|r| r.ending_sequence_number()).is_none())
        .filter_map(|s| {
            let r = s.hash_key_range()?;
            Some((r.starting_hash_key().parse().ok()?, r.ending_hash_key().parse().ok()?, s.shard_id().to_owned()))
        })
        .collect();
    open.sort();
    Ok(open)
}

/// Merges the two adjacent open shards of `stream` whose ranges are smallest together (AWS:
/// `MergeShards`), once the stream is ACTIVE again after an earlier change; returns them.
pub async fn merge_two_shards(local: &Local, stream: &str) -> Result<(String, String), String> {
    for attempt in 0..30 {
        let open = open_shards(local, stream).await?;
        let pair = open
            .windows(2)
            .filter(|w| w[0].1.checked_add(1) == Some(w[1].0))
            .min_by_key(|w| w[1].1 - w[0].0)
            .map(|w| (w[0].2.clone(), w[1].2.clone()))
            .ok_or_else(|| format!("{stream} has no two adjacent open shards"))?;
        match local
            .kinesis
            .merge_shards()
            .stream_name(stream)
            .shard_to_merge(&pair.0)
            .adjacent_shard_to_merge(&pair.1)
            .send()
            .await
        {
            Ok(_) => return Ok(pair),
            // The stream is still UPDATING from the last change.
            Err(e) if e.as_service_error().is_some_and(|se| se.is_resource_in_use_exception()) && attempt < 29 => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                return Err(format!("MergeShards {stream} {} {}: {}", pair.0, pair.1, pushpull::aws::describe(&e)));
            }
        }
    }
    Err(format!("{stream} stayed UPDATING"))
}

/// How many times each record's data (by xxh3) is in the stream, every shard read from its
/// start (closed parents included): the line identities a test checks "exactly once" against.
pub async fn stream_records(local: &Local, stream: &str) -> Result<HashMap<u64, u32>, PipelineError> {
    let mut counts = HashMap::new();
    for r in local.read_stream(stream).await? {
        // A KPL aggregate counts as the user records it packs.
        match pushpull::aggregation::deaggregate(&r.data) {
            Ok(aggregate) => {
                for user in aggregate.records() {
                    *counts.entry(xxhash_rust::xxh3::xxh3_64(user.data)).or_default() += 1;
                }
            }
            Err(_) => *counts.entry(xxhash_rust::xxh3::xxh3_64(&r.data)).or_default() += 1,
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line the input holds twice must be in the stream twice; a third copy is extra, a
    /// missing one is missing; records of other inputs are counted apart and fail nothing.
    #[test]
    fn stream_lines_are_counted_against_the_input_copy_by_copy() {
        let expected: HashMap<u64, u32> = [(1, 1), (2, 2), (3, 1), (4, 2)].into();
        let in_stream: HashMap<u64, u32> = [(1, 1), (2, 3), (4, 1), (9, 5)].into();
        let s = StreamLines::of(&expected, &in_stream);
        assert_eq!(s, StreamLines { once: 1 + 2 + 1, extra: 1, missing: 1 + 1, other: 1 });
        let exact = StreamLines::of(&expected, &[(1, 1), (2, 2), (3, 1), (4, 2)].into());
        assert_eq!((exact.extra, exact.missing, exact.once), (0, 0, 6));
    }
}
