//! The pull function, the real binary over the Runtime API, on records read back from a
//! LocalStack stream and shaped as the event source mapping shapes them: it reports exactly the
//! records it could not decode, lowest sequence number first.
use pushpull_local::localstack::kinesis_event;
use pushpull_tests::{function, invoke_ok, local, start, unique};

#[tokio::test]
async fn reports_exactly_the_undecodable_records() {
    let l = local().await;
    let stream = unique("pp-pull");
    let arn = l.ensure_stream(&stream, 1).await.unwrap();
    let lines: Vec<&[u8]> = vec![
        br#"{"user":"a","amount":1}"#,
        b"not json at all",
        br#"{"user":"b","amount":2}"#,
        b"{\"user\":\"\xff\"}",
        br#"{"user":"a","amount":3}"#,
    ];
    for line in &lines {
        // One at a time so that the stream order is the order above.
        l.kinesis.put_record().stream_name(&stream).partition_key("p").data(line.to_vec().into()).send().await.unwrap();
    }
    let records = l.read_stream(&stream).await.unwrap();
    assert_eq!(records.len(), lines.len());
    let event = kinesis_event(&records, &arn);

    let mut host = start(function("kinesis-rollup", &[("GROUP_BY_FIELD", "user"), ("SUM_FIELD", "amount")])).await;
    let response = invoke_ok(&mut host, event).await;
    let expected: Vec<serde_json::Value> =
        [1, 3].iter().map(|&i| serde_json::json!({ "itemIdentifier": records[i].sequence_number })).collect();
    assert_eq!(response, serde_json::json!({ "batchItemFailures": expected }));

    // A batch with no bad record reports none.
    let good = vec![records[0].clone(), records[2].clone()];
    assert_eq!(invoke_ok(&mut host, kinesis_event(&good, &arn)).await, serde_json::json!({ "batchItemFailures": [] }));
}

#[tokio::test]
async fn a_payload_that_is_not_a_kinesis_event_is_a_function_error() {
    let _ = local().await;
    let mut host = start(function("kinesis-rollup", &[])).await;
    let inv = host.invoke(b"{\"Records\":[{\"kinesis\":{}}]}".to_vec()).await.unwrap();
    let pushpull_local::runtime_api::Outcome::FunctionError(body) = inv.outcome else { panic!("{:?}", inv.outcome) };
    let err: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(err["errorType"], "RollupError.Event");
    assert!(err["errorMessage"].as_str().unwrap().contains("missing field"), "{err}");
}
