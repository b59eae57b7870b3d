//! One workload for every broker, as the push-against-pull benches run it: a producer at a rate
//! for some seconds, each message's send time kept by the hash of its body; what the reader
//! invoked (`pushpull_local::mapping::Delivered`: the body's xxh3 and the invocation's time)
//! tallied against it: delivered, lost, duplicated, delay; and the reader's peak memory.
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use pushpull_local::mapping::Delivered;
use tokio::sync::mpsc;

/// What was sent: the xxh3 of each body → its send time (unix seconds).
pub type Sent = HashMap<u64, f64>;

/// The body of message `n`: its number, then `x` up to `size` bytes (at least 12).
pub fn body(n: u64, size: usize) -> String {
    format!("{n:012}{}", "x".repeat(size.saturating_sub(12)))
}

/// Sends `rate` messages a second of `size` bytes for `seconds`, a tick's worth every `tick`
/// (every `1/rate` s if longer) through `send`, each tick's send a task of its own (a
/// broker's answer may take longer than a tick: the next tick does not wait for it); returns when
/// every send has returned. [`achieved_rate`] says what it managed.
pub async fn produce<F, Fut>(rate: u64, seconds: u64, size: usize, tick: Duration, mut send: F) -> (Sent, Duration)
where
    F: FnMut(Vec<String>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut sent = HashMap::new();
    let started = Instant::now();
    let tick = tick.max(Duration::from_millis(1)).max(Duration::from_secs(1) / rate.max(1) as u32);
    let mut n = 0u64;
    let mut ticks = 0u32;
    let mut sends = Vec::new();
    while started.elapsed() < Duration::from_secs(seconds) {
        let now = pushpull_local::mapping::now_unix();
        // What the rate owes by the end of this tick, less what was sent: no rate is rounded down.
        let due = (rate * u64::from(ticks + 1) * tick.as_millis() as u64 / 1000).max(n + 1);
        let bodies: Vec<String> = (n..due).map(|i| body(i, size)).collect();
        for b in &bodies {
            sent.insert(xxhash_rust::xxh3::xxh3_64(b.as_bytes()), now);
        }
        n = due;
        sends.push(tokio::spawn(send(bodies)));
        ticks += 1;
        tokio::time::sleep_until(started + tick * ticks).await;
    }
    for s in sends {
        if let Err(e) = s.await {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    (sent, started.elapsed())
}

/// Messages a second a producer managed (to the broker's answer to its last send).
pub fn achieved_rate(sent: &Sent, took: Duration) -> f64 {
    sent.len() as f64 / took.as_secs_f64().max(1e-9)
}

/// What became of the messages sent.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Tally {
    /// Sent.
    pub sent: u64,
    /// Invoked at least once.
    pub delivered: u64,
    /// Sent and never invoked.
    pub lost: u64,
    /// Invocations beyond the first, summed over messages.
    pub duplicated: u64,
    /// Delay from the send to the first invocation, ms: median.
    pub p50_ms: f64,
    /// ... and 99th percentile.
    pub p99_ms: f64,
    /// Invoked (the first time) after `stopped`: messages that were waiting somewhere (broker,
    /// reader or its buffers) when the producer stopped.
    pub waiting_at_stop: u64,
}

/// Tallies `delivered` against `sent`; `stopped` is when the producer stopped (unix seconds).
pub fn tally(sent: &Sent, delivered: &[Delivered], stopped: f64) -> Tally {
    let mut seen: HashMap<u64, u32> = HashMap::new();
    let mut delays = Vec::new();
    let mut waiting = 0;
    for d in delivered {
        let Some(at) = sent.get(&d.hash) else { continue };
        let n = seen.entry(d.hash).or_default();
        *n += 1;
        if *n == 1 {
            delays.push((d.invoked_at - at) * 1000.0);
            if d.invoked_at > stopped {
                waiting += 1;
            }
        }
    }
    delays.sort_by(f64::total_cmp);
    let q = |p: f64| if delays.is_empty() { 0.0 } else { delays[((delays.len() - 1) as f64 * p).round() as usize] };
    let once = seen.len() as u64;
    Tally {
        sent: sent.len() as u64,
        delivered: once,
        lost: sent.len() as u64 - once,
        duplicated: seen.values().map(|&n| u64::from(n - 1)).sum(),
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        waiting_at_stop: waiting,
    }
}

/// Takes what arrives on `rx` into `out` until nothing has for `quiet`: true; or until `limit`
/// has passed: false (the reader was still delivering).
pub async fn drain(
    rx: &mut mpsc::UnboundedReceiver<Delivered>,
    out: &mut Vec<Delivered>,
    quiet: Duration,
    limit: Duration,
) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        match tokio::time::timeout(quiet, rx.recv()).await {
            Ok(Some(d)) => out.push(d),
            _ => return true,
        }
    }
    false
}

/// This process's resident memory, now and at its peak, KiB (`VmRSS`, `VmHWM`).
pub fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Sets this process's peak resident memory back to what it holds now (Linux: writing 5 to
/// `/proc/self/clear_refs` "resets the peak resident set size ("high water mark") to the
/// process's current value", proc(5)); returns that value, KiB.
pub fn reset_peak_memory() -> u64 {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        eprintln!("the peak memory cannot be reset here ({e}): it is the process's whole life's");
    }
    memory_kib().0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(body: &str, at: f64) -> Delivered {
        Delivered { hash: xxhash_rust::xxh3::xxh3_64(body.as_bytes()), invoked_at: at }
    }

    #[test]
    fn a_tally_counts_each_message_once_and_its_duplicates_and_what_waited() {
        let sent: Sent = (0..4).map(|n| (xxhash_rust::xxh3::xxh3_64(body(n, 20).as_bytes()), 100.0)).collect();
        let delivered = vec![
            d(&body(0, 20), 100.010),
            d(&body(1, 20), 100.020),
            d(&body(1, 20), 100.500),
            d(&body(2, 20), 102.0),
            d("not sent", 100.0),
        ];
        let t = tally(&sent, &delivered, 101.0);
        assert_eq!((t.sent, t.delivered, t.lost, t.duplicated, t.waiting_at_stop), (4, 3, 1, 1, 1));
        assert!((t.p50_ms - 20.0).abs() < 1e-6, "{t:?}");
        assert!((t.p99_ms - 2000.0).abs() < 1e-6, "{t:?}");
    }

    #[test]
    fn bodies_have_their_number_and_size() {
        assert_eq!(body(7, 20), "000000000007xxxxxxxx");
        assert_eq!(body(7, 0).len(), 12);
    }

    #[tokio::test(start_paused = true)]
    async fn the_producer_keeps_its_rate_and_stops_after_its_seconds() {
        let mut calls = 0;
        let (sent, took) = produce(500, 2, 16, Duration::from_millis(10), |bodies| {
            calls += 1;
            assert_eq!(bodies.len(), 5);
            async {}
        })
        .await;
        assert_eq!(sent.len(), 1000);
        assert_eq!(calls, 200);
        assert!((achieved_rate(&sent, took) - 500.0).abs() < 5.0);
    }
}
