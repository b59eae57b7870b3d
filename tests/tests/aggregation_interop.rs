//! KPL aggregation against the reference implementation: AWS's Python `aws-kinesis-agg`
//! (awslabs/kinesis-aggregation, from PyPI, installed by `infra/tools.sh`) reads what
//! `pushpull::aggregation` packs, ours reads what it packs, both pass a corrupted aggregate
//! through as a plain record, and the real pull binary rolls up aggregates the Python package
//! made, put into a LocalStack stream.
//!
//! The rules pinned here are the format's (awslabs/amazon-kinesis-producer,
//! `aggregation-format.md`): magic bytes `F3 89 9A C2`, the protobuf `AggregatedRecord`, the MD5
//! of the protobuf bytes; and the deaggregators': "If the record is not an aggregated record,
//! [it] will be returned as is" (kinesis-aggregation, python/README.md), which the Python code
//! also does for a record whose MD5 does not match.
use std::path::PathBuf;
use std::process::Command;

use base64::Engine as _;
use bytes::Bytes;
use pushpull::aggregation::{AddError, Aggregator, deaggregate};
use pushpull_local::localstack::kinesis_event;
use pushpull_tests::{function, invoke_ok, local, start, unique};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The tools venv's Python, with `aws-kinesis-agg` in it (`infra/tools.sh` installs it, as it
/// installs the template checks; it prints its bin directory).
fn python() -> PathBuf {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new("bash").arg(format!("{root}/infra/tools.sh")).output().expect("run infra/tools.sh");
    assert!(out.status.success(), "infra/tools.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()).join("python")
}

/// Runs `script` with the tools' Python, `input` on stdin; its stdout.
fn run_python(script: &str, input: &serde_json::Value) -> serde_json::Value {
    use std::io::Write;
    let mut child = Command::new(python())
        .arg("-c")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Reads Lambda-shaped Kinesis records, deaggregates them with `aws_kinesis_agg`, prints what it
/// yields: partition key, explicit hash key, sub-sequence number (None for a record passed
/// through), data.
const PY_DEAGGREGATE: &str = r#"
import json, sys
from aws_kinesis_agg.deaggregator import deaggregate_records
out = []
for r in deaggregate_records(json.load(sys.stdin)):
    k = r['kinesis']
    out.append([k['partitionKey'], k.get('explicitHashKey'), k.get('subSequenceNumber'),
                k['data'].decode() if isinstance(k['data'], bytes) else k['data']])
print(json.dumps(out))
"#;

/// Aggregates [partition key, explicit hash key, data] triples with `aws_kinesis_agg`'s
/// RecordAggregator (max_size from the input), prints each aggregate: partition key, explicit
/// hash key, data.
const PY_AGGREGATE: &str = r#"
import base64, json, sys
from aws_kinesis_agg.aggregator import RecordAggregator
req = json.load(sys.stdin)
agg = RecordAggregator(max_size=req['max_size'])
out = []
def emit(r):
    pk, ehk, data = r.get_contents()
    out.append([pk, ehk.decode() if isinstance(ehk, bytes) else ehk, base64.b64encode(data).decode()])
for pk, ehk, data in req['records']:
    full = agg.add_user_record(pk, base64.b64decode(data), ehk)
    if full is not None:
        emit(full)
if agg.get_num_user_records() > 0:
    emit(agg.clear_and_get())
print(json.dumps(out))
"#;

/// User records with what the format allows: keys of any Unicode, some explicit hash keys,
/// binary and empty data.
fn user_records(n: usize) -> Vec<(String, Option<String>, Vec<u8>)> {
    let mut rng = fastrand::Rng::with_seed(7);
    (0..n)
        .map(|i| {
            let key = match i % 4 {
                0 => format!("user-{}", rng.u32(..50)),
                1 => format!("ключ-{}-🔑", rng.u32(..20)),
                2 => "k".repeat(1 + rng.usize(..255)),
                _ => format!("u{i}"),
            };
            let hash_key = (i % 7 == 0).then(|| rng.u128(..).to_string());
            let data: Vec<u8> = (0..rng.usize(..300)).map(|_| rng.u8(..)).collect();
            (key, hash_key, data)
        })
        .collect()
}

/// A Lambda-shaped Kinesis record carrying `data`.
fn lambda_record(seq: usize, key: &str, data: &[u8]) -> serde_json::Value {
    serde_json::json!({
        "kinesis": {"kinesisSchemaVersion": "1.0", "partitionKey": key, "sequenceNumber": seq.to_string(),
                    "data": B64.encode(data), "approximateArrivalTimestamp": 1545084650.987},
        "eventSource": "aws:kinesis", "eventID": format!("shardId-000000000000:{seq}"),
    })
}

#[test]
fn aws_kinesis_agg_reads_what_we_pack() {
    let records = user_records(3000);
    let mut agg = Aggregator::new(50_000);
    let mut packed = Vec::new();
    for (key, hash_key, data) in &records {
        match agg.add(key, hash_key.as_deref(), Bytes::from(data.clone())) {
            Ok(()) => {}
            Err(AddError::Full) => {
                packed.push(agg.finish().unwrap());
                agg.add(key, hash_key.as_deref(), Bytes::from(data.clone())).unwrap();
            }
            Err(e) => panic!("{e}"),
        }
    }
    packed.extend(agg.finish());
    assert!(packed.len() > 5, "several aggregates: {}", packed.len());
    // Ours, a plain record, and one of ours with its MD5 broken, in one batch.
    let mut broken = packed[0].data.to_vec();
    let last = broken.len() - 1;
    broken[last] ^= 0xff;
    let mut batch: Vec<serde_json::Value> =
        packed.iter().enumerate().map(|(i, f)| lambda_record(i, &f.partition_key, &f.data)).collect();
    batch.push(lambda_record(9_000, "plain", b"{\"a\":1}"));
    batch.push(lambda_record(9_001, "broken", &broken));

    let theirs = run_python(PY_DEAGGREGATE, &serde_json::Value::Array(batch));
    let theirs = theirs.as_array().unwrap();
    assert_eq!(theirs.len(), records.len() + 2);
    let mut sub_expected = 0u64;
    let mut previous_key = None;
    for (got, (key, hash_key, data)) in theirs.iter().zip(&records) {
        assert_eq!(got[0], key.as_str());
        // A record without an explicit hash key: the Python deaggregator reads the unset
        // `explicit_hash_key_index` as 0 and reports the table's first key (it does not check
        // whether the field is present), so only keys that were set are compared.
        if hash_key.is_some() {
            assert_eq!(got[1].as_str(), hash_key.as_deref());
        }
        assert_eq!(B64.decode(got[3].as_str().unwrap()).unwrap(), *data);
        // Sub-sequence numbers count from 0 within each aggregate.
        let sub = got[2].as_u64().unwrap();
        if sub == 0 && previous_key.is_some() {
            sub_expected = 0;
        }
        assert_eq!(sub, sub_expected);
        sub_expected += 1;
        previous_key = Some(key);
    }
    // Passed through as they are: no sub-sequence number, the data untouched.
    let plain = &theirs[records.len()];
    assert_eq!((plain[0].as_str(), plain[2].as_u64()), (Some("plain"), None));
    let broken_back = &theirs[records.len() + 1];
    assert_eq!(B64.decode(broken_back[3].as_str().unwrap()).unwrap(), broken);
    assert!(deaggregate(&broken).is_err(), "ours passes it through too");
}

#[test]
fn we_read_what_aws_kinesis_agg_packs() {
    let records = user_records(3000);
    let request = serde_json::json!({
        "max_size": 50_000,
        "records": records.iter().map(|(k, h, d)| serde_json::json!([k, h, B64.encode(d)])).collect::<Vec<_>>(),
    });
    let theirs = run_python(PY_AGGREGATE, &request);
    let theirs = theirs.as_array().unwrap();
    assert!(theirs.len() > 5, "several aggregates: {}", theirs.len());
    let mut unpacked = Vec::new();
    for a in theirs {
        let data = B64.decode(a[2].as_str().unwrap()).unwrap();
        assert!(data.len() <= 50_000);
        let aggregate = deaggregate(&data).unwrap_or_else(|e| panic!("not read as an aggregate: {e}"));
        // The Python aggregator names the aggregate by its first record's partition key.
        assert_eq!(a[0].as_str(), aggregate.records().next().map(|r| r.partition_key));
        for (i, u) in aggregate.records().enumerate() {
            assert_eq!(u.sub_sequence_number, i as u64);
            unpacked.push((u.partition_key.to_owned(), u.explicit_hash_key.map(str::to_owned), u.data.to_vec()));
        }
    }
    assert_eq!(unpacked, records);
}

/// The real pull binary on aggregates the reference Python aggregator made, put into a
/// LocalStack stream and read back as the event source mapping reads them.
#[tokio::test]
async fn the_pull_function_rolls_up_what_aws_kinesis_agg_packs() {
    let l = local().await;
    let stream = unique("pp-agg");
    let arn = l.ensure_stream(&stream, 1).await.unwrap();
    let lines: Vec<(String, Option<String>, Vec<u8>)> = (0..2000)
        .map(|i| {
            let line = format!(r#"{{"user":"u{}","amount":{}.5}}"#, i % 13, i % 10);
            (format!("u{}", i % 13), None, line.into_bytes())
        })
        .collect();
    let request = serde_json::json!({
        "max_size": 20_000,
        "records": lines.iter().map(|(k, h, d)| serde_json::json!([k, h, B64.encode(d)])).collect::<Vec<_>>(),
    });
    let theirs = run_python(PY_AGGREGATE, &request);
    for a in theirs.as_array().unwrap() {
        let mut put = l
            .kinesis
            .put_record()
            .stream_name(&stream)
            .partition_key(a[0].as_str().unwrap())
            .data(B64.decode(a[2].as_str().unwrap()).unwrap().into());
        if let Some(ehk) = a[1].as_str() {
            put = put.explicit_hash_key(ehk);
        }
        put.send().await.unwrap();
    }
    let records = l.read_stream(&stream).await.unwrap();
    assert!(records.len() < 20, "{} Kinesis records for 2,000 lines", records.len());
    let out = tempfile::tempdir().unwrap();
    let out_uri = format!("file://{}", out.path().display());
    let env = [("GROUP_BY_FIELD", "user"), ("SUM_FIELD", "amount"), ("OUTPUT_URI", out_uri.as_str())];
    let mut host = start(function("kinesis-rollup", &env)).await;
    let response = invoke_ok(&mut host, kinesis_event(&records, &arn)).await;
    assert_eq!(response, serde_json::json!({ "batchItemFailures": [] }));
    let mut totals = std::collections::BTreeMap::<String, (u64, f64)>::new();
    for f in walk(out.path()) {
        for row in std::fs::read_to_string(f).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(row).unwrap();
            let t = totals.entry(v["key"].as_str().unwrap().to_owned()).or_default();
            t.0 += v["count"].as_u64().unwrap();
            t.1 += v["sum"].as_f64().unwrap();
        }
    }
    let mut expected = std::collections::BTreeMap::<String, (u64, f64)>::new();
    for i in 0..2000 {
        let t = expected.entry(format!("u{}", i % 13)).or_default();
        t.0 += 1;
        t.1 += (i % 10) as f64 + 0.5;
    }
    assert_eq!(totals, expected);
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}
