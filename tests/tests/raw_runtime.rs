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
