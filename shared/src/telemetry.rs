//! Structured logs through `tracing`, one line per event on stdout (what Lambda captures), with the
//! keys Powertools for AWS Lambda's logger writes, so that one CloudWatch Logs Insights query
//! serves Python, TypeScript and Rust functions alike:
//!
//! | key | value |
//! |---|---|
//! | `level` | `DEBUG`, `INFO`, `WARN`, `ERROR` |
//! | `message` | the event's message |
//! | `timestamp` | RFC 3339, UTC |
//! | `service` | `POWERTOOLS_SERVICE_NAME`, else the function's name, else `service_undefined` (Powertools' default) |
//! | `location` | `module:line` of the log call |
//! | `cold_start` | true in the process's first invocation (inside an invocation only) |
//! | `function_name`, `function_memory_size` | from Lambda's environment |
//! | `function_arn`, `function_request_id`, `xray_trace_id` | from the invocation (inside an invocation only) |
//!
//! The event's own fields follow, then the fields of the spans it is in, so a line carries its
//! correlation (`bucket`, `key`, `version` for an S3 object; `shard_id`, `first_sequence`,
//! `last_sequence` for a batch) without repeating it at every call.
//!
//! Lambda's logging settings are respected: the level comes from `RUST_LOG` (full
//! `tracing_subscriber::EnvFilter` syntax), else from `AWS_LAMBDA_LOG_LEVEL` (the function's
//! `LoggingConfig.ApplicationLogLevel`), else `POWERTOOLS_LOG_LEVEL`, else `info`;
//! `AWS_LAMBDA_LOG_FORMAT=Text` (`LoggingConfig.LogFormat`) gives plain text lines, anything else
//! (`JSON`, or unset as outside Lambda) the JSON above.
use std::fmt;
use std::sync::{Arc, RwLock};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Installs the subscriber. Safe to call more than once (later calls do nothing).
///
/// ```
/// pushpull::telemetry::init();
/// tracing::info!(bucket = "b", key = "k", "object processed");
/// ```
pub fn init() {
    let filter = ["RUST_LOG", "AWS_LAMBDA_LOG_LEVEL", "POWERTOOLS_LOG_LEVEL"]
        .iter()
        .find_map(|k| std::env::var(k).ok().and_then(|f| EnvFilter::try_new(f.to_lowercase()).ok()))
        .unwrap_or_else(|| EnvFilter::new("info"));
    let text = std::env::var("AWS_LAMBDA_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("text"));
    let builder = tracing_subscriber::fmt().with_ansi(false).with_env_filter(filter).with_writer(std::io::stdout);
    let _ = if text {
        builder.with_target(true).try_init()
    } else {
        builder.fmt_fields(JsonFields::new()).event_format(PowertoolsJson::from_env()).try_init()
    };
}

/// What a log line says about the invocation it belongs to; set by [`crate::lambda`] for each
/// invocation (Lambda runs one at a time in a process).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvocationLog {
    /// The request id.
    pub request_id: String,
    /// The function ARN the caller invoked.
    pub function_arn: String,
    /// The X-Ray trace header, if any.
    pub xray_trace_id: Option<String>,
    /// Whether this is the process's first invocation.
    pub cold_start: bool,
}

static CURRENT: RwLock<Option<Arc<InvocationLog>>> = RwLock::new(None);

/// Makes `invocation` the one log lines belong to until [`end_invocation`].
pub fn begin_invocation(invocation: InvocationLog) {
    if let Ok(mut current) = CURRENT.write() {
        *current = Some(Arc::new(invocation));
    }
}

/// Log lines no longer belong to an invocation.
pub fn end_invocation() {
    if let Ok(mut current) = CURRENT.write() {
        *current = None;
    }
}

fn current() -> Option<Arc<InvocationLog>> {
    CURRENT.read().ok().and_then(|c| c.clone())
}

/// The JSON event format with Powertools' keys (see the module documentation).
#[derive(Debug, Clone)]
pub struct PowertoolsJson {
    service: String,
    function_name: Option<String>,
    function_memory_size: Option<u64>,
}

impl PowertoolsJson {
    /// The format with the service and function read from the environment.
    pub fn from_env() -> Self {
        let function_name = std::env::var("AWS_LAMBDA_FUNCTION_NAME").ok();
        PowertoolsJson {
            service: std::env::var("POWERTOOLS_SERVICE_NAME")
                .ok()
                .or_else(|| function_name.clone())
                .unwrap_or_else(|| "service_undefined".to_owned()),
            function_name,
            function_memory_size: std::env::var("AWS_LAMBDA_FUNCTION_MEMORY_SIZE").ok().and_then(|m| m.parse().ok()),
        }
    }

