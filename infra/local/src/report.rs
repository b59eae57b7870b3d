//! A picture of a run (`pushpull-local run --report DIR`): from the run's EMF lines, on one time
//! axis, the lines pushed and records pulled per second, the iterator age, the invocations and
//! batch sizes, and failures with the faults injected; the alarms that would fire are marked.
//! Drawn with plotters in DejaVu Sans (embedded by the `dejavu` crate: no system font needed).
use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use crate::cloudwatch::{Datum, LAMBDA, REALISM};
use crate::observed::{Names, Observed};

/// Why the picture could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw {path}: {message}")]
pub struct ReportError {
    /// The file.
    pub path: String,
    /// What went wrong.
    pub message: String,
}

/// One series: label, colour, (seconds since start, value) points.
type Series = (String, RGBColor, Vec<(f64, f64)>);

const ORANGE: RGBColor = RGBColor(230, 120, 0);
const PURPLE: RGBColor = RGBColor(120, 60, 170);
const GREY: RGBColor = RGBColor(110, 110, 110);

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

/// Sums of metric `name` (in `namespace`, with `dim`) per bucket of `width_s`, as a rate per
/// second when `rate`.
fn per_bucket(
    data: &[Datum],
    namespace: &str,
    name: &str,
    dim: Option<(&str, &str)>,
    started_ms: u64,
    width_s: f64,
    rate: bool,
) -> Vec<(f64, f64)> {
    let mut buckets: BTreeMap<u64, f64> = BTreeMap::new();
    for d in data
        .iter()
        .filter(|d| d.namespace == namespace && d.name == name && dim.is_none_or(|(k, v)| d.dim(k) == Some(v)))
    {
        let t = d.t_ms.saturating_sub(started_ms) as f64 / 1000.0;
        *buckets.entry((t / width_s) as u64).or_default() += d.values.iter().sum::<f64>();
    }
    buckets.into_iter().map(|(b, v)| ((b as f64 + 0.5) * width_s, if rate { v / width_s } else { v })).collect()
}

/// Every value of `name` at its time.
fn points(data: &[Datum], namespace: &str, name: &str, dim: (&str, &str), started_ms: u64) -> Vec<(f64, f64)> {
    data.iter()
        .filter(|d| d.namespace == namespace && d.name == name && d.dim(dim.0) == Some(dim.1))
        .flat_map(|d| {
            let t = d.t_ms.saturating_sub(started_ms) as f64 / 1000.0;
            d.values.iter().map(move |v| (t, *v))
        })
        .collect()
}

