//! The rollup on SQS events (`aws:sqs`): every message counted exactly once, as on Amazon MQ
//! ([`crate::mq`]): a standard queue delivers "at least once", a failed batch comes back after its
//! visibility timeout, and the push function's retry sends the lines after its last checkpoint
//! again. A message is recognised by the push function's `pushpull-origin` attribute
//! (`pushpull::sink::sqs`: its object and line); the queue's checkpoint is
//! `pull/sqs/<queue>.json` in `CHECKPOINT_URI`. A message that cannot be rolled up is set aside
//! under `rejected/<queue>/` with its reason, as on Amazon MQ: the batch succeeds, so that SQS's
//! redrive policy does not dead-letter the good messages delivered with it.
use base64::Engine as _;
use pushpull::pull::sqs::SqsEvent;

use super::mq::{QueueId, QueueMessage, path_segment};
use super::{BatchResponse, Response, RollupError, RollupHandler};

/// The message attribute that names a message's object and line.
const ORIGIN_ATTRIBUTE: &str = "pushpull-origin";
/// The message attribute holding its partition key.
const PARTITION_KEY_ATTRIBUTE: &str = "pushpull-partition-key";

impl RollupHandler {
    /// An SQS event: its queue's messages rolled up exactly once. Nothing is reported failed.
    pub(crate) async fn handle_sqs(&self, event: &SqsEvent) -> Result<Response, RollupError> {
        let mut metrics = pushpull::pull::sqs::batch_metrics(event);
        // One queue per event (a mapping reads one); grouped anyway, in order.
        let mut queues: Vec<(&str, Vec<&pushpull::pull::sqs::SqsMessage>)> = Vec::new();
        for m in &event.records {
            let queue = m.event_source_arn.rsplit(':').next().unwrap_or_default();
            match queues.iter_mut().find(|(q, _)| *q == queue) {
                Some((_, list)) => list.push(m),
                None => queues.push((queue, vec![m])),
            }
        }
        for (queue, list) in queues {
            let span = tracing::info_span!("batch", queue = %queue, messages = list.len());
            let _enter = span.enter();
            let id = QueueId {
                checkpoint: format!("pull/sqs/{}.json", path_segment(queue)),
                label: queue.to_owned(),
                queue,
            };
            let messages: Vec<QueueMessage<'_>> = list
                .iter()
                .map(|m| {
                    let mut about = serde_json::Map::new();
                    about.insert("sqs_message_id".into(), m.message_id.clone().into());
                    about.insert("receive_count".into(), m.receive_count().into());
                    QueueMessage {
                        name: m.attribute_text(ORIGIN_ATTRIBUTE),
                        partition_key: m.attribute_text(PARTITION_KEY_ATTRIBUTE).unwrap_or_default().to_owned(),
                        data: std::borrow::Cow::Owned(base64::engine::general_purpose::STANDARD.encode(&m.body)),
                        about,
                    }
                })
                .collect();
            let (counted, failed) = self.handle_queue(&id, &messages).await?;
            metrics.processed += counted;
            metrics.failed += failed;
        }
        metrics.record();
        Ok(Response::Batch(BatchResponse::default()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use pushpull::config::Env;
    use pushpull::store::Store;

    use crate::{RollupHandler, RollupSettings};

    fn handler(dir: &std::path::Path) -> RollupHandler {
        let env = Env::from_pairs([("GROUP_BY_FIELD", "user"), ("SUM_FIELD", "n")]).with_local_locations(dir);
        RollupHandler::new(
            RollupSettings::from_env(env).unwrap(),
            Store::file(dir.join("out")),
            Store::file(dir.join("cp")),
        )
    }

    /// An SQS event of `(origin attribute, body, receive count)` from queue `records`.
    fn event(messages: &[(Option<&str>, &str, u32)]) -> Vec<u8> {
        let list: Vec<serde_json::Value> = messages
            .iter()
            .enumerate()
            .map(|(i, (origin, body, count))| {
                let mut attrs = serde_json::json!({"pushpull-partition-key":
                    {"stringValue": "pk", "stringListValues": [], "binaryListValues": [], "dataType": "String"}});
                if let Some(o) = origin {
                    attrs["pushpull-origin"] = serde_json::json!({"stringValue": o, "dataType": "String"});
                }
                serde_json::json!({"messageId": format!("sqs-{i}-{count}"), "receiptHandle": "r", "body": body,
                    "attributes": {"ApproximateReceiveCount": count.to_string(), "SentTimestamp": "1"},
                    "messageAttributes": attrs, "md5OfBody": "", "eventSource": "aws:sqs",
                    "eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:records", "awsRegion": "us-east-1"})
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({ "Records": list })).unwrap()
    }

    fn counts(dir: &std::path::Path) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for e in std::fs::read_dir(dir.join("out/records")).unwrap() {
            for line in std::fs::read_to_string(e.unwrap().path()).unwrap().lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                *out.entry(v["key"].as_str().unwrap().to_owned()).or_default() += v["count"].as_u64().unwrap();
            }
        }
        out
    }

    /// A standard queue delivers at least once, a failed batch comes back, the push function
    /// resends: each line is counted once, by its origin attribute; a bad one is set aside.
    #[tokio::test]
    async fn duplicates_count_once_and_a_bad_message_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let h = handler(dir.path());
        let ann = r#"{"user":"ann","n":1}"#;
        let bob = r#"{"user":"bob","n":2}"#;
        h.handle(&event(&[(Some("b/k@e#1"), ann, 1), (Some("b/k@e#2"), bob, 1)])).await.unwrap();
        h.handle(&event(&[(Some("b/k@e#2"), bob, 2), (Some("b/k@e#3"), ann, 1), (Some("b/k@e#3"), ann, 1)]))
            .await
            .unwrap();
        h.handle(&event(&[(Some("b/k@e#4"), "not json", 1)])).await.unwrap();
        let want: BTreeMap<String, u64> = [("ann".to_owned(), 2), ("bob".to_owned(), 1)].into();
        assert_eq!(counts(dir.path()), want);
        let cp = std::fs::read_to_string(dir.path().join("cp/pull/sqs/records.json")).unwrap();
        assert_eq!(cp, r#"{"lines":{"b/k@e":[[1,4]]}}"#);
        let rejected: Vec<String> = std::fs::read_dir(dir.path().join("out/rejected/records"))
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect();
        assert_eq!(rejected.len(), 1);
        let r: serde_json::Value = serde_json::from_str(rejected[0].trim()).unwrap();
        assert_eq!((r["message_id"].as_str(), r["receive_count"].as_u64()), (Some("b/k@e#4"), Some(1)), "{r}");
    }
}
