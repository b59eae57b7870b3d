//! The template's CloudWatch alarms (`AWS::CloudWatch::Alarm`), evaluated on a local run's metrics
//! ([`crate::cloudwatch`]): whether, and when, each would have fired.
//!
//! As CloudWatch evaluates them: a metric's data points are its statistic over each period, with
//! periods aligned to the clock (a 60 s period starts on the minute); an alarm goes to ALARM when
//! `DatapointsToAlarm` (default: `EvaluationPeriods`) of the last `EvaluationPeriods` periods
//! breach the threshold; the time reported is the end of the period that completed the breach
//! (CloudWatch cannot decide earlier). Missing periods do not breach (`TreatMissingData:
//! notBreaching`, what the template sets; `missing`, the default, behaves the same for the first
//! breach). Alarms on metric math (`Metrics` with an `Expression`) are evaluated with the
//! expression's arithmetic, comparisons and `IF`.
use std::collections::BTreeMap;

use serde_json::Value;

use crate::cloudwatch::{Datum, statistic};
use crate::template::{Template, TemplateError, scalar};

/// A metric, as an alarm names it.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricStat {
    /// Namespace.
    pub namespace: String,
    /// Metric name.
    pub name: String,
    /// The exact dimension set.
    pub dimensions: BTreeMap<String, String>,
    /// The statistic.
    pub stat: String,
    /// Period, seconds.
    pub period: u64,
}

/// What an alarm watches.
#[derive(Debug, Clone, PartialEq)]
pub enum Watched {
    /// One metric.
    Metric(MetricStat),
    /// Metric math: the metrics by id and the expression returned.
    Math {
        /// Metrics by id.
        metrics: BTreeMap<String, MetricStat>,
        /// The expression.
        expression: String,
    },
}

/// One alarm of the template.
#[derive(Debug, Clone, PartialEq)]
pub struct Alarm {
    /// Logical id.
    pub id: String,
    /// What it watches.
    pub watched: Watched,
    /// `EvaluationPeriods`.
    pub evaluation_periods: usize,
    /// `DatapointsToAlarm`.
    pub datapoints: usize,
    /// `Threshold`.
    pub threshold: f64,
    /// `ComparisonOperator`.
    pub comparison: String,
}

/// An alarm's verdict over a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Logical id.
    pub id: String,
    /// When it would fire, ms since the epoch; `None`: it would stay OK.
    pub fires_at_ms: Option<u64>,
    /// The value of the data point that completed the breach (or the largest seen).
    pub value: Option<f64>,
    /// The threshold and operator, for the summary.
    pub rule: String,
}

