//! The `serve` and `esm` subcommands.
use std::path::PathBuf;
use std::time::Duration;

use pushpull::store::{Location, Store};
use pushpull_local::invoke::{InvokeClient, InvokeServer};
use pushpull_local::localstack::{ACCOUNT, Local, REGION, function_env};
use pushpull_local::mapping::sqs::LONG_POLL_SECONDS;
use pushpull_local::mapping::{
    Clients, KafkaSource, RabbitMqSource, RawSettings, RedisStreamSource, Runner, RunnerOptions,
};
use pushpull_local::realism::Realism;
use pushpull_local::realism::iam::Policies;
use pushpull_local::realism::proxy::RealismProxy;
use pushpull_local::runtime_api::FunctionSpec;
use pushpull_local::template::Template;

use crate::Error;

/// Where the template is and how to read it.
#[derive(clap::Args, Debug, Clone)]
pub struct TemplateArgs {
    /// The SAM template.
    #[arg(long, default_value = "infra/template.yaml")]
    pub template: PathBuf,
    /// Stack name: resources are named `<stack>-<logical-id-in-kebab-case>` locally.
    #[arg(long, default_value = "pushpull-local")]
    pub stack_name: String,
    /// Template parameters, as `sam deploy --parameter-overrides` takes them (Key=Value).
    #[arg(long = "parameter-overrides", num_args = 1.., value_name = "KEY=VALUE")]
    pub parameter_overrides: Vec<String>,
}

impl TemplateArgs {
    fn load(&self) -> Result<Template, Error> {
        Ok(Template::load(&self.template, &self.stack_name, &self.parameter_overrides)?)
    }
}

/// How unkind the local world is (`pushpull_local::realism`).
#[derive(clap::Args, Debug, Clone)]
pub struct RealismArgs {
    /// AWS's limits and faults in front of LocalStack: `aws` (Kinesis's shard limits, iterator
    /// expiry, the template's IAM roles, Lambda's concurrency), `storm` (those plus every fault
    /// at high rates: empty pages, expired iterators, S3 SlowDown and cut bodies, duplicated and
    /// reordered S3 events, Invoke 429s, a shard split mid-run), or `off`.
    #[arg(long, default_value = "off", env = "PUSHPULL_REALISM")]
    pub realism: pushpull_local::realism::Profile,
    /// Seed of every random decision (default: a new one, printed so the run can be replayed).
    #[arg(long, env = "PUSHPULL_SEED")]
    pub seed: Option<u64>,
}

impl RealismArgs {
    /// The settings, with the seed printed when the profile is on.
    pub fn config(&self) -> pushpull_local::realism::RealismConfig {
        let seed = self.seed.unwrap_or_else(|| fastrand::u64(..1_000_000));
        let config = pushpull_local::realism::RealismConfig::new(self.realism, seed);
        if config.is_on() {
            eprintln!(
                "realism: profile {}, seed {seed} (replay with --realism {} --seed {seed})",
                self.realism, self.realism
            );
        }
        config
    }
}

/// `pushpull-local serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    template: TemplateArgs,
    /// Port on 127.0.0.1 (9000 is what `cargo lambda watch` uses).
    #[arg(long, default_value_t = 9000)]
    port: u16,
    /// Serve only the template's functions built from these binaries (default: all).
    #[arg(long = "only", value_name = "BINARY")]
    only: Vec<String>,
    /// More functions: NAME=PATH of a binary.
    #[arg(long = "function", value_name = "NAME=PATH")]
    functions: Vec<String>,
    /// Extra environment for every function: KEY=VALUE.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Sandboxes per function (concurrent invocations).
    #[arg(long, default_value_t = 10)]
    concurrency: usize,
    /// Echo the functions' output.
    #[arg(long)]
    verbose: bool,
}

fn pair(s: &str) -> Result<(String, String), Error> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    Ok((k.to_owned(), v.to_owned()))
}

