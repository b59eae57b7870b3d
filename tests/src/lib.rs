//! Shared helpers for the integration tests: LocalStack clients, unique resource names, and the
//! real function binaries run over the Lambda Runtime API.
//!
//! Tests never skip: if LocalStack is not running they fail and say how to start it (the
//! README's test command starts it).
#[cfg(feature = "integration")]
pub mod kafka;
#[cfg(feature = "integration")]
pub mod rabbitmq;
pub mod readme;
#[cfg(feature = "integration")]
pub mod redis;
pub mod runners;
pub mod workload;

use pushpull_local::localstack::{Local, function_env};
use pushpull_local::runtime_api::{FunctionHost, FunctionSpec, Outcome, workspace_binary};

/// A lowercase name unique to this test run, valid for buckets, streams and queues.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{:08x}", std::process::id(), fastrand::u32(..))
}

/// LocalStack clients; panics with instructions if it is not running.
pub async fn local() -> Local {
    match Local::connect().await {
        Ok(l) => l,
        Err(e) => panic!("{e}"),
    }
}

/// The spec of a workspace function binary, pointed at LocalStack, with `env` added.
pub fn function(binary: &str, env: &[(&str, &str)]) -> FunctionSpec {
    let path = workspace_binary(binary);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (`make test` does)",
        path.display()
    );
    let mut spec = FunctionSpec::new(binary, path);
    // Generous: LocalStack's Kinesis is slow, and a test should fail on what it asserts.
    spec.timeout = std::time::Duration::from_secs(120);
    spec.env = function_env();
    spec.env.push(("RUST_LOG".into(), "info".into()));
    // The functions have no default locations (a /tmp default would be silently wrong in Lambda):
    // a directory of this call's own, which a test's own values override.
    let scratch = std::env::temp_dir().join(unique("pushpull-fn"));
    for (name, sub) in [("CHECKPOINT_URI", "checkpoints"), ("OUTPUT_URI", "output"), ("QUARANTINE_URI", "quarantine")] {
        spec.env.push((name.into(), format!("file://{}", scratch.join(sub).display())));
    }
    for (k, v) in env {
        spec.env.push((k.to_string(), v.to_string()));
    }
    spec
}

/// The realism the pipeline tests run under (`pushpull_local::realism`): `PUSHPULL_REALISM`
/// (`off` by default; `aws` for AWS's limits and IAM) and `PUSHPULL_SEED` (42 by default), as
/// `PUSHPULL_REALISM=aws make test`. The storm test runs under `storm` whatever this says.
pub fn realism() -> pushpull_local::realism::RealismConfig {
    let profile = std::env::var("PUSHPULL_REALISM").unwrap_or_default();
    let profile = profile.parse().unwrap_or_else(|e| panic!("PUSHPULL_REALISM: {e}"));
    let seed = std::env::var("PUSHPULL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(42);
    pushpull_local::realism::RealismConfig::new(profile, seed)
}

/// What an invocation answered: a response or a function error, each parsed as JSON.
#[derive(Debug)]
pub enum Answer {
    /// A response.
    Ok(serde_json::Value),
    /// A function error (`errorType`, `errorMessage`).
    Error(serde_json::Value),
}

/// Invokes and returns the answer; panics if the function did not answer (crashed, timed out)
/// or answered something that is not JSON.
pub async fn answer(host: &mut FunctionHost, payload: Vec<u8>) -> Answer {
    let inv = host.invoke(payload).await.unwrap_or_else(|e| panic!("{e}"));
    let json =
        |body: &[u8]| serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)));
    match inv.outcome {
        Outcome::Response(body) => Answer::Ok(json(&body)),
        Outcome::FunctionError(body) => Answer::Error(json(&body)),
        other => panic!("the function must answer, not {other:?}"),
    }
}

/// Starts a function binary, panicking with its output if init fails.
pub async fn start(spec: FunctionSpec) -> FunctionHost {
    match FunctionHost::start(spec).await {
        Ok(h) => h,
        Err(e) => panic!("{e}"),
    }
}

/// Invokes and expects a response; returns it as JSON. Panics with the function's output if it
/// failed.
pub async fn invoke_ok(host: &mut FunctionHost, payload: impl Into<bytes_like::Payload>) -> serde_json::Value {
    let inv = host.invoke(payload.into().0).await.unwrap_or_else(|e| panic!("{e}"));
    match inv.outcome {
        Outcome::Response(body) => {
            serde_json::from_slice(&body).unwrap_or_else(|e| panic!("response is not JSON ({e}): {body:?}"))
        }
        other => panic!("{} failed: {other:?}\n--- output ---\n{}", host.name(), host.output().join("\n")),
    }
}

