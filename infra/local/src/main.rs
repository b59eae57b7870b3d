//! `pushpull-local`: plays AWS's part on a laptop.
//!
//! - `pushpull-local serve` serves the Lambda Invoke API for the functions of the SAM template
//!   (their binaries, environment, timeout and memory from the template), as `cargo lambda
//!   watch` would.
//! - `pushpull-local esm` is the Kinesis event source mapping: settings from the template,
//!   overridden by flags; it polls the stream and invokes the function through the Invoke API.
//!
//! `pushpull-local demo` runs the sample pipeline against LocalStack: it creates the bucket
//! (with S3 notifications to an SQS queue), the stream and the queue; uploads the sample NDJSON
//! objects; delivers each genuine S3 notification to the push function (the real binary, over the
//! Lambda Runtime API); reads what arrived in the stream and delivers it to the pull function in
//! batches shaped as the event source mapping shapes them; and prints a summary.
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::types::ShardIteratorType;
use clap::{Parser, Subcommand};
use pushpull_local::localstack::{Local, StreamRecord, function_env, kinesis_event};
use pushpull_local::runtime_api::{FunctionHost, FunctionSpec, Outcome, workspace_binary};

#[derive(Parser)]
#[command(version, about = "Plays AWS's part for pushpull functions on a laptop (LocalStack on 127.0.0.1)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sample pipeline once: objects in, records through Kinesis, batches to the pull function.
    Demo(DemoArgs),
    /// Serve the Lambda Invoke API for the template's functions (and any given with --function).
    Serve(cli::ServeArgs),
    /// Run the Kinesis event source mapping of the template against a stream.
    Esm(Box<cli::EsmArgs>),
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Directory of NDJSON files to upload.
    #[arg(long, default_value = "infra/sample-data")]
    input_dir: PathBuf,
    /// Data bucket.
    #[arg(long, default_value = "pushpull-local-data")]
    bucket: String,
    /// Kinesis stream.
    #[arg(long, default_value = "pushpull-local-records")]
    stream: String,
    /// SQS queue that receives the bucket's notifications.
    #[arg(long, default_value = "pushpull-local-s3-events")]
    queue: String,
    /// Shards of the stream when it is created.
    #[arg(long, default_value_t = 2)]
    shards: i32,
    /// Most records per pull invocation.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// Echo the functions' own log lines.
    #[arg(long)]
    verbose: bool,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

mod cli;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo(args).await,
        Command::Serve(args) => cli::serve(args).await,
        Command::Esm(args) => cli::esm(*args).await,
    };
    if let Err(e) = result {
        eprintln!("pushpull-local: {e}");
        std::process::exit(1);
    }
}

fn spec(name: &str, env: &[(&str, String)], verbose: bool) -> Result<FunctionSpec, Error> {
    let binary = workspace_binary(name);
    if !binary.exists() {
        return Err(
            format!("{} is not built: run `cargo build --workspace --bins` (make run does)", binary.display()).into()
        );
    }
    let mut spec = FunctionSpec::new(name, binary);
    spec.env = function_env();
    spec.env.extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    spec.echo_output = verbose;
    Ok(spec)
}

