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
use std::time::Duration;

use tokio::time::Instant;

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

    /// From the Lambda context: its request id and deadline.
    #[cfg(feature = "runtime")]
    pub fn from_context(ctx: &lambda_runtime::Context) -> Self {
        let left = ctx.deadline().duration_since(std::time::SystemTime::now()).unwrap_or_default();
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
