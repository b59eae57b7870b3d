//! Bad and hostile batches to the pull function, each case on the real binary against
//! LocalStack: malformed events, records whose data is not what the rollup reads, odd sequence
//! numbers, huge batches. Each is answered as the mapping needs (a function error for an event
//! it cannot read, else a partial batch response naming the sequence number of each record it
//! cannot count), never a panic or a crash; and what is counted is counted once.
use pushpull_local::localstack::{StreamRecord, kinesis_event};
use pushpull_tests::{Answer, answer, function, local, object_json_lines, start, unique};
use serde_json::{Value, json};

const ARN: &str = "arn:aws:kinesis:us-east-1:000000000000:stream/hostile";

fn record(seq: u64, data: &[u8]) -> StreamRecord {
    StreamRecord {
        shard_id: "shardId-000000000000".into(),
        sequence_number: format!("4959033827149025660855969253836157109592157598913658{seq:04}"),
        partition_key: "k".into(),
        data: data.to_vec(),
        arrival: 1_795_000_000.0,
    }
}

fn event(records: &[StreamRecord]) -> Vec<u8> {
    kinesis_event(records, ARN).to_string().into_bytes()
}

/// An event with one record's JSON changed by `patch`.
fn patched(data: &[u8], patch: impl Fn(&mut Value)) -> Vec<u8> {
    let mut v = kinesis_event(&[record(1, data)], ARN);
    patch(&mut v["Records"][0]);
    v.to_string().into_bytes()
}

fn failed_ids(v: &Value) -> Vec<String> {
    v["batchItemFailures"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["itemIdentifier"].as_str())
        .map(str::to_owned)
        .collect()
}

