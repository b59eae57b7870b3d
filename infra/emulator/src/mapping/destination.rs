//! Delivery to the OnFailure destination: SQS and SNS get the failure record; S3 gets the failure
//! record with the invocation payload, under `aws/lambda/<mapping>/<shard>/YYYY/MM/DD/...` as
//! AWS names it. For async invoke also a Lambda function (invoked with the record as its event)
//! and an EventBridge bus (the record as the `detail` of an event from `lambda`); for a Kafka
//! mapping also a topic of its cluster (one message per failed record: `kafka::dead_letter`). A destination
//! that cannot be reached is retried: the shard waits rather than lose the batch.
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::sync::OnceCell;
use tracing::warn;

use super::settings::Destination;
use super::{Clients, MappingError};

/// Where the records a mapping gives up on go: a [`FailureDestination`], or in the mapping's own
/// tests a list in memory.
pub trait FailureSink: Send + Sync + 'static {
    /// Sends `record` (and for S3 the invocation `payload`) of records from `partition`, retrying
    /// until it is accepted; returns where it went.
    fn send<'a>(
        &'a self,
        record: &'a Value,
        payload: Option<&'a str>,
        partition: &'a str,
    ) -> BoxFuture<'a, Result<String, MappingError>>;
}

impl FailureSink for FailureDestination {
    fn send<'a>(
        &'a self,
        record: &'a Value,
        payload: Option<&'a str>,
        partition: &'a str,
    ) -> BoxFuture<'a, Result<String, MappingError>> {
        Box::pin(FailureDestination::send(self, record, payload, partition))
    }
}

/// Sends failure records to one destination.
#[derive(Debug)]
pub struct FailureDestination {
    destination: Destination,
    clients: Clients,
    mapping_id: String,
    queue_url: OnceCell<String>,
    invoker: Option<crate::invoke::InvokeClient>,
    producer: OnceCell<Producer>,
}

/// The producer of a `kafka://` destination, made on first use on the source's cluster.
struct Producer(rdkafka::producer::FutureProducer);

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Producer")
    }
}

impl FailureDestination {
    /// For `destination`; `mapping_id` names the S3 objects (AWS uses the mapping's UUID).
    pub fn new(destination: Destination, clients: Clients, mapping_id: String) -> Self {
        FailureDestination {
            destination,
            clients,
            mapping_id,
            queue_url: OnceCell::new(),
            invoker: None,
            producer: OnceCell::new(),
        }
    }

    /// Invokes a Lambda destination through `invoker` (the local Invoke API).
    pub fn with_invoker(mut self, invoker: crate::invoke::InvokeClient) -> Self {
        self.invoker = Some(invoker);
        self
    }

    /// The destination.
    pub fn destination(&self) -> &Destination {
        &self.destination
    }

    async fn queue_url(&self, arn: &str) -> Result<String, String> {
        self.queue_url
            .get_or_try_init(|| crate::localstack::queue_url(&self.clients.sqs, arn))
            .await
            .cloned()
            .map_err(|e| e.to_string())
    }

