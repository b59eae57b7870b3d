//! Running a function whose handler reads the invocation payload where it lies.
//!
//! `lambda_runtime::run` hands a handler an owned, deserialized payload. For large batches that
//! costs: taking the payload as `Box<RawValue>` to parse it borrowed later copies and re-scans
//! megabytes.
//! [`run_raw`] gives the handler the body `Bytes` as received, to parse with borrowing types
//! such as [`crate::kinesis_event::KinesisEvent`], and keeps everything else of the official
//! runtime: the Runtime API client and errors reported as `Diagnostic`s. A panic in the handler
//! becomes a function error, as with `lambda_runtime::run`. Around each invocation it sets what
//! log lines say about it ([`crate::telemetry`]: request id, trace id, cold start) and, with the
//! `emf` feature, writes the invocation's metrics ([`crate::emf`]) before posting the response.
//!
//! It is built as a tower layer in front of the runtime's own services: the layer runs the
//! handler on the raw invocation, then hands the runtime a small invocation whose payload is the
//! outcome, which a pass-through handler returns.
//!
//! ```no_run
//! use pushpull::lambda::run_raw;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), pushpull::lambda::Error> {
//!     run_raw(|body: bytes::Bytes, _context: pushpull::lambda_runtime::Context| async move {
//!         // The payload as received, parsed borrowed (with the `kinesis` feature,
//!         // `pushpull::kinesis_event::KinesisEvent::from_slice(&body)`).
//!         let event: serde_json::Value = serde_json::from_slice(&body)?;
//!         let records = event["Records"].as_array().map_or(0, Vec::len);
//!         Ok::<_, pushpull::lambda::Error>(serde_json::json!({ "records": records }))
//!     })
//!     .await
//! }
//! ```
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use futures_util::FutureExt;
use lambda_runtime::tower::{Layer, Service, ServiceExt};
use lambda_runtime::{Context, Diagnostic, LambdaEvent, LambdaInvocation, Runtime, service_fn};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Outcome<T> {
    Ok(T),
    Err(Diagnostic),
}

/// What a function's `main` returns: `lambda_runtime::Error`.
pub type Error = lambda_runtime::Error;

/// Runs `handler` for every invocation with the raw payload; see the module documentation.
/// Sets up JSON logs ([`crate::telemetry::init`]) unless a subscriber is set already; every
/// runner of this module runs on it.
pub async fn run_raw<H, Fut, R, E>(handler: H) -> Result<(), lambda_runtime::Error>
where
    H: Fn(Bytes, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
    R: Serialize,
    E: Into<Diagnostic>,
{
    crate::telemetry::init();
    let pass_through = service_fn(|event: LambdaEvent<Outcome<Box<RawValue>>>| async move {
        match event.payload {
            Outcome::Ok(response) => Ok(response),
            Outcome::Err(diagnostic) => Err(diagnostic),
        }
    });
    #[cfg(feature = "emf")]
    if let Err(e) = crate::emf::init_from_env() {
        tracing::warn!(error = %e, "metrics are off");
    }
    Runtime::new(pass_through).layer(RawLayer { handler: Arc::new(handler) }).run().await
}

/// False until the process's first invocation starts.
static INVOKED: AtomicBool = AtomicBool::new(false);

/// Marks the start of an invocation for logs ([`crate::telemetry`]) and metrics (the cold start).
fn begin_invocation(context: &Context) {
    let cold_start = !INVOKED.swap(true, Ordering::Relaxed);
    if cold_start {
        metrics::counter!(crate::metrics::COLD_START).increment(1);
    }
    crate::telemetry::begin_invocation(crate::telemetry::InvocationLog {
        request_id: context.request_id.clone(),
        function_arn: context.invoked_function_arn.clone(),
        xray_trace_id: context.xray_trace_id.clone(),
        cold_start,
    });
}

/// The end of an invocation's handler: its metrics are written before the response is posted.
fn end_invocation(context: &Context) {
    #[cfg(feature = "emf")]
    crate::emf::flush(Some(&context.request_id));
    #[cfg(not(feature = "emf"))]
    let _ = context;
    crate::telemetry::end_invocation();
}

struct RawLayer<H> {
    handler: Arc<H>,
}

impl<S, H> Layer<S> for RawLayer<H> {
    type Service = RawService<S, H>;
    fn layer(&self, inner: S) -> Self::Service {
        RawService { inner, handler: self.handler.clone() }
    }
}

struct RawService<S, H> {
    inner: S,
    handler: Arc<H>,
}

impl<S, H, Fut, R, E> Service<LambdaInvocation> for RawService<S, H>
where
    S: Service<LambdaInvocation, Response = (), Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
    H: Fn(Bytes, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
    R: Serialize,
    E: Into<Diagnostic>,
{
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, invocation: LambdaInvocation) -> Self::Future {
        let handler = self.handler.clone();
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let LambdaInvocation { parts, body, context } = invocation;
            begin_invocation(&context);
            let outcome = match AssertUnwindSafe(handler(body, context.clone())).catch_unwind().await {
                Ok(Ok(response)) => serde_json::to_vec(&Outcome::Ok(response)),
                Ok(Err(e)) => serde_json::to_vec(&Outcome::<()>::Err(e.into())),
                Err(panic) => {
                    let message = crate::error::panic_message(&*panic);
                    tracing::error!(message, "handler panicked");
                    serde_json::to_vec(&Outcome::<()>::Err(Diagnostic {
                        error_type: "Runtime.Panic".into(),
                        error_message: format!("handler panicked: {message}"),
                    }))
                }
            };
            let outcome = match outcome {
                Ok(bytes) => bytes,
                Err(e) => serde_json::to_vec(&Outcome::<()>::Err(Diagnostic {
                    error_type: "Runtime.SerializationError".into(),
                    error_message: e.to_string(),
                }))
                .unwrap_or_default(),
            };
            end_invocation(&context);
            inner.ready().await?;
            inner.call(LambdaInvocation { parts, body: Bytes::from(outcome), context }).await
        })
    }
}

