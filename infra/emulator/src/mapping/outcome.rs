//! What an invocation's answer means for the batch (the partial batch response rule of
//! aws-semantics.md), and the failure record AWS sends to the OnFailure destination.
use bytes::Bytes;
use serde_json::{Value, json};

use super::event::{WindowState, iso8601_millis};

/// How the Invoke API answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// The function returned this body.
    Response(Bytes),
    /// A function error (`X-Amz-Function-Error`), a timeout or a crash: the error body.
    FunctionError(Bytes),
}

/// What to do with the batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Every record is done; with windows, the state to carry.
    Success {
        /// Window state returned.
        state: Option<WindowState>,
    },
    /// Records before `index` are done; retry from `index` (the lowest reported failure).
    RetryFrom {
        /// Index into the batch of the lowest failed sequence number.
        index: usize,
        /// Every index the response names, ascending, once each (a queue's source retries only
        /// these: [`super::source::Partition::failures_stand_alone`]).
        failed: Vec<usize>,
        /// Window state returned (it covers the records before `index`).
        state: Option<WindowState>,
    },
    /// The whole batch failed.
    Failed {
        /// Why, for logs and the failure record.
        reason: String,
        /// `functionError` for the failure record (`Unhandled` for errors, timeouts, crashes).
        function_error: Option<String>,
    },
}

fn failed(reason: impl Into<String>) -> Verdict {
    Verdict::Failed { reason: reason.into(), function_error: None }
}

/// Judges an answer for `batch` by AWS's rules:
/// - a function error fails the whole batch;
/// - with tumbling windows the response must carry `state` (else the invocation failed);
/// - without `ReportBatchItemFailures` the body is ignored (not even parsed, unless windows need its
///   `state`);
/// - an empty or `null` body, a missing, `null` or empty `batchItemFailures`: success;
/// - an entry whose `itemIdentifier` is missing, `null`, empty, or names no record of this batch
///   (`item_index`, the source's rule: a Kinesis sequence number compared as an integer) fails the
///   whole batch (AWS is unverified for identifiers not in the batch; LocalStack does this and it
///   is the safe side: nothing is skipped);
/// - otherwise retry from the lowest record listed.
pub fn judge(
    answer: &Answer,
    item_index: impl Fn(&Value) -> Result<usize, String>,
    report_item_failures: bool,
    windowed: bool,
) -> Verdict {
    let body = match answer {
        Answer::FunctionError(body) => {
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let reason = match (v["errorType"].as_str(), v["errorMessage"].as_str()) {
                (Some(t), Some(m)) => format!("{t}: {m}"),
                (None, Some(m)) => m.to_owned(),
                _ => String::from_utf8_lossy(body).into_owned(),
            };
            return Verdict::Failed { reason, function_error: Some("Unhandled".to_owned()) };
        }
        Answer::Response(body) => body,
    };
    if !report_item_failures && !windowed {
        // Without ReportBatchItemFailures (and windows) only a function error fails a batch: the
        // body, JSON or not, is not read.
        return Verdict::Success { state: None };
    }
    let trimmed = body.trim_ascii();
    let v: Value = if trimmed.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(trimmed) {
            Ok(v) => v,
            Err(e) => return failed(format!("the response is not JSON: {e}")),
        }
    };
    let state = if windowed {
        match v.get("state") {
            // Kept as returned: AWS passes the state back as the function wrote it.
            Some(Value::Object(m)) => Some(m.clone()),
            Some(Value::Null) | None => return failed("a tumbling-window response must carry \"state\""),
            Some(other) => return failed(format!("\"state\" must be a JSON object, got {other}")),
        }
    } else {
        None
    };
    if !report_item_failures {
        return Verdict::Success { state };
    }
    let entries = match v.get("batchItemFailures") {
        None | Some(Value::Null) => return Verdict::Success { state },
        Some(Value::Array(a)) if a.is_empty() => return Verdict::Success { state },
        Some(Value::Array(a)) => a,
        Some(other) => return failed(format!("batchItemFailures is not a list: {other}")),
    };
    let mut named: Vec<usize> = Vec::new();
    for e in entries {
        let id = match e.get("itemIdentifier") {
            Some(Value::String(s)) if s.is_empty() => {
                return failed(format!("batchItemFailures entry without a usable itemIdentifier: {e}"));
            }
            Some(v) if !v.is_null() => v,
            _ => return failed(format!("batchItemFailures entry without a usable itemIdentifier: {e}")),
        };
        let index = match item_index(id) {
            Ok(index) => index,
            Err(why) => return failed(why),
        };
        named.push(index);
    }
    named.sort_unstable();
    named.dedup();
    match named.first() {
        Some(&index) => Verdict::RetryFrom { index, failed: named, state },
        None => Verdict::Success { state },
    }
}

