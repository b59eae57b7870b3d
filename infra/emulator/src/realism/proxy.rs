//! The realism proxy: HTTP on 127.0.0.1 in front of LocalStack. Clients reach it through
//! `AWS_ENDPOINT_URL`; it forwards every call, and on the way applies Kinesis's per-shard limits
//! ([`super::kinesis`]), the random faults of the profile, and the template's IAM roles
//! ([`super::iam`]). Calls are told apart by `X-Amz-Target` (Kinesis, SQS) and otherwise taken
//! to be S3 (path-style).
//!
//! Random faults (S3 `SlowDown` and cut bodies) hit only calls signed by a function's role: the
//! tests and the local mapping's own bookkeeping (AWS's side) are observers, not the system under
//! test. Kinesis's limits and Kinesis's faults apply to every caller, as a shard's limits do.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::http::request::Parts;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::Realism;
use super::fanout::{self, Admin, AdminError, AdminFuture, Fanout};
use super::iam::{self, Decision, Policies};
use super::kinesis::{Iterator, Iterators, Lookup, ShardLimits, ShardRange, shard_for, shard_ranges};
use crate::localstack::ACCOUNT;

type Body = BoxBody<Bytes, std::io::Error>;

/// The proxy; stops when dropped.
pub struct RealismProxy {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    realism: Arc<Realism>,
    state: Arc<State>,
}

struct State {
    realism: Arc<Realism>,
    policies: Policies,
    upstream: String,
    client: Client<HttpConnector, Full<Bytes>>,
    limits: Option<Mutex<ShardLimits>>,
    iterators: Mutex<Iterators>,
    shards: Mutex<std::collections::HashMap<String, (Instant, Vec<ShardRange>)>>,
    fanout: Arc<Fanout>,
    /// `SubscribeToShard` calls by HTTP version: [HTTP/1.x, HTTP/2].
    subscribe_calls: [std::sync::atomic::AtomicU64; 2],
}

