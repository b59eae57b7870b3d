//! Talking to the local AWS (LocalStack on 127.0.0.1): clients, resources, and reading a stream
//! back the way an event source mapping would see it.
use std::time::Duration;

use aws_sdk_kinesis::types::{ShardIteratorType, StreamStatus};

/// A call to the local AWS failed: which call on what, AWS's words for why, and the SDK's error
/// kept as the source.
#[derive(Debug, thiserror::Error)]
#[error("{call}: {message}")]
pub struct LocalError {
    /// The call and what it was on (`CreateStream orders`).
    pub call: String,
    /// Why, as AWS words it (`ResourceInUseException: ...`).
    pub message: String,
    /// The SDK's error, if the call reached the SDK.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl LocalError {
    /// `call` failed with the SDK's error `e`.
    pub fn sdk<E, R>(call: impl Into<String>, e: aws_smithy_runtime_api::client::result::SdkError<E, R>) -> Self
    where
        E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        LocalError { call: call.into(), message: pushpull::aws::describe(&e), source: Some(Box::new(e)) }
    }

    /// `call` did not come to what was asked (`message`), without an error of the SDK's.
    pub fn new(call: impl Into<String>, message: impl Into<String>) -> Self {
        LocalError { call: call.into(), message: message.into(), source: None }
    }
}

/// The LocalStack endpoint: `LOCALSTACK_ENDPOINT`, else `http://127.0.0.1:4566`.
pub fn endpoint() -> String {
    std::env::var("LOCALSTACK_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4566".to_owned())
}

/// The region everything local lives in.
pub const REGION: &str = "us-east-1";
/// The account LocalStack reports.
pub const ACCOUNT: &str = "000000000000";

