//! The batching trade-off on the whole pipeline, measured and drawn.
//!
//!     make bench-tradeoff        # or: cargo bench -p pushpull-tests --bench batching_tradeoff -- [lines] [png]
//!
//! Needs LocalStack (the make target starts it). The chart is drawn in DejaVu Sans (embedded;
//! `CHART_FONT=/path/to/font.ttf` for another). For each setting of the grid
//! (BatchSize x MaximumBatchingWindowInSeconds, and the push function's PUT_LINGER_MS) it runs
//! `pushpull_local::pipeline::run` on a fresh stack with `lines` lines (default 4,000, in four
//! objects, 200 users) and records: end-to-end latency per line (upload to the pull invocation
//! that carried it; p50 and p95), throughput (lines / time from upload to the last line's
//! invocation), pull invocations per 1,000 lines and the mean batch. Prints a table for
//! BENCHMARKS.md and draws `docs/batching-tradeoff.png` (plotters). `-- redraw TABLE.md [PNG]`
//! draws the chart again from such a table (`docs/batching-tradeoff.md` is the committed one).
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use pushpull_local::pipeline::{self, PipelineConfig};
use pushpull_tests::unique;

const TEMPLATE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../infra/template.yaml");

/// (PUT_LINGER_MS, BatchSize, MaximumBatchingWindowInSeconds)
const GRID: [(u32, u32, u32); 11] = [
    (100, 10, 0),
    (100, 100, 0),
    (100, 1000, 0),
    (100, 10, 1),
    (100, 100, 1),
    (100, 1000, 1),
    (100, 100, 5),
    (100, 1000, 5),
    (100, 1000, 10),
    (10, 100, 1),
    (1000, 100, 1),
];

struct Point {
    linger: u32,
    batch: u32,
    window: u32,
    p50: f64,
    p95: f64,
    throughput: f64,
    per_thousand: f64,
    mean_batch: f64,
}

fn write_input(dir: &Path, lines: usize) {
    for part in 0..4 {
        let mut text = String::new();
        for i in part * lines / 4..(part + 1) * lines / 4 {
            text.push_str(&format!(
                "{{\"id\":{i},\"user\":\"u{:03}\",\"amount\":{}.{:02}}}\n",
                i % 200,
                i % 100,
                i % 100
            ));
        }
        std::fs::write(dir.join(format!("part-{part}.ndjson")), text).unwrap();
    }
}

/// The colour of a point: its batching window (the legend says which).
fn window_color(window: u32) -> RGBColor {
    match window {
        0 => RGBColor(214, 39, 40),
        1 => RGBColor(31, 119, 180),
        5 => RGBColor(44, 160, 44),
        10 => RGBColor(148, 103, 189),
        // The shape legend's neutral marker.
        _ => RGBColor(120, 120, 120),
    }
}

/// A point's marker: its PUT_LINGER_MS (circle 100, triangle 10, square 1000).
fn marker(p: &Point, at: (i32, i32)) -> DynElement<'static, BitMapBackend<'static>, (i32, i32)> {
    // Translucent, so that points at (nearly) the same place both show.
    let style = window_color(p.window).mix(0.75).filled();
    match p.linger {
        10 => TriangleMarker::new(at, 8, style).into_dyn(),
        1000 => Rectangle::new([(at.0 - 6, at.1 - 6), (at.0 + 6, at.1 + 6)], style).into_dyn(),
        _ => Circle::new(at, 7, style).into_dyn(),
    }
}

/// Label boxes placed so far (pixels), and where to put the next one without overlapping them
/// or a marker: the first free spot of a few around the point.
fn place(label: &str, at: (i32, i32), taken: &mut Vec<(i32, i32, i32, i32)>, markers: &[(i32, i32)]) -> (i32, i32) {
    let (w, h) = (label.chars().count() as i32 * 8, 15);
    let candidates = [
        (10, -7),
        (-w - 10, -7),
        (10, 6),
        (-w - 10, 6),
        (-w / 2, -24),
        (-w / 2, 12),
        (10, -22),
        (10, 20),
        (-w - 10, -22),
        (-w - 10, 20),
        (-w / 2, -40),
        (-w / 2, 28),
    ];
    let overlaps = |r: (i32, i32, i32, i32)| {
        taken.iter().any(|t| r.0 < t.2 && t.0 < r.2 && r.1 < t.3 && t.1 < r.3)
            || markers.iter().any(|m| r.0 < m.0 + 8 && m.0 - 8 < r.2 && r.1 < m.1 + 8 && m.1 - 8 < r.3)
    };
    let rect = |(dx, dy): (i32, i32)| (at.0 + dx, at.1 + dy, at.0 + dx + w, at.1 + dy + h);
    let chosen = candidates.iter().copied().find(|c| !overlaps(rect(*c))).unwrap_or(candidates[0]);
    let r = rect(chosen);
    taken.push(r);
    (r.0, r.1)
}