impl RealismProxy {
    /// Serves on 127.0.0.1 (a free port), forwarding to `upstream` (LocalStack). `policies` are
    /// enforced when the realism's config says `iam`.
    pub async fn start(realism: Arc<Realism>, policies: Policies, upstream: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let config = realism.config().clone();
        let state = Arc::new(State {
            realism: realism.clone(),
            policies: if config.iam { policies } else { Policies::default() },
            upstream: upstream.trim_end_matches('/').to_owned(),
            client: Client::builder(TokioExecutor::new()).build_http(),
            limits: config.limits.map(|l| Mutex::new(ShardLimits::new(l))),
            iterators: Mutex::new(Iterators::default()),
            shards: Mutex::new(Default::default()),
            fanout: Arc::new(Fanout::default()),
            subscribe_calls: Default::default(),
        });
        let counts = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(req, state.clone()));
                    // HTTP/1.1, or HTTP/2 with prior knowledge (SubscribeToShard's protocol).
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(RealismProxy { addr, task, realism, state: counts })
    }

    /// `SubscribeToShard` calls received so far over HTTP/1.x and over HTTP/2.
    pub fn subscribe_calls(&self) -> (u64, u64) {
        let [h1, h2] = &self.state.subscribe_calls;
        (h1.load(std::sync::atomic::Ordering::Relaxed), h2.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// `http://127.0.0.1:<port>`: the `AWS_ENDPOINT_URL` for clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The realism it applies.
    pub fn realism(&self) -> &Arc<Realism> {
        &self.realism
    }
}

impl Drop for RealismProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

fn request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A Kinesis (awsJson1.1) error as AWS writes it.
fn json_error(status: StatusCode, kind: &str, message: &str) -> Response<Body> {
    let body = json!({ "__type": kind, "message": message }).to_string();
    Response::builder()
        .status(status)
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amzn-errortype", format!("{kind}:"))
        .header("x-amzn-requestid", request_id())
        .body(full(body))
        .unwrap_or_else(|_| Response::new(full("")))
}

/// An S3 (XML) error as AWS writes it; HEAD answers carry no body.
fn s3_error(status: StatusCode, code: &str, message: &str, head: bool) -> Response<Body> {
    let id = request_id();
    let body = if head {
        String::new()
    } else {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{}</Message><RequestId>{id}</RequestId><HostId>pushpull-local</HostId></Error>",
            xml_escape(message)
        )
    };
    Response::builder()
        .status(status)
        .header("content-type", "application/xml")
        .header("x-amz-request-id", id)
        .body(full(body))
        .unwrap_or_else(|_| Response::new(full("")))
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn throttled_message(stream: &str, shard: &str) -> String {
    format!("Rate exceeded for shard {shard} in stream {stream} under account {ACCOUNT}.")
}

fn stream_name(body: &Value) -> Option<String> {
    if let Some(arn) = body["StreamARN"].as_str() {
        return arn.rsplit_once("stream/").map(|(_, n)| n.to_owned());
    }
    body["StreamName"].as_str().map(str::to_owned)
}

/// What came back from LocalStack.
struct Upstream {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Upstream {
    fn into_response(mut self, head: bool) -> Response<Body> {
        for h in ["transfer-encoding", "connection", "keep-alive"] {
            self.headers.remove(h);
        }
        if !head {
            self.headers.remove("content-length");
        }
        let mut r = Response::new(full(self.body));
        *r.status_mut() = self.status;
        *r.headers_mut() = self.headers;
        r
    }

    fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Signed as "test" in us-east-1 (LocalStack reads the region from the credential scope and
/// checks no signature).
const ADMIN_AUTH: &str =
    "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/kinesis/aws4_request, SignedHeaders=host, Signature=00";

impl State {
    async fn forward(&self, parts: &Parts, body: Bytes) -> Result<Upstream, String> {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut req = Request::builder().method(parts.method.clone()).uri(format!("{}{path}", self.upstream));
        for (name, value) in &parts.headers {
            if matches!(name.as_str(), "host" | "content-length" | "transfer-encoding" | "connection") {
                continue;
            }
            if name == "authorization"
                && let Ok(v) = value.to_str()
                && let Some(key) = iam::access_key_of(v)
            {
                // LocalStack takes the account from the key: every caller is the one account.
                req = req.header(name, v.replacen(&format!("Credential={key}/"), "Credential=test/", 1));
                continue;
            }
            req = req.header(name, value);
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        let resp = self.client.request(req).await.map_err(|e| format!("LocalStack at {}: {e}", self.upstream))?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Upstream { status: parts.status, headers: parts.headers, body })
    }

    /// A Kinesis call of our own to LocalStack (not limited, not checked).
    async fn kinesis_admin(&self, op: &str, body: Value) -> Result<Value, String> {
        self.kinesis_admin_typed(op, body).await.map_err(|e| format!("{op}: {}: {}", e.kind, e.message))
    }

    /// [`Self::kinesis_admin`] with LocalStack's error kept by its `__type`.
    async fn kinesis_admin_typed(&self, op: &str, body: Value) -> Result<Value, AdminError> {
        let internal = |message: String| AdminError { kind: "InternalFailure".into(), message };
        let req = Request::builder()
            .method("POST")
            .uri(format!("{}/", self.upstream))
            .header("x-amz-target", format!("Kinesis_20131202.{op}"))
            .header("content-type", "application/x-amz-json-1.1")
            .header("authorization", ADMIN_AUTH)
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| internal(e.to_string()))?;
        let resp = self.client.request(req).await.map_err(|e| internal(e.to_string()))?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| internal(e.to_string()))?.to_bytes();
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| internal(format!("{op}: {e}")))?;
        if !status.is_success() {
            let kind = v["__type"].as_str().unwrap_or("InternalFailure");
            return Err(AdminError {
                kind: kind.rsplit('#').next().unwrap_or(kind).to_owned(),
                message: v["message"].as_str().or(v["Message"].as_str()).unwrap_or_default().to_owned(),
            });
        }
        Ok(v)
    }

    /// The stream's shards, listed at most once a second.
    async fn shards(&self, stream: &str) -> Vec<ShardRange> {
        if let Some((at, s)) = self.shards.lock().ok().and_then(|m| m.get(stream).cloned())
            && at.elapsed() < Duration::from_secs(1)
        {
            return s;
        }
        let mut all = Vec::new();
        let mut body = json!({ "StreamName": stream });
        loop {
            match self.kinesis_admin("ListShards", body).await {
                Ok(v) => {
                    all.extend(shard_ranges(&v));
                    match v["NextToken"].as_str() {
                        Some(t) => body = json!({ "NextToken": t }),
                        None => break,
                    }
                }
                Err(e) => {
                    tracing::warn!(stream, error = %e, "realism: could not list the stream's shards");
                    break;
                }
            }
        }
        if let Ok(mut m) = self.shards.lock() {
            m.insert(stream.to_owned(), (Instant::now(), all.clone()));
        }
        all
    }

    fn limits(&self) -> Option<std::sync::MutexGuard<'_, ShardLimits>> {
        self.limits.as_ref().map(|l| l.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn wrap(&self, real: &str, stream: &str, shard: &str) -> String {
        let ttl = self.limits().map_or(Duration::from_secs(300), |l| l.limits().iterator_ttl);
        let it = Iterator {
            real: real.to_owned(),
            stream: stream.to_owned(),
            shard: shard.to_owned(),
            issued: Instant::now(),
        };
        self.iterators.lock().unwrap_or_else(|p| p.into_inner()).wrap(it, ttl, Instant::now())
    }

    fn deny(&self, key: &str, call: &iam::Call) -> Option<String> {
        match self.policies.check(key, call) {
            Decision::Denied(m) => {
                self.realism.count("iam.denied", 1);
                tracing::warn!(action = %call.action, resource = %call.resource, "realism: {m}");
                Some(m)
            }
            _ => None,
        }
    }

    fn is_function(&self, key: &str) -> bool {
        self.policies.is_role(key)
    }
}

impl Admin for State {
    fn admin<'a>(&'a self, op: &'static str, body: Value) -> AdminFuture<'a> {
        Box::pin(self.kinesis_admin_typed(op, body))
    }
}

/// `SubscribeToShard`, served here ([`fanout`]): the answer is an event stream.
async fn subscribe_to_shard(state: Arc<State>, json: Value, key: &str) -> Result<Response<Body>, String> {
    if let Some(m) = iam::kinesis_call("SubscribeToShard", &json, None).and_then(|call| state.deny(key, &call)) {
        return Ok(json_error(StatusCode::BAD_REQUEST, "AccessDeniedException", &m));
    }
    let req = fanout::Request {
        consumer: json["ConsumerARN"].as_str().unwrap_or_default().to_owned(),
        shard: json["ShardId"].as_str().unwrap_or_default().to_owned(),
        starting: json["StartingPosition"].clone(),
    };
    let admin: Arc<dyn Admin> = state.clone();
    match fanout::subscribe(state.fanout.clone(), admin, state.realism.clone(), req).await {
        Ok(rx) => {
            let frames = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
            Ok(Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/vnd.amazon.eventstream")
                .header("x-amzn-requestid", request_id())
                .body(StreamBody::new(frames).boxed())
                .unwrap_or_else(|_| Response::new(full(""))))
        }
        Err(e) => {
            let status =
                if e.kind == "InternalFailure" { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::BAD_REQUEST };
            Ok(json_error(status, &e.kind, &e.message))
        }
    }
}

async fn handle(req: Request<Incoming>, state: Arc<State>) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(json_error(StatusCode::BAD_REQUEST, "SerializationException", &e.to_string())),
    };
    let key = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(iam::access_key_of)
        .unwrap_or_default()
        .to_owned();
    let target = parts.headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let result = if target == "Kinesis_20131202.SubscribeToShard" {
        let http2 = usize::from(parts.version == hyper::Version::HTTP_2);
        state.subscribe_calls[http2].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        subscribe_to_shard(state.clone(), json, &key).await
    } else if let Some(op) = target.strip_prefix("Kinesis_20131202.") {
        let r = kinesis(&state, &parts, body.clone(), op, &key).await;
        if matches!(op, "PutRecord" | "PutRecords")
            && r.as_ref().is_ok_and(|r| r.status().is_success())
            && let Some(stream) = serde_json::from_slice::<Value>(&body).ok().as_ref().and_then(stream_name)
        {
            // Enhanced fan-out pushes: every subscription to the stream reads now.
            state.fanout.wake(&stream);
        }
        r
    } else if target.starts_with("AWSEvents.") {
        // EventBridge: passed through as it is.
        state.forward(&parts, body).await.map(|u| u.into_response(false))
    } else if let Some(op) = target.strip_prefix("AmazonSQS.") {
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        match state.deny(&key, &iam::sqs_call(op, &json)) {
            Some(m) => {
                let mut r = json_error(StatusCode::FORBIDDEN, "AccessDenied", &m);
                r.headers_mut()
                    .insert("x-amzn-query-error", hyper::header::HeaderValue::from_static("AccessDenied;Sender"));
                Ok(r)
            }
            None => sqs(&state, &parts, body, op).await,
        }
    } else {
        s3(&state, &parts, body, &key).await
    };
    Ok(result.unwrap_or_else(|e| json_error(StatusCode::BAD_GATEWAY, "InternalFailure", &e)))
}