    async fn try_send(&self, record: &Value, payload: Option<&str>, shard_id: &str) -> Result<String, String> {
        match &self.destination {
            Destination::Kafka(d) => {
                let topic = d.trim_start_matches("kafka://");
                let payload = payload.ok_or("a Kafka destination needs the batch's records")?;
                let letters = super::kafka::dead_letter::dead_letters(record, payload)?;
                // The source's cluster: the event names its servers.
                let servers = serde_json::from_str::<Value>(payload)
                    .ok()
                    .and_then(|e| e["bootstrapServers"].as_str().map(str::to_owned))
                    .ok_or("the batch's event names no bootstrapServers")?;
                let producer = self
                    .producer
                    .get_or_try_init(|| async {
                        rdkafka::ClientConfig::new()
                            .set("bootstrap.servers", &servers)
                            .set("message.timeout.ms", "10000")
                            .set("allow.auto.create.topics", "false")
                            // A failed record of up to 6 MB comes back base64 (4/3 larger) with
                            // its metadata: the topic's own limit decides, not the client's 1 MB.
                            .set("message.max.bytes", "16777216")
                            .create()
                            .map(Producer)
                            .map_err(|e| format!("Kafka producer for {servers}: {e}"))
                    })
                    .await?;
                // In order, each acknowledged before the next: a retry after a failure may write
                // a message again (at least once, as every destination here is).
                for letter in &letters {
                    let value = letter.value.to_string();
                    let mut message = rdkafka::producer::FutureRecord::<[u8], str>::to(topic).payload(&value);
                    if let Some(k) = &letter.key {
                        message = message.key(k.as_slice());
                    }
                    producer
                        .0
                        .send(message, Duration::from_secs(10))
                        .await
                        .map_err(|(e, _)| format!("Produce to {d}: {e}"))?;
                }
                Ok(d.clone())
            }
            Destination::Sqs(arn) => {
                let url = self.queue_url(arn).await?;
                self.clients
                    .sqs
                    .send_message()
                    .queue_url(&url)
                    .message_body(record.to_string())
                    .send()
                    .await
                    .map_err(|e| format!("SendMessage {arn}: {}", pushpull::aws::describe(&e)))?;
                Ok(arn.clone())
            }
            Destination::Sns(arn) => {
                // AWS publishes the same failure record as SQS gets (metadata, no records).
                self.clients
                    .sns
                    .publish()
                    .topic_arn(arn)
                    .message(record.to_string())
                    .send()
                    .await
                    .map_err(|e| format!("Publish {arn}: {}", pushpull::aws::describe(&e)))?;
                Ok(arn.clone())
            }
            Destination::S3(arn) => {
                let bucket = arn.rsplit(':').next().unwrap_or_default();
                let mut body = record.clone();
                if let Some(p) = payload {
                    // The invocation payload, as the function would have received it.
                    body["payload"] = serde_json::from_str(p).unwrap_or_else(|_| Value::from(p));
                }
                let now = aws_smithy_types::DateTime::from_secs_f64(super::clock::now_unix());
                let stamp = now.fmt(aws_smithy_types::date_time::Format::DateTime).unwrap_or_default();
                // 2026-11-25T03:04:05Z -> 2026/11/25/2026-11-25T03.04.05-<uuid>
                let day = stamp.get(..10).unwrap_or("1970-01-01").replace('-', "/");
                let time = stamp.get(..19).unwrap_or_default().replace(':', ".");
                let shard = if shard_id.is_empty() { String::new() } else { format!("{shard_id}/") };
                let key = format!("aws/lambda/{}/{shard}{day}/{time}-{}", self.mapping_id, uuid::Uuid::new_v4());
                self.clients
                    .s3
                    .put_object()
                    .bucket(bucket)
                    .key(&key)
                    .content_type("application/json")
                    .body(body.to_string().into_bytes().into())
                    .send()
                    .await
                    .map_err(|e| format!("PutObject s3://{bucket}/{key}: {}", pushpull::aws::describe(&e)))?;
                Ok(format!("s3://{bucket}/{key}"))
            }
            Destination::Lambda(arn) => {
                // Lambda invokes the destination function asynchronously with the record as its
                // event; locally one invocation through the Invoke API. Its own failure is logged,
                // not retried: the record was delivered.
                let invoker = self.invoker.as_ref().ok_or("a Lambda destination needs the Invoke API")?;
                let name = arn.rsplit_once(":function:").map_or(arn.as_str(), |(_, n)| n);
                let name = name.split(':').next().unwrap_or(name);
                let invoked = invoker
                    .invoke(name, bytes::Bytes::from(record.to_string()))
                    .await
                    .map_err(|e| format!("Invoke {arn}: {e}"))?;
                if let super::outcome::Answer::FunctionError(body) = &invoked.answer {
                    warn!(function = name, error = %String::from_utf8_lossy(body), "the destination function failed on the record");
                }
                Ok(arn.clone())
            }
            Destination::EventBridge(arn) => {
                // AWS's event: source "lambda", detail-type "Lambda Function Invocation Result -
                // Failure", the function as the resource, the record as the detail.
                let mut entry = aws_sdk_eventbridge::types::PutEventsRequestEntry::builder()
                    .event_bus_name(arn)
                    .source("lambda")
                    .detail_type("Lambda Function Invocation Result - Failure")
                    .detail(record.to_string());
                if let Some(f) = record["requestContext"]["functionArn"].as_str() {
                    entry = entry.resources(f);
                }
                let out = self
                    .clients
                    .events
                    .put_events()
                    .entries(entry.build())
                    .send()
                    .await
                    .map_err(|e| format!("PutEvents {arn}: {}", pushpull::aws::describe(&e)))?;
                if out.failed_entry_count() > 0 {
                    let why = out.entries().first().and_then(|e| e.error_message()).unwrap_or("no reason given");
                    return Err(format!("PutEvents {arn}: the entry failed: {why}"));
                }
                Ok(arn.clone())
            }
        }
    }

    /// Sends `record` (and for S3 the `payload`), retrying (20 attempts, up to 5 s
    /// apart) until it is accepted. Returns where it went.
    pub async fn send(&self, record: &Value, payload: Option<&str>, shard_id: &str) -> Result<String, MappingError> {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            match self.try_send(record, payload, shard_id).await {
                Ok(at) => return Ok(at),
                Err(e) if attempt < 20 => {
                    warn!(error = %e, attempt, "failure destination not reachable; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    attempt += 1;
                }
                Err(e) => return Err(MappingError::Destination(e)),
            }
        }
    }
}
