//! What CloudWatch would hold after a local run: every metric as an Embedded Metric Format (EMF)
//! line in one file, the functions' own documents (forwarded from their stdout) beside the ones
//! the local AWS parts write for the metrics AWS publishes itself (`AWS/Lambda`: Invocations,
//! Errors, Throttles, Duration, IteratorAge and the event source mapping's event counts;
//! `AWS/SQS`: queue depths; `pushpull-local/Realism`: the faults injected).
//!
//! A run installs a log with [`MetricLog::install`]; the parts call [`put`] (and the function host
//! [`forward`]) wherever they are, without threading a handle through (a process runs one local
//! run at a time: `pushpull-local run`, `esm`, one test). With none installed, both do nothing.
//!
//! [`read`] parses the file back into [`Datum`]s, from which the run's summary, its alarms
//! ([`crate::alarms`]) and its picture (`pushpull-local`'s report) are computed: what an operator would
//! see in CloudWatch, not the runner's private counters.
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde_json::{Map, Value, json};

/// Namespace of the metrics Lambda publishes.
pub const LAMBDA: &str = "AWS/Lambda";
/// Namespace of the metrics SQS publishes.
pub const SQS: &str = "AWS/SQS";
/// Namespace of the local realism layer's injected faults (not an AWS namespace).
pub const REALISM: &str = "pushpull-local/Realism";

/// Where a run's EMF lines go.
#[derive(Debug)]
pub struct MetricLog {
    path: PathBuf,
    file: Mutex<std::io::BufWriter<std::fs::File>>,
}

static CURRENT: RwLock<Option<Arc<MetricLog>>> = RwLock::new(None);

impl MetricLog {
    /// Creates (truncates) `path` and makes it the log [`put`] and [`forward`] write to.
    pub fn install(path: &Path) -> std::io::Result<Arc<MetricLog>> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::File::create(path)?;
        let log = Arc::new(MetricLog { path: path.to_owned(), file: Mutex::new(std::io::BufWriter::new(file)) });
        if let Ok(mut current) = CURRENT.write() {
            *current = Some(log.clone());
        }
        Ok(log)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops writing to this log (if it is the installed one) and flushes it.
    pub fn finish(&self) -> std::io::Result<()> {
        if let Ok(mut current) = CURRENT.write()
            && current.as_ref().is_some_and(|c| std::ptr::eq(&**c, self))
        {
            *current = None;
        }
        self.file.lock().map_err(|_| std::io::Error::other("metric log poisoned"))?.flush()
    }

    fn write_line(&self, line: &str) {
        if let Ok(mut f) = self.file.lock() {
            let _ = f.write_all(line.as_bytes());
            let _ = f.write_all(b"\n");
        }
    }
}

fn current() -> Option<Arc<MetricLog>> {
    CURRENT.read().ok().and_then(|c| c.clone())
}

/// Milliseconds since the epoch, on the mapping's clock ([`crate::mapping::clock`]: tokio's, so
/// that a test under paused time stamps its metrics in paused time).
pub fn now_ms() -> u64 {
    (crate::mapping::clock::now_unix() * 1000.0).max(0.0) as u64
}

/// Writes one EMF document: `metrics` (name, unit, value) in `namespace` with `dimensions`, now.
pub fn put(namespace: &str, dimensions: &[(&str, &str)], metrics: &[(&str, &str, f64)]) {
    let Some(log) = current() else { return };
    log.write_line(&document(now_ms(), namespace, dimensions, metrics).to_string());
}

/// An EMF document (the format of CloudWatch's specification, as the functions write it).
pub fn document(t_ms: u64, namespace: &str, dimensions: &[(&str, &str)], metrics: &[(&str, &str, f64)]) -> Value {
    let mut doc = Map::new();
    doc.insert(
        "_aws".into(),
        json!({
            "Timestamp": t_ms,
            "CloudWatchMetrics": [{
                "Namespace": namespace,
                "Dimensions": [dimensions.iter().map(|(k, _)| *k).collect::<Vec<_>>()],
                "Metrics": metrics.iter().map(|(n, u, _)| json!({"Name": n, "Unit": u})).collect::<Vec<_>>(),
            }],
        }),
    );
    for (k, v) in dimensions {
        doc.insert((*k).into(), Value::from(*v));
    }
    for (n, _, v) in metrics {
        doc.insert((*n).into(), Value::from(*v));
    }
    Value::Object(doc)
}

/// Keeps a function's output line if it is an EMF document (CloudWatch Logs extracts metrics
/// from every log line that is one).
pub fn forward(line: &str) {
    if line.starts_with("{\"_aws\"")
        && let Some(log) = current()
    {
        log.write_line(line);
    }
}