fn draw(points: &[Point], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let font: &'static [u8] = match std::env::var("CHART_FONT") {
        Ok(p) => Box::leak(std::fs::read(&p).map_err(|e| format!("{p}: {e}"))?.into_boxed_slice()),
        Err(_) => dejavu::sans::regular(),
    };
    plotters::style::register_font("sans-serif", FontStyle::Normal, font).map_err(|_| "not a usable font")?;
    // 'static: the markers are built as dynamic elements of this backend.
    let path: &'static Path = Box::leak(path.to_owned().into_boxed_path());
    let base = BitMapBackend::new(path, (1500, 720)).into_drawing_area();
    base.fill(&WHITE)?;
    let root = base.titled(
        "pushpull: batching trades latency for throughput and fewer invocations (whole pipeline, 4,000 lines)",
        ("sans-serif", 24),
    )?;
    let (charts, legend_area) = root.split_vertically(600);
    let (left, right) = charts.split_horizontally(750);
    let xmax = points.iter().map(|p| p.p50).fold(1000.0, f64::max) * 1.3;
    let label = |p: &Point| format!("B{}", p.batch);
    type Panel<'a> =
        (&'a DrawingArea<BitMapBackend<'static>, plotters::coord::Shift>, &'a str, &'a str, fn(&Point) -> f64, bool);
    let panels: [Panel; 2] = [
        (&left, "throughput vs median end-to-end latency", "lines / s", |p| p.throughput, false),
        (
            &right,
            "pull invocations per 1,000 lines vs median latency",
            "invocations per 1,000 lines (log)",
            |p| p.per_thousand,
            true,
        ),
    ];
    let mut taken = Vec::new();
    for (area, caption, y_desc, y, log_y) in panels {
        let ymax = points.iter().map(y).fold(0.0, f64::max) * 1.3;
        let mut builder = ChartBuilder::on(area);
        builder.caption(caption, ("sans-serif", 19)).margin(15).x_label_area_size(45).y_label_area_size(75);
        // Pixel positions of the points, from either kind of chart.
        let pixels: Vec<(i32, i32)> = if log_y {
            let mut chart =
                builder.build_cartesian_2d((100f64..xmax).log_scale(), (0.5f64..ymax.max(2.0)).log_scale())?;
            chart
                .configure_mesh()
                .x_labels(8)
                .x_label_formatter(&|v| format!("{v:.0}"))
                .y_label_formatter(&|v| format!("{v:.1}"))
                .x_desc("p50 latency, upload to pull invocation (ms, log)")
                .y_desc(y_desc)
                .draw()?;
            points.iter().map(|p| chart.backend_coord(&(p.p50, y(p)))).collect()
        } else {
            let mut chart = builder.build_cartesian_2d((100f64..xmax).log_scale(), 0f64..ymax)?;
            chart
                .configure_mesh()
                .x_labels(8)
                .x_label_formatter(&|v| format!("{v:.0}"))
                .y_label_formatter(&|v| format!("{v:.0}"))
                .x_desc("p50 latency, upload to pull invocation (ms, log)")
                .y_desc(y_desc)
                .draw()?;
            points.iter().map(|p| chart.backend_coord(&(p.p50, y(p)))).collect()
        };
        for (p, at) in points.iter().zip(&pixels) {
            base.draw(&marker(p, *at))?;
        }
        for (p, at) in points.iter().zip(&pixels) {
            let text = label(p);
            let spot = place(&text, *at, &mut taken, &pixels);
            base.draw(&Text::new(text, spot, ("sans-serif", 14).into_font().color(&BLACK)))?;
        }
    }
    // The legend: colours are the batching window, shapes PUT_LINGER_MS, labels BatchSize.
    let legend_area = legend_area.margin(5, 5, 40, 10);
    let mut x = 0;
    let row = |x: &mut i32,
               marker_of: &dyn Fn((i32, i32)) -> DynElement<'static, BitMapBackend<'static>, (i32, i32)>,
               text: &str|
     -> Result<(), Box<dyn std::error::Error>> {
        legend_area.draw(&marker_of((*x + 8, 30)))?;
        legend_area.draw(&Text::new(text.to_owned(), (*x + 22, 22), ("sans-serif", 15)))?;
        *x += 30 + text.chars().count() as i32 * 9;
        Ok(())
    };
    legend_area.draw(&Text::new("colour: MaximumBatchingWindowInSeconds", (0, 0), ("sans-serif", 15)))?;
    for w in [0u32, 1, 5, 10] {
        let probe = Point {
            linger: 100,
            batch: 0,
            window: w,
            p50: 0.0,
            p95: 0.0,
            throughput: 0.0,
            per_thousand: 0.0,
            mean_batch: 0.0,
        };
        row(&mut x, &|at| marker(&probe, at), &format!("window {w} s"))?;
    }
    x += 40;
    for l in [10u32, 100, 1000] {
        let probe = Point {
            linger: l,
            batch: 0,
            window: 99,
            p50: 0.0,
            p95: 0.0,
            throughput: 0.0,
            per_thousand: 0.0,
            mean_batch: 0.0,
        };
        row(&mut x, &|at| marker(&probe, at), &format!("PUT_LINGER_MS {l}"))?;
    }
    legend_area.draw(&Text::new(
        "shape: the push function's PUT_LINGER_MS; label: BatchSize",
        (760, 0),
        ("sans-serif", 15),
    ))?;
    base.present()?;
    Ok(())
}

