//! `pushpull-local`: plays AWS's part on a laptop.
//!
//! - `pushpull-local run` runs the whole pipeline of the SAM template against LocalStack: it
//!   creates what the template names, serves both functions, delivers S3 events with
//!   async-invoke semantics, runs the Kinesis event source mapping, uploads a directory of NDJSON
//!   files, shows progress, and prints a summary (`pushpull_local::pipeline`).
//! - `pushpull-local serve` serves the Lambda Invoke API for the functions of the SAM template
//!   (their binaries, environment, timeout and memory from the template), as `cargo lambda
//!   watch` would.
//! - `pushpull-local esm` is the Kinesis event source mapping alone: settings from the template,
//!   overridden by flags; it polls the stream and invokes the function through the Invoke API.
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pushpull_local::pipeline::{Broker, PipelineConfig, RedisBroker, run};

#[derive(Parser)]
#[command(version, about = "Plays AWS's part for pushpull functions on a laptop (LocalStack on 127.0.0.1)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the template's pipeline on LocalStack: objects in, rollups out, then a summary.
    Run(RunArgs),
    /// Serve the Lambda Invoke API for the template's functions (and any given with --function).
    Serve(cli::ServeArgs),
    /// Run the Kinesis event source mapping of the template against a stream.
    Esm(Box<cli::EsmArgs>),
    /// Relay a Redis pub/sub channel to a function: synchronous invocations, at most
    /// --concurrency at once, the next message read only when one is free.
    Relay(cli::RelayArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    template: cli::TemplateArgs,
    /// What carries the records between the functions: `kinesis` (the template's stream),
    /// `kafka` (a topic `<stack>-records` on the broker at --kafka-bootstrap-servers, read by the
    /// local Kafka mapping), `rabbitmq` (a queue `<stack>-records` on the broker at
    /// --rabbitmq-url, read by the local Amazon MQ mapping) or `sqs` (a queue `<stack>-records`
    /// in LocalStack with a dead-letter queue, read by the local SQS mapping), `redis-streams` (a
    /// Redis stream `<stack>-records` on --redis-url, read by the local Streams mapping) or
    /// `redis-pubsub` (a Redis channel `<stack>-records`, read by the local pub/sub relay: at most
    /// once).
    #[arg(long, default_value = "kinesis", value_parser = ["kinesis", "kafka", "rabbitmq", "sqs", "redis-streams", "redis-pubsub"])]
    broker: String,
    /// The Redis server for `--broker redis-*` (default: REDIS_URL, else the server
    /// `infra/redis.sh` starts, redis://127.0.0.1:$REDIS_PORT/, 6390).
    #[arg(long, value_name = "REDIS_URL")]
    redis_url: Option<String>,
    /// With `--broker redis-*`: the input eight times over, the rollup function made slower than
    /// the publisher (200 ms an invocation; the relay one at a time) and, on pub/sub, Redis's buffer for a slow subscriber
    /// small (`client-output-buffer-limit pubsub 256kb 64kb 1`), so that Redis cuts the relay off
    /// within seconds: the summary says what was lost.
    #[arg(long)]
    overload: bool,
    /// With `--broker sqs`: a FIFO queue (`<stack>-records.fifo`: a message group per partition
    /// key, in order; BatchSize 10).
    #[arg(long)]
    sqs_fifo: bool,
    /// The RabbitMQ broker for `--broker rabbitmq`, credentials and virtual host included
    /// (default: RABBITMQ_URL, else the broker `infra/rabbitmq.sh` starts,
    /// amqp://pushpull:pushpull@127.0.0.1:$RABBITMQ_PORT/pushpull). Realism disrupts only that one.
    #[arg(long, value_name = "AMQP_URL")]
    rabbitmq_url: Option<String>,
    /// The Kafka cluster for `--broker kafka` (default: the broker `infra/kafka.sh` starts,
    /// 127.0.0.1:$KAFKA_PORT, 9092).
    #[arg(long, value_name = "HOST:PORT")]
    kafka_bootstrap_servers: Option<String>,
    /// Directory of NDJSON files to upload (`.gz` files are gzip-compressed NDJSON).
    #[arg(long, default_value = "infra/sample-data")]
    input_dir: PathBuf,
    /// After the summary, keep everything running (upload more under the input prefix) until Ctrl-C.
    #[arg(long)]
    keep_running: bool,
    /// Async-invoke retry delays are AWS's (about 1 and 2 minutes) times this.
    #[arg(long, default_value_t = 0.01)]
    retry_delay_scale: f64,
    /// Give up if the pipeline is not done after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Echo the functions' own log lines.
    #[arg(long)]
    verbose: bool,
    #[command(flatten)]
    realism: cli::RealismArgs,
    /// Where the run keeps every EMF line (`metrics.ndjson`) and its summary (`summary.json`).
    #[arg(long, default_value = "target/pushpull-run")]
    run_dir: PathBuf,
    /// Poll caught-up shards every 200 ms instead of once a second as AWS does (less delay,
    /// latency figures better than AWS's; the summary says which cadence was used).
    #[arg(long)]
    fast_polling: bool,
    /// Also draw the run: `run.png` (throughput, iterator age, invocations and batch sizes,
    /// failures and faults on one time axis) and `summary.json` in this directory.
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

mod cli;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run_pipeline(args).await,
        Command::Serve(args) => cli::serve(args).await,
        Command::Esm(args) => cli::esm(*args).await,
        Command::Relay(args) => cli::relay(args).await,
    };
    if let Err(e) = result {
        eprintln!("pushpull-local: {e}");
        std::process::exit(1);
    }
}

