//! Push: S3 invokes this function when NDJSON objects land; it sends their lines to Kinesis.
//! All logic is in the crate's library (`s3_to_kinesis`) and `pushpull::push`.
use std::sync::Arc;

use lambda_runtime::Error;
use pushpull::config::Env;
use pushpull::invocation::Invocation;

#[tokio::main]
async fn main() -> Result<(), Error> {
    pushpull::telemetry::init();
    let settings = s3_to_kinesis::Settings::from_env(Env::from_process())
        .inspect_err(|e| tracing::error!(error = %e, "cannot start"))?;
    let handler = Arc::new(s3_to_kinesis::handler(settings, &pushpull::aws::Aws::new()).await);
    // run_raw: logs carry the invocation (request id, cold start) and its EMF metrics are written
    // before the response is posted.
    pushpull::lambda::run_raw(move |body, context| {
        let handler = handler.clone();
        async move { handler.handle(&body, &Invocation::from_context(&context)).await }
    })
    .await
}