pub async fn serve(args: ServeArgs) -> Result<(), Error> {
    crate::init_logs("text");
    let t = args.template.load()?;
    let env: Vec<(String, String)> = args.env.iter().map(|e| pair(e)).collect::<Result<_, _>>()?;
    let mut specs = pushpull_local::pipeline::template_specs(&t, &[], args.verbose)?;
    specs.retain(|s| args.only.is_empty() || args.only.iter().any(|b| s.binary.ends_with(b)));
    for spec in &mut specs {
        spec.env.extend(env.iter().cloned());
    }
    for f in &args.functions {
        let (name, path) = pair(f)?;
        let mut spec = FunctionSpec::new(name, path);
        spec.env = function_env();
        spec.env.extend(env.iter().cloned());
        spec.echo_output = args.verbose;
        specs.push(spec);
    }
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let server = InvokeServer::start(specs, args.port, args.concurrency).await?;
    println!("Invoke API on {} for: {}", server.endpoint(), names.join(", "));
    tokio::signal::ctrl_c().await?;
    drop(server);
    Ok(())
}

/// `pushpull-local esm`: flags override the template's mapping; AWS's ranges apply to both.
#[derive(clap::Args, Debug)]
pub struct EsmArgs {
    #[command(flatten)]
    template: TemplateArgs,
    /// Logical id of the function whose Kinesis event to run (default: the first with one).
    #[arg(long)]
    function: Option<String>,
    /// Ignore the template; take every setting from the flags.
    #[arg(long)]
    no_template: bool,
    /// Invoke API endpoint (`cargo lambda watch` or `pushpull-local serve`).
    #[arg(long, default_value = "http://127.0.0.1:9000")]
    invoke_endpoint: String,
    /// Function name to invoke.
    #[arg(long)]
    function_name: Option<String>,
    /// Stream name or ARN.
    #[arg(long)]
    stream: Option<String>,
    /// A Kafka mapping from the flags alone (the template is not read): the cluster's bootstrap
    /// servers, `HOST:PORT[,HOST:PORT...]` (KAFKA_BOOTSTRAP_SERVERS). Without it, the template's
    /// Kafka variant (`--parameter-overrides Broker=kafka KafkaBootstrapServers=...`) is read
    /// like its Kinesis mapping.
    #[arg(long, value_name = "HOST:PORT")]
    kafka_bootstrap_servers: Option<String>,
    /// The topic a Kafka mapping reads.
    #[arg(long)]
    kafka_topic: Option<String>,
    /// ConsumerGroupId of a Kafka mapping (default: the mapping's UUID).
    #[arg(long)]
    consumer_group_id: Option<String>,
    /// An MSK cluster's ARN: the events say `aws:kafka` and carry it (default: `SelfManagedKafka`).
    #[arg(long)]
    msk_cluster_arn: Option<String>,
    /// An Amazon MQ for RabbitMQ mapping from the flags alone: the broker as
    /// `amqp://USER:PASS@HOST:PORT/VHOST` (AWS's BASIC_AUTH secret and VIRTUAL_HOST).
    #[arg(long, value_name = "URL")]
    rabbitmq_url: Option<String>,
    /// The queue a RabbitMQ mapping reads.
    #[arg(long)]
    rabbitmq_queue: Option<String>,
    /// The Amazon MQ broker's ARN the events carry (default: a name built from the URL's host).
    #[arg(long)]
    mq_broker_arn: Option<String>,
    /// An SQS mapping from the flags alone: the queue's name, URL or ARN (on LocalStack, or AWS
    /// with --aws). Without it, the template's `SQS` event is read if a function has one.
    #[arg(long, value_name = "NAME_OR_URL")]
    sqs_queue: Option<String>,
    /// A Redis Streams mapping from the flags alone (ours: AWS has no Redis source): the server,
    /// `redis://HOST:PORT[/DB]`, read with `--redis-stream`.
    #[arg(long, value_name = "URL")]
    redis_url: Option<String>,
    /// The stream a Redis Streams mapping reads (its consumer group is created if missing).
    #[arg(long)]
    redis_stream: Option<String>,
    /// The consumer group (default: the function's name).
    #[arg(long)]
    redis_group: Option<String>,
    /// This mapping's consumer name in the group (default: `pushpull-local-<pid>`); a mapping
    /// restarted under the same name reads its own pending entries first.
    #[arg(long)]
    redis_consumer: Option<String>,
    /// An entry pending this long (ms) with any consumer (a failed one of ours, one of a consumer
    /// that died) is claimed again (XAUTOCLAIM).
    #[arg(long, default_value_t = 30_000)]
    redis_claim_idle_ms: u64,
    /// Deliveries of an entry before it goes to `<stream>:dead-letter`.
    #[arg(long, default_value_t = 5)]
    redis_max_deliveries: u64,
    /// BLOCK of each XREADGROUP, ms (Redis's long poll).
    #[arg(long, default_value_t = 1_000)]
    redis_block_ms: u64,
    /// An SQS mapping's ScalingConfig.MaximumConcurrency (2..1000).
    #[arg(long)]
    maximum_concurrency: Option<String>,
    /// WaitTimeSeconds of an SQS mapping's ReceiveMessage: 20 (long polling, as AWS's pollers)
    /// or less; 0 is short polling, to measure what long polling saves (not an AWS setting).
    #[arg(long, default_value_t = LONG_POLL_SECONDS, value_parser = clap::value_parser!(u8).range(0..=20))]
    sqs_wait_time_seconds: u8,
    /// The function's timeout in seconds, which an SQS queue's visibility timeout must not be
    /// shorter than (default: the template's Timeout, else Lambda's default 3).
    #[arg(long)]
    function_timeout: Option<u64>,
    /// BatchSize (1..10000).
    #[arg(long)]
    batch_size: Option<String>,
    /// MaximumBatchingWindowInSeconds (0..300).
    #[arg(long)]
    maximum_batching_window: Option<String>,
    /// StartingPosition: TRIM_HORIZON, LATEST or AT_TIMESTAMP.
    #[arg(long)]
    starting_position: Option<String>,
    /// StartingPositionTimestamp (unix seconds) for AT_TIMESTAMP.
    #[arg(long)]
    starting_position_timestamp: Option<String>,
    /// ParallelizationFactor (1..10).
    #[arg(long)]
    parallelization_factor: Option<String>,
    /// BisectBatchOnFunctionError (true/false).
    #[arg(long)]
    bisect_batch_on_function_error: Option<String>,
    /// MaximumRetryAttempts (-1..10000).
    #[arg(long, allow_hyphen_values = true)]
    maximum_retry_attempts: Option<String>,
    /// MaximumRecordAgeInSeconds (-1, or 60..604800).
    #[arg(long, allow_hyphen_values = true)]
    maximum_record_age: Option<String>,
    /// FunctionResponseTypes ("ReportBatchItemFailures", or "" for none).
    #[arg(long)]
    function_response_types: Option<String>,
    /// TumblingWindowInSeconds (0..900).
    #[arg(long)]
    tumbling_window: Option<String>,
    /// OnFailure destination ARN (SQS queue or S3 bucket; "" for none).
    #[arg(long)]
    on_failure: Option<String>,
    /// FilterCriteria, as the AWS CLI takes it: '{"Filters": [{"Pattern": "{\"data\": {...}}"}]}'
    /// ('{}' for none).
    #[arg(long)]
    filter_criteria: Option<String>,
    /// MetricsConfig's metrics ("EventCount" publishes the event-count metrics; "" for none).
    #[arg(long)]
    metrics_config: Option<String>,
    /// A Kafka mapping's ProvisionedPollerConfig as `MIN,MAX` pollers (1-200, 1-2000; "" for
    /// on-demand mode). AWS offers Kafka mappings retries, bisection, record age, partial batch
    /// responses and failure destinations only in provisioned mode.
    #[arg(long, value_name = "MIN,MAX")]
    provisioned_pollers: Option<String>,
    /// Where the mapping checkpoints its position per shard (file:// or s3://).
    #[arg(long)]
    checkpoint_uri: Option<String>,
    /// Stop once every shard is caught up and nothing happened for this many seconds.
    #[arg(long)]
    stop_when_idle: Option<f64>,
    /// Seconds between shard listings.
    #[arg(long, default_value_t = 5.0)]
    list_shards_every: f64,
    /// Longest wait between polls of an empty shard, ms.
    #[arg(long, default_value_t = 1000)]
    max_idle_poll_ms: u64,
    /// Wait between polls of a shard that is caught up, ms (default: 1000 as AWS polls; 200 with
    /// --fast-polling).
    #[arg(long)]
    caught_up_poll_ms: Option<u64>,
    /// Poll caught-up shards every 200 ms instead of AWS's once a second (the summary says which).
    #[arg(long)]
    fast_polling: bool,
    /// This runner's name in the shards' leases (default: host and pid). Runners started on the
    /// same mapping (same checkpoint location) share its shards; one restarted under the same
    /// name takes its own leases back at once.
    #[arg(long)]
    worker_id: Option<String>,
    /// A lease not renewed for this long may be taken by another runner (ms); for Kafka, the
    /// consumer group's session timeout (a member silent this long is dropped from the group).
    #[arg(long, default_value_t = 10_000)]
    failover_ms: u64,
    /// On Ctrl-C or SIGTERM, how long batches in flight may take to finish before they are
    /// stopped and left to the next owner (ms).
    #[arg(long, default_value_t = 30_000)]
    stop_grace_ms: u64,
    /// Write the summary as JSON here too.
    #[arg(long)]
    summary_json: Option<PathBuf>,
    /// Logs: text or json (to stderr).
    #[arg(long, default_value = "text")]
    log_format: String,
    /// No progress bars (they show only on a terminal anyway).
    #[arg(long)]
    no_progress: bool,
    /// Poll real AWS (credentials, region and endpoints from the environment, as the AWS CLI
    /// reads them) instead of LocalStack.
    #[arg(long)]
    aws: bool,
    #[command(flatten)]
    realism: RealismArgs,
}

