//! Work on every vCPU the function has: a large batch cut into parts that the calling thread and
//! helper threads take in turn.
//!
//! Lambda gives a function 2 vCPUs from 1,769 MB of memory (6 at 10,240 MB). Reading a
//! 10,000-record Kinesis event and checking its records take a few milliseconds each on one, so
//! both are cut into parts ([`each_part`]) that the threads take until none is left.
//!
//! The helpers are the threads of one [`rayon_core`] pool, started once ([`start`]), not a thread
//! per batch: on Firecracker, the VM Lambda runs on, a thread started for a batch on an idle vCPU
//! often begins as late as reading the whole batch takes, where a pooled helper that is woken
//! starts within microseconds (BENCHMARKS.md, W1). A helper that has just worked stays awake for
//! [`LINGER`], asking the pool for work and yielding its vCPU between asks, so that the next part
//! of the same invocation (the records' check follows the event's read) finds it awake; after
//! that it sleeps as rayon's threads do. The calling thread waits for the helpers' last parts
//! awake, too (a part is a fraction of a millisecond).
//!
//! Why 1 ms: it covers the gap between a batch's read and its check, and a helper is asleep by
//! the time the next event arrives, so it takes no CPU from that event's transfer (the Runtime
//! API shares the vCPUs); BENCHMARKS.md, W1, has the lingers measured.
// Parts of it serve only the `kinesis` feature.
#![cfg_attr(not(feature = "kinesis"), allow(dead_code))]
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a helper stays awake after its last part.
pub const LINGER: Duration = Duration::from_millis(1);

/// How many threads a batch may be worked on at once: the vCPUs this process may use. Read once:
/// the standard library reads cgroup files every time it is asked.
///
pub fn threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, usize::from))
}

/// The helpers: one thread fewer than [`threads`], none on one vCPU (or when they cannot start).
fn pool() -> Option<&'static rayon_core::ThreadPool> {
    static POOL: OnceLock<Option<rayon_core::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        let helpers = threads().saturating_sub(1);
        if helpers == 0 {
            return None;
        }
        rayon_core::ThreadPoolBuilder::new()
            .num_threads(helpers)
            .thread_name(|i| format!("pushpull-helper-{i}"))
            .build()
            .inspect_err(|e| tracing::warn!(error = %e, "helper threads not started: one thread works alone"))
            .ok()
    })
    .as_ref()
}

/// Starts the helpers now instead of at the first [`each_part`]: a function does this at init, so
/// that its first batch does not wait for a thread to start (the pull runners of
/// `pushpull::lambda` do; a function on `run_raw` calls it in `main`).
///
pub fn start() {
    let _ = pool();
}

/// Calls `part(i)` once for every `i` in `0..parts`, on the calling thread and on up to
/// `threads - 1` helpers at once, each thread taking the next `i` not yet taken; returns when
/// every call has returned. With `threads` 1, or one part, everything runs on the calling thread.
/// A panic in a call is raised again here, after the other calls return.
///
/// Results go where `part` puts them (a slot per part, say), in any order; a part may look at a
/// flag of the caller's to return at once when an earlier one failed.
///
pub fn each_part(threads: usize, parts: usize, part: impl Fn(usize) + Sync) {
    let helpers = match pool() {
        Some(pool) => threads.min(parts).saturating_sub(1).min(pool.current_num_threads()),
        None => 0,
    };
    let (Some(pool), 1..) = (pool(), helpers) else {
        (0..parts).for_each(part);
        return;
    };
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let work = || {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= parts {
                return;
            }
            // Counted even when the part panics, so that the caller's wait below ends.
            let _count = Counted(&done);
            part(i);
        }
    };
    pool.in_place_scope(|scope| {
        for _ in 0..helpers {
            scope.spawn(|_| work());
        }
        work();
        // The last parts are a helper's: wait for them awake (a part is a fraction of a
        // millisecond) rather than asleep, which costs a late wake-up on an idle vCPU.
        while done.load(Ordering::Acquire) < parts {
            std::hint::spin_loop();
        }
    });
    linger(pool, helpers);
}

