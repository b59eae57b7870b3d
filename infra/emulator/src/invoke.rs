//! The Lambda Invoke API (`POST /2015-03-31/functions/{name}/invocations`), both sides.
//!
//! [`InvokeClient`] is how the local event sources call a function: against `cargo lambda
//! watch`, against [`InvokeServer`], or against anything else that speaks the API. A function
//! error comes back as `200` with `X-Amz-Function-Error`, as in AWS; `429` is a throttle, which
//! the mappings retry without counting it as a function error.
//!
//! [`InvokeServer`] serves the API on 127.0.0.1 for function binaries run behind the Runtime API
//! ([`crate::runtime_api::FunctionHost`]): one sandbox per concurrent invocation, up to a
//! concurrency limit, reused while warm. Crashes and timeouts answer as AWS does
//! (`Runtime.ExitError`, `Sandbox.Timedout`, both as `Unhandled` function errors); payloads over
//! 6 MiB are refused with `413 RequestEntityTooLargeException`.
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::mapping::event::MAX_PAYLOAD;
use crate::mapping::outcome::Answer;
use crate::runtime_api::{FunctionHost, FunctionSpec, Outcome};

/// The Invoke API could not be used (not a function error).
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// No connection, or it broke.
    #[error("invoke {function} at {endpoint}: {reason}")]
    Transport {
        /// Function name.
        function: String,
        /// Endpoint.
        endpoint: String,
        /// What happened.
        reason: String,
    },
    /// The service answered with an error status (throttled, too large, unknown function...).
    #[error("invoke {function}: HTTP {status}: {body}")]
    Status {
        /// Function name.
        function: String,
        /// HTTP status.
        status: u16,
        /// Response body.
        body: String,
    },
}

impl InvokeError {
    /// A throttle (429) or a service-side failure worth retrying without counting an attempt.
    pub fn is_throttle(&self) -> bool {
        matches!(self, InvokeError::Status { status: 429 | 500..=599, .. } | InvokeError::Transport { .. })
    }
}

/// One answered invocation.
#[derive(Debug, Clone)]
pub struct Invoked {
    /// The function's answer.
    pub answer: Answer,
    /// `x-amzn-RequestId`.
    pub request_id: String,
}

/// What a synchronous invocation goes through: the Invoke API ([`InvokeClient`]), or, in the
/// mapping's own tests, a function in the same process.
pub trait Invoker: Send + Sync + 'static {
    /// A synchronous (`RequestResponse`) invocation of `function` with `payload`.
    fn invoke<'a>(&'a self, function: &'a str, payload: Bytes) -> BoxFuture<'a, Result<Invoked, InvokeError>>;
}

impl Invoker for InvokeClient {
    fn invoke<'a>(&'a self, function: &'a str, payload: Bytes) -> BoxFuture<'a, Result<Invoked, InvokeError>> {
        Box::pin(InvokeClient::invoke(self, function, payload))
    }
}

/// A client of the Invoke API.
#[derive(Clone, Debug)]
pub struct InvokeClient {
    client: Client<HttpConnector, Full<Bytes>>,
    endpoint: String,
}