pub async fn esm(args: EsmArgs) -> Result<(), Error> {
    crate::init_logs(&args.log_format);
    let stream = args
        .stream
        .clone()
        .map(|s| if s.starts_with("arn:") { s } else { format!("arn:aws:kinesis:{REGION}:{ACCOUNT}:stream/{s}") });
    let flags = raw_flags(&args, stream);
    if let Some(queue) = args.sqs_queue.clone() {
        let raw = raw_flags(&args, None);
        return esm_sqs(args, queue, raw, None).await;
    }
    if let Some(url) = args.redis_url.clone() {
        let stream = args.redis_stream.clone().ok_or("--redis-stream is required with --redis-url")?;
        let function = args.function_name.clone().unwrap_or_default();
        let source = RedisStreamSource {
            url,
            stream,
            group: args.redis_group.clone().unwrap_or_else(|| function.clone()),
            consumer: args.redis_consumer.clone().unwrap_or_else(|| format!("pushpull-local-{}", std::process::id())),
            claim_idle: Duration::from_millis(args.redis_claim_idle_ms),
            max_deliveries: args.redis_max_deliveries,
            block: Duration::from_millis(args.redis_block_ms),
        };
        let raw = raw_flags(&args, None);
        return esm_redis_streams(args, source, raw).await;
    }
    if let Some(url) = args.rabbitmq_url.clone() {
        let queue = args.rabbitmq_queue.clone().ok_or("--rabbitmq-queue is required with --rabbitmq-url")?;
        let source = RabbitMqSource { url, queue, broker_arn: args.mq_broker_arn.clone() };
        let raw = raw_flags(&args, None);
        return esm_rabbitmq(args, source, raw).await;
    }
    if let Some(servers) = args.kafka_bootstrap_servers.clone() {
        let topic = args.kafka_topic.clone().ok_or("--kafka-topic is required with --kafka-bootstrap-servers")?;
        let source = KafkaSource {
            bootstrap_servers: servers.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect(),
            topic,
            consumer_group_id: args.consumer_group_id.clone(),
            cluster_arn: args.msk_cluster_arn.clone(),
        };
        let raw = raw_flags(&args, None);
        return esm_kafka(args, source, raw).await;
    }
    if !args.no_template && args.stream.is_none() {
        // The template's Kafka variant (`--parameter-overrides Broker=kafka`): its mapping,
        // with the flags over it.
        let t = args.template.load()?;
        if let Some((raw, mut source)) = RawSettings::from_template_kafka(&t, args.function.as_deref())? {
            let raw = raw.overlay(raw_flags(&args, None));
            // The source's flags over the template's too.
            if let Some(topic) = &args.kafka_topic {
                source.topic = topic.clone();
            }
            if let Some(group) = &args.consumer_group_id {
                source.consumer_group_id = Some(group.clone());
            }
            if let Some(arn) = &args.msk_cluster_arn {
                source.cluster_arn = Some(arn.clone());
            }
            return esm_kafka(args, source, raw).await;
        }
        // The template's SQS event.
        if let Some((raw, queue, timeout)) = RawSettings::from_template_sqs(&t, args.function.as_deref())? {
            let raw = raw.overlay(raw_flags(&args, None));
            return esm_sqs(args, queue, raw, Some(timeout)).await;
        }
    }
    let local = match args.aws {
        true => None,
        false => Some(Local::connect().await?),
    };
    let raw = if args.no_template {
        flags
    } else {
        let mut t = args.template.load()?;
        if let Some(local) = &local {
            // `GetAtt X.ConsumerARN` (enhanced fan-out) needs the consumer registered.
            pushpull_local::pipeline::register_consumers(&mut t, local).await?;
        }
        RawSettings::from_template(&t, args.function.as_deref())?.overlay(flags)
    };
    let settings = raw.validate()?;
    let mut clients = if let Some(local) = &local { Clients::from(local) } else { aws_clients().await };
    let realism = std::sync::Arc::new(Realism::new(args.realism.config()));
    let mut proxy = None;
    if (realism.config().is_on() || settings.consumer_arn.is_some()) && !args.aws {
        // The mapping reads through the realism proxy with its function's role, as AWS's does;
        // and enhanced fan-out is served there (true push), with the realism layer on or off.
        let policies = match args.no_template {
            true => Policies::default(),
            false => Policies::from_template(&args.template.load()?)?,
        };
        let p = RealismProxy::start(realism.clone(), policies.clone(), &pushpull_local::localstack::endpoint()).await?;
        let key = policies.key_of_function(&settings.function_name).filter(|_| realism.config().iam);
        let key = key.as_deref().unwrap_or("test");
        clients.kinesis = match settings.consumer_arn {
            // SubscribeToShard is HTTP/2.
            Some(_) => pushpull_local::http2::kinesis(&p.endpoint(), key).await,
            None => Local::at(&p.endpoint(), key).await.kinesis,
        };
        proxy = Some(p);
    }
    let home = std::env::var("PUSHPULL_HOME").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into())).join(".cache/pushpull")
    });
    let location: Location = match &args.checkpoint_uri {
        Some(u) => u.parse()?,
        None => format!("file://{}", home.join("esm-checkpoints").display()).parse()?,
    };
    let store = match &location {
        Location::File { root } => Store::file(root),
        Location::S3 { bucket, prefix } => Store::s3(clients.s3.clone(), bucket, prefix),
        other => return Err(format!("checkpoint location {other}: not a scheme this runner knows").into()),
    };
    let mut options = RunnerOptions::new(&settings, store);
    options.list_shards_every = Duration::from_secs_f64(args.list_shards_every.max(0.1));
    options.max_idle_poll = Duration::from_millis(args.max_idle_poll_ms.max(200));
    if args.fast_polling {
        options = options.fast_polling();
    }
    if let Some(ms) = args.caught_up_poll_ms {
        options.caught_up_poll = Duration::from_millis(ms.max(200));
    }
    options.stop_when_idle = args.stop_when_idle.map(|s| Duration::from_secs_f64(s.max(0.0)));
    options.failover = Duration::from_millis(args.failover_ms.max(300));
    options.stop_grace = Duration::from_millis(args.stop_grace_ms);
    if let Some(w) = args.worker_id {
        options.worker_id = w;
    }
    eprintln!(
        "esm: {} -> {} at {} (checkpoints {location}/{})",
        settings.stream_arn, settings.function_name, args.invoke_endpoint, options.checkpoint_prefix
    );
    // Ctrl-C or SIGTERM: finish the batches in flight, checkpoint, release the leases.
    let stop_rx = stop_on_signals()?;
    let summary = if args.no_progress {
        Runner::run(settings, options, clients, InvokeClient::new(args.invoke_endpoint), stop_rx).await?
    } else {
        run_with_progress(settings, options, clients, InvokeClient::new(args.invoke_endpoint), stop_rx).await?
    };
    println!("esm summary\n{summary}");
    if let Some(p) = &proxy {
        print!("{}", p.realism().faults());
    }
    if let Some(path) = args.summary_json {
        std::fs::write(&path, serde_json::to_vec_pretty(&summary)?)?;
    }
    Ok(())
}

