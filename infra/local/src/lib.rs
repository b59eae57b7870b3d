//! # pushpull-local
//!
//! Plays AWS's part on a laptop: [`runtime_api::FunctionHost`] runs a function binary behind the
//! Lambda Runtime API, and [`localstack`] talks to LocalStack (S3, Kinesis, SQS) on 127.0.0.1.
//! The integration tests and `make run` are built from these.
#![warn(missing_docs)]

pub mod alarms;
pub mod async_invoke;
pub mod cloudwatch;
pub mod http2;
pub mod invoke;
pub mod localstack;
pub mod mapping;
pub mod observed;
pub mod pipeline;
pub mod progress;
pub mod realism;
pub mod report;
pub mod runtime_api;
pub mod template;