fn metric_stat(v: &Value, stat: &str, period: u64) -> MetricStat {
    let dimensions = v["Dimensions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| (scalar(&d["Name"]).unwrap_or_default(), scalar(&d["Value"]).unwrap_or_default()))
        .collect();
    MetricStat {
        namespace: scalar(&v["Namespace"]).unwrap_or_default(),
        name: scalar(&v["MetricName"]).unwrap_or_default(),
        dimensions,
        stat: stat.to_owned(),
        period,
    }
}

/// The template's alarms, resolved (conditions and parameters applied).
pub fn from_template(t: &Template) -> Result<Vec<Alarm>, TemplateError> {
    let mut out = Vec::new();
    for (id, r) in t.resources_of("AWS::CloudWatch::Alarm") {
        let p = t.resolve(&r["Properties"], id)?;
        let number = |k: &str| p.get(k).and_then(scalar).and_then(|s| s.parse::<f64>().ok());
        let evaluation_periods = number("EvaluationPeriods").unwrap_or(1.0) as usize;
        let watched = match p.get("Metrics").and_then(Value::as_array) {
            Some(queries) => {
                let mut metrics = BTreeMap::new();
                let mut expression = String::new();
                for q in queries {
                    let qid = scalar(&q["Id"]).unwrap_or_default();
                    if let Some(e) = q.get("Expression").and_then(scalar) {
                        expression = e;
                    } else if let Some(ms) = q.get("MetricStat") {
                        let period = ms.get("Period").and_then(scalar).and_then(|s| s.parse().ok()).unwrap_or(60);
                        let stat = scalar(&ms["Stat"]).unwrap_or_else(|| "Average".into());
                        metrics.insert(qid, metric_stat(&ms["Metric"], &stat, period));
                    }
                }
                Watched::Math { metrics, expression }
            }
            None => {
                let stat = p.get("Statistic").or(p.get("ExtendedStatistic")).and_then(scalar).unwrap_or_default();
                Watched::Metric(metric_stat(&p, &stat, number("Period").unwrap_or(60.0) as u64))
            }
        };
        out.push(Alarm {
            id: id.clone(),
            watched,
            evaluation_periods,
            datapoints: number("DatapointsToAlarm").map_or(evaluation_periods, |d| d as usize),
            threshold: number("Threshold").unwrap_or(0.0),
            comparison: scalar(&p["ComparisonOperator"]).unwrap_or_default(),
        });
    }
    Ok(out)
}

/// The data points of `m`: period start (ms) → statistic.
fn points(m: &MetricStat, data: &[Datum]) -> BTreeMap<u64, f64> {
    let period_ms = m.period.max(1) * 1000;
    let mut buckets: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for d in data {
        if d.namespace == m.namespace && d.name == m.name && d.dimensions == m.dimensions {
            buckets.entry(d.t_ms / period_ms * period_ms).or_default().extend(&d.values);
        }
    }
    buckets.into_iter().filter_map(|(t, v)| statistic(&m.stat, &v).map(|s| (t, s))).collect()
}

impl Alarm {
    fn period_ms(&self) -> u64 {
        match &self.watched {
            Watched::Metric(m) => m.period,
            Watched::Math { metrics, .. } => metrics.values().map(|m| m.period).max().unwrap_or(60),
        }
        .max(1)
            * 1000
    }

    /// The alarm's data points over `data`: period start (ms) → value.
    pub fn series(&self, data: &[Datum]) -> BTreeMap<u64, f64> {
        match &self.watched {
            Watched::Metric(m) => points(m, data),
            Watched::Math { metrics, expression } => {
                let by_id: BTreeMap<&str, BTreeMap<u64, f64>> =
                    metrics.iter().map(|(id, m)| (id.as_str(), points(m, data))).collect();
                let periods: std::collections::BTreeSet<u64> = by_id.values().flat_map(|p| p.keys().copied()).collect();
                periods
                    .into_iter()
                    .filter_map(|t| {
                        let vars: BTreeMap<&str, f64> =
                            by_id.iter().map(|(id, p)| (*id, p.get(&t).copied().unwrap_or(0.0))).collect();
                        eval(expression, &vars).ok().map(|v| (t, v))
                    })
                    .collect()
            }
        }
    }

    fn breaches(&self, v: f64) -> bool {
        match self.comparison.as_str() {
            "GreaterThanThreshold" => v > self.threshold,
            "GreaterThanOrEqualToThreshold" => v >= self.threshold,
            "LessThanThreshold" => v < self.threshold,
            "LessThanOrEqualToThreshold" => v <= self.threshold,
            _ => false,
        }
    }

    /// Whether and when the alarm would fire over `data`.
    pub fn evaluate(&self, data: &[Datum]) -> Verdict {
        let series = self.series(data);
        let period = self.period_ms();
        let m = self.evaluation_periods.max(1) as u64;
        let mut fires = None;
        for (&t, &v) in &series {
            if !self.breaches(v) {
                continue;
            }
            // The window of the last M periods ending with this one.
            let breaching =
                series.range(t.saturating_sub((m - 1) * period)..=t).filter(|(_, v)| self.breaches(**v)).count();
            if breaching >= self.datapoints.max(1) {
                fires = Some((t + period, v));
                break;
            }
        }
        let rule = format!("{} {}", self.comparison.replace("Threshold", ""), self.threshold);
        Verdict {
            id: self.id.clone(),
            fires_at_ms: fires.map(|f| f.0),
            value: fires.map(|f| f.1).or_else(|| series.values().copied().reduce(f64::max)),
            rule,
        }
    }
}

/// Why an expression could not be evaluated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("metric math {expression:?}: {reason}")]
pub struct ExprError {
    /// The expression.
    pub expression: String,
    /// What is wrong.
    pub reason: String,
}

/// Evaluates a metric-math expression of numbers, metric ids, `+ - * /`, comparisons
/// (`> < >= <= ==`, 1 or 0) and `IF(condition, then, else)`. Division by zero gives 0 here;
/// CloudWatch drops such a point, which for an alarm is the same as not breaching a
/// greater-than threshold.
pub fn eval(expression: &str, vars: &BTreeMap<&str, f64>) -> Result<f64, ExprError> {
    let err = |reason: String| ExprError { expression: expression.to_owned(), reason };
    let tokens = tokenize(expression).map_err(err)?;
    let mut p = Parser { tokens, at: 0, vars };
    let v = p.comparison().map_err(err)?;
    if p.at != p.tokens.len() {
        return Err(err(format!("unexpected {:?}", p.tokens[p.at])));
    }
    Ok(v)
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64),
    Id(String),
    Op(String),
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() || c == '.' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            out.push(Tok::Num(text.parse().map_err(|_| format!("bad number {text:?}"))?));
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Tok::Id(chars[start..i].iter().collect()));
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            if [">=", "<=", "=="].contains(&two.as_str()) {
                out.push(Tok::Op(two));
                i += 2;
            } else if "+-*/()<>,".contains(c) {
                out.push(Tok::Op(c.to_string()));
                i += 1;
            } else {
                return Err(format!("unexpected character {c:?}"));
            }
        }
    }
    Ok(out)
}