/// Turns true on Ctrl-C or SIGTERM: the mapping finishes the batches in flight, checkpoints (or
/// commits) and hands its partitions over.
fn stop_on_signals() -> Result<tokio::sync::watch::Receiver<bool>, Error> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let _ = stop_tx.send(true);
    });
    Ok(stop_rx)
}

/// Clients of real AWS (credentials, region and endpoints from the environment).
async fn aws_clients() -> Clients {
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    Clients {
        kinesis: aws_sdk_kinesis::Client::new(&config),
        sqs: aws_sdk_sqs::Client::new(&config),
        s3: aws_sdk_s3::Client::new(&config),
        sns: aws_sdk_sns::Client::new(&config),
        events: aws_sdk_eventbridge::Client::new(&config),
    }
}

/// The mapping's settings as the flags give them.
fn raw_flags(args: &EsmArgs, stream: Option<String>) -> RawSettings {
    RawSettings {
        stream,
        function: args.function_name.clone(),
        batch_size: args.batch_size.clone(),
        batching_window: args.maximum_batching_window.clone(),
        starting_position: args.starting_position.clone(),
        starting_position_timestamp: args.starting_position_timestamp.clone(),
        parallelization_factor: args.parallelization_factor.clone(),
        bisect: args.bisect_batch_on_function_error.clone(),
        maximum_retry_attempts: args.maximum_retry_attempts.clone(),
        maximum_record_age: args.maximum_record_age.clone(),
        function_response_types: args.function_response_types.clone(),
        tumbling_window: args.tumbling_window.clone(),
        on_failure: args.on_failure.clone(),
        filter_criteria: args.filter_criteria.clone(),
        enabled: None,
        metrics: args.metrics_config.clone(),
        provisioned_pollers: args.provisioned_pollers.clone(),
        maximum_concurrency: args.maximum_concurrency.clone(),
    }
}

