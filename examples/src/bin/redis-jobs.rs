//! A Redis function: jobs from `pushpull-local`'s Redis Streams mapping or pub/sub relay (the
//! event is pushpull's own, `pushpull::pull::redis`: Redis is no Lambda event source), each
//! entry's data decoded from JSON. The response lists the failed entries: on a stream they stay
//! pending and come again, every other is acknowledged.
use pushpull::pull::Options;
use pushpull::pull::redis::{RedisEvent, RedisRecord};

#[derive(Debug, pushpull::serde::Deserialize)]
#[serde(crate = "pushpull::serde")]
struct Job {
    action: String,
}

async fn handle(record: RedisRecord) -> Result<(), String> {
    let job: Job = record.json().map_err(|e| e.to_string())?;
    match job.action.as_str() {
        "resize" | "notify" => Ok(()),
        other => Err(format!("unknown action {other} in entry {}", record.id)),
    }
}

#[tokio::main]
async fn main() -> Result<(), pushpull::lambda::Error> {
    pushpull::lambda::run_raw(|body, _context| async move {
        let event = RedisEvent::from_slice(&body)?;
        let result = pushpull::pull::redis::process_async(&event, Options::default(), handle).await;
        Ok::<_, pushpull::lambda::Error>(result.response())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_job_is_listed_and_the_rest_acknowledged() {
        let data = |action: &str| pushpull::serde_json::json!({ "action": action }).to_string();
        let records: Vec<_> = [("1-0", "resize"), ("1-1", "explode"), ("1-2", "notify")]
            .iter()
            .map(|(id, action)| {
                pushpull::serde_json::json!({"eventSource": "pushpull:redis-streams", "stream": "jobs", "id": id,
                    "data": base64_of(&data(action))})
            })
            .collect();
        let event =
            RedisEvent::from_slice(pushpull::serde_json::json!({ "Records": records }).to_string().as_bytes()).unwrap();
        let result = pushpull::pull::redis::process_async(&event, Options::default(), handle).await;
        let ids: Vec<_> = result.item_failures().into_iter().map(|f| f.item_identifier).collect();
        assert_eq!(ids, ["1-1"]);
    }

    fn base64_of(text: &str) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(text)
    }
}