struct Parser<'a> {
    tokens: Vec<Tok>,
    at: usize,
    vars: &'a BTreeMap<&'a str, f64>,
}

impl Parser<'_> {
    fn peek_op(&self) -> Option<&str> {
        match self.tokens.get(self.at) {
            Some(Tok::Op(o)) => Some(o),
            _ => None,
        }
    }

    fn expect(&mut self, op: &str) -> Result<(), String> {
        if self.peek_op() == Some(op) {
            self.at += 1;
            Ok(())
        } else {
            Err(format!("expected {op:?}"))
        }
    }

    fn comparison(&mut self) -> Result<f64, String> {
        let left = self.sum()?;
        let Some(op) = self.peek_op().filter(|o| [">", "<", ">=", "<=", "=="].contains(o)).map(str::to_owned) else {
            return Ok(left);
        };
        self.at += 1;
        let right = self.sum()?;
        let truth = match op.as_str() {
            ">" => left > right,
            "<" => left < right,
            ">=" => left >= right,
            "<=" => left <= right,
            _ => left == right,
        };
        Ok(if truth { 1.0 } else { 0.0 })
    }

    fn sum(&mut self) -> Result<f64, String> {
        let mut v = self.product()?;
        while let Some(op) = self.peek_op().filter(|o| *o == "+" || *o == "-").map(str::to_owned) {
            self.at += 1;
            let r = self.product()?;
            v = if op == "+" { v + r } else { v - r };
        }
        Ok(v)
    }

    fn product(&mut self) -> Result<f64, String> {
        let mut v = self.atom()?;
        while let Some(op) = self.peek_op().filter(|o| *o == "*" || *o == "/").map(str::to_owned) {
            self.at += 1;
            let r = self.atom()?;
            v = if op == "*" {
                v * r
            } else if r == 0.0 {
                0.0
            } else {
                v / r
            };
        }
        Ok(v)
    }

    fn atom(&mut self) -> Result<f64, String> {
        match self.tokens.get(self.at).cloned() {
            Some(Tok::Num(n)) => {
                self.at += 1;
                Ok(n)
            }
            Some(Tok::Op(o)) if o == "-" => {
                self.at += 1;
                Ok(-self.atom()?)
            }
            Some(Tok::Op(o)) if o == "(" => {
                self.at += 1;
                let v = self.comparison()?;
                self.expect(")")?;
                Ok(v)
            }
            Some(Tok::Id(id)) if id.eq_ignore_ascii_case("IF") => {
                self.at += 1;
                self.expect("(")?;
                let cond = self.comparison()?;
                self.expect(",")?;
                let then = self.comparison()?;
                self.expect(",")?;
                let otherwise = self.comparison()?;
                self.expect(")")?;
                Ok(if cond != 0.0 { then } else { otherwise })
            }
            Some(Tok::Id(id)) => {
                self.at += 1;
                self.vars.get(id.as_str()).copied().ok_or_else(|| format!("unknown metric id {id:?}"))
            }
            other => Err(format!("unexpected {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datum(t_ms: u64, name: &str, value: f64) -> Datum {
        Datum {
            t_ms,
            namespace: "AWS/Lambda".into(),
            name: name.into(),
            dimensions: [("FunctionName".to_owned(), "f".to_owned())].into(),
            values: vec![value],
        }
    }

    fn alarm(stat: &str, evaluation_periods: usize, datapoints: usize) -> Alarm {
        Alarm {
            id: "IteratorAgeAlarm".into(),
            watched: Watched::Metric(MetricStat {
                namespace: "AWS/Lambda".into(),
                name: "IteratorAge".into(),
                dimensions: [("FunctionName".to_owned(), "f".to_owned())].into(),
                stat: stat.into(),
                period: 60,
            }),
            evaluation_periods,
            datapoints,
            threshold: 1000.0,
            comparison: "GreaterThanThreshold".into(),
        }
    }

    #[test]
    fn an_alarm_fires_at_the_end_of_the_period_that_breaches() {
        let data = [datum(60_500, "IteratorAge", 200.0), datum(125_000, "IteratorAge", 5_000.0)];
        let v = alarm("Maximum", 1, 1).evaluate(&data);
        assert_eq!(v.fires_at_ms, Some(180_000), "the period 120-180 s breaches; decided at its end");
        assert_eq!(v.value, Some(5_000.0));
        // Another dimension value is another metric.
        let mut other = datum(125_000, "IteratorAge", 9_000.0);
        other.dimensions.insert("FunctionName".into(), "g".into());
        assert_eq!(alarm("Maximum", 1, 1).evaluate(&[other]).fires_at_ms, None);
    }

    #[test]
    fn m_out_of_n_needs_enough_breaching_periods_within_the_window() {
        let data = [datum(0, "IteratorAge", 5_000.0), datum(120_000, "IteratorAge", 5_000.0)];
        assert_eq!(alarm("Maximum", 2, 2).evaluate(&data).fires_at_ms, None, "60-120 s is missing: not breaching");
        assert_eq!(alarm("Maximum", 3, 2).evaluate(&data).fires_at_ms, Some(180_000));
        // The average of a period can stay under where its maximum breaches.
        let data = [datum(0, "IteratorAge", 1_500.0), datum(1_000, "IteratorAge", 100.0)];
        assert_eq!(alarm("Average", 1, 1).evaluate(&data).fires_at_ms, None);
    }

    #[test]
    fn metric_math_the_resent_rate() {
        let vars: BTreeMap<&str, f64> = [("resent", 6.0), ("sent", 100.0)].into();
        assert_eq!(eval("IF(sent > 0, 100 * resent / sent, 0)", &vars), Ok(6.0));
        let none: BTreeMap<&str, f64> = [("resent", 0.0), ("sent", 0.0)].into();
        assert_eq!(eval("IF(sent > 0, 100 * resent / sent, 0)", &none), Ok(0.0));
        assert_eq!(eval("(1 + 2) * -3 >= -9", &none), Ok(1.0));
        assert!(eval("resent +", &vars).is_err());
        assert!(eval("nope * 2", &vars).is_err());
    }

    #[test]
    fn reads_the_projects_alarms() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../template.yaml");
        let t = Template::load(&path, "pushpull-local", &[]).unwrap();
        let alarms = from_template(&t).unwrap();
        let iterator = alarms.iter().find(|a| a.id == "IteratorAgeAlarm").unwrap();
        let Watched::Metric(m) = &iterator.watched else { panic!("one metric") };
        assert_eq!(m.name, "IteratorAge");
        assert_eq!(m.dimensions["FunctionName"], "pushpull-local-kinesis-rollup", "the function's own name");
        assert_eq!(iterator.threshold, 60_000.0);
        let resent = alarms.iter().find(|a| a.id == "ResentEntriesAlarm").unwrap();
        let Watched::Math { metrics, expression } = &resent.watched else { panic!("metric math") };
        assert_eq!(metrics.len(), 2);
        assert!(expression.starts_with("IF("));
        assert_eq!(alarms.len(), 8);
    }
}
