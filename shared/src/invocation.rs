//! Who is invoking and until when: the request id and the time left before the function times
//! out, for handlers that stop in time (push checkpoints and fails so that the retry resumes;
//! pull reports the records it did not reach as failures).
//!
//! The deadline is kept as a `tokio::time::Instant`, so code that races it can be tested under
//! tokio's paused time.
//!
//! ```
//! use std::time::Duration;
//! use pushpull::invocation::Invocation;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
//! let invocation = Invocation::new("req-1").with_time_left(Duration::from_secs(30));
//! tokio::time::advance(Duration::from_secs(10)).await;
//! assert_eq!(invocation.remaining(), Some(Duration::from_secs(20)));
//! assert!(!invocation.out_of_time(Duration::from_secs(5)));
//! tokio::time::advance(Duration::from_secs(16)).await;
//! assert!(invocation.out_of_time(Duration::from_secs(5)));
//! # });
//! ```
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Below this, a `Lambda-Runtime-Deadline-Ms` cannot be a Unix time in milliseconds: it would be
/// before 2001-09-09. AWS defines the header as "The date that the function times out in Unix time
/// milliseconds. For example, 1542409706888." (Lambda Developer Guide, "Using the Lambda runtime
/// API for custom runtimes", Next invocation). `cargo lambda watch` 1.9.2 sends the function's
/// timeout there instead (`600000`), which read as AWS defines it is a deadline in 1970.
const UNIX_MS_FLOOR: u64 = 1_000_000_000_000;

/// When the invocation times out, from the Runtime API's `Lambda-Runtime-Deadline-Ms` (the
/// Lambda context's `deadline`) received at `now`.
///
/// A value that cannot be a Unix time in milliseconds (before 2001-09-09) is read as the time
/// left from `now`, with a warning the first time: that is what `cargo lambda watch` 1.9.2 means
/// by it (it sends the timeout, `600000`). Read as AWS defines it, every invocation would start
/// past its deadline and stop before doing anything.
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use pushpull::invocation::deadline_of;
///
/// let now = UNIX_EPOCH + Duration::from_millis(1_796_616_629_000);
/// // As Lambda sends it: a Unix time in milliseconds.
/// assert_eq!(deadline_of(1_796_616_659_000, now), now + Duration::from_secs(30));
/// // As cargo lambda watch sends it: the time left.
/// assert_eq!(deadline_of(600_000, now), now + Duration::from_secs(600));
/// ```
pub fn deadline_of(header_ms: u64, now: SystemTime) -> SystemTime {
    if header_ms >= UNIX_MS_FLOOR {
        return UNIX_EPOCH + Duration::from_millis(header_ms);
    }
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            deadline_ms = header_ms,
            "Lambda-Runtime-Deadline-Ms is not a Unix time in milliseconds (cargo lambda watch sends the timeout there); reading it as the time left"
        )
    });
    now + Duration::from_millis(header_ms)
}

/// One invocation: cheap to clone (shared), handed to every record handler that asks for it.
#[derive(Debug, Clone)]
pub struct Invocation {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    request_id: String,
    deadline: Option<Instant>,
    #[cfg(feature = "runtime")]
    context: Option<lambda_runtime::Context>,
}

impl Invocation {
    /// An invocation with no deadline (tools, benchmarks, tests).
    pub fn new(request_id: impl Into<String>) -> Self {
        Invocation {
            inner: Arc::new(Inner {
                request_id: request_id.into(),
                deadline: None,
                #[cfg(feature = "runtime")]
                context: None,
            }),
        }
    }

    /// An invocation with no deadline; the same as [`Invocation::new`].
    pub fn unbounded(request_id: impl Into<String>) -> Self {
        Self::new(request_id)
    }

    /// The same invocation, timing out `left` from now.
    pub fn with_time_left(self, left: Duration) -> Self {
        self.with_deadline(Some(Instant::now() + left))
    }

    /// The same invocation with this deadline.
    pub fn with_deadline(self, deadline: Option<Instant>) -> Self {
        let inner = Arc::try_unwrap(self.inner).unwrap_or_else(|shared| Inner {
            request_id: shared.request_id.clone(),
            deadline: shared.deadline,
            #[cfg(feature = "runtime")]
            context: shared.context.clone(),
        });
        Invocation { inner: Arc::new(Inner { deadline, ..inner }) }
    }

    /// From the Lambda context: its request id and deadline (read by [`deadline_of`]).
    #[cfg(feature = "runtime")]
    pub fn from_context(ctx: &lambda_runtime::Context) -> Self {
        let left = deadline_of(ctx.deadline, SystemTime::now()).duration_since(SystemTime::now()).unwrap_or_default();
        Invocation {
            inner: Arc::new(Inner {
                request_id: ctx.request_id.clone(),
                deadline: Some(Instant::now() + left),
                context: Some(ctx.clone()),
            }),
        }
    }

    /// The Lambda context, when the invocation came from the Lambda runtime.
    #[cfg(feature = "runtime")]
    pub fn context(&self) -> Option<&lambda_runtime::Context> {
        self.inner.context.as_ref()
    }

    /// The request id (the owner name of the checkpoints this invocation writes).
    pub fn request_id(&self) -> &str {
        &self.inner.request_id
    }

    /// When the invocation times out, if it does.
    pub fn deadline(&self) -> Option<Instant> {
        self.inner.deadline
    }

    /// Time left before the invocation times out (zero once past it); `None` without a deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.inner.deadline.map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// When to stop so that `margin` is left: the deadline less the margin.
    pub fn stop_at(&self, margin: Duration) -> Option<Instant> {
        self.inner.deadline.map(|d| d.checked_sub(margin).unwrap_or(d))
    }

    /// Whether less than `margin` is left.
    pub fn out_of_time(&self, margin: Duration) -> bool {
        self.stop_at(margin).is_some_and(|at| Instant::now() >= at)
    }
}