/// Environment that points a function binary (or any AWS SDK) at LocalStack.
pub fn function_env() -> Vec<(String, String)> {
    [
        ("AWS_ENDPOINT_URL", endpoint()),
        ("AWS_REGION", REGION.to_owned()),
        ("AWS_DEFAULT_REGION", REGION.to_owned()),
        ("AWS_ACCESS_KEY_ID", "test".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// LocalStack is not there.
#[derive(Debug, thiserror::Error)]
#[error(
    "LocalStack is not answering at {endpoint} ({reason}); start it with `infra/localstack.sh up` (`make test` and `make run` do)"
)]
pub struct NotRunning {
    /// Where it was looked for.
    pub endpoint: String,
    /// What happened.
    pub reason: String,
}

/// Clients for the three services the project uses.
#[derive(Debug, Clone)]
pub struct Local {
    /// S3 (path-style addressing).
    pub s3: aws_sdk_s3::Client,
    /// Kinesis.
    pub kinesis: aws_sdk_kinesis::Client,
    /// SQS.
    pub sqs: aws_sdk_sqs::Client,
    /// SNS (a failure destination).
    pub sns: aws_sdk_sns::Client,
    /// EventBridge (an async-invoke failure destination).
    pub events: aws_sdk_eventbridge::Client,
}

impl Local {
    /// Clients for LocalStack; fails clearly when it is not running (never skips).
    pub async fn connect() -> Result<Self, NotRunning> {
        let endpoint = endpoint();
        let local = Local::at(&endpoint, "test").await;
        local
            .kinesis
            .list_streams()
            .send()
            .await
            .map_err(|e| NotRunning { endpoint: endpoint.clone(), reason: pushpull::aws::describe(&e) })?;
        Ok(local)
    }

    /// Clients for `endpoint` (LocalStack, or the realism proxy in front of it) signing with
    /// `access_key` (a role's key, for the proxy's IAM checks); nothing is called.
    pub async fn at(endpoint: &str, access_key: &str) -> Self {
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(endpoint)
            .region(aws_config::Region::new(REGION))
            .credentials_provider(aws_sdk_s3::config::Credentials::new(access_key, "test", None, None, "local"))
            .load()
            .await;
        let s3 =
            aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&config).force_path_style(true).build());
        Local {
            s3,
            kinesis: aws_sdk_kinesis::Client::new(&config),
            sqs: aws_sdk_sqs::Client::new(&config),
            sns: aws_sdk_sns::Client::new(&config),
            events: aws_sdk_eventbridge::Client::new(&config),
        }
    }

    /// Creates `bucket` if missing.
    pub async fn ensure_bucket(&self, bucket: &str) -> Result<(), LocalError> {
        match self.s3.create_bucket().bucket(bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let msg = pushpull::aws::describe(&e);
                if msg.contains("BucketAlreadyOwnedByYou") || msg.contains("BucketAlreadyExists") {
                    Ok(())
                } else {
                    Err(LocalError::sdk(format!("CreateBucket {bucket}"), e))
                }
            }
        }
    }

    /// Creates `stream` with `shards` shards if missing, waits until it is ACTIVE, returns its ARN.
    pub async fn ensure_stream(&self, stream: &str, shards: i32) -> Result<String, LocalError> {
        if let Err(e) = self.kinesis.create_stream().stream_name(stream).shard_count(shards).send().await
            && !e.as_service_error().is_some_and(|se| se.is_resource_in_use_exception())
        {
            return Err(LocalError::sdk(format!("CreateStream {stream}"), e));
        }
        for _ in 0..200 {
            let d = self
                .kinesis
                .describe_stream_summary()
                .stream_name(stream)
                .send()
                .await
                .map_err(|e| LocalError::sdk(format!("DescribeStreamSummary {stream}"), e))?;
            if let Some(s) = d.stream_description_summary()
                && s.stream_status() == &StreamStatus::Active
            {
                return Ok(s.stream_arn().to_owned());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(LocalError::new(format!("DescribeStreamSummary {stream}"), "the stream did not become ACTIVE"))
    }

    /// Registers the stream consumer `name` on `stream_arn` if missing (enhanced fan-out), waits
    /// until it is ACTIVE, returns its ARN.
    pub async fn ensure_consumer(&self, stream_arn: &str, name: &str) -> Result<String, LocalError> {
        if let Err(e) = self.kinesis.register_stream_consumer().stream_arn(stream_arn).consumer_name(name).send().await
            && !e.as_service_error().is_some_and(|se| se.is_resource_in_use_exception())
        {
            return Err(LocalError::sdk(format!("RegisterStreamConsumer {name} on {stream_arn}"), e));
        }
        for _ in 0..200 {
            let d = self
                .kinesis
                .describe_stream_consumer()
                .stream_arn(stream_arn)
                .consumer_name(name)
                .send()
                .await
                .map_err(|e| LocalError::sdk(format!("DescribeStreamConsumer {name}"), e))?;
            if let Some(c) = d.consumer_description()
                && c.consumer_status() == &aws_sdk_kinesis::types::ConsumerStatus::Active
            {
                return Ok(c.consumer_arn().to_owned());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(LocalError::new(format!("DescribeStreamConsumer {name}"), "the consumer did not become ACTIVE"))
    }

    /// Creates an SQS queue and makes `bucket` send ObjectCreated notifications for keys under
    /// `prefix` to it (S3's own event source, as it would notify Lambda). Returns the queue URL.
    pub async fn notify_queue(&self, bucket: &str, queue: &str, prefix: &str) -> Result<String, LocalError> {
        use aws_sdk_s3::types::{
            Event, FilterRule, FilterRuleName, NotificationConfiguration, NotificationConfigurationFilter,
            QueueConfiguration, S3KeyFilter,
        };
        let url = self
            .sqs
            .create_queue()
            .queue_name(queue)
            .send()
            .await
            .map_err(|e| LocalError::sdk(format!("CreateQueue {queue}"), e))?;
        let url = url.queue_url().unwrap_or_default().to_owned();
        let arn = format!("arn:aws:sqs:{REGION}:{ACCOUNT}:{queue}");
        let filter = NotificationConfigurationFilter::builder()
            .key(
                S3KeyFilter::builder()
                    .filter_rules(FilterRule::builder().name(FilterRuleName::Prefix).value(prefix).build())
                    .build(),
            )
            .build();
        let qc = QueueConfiguration::builder()
            .queue_arn(arn)
            .events(Event::from("s3:ObjectCreated:*"))
            .filter(filter)
            .build()
            .map_err(|e| LocalError {
                call: format!("QueueConfiguration {queue}"),
                message: e.to_string(),
                source: Some(Box::new(e)),
            })?;
        self.s3
            .put_bucket_notification_configuration()
            .bucket(bucket)
            .notification_configuration(NotificationConfiguration::builder().queue_configurations(qc).build())
            .send()
            .await
            .map_err(|e| LocalError::sdk(format!("PutBucketNotificationConfiguration {bucket}"), e))?;
        Ok(url)
    }

    /// Receives up to 10 messages (long-polling `wait`), returning (receipt handle, body).
    pub async fn receive(&self, queue_url: &str, wait: Duration) -> Result<Vec<(String, String)>, LocalError> {
        let out = self
            .sqs
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(wait.as_secs().min(20) as i32)
            .send()
            .await
            .map_err(|e| LocalError::sdk("ReceiveMessage", e))?;
        Ok(out
            .messages()
            .iter()
            .map(|m| (m.receipt_handle().unwrap_or_default().to_owned(), m.body().unwrap_or_default().to_owned()))
            .collect())
    }

    /// Deletes a received message.
    pub async fn delete_message(&self, queue_url: &str, receipt: &str) -> Result<(), LocalError> {
        self.sqs
            .delete_message()
            .queue_url(queue_url)
            .receipt_handle(receipt)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| LocalError::sdk("DeleteMessage", e))
    }

    /// Reads every record now in `stream`, shard by shard from TRIM_HORIZON, in sequence order.
    pub async fn read_stream(&self, stream: &str) -> Result<Vec<StreamRecord>, LocalError> {
        let iterators = self.shard_iterators(stream, ShardIteratorType::TrimHorizon).await?;
        self.read_from(stream, iterators).await
    }

    /// One iterator per shard of `stream`, of the given type: take LATEST ones before writing to
    /// read back only what was written after.
    pub async fn shard_iterators(
        &self,
        stream: &str,
        kind: ShardIteratorType,
    ) -> Result<Vec<(String, String)>, LocalError> {
        // ListShards pages: the first call names the stream, later ones only the token.
        let mut shards = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let req = match &token {
                Some(t) => self.kinesis.list_shards().next_token(t),
                None => self.kinesis.list_shards().stream_name(stream),
            };
            let page = req.send().await.map_err(|e| LocalError::sdk(format!("ListShards {stream}"), e))?;
            shards.extend(page.shards().iter().cloned());
            token = page.next_token().map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
        let mut out = Vec::new();
        for shard in &shards {
            let shard_id = shard.shard_id().to_owned();
            let it = self
                .kinesis
                .get_shard_iterator()
                .stream_name(stream)
                .shard_id(&shard_id)
                .shard_iterator_type(kind.clone())
                .send()
                .await
                .map_err(|e| LocalError::sdk(format!("GetShardIterator {stream}/{shard_id}"), e))?;
            out.push((shard_id, it.shard_iterator().unwrap_or_default().to_owned()));
        }
        Ok(out)
    }

    /// Reads from each (shard, iterator) until the shard has nothing more now.
    pub async fn read_from(
        &self,
        stream: &str,
        iterators: Vec<(String, String)>,
    ) -> Result<Vec<StreamRecord>, LocalError> {
        let mut all = Vec::new();
        for (shard_id, first) in iterators {
            let mut iterator = Some(first).filter(|i| !i.is_empty());
            while let Some(current) = iterator.take() {
                let out = self
                    .kinesis
                    .get_records()
                    .shard_iterator(&current)
                    .limit(10_000)
                    .send()
                    .await
                    .map_err(|e| LocalError::sdk(format!("GetRecords {stream}/{shard_id}"), e))?;
                for r in out.records() {
                    all.push(StreamRecord {
                        shard_id: shard_id.clone(),
                        sequence_number: r.sequence_number().to_owned(),
                        partition_key: r.partition_key().unwrap_or_default().to_owned(),
                        data: r.data().as_ref().to_vec(),
                        arrival: r.approximate_arrival_timestamp().map_or(0.0, |t| t.as_secs_f64()),
                    });
                }
                // An empty page is the end only when caught up: AWS answers empty pages before
                // records that exist.
                if out.records().is_empty() && out.millis_behind_latest().unwrap_or(0) == 0 {
                    break;
                }
                iterator = out.next_shard_iterator().map(str::to_owned);
            }
        }
        Ok(all)
    }
}

/// A record read from a stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamRecord {
    /// Its shard.
    pub shard_id: String,
    /// Its sequence number.
    pub sequence_number: String,
    /// Its partition key.
    pub partition_key: String,
    /// Its data.
    pub data: Vec<u8>,
    /// Arrival time, seconds since the epoch.
    pub arrival: f64,
}

/// A Kinesis event exactly as the event source mapping shapes it, for `records` of one shard
/// (the mapping's own [`crate::mapping::event::event_json`], as JSON).
pub fn kinesis_event(records: &[StreamRecord], stream_arn: &str) -> serde_json::Value {
    let recs: Vec<crate::mapping::event::Rec> = records
        .iter()
        .enumerate()
        .map(|(i, r)| crate::mapping::event::Rec {
            shard_id: std::sync::Arc::from(r.shard_id.as_str()),
            // Only the event's text is built here; `seq` (for comparisons) is not used by it.
            seq: r.sequence_number.parse().or_else(|_| "0".parse()).expect("0 is a sequence number"),
            sequence_number: r.sequence_number.clone(),
            partition_key: r.partition_key.clone(),
            data: bytes::Bytes::copy_from_slice(&r.data),
            arrival: r.arrival,
            encryption: None,
            index: i as u64,
        })
        .collect();
    let shard = records.first().map_or("", |r| r.shard_id.as_str());
    let role = format!("arn:aws:iam::{ACCOUNT}:role/pushpull-local");
    let text = crate::mapping::event::event_json(&recs, shard, stream_arn, &role, None);
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
}

/// The URL of the SQS queue with this ARN.
pub async fn queue_url(sqs: &aws_sdk_sqs::Client, arn: &str) -> Result<String, LocalError> {
    let name = arn.rsplit(':').next().unwrap_or_default();
    let out = sqs
        .get_queue_url()
        .queue_name(name)
        .send()
        .await
        .map_err(|e| LocalError::sdk(format!("GetQueueUrl {name}"), e))?;
    Ok(out.queue_url().unwrap_or_default().to_owned())
}

/// LocalStack's Secrets Manager, through its JSON protocol (`X-Amz-Target: secretsmanager.*`):
/// the two calls the Amazon MQ mapping's `BASIC_AUTH` needs, without another SDK crate.
pub mod secrets {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::Request;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    use super::LocalError;

    async fn call(action: &str, body: serde_json::Value) -> Result<serde_json::Value, LocalError> {
        let what = format!("secretsmanager:{action}");
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let req = Request::post(super::endpoint())
            .header("content-type", "application/x-amz-json-1.1")
            .header("x-amz-target", format!("secretsmanager.{action}"))
            // LocalStack routes by the credential scope's service name.
            .header(
                "authorization",
                format!(
                    "AWS4-HMAC-SHA256 Credential=test/20260101/{}/secretsmanager/aws4_request, SignedHeaders=host, Signature=0",
                    super::REGION
                ),
            )
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| LocalError::new(&what, e.to_string()))?;
        let resp = client.request(req).await.map_err(|e| LocalError::new(&what, pushpull::aws::error_chain(&e)))?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| LocalError::new(&what, e.to_string()))?.to_bytes();
        if !status.is_success() {
            return Err(LocalError::new(&what, format!("{status}: {}", String::from_utf8_lossy(&bytes))));
        }
        serde_json::from_slice(&bytes).map_err(|e| LocalError::new(&what, format!("answer is not JSON: {e}")))
    }

    /// Creates secret `name` holding `value` (or puts a new value in it if it exists); its ARN.
    pub async fn put(name: &str, value: &serde_json::Value) -> Result<String, LocalError> {
        let created = call(
            "CreateSecret",
            serde_json::json!({"Name": name, "SecretString": value.to_string(), "ClientRequestToken": uuid::Uuid::new_v4().to_string()}),
        )
        .await;
        let answer = match created {
            Ok(a) => a,
            Err(e) if e.message.contains("ResourceExistsException") => {
                call(
                    "PutSecretValue",
                    serde_json::json!({"SecretId": name, "SecretString": value.to_string(), "ClientRequestToken": uuid::Uuid::new_v4().to_string()}),
                )
                .await?
            }
            Err(e) => return Err(e),
        };
        answer["ARN"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| LocalError::new(format!("secretsmanager:CreateSecret {name}"), "the answer has no ARN"))
    }

    /// The JSON a secret holds (`GetSecretValue`'s `SecretString`).
    pub async fn json(secret_id: &str) -> Result<serde_json::Value, LocalError> {
        let answer = call("GetSecretValue", serde_json::json!({"SecretId": secret_id})).await?;
        let text = answer["SecretString"].as_str().unwrap_or_default();
        serde_json::from_str(text).map_err(|e| {
            LocalError::new(
                format!("secretsmanager:GetSecretValue {secret_id}"),
                format!("SecretString is not JSON: {e}"),
            )
        })
    }

    /// Replaces each CloudFormation dynamic reference
    /// `{{resolve:secretsmanager:<id>:SecretString:<key>}}` in `value` with the secret's key, as
    /// CloudFormation does at deployment.
    pub async fn resolve_references(value: &str) -> Result<String, LocalError> {
        const OPEN: &str = "{{resolve:secretsmanager:";
        let mut out = String::new();
        let mut rest = value;
        while let Some(at) = rest.find(OPEN) {
            out.push_str(&rest[..at]);
            let after = &rest[at + OPEN.len()..];
            let Some(end) = after.find("}}") else { break };
            let reference = &after[..end];
            // <id>:SecretString:<key>[:...]: the id is an ARN (with colons) or a name.
            let Some((id, key)) = reference.split_once(":SecretString:") else {
                return Err(LocalError::new(
                    "dynamic reference",
                    format!("{{{{resolve:secretsmanager:{reference}}}}} names no SecretString key"),
                ));
            };
            let key = key.split(':').next().unwrap_or(key);
            let secret = json(id).await?;
            let Some(v) = secret.get(key).and_then(|v| v.as_str()) else {
                return Err(LocalError::new(
                    format!("dynamic reference to {id}"),
                    format!("the secret has no string {key:?}"),
                ));
            };
            out.push_str(v);
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        Ok(out)
    }
}