/// `esm` on Kafka: the mapping as a member of its consumer group on the cluster; LocalStack only
/// for an OnFailure destination.
async fn esm_kafka(args: EsmArgs, source: KafkaSource, raw: RawSettings) -> Result<(), Error> {
    let settings = raw.validate_kafka(&source)?;
    let clients = if args.aws {
        aws_clients().await
    } else if settings.on_failure.as_ref().is_some_and(|d| !matches!(d, pushpull_local::mapping::Destination::Kafka(_)))
    {
        // An AWS destination; a `kafka://` one is written with the cluster's own protocol.
        Clients::from(&Local::connect().await?)
    } else {
        // Nothing is called without a destination.
        Clients::from(&Local::at(&pushpull_local::localstack::endpoint(), "test").await)
    };
    let home = std::env::temp_dir();
    let mut options = RunnerOptions::new(&settings, Store::file(home));
    options.stop_when_idle = args.stop_when_idle.map(|s| Duration::from_secs_f64(s.max(0.0)));
    options.failover = Duration::from_millis(args.failover_ms.max(1000));
    options.stop_grace = Duration::from_millis(args.stop_grace_ms);
    if let Some(w) = args.worker_id {
        options.worker_id = w;
    }
    let group = source.consumer_group_id.clone().unwrap_or_else(|| settings.uuid());
    eprintln!(
        "esm: kafka {} topic {} (group {group}) -> {} at {}",
        source.bootstrap_servers.join(","),
        source.topic,
        settings.function_name,
        args.invoke_endpoint
    );
    let stop_rx = stop_on_signals()?;
    let summary =
        Runner::run_kafka(settings, source, options, clients, InvokeClient::new(args.invoke_endpoint), stop_rx).await?;
    println!("esm summary\n{summary}");
    if let Some(path) = args.summary_json {
        std::fs::write(&path, serde_json::to_vec_pretty(&summary)?)?;
    }
    Ok(())
}

