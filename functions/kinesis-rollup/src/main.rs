//! Pull: a Kinesis event source mapping invokes this function with batches of records.
//! All logic is in the crate's library (`kinesis_rollup`); see the README for its settings.
use std::sync::Arc;

use kinesis_rollup::{RollupHandler, RollupSettings};
use lambda_runtime::Error;
use pushpull::config::Env;

// One thread for the runtime: Lambda sends one invocation at a time, its S3 calls are made one
// after the other, and the CPU work (reading the batch, checking its records) runs on threads of
// its own (`pushpull::pull::start_helpers`: a helper per further vCPU, started here, before the first
// batch). Worker threads would each keep a malloc arena holding megabytes of earlier batches
// (W1's peak RSS: 30-34 MiB with them against 24 without, BENCHMARKS.md).
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    pushpull::telemetry::init();
    pushpull::pull::start_helpers();
    let settings =
        RollupSettings::from_env(Env::from_process()).inspect_err(|e| tracing::error!(error = %e, "cannot start"))?;
    let handler = Arc::new(RollupHandler::connect(settings, &pushpull::aws::Aws::new()).await);
    // run_raw, not run_kinesis: the rollup's unit is the whole batch (one output and one
    // checkpoint per batch, exactly once), where run_kinesis calls a handler per record; and the
    // event is parsed where it lies, without a copy (batches reach 6 MB).
    pushpull::lambda::run_raw(move |body, context| {
        let handler = handler.clone();
        // The deadline bounds how long a write-ahead note of this invocation claims its keys.
        let now = std::time::SystemTime::now();
        let deadline = pushpull::invocation::deadline_of(context.deadline, now)
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        async move { handler.handle_until(&body, Some(deadline)).await }
    })
    .await
}