/// An SQS call, with SQS's faults: `ReceiveMessage` failing (500 `InternalError`), and a received
/// message delivered again (made visible at once, as when a receive's answer is lost: SQS's "at
/// least once").
async fn sqs(state: &State, parts: &Parts, body: Bytes, op: &str) -> Result<Response<Body>, String> {
    let rates = state.realism.config().rates.clone();
    if op != "ReceiveMessage" {
        return state.forward(parts, body).await.map(|u| u.into_response(false));
    }
    if state.realism.fire("sqs.receive.error", rates.sqs_receive_error) {
        return Ok(json_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", "realism: ReceiveMessage failed"));
    }
    let queue_url = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["QueueUrl"].as_str().map(str::to_owned));
    let up = state.forward(parts, body).await?;
    if rates.sqs_duplicate > 0.0
        && up.status.is_success()
        && let Some(queue_url) = queue_url
        && let Ok(v) = serde_json::from_slice::<Value>(&up.body)
    {
        for m in v["Messages"].as_array().into_iter().flatten() {
            let Some(handle) = m["ReceiptHandle"].as_str() else { continue };
            if !state.realism.fire("sqs.message.duplicated", rates.sqs_duplicate) {
                continue;
            }
            let call = json!({"QueueUrl": queue_url, "ReceiptHandle": handle, "VisibilityTimeout": 0});
            let mut again = parts.clone();
            again
                .headers
                .insert("x-amz-target", hyper::header::HeaderValue::from_static("AmazonSQS.ChangeMessageVisibility"));
            if let Err(e) = state.forward(&again, Bytes::from(call.to_string())).await {
                tracing::warn!(error = %e, "realism: could not make a message visible again");
            }
        }
    }
    Ok(up.into_response(false))
}

