//! The push function into Kafka against the push function into Kinesis, lines/s.
//!
//!     make bench-push-targets     # or: cargo bench -p pushpull-tests --features integration --bench push_targets -- [rounds] [lines]  (3, 20000)
//!
//! Needs LocalStack and the Kafka broker (the make target starts both). The push function (the
//! release binary over the Runtime API) sends one S3 object of `lines` ~90-byte lines of 1,000
//! users, per-key order (`PUT_ORDERING=per-key`, the template's default), to a fresh 4-shard
//! Kinesis stream with KPL aggregation off, the same with it on, and a fresh 4-partition Kafka
//! topic; each round runs each once, in a rotating order. Reports lines/s from the invocation's
//! wall time and its ratio to Kinesis without aggregation in the same round (medians over rounds),
//! with the function's own count of calls. Locally the Kinesis side is LocalStack's kinesis-mock
//! and the Kafka side nisshi, each on this machine: the figures compare the sinks and the servers
//! here, not AWS's Kinesis with an MSK cluster.

use pushpull_tests::{object_created_event, unique};

const PARTITIONS: i32 = 4;

#[derive(Clone, Copy, PartialEq)]
enum Target {
    Kinesis { aggregation: bool },
    Kafka,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Kinesis { aggregation: false } => "kinesis",
            Target::Kinesis { aggregation: true } => "kinesis-aggregated",
            Target::Kafka => "kafka",
        }
    }
}

/// Lines/s and calls made, for one run into `target`.
async fn run(l: &pushpull_local::localstack::Local, bucket: &str, target: Target, lines: usize) -> (f64, u64) {
    let key = format!("input/{}-{}.ndjson", target.name(), unique("o"));
    l.s3.put_object().bucket(bucket).key(&key).body(pushpull_tests::bench_lines(lines).into()).send().await.unwrap();
    let event = object_created_event(l, bucket, &key, "01").await;
    let checkpoints = tempfile::tempdir().unwrap();
    let cp = format!("file://{}", checkpoints.path().display());
    let stream = unique("pp-push-bench");
    let bootstrap = pushpull_tests::kafka::bootstrap();
    let mut env = vec![
        ("PARTITION_KEY_FIELD", "user"),
        ("PUT_ORDERING", "per-key"),
        ("CHECKPOINT_URI", cp.as_str()),
        ("RUST_LOG", "warn"),
    ];
    let topic = match target {
        Target::Kinesis { aggregation } => {
            l.ensure_stream(&stream, PARTITIONS).await.unwrap();
            env.push(("STREAM_NAME", stream.as_str()));
            env.push(("PUT_AGGREGATION", if aggregation { "on" } else { "off" }));
            None
        }
        Target::Kafka => {
            let topic = pushpull_tests::kafka::topic("pp-push-bench", PARTITIONS).await;
            Some(topic)
        }
    };
    if let Some(t) = &topic {
        env.push(("KAFKA_TOPIC", t.as_str()));
        env.push(("KAFKA_BOOTSTRAP_SERVERS", bootstrap.as_str()));
    }
    let (o, seconds) = pushpull_tests::push_timed(&env, event, lines).await;
    if let Some(t) = &topic {
        pushpull_tests::kafka::delete_topic(t).await;
    }
    (lines as f64 / seconds, o["put_calls"].as_u64().unwrap_or(0))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let rounds: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(3);
    let lines: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let l = pushpull_tests::local().await;
    let bucket = unique("pp-push-bench");
    l.ensure_bucket(&bucket).await.unwrap();
    let targets = [Target::Kinesis { aggregation: false }, Target::Kinesis { aggregation: true }, Target::Kafka];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut calls = vec![0; targets.len()];
    for round in 0..rounds {
        let mut this = vec![0.0; targets.len()];
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let (rate, c) = run(&l, &bucket, targets[i], lines).await;
            println!("round {} {:>19}: {rate:>8.0} lines/s, {c} calls", round + 1, targets[i].name());
            this[i] = rate;
            calls[i] = c;
        }
        for i in 0..targets.len() {
            rates[i].push(this[i]);
            ratios[i].push(this[i] / this[0]);
        }
    }
    println!("\n{lines} lines, {PARTITIONS} shards / partitions, per-key order; medians of {rounds} rounds:\n");
    println!("| into | lines/s | ratio to Kinesis (aggregation off), same round | calls (last round) |");
    println!("|---|---|---|---|");
    for (i, t) in targets.iter().enumerate() {
        println!(
            "| {} | {:.0} | {:.2} | {} |",
            t.name(),
            median(rates[i].clone()),
            median(ratios[i].clone()),
            calls[i]
        );
    }
}
