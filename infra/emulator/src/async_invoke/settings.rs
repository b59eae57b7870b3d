//! A function's asynchronous-invocation settings (`EventInvokeConfig`, `DeadLetterConfig`).
use std::time::Duration;

use super::dead_letter::DeadLetterTarget;
use crate::mapping::settings::{Destination, InvalidSetting};
use crate::template::{Template, TemplateError, scalar};

/// AWS's spacing of the two retries after a function error (about 1 and 2 minutes).
pub const RETRY_DELAYS: [Duration; 2] = [Duration::from_secs(60), Duration::from_secs(120)];

/// The function's `EventInvokeConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct AsyncSettings {
    /// The function to invoke.
    pub function_name: String,
    /// 0..=2 retries after a function error.
    pub maximum_retry_attempts: u32,
    /// 60..=21600 s in the queue, then the event goes to the destination unprocessed.
    pub maximum_event_age: Duration,
    /// OnFailure destination: an SQS queue, SNS topic, S3 bucket, function or event bus ARN.
    pub on_failure: Option<String>,
    /// OnSuccess destination (the same kinds): a record of every successful invocation.
    pub on_success: Option<String>,
    /// The function's dead-letter queue (`DeadLetterConfig`): an SQS queue or SNS topic ARN that
    /// gets a discarded event as it came, with its error in message attributes.
    pub dead_letter: Option<String>,
    /// Multiplies [`RETRY_DELAYS`] (1.0 is AWS; 0.01 turns minutes into about a second).
    pub delay_scale: f64,
}

impl AsyncSettings {
    /// Checks the ranges AWS enforces (`PutFunctionEventInvokeConfig`).
    pub fn new(
        function_name: &str,
        retries: i64,
        max_age: i64,
        on_failure: Option<String>,
        delay_scale: f64,
    ) -> Result<Self, InvalidSetting> {
        let bad = |v: i64, f: &str, rule: &str| {
            InvalidSetting(format!(
                "1 validation error detected: Value '{v}' at '{f}' failed to satisfy constraint: {rule}"
            ))
        };
        if !(0..=2).contains(&retries) {
            return Err(bad(retries, "maximumRetryAttempts", "Member must be between 0 and 2"));
        }
        if !(60..=21600).contains(&max_age) {
            return Err(bad(max_age, "maximumEventAgeInSeconds", "Member must be between 60 and 21600"));
        }
        // AWS allows an SQS queue, SNS topic, S3 bucket, Lambda function or EventBridge bus.
        if let Some(arn) = &on_failure {
            Destination::from_async_arn(arn)?;
        }
        if !(delay_scale.is_finite() && delay_scale >= 0.0) {
            return Err(InvalidSetting(format!("retry delay scale {delay_scale} must be a number >= 0")));
        }
        Ok(AsyncSettings {
            function_name: function_name.to_owned(),
            maximum_retry_attempts: retries as u32,
            maximum_event_age: Duration::from_secs(max_age as u64),
            on_failure,
            on_success: None,
            dead_letter: None,
            delay_scale,
        })
    }

    /// With an OnSuccess destination (`DestinationConfig.OnSuccess`): an SQS queue, SNS topic,
    /// function or event bus. AWS (invocation-async-retain-records) allows an S3 bucket for
    /// failures only.
    pub fn on_success(mut self, arn: Option<String>) -> Result<Self, InvalidSetting> {
        if let Some(arn) = &arn
            && let Destination::S3(_) = Destination::from_async_arn(arn)?
        {
            return Err(InvalidSetting(format!(
                "DestinationConfig.OnSuccess {arn:?}: an S3 bucket can only be an on-failure destination"
            )));
        }
        self.on_success = arn;
        Ok(self)
    }

    /// With a dead-letter queue (`DeadLetterConfig.TargetArn`: "The Amazon Resource Name (ARN)
    /// of an Amazon SQS queue or Amazon SNS topic").
    pub fn dead_letter(mut self, arn: Option<String>) -> Result<Self, InvalidSetting> {
        if let Some(arn) = &arn {
            DeadLetterTarget::from_arn(arn)?;
        }
        self.dead_letter = arn;
        Ok(self)
    }

    /// From the `EventInvokeConfig` of the function built from `binary` in the template (AWS's
    /// defaults where it says nothing: 2 retries, 6 hours), and its dead-letter queue (SAM's
    /// `DeadLetterQueue.TargetArn`, or CloudFormation's `DeadLetterConfig.TargetArn`).
    pub fn from_template(t: &Template, binary: &str, delay_scale: f64) -> Result<Self, TemplateError> {
        let f = t.functions()?.into_iter().find(|f| f.binary == binary).ok_or_else(|| TemplateError::Resolve {
            at: "Resources".into(),
            reason: format!("no function builds {binary}"),
        })?;
        let props = t.resolve(&t.resources[&f.logical_id]["Properties"], &f.logical_id)?;
        let cfg = &props["EventInvokeConfig"];
        let int = |k: &str, d: i64| cfg.get(k).and_then(scalar).and_then(|s| s.parse().ok()).unwrap_or(d);
        let dest = cfg.pointer("/DestinationConfig/OnFailure/Destination").and_then(scalar);
        let success = cfg.pointer("/DestinationConfig/OnSuccess/Destination").and_then(scalar);
        let dead_letter = props
            .pointer("/DeadLetterQueue/TargetArn")
            .or_else(|| props.pointer("/DeadLetterConfig/TargetArn"))
            .and_then(scalar);
        AsyncSettings::new(
            &f.name,
            int("MaximumRetryAttempts", 2),
            int("MaximumEventAgeInSeconds", 21600),
            dest,
            delay_scale,
        )
        .and_then(|s| s.on_success(success))
        .and_then(|s| s.dead_letter(dead_letter))
        .map_err(|e| TemplateError::Resolve {
            at: format!("{}.EventInvokeConfig", f.logical_id),
            reason: e.to_string(),
        })
    }

    /// The wait after the `n`th throttle (or 5xx) in a row: AWS's 1 s doubling up to 5 minutes,
    /// times the delay scale.
    pub fn throttle_delay(&self, n: u32) -> Duration {
        let exponent = n.saturating_sub(1).min(16);
        Duration::from_secs(1).saturating_mul(1 << exponent).min(Duration::from_secs(300)).mul_f64(self.delay_scale)
    }

    pub(super) fn delay(&self, retry: u32) -> Duration {
        RETRY_DELAYS[(retry as usize).min(1)].mul_f64(self.delay_scale)
    }
}