async fn kinesis(state: &State, parts: &Parts, body: Bytes, op: &str, key: &str) -> Result<Response<Body>, String> {
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    // GetRecords names its stream only through its iterator.
    let lookup = if op == "GetRecords" {
        let ttl = state.limits().map_or(Duration::from_secs(300), |l| l.limits().iterator_ttl);
        let token = json["ShardIterator"].as_str().unwrap_or_default();
        Some(state.iterators.lock().unwrap_or_else(|p| p.into_inner()).lookup(token, ttl, Instant::now()))
    } else {
        None
    };
    let hinted = match &lookup {
        Some(Lookup::Valid(it)) => Some(it.stream.as_str()),
        _ => None,
    };
    if let Some(m) = iam::kinesis_call(op, &json, hinted).and_then(|call| state.deny(key, &call)) {
        return Ok(json_error(StatusCode::BAD_REQUEST, "AccessDeniedException", &m));
    }
    if state.limits.is_none() {
        return state.forward(parts, body).await.map(|u| u.into_response(false));
    }
    match (op, lookup) {
        ("PutRecords", _) => put_records(state, parts, body, &json).await,
        ("PutRecord", _) => put_record(state, parts, body, &json).await,
        ("GetShardIterator", _) => get_shard_iterator(state, parts, body, &json).await,
        ("GetRecords", Some(lookup)) => get_records(state, parts, json, lookup).await,
        _ => state.forward(parts, body).await.map(|u| u.into_response(false)),
    }
}

