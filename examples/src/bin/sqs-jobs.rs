//! An SQS function in one closure: jobs from a FIFO queue, message groups concurrently, each
//! group in order; a failed job stops the rest of its group, and the response lists the failed
//! and the unprocessed messages, as SQS FIFO needs.
use pushpull::invocation::Invocation;
use pushpull::pull::Options;
use pushpull::pull::sqs::SqsMessage;

#[derive(Debug, pushpull::serde::Deserialize)]
#[serde(crate = "pushpull::serde")]
struct Job {
    action: String,
}

async fn handle(message: SqsMessage, _invocation: Invocation) -> Result<(), String> {
    let job: Job = message.json().map_err(|e| e.to_string())?;
    match job.action.as_str() {
        "resize" | "notify" => Ok(()),
        other => Err(format!("unknown action {other}")),
    }
}

#[tokio::main]
async fn main() -> Result<(), pushpull::lambda::Error> {
    pushpull::lambda::run_sqs(Options::default().per_key(4), handle).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushpull::pull::sqs::SqsEvent;

    #[tokio::test]
    async fn a_failed_job_holds_back_its_group_only() {
        let msgs = [("m1", "g1", "resize"), ("m2", "g2", "explode"), ("m3", "g1", "notify"), ("m4", "g2", "notify")];
        let records: Vec<_> = msgs
            .iter()
            .map(|(id, group, action)| {
                pushpull::serde_json::json!({"messageId": id, "body": format!(r#"{{"action":"{action}"}}"#),
                    "attributes": {"MessageGroupId": group}, "eventSourceARN": "arn:aws:sqs:us-east-1:1:jobs.fifo"})
            })
            .collect();
        let event =
            SqsEvent::from_slice(pushpull::serde_json::json!({ "Records": records }).to_string().as_bytes()).unwrap();
        let invocation = Invocation::new("test");
        let result = pushpull::pull::sqs::process_async(&event, Options::default().per_key(4), |m| {
            handle(m, invocation.clone())
        })
        .await
        .unwrap();
        let ids: Vec<_> = result.item_failures().into_iter().map(|f| f.item_identifier).collect();
        assert_eq!(ids, ["m2", "m4"], "m2 failed; m4 waits behind it; g1 is done");
    }
}
