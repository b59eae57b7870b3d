//! # pushpull
//!
//! The parts a Rust function behind an AWS Lambda event source needs, for both ways Lambda gets
//! events: **push** (S3 invokes the function when an object lands) and **pull** (an event
//! source mapping polls Kinesis and invokes the function with batches).
//!
//! | module | what it does |
//! |---|---|
//! | [`s3_notification`] | S3 notifications: test events, URL-decoded keys, sequencers |
//! | [`lines`] | NDJSON framing of a byte stream in bounded memory |
//! | [`ndjson`] | checking a line and picking its partition key in one pass |
//! | [`object_reader`] | an S3 object body that resumes with ranged reads when the connection drops |
//! | [`batch`] | batching by count, bytes and linger time |
//! | [`kinesis_producer`] | PutRecords with partial-failure resends and backoff |
//! | [`push`] | the push pipeline: S3 object → Kinesis records, bad lines quarantined |
//! | [`kinesis_event`] | Kinesis events read without copying; 128-bit sequence numbers |
//! | [`pull`] | record-by-record processing and the partial batch response |
//! | [`store`] | `s3://` or `file://` storage with compare-and-swap writes |
//! | [`checkpoint`] | typed checkpoints with compare-and-swap: the `CheckpointStore` trait |
//! | [`quarantine`] | where bad input goes, with its reason |
//! | [`rollup`] | the sample pull function: group, count, sum |
//! | [`config`] | settings from environment variables, checked at cold start |
//! | [`aws`] | AWS clients built once, SDK errors made readable |
//! | [`telemetry`] | structured JSON logs |
//! | [`lambda`] | `run_raw`: a handler that reads the payload where it lies (no copy) |
#![warn(missing_docs)]

pub mod aws;
pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod kinesis_event;
pub mod kinesis_producer;
pub mod lambda;
pub mod lines;
pub mod ndjson;
pub mod object_reader;
pub mod pull;
pub mod push;
pub mod quarantine;
pub mod rollup;
pub mod s3_notification;
pub mod store;
pub mod telemetry;