/// The size a record counts for: its data (base64-decoded) plus its partition key.
pub(super) fn entry_bytes(e: &Value) -> usize {
    let data = e["Data"].as_str().unwrap_or_default();
    let padding = data.bytes().rev().take_while(|b| *b == b'=').count();
    (data.len() / 4 * 3).saturating_sub(padding) + e["PartitionKey"].as_str().map_or(0, str::len)
}

async fn put_records(state: &State, parts: &Parts, body: Bytes, json: &Value) -> Result<Response<Body>, String> {
    let Some(stream) = stream_name(json) else {
        return state.forward(parts, body).await.map(|u| u.into_response(false));
    };
    let shards = state.shards(&stream).await;
    let entries = json["Records"].as_array().cloned().unwrap_or_default();
    let now = Instant::now();
    let mut admitted = Vec::new();
    let mut refused = Vec::new();
    if let Some(mut limits) = state.limits() {
        for (i, e) in entries.iter().enumerate() {
            let pk = e["PartitionKey"].as_str().unwrap_or_default();
            match shard_for(&shards, pk, e["ExplicitHashKey"].as_str()) {
                Some(shard) if !limits.admit_put(&stream, shard, entry_bytes(e), now) => {
                    refused.push((i, shard.to_owned()));
                }
                _ => admitted.push(i),
            }
        }
    }
    if refused.is_empty() {
        return state.forward(parts, body).await.map(|u| u.into_response(false));
    }
    state.realism.count("kinesis.put.throttled_entries", refused.len() as u64);
    let mut results = vec![Value::Null; entries.len()];
    let mut failed = refused.len() as u64;
    let mut encryption = None;
    if !admitted.is_empty() {
        let mut passed = json.clone();
        passed["Records"] = Value::Array(admitted.iter().map(|&i| entries[i].clone()).collect());
        let up = state.forward(parts, Bytes::from(passed.to_string())).await?;
        if !up.status.is_success() {
            return Ok(up.into_response(false));
        }
        let v = up.json().ok_or("PutRecords: LocalStack's answer is not JSON")?;
        failed += v["FailedRecordCount"].as_u64().unwrap_or(0);
        encryption = v.get("EncryptionType").cloned();
        for (k, &i) in admitted.iter().enumerate() {
            results[i] = v["Records"][k].clone();
        }
    }
    for (i, shard) in refused {
        results[i] = json!({
            "ErrorCode": "ProvisionedThroughputExceededException",
            "ErrorMessage": throttled_message(&stream, &shard),
        });
    }
    let mut out = json!({ "FailedRecordCount": failed, "Records": results });
    if let Some(e) = encryption {
        out["EncryptionType"] = e;
    }
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amzn-requestid", request_id())
        .body(full(out.to_string()))
        .unwrap_or_else(|_| Response::new(full(""))))
}

async fn put_record(state: &State, parts: &Parts, body: Bytes, json: &Value) -> Result<Response<Body>, String> {
    if let Some(stream) = stream_name(json) {
        let shards = state.shards(&stream).await;
        let pk = json["PartitionKey"].as_str().unwrap_or_default();
        if let Some(shard) = shard_for(&shards, pk, json["ExplicitHashKey"].as_str())
            && let Some(mut limits) = state.limits()
            && !limits.admit_put(&stream, shard, entry_bytes(json), Instant::now())
        {
            state.realism.count("kinesis.put_record.throttled", 1);
            let msg = throttled_message(&stream, shard);
            return Ok(json_error(StatusCode::BAD_REQUEST, "ProvisionedThroughputExceededException", &msg));
        }
    }
    state.forward(parts, body).await.map(|u| u.into_response(false))
}

