//! A run as CloudWatch would show it: totals and extremes computed from the run's EMF lines
//! ([`crate::cloudwatch`]), with the template's alarms evaluated on them ([`crate::alarms`]).
use std::collections::BTreeMap;

use serde::Serialize;

use crate::alarms::Verdict;
use crate::cloudwatch::{Datum, LAMBDA, REALISM, SQS, statistic};

/// The names that pick a run's metrics out of the data.
#[derive(Debug, Clone, Default)]
pub struct Names {
    /// The functions' EMF namespace (`MetricsNamespace`).
    pub namespace: String,
    /// The push function.
    pub push_function: String,
    /// The pull function.
    pub pull_function: String,
    /// The failure queues (push, pull), by name.
    pub queues: (Option<String>, Option<String>),
}

/// One function's Lambda metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FunctionMetrics {
    /// `Invocations`.
    pub invocations: u64,
    /// `Errors`.
    pub errors: u64,
    /// `Throttles`.
    pub throttles: u64,
    /// `ColdStart` (from the function's EMF).
    pub cold_starts: u64,
    /// `Duration` p95, ms.
    pub duration_p95_ms: f64,
    /// `CheckpointWrites` and `CheckpointConflicts` (from the function's EMF).
    pub checkpoint_writes: u64,
    /// See `checkpoint_writes`.
    pub checkpoint_conflicts: u64,
}

/// The run as CloudWatch would show it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Observed {
    /// Metric data points read (one per metric per EMF document).
    pub data_points: usize,
    /// The push function.
    pub push: FunctionMetrics,
    /// The pull function.
    pub pull: FunctionMetrics,
    /// Push EMF: S3 objects handled.
    pub objects: u64,
    /// Push EMF: lines read.
    pub lines_in: u64,
    /// Push EMF: bytes read.
    pub bytes_read: u64,
    /// Push EMF: lines sent to Kinesis.
    pub records_sent: u64,
    /// Push EMF: PutRecords calls.
    pub put_records_calls: u64,
    /// Push EMF: entries resent.
    pub resent_entries: u64,
    /// Push EMF: lines quarantined.
    pub quarantined_lines: u64,
    /// Pull EMF: records in.
    pub records_in: u64,
    /// Pull EMF: records processed.
    pub records_processed: u64,
    /// Pull EMF: records failed.
    pub records_failed: u64,
    /// Pull EMF: batch size, average and maximum.
    pub batch_size_avg: f64,
    /// See `batch_size_avg`.
    pub batch_size_max: f64,
    /// Pull EMF: the oldest record's age at processing, maximum, ms.
    pub oldest_record_age_max_ms: f64,
    /// `AWS/Lambda` `OffsetLag` maximum, records (a Kafka mapping; `None` for the others).
    pub offset_lag_max: Option<f64>,
    /// `AWS/Lambda` `IteratorAge` maximum, ms.
    pub iterator_age_max_ms: f64,
    /// The mapping's event counts (`PolledEventCount`, …) by name.
    pub mapping_events: BTreeMap<String, u64>,
    /// Failure queues' largest `ApproximateNumberOfMessagesVisible` (push, pull).
    pub queue_depth_max: (u64, u64),
    /// Faults the realism layer injected, by kind.
    pub injected_faults: BTreeMap<String, u64>,
    /// The template's alarms.
    pub alarms: Vec<AlarmOutcome>,
}

/// An alarm's outcome, relative to the run's start.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlarmOutcome {
    /// Logical id.
    pub alarm: String,
    /// Seconds after the run's start when it would fire; `None`: it stays OK.
    pub fires_after_s: Option<f64>,
    /// The rule (operator and threshold).
    pub rule: String,
    /// The breaching value, or the largest seen.
    pub value: Option<f64>,
}

fn values<'a>(data: &'a [Datum], namespace: &'a str, name: &'a str, dim: (&'a str, &'a str)) -> Vec<f64> {
    data.iter()
        .filter(|d| d.namespace == namespace && d.name == name && d.dim(dim.0) == Some(dim.1))
        .flat_map(|d| d.values.iter().copied())
        .collect()
}

fn total(data: &[Datum], namespace: &str, name: &str, dim: (&str, &str)) -> u64 {
    values(data, namespace, name, dim).iter().sum::<f64>().round() as u64
}