/// Why records went to the OnFailure destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Retries used up.
    RetryAttemptsExhausted,
    /// Older than MaximumRecordAgeInSeconds.
    RecordAgeExceeded,
    /// A record alone is larger than the 6 MB invocation payload: it is never invoked. AWS
    /// (with-msk-on-failure.html): `"condition": "MaximumPayloadSizeExceeded"`, and
    /// `"responseContext": { // null if record is MaximumPayloadSizeExceeded`.
    MaximumPayloadSizeExceeded,
}

impl Condition {
    /// AWS's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::RetryAttemptsExhausted => "RetryAttemptsExhausted",
            Condition::RecordAgeExceeded => "RecordAgeExceeded",
            Condition::MaximumPayloadSizeExceeded => "MaximumPayloadSizeExceeded",
        }
    }
}

/// What the failure record says besides the batch itself.
#[derive(Debug, Clone)]
pub struct FailureContext<'a> {
    /// The last invocation's request id (a fresh one for records that were never sent).
    pub request_id: &'a str,
    /// The function's ARN.
    pub function_arn: &'a str,
    /// Why.
    pub condition: Condition,
    /// Invocations of these records.
    pub invoke_count: u32,
    /// `functionError` of the last answer, if it was one.
    pub function_error: Option<&'a str>,
}