impl InvokeClient {
    /// A client for `endpoint` (e.g. `http://127.0.0.1:9000`, what `cargo lambda watch` serves).
    pub fn new(endpoint: impl Into<String>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector);
        InvokeClient { client, endpoint: endpoint.into().trim_end_matches('/').to_owned() }
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A synchronous (`RequestResponse`) invocation.
    pub async fn invoke(&self, function: &str, payload: Bytes) -> Result<Invoked, InvokeError> {
        let uri = format!("{}/2015-03-31/functions/{function}/invocations", self.endpoint);
        let transport = |reason: String| InvokeError::Transport {
            function: function.to_owned(),
            endpoint: self.endpoint.clone(),
            reason,
        };
        let req = Request::post(&uri)
            .header("content-type", "application/json")
            .header("x-amz-invocation-type", "RequestResponse")
            .body(Full::new(payload))
            .map_err(|e| transport(e.to_string()))?;
        let resp = self.client.request(req).await.map_err(|e| transport(pushpull::aws::error_chain(&e)))?;
        let status = resp.status();
        let function_error = resp.headers().get("x-amz-function-error").is_some();
        let request_id = resp
            .headers()
            .get("x-amzn-requestid")
            .and_then(|v| v.to_str().ok())
            .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
        let body = resp.into_body().collect().await.map_err(|e| transport(e.to_string()))?.to_bytes();
        if status.is_success() {
            let answer = if function_error { Answer::FunctionError(body) } else { Answer::Response(body) };
            return Ok(Invoked { answer, request_id });
        }
        Err(InvokeError::Status {
            function: function.to_owned(),
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

struct Pool {
    spec: FunctionSpec,
    idle: Mutex<Vec<FunctionHost>>,
    slots: Semaphore,
    /// Where each invocation is noted, if asked ([`InvokeServer::log_invocations`]).
    log: Mutex<Option<std::fs::File>>,
}

/// Serves the Invoke API for function binaries on 127.0.0.1.
pub struct InvokeServer {
    addr: SocketAddr,
    pools: Arc<HashMap<String, Arc<Pool>>>,
    server: tokio::task::JoinHandle<()>,
}

impl InvokeServer {
    /// Serves `functions` (by their names) on 127.0.0.1:`port` (0: any free port), at most
    /// `concurrency` sandboxes per function.
    pub async fn start(functions: Vec<FunctionSpec>, port: u16, concurrency: usize) -> std::io::Result<Self> {
        Self::start_with(functions, port, concurrency, None).await
    }

    /// As [`InvokeServer::start`], with AWS's throttling from `realism`: `429
    /// TooManyRequestsException` at its rate, and at once (not queued) when a function already
    /// runs `concurrency` invocations, as AWS answers past a function's concurrency.
    pub async fn start_with(
        functions: Vec<FunctionSpec>,
        port: u16,
        concurrency: usize,
        realism: Option<Arc<crate::realism::Realism>>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let pools: HashMap<String, Arc<Pool>> = functions
            .into_iter()
            .map(|spec| {
                let pool = Pool {
                    spec: spec.clone(),
                    idle: Mutex::new(Vec::new()),
                    slots: Semaphore::new(concurrency.max(1)),
                    log: Mutex::new(None),
                };
                (spec.name, Arc::new(pool))
            })
            .collect();
        let pools = Arc::new(pools);
        let server = tokio::spawn(accept(listener, pools.clone(), realism));
        Ok(InvokeServer { addr, pools, server })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client for this server.
    pub fn client(&self) -> InvokeClient {
        InvokeClient::new(self.endpoint())
    }

    /// Notes every invocation of `function` in `path` (appended, one JSON line each: when it
    /// started,
    /// whether it was a function error, and the stream records' sequence numbers of its event),
    /// which shows from outside which records were invoked how often, whoever invoked them.
    pub fn log_invocations(&self, function: &str, path: &std::path::Path) -> std::io::Result<()> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        if let Some(pool) = self.pools.get(function)
            && let Ok(mut log) = pool.log.lock()
        {
            *log = Some(file);
        }
        Ok(())
    }

    /// PIDs of the sandboxes now idle (for tests that kill one).
    pub fn idle_pids(&self, function: &str) -> Vec<u32> {
        self.pools
            .get(function)
            .map(|p| p.idle.lock().map(|i| i.iter().filter_map(FunctionHost::pid).collect()).unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for InvokeServer {
    fn drop(&mut self) {
        self.server.abort();
        // Sandboxes kill their processes (by PID) when dropped.
        for pool in self.pools.values() {
            if let Ok(mut idle) = pool.idle.lock() {
                idle.clear();
            }
        }
    }
}

type Realism = Option<Arc<crate::realism::Realism>>;

async fn accept(listener: TcpListener, pools: Arc<HashMap<String, Arc<Pool>>>, realism: Realism) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let pools = pools.clone();
        let realism = realism.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| route(req, pools.clone(), realism.clone()));
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn reply(status: StatusCode, body: impl Into<Bytes>, request_id: &str, function_error: bool) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    if let Ok(v) = hyper::header::HeaderValue::from_str(request_id) {
        h.insert("x-amzn-requestid", v);
    }
    h.insert("x-amz-executed-version", hyper::header::HeaderValue::from_static("$LATEST"));
    if function_error {
        h.insert("x-amz-function-error", hyper::header::HeaderValue::from_static("Unhandled"));
    }
    r
}

fn aws_error(kind: &str, message: &str) -> String {
    serde_json::json!({ "Type": "User", "message": message, "__type": kind }).to_string()
}

/// AWS's answer past a function's concurrency or rate (Lambda API reference, Invoke:
/// `TooManyRequestsException`, "The request throughput limit was exceeded", HTTP 429, with a
/// `Reason`).
fn throttled(request_id: &str, reason: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "Type": "User",
        "message": "Rate Exceeded.",
        "Reason": reason,
        "__type": "TooManyRequestsException",
    });
    let mut r = reply(StatusCode::TOO_MANY_REQUESTS, body.to_string(), request_id, false);
    r.headers_mut().insert("x-amzn-errortype", hyper::header::HeaderValue::from_static("TooManyRequestsException"));
    r
}

async fn route(
    req: Request<Incoming>,
    pools: Arc<HashMap<String, Arc<Pool>>>,
    realism: Realism,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let request_id = uuid::Uuid::new_v4().to_string();
    let name = path
        .strip_prefix("/2015-03-31/functions/")
        .and_then(|r| r.strip_suffix("/invocations"))
        .map(|n| n.rsplit(':').next().unwrap_or(n).to_owned());
    let (Some(name), &Method::POST) = (name, req.method()) else {
        return Ok(reply(StatusCode::NOT_FOUND, aws_error("UnknownOperationException", &path), &request_id, false));
    };
    let Some(pool) = pools.get(&name).cloned() else {
        let msg = format!("Function not found: {name}");
        return Ok(reply(StatusCode::NOT_FOUND, aws_error("ResourceNotFoundException", &msg), &request_id, false));
    };
    let kind = req.headers().get("x-amz-invocation-type").and_then(|v| v.to_str().ok()).unwrap_or("RequestResponse");
    if kind != "RequestResponse" {
        let msg = format!(
            "invocation type {kind}: the local server runs RequestResponse only (the local runner plays the async queue)"
        );
        return Ok(reply(
            StatusCode::BAD_REQUEST,
            aws_error("InvalidParameterValueException", &msg),
            &request_id,
            false,
        ));
    }
    let payload = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(reply(
                StatusCode::BAD_REQUEST,
                aws_error("InvalidRequestContentException", &e.to_string()),
                &request_id,
                false,
            ));
        }
    };
    if payload.len() > MAX_PAYLOAD {
        let msg = format!(
            "{} byte payload is too large for the RequestResponse invocation type (limit {MAX_PAYLOAD} bytes)",
            payload.len()
        );
        return Ok(reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            aws_error("RequestEntityTooLargeException", &msg),
            &request_id,
            false,
        ));
    }
    if let Some(r) = &realism
        && r.fire("lambda.invoke.throttled", r.config().rates.lambda_throttle)
    {
        lambda_metric(&pool.spec.name, &[("Throttles", "Count", 1.0)]);
        return Ok(throttled(&request_id, "CallerRateLimitExceeded"));
    }
    // The invocation runs in a task of its own, to its end, whether or not the caller is still
    // there: as on AWS, where an invocation that started runs to completion (or its timeout)
    // even if the event source mapping's poller that sent it is gone. Dropping the caller's
    // connection must not kill the function mid-invocation.
    let task = tokio::spawn(async move {
        let permit = match &realism {
            Some(r) if r.config().function_concurrency.is_some() => match pool.slots.try_acquire() {
                Ok(p) => Ok(p),
                Err(tokio::sync::TryAcquireError::NoPermits) => {
                    r.count("lambda.invoke.concurrency", 1);
                    lambda_metric(&pool.spec.name, &[("Throttles", "Count", 1.0)]);
                    return throttled(&request_id, "ReservedFunctionConcurrentInvocationLimitExceeded");
                }
                Err(tokio::sync::TryAcquireError::Closed) => Err(()),
            },
            _ => pool.slots.acquire().await.map_err(|_| ()),
        };
        let Ok(_permit) = permit else {
            return reply(
                StatusCode::TOO_MANY_REQUESTS,
                aws_error("TooManyRequestsException", "closed"),
                &request_id,
                false,
            );
        };
        let host = pool.idle.lock().ok().and_then(|mut i| i.pop());
        let mut host = match host {
            Some(h) => h,
            None => match FunctionHost::start(pool.spec.clone()).await {
                Ok(h) => h,
                Err(e) => {
                    let body = serde_json::json!({"errorType": "Runtime.InitError", "errorMessage": e.to_string()});
                    return reply(StatusCode::OK, body.to_string(), &request_id, true);
                }
            },
        };
        let seqs = pool
            .log
            .lock()
            .ok()
            .filter(|l| l.is_some())
            .map(|_| (crate::mapping::now_unix(), sequence_numbers(&payload)));
        let invoke_started = std::time::Instant::now();
        let invocation = host.invoke(payload).await;
        let error = invocation.as_ref().map_or(1.0, |i| if i.outcome.is_error() { 1.0 } else { 0.0 });
        let duration = invoke_started.elapsed().as_secs_f64() * 1000.0;
        lambda_metric(
            &pool.spec.name,
            &[("Invocations", "Count", 1.0), ("Errors", "Count", error), ("Duration", "Milliseconds", duration)],
        );
        if let Some((started, seqs)) = seqs {
            let error = invocation.as_ref().map_or(true, |i| i.outcome.is_error());
            let line = serde_json::json!({ "t": started, "error": error, "seqs": seqs });
            if let Ok(mut log) = pool.log.lock()
                && let Some(f) = log.as_mut()
            {
                use std::io::Write as _;
                let _ = f.write_all(format!("{line}\n").as_bytes());
            }
        }
        let response = match invocation {
            Ok(inv) => {
                let id = inv.request_id;
                match inv.outcome {
                    Outcome::Response(body) => reply(StatusCode::OK, body, &id, false),
                    Outcome::FunctionError(body) => reply(StatusCode::OK, body, &id, true),
                    Outcome::Crashed { status } => {
                        let msg = format!("RequestId: {id} Error: Runtime exited with error: {status}");
                        let body = serde_json::json!({"errorType": "Runtime.ExitError", "errorMessage": msg});
                        reply(StatusCode::OK, body.to_string(), &id, true)
                    }
                    Outcome::TimedOut => {
                        let msg = format!(
                            "RequestId: {id} Error: Task timed out after {:.2} seconds",
                            pool.spec.timeout.as_secs_f64()
                        );
                        let body = serde_json::json!({"errorType": "Sandbox.Timedout", "errorMessage": msg});
                        reply(StatusCode::OK, body.to_string(), &id, true)
                    }
                }
            }
            Err(e) => {
                let body = serde_json::json!({"errorType": "Runtime.InitError", "errorMessage": e.to_string()});
                reply(StatusCode::OK, body.to_string(), &request_id, true)
            }
        };
        if let Ok(mut idle) = pool.idle.lock() {
            idle.push(host);
        }
        response
    });
    match task.await {
        Ok(response) => Ok(response),
        Err(e) => Ok(reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            aws_error("ServiceException", &format!("the invocation failed: {e}")),
            "",
            false,
        )),
    }
}

/// The sequence numbers of a stream event's records (none for another event).
fn sequence_numbers(payload: &[u8]) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Event {
        #[serde(rename = "Records", default)]
        records: Vec<Record>,
    }
    #[derive(serde::Deserialize)]
    struct Record {
        kinesis: Option<Kinesis>,
    }
    #[derive(serde::Deserialize)]
    struct Kinesis {
        #[serde(rename = "sequenceNumber")]
        sequence_number: String,
    }
    serde_json::from_slice::<Event>(payload)
        .map(|e| e.records.into_iter().filter_map(|r| r.kinesis.map(|k| k.sequence_number)).collect())
        .unwrap_or_default()
}

/// Metrics Lambda publishes for a function (`AWS/Lambda`, dimension `FunctionName`).
fn lambda_metric(function: &str, metrics: &[(&str, &str, f64)]) {
    crate::cloudwatch::put(crate::cloudwatch::LAMBDA, &[("FunctionName", function)], metrics);
}
