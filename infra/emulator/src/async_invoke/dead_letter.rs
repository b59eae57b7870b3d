//! The function's dead-letter queue (`DeadLetterConfig`). AWS (invocation-async-retain-records,
//! "Dead-letter queues"): "Lambda sends the event to the dead-letter queue as-is, with additional
//! information in attributes": "RequestID (String) – The ID of the invocation request. ...
//! ErrorCode (Number) – The HTTP status code. ErrorMessage (String) – The first 1 KB of the error
//! message." and "For dead-letter queues, Lambda only sends the content of the event, without
//! details about the response." Destinations may be set "in addition to or instead of a
//! dead-letter queue" (API PutFunctionEventInvokeConfig): a discarded event goes to both.
use std::time::Duration;

use futures_util::future::BoxFuture;
use tracing::warn;

use crate::mapping::settings::InvalidSetting;
use crate::mapping::{Clients, MappingError};

/// Where a discarded event goes: an SQS queue or an SNS topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterTarget {
    /// An SQS queue (ARN).
    Sqs(String),
    /// An SNS topic (ARN).
    Sns(String),
}

impl DeadLetterTarget {
    /// From `DeadLetterConfig.TargetArn`.
    pub fn from_arn(arn: &str) -> Result<Self, InvalidSetting> {
        match arn.split(':').nth(2) {
            Some("sqs") => Ok(DeadLetterTarget::Sqs(arn.to_owned())),
            Some("sns") => Ok(DeadLetterTarget::Sns(arn.to_owned())),
            _ => Err(InvalidSetting(format!(
                "DeadLetterConfig.TargetArn {arn:?} must be the ARN of an Amazon SQS queue or Amazon SNS topic"
            ))),
        }
    }
}

/// What goes with a dead letter besides the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterError {
    /// The last invocation's request id.
    pub request_id: String,
    /// The last attempt's HTTP status (200 for a function error); none if the event was never
    /// invoked (too old before its first attempt).
    pub error_code: Option<u16>,
    /// The first 1 KB of the error message.
    pub error_message: String,
}

impl DeadLetterError {
    /// The error message cut to AWS's first 1 KB, at a character boundary.
    pub fn new(request_id: &str, error_code: Option<u16>, message: &str) -> Self {
        let mut end = message.len().min(1024);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        DeadLetterError { request_id: request_id.to_owned(), error_code, error_message: message[..end].to_owned() }
    }
}

/// Sends discarded events: [`DeadLetterQueue`], or in tests a list in memory.
pub trait DeadLetter: Send + Sync + 'static {
    /// Sends `event` (its body as it came) with `error`, retrying until it is accepted.
    fn send<'a>(&'a self, event: &'a str, error: &'a DeadLetterError) -> BoxFuture<'a, Result<(), MappingError>>;
}

/// A dead-letter queue or topic on LocalStack (or AWS).
#[derive(Debug)]
pub struct DeadLetterQueue {
    target: DeadLetterTarget,
    clients: Clients,
}

impl DeadLetterQueue {
    /// For `target`.
    pub fn new(target: DeadLetterTarget, clients: Clients) -> Self {
        DeadLetterQueue { target, clients }
    }

    async fn try_send(&self, event: &str, error: &DeadLetterError) -> Result<(), String> {
        use aws_sdk_sns::types::MessageAttributeValue as SnsAttr;
        use aws_sdk_sqs::types::MessageAttributeValue as SqsAttr;
        let mut attrs = vec![("RequestID", "String", error.request_id.clone())];
        if let Some(code) = error.error_code {
            attrs.push(("ErrorCode", "Number", code.to_string()));
            attrs.push(("ErrorMessage", "String", error.error_message.clone()));
        }
        match &self.target {
            DeadLetterTarget::Sqs(arn) => {
                let url = crate::localstack::queue_url(&self.clients.sqs, arn).await.map_err(|e| e.to_string())?;
                let mut req = self.clients.sqs.send_message().queue_url(&url).message_body(event);
                for (name, kind, value) in attrs.into_iter().filter(|a| !a.2.is_empty()) {
                    let v =
                        SqsAttr::builder().data_type(kind).string_value(value).build().map_err(|e| e.to_string())?;
                    req = req.message_attributes(name, v);
                }
                req.send().await.map_err(|e| format!("SendMessage {arn}: {}", pushpull::aws::describe(&e)))?;
            }
            DeadLetterTarget::Sns(arn) => {
                let mut req = self.clients.sns.publish().topic_arn(arn).message(event);
                for (name, kind, value) in attrs.into_iter().filter(|a| !a.2.is_empty()) {
                    let v =
                        SnsAttr::builder().data_type(kind).string_value(value).build().map_err(|e| e.to_string())?;
                    req = req.message_attributes(name, v);
                }
                req.send().await.map_err(|e| format!("Publish {arn}: {}", pushpull::aws::describe(&e)))?;
            }
        }
        Ok(())
    }
}

impl DeadLetter for DeadLetterQueue {
    fn send<'a>(&'a self, event: &'a str, error: &'a DeadLetterError) -> BoxFuture<'a, Result<(), MappingError>> {
        Box::pin(async move {
            let mut delay = Duration::from_millis(200);
            for attempt in 1.. {
                match self.try_send(event, error).await {
                    Ok(()) => return Ok(()),
                    Err(e) if attempt < 20 => {
                        warn!(error = %e, attempt, "dead-letter queue not reachable; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                    Err(e) => return Err(MappingError::Destination(e)),
                }
            }
            unreachable!("the loop returns")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_target_is_a_queue_or_a_topic() {
        let q = "arn:aws:sqs:us-east-1:000000000000:dlq";
        assert_eq!(DeadLetterTarget::from_arn(q), Ok(DeadLetterTarget::Sqs(q.into())));
        let t = "arn:aws:sns:us-east-1:000000000000:t";
        assert_eq!(DeadLetterTarget::from_arn(t), Ok(DeadLetterTarget::Sns(t.into())));
        assert!(DeadLetterTarget::from_arn("arn:aws:s3:::bucket").is_err());
    }

    /// "ErrorMessage (String) – The first 1 KB of the error message."
    #[test]
    fn the_error_message_is_cut_to_1_kb_on_a_character() {
        let e = DeadLetterError::new("r", Some(200), &"é".repeat(600));
        assert_eq!(e.error_message.len(), 1024);
        let e = DeadLetterError::new("r", Some(200), &format!("a{}", "é".repeat(600)));
        assert_eq!(e.error_message.len(), 1023, "not in the middle of a character");
    }
}
