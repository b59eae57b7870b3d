//! AWS clients built once per cold start, only when needed, and SDK errors classified and made
//! readable (feature `aws`, implied by `s3` and `kinesis-sink`).
//!
//! aws-config honours `AWS_ENDPOINT_URL` (and `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL_KINESIS`);
//! when an endpoint override is set, S3 uses path-style addressing, which local endpoints
//! (LocalStack) need.
use std::error::Error as StdError;
use std::fmt::Debug;

pub use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::display::DisplayErrorContext;
pub use aws_smithy_types::error::metadata::ProvideErrorMetadata;
#[cfg(any(feature = "s3", feature = "kinesis-sink", feature = "sqs-sink"))]
use tokio::sync::OnceCell;

/// Lazily built AWS configuration and clients, shared by everything in one function instance.
///
/// ```no_run
/// # async fn demo() {
/// let aws = pushpull::aws::Aws::new();
/// # #[cfg(feature = "s3")]
/// let s3 = aws.s3().await; // loads the configuration on first use only
/// # }
/// ```
#[derive(Debug, Default)]
pub struct Aws {
    config: tokio::sync::OnceCell<aws_config::SdkConfig>,
    #[cfg(feature = "s3")]
    s3: OnceCell<aws_sdk_s3::Client>,
    #[cfg(feature = "kinesis-sink")]
    kinesis: OnceCell<aws_sdk_kinesis::Client>,
    #[cfg(feature = "sqs-sink")]
    sqs: OnceCell<aws_sdk_sqs::Client>,
}

impl Aws {
    /// Nothing is loaded until a client is asked for.
    pub fn new() -> Self {
        Self::default()
    }

    /// The shared SDK configuration (region, credentials, endpoint) from the environment.
    pub async fn sdk_config(&self) -> &aws_config::SdkConfig {
        self.config.get_or_init(|| aws_config::load_defaults(aws_config::BehaviorVersion::latest())).await
    }

    /// The S3 client; path-style addressing when an endpoint override is configured.
    #[cfg(feature = "s3")]
    pub async fn s3(&self) -> &aws_sdk_s3::Client {
        let config = self.sdk_config().await;
        self.s3
            .get_or_init(|| async {
                let local =
                    std::env::var_os("AWS_ENDPOINT_URL").is_some() || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some();
                let s3 = aws_sdk_s3::config::Builder::from(config)
                    .force_path_style(local)
                    .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired)
                    .build();
                aws_sdk_s3::Client::from_conf(s3)
            })
            .await
    }

    /// The Kinesis client.
    #[cfg(feature = "kinesis-sink")]
    pub async fn kinesis(&self) -> &aws_sdk_kinesis::Client {
        let config = self.sdk_config().await;
        self.kinesis.get_or_init(|| async { aws_sdk_kinesis::Client::new(config) }).await
    }

    /// The SQS client (built on first use).
    #[cfg(feature = "sqs-sink")]
    pub async fn sqs(&self) -> &aws_sdk_sqs::Client {
        let config = self.sdk_config().await;
        self.sqs.get_or_init(|| async { aws_sdk_sqs::Client::new(config) }).await
    }
}

/// What an SDK error means for the caller, read from the error's typed parts (the SDK error
/// variant and the service's error code), never from its message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SdkErrorKind {
    /// The service asked us to slow down (`SlowDown`, `ThrottlingException`,
    /// `ProvisionedThroughputExceededException`, ...): retry with backoff.
    Throttled,
    /// A timeout, a dropped connection, or a 5xx-class service error: retry.
    Transient,
    /// The thing named does not exist (`NoSuchKey`, `NoSuchBucket`, `ResourceNotFoundException`).
    NotFound,
    /// The caller may not do this (`AccessDenied`, `AccessDeniedException`).
    AccessDenied,
    /// A conditional write lost (`PreconditionFailed`, `ConditionalRequestConflict`).
    PreconditionFailed,
    /// A Kinesis shard iterator expired (`ExpiredIteratorException`): get a new one.
    ExpiredIterator,
    /// A range that starts past the end of the object (`InvalidRange`).
    InvalidRange,
    /// The resource is being created, deleted or updated (`ResourceInUseException`).
    ResourceInUse,
    /// Anything else: a bad request, a validation error. Retrying will not help.
    Other,
}

impl SdkErrorKind {
    /// Whether trying the same call again later may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, SdkErrorKind::Throttled | SdkErrorKind::Transient)
    }

    /// The kind a service error code means.
    ///
    /// ```
    /// use pushpull::aws::SdkErrorKind;
    /// assert_eq!(SdkErrorKind::of_code("ProvisionedThroughputExceededException"), SdkErrorKind::Throttled);
    /// assert_eq!(SdkErrorKind::of_code("NoSuchKey"), SdkErrorKind::NotFound);
    /// assert!(!SdkErrorKind::of_code("ValidationException").is_retryable());
    /// ```
    pub fn of_code(code: &str) -> SdkErrorKind {
        match code {
            "SlowDown"
            | "Throttling"
            | "ThrottlingException"
            | "TooManyRequestsException"
            | "RequestLimitExceeded"
            | "ProvisionedThroughputExceededException"
            | "LimitExceededException"
            | "KMSThrottlingException" => SdkErrorKind::Throttled,
            "InternalError"
            | "InternalFailure"
            | "InternalServerError"
            | "ServiceUnavailable"
            | "ServiceUnavailableException"
            | "RequestTimeout"
            | "RequestTimeTooSkewed" => SdkErrorKind::Transient,
            "NoSuchKey"
            | "NoSuchBucket"
            | "NoSuchVersion"
            | "NotFound"
            | "ResourceNotFoundException"
            | "QueueDoesNotExist"
            | "AWS.SimpleQueueService.NonExistentQueue" => SdkErrorKind::NotFound,
            "AccessDenied" | "AccessDeniedException" | "Forbidden" => SdkErrorKind::AccessDenied,
            "PreconditionFailed" | "ConditionalRequestConflict" => SdkErrorKind::PreconditionFailed,
            "ExpiredIteratorException" => SdkErrorKind::ExpiredIterator,
            "InvalidRange" => SdkErrorKind::InvalidRange,
            "ResourceInUseException" => SdkErrorKind::ResourceInUse,
            _ => SdkErrorKind::Other,
        }
    }
}

/// Classifies an SDK error by its variant and error code.
pub fn classify<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> SdkErrorKind {
    match e {
        SdkError::ServiceError(se) => se.err().code().map_or(SdkErrorKind::Other, SdkErrorKind::of_code),
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            SdkErrorKind::Transient
        }
        _ => SdkErrorKind::Other,
    }
}

/// Whether an SDK error may go away if the call is made again later: throttling, 5xx, timeouts
/// and network failures are; access denied, missing resources and bad requests are not.
pub fn is_retryable<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    classify(e).is_retryable()
}

/// A one-line description of an SDK error with its code and message, never just "service error".
pub fn describe<E, R>(e: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    R: Debug,
{
    match e {
        SdkError::ServiceError(se) => {
            let err = se.err();
            match (err.code(), err.message()) {
                (Some(code), Some(msg)) => format!("{code}: {msg}"),
                (Some(code), None) => code.to_owned(),
                _ => DisplayErrorContext(e).to_string(),
            }
        }
        _ => DisplayErrorContext(e).to_string(),
    }
}

/// An error and its sources on one line (`a: b: c`), for errors that wrap what really happened.
pub fn error_chain(e: &(dyn StdError + 'static)) -> String {
    crate::error::chain(e)
}
