//! The batching trade-off on the whole pipeline, measured and drawn.
//!
//!     make bench-tradeoff        # or: cargo bench -p pushpull-tests --bench batching_tradeoff -- [lines] [png]
//!
//! Needs LocalStack (the make target starts it) and a TrueType font (DejaVu Sans, from
//! `fonts-dejavu-core`, or `CHART_FONT=/path/to/font.ttf`). For each setting of the grid
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

fn draw(points: &[Point], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let font_path =
        std::env::var("CHART_FONT").unwrap_or_else(|_| "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf".into());
    let font = std::fs::read(&font_path).map_err(|e| format!("{font_path}: {e} (set CHART_FONT to a .ttf file)"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice()))
        .map_err(|_| format!("{font_path}: not a usable font"))?;
    let root = BitMapBackend::new(path, (1400, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let root =
        root.titled("pushpull: batching trades latency for throughput and fewer invocations", ("sans-serif", 26))?;
    let (left, right) = root.split_horizontally(700);
    let xmax = points.iter().map(|p| p.p50).fold(1000.0, f64::max) * 1.3;
    let label = |p: &Point| {
        if p.linger == 100 {
            format!("B{} W{}", p.batch, p.window)
        } else {
            format!("B{} W{} L{}", p.batch, p.window, p.linger)
        }
    };
    let color = |p: &Point| match p.window {
        0 => RED,
        1 => BLUE,
        5 => GREEN,
        _ => MAGENTA,
    };

    let ymax = points.iter().map(|p| p.throughput).fold(0.0, f64::max) * 1.25;
    let mut chart = ChartBuilder::on(&left)
        .caption("throughput vs median end-to-end latency", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((100f64..xmax).log_scale(), 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_labels(8)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_desc("p50 latency, upload to pull invocation (ms, log)")
        .y_desc("lines / s")
        .draw()?;
    for p in points {
        chart.draw_series(std::iter::once(Circle::new((p.p50, p.throughput), 6, color(p).filled())))?;
        chart.draw_series(std::iter::once(Text::new(label(p), (p.p50 * 1.04, p.throughput), ("sans-serif", 13))))?;
    }

    let ymax = points.iter().map(|p| p.per_thousand).fold(0.0, f64::max) * 1.3;
    let mut chart = ChartBuilder::on(&right)
        .caption("pull invocations per 1,000 lines vs median latency", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((100f64..xmax).log_scale(), (0.5f64..ymax.max(2.0)).log_scale())?;
    chart
        .configure_mesh()
        .x_labels(8)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .x_desc("p50 latency (ms, log)")
        .y_desc("invocations per 1,000 lines (log)")
        .draw()?;
    for p in points {
        chart.draw_series(std::iter::once(Circle::new((p.p50, p.per_thousand), 6, color(p).filled())))?;
        chart.draw_series(std::iter::once(Text::new(label(p), (p.p50 * 1.04, p.per_thousand), ("sans-serif", 13))))?;
    }
    root.present()?;
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
