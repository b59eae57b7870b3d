//! Shared helpers for the integration tests: LocalStack clients, unique resource names, and the
//! real function binaries run over the Lambda Runtime API.
//!
//! Tests never skip: if LocalStack is not running they fail and say how to start it (the
//! README's test command starts it).
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
    spec.env = function_env();
    spec.env.push(("RUST_LOG".into(), "info".into()));
    for (k, v) in env {
        spec.env.push((k.to_string(), v.to_string()));
    }
    spec
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
