//! Push: S3 invokes this function when NDJSON objects land; it sends their lines to Kinesis.
//! All logic is in the crate's library (`s3_to_kinesis`) and `pushpull::push`.
use lambda_runtime::{Error, LambdaEvent, service_fn};
use pushpull::config::Env;
use pushpull::invocation::Invocation;
use serde_json::value::RawValue;

#[tokio::main]
async fn main() -> Result<(), Error> {
    pushpull::telemetry::init();
    let settings = s3_to_kinesis::Settings::from_env(Env::from_process())
        .inspect_err(|e| tracing::error!(error = %e, "cannot start"))?;
    let handler = s3_to_kinesis::handler(settings, &pushpull::aws::Aws::new()).await;
    let handler = &handler;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Box<RawValue>>| async move {
        handler.handle(event.payload.get().as_bytes(), &Invocation::from_context(&event.context)).await
    }))
    .await
}
