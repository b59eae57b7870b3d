//! AWS clients built once per cold start, only when needed, and SDK errors made readable.
//!
//! aws-config honours `AWS_ENDPOINT_URL` (and `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL_KINESIS`);
//! when an endpoint override is set, S3 uses path-style addressing, which local endpoints
//! (LocalStack) need.
use std::error::Error as StdError;
use std::fmt::Debug;

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_types::error::display::DisplayErrorContext;
use tokio::sync::OnceCell;

/// Lazily built AWS configuration and clients, shared by everything in one function instance.
///
/// ```no_run
/// # async fn demo() {
/// let aws = pushpull::aws::Aws::new();
/// let s3 = aws.s3().await; // loads the configuration on first use only
/// # let _ = s3;
/// # }
/// ```
#[derive(Debug, Default)]
pub struct Aws {
    config: OnceCell<aws_config::SdkConfig>,
    s3: OnceCell<aws_sdk_s3::Client>,
    kinesis: OnceCell<aws_sdk_kinesis::Client>,
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
    pub async fn kinesis(&self) -> &aws_sdk_kinesis::Client {
        let config = self.sdk_config().await;
        self.kinesis.get_or_init(|| async { aws_sdk_kinesis::Client::new(config) }).await
    }
}

/// Error codes that mean "slow down or try later" across S3 and Kinesis.
const RETRYABLE_CODES: &[&str] = &[
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "ProvisionedThroughputExceededException",
    "LimitExceededException",
    "KMSThrottlingException",
];

/// Whether an SDK error may go away if the call is made again later: throttling, 5xx, timeouts
/// and network failures are; access denied, missing resources and bad requests are not.
pub fn is_retryable<E: ProvideErrorMetadata, R: Debug>(e: &SdkError<E, R>) -> bool {
    match e {
        SdkError::ServiceError(se) => se.err().code().is_some_and(|c| RETRYABLE_CODES.contains(&c)),
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => true,
        _ => false,
    }
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
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