/// Conversions into an invocation payload.
pub mod bytes_like {
    /// An invocation payload.
    pub struct Payload(pub Vec<u8>);
    impl From<String> for Payload {
        fn from(s: String) -> Self {
            Payload(s.into_bytes())
        }
    }
    impl From<&str> for Payload {
        fn from(s: &str) -> Self {
            Payload(s.as_bytes().to_vec())
        }
    }
    impl From<serde_json::Value> for Payload {
        fn from(v: serde_json::Value) -> Self {
            Payload(v.to_string().into_bytes())
        }
    }
    impl From<Vec<u8>> for Payload {
        fn from(v: Vec<u8>) -> Self {
            Payload(v)
        }
    }
}

/// The records of a stream as a sorted multiset of their data, for exact comparisons.
pub async fn stream_multiset(l: &Local, stream: &str) -> Vec<String> {
    let mut all: Vec<String> = l
        .read_stream(stream)
        .await
        .unwrap()
        .into_iter()
        .map(|r| String::from_utf8_lossy(&r.data).into_owned())
        .collect();
    all.sort();
    all
}

/// The records of a stream grouped by partition key, each group in stream order.
pub async fn stream_by_key(l: &Local, stream: &str) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut records = l.read_stream(stream).await.unwrap();
    records.sort_by(|a, b| {
        (a.shard_id.as_str(), a.sequence_number.len(), a.sequence_number.as_str()).cmp(&(
            b.shard_id.as_str(),
            b.sequence_number.len(),
            b.sequence_number.as_str(),
        ))
    });
    let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for r in records {
        out.entry(r.partition_key).or_default().push(String::from_utf8_lossy(&r.data).into_owned());
    }
    out
}

/// A genuine-shaped S3 notification for one object, with its real ETag, size and a sequencer.
pub async fn object_created_event(l: &Local, bucket: &str, key: &str, sequencer: &str) -> String {
    let head = l.s3.head_object().bucket(bucket).key(key).send().await.unwrap();
    let etag = head.e_tag().unwrap_or_default().trim_matches('"').to_owned();
    let mut object = serde_json::json!({
        "key": form_encode(key),
        "size": head.content_length().unwrap_or(0),
        "eTag": etag,
        "sequencer": sequencer,
    });
    if let Some(v) = head.version_id().filter(|v| *v != "null") {
        object["versionId"] = v.into();
    }
    serde_json::json!({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": "2026-11-24T12:00:00.000Z", "eventName": "ObjectCreated:Put",
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket, "arn": format!("arn:aws:s3:::{bucket}")}, "object": object}
    }]})
    .to_string()
}

/// Encodes a key as S3 does in notifications (form encoding: space as '+').
pub fn form_encode(key: &str) -> String {
    let mut out = String::new();
    for b in key.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' | b'*' => out.push(b as char),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Peak resident memory of a process so far (VmHWM), in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The body of an S3 object, and its lines (empty ones left out) parsed as JSON.
pub async fn object_json_lines(l: &Local, bucket: &str, key: &str) -> Vec<serde_json::Value> {
    let body = l.s3.get_object().bucket(bucket).key(key).send().await.unwrap_or_else(|e| panic!("{key}: {e:?}"));
    let body = body.body.collect().await.unwrap().into_bytes();
    body.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect()
}

/// `lines` NDJSON lines of about 90 bytes, of 1,000 users (`u0000`..`u0999`) with amounts: the
/// push benchmarks' S3 object.
pub fn bench_lines(lines: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(lines * 92);
    for i in 0..lines {
        body.extend_from_slice(
            format!(
                "{{\"id\":{i},\"user\":\"u{:04}\",\"amount\":{:.2},\"ts\":\"2026-11-24T00:{:02}:{:02}Z\"}}\n",
                i % 1000,
                (i * 37 % 10000) as f64 / 100.0,
                (i / 60) % 60,
                i % 60
            )
            .as_bytes(),
        );
    }
    body
}

/// Runs the push function (the built `s3-to-kinesis`) once on the S3 `event` with `env`, with
/// Lambda's longest timeout, as the push benchmarks do; returns the object's summary and the
/// invocation's wall time in seconds. Panics unless it sent `lines` records.
pub async fn push_timed(env: &[(&str, &str)], event: String, lines: usize) -> (serde_json::Value, f64) {
    let mut spec = function("s3-to-kinesis", env);
    spec.timeout = std::time::Duration::from_secs(900);
    let mut host = start(spec).await;
    let started = std::time::Instant::now();
    let summary = invoke_ok(&mut host, event).await;
    let seconds = started.elapsed().as_secs_f64();
    let object = summary["objects"][0].clone();
    assert_eq!(object["records"].as_u64(), Some(lines as u64), "{object}");
    (object, seconds)
}
