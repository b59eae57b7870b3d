//! # pushpull-emulator
//!
//! The local AWS that `pushpull-local` runs, apart from any sample: [`runtime_api::FunctionHost`]
//! runs a function binary behind the Lambda Runtime API, [`invoke`] serves and calls the Invoke
//! API, [`mapping`] plays Lambda's event source mappings (one core for every source; Kinesis on
//! it), [`async_invoke`] Lambda's asynchronous invocation of S3 events, [`realism`] AWS's limits,
//! faults and IAM in front of LocalStack ([`localstack`]), [`template`] reads the SAM template,
//! [`cloudwatch`] and [`alarms`] what CloudWatch would hold and alarm on. It depends on nothing
//! of the sample pipeline under `functions/`.
#![warn(missing_docs)]

pub mod alarms;
pub mod async_invoke;
pub mod cloudwatch;
pub mod http2;
pub mod invoke;
pub mod localstack;
pub mod mapping;
pub mod realism;
pub mod relay;
pub mod runtime_api;
pub mod template;
