//! Structured JSON logs through `tracing`, one object a line on stdout (what Lambda captures).
//!
//! The level comes from `RUST_LOG` (full `tracing_subscriber::EnvFilter` syntax), else from
//! Lambda's `AWS_LAMBDA_LOG_LEVEL`, else `info`.
use tracing_subscriber::EnvFilter;

/// Installs the JSON subscriber. Safe to call more than once (later calls do nothing).
///
/// ```
/// pushpull::telemetry::init();
/// tracing::info!(bucket = "b", key = "k", "object processed");
/// ```
pub fn init() {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .or_else(|| std::env::var("AWS_LAMBDA_LOG_LEVEL").ok().map(|l| l.to_lowercase()))
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_target(true)
        .with_ansi(false)
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .try_init();
}