async fn get_shard_iterator(state: &State, parts: &Parts, body: Bytes, json: &Value) -> Result<Response<Body>, String> {
    let (Some(stream), Some(shard)) = (stream_name(json), json["ShardId"].as_str()) else {
        return state.forward(parts, body).await.map(|u| u.into_response(false));
    };
    if let Some(mut limits) = state.limits()
        && !limits.admit_iterator(&stream, shard, Instant::now())
    {
        drop(limits);
        state.realism.count("kinesis.iterator.throttled", 1);
        let msg = throttled_message(&stream, shard);
        return Ok(json_error(StatusCode::BAD_REQUEST, "ProvisionedThroughputExceededException", &msg));
    }
    let mut up = state.forward(parts, body).await?;
    if up.status.is_success()
        && let Some(mut v) = up.json()
        && let Some(real) = v["ShardIterator"].as_str().map(str::to_owned)
    {
        v["ShardIterator"] = Value::from(state.wrap(&real, &stream, shard));
        up.body = Bytes::from(v.to_string());
    }
    Ok(up.into_response(false))
}

fn unix_ms(t: Instant) -> u128 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    now.saturating_sub(t.elapsed()).as_millis()
}

fn expired(issued: Option<Instant>) -> Response<Body> {
    let now = unix_ms(Instant::now());
    let created = issued.map_or(now.saturating_sub(300_001), unix_ms);
    json_error(
        StatusCode::BAD_REQUEST,
        "ExpiredIteratorException",
        &format!(
            "Iterator expired. The iterator was created at time {created} while right now it is {now} which is further in the future than the tolerated delay of 300000 milliseconds."
        ),
    )
}

fn ok_json(v: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amzn-requestid", request_id())
        .body(full(v.to_string()))
        .unwrap_or_else(|_| Response::new(full("")))
}

async fn get_records(state: &State, parts: &Parts, mut json: Value, lookup: Lookup) -> Result<Response<Body>, String> {
    let it = match lookup {
        Lookup::Foreign => {
            return state.forward(parts, Bytes::from(json.to_string())).await.map(|u| u.into_response(false));
        }
        Lookup::Expired { issued } => {
            state.realism.count("kinesis.get.expired_iterator", 1);
            return Ok(expired(issued));
        }
        Lookup::Valid(it) => it,
    };
    let Some(max) = state.limits().map(|l| l.limits().clone()) else { unreachable!("limits checked by the caller") };
    if let Some(n) = json["Limit"].as_u64()
        && (n == 0 || n as usize > max.max_records_per_get)
    {
        let msg = format!(
            "1 validation error detected: Value '{n}' at 'limit' failed to satisfy constraint: Member must have value {} {}",
            if n == 0 { "greater than or equal to" } else { "less than or equal to" },
            if n == 0 { 1 } else { max.max_records_per_get }
        );
        return Ok(json_error(StatusCode::BAD_REQUEST, "ValidationException", &msg));
    }
    let admitted = state.limits().is_some_and(|mut l| l.admit_get(&it.stream, &it.shard, Instant::now()));
    if !admitted {
        state.realism.count("kinesis.get.throttled", 1);
        let msg = throttled_message(&it.stream, &it.shard);
        return Ok(json_error(StatusCode::BAD_REQUEST, "ProvisionedThroughputExceededException", &msg));
    }
    if state.realism.fire("kinesis.get.expired_iterator", state.realism.config().rates.expired_iterator) {
        return Ok(expired(Some(it.issued)));
    }
    json["ShardIterator"] = Value::from(it.real.clone());
    let up = state.forward(parts, Bytes::from(json.to_string())).await?;
    if !up.status.is_success() {
        return Ok(up.into_response(false));
    }
    let mut v = up.json().ok_or("GetRecords: LocalStack's answer is not JSON")?;
    let records = v["Records"].as_array().cloned().unwrap_or_default();
    if !records.is_empty() && state.realism.fire("kinesis.get.empty_page", state.realism.config().rates.empty_page) {
        // An empty page where records exist: the same position again, and "behind" by the age
        // of the first record there.
        let first = records[0]["ApproximateArrivalTimestamp"].as_f64().unwrap_or(0.0) * 1000.0;
        let now = unix_ms(Instant::now()) as f64;
        let behind = v["MillisBehindLatest"].as_u64().unwrap_or(0).max((now - first).max(1.0) as u64);
        let page = json!({
            "Records": [],
            "NextShardIterator": state.wrap(&it.real, &it.stream, &it.shard),
            "MillisBehindLatest": behind,
        });
        return Ok(ok_json(&page));
    }
    // At most 10,000 records and 10 MiB a page.
    let mut bytes = 0usize;
    let mut keep = records.len().min(max.max_records_per_get);
    for (i, r) in records.iter().enumerate().take(keep) {
        let size = entry_bytes(r);
        if i > 0 && bytes + size > max.max_bytes_per_get {
            keep = i;
            break;
        }
        bytes += size;
    }
    if keep < records.len() {
        state.realism.count("kinesis.get.truncated", 1);
        let last = records[keep - 1]["SequenceNumber"].as_str().unwrap_or_default().to_owned();
        let next = state
            .kinesis_admin(
                "GetShardIterator",
                json!({"StreamName": it.stream, "ShardId": it.shard, "ShardIteratorType": "AFTER_SEQUENCE_NUMBER", "StartingSequenceNumber": last}),
            )
            .await?;
        v["Records"] = Value::Array(records[..keep].to_vec());
        v["NextShardIterator"] = next["ShardIterator"].clone();
    }
    if let Some(mut l) = state.limits() {
        l.charge_get(&it.stream, &it.shard, bytes, Instant::now());
    }
    if let Some(next) = v["NextShardIterator"].as_str().map(str::to_owned) {
        v["NextShardIterator"] = Value::from(state.wrap(&next, &it.stream, &it.shard));
    }
    Ok(ok_json(&v))
}

