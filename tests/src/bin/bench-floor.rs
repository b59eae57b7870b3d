//! The benchmark floor for the pull function: a Lambda function that receives a Kinesis event
//! and skips over it unparsed (`serde::de::IgnoredAny`), then reports no failures. Whatever the
//! real function takes beyond this is the cost of its own work.
use lambda_runtime::{Error, LambdaEvent, service_fn};
use serde::de::IgnoredAny;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(|_event: LambdaEvent<IgnoredAny>| async {
        Ok::<_, Error>(serde_json::json!({ "batchItemFailures": [] }))
    }))
    .await
}
