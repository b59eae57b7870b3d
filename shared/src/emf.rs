//! CloudWatch metrics from a Lambda function: the [`metrics`] facade's counters and histograms
//! written as Embedded Metric Format (EMF) documents on stdout, one flush per invocation, by
//! [`metrics_cloudwatch_embedded`].
//!
//! Why that crate: it is a recorder for the `metrics` facade, the interface the Rust ecosystem
//! records through, so the library's own metrics ([`crate::metrics`]) and a user's
//! `metrics::counter!` calls land in the same document with no pushpull type in the user's code;
//! it does nothing but EMF (serde_json, no background tasks unless asked), and we flush it
//! ourselves where the runtime posts the response. `metrique` (awslabs) was the other candidate:
//! it is built around one struct of metrics per unit of work with derive macros and a background
//! queue, which suits services; for a facade that library code and user code share it asks more
//! of both.
//!
//! [`crate::lambda::run_raw`] (and every runner built on it) calls [`init_from_env`] once and
//! [`flush`] after each invocation's handler, before the response is posted, so the document is
//! in the invocation's logs even if Lambda freezes the process right after. A process's first
//! invocation adds [`crate::metrics::COLD_START`] = 1, as Powertools does.
//!
//! | environment | meaning | default |
//! |---|---|---|
//! | `POWERTOOLS_METRICS_NAMESPACE` | CloudWatch namespace | `pushpull` |
//! | `POWERTOOLS_METRICS_DISABLED` | `true`: no EMF documents | false |
//! | `AWS_LAMBDA_FUNCTION_NAME` | the `FunctionName` dimension on every metric | none |
//!
//! A document, as `make run` shows it:
//!
//! ```text
//! {"_aws":{"Timestamp":1764151200123,"CloudWatchMetrics":[{"Namespace":"pushpull","Dimensions":[["FunctionName","Stream"]],
//!  "Metrics":[{"Name":"BatchSize","Unit":"Count"},{"Name":"RecordsIn","Unit":"Count"},…]}]},
//!  "FunctionName":"rollup","Stream":"orders","function_request_id":"…","BatchSize":[100],"RecordsIn":100,…}
//! ```
use std::io::Write;
use std::sync::OnceLock;

use metrics_cloudwatch_embedded::Collector;

/// The `FunctionName` dimension.
pub const FUNCTION_NAME: &str = "FunctionName";

static COLLECTOR: OnceLock<Option<&'static Collector>> = OnceLock::new();

/// Why metrics could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the EMF metrics recorder: {message}")]
pub struct EmfError {
    /// What the recorder said (another recorder installed first, most often).
    pub message: String,
}

/// Installs the EMF recorder as configured by the environment (see the module documentation);
/// `Ok(false)` when `POWERTOOLS_METRICS_DISABLED` is true. Later calls return the first call's
/// outcome.
///
/// ```no_run
/// pushpull::emf::init_from_env().expect("metrics");
/// metrics::counter!("OrdersRejected").increment(1);
/// pushpull::emf::flush(Some("request-1"));
/// ```
pub fn init_from_env() -> Result<bool, EmfError> {
    let disabled = std::env::var("POWERTOOLS_METRICS_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    let namespace = std::env::var("POWERTOOLS_METRICS_NAMESPACE").unwrap_or_else(|_| "pushpull".to_owned());
    let function = std::env::var("AWS_LAMBDA_FUNCTION_NAME").ok();
    init(if disabled { None } else { Some((namespace, function)) })
}

fn init(config: Option<(String, Option<String>)>) -> Result<bool, EmfError> {
    let mut error = None;
    let installed = COLLECTOR.get_or_init(|| {
        let (namespace, function) = config?;
        let mut builder = metrics_cloudwatch_embedded::Builder::new().cloudwatch_namespace(namespace);
        if let Some(function) = function {
            builder = builder.with_dimension(FUNCTION_NAME, function);
        }
        match builder.init() {
            Ok(collector) => {
                crate::metrics::describe();
                Some(collector)
            }
            Err(e) => {
                error = Some(EmfError { message: e.to_string() });
                None
            }
        }
    });
    match error {
        Some(e) => Err(e),
        None => Ok(installed.is_some()),
    }
}

/// Writes what was recorded since the last flush as EMF documents (one per dimension set) on
/// stdout, with `request_id` as the `function_request_id` property, and starts over. Nothing
/// when the recorder is not installed or nothing was recorded.
pub fn flush(request_id: Option<&str>) {
    let Some(Some(collector)) = COLLECTOR.get() else { return };
    match request_id {
        Some(id) => collector.set_property("function_request_id", id),
        None => collector.remove_property("function_request_id"),
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if let Err(e) = collector.flush(&mut out).and_then(|()| out.flush()) {
        tracing::warn!(error = %e, "EMF metrics could not be written");
    }
}