impl Observed {
    /// Computes the view from `data`; `verdicts` are the alarms' and `started_ms` the run's start.
    pub fn from_data(data: &[Datum], names: &Names, verdicts: &[Verdict], started_ms: u64) -> Self {
        let ns = names.namespace.as_str();
        let function = |f: &str| FunctionMetrics {
            invocations: total(data, LAMBDA, "Invocations", ("FunctionName", f)),
            errors: total(data, LAMBDA, "Errors", ("FunctionName", f)),
            throttles: total(data, LAMBDA, "Throttles", ("FunctionName", f)),
            cold_starts: total(data, ns, pushpull::metrics::COLD_START, ("FunctionName", f)),
            duration_p95_ms: statistic("p95", &values(data, LAMBDA, "Duration", ("FunctionName", f))).unwrap_or(0.0),
            checkpoint_writes: total(data, ns, pushpull::metrics::CHECKPOINT_WRITES, ("FunctionName", f)),
            checkpoint_conflicts: total(data, ns, pushpull::metrics::CHECKPOINT_CONFLICTS, ("FunctionName", f)),
        };
        let push = ("FunctionName", names.push_function.as_str());
        let pull = ("FunctionName", names.pull_function.as_str());
        let batch = values(data, ns, pushpull::metrics::BATCH_SIZE, pull);
        let mut mapping_events = BTreeMap::new();
        let mut injected_faults = BTreeMap::new();
        for d in data {
            if d.namespace == LAMBDA && d.name.ends_with("EventCount") {
                *mapping_events.entry(d.name.clone()).or_default() += d.values.iter().sum::<f64>() as u64;
            }
            if d.namespace == REALISM {
                let kind = d.dim("Fault").unwrap_or("?").to_owned();
                *injected_faults.entry(kind).or_default() += d.values.iter().sum::<f64>() as u64;
            }
        }
        let depth = |q: &Option<String>| {
            q.as_deref().map_or(0.0, |q| {
                statistic("Maximum", &values(data, SQS, "ApproximateNumberOfMessagesVisible", ("QueueName", q)))
                    .unwrap_or(0.0)
            }) as u64
        };
        Observed {
            data_points: data.len(),
            push: function(&names.push_function),
            pull: function(&names.pull_function),
            objects: total(data, ns, pushpull::metrics::OBJECTS, push),
            lines_in: total(data, ns, pushpull::metrics::LINES_IN, push),
            bytes_read: total(data, ns, pushpull::metrics::BYTES_READ, push),
            records_sent: total(data, ns, pushpull::metrics::RECORDS_SENT, push),
            put_records_calls: total(data, ns, pushpull::metrics::PUT_RECORDS_CALLS, push),
            resent_entries: total(data, ns, pushpull::metrics::RESENT_ENTRIES, push),
            quarantined_lines: total(data, ns, pushpull::metrics::QUARANTINED_LINES, push),
            records_in: total(data, ns, pushpull::metrics::RECORDS_IN, pull),
            records_processed: total(data, ns, pushpull::metrics::RECORDS_PROCESSED, pull),
            records_failed: total(data, ns, pushpull::metrics::RECORDS_FAILED, pull),
            batch_size_avg: statistic("Average", &batch).unwrap_or(0.0),
            batch_size_max: statistic("Maximum", &batch).unwrap_or(0.0),
            oldest_record_age_max_ms: statistic(
                "Maximum",
                &values(data, ns, pushpull::metrics::OLDEST_RECORD_AGE, pull),
            )
            .unwrap_or(0.0),
            iterator_age_max_ms: statistic("Maximum", &values(data, LAMBDA, "IteratorAge", pull)).unwrap_or(0.0),
            offset_lag_max: statistic("Maximum", &values(data, LAMBDA, "OffsetLag", pull)),
            mapping_events,
            queue_depth_max: (depth(&names.queues.0), depth(&names.queues.1)),
            injected_faults,
            alarms: verdicts
                .iter()
                .map(|v| AlarmOutcome {
                    alarm: v.id.clone(),
                    fires_after_s: v.fires_at_ms.map(|t| t.saturating_sub(started_ms) as f64 / 1000.0),
                    rule: v.rule.clone(),
                    value: v.value,
                })
                .collect(),
        }
    }
}

impl std::fmt::Display for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "  as CloudWatch would show it ({} metric data points)", self.data_points)?;
        let fun = |m: &FunctionMetrics| {
            format!(
                "{} invocations, {} errors, {} throttles, {} cold starts, duration p95 {:.0} ms, {} checkpoint writes ({} conflicts)",
                m.invocations,
                m.errors,
                m.throttles,
                m.cold_starts,
                m.duration_p95_ms,
                m.checkpoint_writes,
                m.checkpoint_conflicts
            )
        };
        writeln!(f, "    push function  {}", fun(&self.push))?;
        writeln!(
            f,
            "                   {} objects, {} lines, {} bytes read; {} lines sent in {} PutRecords calls ({} resent); {} quarantined",
            self.objects,
            self.lines_in,
            self.bytes_read,
            self.records_sent,
            self.put_records_calls,
            self.resent_entries,
            self.quarantined_lines
        )?;
        writeln!(f, "    pull function  {}", fun(&self.pull))?;
        writeln!(
            f,
            "                   {} records in, {} processed, {} failed; batch size avg {:.0}, max {:.0}; oldest record at processing max {:.0} ms",
            self.records_in,
            self.records_processed,
            self.records_failed,
            self.batch_size_avg,
            self.batch_size_max,
            self.oldest_record_age_max_ms
        )?;
        let events: Vec<String> = self.mapping_events.iter().map(|(k, v)| format!("{k} {v}")).collect();
        match self.offset_lag_max {
            // A Kafka mapping: AWS publishes OffsetLag for it, not IteratorAge.
            Some(lag) => writeln!(f, "    mapping        OffsetLag max {lag:.0} records; {}", events.join(", "))?,
            None => writeln!(
                f,
                "    mapping        IteratorAge max {:.0} ms; {}",
                self.iterator_age_max_ms,
                events.join(", ")
            )?,
        }
        writeln!(
            f,
            "    failure queues max visible: push {}, pull {}",
            self.queue_depth_max.0, self.queue_depth_max.1
        )?;
        if !self.injected_faults.is_empty() {
            let faults: Vec<String> = self.injected_faults.iter().map(|(k, v)| format!("{k} {v}")).collect();
            writeln!(f, "    faults         {}", faults.join(", "))?;
        }
        writeln!(f, "  alarms (the template's, evaluated on these metrics)")?;
        for a in &self.alarms {
            let value = a.value.map_or("no data".to_owned(), |v| format!("{v:.0}"));
            match a.fires_after_s {
                Some(s) => writeln!(f, "    {:<24} would fire at +{s:.0} s ({value}, rule {})", a.alarm, a.rule)?,
                None => writeln!(f, "    {:<24} OK (largest {value}, rule {})", a.alarm, a.rule)?,
            }
        }
        Ok(())
    }
}