async fn esm_rabbitmq(args: EsmArgs, source: RabbitMqSource, raw: RawSettings) -> Result<(), Error> {
    let settings = raw.validate_rabbitmq(&source)?;
    // Nothing of AWS is called: Amazon MQ mappings have no failure destination.
    let clients = Clients::from(&Local::at(&pushpull_local::localstack::endpoint(), "test").await);
    let mut options = RunnerOptions::new(&settings, Store::file(std::env::temp_dir()));
    options.stop_when_idle = args.stop_when_idle.map(|s| Duration::from_secs_f64(s.max(0.0)));
    options.stop_grace = Duration::from_millis(args.stop_grace_ms);
    eprintln!(
        "esm: rabbitmq {} queue {} -> {} at {}",
        source.redacted(),
        source.queue,
        settings.function_name,
        args.invoke_endpoint
    );
    let stop_rx = stop_on_signals()?;
    let summary =
        Runner::run_rabbitmq(settings, source, options, clients, InvokeClient::new(args.invoke_endpoint), stop_rx)
            .await?;
    println!("esm summary\n{summary}");
    if let Some(path) = args.summary_json {
        std::fs::write(&path, serde_json::to_vec_pretty(&summary)?)?;
    }
    Ok(())
}

/// `esm` on a Redis stream: one consumer of its group (`pushpull_local::mapping::redis_streams`).
async fn esm_redis_streams(args: EsmArgs, source: RedisStreamSource, raw: RawSettings) -> Result<(), Error> {
    let settings = raw.validate_redis_streams(&source)?;
    // Nothing of AWS is called.
    let clients = Clients::from(&Local::at(&pushpull_local::localstack::endpoint(), "test").await);
    let mut options = RunnerOptions::new(&settings, Store::file(std::env::temp_dir()));
    options.stop_when_idle = args.stop_when_idle.map(|s| Duration::from_secs_f64(s.max(0.0)));
    options.stop_grace = Duration::from_millis(args.stop_grace_ms);
    eprintln!(
        "esm: redis {} stream {} group {} consumer {} -> {} at {}",
        source.redacted(),
        source.stream,
        source.group,
        source.consumer,
        settings.function_name,
        args.invoke_endpoint
    );
    let stop_rx = stop_on_signals()?;
    let summary =
        Runner::run_redis_streams(settings, source, options, clients, InvokeClient::new(args.invoke_endpoint), stop_rx)
            .await?;
    println!("esm summary\n{summary}");
    if let Some(path) = args.summary_json {
        std::fs::write(&path, serde_json::to_vec_pretty(&summary)?)?;
    }
    Ok(())
}

