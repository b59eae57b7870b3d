//! Pull: a Kinesis event source mapping invokes this function with batches of records.
//! All logic is in `pushpull::rollup`; see the README for its settings.
use lambda_runtime::{Error, LambdaEvent, service_fn};
use pushpull::rollup::RollupHandler;
use serde_json::value::RawValue;

#[tokio::main]
async fn main() -> Result<(), Error> {
    pushpull::telemetry::init();
    let aws = pushpull::aws::Aws::new();
    let handler = RollupHandler::from_env(&aws).await.inspect_err(|e| tracing::error!(error = %e, "cannot start"))?;
    let handler = &handler;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Box<RawValue>>| async move {
        handler.handle(event.payload.get()).await
    }))
    .await
}