/// Points from a table this bench printed (its rows, as in BENCHMARKS.md).
fn parse_table(text: &str) -> Vec<Point> {
    text.lines()
        .filter_map(|l| {
            let c: Vec<f64> = l
                .split('|')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(|c| c.parse::<f64>())
                .collect::<Result<_, _>>()
                .ok()?;
            (c.len() == 8).then(|| Point {
                linger: c[0] as u32,
                batch: c[1] as u32,
                window: c[2] as u32,
                p50: c[3],
                p95: c[4],
                throughput: c[5],
                per_thousand: c[6],
                mean_batch: c[7],
            })
        })
        .collect()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    // `redraw TABLE.md [PNG]`: draw the chart again from a table printed earlier.
    if args.first().map(String::as_str) == Some("redraw") {
        let text = std::fs::read_to_string(args.get(1).expect("redraw TABLE [PNG]")).unwrap();
        let png = args
            .get(2)
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/batching-tradeoff.png"));
        draw(&parse_table(&text), &png).unwrap();
        println!("chart: {}", png.display());
        return;
    }
    let lines: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(4000);
    let png = args
        .get(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/batching-tradeoff.png"));
    let input = tempfile::tempdir().unwrap();
    write_input(input.path(), lines);
    println!(
        "| PUT_LINGER_MS | BatchSize | window s | p50 ms | p95 ms | lines/s | invocations per 1,000 lines | mean batch |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut points = Vec::new();
    for (linger, batch, window) in GRID {
        let config = PipelineConfig {
            overrides: vec![
                format!("DataBucketName={}", unique("pp-tradeoff")),
                format!("BatchSize={batch}"),
                format!("MaximumBatchingWindowInSeconds={window}"),
            ],
            delay_scale: 0.01,
            extra_env: vec![("s3-to-kinesis", vec![("PUT_LINGER_MS".to_owned(), linger.to_string())])],
            ..PipelineConfig::new(TEMPLATE, unique("tradeoff"), input.path())
        };
        let report = pipeline::run(config).await.unwrap();
        report.check().unwrap();
        let [p50, p95, _, max] = report.latency_ms;
        let good = report.expected_good as f64;
        let p = Point {
            linger,
            batch,
            window,
            p50,
            p95,
            throughput: good / (max / 1000.0),
            per_thousand: report.mapping.counts.invocations as f64 * 1000.0 / good,
            mean_batch: report.mapping.batch_size_mean,
        };
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} |",
            p.linger, p.batch, p.window, p.p50, p.p95, p.throughput, p.per_thousand, p.mean_batch
        );
        points.push(p);
    }
    if let Some(dir) = png.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    match draw(&points, &png) {
        Ok(()) => println!("\nchart: {}", png.display()),
        Err(e) => eprintln!("chart not drawn: {e}"),
    }
}
