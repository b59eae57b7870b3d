//! Pull: a Kinesis event source mapping invokes this function with batches of records.
//! All logic is in `pushpull::rollup`; see the README for its settings.
use std::sync::Arc;

use lambda_runtime::Error;
use pushpull::rollup::RollupHandler;

#[tokio::main]
async fn main() -> Result<(), Error> {
    pushpull::telemetry::init();
    let aws = pushpull::aws::Aws::new();
    let handler = RollupHandler::from_env(&aws).await.inspect_err(|e| tracing::error!(error = %e, "cannot start"))?;
    let handler = Arc::new(handler);
    // run_raw: the event is parsed where it lies, without a copy (batches reach 6 MB).
    pushpull::lambda::run_raw(move |body, _context| {
        let handler = handler.clone();
        async move { handler.handle(&body).await }
    })
    .await
}