/// Draws the run into `path` (PNG, 1400 x 1400).
pub fn draw(
    data: &[Datum],
    names: &Names,
    observed: &Observed,
    started_ms: u64,
    path: &Path,
) -> Result<(), ReportError> {
    let err = |e: &dyn std::fmt::Display| ReportError { path: path.display().to_string(), message: e.to_string() };
    register_font();
    let end_s = data.iter().map(|d| d.t_ms.saturating_sub(started_ms)).max().unwrap_or(1000) as f64 / 1000.0;
    let end_s = end_s.max(1.0) * 1.02;
    // About 60 buckets over the run, at least a second each.
    let width = (end_s / 60.0).max(1.0).round();
    let ns = names.namespace.as_str();
    let push = ("FunctionName", names.push_function.as_str());
    let pull = ("FunctionName", names.pull_function.as_str());

    let panels: Vec<(String, String, Vec<Series>, bool)> = vec![
        (
            format!("throughput (per second, {width:.0} s buckets)"),
            "per second".into(),
            vec![
                (
                    "lines pushed (RecordsSent)".into(),
                    BLUE,
                    per_bucket(data, ns, pushpull::metrics::RECORDS_SENT, Some(push), started_ms, width, true),
                ),
                (
                    "records pulled (RecordsProcessed)".into(),
                    GREEN,
                    per_bucket(data, ns, pushpull::metrics::RECORDS_PROCESSED, Some(pull), started_ms, width, true),
                ),
            ],
            false,
        ),
        (
            "iterator age (ms)".into(),
            "ms".into(),
            vec![
                (
                    "IteratorAge (mapping, per batch)".into(),
                    PURPLE,
                    points(data, LAMBDA, "IteratorAge", pull, started_ms),
                ),
                (
                    "OldestRecordAge (pull function)".into(),
                    ORANGE,
                    points(data, ns, pushpull::metrics::OLDEST_RECORD_AGE, pull, started_ms),
                ),
            ],
            true,
        ),
        (
            format!("invocations (per {width:.0} s bucket)"),
            "count".into(),
            vec![
                (
                    "push invocations".into(),
                    BLUE,
                    per_bucket(data, LAMBDA, "Invocations", Some(push), started_ms, width, false),
                ),
                (
                    "pull invocations".into(),
                    GREEN,
                    per_bucket(data, LAMBDA, "Invocations", Some(pull), started_ms, width, false),
                ),
            ],
            false,
        ),
        (
            "pull batch sizes (one point per invocation)".into(),
            "records".into(),
            vec![("BatchSize".into(), GREY, points(data, ns, pushpull::metrics::BATCH_SIZE, pull, started_ms))],
            true,
        ),
        (
            format!("failures and injected faults (per {width:.0} s bucket)"),
            "count".into(),
            vec![
                ("push errors".into(), RED, per_bucket(data, LAMBDA, "Errors", Some(push), started_ms, width, false)),
                (
                    "pull errors".into(),
                    MAGENTA,
                    per_bucket(data, LAMBDA, "Errors", Some(pull), started_ms, width, false),
                ),
                (
                    "records failed (pull)".into(),
                    ORANGE,
                    per_bucket(data, ns, pushpull::metrics::RECORDS_FAILED, Some(pull), started_ms, width, false),
                ),
                (
                    "lines quarantined".into(),
                    PURPLE,
                    per_bucket(data, ns, pushpull::metrics::QUARANTINED_LINES, Some(push), started_ms, width, false),
                ),
                ("throttles (both)".into(), CYAN, {
                    let mut t = per_bucket(data, LAMBDA, "Throttles", Some(push), started_ms, width, false);
                    t.extend(per_bucket(data, LAMBDA, "Throttles", Some(pull), started_ms, width, false));
                    t.sort_by(|a, b| a.0.total_cmp(&b.0));
                    t
                }),
                (
                    "faults injected (realism)".into(),
                    GREY,
                    per_bucket(data, REALISM, "InjectedFaults", None, started_ms, width, false),
                ),
            ],
            false,
        ),
    ];

    let root = BitMapBackend::new(path, (1400, 1400)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let fired: Vec<(String, f64)> =
        observed.alarms.iter().filter_map(|a| a.fires_after_s.map(|s| (a.alarm.clone(), s))).collect();
    let title = format!(
        "pushpull-local run: {} lines pushed, {} records pulled, {} alarms would fire",
        observed.records_sent,
        observed.records_processed,
        fired.len()
    );
    let root = root.titled(&title, ("sans-serif", 24)).map_err(|e| err(&e))?;
    let areas = root.split_evenly((panels.len(), 1));
    for (i, (area, (caption, unit, series, scatter_last))) in areas.iter().zip(&panels).enumerate() {
        let ymax = series.iter().flat_map(|s| s.2.iter().map(|p| p.1)).fold(1.0, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 17))
            .margin(8)
            .margin_right(20)
            .x_label_area_size(if i + 1 == panels.len() { 40 } else { 22 })
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..end_s, 0f64..ymax)
            .map_err(|e| err(&e))?;
        let mut mesh = chart.configure_mesh();
        let decimals = if end_s < 20.0 { 1 } else { 0 };
        let x_fmt = move |v: &f64| format!("{v:.decimals$}");
        mesh.x_labels(12).y_labels(5).y_desc(unit.as_str()).x_label_formatter(&x_fmt);
        if i + 1 == panels.len() {
            mesh.x_desc("seconds since the run started");
        }
        mesh.draw().map_err(|e| err(&e))?;
        for (j, (label, color, pts)) in series.iter().enumerate() {
            let color = *color;
            // The last series of a panel marked `scatter_last` is drawn as points (one per
            // invocation); the others as lines.
            let drawn = if *scatter_last && j + 1 == series.len() {
                chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
            } else {
                // Marked, so that a bucket alone (no neighbour to join) still shows.
                chart.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2))).map_err(|e| err(&e))?;
                chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
            };
            let scatter = *scatter_last && j + 1 == series.len();
            // Counts per bucket add up to the run's total; rates and ages do not.
            let label = if i >= 2 && !scatter {
                format!("{label}: {:.0} in all", pts.iter().map(|p| p.1).sum::<f64>() + 0.0)
            } else {
                label.clone()
            };
            drawn
                .map_err(|e| err(&e))?
                .label(label)
                .legend(move |(x, y)| Rectangle::new([(x, y - 4), (x + 16, y + 4)], color.filled()));
        }
        for (alarm, at) in &fired {
            chart
                .draw_series(LineSeries::new([(*at, 0.0), (*at, ymax)], RED.mix(0.6).stroke_width(1)))
                .map_err(|e| err(&e))?;
            if i == 0 {
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!("{alarm} fires"),
                        (*at, ymax * 0.92),
                        ("sans-serif", 12).into_font().color(&RED),
                    )))
                    .map_err(|e| err(&e))?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
