//! The mapping's clocks, both on tokio's time, so that every timer of the mapping (the batching
//! window, retry backoff, record age, tumbling windows, lease renewal and failover) runs under
//! tokio's paused time in tests, and a test of an hour-long rule takes milliseconds.
//!
//! - [`Instant`] is tokio's monotonic instant (paused and advanced with the runtime's clock).
//! - [`now_unix`] is wall time as unix seconds: the system clock read once, then moved on by
//!   tokio's monotonic clock. Record arrival times come from the broker's wall clock, so the two
//!   agree to within the drift of a run (Kinesis stamps arrival with the second's precision the
//!   mapping needs for ageing and windows).
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

pub use tokio::time::Instant;

struct Base {
    unix: f64,
    at: std::time::Instant,
}

fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| Base {
        unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
        at: std::time::Instant::now(),
    })
}

/// Unix seconds now, on tokio's clock (see the module's docs).
pub fn now_unix() -> f64 {
    let b = base();
    let now = Instant::now().into_std();
    match now.checked_duration_since(b.at) {
        Some(d) => b.unix + d.as_secs_f64(),
        None => b.unix - b.at.duration_since(now).as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn unix_time_moves_with_paused_time() {
        let t0 = now_unix();
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        assert!((t0 - wall).abs() < 5.0, "close to the system clock: {t0} against {wall}");
        tokio::time::advance(Duration::from_secs(3600)).await;
        let moved = now_unix() - t0;
        assert!((moved - 3600.0).abs() < 0.01, "an hour of paused time: {moved}");
    }
}