/// Increments its counter when dropped.
struct Counted<'a>(&'a AtomicUsize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// Helpers lingering now.
static LINGERING: AtomicUsize = AtomicUsize::new(0);

/// Until when helpers linger: nanoseconds since [`epoch`].
static LINGER_UNTIL: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn since_epoch() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Keeps `helpers` helpers awake until [`LINGER`] from now (see the module documentation).
fn linger(pool: &'static rayon_core::ThreadPool, helpers: usize) {
    LINGER_UNTIL.fetch_max(since_epoch().saturating_add(LINGER.as_nanos() as u64), Ordering::Relaxed);
    let lingering = LINGERING.load(Ordering::Relaxed);
    for _ in lingering..helpers {
        LINGERING.fetch_add(1, Ordering::Relaxed);
        pool.spawn(move || {
            while since_epoch() < LINGER_UNTIL.load(Ordering::Relaxed) {
                if pool.yield_now() != Some(rayon_core::Yield::Executed) {
                    std::thread::yield_now();
                }
            }
            LINGERING.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_start_and_each_part_run_every_part() {
        assert!(threads() >= 1);
        start();
        use std::sync::Mutex;
        let sums: Vec<Mutex<u64>> = (0..8).map(|_| Mutex::new(0)).collect();
        each_part(2, sums.len(), |i| {
            *sums[i].lock().unwrap() = (i as u64 * 1000..(i as u64 + 1) * 1000).sum();
        });
        let total: u64 = sums.iter().map(|s| *s.lock().unwrap()).sum();
        assert_eq!(total, (0..8000).sum::<u64>());
    }
    use std::sync::Mutex;

    #[test]
    fn every_part_runs_once_on_any_number_of_threads() {
        for threads in 1..=4 {
            for parts in [0, 1, 2, 7, 64] {
                let seen: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
                each_part(threads, parts, |i| {
                    seen[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1), "{threads} threads, {parts} parts");
            }
        }
    }

    /// With a helper, two parts run at the same time: each waits for the other's word (with a
    /// timeout, so that a missing helper fails the test instead of hanging it).
    #[test]
    fn a_helper_takes_parts_while_the_caller_works() {
        if threads() < 2 {
            eprintln!("one vCPU: no helper to test");
            return;
        }
        // Part 0 tells part 1 on the first channel, part 1 tells part 0 on the second.
        let (zero_to_one, one_hears) = std::sync::mpsc::channel::<()>();
        let (one_to_zero, zero_hears) = std::sync::mpsc::channel::<()>();
        let senders = [Mutex::new(zero_to_one), Mutex::new(one_to_zero)];
        let receivers = [Mutex::new(zero_hears), Mutex::new(one_hears)];
        let met = AtomicUsize::new(0);
        each_part(2, 2, |i| {
            senders[i].lock().unwrap().send(()).unwrap();
            let got = receivers[i].lock().unwrap().recv_timeout(std::time::Duration::from_secs(10));
            if got.is_ok() {
                met.fetch_add(1, Ordering::Relaxed);
            }
        });
        assert_eq!(met.load(Ordering::Relaxed), 2, "both parts ran at once");
    }

    #[test]
    fn a_panicking_part_is_raised_after_the_others_return() {
        let ran = Mutex::new(Vec::new());
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            each_part(2, 6, |i| {
                if i == 1 {
                    panic!("part 1");
                }
                ran.lock().unwrap().push(i);
            })
        }));
        assert!(outcome.is_err(), "the panic is raised in the caller");
        // The thread whose part panicked stops; the other goes on to the end.
        let ran = ran.into_inner().unwrap();
        assert!(!ran.contains(&1) && ran.len() >= 4, "{ran:?}");
    }
}
