//! Configuration is checked at cold start: a bad setting stops init with a message naming every
//! variable at fault, and the process exits (Lambda reports the init failure with these logs).
use pushpull_local::runtime_api::{FunctionHost, HostError};
use pushpull_tests::function;

#[tokio::test]
async fn push_function_refuses_to_start_without_stream_name_or_with_bad_settings() {
    let spec = function("s3-to-kinesis", &[("PUT_MAX_RECORDS", "501"), ("CHECKPOINT_URI", "ftp://x")]);
    let err = FunctionHost::start(spec).await.err().expect("init must fail");
    let HostError::Init { output, .. } = &err else { panic!("{err}") };
    assert!(output.contains("STREAM_NAME is not set"), "{output}");
    assert!(output.contains(r#"PUT_MAX_RECORDS=\"501\" is invalid: a whole number from 1 to 500"#), "{output}");
    assert!(output.contains(r#"CHECKPOINT_URI=\"ftp://x\" is invalid"#), "{output}");
    // The log line is structured JSON.
    let line = output.lines().find(|l| l.contains("cannot start")).expect("a log line");
    let json: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
    assert_eq!(json["level"], "ERROR");
}

#[tokio::test]
async fn pull_function_refuses_a_malformed_output_uri() {
    let err = FunctionHost::start(function("kinesis-rollup", &[("OUTPUT_URI", "s3://")]))
        .await
        .err()
        .expect("init must fail");
    assert!(err.to_string().contains("OUTPUT_URI"), "{err}");
}