async fn run_pipeline(args: RunArgs) -> Result<(), Error> {
    if std::env::var_os("RUST_LOG").is_some() {
        init_logs("text");
    }
    let broker = match args.broker.as_str() {
        "kafka" => Broker::Kafka {
            bootstrap_servers: args.kafka_bootstrap_servers.unwrap_or_else(|| {
                format!("127.0.0.1:{}", std::env::var("KAFKA_PORT").unwrap_or_else(|_| "9092".into()))
            }),
        },
        "rabbitmq" => {
            let given = args.rabbitmq_url.or_else(|| std::env::var("RABBITMQ_URL").ok());
            // The broker `infra/rabbitmq.sh` started is the one realism may close and restart.
            let control = std::path::Path::new("infra/rabbitmq.sh");
            let control = (given.is_none() && control.exists()).then(|| control.to_path_buf());
            let url = given.unwrap_or_else(|| {
                let port = std::env::var("RABBITMQ_PORT").unwrap_or_else(|_| "5672".into());
                format!("amqp://pushpull:pushpull@127.0.0.1:{port}/pushpull")
            });
            Broker::RabbitMq { url, control }
        }
        "sqs" => Broker::Sqs { fifo: args.sqs_fifo },
        "redis-streams" | "redis-pubsub" => {
            let given = args.redis_url.or_else(|| std::env::var("REDIS_URL").ok());
            // The server `infra/redis.sh` started is the one --overload may reconfigure.
            let control = std::path::Path::new("infra/redis.sh");
            let control = (given.is_none() && control.exists()).then(|| control.to_path_buf());
            let url = given.unwrap_or_else(|| {
                format!("redis://127.0.0.1:{}/", std::env::var("REDIS_PORT").unwrap_or_else(|_| "6390".into()))
            });
            Broker::Redis(RedisBroker { url, pubsub: args.broker == "redis-pubsub", overload: args.overload, control })
        }
        _ if args.overload => return Err("--overload goes with --broker redis-streams or redis-pubsub".into()),
        _ if args.sqs_fifo => return Err("--sqs-fifo goes with --broker sqs".into()),
        _ => Broker::Kinesis,
    };
    let config = PipelineConfig {
        broker,
        overrides: args.template.parameter_overrides,
        delay_scale: args.retry_delay_scale,
        progress: true,
        verbose: args.verbose,
        timeout: Duration::from_secs(args.timeout),
        keep_running: args.keep_running,
        realism: args.realism.config(),
        run_dir: args.run_dir,
        fast_polling: args.fast_polling,
        report_dir: args.report,
        ..PipelineConfig::new(args.template.template, args.template.stack_name, args.input_dir)
    };
    let report = run(config).await?;
    println!("{report}");
    report.check().map_err(|e| e.into())
}

/// Logs to stderr: `text` for people, `json` for machines. `RUST_LOG` filters (default info).
fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,aws_config=warn,aws_smithy_runtime=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if format == "json" { builder.json().try_init() } else { builder.try_init() };
}