/// `pushpull-local relay`: a Redis pub/sub channel to a function (`pushpull_local::relay`).
#[derive(clap::Args, Debug)]
pub struct RelayArgs {
    /// The Redis server, `redis://HOST:PORT[/DB]`.
    #[arg(long, default_value = "redis://127.0.0.1:6390/")]
    redis_url: String,
    /// The channel (with --pattern, a glob pattern: PSUBSCRIBE).
    #[arg(long)]
    channel: String,
    /// Subscribe to a pattern.
    #[arg(long)]
    pattern: bool,
    /// The function to invoke.
    #[arg(long)]
    function_name: String,
    /// Invoke API endpoint (`cargo lambda watch` or `pushpull-local serve`).
    #[arg(long, default_value = "http://127.0.0.1:9000")]
    invoke_endpoint: String,
    /// Invocations at once (the function's reserved concurrency); the relay reads the next
    /// message only when one is free.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Stop once nothing arrived and nothing was in flight for this many seconds.
    #[arg(long)]
    stop_when_idle: Option<f64>,
    /// Write the counts as JSON here too.
    #[arg(long)]
    summary_json: Option<PathBuf>,
    /// Logs: text or json (to stderr).
    #[arg(long, default_value = "text")]
    log_format: String,
}

pub async fn relay(args: RelayArgs) -> Result<(), Error> {
    crate::init_logs(&args.log_format);
    let config = pushpull_local::relay::RelayConfig {
        url: args.redis_url.clone(),
        channel: args.channel.clone(),
        pattern: args.pattern,
        function: args.function_name.clone(),
        concurrency: args.concurrency,
        delivered: None,
        max_batch: 0,
    };
    let relay = pushpull_local::relay::start(config, InvokeClient::new(&args.invoke_endpoint))?;
    eprintln!(
        "relay: redis {} {} {} -> {} at {} ({} at once)",
        args.redis_url,
        if args.pattern { "pattern" } else { "channel" },
        args.channel,
        args.function_name,
        args.invoke_endpoint,
        args.concurrency.max(1)
    );
    let mut stop = stop_on_signals()?;
    let idle = args.stop_when_idle.map(|s| Duration::from_secs_f64(s.max(0.0)));
    loop {
        tokio::select! {
            _ = stop.changed() => if *stop.borrow() { break },
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                if idle.is_some_and(|idle| relay.is_idle_for(idle)) {
                    break;
                }
            }
        }
    }
    let counts = relay.stop().await;
    println!("relay summary\n{counts}");
    if let Some(path) = args.summary_json {
        std::fs::write(&path, serde_json::to_vec_pretty(&counts)?)?;
    }
    Ok(())
}

