//! Push: S3 invokes this function when NDJSON objects land; it sends their lines to Kinesis.
//! All logic is in `pushpull::push`; see the README for its settings.
use lambda_runtime::{Error, LambdaEvent, service_fn};
use pushpull::push::{DeployedPushHandler, Invocation};
use serde_json::value::RawValue;

#[tokio::main]
async fn main() -> Result<(), Error> {
    pushpull::telemetry::init();
    let aws = pushpull::aws::Aws::new();
    let handler =
        DeployedPushHandler::from_env(&aws).await.inspect_err(|e| tracing::error!(error = %e, "cannot start"))?;
    let handler = &handler;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Box<RawValue>>| async move {
        handler.handle(event.payload.get().as_bytes(), &Invocation::from_context(&event.context)).await
    }))
    .await
}
