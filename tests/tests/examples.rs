//! Every example (`examples/src/bin`) as a real binary behind the Lambda Runtime API, answering a
//! real event through the library's runner: the pull examples (`run_kinesis`, `run_sqs`,
//! `run_dynamodb`, `run_kafka`; `run_rabbitmq`, which has none) with the partial batch response AWS reads and the runner's batch metrics in
//! the invocation's EMF documents; the S3 example (`run_s3_lines`) on LocalStack.
use base64::Engine as _;
use pushpull_local::runtime_api::{FunctionHost, FunctionSpec, Invocation, Outcome, workspace_binary};

async fn host(binary: &str) -> FunctionHost {
    let path = workspace_binary(binary);
    assert!(path.exists(), "{} is not built: run `cargo build --workspace --bins`", path.display());
    FunctionHost::start(FunctionSpec::new(binary, path)).await.unwrap()
}

fn response(invoked: &Invocation) -> serde_json::Value {
    let Outcome::Response(body) = &invoked.outcome else { panic!("not a response: {:?}", invoked.outcome) };
    serde_json::from_slice(body).unwrap()
}

/// The invocation's EMF documents (one per dimension set, written before the response is
/// posted), merged: the pull runner's batch measures are under the `Stream` dimension.
async fn metrics_of(host: &FunctionHost, invoked: &Invocation) -> serde_json::Value {
    let mut merged = serde_json::Map::new();
    for _ in 0..100 {
        merged.clear();
        for doc in host
            .output()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("_aws").is_some() && v["function_request_id"] == invoked.request_id.as_str())
        {
            merged.extend(doc.as_object().cloned().unwrap_or_default());
        }
        if merged.contains_key("RecordsProcessed") {
            return merged.into();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no batch metrics for {}: {:#?}", invoked.request_id, host.output());
}

#[tokio::test]
async fn kinesis_orders_answers_with_the_records_that_failed() {
    let mut host = host("kinesis-orders").await;
    let orders = [
        ("a", r#"{"customer":"a","amount":1}"#),
        ("b", r#"{"customer":"b","amount":-1}"#),
        ("a", "not json"),
        ("c", r#"{"customer":"c","amount":2}"#),
    ];
    let records: Vec<_> = orders
        .iter()
        .enumerate()
        .map(|(i, (customer, body))| {
            serde_json::json!({"kinesis": {"partitionKey": customer, "sequenceNumber": (100 + i).to_string(),
                "data": base64::engine::general_purpose::STANDARD.encode(body), "approximateArrivalTimestamp": 1.0},
                "eventSource": "aws:kinesis", "eventID": format!("shardId-000000000000:{}", 100 + i),
                "eventSourceARN": "arn:aws:kinesis:us-east-1:123456789012:stream/orders"})
        })
        .collect();
    let event = serde_json::json!({ "Records": records }).to_string();
    let invoked = host.invoke(event.into_bytes()).await.unwrap();
    assert_eq!(
        response(&invoked),
        serde_json::json!({"batchItemFailures": [{"itemIdentifier": "101"}, {"itemIdentifier": "102"}]})
    );
    let emf = metrics_of(&host, &invoked).await;
    assert_eq!(emf["RecordsProcessed"], 2, "{emf}");
    assert_eq!(emf["RecordsFailed"], 2, "{emf}");
    assert_eq!(emf["Stream"], "orders", "{emf}");
}

#[tokio::test]
async fn sqs_jobs_answers_with_a_failed_job_and_what_waited_behind_it_in_its_group() {
    let mut host = host("sqs-jobs").await;
    let msgs = [("m1", "g1", "resize"), ("m2", "g2", "explode"), ("m3", "g1", "notify"), ("m4", "g2", "notify")];
    let records: Vec<_> = msgs
        .iter()
        .map(|(id, group, action)| {
            serde_json::json!({"messageId": id, "receiptHandle": format!("rh-{id}"), "body": format!(r#"{{"action":"{action}"}}"#),
                "attributes": {"MessageGroupId": group, "ApproximateReceiveCount": "1"}, "messageAttributes": {},
                "md5OfBody": "", "eventSource": "aws:sqs", "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:jobs.fifo",
                "awsRegion": "us-east-1"})
        })
        .collect();
    let event = serde_json::json!({ "Records": records }).to_string();
    let invoked = host.invoke(event.into_bytes()).await.unwrap();
    assert_eq!(
        response(&invoked),
        serde_json::json!({"batchItemFailures": [{"itemIdentifier": "m2"}, {"itemIdentifier": "m4"}]})
    );
    let emf = metrics_of(&host, &invoked).await;
    assert_eq!(emf["RecordsProcessed"], 2, "{emf}");
    assert_eq!(emf["RecordsFailed"], 2, "m2 failed, m4 held back behind it: {emf}");
    assert_eq!(emf["Stream"], "jobs.fifo", "the queue is the dimension: {emf}");
}

/// Amazon MQ has no partial batch response: AWS's sample event is answered; a batch with a bad
/// order fails the invocation as a whole (AWS retries the whole batch), naming the message.
#[tokio::test]
async fn rabbitmq_orders_fails_a_batch_with_a_bad_order_as_a_whole() {
    let mut host = host("rabbitmq-orders").await;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let msg = |id: &str, body: &str| serde_json::json!({"basicProperties": {"messageId": id, "deliveryMode": 2, "bodySize": body.len()}, "redelivered": false, "data": b64(body)});
    let good = serde_json::json!({"eventSource": "aws:rmq", "eventSourceArn": "arn:aws:mq:us-east-1:123456789012:broker:b:b-1",
        "rmqMessagesByQueue": {"orders::/": [msg("o-1", r#"{"customer":"a","amount":1}"#)]}});
    let invoked = host.invoke(good.to_string().into_bytes()).await.unwrap();
    assert!(matches!(invoked.outcome, Outcome::Response(_)), "{:?}", invoked.outcome);
    let emf = metrics_of(&host, &invoked).await;
    assert_eq!(emf["RecordsProcessed"], 1, "{emf}");
    let bad = serde_json::json!({"eventSource": "aws:rmq", "rmqMessagesByQueue": {"orders::/": [
        msg("o-1", r#"{"customer":"a","amount":1}"#), msg("o-2", r#"{"customer":"b","amount":-1}"#)]}});
    let invoked = host.invoke(bad.to_string().into_bytes()).await.unwrap();
    let Outcome::FunctionError(body) = &invoked.outcome else { panic!("a function error: {:?}", invoked.outcome) };
    let text = String::from_utf8_lossy(body);
    assert!(text.contains("negative") && text.contains("whole batch"), "{text}");
}

#[tokio::test]
async fn dynamodb_changes_answers_the_sample_event_whole() {
    let mut host = host("dynamodb-changes").await;
    let invoked = host.invoke(include_bytes!("../../events/dynamodb-batch.json").to_vec()).await.unwrap();
    assert_eq!(response(&invoked), serde_json::json!({"batchItemFailures": []}));
    let emf = metrics_of(&host, &invoked).await;
    assert_eq!(emf["RecordsProcessed"], 3, "{emf}");
}

#[tokio::test]
async fn kafka_orders_answers_by_partition_and_offset() {
    let mut host = host("kafka-orders").await;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let rec = |partition: i32, offset: i64, value: Option<&str>| {
        let mut r = serde_json::json!({"topic": "orders", "partition": partition, "offset": offset,
            "timestamp": 1_700_000_000_000i64 + offset, "timestampType": "CREATE_TIME", "headers": [{"trace": [-61, -85]}]});
        if let Some(v) = value {
            r["value"] = b64(v).into();
        }
        r
    };
    // Partition 0: a good order, a negative one, one waiting behind it; partition 1: a tombstone
    // and a good order after it (a failure stops the rest of its partition).
    let event = serde_json::json!({"eventSource": "aws:kafka", "eventSourceArn": "arn:aws:kafka:us-east-1:123456789012:cluster/demo/1",
        "bootstrapServers": "b-1.demo:9092", "records": {
            "orders-0": [rec(0, 10, Some(r#"{"customer":"a","amount":1}"#)), rec(0, 11, Some(r#"{"customer":"b","amount":-1}"#)),
                         rec(0, 12, Some(r#"{"customer":"a","amount":2}"#))],
            "orders-1": [rec(1, 40, None), rec(1, 41, Some(r#"{"customer":"c","amount":3}"#))]}});
    let invoked = host.invoke(event.to_string().into_bytes()).await.unwrap();
    assert_eq!(
        response(&invoked),
        serde_json::json!({"batchItemFailures": [
            {"itemIdentifier": {"partition": "orders-0", "offset": 11}},
            {"itemIdentifier": {"partition": "orders-0", "offset": 12}},
            {"itemIdentifier": {"partition": "orders-1", "offset": 40}},
            {"itemIdentifier": {"partition": "orders-1", "offset": 41}}]})
    );
    let emf = metrics_of(&host, &invoked).await;
    assert_eq!(emf["RecordsProcessed"], 1, "{emf}");
    assert_eq!(emf["RecordsFailed"], 4, "{emf}");
    assert_eq!(emf["Stream"], "orders", "the topic is the dimension: {emf}");
}

/// The S3 example (`run_s3_lines`, one closure) on LocalStack: a CSV object lands, the header is
/// skipped, each good line reaches the stream keyed by customer, the bad one is quarantined with
/// its line number and reason; everything it needs comes from the environment.
#[tokio::test]
async fn s3_csv_lines_sends_each_good_line_and_quarantines_the_bad_one() {
    let l = pushpull_tests::local().await;
    let (bucket, stream) = (pushpull_tests::unique("pp-ex"), pushpull_tests::unique("ex-stream"));
    l.ensure_bucket(&bucket).await.unwrap();
    l.ensure_stream(&stream, 1).await.unwrap();
    let body = "customer,amount\nann,3.5\nbob,lots\nann,1\n";
    l.s3.put_object().bucket(&bucket).key("in/orders.csv").body(body.as_bytes().to_vec().into()).send().await.unwrap();
    let spec = pushpull_tests::function(
        "s3-csv-lines",
        &[
            ("STREAM_NAME", stream.as_str()),
            ("CHECKPOINT_URI", &format!("s3://{bucket}/checkpoints")),
            ("OUTPUT_URI", &format!("s3://{bucket}/output")),
            ("QUARANTINE_URI", &format!("s3://{bucket}/quarantine")),
        ],
    );
    let mut host = pushpull_tests::start(spec).await;
    let event = pushpull_tests::object_created_event(&l, &bucket, "in/orders.csv", "01").await;
    let invoked = host.invoke(event.into_bytes()).await.unwrap();
    let summary = response(&invoked);
    let object = &summary["objects"][0];
    assert_eq!((object["records"].as_u64(), object["quarantined"].as_u64()), (Some(2), Some(1)), "{summary}");
    let sent = pushpull_tests::stream_by_key(&l, &stream).await;
    assert_eq!(sent["ann"], [r#"{"amount":3.5,"customer":"ann"}"#, r#"{"amount":1.0,"customer":"ann"}"#]);
    assert_eq!(sent.len(), 1, "{sent:?}");
    let listed = l.s3.list_objects_v2().bucket(&bucket).prefix("quarantine/").send().await.unwrap();
    let key = listed.contents().first().and_then(|o| o.key()).expect("a quarantine entry").to_owned();
    let quarantined = pushpull_tests::object_json_lines(&l, &bucket, &key).await;
    assert_eq!(quarantined[0]["line"], 3, "{quarantined:?}");
    assert!(quarantined[0]["reason"].as_str().unwrap().contains("amount \"lots\""), "{quarantined:?}");
}
