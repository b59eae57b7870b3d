//! Exponential backoff: one formula for the library's retry loops (PutRecords resends).
use std::time::Duration;

/// `base * 2^retry`, capped at `max`; with jitter, drawn uniformly from the upper half of that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    jitter: bool,
}

impl Backoff {
    /// Starts at `base`, doubles each retry, never above `max`; no jitter.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff { base, max: max.max(base), jitter: false }
    }

    /// The same, each delay drawn from its upper half (so that many clients retrying at once
    /// spread out).
    pub fn with_jitter(mut self) -> Self {
        self.jitter = true;
        self
    }

    /// The delay before retry number `retry` (0 for the first retry).
    pub fn delay(&self, retry: u32) -> Duration {
        let exp = self.base.saturating_mul(1u32 << retry.min(16)).min(self.max);
        if self.jitter { exp.mul_f64(0.5 + fastrand::f64() / 2.0) } else { exp }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_jitter_stays_in_the_upper_half() {
        use std::time::Duration;

        let b = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        assert_eq!(b.delay(0), Duration::from_millis(50));
        assert_eq!(b.delay(3), Duration::from_millis(400));
        assert_eq!(b.delay(30), Duration::from_secs(5), "capped");
        let jittered = b.with_jitter().delay(3);
        assert!(jittered >= Duration::from_millis(200) && jittered <= Duration::from_millis(400));
    }
}