/// The invocation failed before any record was handled (the payload is not the source's event, or
/// a record cannot be named in a response): the whole batch is retried.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
#[non_exhaustive]
pub struct BatchError {
    /// What went wrong.
    pub message: String,
}

impl From<BatchError> for Diagnostic {
    fn from(e: BatchError) -> Self {
        tracing::error!(error = %e.message, "invocation failed");
        Diagnostic { error_type: "BatchError".into(), error_message: e.message }
    }
}

#[cfg(any(feature = "kinesis", feature = "sqs", feature = "dynamodb", feature = "kafka", feature = "rabbitmq"))]
fn batch_error(e: impl std::fmt::Display) -> BatchError {
    BatchError { message: e.to_string() }
}

#[cfg(any(feature = "kinesis", feature = "sqs", feature = "dynamodb", feature = "kafka", feature = "rabbitmq"))]
/// Logs a batch's outcome: one line, plus one per failed record.
#[cfg(any(feature = "kinesis", feature = "sqs", feature = "dynamodb", feature = "kafka", feature = "rabbitmq"))]
fn log_result(result: &crate::pull::BatchResult) {
    for f in &result.failures {
        tracing::warn!(item = %f.item_identifier, reason = %f.reason, "record failed");
    }
    tracing::info!(
        processed = result.processed,
        failed = result.failures.len(),
        unprocessed = result.unprocessed.len(),
        hit_deadline = result.hit_deadline(),
        "batch done"
    );
}

/// Runs `process` for every invocation: the payload, the invocation, and `options` for it (with
/// the deadline set); records the batch's metrics (what `process` measured before it ran, with
/// what it processed), logs its result and answers its partial batch response.
#[cfg(any(feature = "kinesis", feature = "sqs", feature = "dynamodb", feature = "kafka", feature = "rabbitmq"))]
async fn run_batches<P, Fut, R>(options: crate::pull::Options, process: P) -> Result<(), lambda_runtime::Error>
where
    P: Fn(Bytes, crate::invocation::Invocation, crate::pull::Options) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(crate::pull::BatchResult, R, crate::metrics::PullBatch), BatchError>> + Send + 'static,
    R: Serialize,
{
    let process = Arc::new(process);
    // Batches of 512 KiB or more are read on every vCPU: the helpers start now, not in the first.
    crate::parallel::start();
    run_raw(move |body: Bytes, context: Context| {
        let process = process.clone();
        async move {
            let invocation = crate::invocation::Invocation::from_context(&context);
            let options = options.for_invocation(&invocation);
            let (result, response, mut metrics) = process(body, invocation, options).await?;
            metrics.processed = result.processed;
            metrics.failed = result.failures.len() + result.unprocessed.len();
            metrics.record();
            log_result(&result);
            Ok::<_, BatchError>(response)
        }
    })
    .await
}

