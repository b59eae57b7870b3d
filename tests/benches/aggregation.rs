//! Throughput up to the shard's limit, with and without KPL aggregation, under AWS's limits.
//!
//!     make bench-aggregation     # or: cargo bench -p pushpull-tests --bench aggregation -- [rounds]  (2)
//!
//! Needs LocalStack (the make target starts it). The push function (the real binary over the
//! Runtime API) sends one S3 object of ~90-byte lines of 1,000 users, with per-key order
//! (`PUT_ORDERING=per-key`), to a fresh 2-shard stream behind the realism proxy's `aws` profile:
//! PutRecords admits 1 MiB/s and 1,000 records/s per shard and refuses the rest entry by entry as
//! Kinesis does (`ProvisionedThroughputExceededException`), which the function resends with
//! backoff. Configurations: aggregation off; on with the default 250,000-byte aggregates; on with
//! the KPL's default 51,200. Each round runs each once, in a rotating order.
//!
//! Reports, per configuration (medians over rounds): lines/s per shard from the invocation's
//! wall time; the share of a shard's 1 MiB/s used (Kinesis record bytes, data and partition key,
//! read back from the stream); PutRecords calls, Kinesis records and PUT payload units per million
//! lines and resent entries per call (the function's own account); then the monthly cost of a
//! steady 10,000 lines/s, with the shards AWS's limits require for each configuration's measured
//! records and bytes per line (1,000 records/s and 1 MiB/s a shard, whichever binds) and its
//! measured PUT payload units. Without aggregation the local rate is kinesis-mock's (a few hundred
//! records a second), not AWS's: the table prints AWS's ceiling for it beside what was measured.

use pushpull_local::localstack::Local;
use pushpull_local::realism::iam::Policies;
use pushpull_local::realism::proxy::RealismProxy;
use pushpull_local::realism::{Profile, Realism, RealismConfig};
use pushpull_tests::{object_created_event, unique};

/// us-east-1, provisioned mode: $0.015 a shard-hour, $0.014 a million PUT payload units (the
/// rates on aws.amazon.com/kinesis/data-streams/pricing as quoted in 2026; other regions differ).
const SHARD_HOUR_USD: f64 = 0.015;
const PER_MILLION_UNITS_USD: f64 = 0.014;
const HOURS_A_MONTH: f64 = 730.0;
const STEADY_LINES_PER_S: f64 = 10_000.0;
const SHARDS: usize = 2;

struct Config {
    name: &'static str,
    env: Vec<(&'static str, &'static str)>,
    /// Lines sent: enough for several seconds at the rate the configuration can reach.
    lines: usize,
}