/// One metric's values in one document.
#[derive(Debug, Clone, PartialEq)]
pub struct Datum {
    /// The document's timestamp, ms since the epoch.
    pub t_ms: u64,
    /// Namespace.
    pub namespace: String,
    /// Metric name.
    pub name: String,
    /// Dimensions (the document's dimension set with its values).
    pub dimensions: BTreeMap<String, String>,
    /// The values (a document may carry an array of values for one metric).
    pub values: Vec<f64>,
}

impl Datum {
    /// The dimension `name`'s value.
    pub fn dim(&self, name: &str) -> Option<&str> {
        self.dimensions.get(name).map(String::as_str)
    }
}

/// The data of one EMF line; nothing for a line that is not an EMF document. Every dimension
/// set of a directive yields its own data, as CloudWatch stores each set as its own metric.
pub fn parse_line(line: &str) -> Vec<Datum> {
    let Ok(Value::Object(doc)) = serde_json::from_str::<Value>(line) else { return Vec::new() };
    let Some(aws) = doc.get("_aws") else { return Vec::new() };
    let t_ms = aws["Timestamp"].as_u64().unwrap_or(0);
    let mut out = Vec::new();
    for directive in aws["CloudWatchMetrics"].as_array().into_iter().flatten() {
        let namespace = directive["Namespace"].as_str().unwrap_or("").to_owned();
        let sets: Vec<Vec<&str>> = directive["Dimensions"]
            .as_array()
            .map(|sets| {
                sets.iter()
                    .map(|set| set.as_array().into_iter().flatten().filter_map(Value::as_str).collect())
                    .collect()
            })
            .unwrap_or_default();
        let sets = if sets.is_empty() { vec![Vec::new()] } else { sets };
        for metric in directive["Metrics"].as_array().into_iter().flatten() {
            let Some(name) = metric["Name"].as_str() else { continue };
            let values: Vec<f64> = match doc.get(name) {
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_f64).collect(),
                Some(v) => v.as_f64().into_iter().collect(),
                None => continue,
            };
            for set in &sets {
                let dimensions = set
                    .iter()
                    .map(|k| ((*k).to_owned(), doc.get(*k).and_then(Value::as_str).unwrap_or("").to_owned()))
                    .collect();
                out.push(Datum {
                    t_ms,
                    namespace: namespace.clone(),
                    name: name.to_owned(),
                    dimensions,
                    values: values.clone(),
                });
            }
        }
    }
    out
}

/// Every datum in the EMF file at `path`, in file order.
pub fn read(path: &Path) -> std::io::Result<Vec<Datum>> {
    let file = std::fs::File::open(path)?;
    let mut out = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        out.extend(parse_line(&line?));
    }
    Ok(out)
}

/// A CloudWatch statistic over values.
pub fn statistic(stat: &str, values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let sum: f64 = values.iter().sum();
    Some(match stat {
        "Sum" => sum,
        "Maximum" => values.iter().copied().fold(f64::MIN, f64::max),
        "Minimum" => values.iter().copied().fold(f64::MAX, f64::min),
        "SampleCount" => values.len() as f64,
        "Average" => sum / values.len() as f64,
        p if p.starts_with('p') => {
            let q: f64 = p[1..].parse().ok()?;
            let mut sorted = values.to_vec();
            sorted.sort_by(f64::total_cmp);
            let rank = ((q / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
            sorted[rank.min(sorted.len()) - 1]
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_round_trip_with_every_dimension_set() {
        let doc = document(1_000, "ns", &[("FunctionName", "f"), ("Stream", "s")], &[("RecordsIn", "Count", 5.0)]);
        let data = parse_line(&doc.to_string());
        assert_eq!(data.len(), 1);
        assert_eq!(data[0].dim("Stream"), Some("s"));
        assert_eq!(data[0].values, [5.0]);
        // A function's document: an array of values, two dimension sets.
        let line = r#"{"_aws":{"Timestamp":7,"CloudWatchMetrics":[{"Namespace":"pushpull","Dimensions":[["FunctionName"],["FunctionName","Stream"]],"Metrics":[{"Name":"BatchSize","Unit":"Count"}]}]},"FunctionName":"f","Stream":"s","BatchSize":[1,2]}"#;
        let data = parse_line(line);
        assert_eq!(data.len(), 2);
        assert_eq!(data[1].dimensions.len(), 2);
        assert_eq!(data[0].values, [1.0, 2.0]);
        assert!(parse_line("{\"level\":\"INFO\"}").is_empty());
        assert!(parse_line("not json").is_empty());
    }

    #[test]
    fn statistics_as_cloudwatch_names_them() {
        let v = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(statistic("Sum", &v), Some(10.0));
        assert_eq!(statistic("Maximum", &v), Some(4.0));
        assert_eq!(statistic("Average", &v), Some(2.5));
        assert_eq!(statistic("SampleCount", &v), Some(4.0));
        assert_eq!(statistic("p50", &v), Some(2.0));
        assert_eq!(statistic("p99", &v), Some(4.0));
        assert_eq!(statistic("Sum", &[]), None);
        assert_eq!(statistic("Median", &v), None);
    }
}