async fn s3(state: &State, parts: &Parts, body: Bytes, key: &str) -> Result<Response<Body>, String> {
    let method = parts.method.as_str();
    let head = method == "HEAD";
    let call = iam::s3_call(
        method,
        parts.uri.path(),
        parts.uri.query().unwrap_or(""),
        parts.headers.contains_key("x-amz-copy-source"),
    );
    if let Some(m) = state.deny(key, &call) {
        return Ok(s3_error(StatusCode::FORBIDDEN, "AccessDenied", &m, head));
    }
    let get_object = method == "GET" && call.action.starts_with("s3:GetObject");
    let function = state.is_function(key);
    let rates = state.realism.config().rates.clone();
    if get_object && function && state.realism.fire("s3.get.slow_down", rates.s3_slow_down) {
        return Ok(s3_error(StatusCode::SERVICE_UNAVAILABLE, "SlowDown", "Please reduce your request rate.", false));
    }
    let up = state.forward(parts, body).await?;
    if up.status == StatusCode::NOT_FOUND && call.action.starts_with("s3:GetObject") && function {
        // AWS: without s3:ListBucket, a missing key answers 403, not 404.
        let bucket = call.resource.trim_start_matches("arn:aws:s3:::").split('/').next().unwrap_or_default();
        let list = iam::Call { action: "s3:ListBucket".into(), resource: format!("arn:aws:s3:::{bucket}") };
        if let Some(m) = state.deny(key, &list) {
            return Ok(s3_error(StatusCode::FORBIDDEN, "AccessDenied", &m, head));
        }
    }
    if get_object && function && up.status.is_success() && up.body.len() > 1 {
        let cut = state.realism.draw("s3.get.cut_body.at");
        if state.realism.fire("s3.get.cut_body", rates.s3_cut_body) {
            let at = ((up.body.len() as f64 * cut) as usize).clamp(1, up.body.len() - 1);
            let part = up.body.slice(..at);
            let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
                Ok(Frame::data(part)),
                Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "realism: body cut part-way")),
            ];
            let mut headers = up.headers;
            for h in ["transfer-encoding", "connection", "keep-alive"] {
                headers.remove(h);
            }
            headers.insert("content-length", hyper::header::HeaderValue::from(up.body.len()));
            let mut r = Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
            *r.status_mut() = up.status;
            *r.headers_mut() = headers;
            return Ok(r);
        }
    }
    Ok(up.into_response(head))
}
