#![cfg_attr(
    all(
        feature = "runtime",
        feature = "kinesis",
        feature = "sqs",
        feature = "dynamodb",
        feature = "kafka",
        feature = "push",
        feature = "s3",
        feature = "kinesis-sink"
    ),
    doc = include_str!("../README.md")
)]
//! With the features its examples use (`full` has them; docs.rs builds with every feature), the
//! crate's README comes first on this page: a handler of each kind, each in a screen. The modules:
//!
//! | module | feature | what it does |
//! |---|---|---|
//! | [`batch`] | core | batching by count, bytes and linger time; per-key ordered batches |
//! | [`checkpoint`] | core | typed checkpoints with compare-and-swap over the `CheckpointStore` trait |
//! | [`store`] | core (`s3` for `s3://`) | `file://` or `s3://` storage with conditional writes |
//! | [`lines`] | core | NDJSON framing of a byte stream in bounded memory |
//! | [`quarantine`] | core | where bad input goes, with its reason |
//! | [`config`] | core | settings from environment variables, every problem reported at once |
//! | [`invocation`] | core | request id and time left |
//! | [`error`] | core | error chains on one line, panic messages |
//! | [`pull`] | core; `kinesis`, `dynamodb`, `sqs`, `kafka`, `rabbitmq` | one handler per record, partial batch responses, deadlines; sequence numbers, fields picked from JSON in one pass, work on every vCPU |
//! | [`kinesis_event`] | `kinesis` | Kinesis events read without copying |
//! | [`aggregation`] | `aggregation` (in `kinesis`, `push`) | KPL aggregated records, packed and unpacked |
//! | [`s3_notification`] | `push` | S3 notifications: test events, URL-decoded keys, sequencers |
//! | [`push`] | `push` | S3 object → records: line handler, leases, checkpoints, resume |
//! | [`sink`] | `push` (`kinesis-sink`, `kafka-sink`, `rabbitmq-sink`, `sqs-sink`) | records to a stream, topic or queue with partial-failure resends; the shard a partition key maps to |
//! | [`object_reader`] | `s3` | an S3 object body that resumes with ranged reads |
//! | [`aws`] | `s3`, `kinesis-sink`, `sqs-sink` | AWS clients built once; SDK errors classified by kind |
//! | [`message_name`] | core | a queue message's name: the object and line it came from |
//! | [`lambda`] | `runtime` | `run_raw` and one-closure batch runners |
//! | [`metrics`] | core | the metrics the library records, through the `metrics` facade |
//! | [`emf`] | `emf` (in `runtime`) | CloudWatch Embedded Metric Format, one document per invocation |
//! | [`telemetry`] | `runtime` | structured JSON logs with Powertools' keys |
#![warn(missing_docs)]

// Re-exported so that a function needs `pushpull` and tokio alone in its Cargo.toml: derive
// with `#[derive(pushpull::serde::Deserialize)]` and `#[serde(crate = "pushpull::serde")]`.
#[cfg(feature = "runtime")]
pub use lambda_runtime;
pub use serde;
pub use serde_json;
pub use tracing;

#[cfg(feature = "push")]
mod backoff;
pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod invocation;
pub mod lines;
pub mod message_name;
pub mod metrics;
mod ndjson;
mod parallel;
pub mod pull;
pub mod quarantine;
mod sequence;
pub mod store;

#[cfg(feature = "aggregation")]
pub mod aggregation;
#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "emf")]
pub mod emf;
#[cfg(feature = "kinesis")]
pub mod kinesis_event;
#[cfg(feature = "runtime")]
pub mod lambda;
#[cfg(feature = "s3")]
pub mod object_reader;
#[cfg(feature = "push")]
pub mod push;
#[cfg(feature = "push")]
pub mod s3_notification;
#[cfg(feature = "push")]
mod shard_map;
#[cfg(feature = "push")]
pub mod sink;
#[cfg(feature = "runtime")]
pub mod telemetry;
