//! # pushpull-local
//!
//! The commands users type (`pushpull-local run`, `serve`, `esm`) and the sample pipeline's
//! driver ([`pipeline`]: provisioning, expected totals, [`observed`] metrics and alarms, the
//! [`report`]'s charts). The local AWS it drives is `pushpull-emulator`, re-exported here under
//! the same paths.
#![warn(missing_docs)]

pub use pushpull_emulator::{
    alarms, async_invoke, cloudwatch, http2, invoke, localstack, mapping, realism, relay, runtime_api, template,
};

pub mod observed;
pub mod pipeline;
pub mod progress;
pub mod report;