/// `esm` on SQS: pollers long-polling the queue (`pushpull_local::mapping::sqs`).
async fn esm_sqs(
    args: EsmArgs,
    queue: String,
    raw: RawSettings,
    template_timeout: Option<Duration>,
) -> Result<(), Error> {
    let clients = if args.aws { aws_clients().await } else { Clients::from(&Local::connect().await?) };
    let source = pushpull_local::mapping::sqs::describe(&clients.sqs, &queue, args.sqs_wait_time_seconds).await?;
    let timeout = args.function_timeout.map(Duration::from_secs).or(template_timeout).unwrap_or(Duration::from_secs(3));
    let settings = raw.validate_sqs(&source, timeout)?;
    let mut options = RunnerOptions::new(&settings, Store::file(std::env::temp_dir()));
    options.stop_when_idle = args.stop_when_idle.map(|s| Duration::from_secs_f64(s.max(0.0)));
    options.stop_grace = Duration::from_millis(args.stop_grace_ms);
    eprintln!(
        "esm: sqs {} (WaitTimeSeconds {}, visibility timeout {} s) -> {} at {}",
        source.queue_arn,
        source.wait_time_seconds,
        source.visibility_timeout.as_secs(),
        settings.function_name,
        args.invoke_endpoint
    );
    let stop_rx = stop_on_signals()?;
    let summary =
        Runner::run_sqs(settings, source, options, clients, InvokeClient::new(args.invoke_endpoint), stop_rx).await?;
    println!("esm summary\n{summary}");
    if let Some(path) = args.summary_json {
        std::fs::write(&path, serde_json::to_vec_pretty(&summary)?)?;
    }
    Ok(())
}

/// [`Runner::run`] with live progress bars on a terminal (records pulled, invocations, iterator
/// age); the same outcome.
async fn run_with_progress(
    settings: pushpull_local::mapping::MappingSettings,
    options: RunnerOptions,
    clients: Clients,
    invoker: InvokeClient,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<pushpull_local::mapping::Summary, Error> {
    use pushpull_local::progress::{Display, LiveProgress, Update};
    let started = std::time::Instant::now();
    let mapping = Runner::start(settings, options, clients, invoker);
    let mut live = LiveProgress::new(Display::BarsOnly, None, None);
    while !*stop.borrow() && !mapping.is_finished() {
        let (records_pulled, invocations) = mapping.progress();
        live.update(&Update {
            elapsed: started.elapsed(),
            records_pulled,
            invocations,
            iterator_age_ms: mapping.iterator_age_ms(),
            ..Update::default()
        });
        tokio::select! {
            _ = stop.changed() => {}
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    live.finish();
    Ok(mapping.stop().await?)
}
