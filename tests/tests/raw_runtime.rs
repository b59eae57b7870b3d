//! `pushpull::lambda::run_raw` on the real Runtime API: the handler gets the payload as sent,
//! errors and panics become function errors, and the process goes on serving.
use pushpull_local::runtime_api::{FunctionHost, FunctionSpec, Outcome, workspace_binary};

#[tokio::test]
async fn responses_errors_and_panics_go_through_the_runtime() {
    let binary = workspace_binary("raw-echo");
    assert!(binary.exists(), "{} is not built: run `cargo build --workspace --bins`", binary.display());
    let mut host = FunctionHost::start(FunctionSpec::new("raw-echo", binary)).await.unwrap();

    let ok = host.invoke(&b"{\"Records\":[]}"[..]).await.unwrap();
    let Outcome::Response(body) = &ok.outcome else { panic!("{:?}", ok.outcome) };
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["len"], 14, "the handler sees the payload byte for byte");
    assert_eq!(v["request_id"], ok.request_id.as_str());

    let failed = host.invoke(&b"\"fail\""[..]).await.unwrap();
    let Outcome::FunctionError(e) = &failed.outcome else { panic!("{:?}", failed.outcome) };
    assert!(String::from_utf8_lossy(e).contains("failed as asked"), "{e:?}");

    let panicked = host.invoke(&b"\"panic\""[..]).await.unwrap();
    let Outcome::FunctionError(e) = &panicked.outcome else { panic!("{:?}", panicked.outcome) };
    let e: serde_json::Value = serde_json::from_slice(e).unwrap();
    assert_eq!(e["errorType"], "Runtime.Panic");
    assert_eq!(e["errorMessage"], "handler panicked: asked to panic");

    // Still the same process: a panic is a function error, not a crash.
    let after = host.invoke(&b"[]"[..]).await.unwrap();
    assert!(matches!(after.outcome, Outcome::Response(_)) && !after.cold_start, "{after:?}");
}

/// What an operator sees of an invocation: log lines with Powertools' keys and the invocation's
/// correlation, and one EMF document per invocation, written before the response is posted,
/// with the cold start and the user's own metric in it.
#[tokio::test]
async fn logs_carry_powertools_keys_and_each_invocation_writes_its_metrics() {
    let binary = workspace_binary("raw-echo");
    let spec = FunctionSpec::new("raw-echo", binary).env("POWERTOOLS_SERVICE_NAME", "echo-service");
    let mut host = FunctionHost::start(spec).await.unwrap();
    let first = host.invoke(&b"{\"a\":1}"[..]).await.unwrap();
    let second = host.invoke(&b"[]"[..]).await.unwrap();
    // The output readers run beside the invocation; give them a moment to catch up.
    let lines = wait_for_lines(&host, 2).await;
    let parsed: Vec<serde_json::Value> = lines.iter().filter_map(|l| serde_json::from_str(l).ok()).collect();

    let logs: Vec<&serde_json::Value> = parsed.iter().filter(|v| v["message"] == "echoing").collect();
    assert_eq!(logs.len(), 2, "{lines:#?}");
    assert_eq!(logs[0]["level"], "INFO");
    assert_eq!(logs[0]["service"], "echo-service");
    assert_eq!(logs[0]["function_name"], "raw-echo");
    assert_eq!(logs[0]["function_memory_size"], 128);
    assert_eq!(logs[0]["function_request_id"], first.request_id.as_str());
    assert_eq!(logs[0]["cold_start"], true);
    assert_eq!(logs[0]["payload_bytes"], 7, "the span's field is on the line");
    assert_eq!(logs[1]["function_request_id"], second.request_id.as_str());
    assert_eq!(logs[1]["cold_start"], false);

    let emf: Vec<&serde_json::Value> = parsed.iter().filter(|v| v.get("_aws").is_some()).collect();
    assert_eq!(emf.len(), 2, "one document per invocation: {lines:#?}");
    let directive = &emf[0]["_aws"]["CloudWatchMetrics"][0];
    assert_eq!(directive["Namespace"], "pushpull");
    assert_eq!(directive["Dimensions"][0][0], "FunctionName");
    assert_eq!(emf[0]["FunctionName"], "raw-echo");
    assert_eq!(emf[0]["ColdStart"], 1);
    assert_eq!(emf[0]["EchoedBytes"], 7);
    assert_eq!(emf[0]["function_request_id"], first.request_id.as_str());
    assert!(emf[1].get("ColdStart").is_none(), "a warm invocation has no cold start: {}", emf[1]);
    assert_eq!(emf[1]["EchoedBytes"], 2);
    // The metrics of an invocation come before its END: written before the response is posted.
    let emf_at = lines.iter().position(|l| l.contains(&first.request_id) && l.starts_with("{\"_aws\"")).unwrap();
    let log_at = lines.iter().position(|l| l.contains("echoing") && l.contains(&second.request_id)).unwrap();
    assert!(emf_at < log_at, "the first invocation's metrics were written before the second began");
}

async fn wait_for_lines(host: &FunctionHost, emf_docs: usize) -> Vec<String> {
    for _ in 0..100 {
        let lines = host.output();
        if lines.iter().filter(|l| l.starts_with("{\"_aws\"")).count() >= emf_docs {
            return lines;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    host.output()
}

/// The rollup's log lines about a batch carry where they are (stream, shard, the batch's
/// sequence range) and the invocation, without each call naming them.
#[tokio::test]
async fn the_rollups_log_lines_carry_the_batchs_correlation() {
    use base64::Engine as _;
    let spec = pushpull_tests::function("kinesis-rollup", &[("GROUP_BY_FIELD", "user"), ("SUM_FIELD", "amount")]);
    let mut host = FunctionHost::start(spec).await.unwrap();
    let record = |seq: &str, data: &str| {
        serde_json::json!({
            "kinesis": {"kinesisSchemaVersion": "1.0", "partitionKey": "u1", "sequenceNumber": seq,
                        "data": base64::engine::general_purpose::STANDARD.encode(data), "approximateArrivalTimestamp": 1.7e9},
            "eventSource": "aws:kinesis", "eventVersion": "1.0", "eventID": format!("shardId-000000000007:{seq}"),
            "eventName": "aws:kinesis:record", "awsRegion": "us-east-1",
            "eventSourceARN": "arn:aws:kinesis:us-east-1:000000000000:stream/orders"
        })
    };
    let event = serde_json::json!({"Records": [
        record("49590338271490256608559692538361571095921575989136588801", r#"{"user":"u1","amount":1}"#),
        record("49590338271490256608559692538361571095921575989136588802", "not json"),
    ]});
    let invoked = host.invoke(serde_json::to_vec(&event).unwrap()).await.unwrap();
    assert!(matches!(invoked.outcome, Outcome::Response(_)), "{:?}", invoked.outcome);
    let lines = wait_for_lines(&host, 1).await;
    let failed = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "record failed")
        .unwrap_or_else(|| panic!("no 'record failed' line: {lines:#?}"));
    assert_eq!(failed["level"], "WARN");
    assert_eq!(failed["stream"], "orders");
    assert_eq!(failed["shard_id"], "shardId-000000000007");
    assert_eq!(failed["first_sequence"], "49590338271490256608559692538361571095921575989136588801");
    assert_eq!(failed["last_sequence"], "49590338271490256608559692538361571095921575989136588802");
    assert_eq!(failed["function_request_id"], invoked.request_id.as_str());
    assert_eq!(failed["cold_start"], true);
}