async fn demo(args: DemoArgs) -> Result<(), Error> {
    let started = Instant::now();
    let l = Local::connect().await?;
    let run_id = format!("{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs());
    l.ensure_bucket(&args.bucket).await?;
    let stream_arn = l.ensure_stream(&args.stream, args.shards).await?;
    let queue = l.notify_queue(&args.bucket, &args.queue, "input/").await?;
    // Read back only what this run writes.
    let iterators = l.shard_iterators(&args.stream, ShardIteratorType::Latest).await?;

    let bucket = &args.bucket;
    let push_env = [
        ("STREAM_NAME", args.stream.clone()),
        ("PARTITION_KEY_FIELD", "user".to_owned()),
        ("CHECKPOINT_URI", format!("s3://{bucket}/checkpoints/push")),
        ("OUTPUT_URI", format!("s3://{bucket}/output")),
        ("QUARANTINE_URI", format!("s3://{bucket}/quarantine")),
    ];
    let pull_env = [
        ("GROUP_BY_FIELD", "user".to_owned()),
        ("SUM_FIELD", "amount".to_owned()),
        ("CHECKPOINT_URI", format!("s3://{bucket}/checkpoints/pull")),
        ("OUTPUT_URI", format!("s3://{bucket}/output")),
    ];
    let mut push = FunctionHost::start(spec("s3-to-kinesis", &push_env, args.verbose)?).await?;
    let mut pull = FunctionHost::start(spec("kinesis-rollup", &pull_env, args.verbose)?).await?;

    let mut files: Vec<PathBuf> = std::fs::read_dir(&args.input_dir)
        .map_err(|e| format!("{}: {e}", args.input_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut waiting: HashSet<String> = HashSet::new();
    for path in &files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| format!("{}: not a UTF-8 file name", path.display()))?;
        let key = format!("input/run-{run_id}/{name}");
        let body = std::fs::read(path)?;
        l.s3.put_object()
            .bucket(bucket)
            .key(&key)
            .body(body.into())
            .send()
            .await
            .map_err(|e| format!("PutObject {key}: {e:?}"))?;
        println!("uploaded s3://{bucket}/{key}");
        waiting.insert(key);
    }

    // Push: deliver each S3 notification as asynchronous invoke would (retried twice on error).
    let mut objects = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !waiting.is_empty() {
        if Instant::now() > deadline {
            return Err(format!("no notification arrived for: {waiting:?}").into());
        }
        for (receipt, body) in l.receive(&queue, Duration::from_secs(1)).await? {
            let mut outcome = None;
            for attempt in 0..3 {
                let inv = push.invoke(body.clone()).await?;
                match inv.outcome {
                    Outcome::Response(r) => {
                        outcome = Some(r);
                        break;
                    }
                    other => eprintln!("push attempt {} failed: {other:?}", attempt + 1),
                }
            }
            l.delete_message(&queue, &receipt).await?;
            let Some(response) = outcome else { continue };
            let summary: serde_json::Value = serde_json::from_slice(&response)?;
            for o in summary["objects"].as_array().into_iter().flatten() {
                let key = o["key"].as_str().unwrap_or_default().to_owned();
                if waiting.remove(&key) {
                    println!(
                        "pushed  {key}: {} lines, {} records, {} quarantined, {} PutRecords calls",
                        o["lines"], o["records"], o["quarantined"], o["put_calls"]
                    );
                    objects.push(o.clone());
                }
            }
        }
    }

    // Pull: what arrived in the stream, per shard, in batches, as the mapping would invoke.
    let records = l.read_from(&args.stream, iterators).await?;
    let mut by_shard: BTreeMap<String, Vec<StreamRecord>> = BTreeMap::new();
    for r in records {
        by_shard.entry(r.shard_id.clone()).or_default().push(r);
    }
    let (mut batches, mut delivered, mut failed) = (Vec::new(), 0usize, 0usize);
    for (shard, recs) in &by_shard {
        for chunk in recs.chunks(args.batch_size.max(1)) {
            let inv = pull.invoke(kinesis_event(chunk, &stream_arn).to_string()).await?;
            let Outcome::Response(body) = inv.outcome else {
                return Err(format!("pull function failed on {shard}: {:?}", inv.outcome).into());
            };
            let response: serde_json::Value = serde_json::from_slice(&body)?;
            batches.push(chunk.len());
            delivered += chunk.len();
            failed += response["batchItemFailures"].as_array().map_or(0, Vec::len);
        }
    }
    // The rollup as the pull function wrote it: every output object of this run.
    let mut groups: BTreeMap<String, (u64, pushpull::rollup::Sum)> = BTreeMap::new();
    let mut outputs = 0;
    let since = aws_sdk_s3::primitives::DateTime::from_secs(run_id.parse::<i64>().unwrap_or(0) - 1);
    let list = l.s3.list_objects_v2().bucket(bucket).prefix(format!("output/{}/", args.stream)).send().await?;
    for o in list.contents().iter().filter(|o| o.last_modified().is_some_and(|t| *t >= since)) {
        outputs += 1;
        let body =
            l.s3.get_object()
                .bucket(bucket)
                .key(o.key().unwrap_or_default())
                .send()
                .await?
                .body
                .collect()
                .await?
                .into_bytes();
        for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let v: serde_json::Value = serde_json::from_slice(line)?;
            let g = groups.entry(v["key"].as_str().unwrap_or_default().to_owned()).or_default();
            g.0 += v["count"].as_u64().unwrap_or(0);
            g.1.0 += pushpull::rollup::Sum::parse(&v["sum"].to_string()).map_or(0, |s| s.0);
        }
    }

    let total = |field: &str| objects.iter().map(|o| o[field].as_u64().unwrap_or(0)).sum::<u64>();
    println!();
    println!("summary (run {run_id}, {:.1} s)", started.elapsed().as_secs_f64());
    println!("  objects          {}", objects.len());
    println!("  lines            {} ({} blank)", total("lines"), total("blank_lines"));
    println!("  records sent     {} in {} PutRecords calls", total("records"), total("put_calls"));
    println!("  quarantined      {} (s3://{bucket}/quarantine/)", total("quarantined"));
    println!(
        "  records pulled   {delivered} from {} shards in {} batches (sizes {:?})",
        by_shard.len(),
        batches.len(),
        batches
    );
    println!("  pull failures    {failed}");
    println!("  rollup outputs   {outputs} objects under s3://{bucket}/output/{}/", args.stream);
    println!("  rollup           {:>8} {:>8} {:>12}", "user", "count", "sum(amount)");
    for (user, (count, sum)) in &groups {
        println!("                   {user:>8} {count:>8} {:>12}", sum.to_string());
    }
    let counted: u64 = groups.values().map(|g| g.0).sum();
    if counted as usize != delivered - failed {
        return Err(format!(
            "the rollup counts {counted} records; {} were delivered without failure",
            delivered - failed
        )
        .into());
    }
    drop(push);
    drop(pull);
    if total("records") as usize != delivered {
        return Err(format!("{} records were sent but {delivered} came out of the stream", total("records")).into());
    }
    Ok(())
}

/// Logs to stderr: `text` for people, `json` for machines. `RUST_LOG` filters (default info).
fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,aws_config=warn,aws_smithy_runtime=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if format == "json" { builder.json().try_init() } else { builder.try_init() };
}