/// What a case must get: an error containing a text, or a response failing these records.
enum Expect {
    Error(&'static str),
    Fails(Vec<u64>),
}

#[tokio::test]
async fn hostile_batches_are_answered_per_record_and_counted_once() {
    let l = local().await;
    let bucket = unique("pp-hostile-pull");
    l.ensure_bucket(&bucket).await.unwrap();
    let env = pushpull_tests::runners::rollup_env(&bucket);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut host = start(function("kinesis-rollup", &env)).await;
    let good = br#"{"user":"g","amount":1.25}"#;
    let deep = format!("{}{}", "[".repeat(50_000), "]".repeat(50_000));
    let mut seq = 20_000u64;
    // Each case's records get sequence numbers above every earlier case's: a shard only moves on.
    let mut next = |data: &[&[u8]]| -> Vec<StreamRecord> {
        data.iter()
            .map(|d| {
                seq += 1;
                record(seq, d)
            })
            .collect()
    };
    let cases: Vec<(&str, Vec<u8>, Expect, u64)> = vec![
        ("not JSON", b"hello".to_vec(), Expect::Error("Kinesis"), 0),
        ("empty payload", Vec::new(), Expect::Error("Kinesis"), 0),
        ("a JSON array", b"[]".to_vec(), Expect::Error("Kinesis"), 0),
        ("Records of the wrong type", br#"{"Records":7}"#.to_vec(), Expect::Error("Kinesis"), 0),
        (
            "a record without kinesis",
            br#"{"Records":[{"eventSource":"aws:kinesis"}]}"#.to_vec(),
            Expect::Error("Kinesis"),
            0,
        ),
        (
            "data that is not base64",
            patched(good, |r| r["kinesis"]["data"] = json!("!!!not base64!!!")),
            Expect::Fails(vec![1]),
            0,
        ),
        ("data null", patched(good, |r| r["kinesis"]["data"] = Value::Null), Expect::Error("Kinesis"), 0),
        (
            "nesting 100,000 deep",
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
            Expect::Error("Kinesis"),
            0,
        ),
        ("no records", br#"{"Records":[]}"#.to_vec(), Expect::Fails(vec![]), 0),
        (
            "a sequence number that is not a number",
            patched(good, |r| r["kinesis"]["sequenceNumber"] = json!("abc")),
            Expect::Error("abc"),
            0,
        ),
    ];
    let mut record_cases: Vec<(&str, Vec<StreamRecord>, Vec<usize>, u64)> = vec![
        // (name, records, indexes that must fail, records counted)
        ("data not JSON", next(&[b"not json", good]), vec![0], 0),
        ("data empty", next(&[b"", good]), vec![0], 0),
        ("data a JSON array", next(&[b"[1,2]", good]), vec![0], 0),
        ("data a JSON string", next(&[b"\"s\"", good]), vec![0], 0),
        ("data invalid UTF-8", next(&[b"{\"user\":\"\xff\"}", good]), vec![0], 0),
        ("data nested 50,000 deep", next(&[deep.as_bytes(), good]), vec![0], 0),
        ("amount a string of digits", next(&[br#"{"user":"s","amount":"12.5"}"#]), vec![], 1),
        ("amount not a number", next(&[br#"{"user":"s","amount":"twelve"}"#, good]), vec![0], 0),
        ("amount 1e400", next(&[br#"{"user":"s","amount":1e400}"#, good]), vec![0], 0),
        // Exact, however long (`kinesis_rollup::Sum`).
        (
            "amount with 40 digits",
            next(&[br#"{"user":"s","amount":1234567890123456789012345678901234567890}"#, good]),
            vec![],
            2,
        ),
        ("amount with 20 decimals", next(&[br#"{"user":"n","amount":0.12345678901234567890}"#, good]), vec![], 2),
        ("amount missing", next(&[br#"{"user":"m"}"#]), vec![], 1),
        ("group an object", next(&[br#"{"user":{"a":1},"amount":1}"#]), vec![], 1),
        ("group missing", next(&[br#"{"amount":1}"#]), vec![], 1),
        ("group null", next(&[br#"{"user":null,"amount":1}"#]), vec![], 1),
        (
            "group 100 KB long",
            next(&[format!(r#"{{"user":"{}","amount":1}}"#, "x".repeat(100_000)).as_bytes()]),
            vec![],
            1,
        ),
        ("a bad record in the middle", next(&[good, b"{", good]), vec![1], 1),
        ("every record bad", next(&[b"x", b"y"]), vec![0, 1], 0),
    ];
    // 10,000 good records in one batch (the largest batch a Kinesis mapping sends).
    let big = next(&vec![&good[..]; 10_000]);
    record_cases.push(("10,000 records", big, vec![], 10_000));
    let mut failures = Vec::new();
    let mut counted = 0u64;
    for (name, payload, expect, _) in &cases {
        println!("case: {name}");
        let answer = answer(&mut host, payload.clone()).await;
        let verdict = match (&answer, expect) {
            (Answer::Error(v), Expect::Error(text)) if v.to_string().contains(text) => Ok(()),
            (Answer::Ok(v), Expect::Fails(ids)) if failed_ids(v).len() == ids.len() => Ok(()),
            (Answer::Ok(v) | Answer::Error(v), _) => Err(v.to_string()),
        };
        if let Err(got) = verdict {
            failures.push(format!("{name}: got {got:.300}"));
        }
    }
    for (name, records, failing, n) in &record_cases {
        println!("case: {name}");
        let answer = answer(&mut host, event(records)).await;
        let Answer::Ok(v) = &answer else {
            let Answer::Error(e) = &answer else { unreachable!() };
            failures.push(format!("{name}: a function error {e:.300}"));
            continue;
        };
        // The partial batch response names the lowest failure (and may name later ones).
        let ids = failed_ids(v);
        let want: Vec<&str> = failing.iter().map(|&i| records[i].sequence_number.as_str()).collect();
        if failing.is_empty() != ids.is_empty() || ids.first().map(String::as_str) != want.first().copied() {
            failures.push(format!("{name}: expected failures {want:?}, got {v:.300}"));
            continue;
        }
        // Counted: the records before the first failure (the mapping redelivers from there).
        assert_eq!(*n, failing.first().copied().unwrap_or(records.len()) as u64, "{name}: the case's own count");
        counted += *n;
    }
    assert!(failures.is_empty(), "{} cases:\n{}", failures.len(), failures.join("\n"));
    // The output holds what was counted, once.
    let list = l.s3.list_objects_v2().bucket(&bucket).prefix("output/").send().await.unwrap();
    let mut total = 0u64;
    for o in list.contents() {
        for v in object_json_lines(&l, &bucket, o.key().unwrap()).await {
            total += v["count"].as_u64().unwrap();
        }
    }
    assert_eq!(total, counted, "every record before a failure counted once");
}
