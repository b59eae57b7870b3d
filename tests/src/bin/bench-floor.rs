//! The benchmark floor for the pull function: a Lambda function that receives a Kinesis event
//! and skips over it unparsed (`serde::de::IgnoredAny`), then reports no failures. Whatever the
//! real function takes beyond this is the cost of its own work. `BENCH_FLOOR_SLEEP_MS`: it takes
//! that long an invocation first (a function of known capacity, for the push-against-pull bench).
use lambda_runtime::{Error, LambdaEvent, service_fn};
use serde::de::IgnoredAny;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let sleep: u64 = std::env::var("BENCH_FLOOR_SLEEP_MS").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    lambda_runtime::run(service_fn(move |_event: LambdaEvent<IgnoredAny>| async move {
        if sleep > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(sleep)).await;
        }
        Ok::<_, Error>(serde_json::json!({ "batchItemFailures": [] }))
    }))
    .await
}
