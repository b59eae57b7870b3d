//! The pull function against LocalStack with the real binary, delivered batches as the event
//! source mapping delivers them: a retry after a partial failure, bisected retries, a crash
//! between writing the output and advancing the checkpoint, duplicate deliveries, and tumbling
//! windows. Each test asserts that the rollup output equals the expected totals exactly.
use std::collections::BTreeMap;

use kinesis_rollup::Sum;
use pushpull_local::localstack::{Local, StreamRecord, kinesis_event};
use pushpull_local::runtime_api::Outcome;
use pushpull_tests::{function, invoke_ok, local, object_json_lines, start, unique};

struct Fixture {
    l: Local,
    bucket: String,
    arn: String,
    records: Vec<StreamRecord>,
    expected: BTreeMap<String, (u64, Sum)>,
}

/// A fresh bucket and one-shard stream: LocalStack, bucket, stream, stream ARN.
async fn bucket_and_stream(name: &str) -> (Local, String, String, String) {
    let l = local().await;
    let (bucket, stream) = (unique(name), unique(name));
    l.ensure_bucket(&bucket).await.unwrap();
    let arn = l.ensure_stream(&stream, 1).await.unwrap();
    (l, bucket, stream, arn)
}

/// A stream holding `n` records (users u0..u3, amounts with cents); indexes in `bad` hold a
/// line that is not JSON.
async fn fixture(name: &str, n: usize, bad: &[usize]) -> Fixture {
    let (l, bucket, stream, arn) = bucket_and_stream(name).await;
    let mut expected: BTreeMap<String, (u64, Sum)> = BTreeMap::new();
    let mut entries = Vec::new();
    for i in 0..n {
        let user = format!("u{}", i % 4);
        let amount = format!("{}.{:02}", i, (i * 7) % 100);
        let line = if bad.contains(&i) {
            format!("not json {i}")
        } else {
            let e = expected.entry(user.clone()).or_insert((0, Sum::ZERO));
            e.0 += 1;
            e.1 += &Sum::parse(&amount).unwrap();
            format!(r#"{{"id":{i},"user":"{user}","amount":{amount}}}"#)
        };
        entries.push(
            aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
                .partition_key(&user)
                .data(line.into_bytes().into())
                .build()
                .unwrap(),
        );
    }
    let out = l.kinesis.put_records().stream_name(&stream).set_records(Some(entries)).send().await.unwrap();
    assert_eq!(out.failed_record_count(), Some(0));
    let records = l.read_stream(&stream).await.unwrap();
    assert_eq!(records.len(), n);
    Fixture { l, bucket, arn, records, expected }
}

impl Fixture {
    async fn host(&self, extra: &[(&str, &str)]) -> pushpull_local::runtime_api::FunctionHost {
        let (out, cp) = (format!("s3://{}/output", self.bucket), format!("s3://{}/checkpoints", self.bucket));
        let mut env = vec![
            ("OUTPUT_URI", out.as_str()),
            ("CHECKPOINT_URI", cp.as_str()),
            ("GROUP_BY_FIELD", "user"),
            ("SUM_FIELD", "amount"),
        ];
        env.extend_from_slice(extra);
        start(function("kinesis-rollup", &env)).await
    }

    fn batch(&self, range: std::ops::Range<usize>) -> serde_json::Value {
        kinesis_event(&self.records[range], &self.arn)
    }

    fn seq(&self, i: usize) -> &str {
        &self.records[i].sequence_number
    }

    /// Every rollup line under output/, added up per key; also the number of output objects.
    async fn totals(&self) -> (BTreeMap<String, (u64, Sum)>, usize) {
        let list = self.l.s3.list_objects_v2().bucket(&self.bucket).prefix("output/").send().await.unwrap();
        let mut totals: BTreeMap<String, (u64, Sum)> = BTreeMap::new();
        for o in list.contents() {
            for v in object_json_lines(&self.l, &self.bucket, o.key().unwrap()).await {
                let t = totals.entry(v["key"].as_str().unwrap().to_owned()).or_insert((0, Sum::ZERO));
                t.0 += v["count"].as_u64().unwrap();
                t.1 += &Sum::parse_total(&v["sum"].to_string()).unwrap(); // small sums: exact through Value
            }
        }
        (totals, list.contents().len())
    }
}

/// A stream holding `aggregates` KPL aggregates of `per` lines each (users u0..u3, packed by
/// `pushpull::aggregation`); the line at `bad` = (aggregate, user record) is not JSON. The
/// expected totals leave out what AWS's rule makes unreachable: the partial batch response can
/// name only the Kinesis record, so the mapping gives up on the whole aggregate, and the lines
/// after the bad one in it go to the failure destination with it.
async fn aggregated_fixture(name: &str, aggregates: usize, per: usize, bad: (usize, usize)) -> Fixture {
    let (l, bucket, stream, arn) = bucket_and_stream(name).await;
    let mut expected: BTreeMap<String, (u64, Sum)> = BTreeMap::new();
    for a in 0..aggregates {
        let mut agg = pushpull::aggregation::Aggregator::new(1 << 20);
        for u in 0..per {
            let i = a * per + u;
            let user = format!("u{}", i % 4);
            let amount = format!("{}.{:02}", i, (i * 7) % 100);
            let line = if (a, u) == bad {
                format!("not json {i}")
            } else {
                if a != bad.0 || u < bad.1 {
                    let e = expected.entry(user.clone()).or_insert((0, Sum::ZERO));
                    e.0 += 1;
                    e.1 += &Sum::parse(&amount).unwrap();
                }
                format!(r#"{{"id":{i},"user":"{user}","amount":{amount}}}"#)
            };
            agg.add(&user, None, line.into()).unwrap();
        }
        let f = agg.finish().unwrap();
        l.kinesis
            .put_record()
            .stream_name(&stream)
            .partition_key(f.partition_key)
            .data(f.data.to_vec().into())
            .send()
            .await
            .unwrap();
    }
    let records = l.read_stream(&stream).await.unwrap();
    assert_eq!(records.len(), aggregates);
    Fixture { l, bucket, arn, records, expected }
}

/// KPL aggregates through the real binary: a bad line fails its whole aggregate, since a partial
/// batch response names Kinesis records only. AWS: "The following JSON structure shows the
/// required response syntax: { "batchItemFailures": [ { "itemIdentifier": "<SequenceNumber>" } ] }"
/// (Lambda developer guide, services-kinesis-batchfailurereporting.html, "Reporting syntax"). The
/// lines before it in the aggregate are counted once, and the retries and bisected halves that
/// redeliver the aggregate count nothing twice.
#[tokio::test]
async fn an_aggregate_with_a_bad_line_is_counted_up_to_it_once_across_retries_and_bisection() {
    let f = aggregated_fixture("pp-rollup-agg", 6, 10, (2, 4)).await;
    let mut host = f.host(&[]).await;
    for range in [0..6, 2..6, 2..4, 2..3] {
        let r = invoke_ok(&mut host, f.batch(range.clone())).await;
        assert_eq!(failures(&r), [f.seq(2)], "{range:?}");
    }
    // The mapping gives up on aggregate 2 and goes on after it.
    for range in [3..4, 4..6, 0..6] {
        assert!(failures(&invoke_ok(&mut host, f.batch(range.clone())).await).is_empty(), "{range:?}");
    }
    let (totals, _) = f.totals().await;
    assert_eq!(totals, f.expected);
}

/// A crash between the output and the checkpoint, when the output ends inside an aggregate: the
/// redelivered batch finds the output by its name, takes its last sub-sequence number as done,
/// and counts nothing twice.
#[tokio::test]
async fn a_crash_inside_an_aggregate_between_output_and_checkpoint_is_not_counted_twice() {
    let f = aggregated_fixture("pp-rollup-agg-crash", 3, 10, (1, 3)).await;
    let mut crashing = f.host(&[("PUSHPULL_INJECT_CRASH", "after-output")]).await;
    let inv = crashing.invoke(f.batch(0..3).to_string()).await.unwrap();
    assert!(matches!(inv.outcome, Outcome::Crashed { .. }), "{:?}", inv.outcome);
    drop(crashing);
    let mut host = f.host(&[]).await;
    assert_eq!(failures(&invoke_ok(&mut host, f.batch(0..3)).await), [f.seq(1)]);
    assert_eq!(failures(&invoke_ok(&mut host, f.batch(1..3)).await), [f.seq(1)]);
    assert!(failures(&invoke_ok(&mut host, f.batch(2..3)).await).is_empty());
    let (totals, objects) = f.totals().await;
    assert_eq!(totals, f.expected);
    assert_eq!(objects, 2, "the crashed attempt's output (aggregate 0 and 1/0-2), and aggregate 2's");
}

fn failures(response: &serde_json::Value) -> Vec<&str> {
    response["batchItemFailures"].as_array().unwrap().iter().map(|f| f["itemIdentifier"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn partial_failures_bisected_retries_and_duplicates_count_every_good_record_once() {
    let f = fixture("pp-rollup", 21, &[7, 16]).await;
    let mut host = f.host(&[]).await;
    // The whole batch: both bad records are reported; only 0..=6 can be counted now.
    let r = invoke_ok(&mut host, f.batch(0..21)).await;
    assert_eq!(failures(&r), [f.seq(7), f.seq(16)]);
    // The mapping retries from the lowest failure: 7 still fails; nothing new is counted.
    let r = invoke_ok(&mut host, f.batch(7..21)).await;
    assert_eq!(failures(&r), [f.seq(7), f.seq(16)]);
    // Bisect isolates record 7 (then gives up on it and sends it to the failure destination)
    // and the halves around it succeed, in order; record 16 is isolated the same way.
    for range in [7..8, 8..10, 10..14, 14..16, 16..17, 17..21] {
        let bad = range.start == 7 || range.start == 16;
        let r = invoke_ok(&mut host, f.batch(range.clone())).await;
        assert_eq!(failures(&r).len(), usize::from(bad), "{range:?}: {r}");
    }
    // A duplicate delivery of work already done changes nothing, and reports nothing: the bad
    // records are behind the checkpoint too (the mapping gave up on them; they are at the
    // failure destination).
    assert!(failures(&invoke_ok(&mut host, f.batch(0..21)).await).is_empty());
    assert!(failures(&invoke_ok(&mut host, f.batch(17..21)).await).is_empty());
    let (totals, _) = f.totals().await;
    assert_eq!(totals, f.expected);
}

#[tokio::test]
async fn a_crash_between_output_and_checkpoint_is_not_counted_twice() {
    let f = fixture("pp-rollup-crash", 12, &[]).await;
    let mut crashing = f.host(&[("PUSHPULL_INJECT_CRASH", "after-output")]).await;
    let inv = crashing.invoke(f.batch(0..12).to_string()).await.unwrap();
    assert!(matches!(inv.outcome, Outcome::Crashed { .. }), "{:?}", inv.outcome);
    drop(crashing);
    assert_eq!(f.totals().await.0, f.expected, "the output was written before the crash");

    // The mapping retries (a bisected half first, then the whole batch): the output of the
    // crashed attempt is found by its name and not written again.
    let mut host = f.host(&[]).await;
    assert!(failures(&invoke_ok(&mut host, f.batch(0..6)).await).is_empty());
    assert!(failures(&invoke_ok(&mut host, f.batch(0..12)).await).is_empty());
    let (totals, objects) = f.totals().await;
    assert_eq!(totals, f.expected);
    assert_eq!(objects, 1);
}

#[tokio::test]
async fn a_retry_that_covers_more_than_the_crashed_attempt_writes_only_the_rest() {
    let f = fixture("pp-rollup-more", 10, &[]).await;
    let mut crashing = f.host(&[("PUSHPULL_INJECT_CRASH", "after-output")]).await;
    let inv = crashing.invoke(f.batch(0..4).to_string()).await.unwrap();
    assert!(matches!(inv.outcome, Outcome::Crashed { .. }), "{:?}", inv.outcome);
    drop(crashing);
    let mut host = f.host(&[]).await;
    assert!(failures(&invoke_ok(&mut host, f.batch(0..10)).await).is_empty());
    let (totals, objects) = f.totals().await;
    assert_eq!(totals, f.expected);
    assert_eq!(objects, 2, "the crashed attempt's output, and one for records 4..10");
}

#[tokio::test]
async fn tumbling_windows_carry_state_and_the_final_invocation_writes_once() {
    let f = fixture("pp-window", 10, &[6]).await;
    let mut host = f.host(&[]).await;
    let window = serde_json::json!({"start": "2026-11-24T10:00:00Z", "end": "2026-11-24T10:05:00Z"});
    let windowed = |mut e: serde_json::Value, state: &serde_json::Value, last: bool| {
        e["window"] = window.clone();
        e["state"] = state.clone();
        e["shardId"] = f.records[0].shard_id.clone().into();
        e["eventSourceARN"] = f.arn.clone().into();
        e["isFinalInvokeForWindow"] = last.into();
        e["isWindowTerminatedEarly"] = false.into();
        e
    };
    let r1 = invoke_ok(&mut host, windowed(f.batch(0..5), &serde_json::json!({}), false)).await;
    assert!(failures(&r1).is_empty());
    assert!(r1["state"]["pushpull"].is_string(), "the state must be returned: {r1}");
    // Record 6 is bad: reported, and the state covers only record 5 (the mapping retries from 6).
    let r2 = invoke_ok(&mut host, windowed(f.batch(5..10), &r1["state"], false)).await;
    assert_eq!(failures(&r2), [f.seq(6)]);
    // The retry from 6 with the state returned; the bad record is then given up (bisect) and the
    // rest goes through.
    let r3 = invoke_ok(&mut host, windowed(f.batch(7..10), &r2["state"], false)).await;
    assert!(failures(&r3).is_empty());
    assert_eq!(f.totals().await.1, 0, "nothing is written before the window ends");
    let last = windowed(kinesis_event(&[], &f.arn), &r3["state"], true);
    let r4 = invoke_ok(&mut host, last.clone()).await;
    assert_eq!(r4["state"], serde_json::json!({}));
    // A retried final invocation cannot write the window twice.
    invoke_ok(&mut host, last).await;
    let (totals, objects) = f.totals().await;
    assert_eq!((totals, objects), (f.expected.clone(), 1));
    let list = f.l.s3.list_objects_v2().bucket(&f.bucket).prefix("output/").send().await.unwrap();
    let key = list.contents()[0].key().unwrap();
    assert!(key.ends_with("/window-2026-11-24T10:00:00Z.ndjson"), "{key}");
    let first = object_json_lines(&f.l, &f.bucket, key).await.remove(0);
    assert_eq!(
        (first["window_start"].as_str(), first["window_end"].as_str()),
        (Some("2026-11-24T10:00:00Z"), Some("2026-11-24T10:05:00Z"))
    );
}
