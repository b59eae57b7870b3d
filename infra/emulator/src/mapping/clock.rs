//! The mapping's clocks, both on tokio's time, so that every timer of the mapping (the batching
//! window, retry backoff, record age, tumbling windows, lease renewal and failover) runs under
//! tokio's paused time in tests, and a test of an hour-long rule takes milliseconds.
//!
//! - [`Instant`] is tokio's monotonic instant (paused and advanced with the runtime's clock).
//! - [`now_unix`] is wall time as unix seconds: the system clock, plus however far tokio's clock
//!   has been advanced past the monotonic clock (nothing, unless time is paused). Record arrival
//!   times come from the broker's wall clock, and a host that was suspended, or whose clock was
//!   stepped, still agrees with them.
use std::time::{SystemTime, UNIX_EPOCH};

pub use tokio::time::Instant;

/// Unix seconds now, on tokio's clock (see the module's docs).
pub fn now_unix() -> f64 {
    let wall = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let (tokio_now, std_now) = (Instant::now().into_std(), std::time::Instant::now());
    // Paused (tests): tokio's clock runs apart from the monotonic one; otherwise they agree.
    let advanced = match tokio_now.checked_duration_since(std_now) {
        Some(ahead) => ahead.as_secs_f64(),
        None => -std_now.duration_since(tokio_now).as_secs_f64(),
    };
    wall + advanced
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