#[derive(Debug, Default, Clone)]
struct Row {
    lines_per_shard_s: f64,
    share_of_mib: f64,
    calls_per_m: f64,
    records_per_m: f64,
    units_per_m: f64,
    resent_per_call: f64,
    bytes_per_line: f64,
    records_per_line: f64,
    seconds: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn run(l: &Local, proxy: &RealismProxy, bucket: &str, config: &Config) -> Row {
    let stream = unique("pp-agg-bench");
    l.ensure_stream(&stream, SHARDS as i32).await.unwrap();
    let key = format!("input/{}.ndjson", config.name);
    l.s3.put_object()
        .bucket(bucket)
        .key(&key)
        .body(pushpull_tests::bench_lines(config.lines).into())
        .send()
        .await
        .unwrap();
    let event = object_created_event(l, bucket, &key, "01").await;
    let checkpoints = tempfile::tempdir().unwrap();
    let cp = format!("file://{}", checkpoints.path().display());
    let endpoint = proxy.endpoint();
    let mut env = vec![
        ("STREAM_NAME", stream.as_str()),
        ("PARTITION_KEY_FIELD", "user"),
        ("PUT_ORDERING", "per-key"),
        ("CHECKPOINT_URI", cp.as_str()),
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("PUT_MAX_ATTEMPTS", "100"),
        ("RUST_LOG", "warn"),
    ];
    env.extend(config.env.iter().copied());
    let (o, seconds) = pushpull_tests::push_timed(&env, event, config.lines).await;
    let written = l.read_stream(&stream).await.unwrap();
    let bytes: usize = written.iter().map(|r| r.data.len() + r.partition_key.len()).sum();
    let m = 1e6 / config.lines as f64;
    let calls = o["put_calls"].as_f64().unwrap();
    Row {
        lines_per_shard_s: config.lines as f64 / seconds / SHARDS as f64,
        share_of_mib: bytes as f64 / seconds / SHARDS as f64 / (1024.0 * 1024.0),
        calls_per_m: calls * m,
        records_per_m: written.len() as f64 * m,
        units_per_m: o["put_units"].as_f64().unwrap() * m,
        resent_per_call: o["resent"].as_f64().unwrap() / calls,
        bytes_per_line: bytes as f64 / config.lines as f64,
        records_per_line: written.len() as f64 / config.lines as f64,
        seconds,
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let rounds: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(2);
    let l = pushpull_tests::local().await;
    let bucket = unique("pp-agg-bench");
    l.ensure_bucket(&bucket).await.unwrap();
    let realism = std::sync::Arc::new(Realism::new(RealismConfig::new(Profile::Aws, 1)));
    let proxy = RealismProxy::start(realism.clone(), Policies::default(), &pushpull_local::localstack::endpoint())
        .await
        .unwrap();
    let configs = [
        // Aggregated, ~30 s each: the shard's burst allowance (a second's worth) is then a few
        // percent of what is measured.
        Config { name: "off", env: vec![("PUT_AGGREGATION", "off")], lines: 10_000 },
        Config { name: "on-250000", env: vec![("PUT_AGGREGATION", "on")], lines: 900_000 },
        Config {
            name: "on-51200",
            env: vec![("PUT_AGGREGATION", "on"), ("PUT_AGGREGATION_MAX_BYTES", "51200")],
            lines: 900_000,
        },
    ];
    let mut rows: Vec<Vec<Row>> = vec![Vec::new(); configs.len()];
    for round in 0..rounds {
        for k in 0..configs.len() {
            let i = (k + round) % configs.len();
            let row = run(&l, &proxy, &bucket, &configs[i]).await;
            println!(
                "round {} {:>10}: {:>7.0} lines/s/shard, {:.2} of 1 MiB/s, {:.1} s",
                round + 1,
                configs[i].name,
                row.lines_per_shard_s,
                row.share_of_mib,
                row.seconds
            );
            rows[i].push(row);
        }
    }
    println!("\n{}", realism.faults());
    println!(
        "\n| aggregation | lines/s per shard | share of 1 MiB/s | AWS's ceiling, lines/s per shard | PutRecords calls / M lines | Kinesis records / M lines | PUT units / M lines | resent entries / call |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut costs = Vec::new();
    for (config, rs) in configs.iter().zip(&rows) {
        let m = |f: fn(&Row) -> f64| median(rs.iter().map(f).collect());
        let (rate, share) = (m(|r| r.lines_per_shard_s), m(|r| r.share_of_mib));
        let (calls, records, units, resent) =
            (m(|r| r.calls_per_m), m(|r| r.records_per_m), m(|r| r.units_per_m), m(|r| r.resent_per_call));
        let (bytes_per_line, records_per_line) = (m(|r| r.bytes_per_line), m(|r| r.records_per_line));
        // A shard takes 1,000 records/s and 1 MiB/s: the lower bound on lines binds.
        let ceiling = (1000.0 / records_per_line).min(1024.0 * 1024.0 / bytes_per_line);
        println!(
            "| {} | {rate:.0} | {share:.2} | {ceiling:.0} | {calls:.0} | {records:.0} | {units:.0} | {resent:.2} |",
            config.name
        );
        // Shards AWS's limits require for a steady 10,000 lines/s; units at the measured count.
        let shards = (STEADY_LINES_PER_S / ceiling).ceil();
        let units_month = units / 1e6 * STEADY_LINES_PER_S * 3600.0 * HOURS_A_MONTH;
        let shard_cost = shards * SHARD_HOUR_USD * HOURS_A_MONTH;
        let unit_cost = units_month / 1e6 * PER_MILLION_UNITS_USD;
        costs.push((config.name, shards, shard_cost, units_month, unit_cost));
    }
    println!("\nA steady {STEADY_LINES_PER_S} lines/s for a month ({HOURS_A_MONTH} h), us-east-1 provisioned:\n");
    println!("| aggregation | shards | shard-hours USD | PUT units (millions) | PUT units USD | total USD |");
    println!("|---|---|---|---|---|---|");
    for (name, shards, shard_cost, units, unit_cost) in costs {
        println!(
            "| {name} | {shards:.0} | {shard_cost:.2} | {:.0} | {unit_cost:.2} | {:.2} |",
            units / 1e6,
            shard_cost + unit_cost
        );
    }
}
