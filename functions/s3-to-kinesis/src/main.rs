//! Push: S3 invokes this function when NDJSON objects land; it sends their lines to Kinesis or
//! Kafka.
//! All logic is in the crate's library (`s3_to_kinesis`) and `pushpull::push`.
use lambda_runtime::Error;
use pushpull::config::Env;

#[tokio::main]
async fn main() -> Result<(), Error> {
    pushpull::telemetry::init();
    let settings = s3_to_kinesis::Settings::from_env(Env::from_process())
        .inspect_err(|e| tracing::error!(error = %e, "cannot start"))?;
    let handler = s3_to_kinesis::handler(settings, &pushpull::aws::Aws::new())
        .await
        .inspect_err(|e| tracing::error!(error = %e, "cannot reach the destination"))?;
    // The library's push runner: logs carry the invocation (request id, cold start), its EMF
    // metrics are written before the response is posted.
    pushpull::lambda::run_push(handler).await
}
