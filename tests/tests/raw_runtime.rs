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