/// A Kinesis function in one closure: every record of every batch goes to `handler` with the
/// invocation (request id, time left, Lambda context), as [`crate::pull::Options`] say; the
/// function answers the partial batch response.
///
/// ```no_run
/// use std::time::Duration;
/// use pushpull::pull::Options;
///
/// #[derive(pushpull::serde::Deserialize)]
/// #[serde(crate = "pushpull::serde")]
/// struct Order { user: String, amount: f64 }
///
/// #[tokio::main]
/// async fn main() -> Result<(), pushpull::lambda::Error> {
///     let options = Options::default().per_key(8).stop_before_deadline(Duration::from_secs(2));
///     pushpull::lambda::run_kinesis(options, |record, _invocation| async move {
///         let order: Order = record.json()?; // a record that does not parse fails alone
///         pushpull::tracing::info!(user = order.user, amount = order.amount, "order");
///         Ok::<_, pushpull::pull::DecodeError>(())
///     })
///     .await
/// }
/// ```
#[cfg(feature = "kinesis")]
pub async fn run_kinesis<H, Fut, E>(options: crate::pull::Options, handler: H) -> Result<(), lambda_runtime::Error>
where
    H: Fn(crate::pull::kinesis::OwnedRecord, crate::invocation::Invocation) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: std::fmt::Display,
{
    let handler = Arc::new(handler);
    run_batches(options, move |body, invocation, options| {
        let handler = handler.clone();
        async move {
            // On every vCPU: a 6 MB batch is read in about half the time on 2 (BENCHMARKS.md, W1).
            let event = crate::kinesis_event::KinesisEvent::from_slice_parallel(&body).map_err(batch_error)?;
            let metrics = crate::pull::kinesis::batch_metrics(&event);
            let result = crate::pull::kinesis::process_async(&event, options, |r| handler(r, invocation.clone()))
                .await
                .map_err(batch_error)?;
            let response = result.response();
            Ok((result, response, metrics))
        }
    })
    .await
}

/// An SQS function in one closure; see [`run_kinesis`]. FIFO queues keep order per message
/// group ([`crate::pull::sqs`]).
#[cfg(feature = "sqs")]
pub async fn run_sqs<H, Fut, E>(options: crate::pull::Options, handler: H) -> Result<(), lambda_runtime::Error>
where
    H: Fn(crate::pull::sqs::SqsMessage, crate::invocation::Invocation) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: std::fmt::Display,
{
    let handler = Arc::new(handler);
    run_batches(options, move |body, invocation, options| {
        let handler = handler.clone();
        async move {
            let event = crate::pull::sqs::SqsEvent::from_slice(&body).map_err(batch_error)?;
            let metrics = crate::pull::sqs::batch_metrics(&event);
            let result = crate::pull::sqs::process_async(&event, options, |m| handler(m, invocation.clone()))
                .await
                .map_err(batch_error)?;
            let response = result.response();
            Ok((result, response, metrics))
        }
    })
    .await
}

/// A DynamoDB Streams function in one closure; see [`run_kinesis`].
#[cfg(feature = "dynamodb")]
pub async fn run_dynamodb<H, Fut, E>(options: crate::pull::Options, handler: H) -> Result<(), lambda_runtime::Error>
where
    H: Fn(crate::pull::dynamodb::DynamoDbRecord, crate::invocation::Invocation) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: std::fmt::Display,
{
    let handler = Arc::new(handler);
    run_batches(options, move |body, invocation, options| {
        let handler = handler.clone();
        async move {
            let event = crate::pull::dynamodb::DynamoDbEvent::from_slice(&body).map_err(batch_error)?;
            let metrics = crate::pull::dynamodb::batch_metrics(&event);
            let result = crate::pull::dynamodb::process_async(&event, options, |r| handler(r, invocation.clone()))
                .await
                .map_err(batch_error)?;
            let response = result.response();
            Ok((result, response, metrics))
        }
    })
    .await
}