    /// One line's JSON object: the fixed keys, the event's fields, then its spans' fields.
    fn line(&self, event: &Event<'_>, timestamp: String, spans: Vec<Map<String, Value>>) -> Map<String, Value> {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert("level".into(), Value::from(meta.level().as_str()));
        line.insert("message".into(), Value::Null);
        line.insert("timestamp".into(), Value::from(timestamp));
        line.insert("service".into(), Value::from(self.service.as_str()));
        let location = format!("{}:{}", meta.module_path().unwrap_or(meta.target()), meta.line().unwrap_or(0));
        line.insert("location".into(), Value::from(location));
        if let Some(name) = &self.function_name {
            line.insert("function_name".into(), Value::from(name.as_str()));
        }
        if let Some(memory) = self.function_memory_size {
            line.insert("function_memory_size".into(), Value::from(memory));
        }
        if let Some(invocation) = current() {
            line.insert("cold_start".into(), Value::from(invocation.cold_start));
            line.insert("function_arn".into(), Value::from(invocation.function_arn.as_str()));
            line.insert("function_request_id".into(), Value::from(invocation.request_id.as_str()));
            if let Some(trace) = &invocation.xray_trace_id {
                line.insert("xray_trace_id".into(), Value::from(trace.as_str()));
            }
        }
        let mut fields = FieldMap(Map::new());
        event.record(&mut fields);
        let mut fields = fields.0;
        line.insert("message".into(), fields.remove("message").unwrap_or(Value::from("")));
        for (k, v) in fields.into_iter().chain(spans.into_iter().flatten()) {
            line.entry(k).or_insert(v);
        }
        line
    }
}

impl<S> FormatEvent<S, JsonFields> for PowertoolsJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        // Innermost span first, so its fields win over an outer span's of the same name.
        let spans = ctx
            .event_scope()
            .into_iter()
            .flatten()
            .filter_map(|span| {
                let ext = span.extensions();
                let fields = ext.get::<FormattedFields<JsonFields>>()?;
                serde_json::from_str::<Map<String, Value>>(fields).ok()
            })
            .collect();
        let line = self.line(event, timestamp, spans);
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// An event's fields as JSON values.
struct FieldMap(Map<String, Value>);

impl Visit for FieldMap {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), Value::from(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), Value::from(crate::error::chain(value)));
    }
}

/// A subscriber with the Powertools format writing into a buffer, for tests of what lines say.
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::{Arc, Mutex};

    use serde_json::{Map, Value};
    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::fmt::format::JsonFields;

    use super::PowertoolsJson;

    /// Where the lines go.
    #[derive(Clone, Default)]
    pub(crate) struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl Buffer {
        /// The lines written so far, parsed.
        pub(crate) fn lines(&self) -> Vec<Map<String, Value>> {
            let text = String::from_utf8(self.0.lock().map(|b| b.clone()).unwrap_or_default()).unwrap_or_default();
            text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
        }
    }

    /// A subscriber writing `format`'s lines into `buffer`.
    pub(crate) fn subscriber(buffer: &Buffer, format: PowertoolsJson) -> impl tracing::Subscriber + Send + Sync {
        tracing_subscriber::fmt()
            .with_writer(buffer.clone())
            .fmt_fields(JsonFields::new())
            .event_format(format)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{Buffer, subscriber};
    use super::*;

    fn lines(f: impl FnOnce()) -> Vec<Map<String, Value>> {
        let buffer = Buffer::default();
        let format = PowertoolsJson {
            service: "orders".into(),
            function_name: Some("push-fn".into()),
            function_memory_size: Some(128),
        };
        tracing::subscriber::with_default(subscriber(&buffer, format), f);
        buffer.lines()
    }

    #[test]
    fn lines_carry_powertools_keys_the_invocation_and_their_spans_correlation() {
        let out = lines(|| {
            tracing::info!("before any invocation");
            begin_invocation(InvocationLog {
                request_id: "req-1".into(),
                function_arn: "arn:aws:lambda:us-east-1:000000000000:function:push-fn".into(),
                xray_trace_id: Some("Root=1-abc".into()),
                cold_start: true,
            });
            let object = tracing::info_span!("object", bucket = "in", key = "a.ndjson");
            let _entered = object.enter();
            let batch = tracing::info_span!("batch", first_sequence = "1", key = "inner");
            let _batch = batch.enter();
            tracing::warn!(line = 7, error = "not JSON", "line quarantined");
            drop(_batch);
            drop(_entered);
            end_invocation();
        });
        assert_eq!(out.len(), 2);
        let first = &out[0];
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["message"], "before any invocation");
        assert_eq!(first["service"], "orders");
        assert_eq!(first["function_name"], "push-fn");
        assert_eq!(first["function_memory_size"], 128);
        assert!(first.get("function_request_id").is_none(), "no invocation yet: {first:?}");
        assert!(first["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(first["location"].as_str().unwrap().starts_with("pushpull::telemetry::tests:"));

        let second = &out[1];
        assert_eq!(second["level"], "WARN");
        assert_eq!(second["message"], "line quarantined");
        assert_eq!(second["cold_start"], true);
        assert_eq!(second["function_request_id"], "req-1");
        assert_eq!(second["xray_trace_id"], "Root=1-abc");
        assert_eq!(second["line"], 7);
        assert_eq!(second["bucket"], "in");
        assert_eq!(second["first_sequence"], "1");
        assert_eq!(second["key"], "inner", "the innermost span's field wins");
    }
}
