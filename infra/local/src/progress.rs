//! Live progress of `run` and `esm`: bars on a terminal (indicatif: objects pushed, records
//! pulled, iterator age), a plain line a second when the output is piped or in CI (what logs and
//! CI keep readably), or nothing.
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// What a progress update shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Update {
    /// Seconds since the start.
    pub elapsed: Duration,
    /// Objects pushed of all uploaded (`run` only).
    pub objects: Option<(u64, u64)>,
    /// Records the push function sent (`run` only).
    pub records_sent: Option<u64>,
    /// Records the mapping read.
    pub records_pulled: u64,
    /// Invocations by the mapping.
    pub invocations: u64,
    /// Iterator age: at the last batch and the largest, ms.
    pub iterator_age_ms: (f64, f64),
}

enum Mode {
    Bars { multi: MultiProgress, objects: Option<ProgressBar>, records: ProgressBar, age: ProgressBar },
    Lines { last: Option<Instant> },
    Off,
}

/// The progress display of one run.
pub struct LiveProgress {
    mode: Mode,
}

/// How the progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Display {
    /// Bars on a terminal, else plain lines.
    Auto,
    /// Bars on a terminal, else nothing.
    BarsOnly,
    /// Nothing.
    Off,
}

impl LiveProgress {
    /// A display for a run that will push `objects` objects and pull about `records` records
    /// (`None`: unknown, as for `esm`).
    pub fn new(display: Display, objects: Option<u64>, records: Option<u64>) -> Self {
        let terminal = std::io::stderr().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb");
        let mode = match (display, terminal) {
            (Display::Off, _) | (Display::BarsOnly, false) => Mode::Off,
            (Display::Auto, false) => Mode::Lines { last: None },
            (_, true) => {
                let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
                let bar = |len: Option<u64>, template: &str| {
                    let b = match len {
                        Some(n) => ProgressBar::new(n),
                        None => ProgressBar::no_length(),
                    };
                    b.set_style(
                        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    multi.add(b)
                };
                let objects = objects.map(|n| bar(Some(n), "objects pushed  [{bar:30.cyan/blue}] {pos}/{len} {msg}"));
                let records = match records {
                    Some(n) => bar(Some(n), "records pulled  [{bar:30.green/blue}] {pos}/{len} {msg}"),
                    None => bar(None, "records pulled  {spinner} {pos} {msg}"),
                };
                let age = bar(None, "iterator age    {msg}");
                Mode::Bars { multi, objects, records, age }
            }
        };
        LiveProgress { mode }
    }

    /// Shows `u`.
    pub fn update(&mut self, u: &Update) {
        match &mut self.mode {
            Mode::Bars { objects, records, age, .. } => {
                if let (Some(bar), Some((done, _))) = (objects.as_ref(), u.objects) {
                    bar.set_position(done);
                    bar.set_message(u.records_sent.map(|s| format!("({s} records sent)")).unwrap_or_default());
                }
                records.set_position(u.records_pulled);
                records.set_message(format!("in {} invocations, {:.1} s", u.invocations, u.elapsed.as_secs_f64()));
                age.set_message(format!(
                    "{:.0} ms at the last batch, {:.0} ms at most",
                    u.iterator_age_ms.0, u.iterator_age_ms.1
                ));
            }
            Mode::Lines { last } => {
                if last.is_some_and(|l| l.elapsed() < Duration::from_secs(1)) {
                    return;
                }
                *last = Some(Instant::now());
                let pushed = match (u.objects, u.records_sent) {
                    (Some((done, all)), Some(sent)) => format!("objects {done}/{all} pushed, {sent} records sent, "),
                    _ => String::new(),
                };
                println!(
                    "  [{:>5.1} s] {pushed}{} pulled in {} invocations, iterator age {:.0} ms",
                    u.elapsed.as_secs_f64(),
                    u.records_pulled,
                    u.invocations,
                    u.iterator_age_ms.0
                );
            }
            Mode::Off => {}
        }
    }

    /// Clears the bars (the summary follows).
    pub fn finish(self) {
        if let Mode::Bars { multi, objects, records, age } = self.mode {
            for bar in objects.iter().chain([&records, &age]) {
                bar.finish_and_clear();
            }
            let _ = multi.clear();
        }
    }
}
