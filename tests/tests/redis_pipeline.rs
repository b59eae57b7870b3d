//! The sample pipeline through Redis (`pushpull-local run --broker redis-streams|redis-pubsub
//! [--overload]`): the push function sends each line to a Redis stream (`XADD`) or channel
//! (`PUBLISH`); the local Streams mapping or pub/sub relay invokes the rollup. A stream loses
//! nothing, under overload too; pub/sub is exact under normal load, and under overload (a slow
//! function, Redis's buffer for a slow subscriber small) Redis cuts the relay off: the summary
//! counts what was lost and does not call the run exact.
use std::path::PathBuf;

use pushpull_local::pipeline::{self, Broker, PipelineConfig, RedisBroker};
use pushpull_tests::redis::OwnRedis;
use pushpull_tests::unique;

const TEMPLATE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../infra/template.yaml");

fn sample() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../infra/sample-data"))
}

fn script() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../infra/redis.sh"))
}

fn config(redis: &OwnRedis, pubsub: bool, overload: bool) -> PipelineConfig {
    let stack = unique("predis");
    PipelineConfig {
        broker: Broker::Redis(RedisBroker { url: redis.url(), pubsub, overload, control: Some(script()) }),
        overrides: vec![format!("DataBucketName={}", unique("pp-redis"))],
        delay_scale: 0.01,
        ..PipelineConfig::new(TEMPLATE, stack, sample())
    }
}

#[tokio::test]
async fn through_a_redis_stream_under_overload_every_line_is_counted_once() {
    let redis = OwnRedis::start();
    let report = pipeline::run(config(&redis, false, true)).await.unwrap();
    println!("{report}");
    report.check().unwrap();
    let r = report.redis.as_ref().expect("a Redis run says so");
    assert!(!r.pubsub);
    assert_eq!(report.expected_good, 10_000, "the sample eight times over");
    assert_eq!((r.queue.left, r.queue.dead_lettered, r.lost), (0, 0, 0), "{r:?}");
    assert_eq!(r.published, 10_000);
    assert!(report.to_string().contains("totals           exact"), "{report}");
}

#[tokio::test]
async fn through_redis_pubsub_a_run_is_exact_and_under_overload_the_loss_is_counted() {
    let redis = OwnRedis::start();
    let report = pipeline::run(config(&redis, true, false)).await.unwrap();
    println!("{report}");
    report.check().unwrap();
    let r = report.redis.as_ref().unwrap();
    assert_eq!((r.published, r.queue.deliveries, r.lost, r.disconnects), (1250, 1250, 0, 0), "{r:?}");

    let report = pipeline::run(config(&redis, true, true)).await.unwrap();
    println!("{report}");
    let r = report.redis.as_ref().unwrap();
    assert!(r.disconnects >= 1, "Redis cut the slow relay off: {r:?}");
    assert!(r.lost > 0 && r.lost == r.published - r.queue.deliveries, "{r:?}");
    let err = report.check().unwrap_err();
    assert!(err.starts_with(&format!("lost {}:", r.lost)), "{err}");
    let text = report.to_string();
    assert!(text.contains(&format!("lost {}", r.lost)) && text.contains("NOT exact"), "{text}");
    // What was delivered was rolled up once: the rollup holds exactly the delivered lines.
    let counted: u64 = report.rollup.values().map(|g| g.0).sum();
    assert_eq!(counted, r.queue.deliveries, "{text}");
}