/// The failure record AWS sends to an SQS or SNS destination: metadata only, no records. The
/// source's part (`KinesisBatchInfo` and its like) is `batch_info`.
pub fn failure_record(ctx: &FailureContext<'_>, batch_info: (&str, Value), now: f64) -> Value {
    let mut response = json!({ "statusCode": 200, "executedVersion": "$LATEST" });
    if let Some(fe) = ctx.function_error {
        response["functionError"] = Value::from(fe);
    }
    let mut out = json!({
        "requestContext": {
            "requestId": ctx.request_id,
            "functionArn": ctx.function_arn,
            "condition": ctx.condition.as_str(),
            "approximateInvokeCount": ctx.invoke_count,
        },
        // Never invoked: no response.
        "responseContext": if ctx.condition == Condition::MaximumPayloadSizeExceeded { Value::Null } else { response },
        "version": "1.0",
        "timestamp": iso8601_millis(now),
    });
    out[batch_info.0] = batch_info.1;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::event::{Rec, batch_info, item_index};
    use std::sync::Arc;

    fn batch(seqs: &[&str]) -> Vec<Rec> {
        seqs.iter()
            .map(|s| Rec {
                shard_id: Arc::from("shardId-000000000000"),
                sequence_number: (*s).into(),
                seq: s.parse().unwrap(),
                partition_key: "k".into(),
                data: Bytes::new(),
                arrival: 1.5,
                encryption: None,
                index: 0,
            })
            .collect()
    }

    fn ids(b: &[Rec]) -> impl Fn(&Value) -> Result<usize, String> + '_ {
        |id| match id {
            Value::String(s) => item_index(b, s),
            other => Err(format!("{other} is not a sequence number")),
        }
    }

    fn resp(s: &str) -> Answer {
        Answer::Response(Bytes::copy_from_slice(s.as_bytes()))
    }

    const STREAM: &str = "arn:aws:kinesis:us-east-1:000000000000:stream/s";

    fn ok() -> Verdict {
        Verdict::Success { state: None }
    }

    #[test]
    fn the_partial_batch_response_rule() {
        let b = batch(&["9", "10", "100"]);
        // Success in every spelling of "nothing failed".
        for body in ["", "null", "{}", r#"{"batchItemFailures":null}"#, r#"{"batchItemFailures":[]}"#] {
            assert_eq!(judge(&resp(body), ids(&b), true, false), ok(), "{body:?}");
        }
        // The lowest sequence number, compared as integers ("10" < "9" as text).
        let v = judge(
            &resp(r#"{"batchItemFailures":[{"itemIdentifier":"100"},{"itemIdentifier":"10"}]}"#),
            ids(&b),
            true,
            false,
        );
        assert_eq!(v, Verdict::RetryFrom { index: 1, failed: vec![1, 2], state: None });
        // Leading zeros name the same number.
        let v = judge(&resp(r#"{"batchItemFailures":[{"itemIdentifier":"0009"}]}"#), ids(&b), true, false);
        assert_eq!(v, Verdict::RetryFrom { index: 0, failed: vec![0], state: None });
        // Whole-batch failures.
        for body in [
            r#"{"batchItemFailures":[{"itemIdentifier":""}]}"#,
            r#"{"batchItemFailures":[{"itemIdentifier":null}]}"#,
            r#"{"batchItemFailures":[{"itemId":"10"}]}"#,
            r#"{"batchItemFailures":[{"itemIdentifier":"11"}]}"#,
            r#"{"batchItemFailures":"10"}"#,
            "not json",
        ] {
            assert!(matches!(judge(&resp(body), ids(&b), true, false), Verdict::Failed { .. }), "{body}");
        }
        // Without ReportBatchItemFailures the body is ignored.
        assert_eq!(judge(&resp(r#"{"batchItemFailures":[{"itemIdentifier":"10"}]}"#), ids(&b), false, false), ok());
        // A function error fails it all and says why.
        let v = judge(
            &Answer::FunctionError(Bytes::from_static(br#"{"errorType":"E","errorMessage":"m"}"#)),
            ids(&b),
            true,
            false,
        );
        assert_eq!(v, Verdict::Failed { reason: "E: m".into(), function_error: Some("Unhandled".into()) });
    }

    #[test]
    fn without_report_batch_item_failures_the_body_is_not_read() {
        let b = batch(&["1", "2"]);
        for body in ["not json", r#"{"batchItemFailures":[{"itemIdentifier":"2"}]}"#, "\u{ff}"] {
            assert_eq!(judge(&resp(body), ids(&b), false, false), ok(), "{body:?}");
        }
        // A function error still fails the batch.
        let e = Answer::FunctionError(Bytes::from_static(b"{}"));
        assert!(matches!(judge(&e, ids(&b), false, false), Verdict::Failed { .. }));
    }

    #[test]
    fn windows_need_state() {
        let b = batch(&["1", "2"]);
        assert!(matches!(judge(&resp(r#"{"batchItemFailures":[]}"#), ids(&b), true, true), Verdict::Failed { .. }));
        let v =
            judge(&resp(r#"{"state":{"n":"2"},"batchItemFailures":[{"itemIdentifier":"2"}]}"#), ids(&b), true, true);
        assert_eq!(
            v,
            Verdict::RetryFrom {
                index: 1,
                failed: vec![1],
                state: Some(json!({"n": "2"}).as_object().unwrap().clone())
            }
        );
        // AWS's own example returns numbers (services-kinesis-windows: `{"state": {"1": 282, "2":
        // 715}, "batchItemFailures": []}`): they come back as numbers.
        let v = judge(&resp(r#"{"state":{"1":282,"2":715},"batchItemFailures":[]}"#), ids(&b), true, true);
        assert_eq!(v, Verdict::Success { state: Some(json!({"1": 282, "2": 715}).as_object().unwrap().clone()) });
    }

    #[test]
    fn the_failure_record_has_awss_fields() {
        let b = batch(&["5", "6"]);
        let ctx = FailureContext {
            request_id: "r",
            function_arn: "arn:aws:lambda:us-east-1:000000000000:function:f",
            condition: Condition::RetryAttemptsExhausted,
            invoke_count: 3,
            function_error: Some("Unhandled"),
        };
        let batch = batch_info("shardId-000000000000", STREAM, &b);
        let v = failure_record(&ctx, batch.clone(), 1_700_000_000.0);
        assert_eq!(v["requestContext"]["condition"], "RetryAttemptsExhausted");
        assert_eq!(v["requestContext"]["approximateInvokeCount"], 3);
        assert_eq!(v["responseContext"]["functionError"], "Unhandled");
        assert_eq!(v["version"], "1.0");
        let info = &v["KinesisBatchInfo"];
        assert_eq!((info["startSequenceNumber"].as_str(), info["endSequenceNumber"].as_str()), (Some("5"), Some("6")));
        assert_eq!(info["batchSize"], 2);
        // AWS's sample writes times with three decimals: "2019-11-14T00:38:06.021Z".
        assert_eq!(info["approximateArrivalOfFirstRecord"], "1970-01-01T00:00:01.500Z");
        assert_eq!(v["timestamp"], "2023-11-14T22:13:20.000Z");
        assert!(v.get("Records").is_none() && v.get("payload").is_none());
        // A partial failure answered normally is no function error: no functionError at all.
        let partial = failure_record(&FailureContext { function_error: None, ..ctx.clone() }, batch, 0.0);
        assert!(partial["responseContext"].get("functionError").is_none(), "{partial}");
    }

    #[test]
    fn times_have_exactly_three_decimals() {
        assert_eq!(iso8601_millis(1_573_691_886.021), "2019-11-14T00:38:06.021Z");
        assert_eq!(iso8601_millis(1_573_691_886.0), "2019-11-14T00:38:06.000Z");
        assert_eq!(iso8601_millis(1_573_691_886.999_6), "2019-11-14T00:38:07.000Z");
    }
}