/// A Kafka function in one closure, Amazon MSK or self-managed Apache Kafka; see
/// [`run_kinesis`]. With [`crate::pull::Options::per_key`], that many partitions at a time, each
/// in offset order; the response names every failed record and every record not reached by
/// partition and offset ([`crate::pull::kafka`]).
///
/// ```no_run
/// use pushpull::pull::{DecodeError, Options};
///
/// #[tokio::main]
/// async fn main() -> Result<(), pushpull::lambda::Error> {
///     pushpull::lambda::run_kafka(Options::default().per_key(4), |record, _invocation| async move {
///         // A tombstone fails, and holds back the rest of its partition.
///         let order: pushpull::serde_json::Value = record.json()?;
///         pushpull::tracing::info!(offset = record.offset, %order, "order");
///         Ok::<_, DecodeError>(())
///     })
///     .await
/// }
/// ```
#[cfg(feature = "kafka")]
pub async fn run_kafka<H, Fut, E>(options: crate::pull::Options, handler: H) -> Result<(), lambda_runtime::Error>
where
    H: Fn(crate::pull::kafka::KafkaRecord<'static>, crate::invocation::Invocation) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: std::fmt::Display,
{
    let handler = Arc::new(handler);
    run_batches(options, move |body, invocation, options| {
        let handler = handler.clone();
        async move {
            let event = crate::pull::kafka::KafkaEvent::from_slice(&body).map_err(batch_error)?;
            let metrics = crate::pull::kafka::batch_metrics(&event);
            let result = crate::pull::kafka::process_async(&event, options, |r| handler(r, invocation.clone()))
                .await
                .map_err(batch_error)?;
            let response = crate::pull::kafka::response(&event, &result);
            Ok((result, response, metrics))
        }
    })
    .await
}

/// An Amazon MQ for RabbitMQ function in one closure; see [`run_kinesis`]. Amazon MQ has no partial
/// batch response: a batch with a failed message fails the invocation, and AWS delivers the whole
/// batch again ("If your function returns an error for any of the messages in a batch, Lambda
/// retries the whole batch of messages until processing succeeds or the messages expire",
/// with-mq.html); the handler must be idempotent ([`crate::pull::rabbitmq`]).
///
/// ```no_run
/// use pushpull::pull::{DecodeError, Options};
///
/// #[tokio::main]
/// async fn main() -> Result<(), pushpull::lambda::Error> {
///     pushpull::lambda::run_rabbitmq(Options::default(), |message, _invocation| async move {
///         let order: pushpull::serde_json::Value = message.json()?;
///         pushpull::tracing::info!(redelivered = message.redelivered, %order, "order");
///         Ok::<_, DecodeError>(())
///     })
///     .await
/// }
/// ```
#[cfg(feature = "rabbitmq")]
pub async fn run_rabbitmq<H, Fut, E>(options: crate::pull::Options, handler: H) -> Result<(), lambda_runtime::Error>
where
    H: Fn(crate::pull::rabbitmq::RabbitMqMessage<'static>, crate::invocation::Invocation) -> Fut
        + Send
        + Sync
        + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: std::fmt::Display,
{
    let handler = Arc::new(handler);
    run_batches(options, move |body, invocation, options| {
        let handler = handler.clone();
        async move {
            let event = crate::pull::rabbitmq::RabbitMqEvent::from_slice(&body).map_err(batch_error)?;
            let metrics = crate::pull::rabbitmq::batch_metrics(&event);
            let result =
                crate::pull::rabbitmq::process_async(&event, options, |m| handler(m, invocation.clone())).await;
            // No partial batch response for Amazon MQ: a failure fails the invocation.
            if let Some(f) = result.failures.first() {
                log_result(&result);
                return Err(batch_error(format!(
                    "{} of {} messages failed, the first {}: {}; the whole batch is retried",
                    result.failures.len(),
                    event.len(),
                    f.item_identifier,
                    f.reason
                )));
            }
            if let Some(u) = result.unprocessed.first() {
                log_result(&result);
                return Err(batch_error(format!(
                    "{} of {} messages not processed (the first {}: {:?}); the whole batch is retried",
                    result.unprocessed.len(),
                    event.len(),
                    u.item_identifier,
                    u.why
                )));
            }
            Ok((result, serde_json::Value::Null, metrics))
        }
    })
    .await
}

/// An S3 push function: every notification goes to `handler` (see [`crate::push`]), with the
/// invocation's request id and deadline.
///
/// ```no_run
/// use pushpull::config::{Env, PushSettings};
/// use pushpull::push::{line::JsonLines, source::S3Source, PushHandler};
/// use pushpull::sink::kinesis::KinesisSink;
///
/// #[tokio::main]
/// async fn main() -> Result<(), pushpull::lambda::Error> {
///     let aws = pushpull::aws::Aws::new();
///     let handler = PushHandler::builder(PushSettings::from_env(Env::from_process())?)
///         .source(S3Source::new(aws.s3().await.clone()))
///         .lines(JsonLines::new(Some("user".into())))
///         .sink(KinesisSink::new(aws.kinesis().await.clone(), "orders"))
///         .connect(&aws)
///         .await;
///     pushpull::lambda::run_push(handler).await
/// }
/// ```
#[cfg(feature = "push")]
pub async fn run_push<O, R, S>(handler: crate::push::PushHandler<O, R, S>) -> Result<(), lambda_runtime::Error>
where
    O: crate::push::source::ObjectSource + 'static,
    R: crate::push::line::Records + 'static,
    S: crate::sink::RecordSink + 'static,
{
    let handler = Arc::new(handler);
    run_raw(move |body: Bytes, context: Context| {
        let handler = handler.clone();
        async move { handler.handle(&body, &crate::invocation::Invocation::from_context(&context)).await }
    })
    .await
}

/// An S3 push function in one closure: each line of each object that lands becomes a Kinesis
/// record, a line the closure rejects is quarantined with its reason. Everything else comes from
/// the environment, as [`crate::config::PushSettings`] reads it, plus `STREAM_NAME` (the stream
/// the records go to); a missing or invalid variable stops the function at init, every problem
/// named at once. Streaming, gzip, leases, checkpoints, resume after a crash and resends of
/// throttled records come from [`crate::push`].
///
/// ```no_run
/// use pushpull::push::line::{Line, LineReject};
/// use pushpull::sink::OutRecord;
///
/// #[tokio::main]
/// async fn main() -> Result<(), pushpull::lambda::Error> {
///     // `customer,amount` lines to JSON records keyed by customer.
///     pushpull::lambda::run_s3_lines(|line: Line<'_>| -> Result<Option<OutRecord>, LineReject> {
///         let (customer, amount) = line.text()?.split_once(',').ok_or("expected customer,amount")?;
///         let json = pushpull::serde_json::json!({ "customer": customer, "amount": amount.trim() }).to_string();
///         Ok(Some(OutRecord::keyed(customer, json)))
///     })
///     .await
/// }
/// ```
///
/// For another sink or source, or whole objects instead of lines, put a
/// [`crate::push::PushHandler`] together with its builder and give it to [`run_push`].
#[cfg(all(feature = "push", feature = "s3", feature = "kinesis-sink"))]
pub async fn run_s3_lines<L>(lines: L) -> Result<(), lambda_runtime::Error>
where
    L: crate::push::line::LineHandler + 'static,
{
    crate::telemetry::init(); // before run_raw: settings errors are logged as JSON too
    let mut env = crate::config::Env::from_process();
    let stream = env.kinesis_stream_name("STREAM_NAME", "the Kinesis stream the records go to");
    let settings = crate::config::PushSettings::read(&mut env);
    env.finish().inspect_err(|e| tracing::error!(error = %e, "cannot start"))?;
    let aws = crate::aws::Aws::new();
    let handler = crate::push::PushHandler::builder(settings)
        .source(crate::push::source::S3Source::new(aws.s3().await.clone()))
        .lines(lines)
        .sink(crate::sink::kinesis::KinesisSink::new(aws.kinesis().await.clone(), stream))
        .connect(&aws)
        .await;
    run_push(handler).await
}
