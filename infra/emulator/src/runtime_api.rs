//! Runs a function binary exactly as Lambda does: the process is started with the Lambda
//! environment, and talks to a Runtime API (`/2018-06-01/runtime/...`) that this module serves on
//! 127.0.0.1. [`FunctionHost::invoke`] queues one event, waits for the function's response or
//! error, and reports crashes and timeouts the way Lambda would (the sandbox is then replaced:
//! the next invocation starts a fresh process, a cold start).
//!
//! The process is killed by its PID when the host is dropped.
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::{Notify, mpsc, oneshot};

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The function answered (the body of `/response`).
    Response(Bytes),
    /// The function reported an error (the body of `/error`: `{"errorType","errorMessage"}`).
    FunctionError(Bytes),
    /// The process exited during the invocation (a crash: Lambda's `Runtime.ExitError`).
    Crashed {
        /// Exit status as text.
        status: String,
    },
    /// No answer before the timeout; the process was killed.
    TimedOut,
}

impl Outcome {
    /// True for anything Lambda counts as a function error (all but a response).
    pub fn is_error(&self) -> bool {
        !matches!(self, Outcome::Response(_))
    }
}

/// One finished invocation.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The request id given to the function.
    pub request_id: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Wall time from queueing the event to the answer.
    pub duration: Duration,
    /// Whether a new process had to be started for it.
    pub cold_start: bool,
}

/// The host could not run the function at all.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The binary could not be started.
    #[error("cannot start {path}: {source}")]
    Spawn {
        /// The binary.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The function failed during init (exited, or posted to `/init/error`) before asking for
    /// its first event.
    #[error("function {name} failed during init: {message}\n--- last output ---\n{output}")]
    Init {
        /// Function name.
        name: String,
        /// Exit status or the init error posted.
        message: String,
        /// The last lines it printed.
        output: String,
    },
    /// The Runtime API server could not be started.
    #[error("runtime API server: {0}")]
    Server(std::io::Error),
}

/// What to run and how.
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    /// The function's name (`AWS_LAMBDA_FUNCTION_NAME`).
    pub name: String,
    /// The binary.
    pub binary: PathBuf,
    /// Extra environment (the function's configuration).
    pub env: Vec<(String, String)>,
    /// `AWS_LAMBDA_FUNCTION_MEMORY_SIZE`.
    pub memory_mb: u32,
    /// The invocation timeout.
    pub timeout: Duration,
    /// Echo the function's output lines to this process's stderr, prefixed with its name.
    pub echo_output: bool,
}

impl FunctionSpec {
    /// A spec with Lambda's defaults: 128 MB, 3 s timeout... but 30 s here, since local
    /// services are slower; set [`FunctionSpec::timeout`] to the template's value.
    pub fn new(name: impl Into<String>, binary: impl Into<PathBuf>) -> Self {
        FunctionSpec {
            name: name.into(),
            binary: binary.into(),
            env: Vec::new(),
            memory_mb: 128,
            timeout: Duration::from_secs(30),
            echo_output: false,
        }
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

struct Pending {
    request_id: String,
    payload: Bytes,
    deadline_ms: u64,
    reply: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct State {
    inflight: HashMap<String, oneshot::Sender<Outcome>>,
    init_error: Option<String>,
    /// Set when the function asks for its first event (init done).
    ready: bool,
}

struct Shared {
    queue: tokio::sync::Mutex<mpsc::Receiver<Pending>>,
    state: Mutex<State>,
    ready: Notify,
    function_arn: String,
}

/// A function binary behind a Runtime API, invoked one event at a time (one sandbox).
pub struct FunctionHost {
    spec: FunctionSpec,
    addr: SocketAddr,
    shared: Arc<Shared>,
    queue_tx: mpsc::Sender<Pending>,
    child: Option<Child>,
    output: Arc<Mutex<VecDeque<String>>>,
    server: tokio::task::JoinHandle<()>,
    invocations: u64,
}

const OUTPUT_LINES_KEPT: usize = 200;

impl FunctionHost {
    /// Serves the Runtime API and starts the function (init runs now, as on a cold start).
    pub async fn start(spec: FunctionSpec) -> Result<Self, HostError> {
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(HostError::Server)?;
        let addr = listener.local_addr().map_err(HostError::Server)?;
        let (queue_tx, queue_rx) = mpsc::channel(16);
        let shared = Arc::new(Shared {
            queue: tokio::sync::Mutex::new(queue_rx),
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            function_arn: format!("arn:aws:lambda:us-east-1:000000000000:function:{}", spec.name),
        });
        let server = tokio::spawn(serve(listener, shared.clone()));
        let mut host = FunctionHost {
            spec,
            addr,
            shared,
            queue_tx,
            child: None,
            output: Default::default(),
            server,
            invocations: 0,
        };
        host.spawn().await?;
        Ok(host)
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The PID of the running process, if one runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// The last lines the function printed (its logs).
    pub fn output(&self) -> Vec<String> {
        self.output.lock().map(|o| o.iter().cloned().collect()).unwrap_or_default()
    }

    async fn spawn(&mut self) -> Result<(), HostError> {
        {
            let mut st = self.shared.state.lock().expect("state lock");
            st.ready = false;
            st.init_error = None;
            st.inflight.clear();
        }
        let mut cmd = Command::new(&self.spec.binary);
        cmd.env("AWS_LAMBDA_RUNTIME_API", self.addr.to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", &self.spec.name)
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", self.spec.memory_mb.to_string())
            .env("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{}", self.spec.name))
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "local")
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child =
            cmd.spawn().map_err(|source| HostError::Spawn { path: self.spec.binary.display().to_string(), source })?;
        for stream in [
            child.stdout.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child.stderr.take().map(|s| Box::new(s) as _),
        ]
        .into_iter()
        .flatten()
        {
            let output = self.output.clone();
            let (echo, name) = (self.spec.echo_output, self.spec.name.clone());
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    crate::cloudwatch::forward(&line);
                    if echo {
                        eprintln!("[{name}] {line}");
                    }
                    if let Ok(mut o) = output.lock() {
                        if o.len() == OUTPUT_LINES_KEPT {
                            o.pop_front();
                        }
                        o.push_back(line);
                    }
                }
            });
        }
        self.child = Some(child);
        // Init is over when the function asks for its first event; it failed if it exits or
        // posts /init/error first.
        let shared = self.shared.clone();
        let child = self.child.as_mut().expect("just set");
        let deadline = tokio::time::sleep(Duration::from_secs(10).max(self.spec.timeout));
        tokio::pin!(deadline);
        let failure = loop {
            let notified = shared.ready.notified();
            {
                let st = shared.state.lock().expect("state lock");
                if st.ready {
                    return Ok(());
                }
                if let Some(message) = st.init_error.clone() {
                    break message;
                }
            }
            tokio::select! {
                _ = notified => {}
                status = child.wait() => {
                    break match status { Ok(s) => format!("process exited: {s}"), Err(e) => e.to_string() };
                }
                _ = &mut deadline => break "init did not finish in time".to_owned(),
            }
        };
        Err(self.init_failed(failure).await)
    }

    async fn init_failed(&mut self, message: String) -> HostError {
        self.kill().await;
        // Give the output readers a moment to drain what the process printed last.
        tokio::time::sleep(Duration::from_millis(50)).await;
        HostError::Init { name: self.spec.name.clone(), message, output: self.output().join("\n") }
    }

    /// Kills the process (by PID) and waits for it.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Invokes the function with `payload` and waits for the outcome. A crash or timeout
    /// replaces the process; a failed restart is a [`HostError`].
    pub async fn invoke(&mut self, payload: impl Into<Bytes>) -> Result<Invocation, HostError> {
        let mut cold_start = self.invocations == 0;
        let alive = match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        };
        if !alive {
            self.kill().await;
            self.spawn().await?;
            cold_start = true;
        }
        self.invocations += 1;
        let request_id = uuid::Uuid::new_v4().to_string();
        let (reply, answer) = oneshot::channel();
        let started = Instant::now();
        let deadline_ms =
            (SystemTime::now() + self.spec.timeout).duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let pending = Pending { request_id: request_id.clone(), payload: payload.into(), deadline_ms, reply };
        if self.queue_tx.send(pending).await.is_err() {
            return Err(HostError::Server(std::io::Error::other("runtime API server stopped")));
        }
        let child = self.child.as_mut().expect("spawned above");
        let outcome = tokio::select! {
            answer = answer => answer.unwrap_or(Outcome::Crashed { status: "invocation dropped".into() }),
            status = child.wait() => Outcome::Crashed { status: status.map_or_else(|e| e.to_string(), |s| s.to_string()) },
            _ = tokio::time::sleep(self.spec.timeout) => Outcome::TimedOut,
        };
        if matches!(outcome, Outcome::Crashed { .. } | Outcome::TimedOut) {
            self.kill().await;
            // A queued event the dead process never took must not go to the next process.
            if let Ok(mut q) = self.shared.queue.try_lock() {
                while q.try_recv().is_ok() {}
            }
        }
        Ok(Invocation { request_id, outcome, duration: started.elapsed(), cold_start })
    }
}

impl Drop for FunctionHost {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        self.server.abort();
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| route(req, shared.clone()));
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// The largest response a synchronous invocation may return: AWS's Runtime API answers a bigger
/// one with 413 "Exceeded maximum allowed payload size (6291556 bytes)." (6 MiB plus 100 bytes).
pub const MAX_RESPONSE: usize = 6_291_556;

/// The function error the invoker gets for a response over [`MAX_RESPONSE`], as AWS writes it.
pub const RESPONSE_TOO_LARGE: &str = r#"{"errorType":"Function.ResponseSizeTooLarge","errorMessage":"Response payload size exceeded maximum allowed payload size (6291556 bytes)."}"#;

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

async fn route(req: Request<Incoming>, shared: Arc<Shared>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let Some(rest) = path.strip_prefix("/2018-06-01/runtime/") else {
        return Ok(reply(StatusCode::NOT_FOUND, "unknown path"));
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match (req.method(), parts.as_slice()) {
        (&Method::GET, ["invocation", "next"]) => {
            {
                let mut st = shared.state.lock().expect("state lock");
                st.ready = true;
            }
            shared.ready.notify_waiters();
            let pending = { shared.queue.lock().await.recv().await };
            let Some(p) = pending else {
                return Ok(reply(StatusCode::INTERNAL_SERVER_ERROR, "host stopped"));
            };
            shared.state.lock().expect("state lock").inflight.insert(p.request_id.clone(), p.reply);
            let mut r = reply(StatusCode::OK, p.payload);
            let h = r.headers_mut();
            let hv = |s: &str| {
                hyper::header::HeaderValue::from_str(s).unwrap_or(hyper::header::HeaderValue::from_static(""))
            };
            h.insert("content-type", hv("application/json"));
            h.insert("lambda-runtime-aws-request-id", hv(&p.request_id));
            h.insert("lambda-runtime-deadline-ms", hv(&p.deadline_ms.to_string()));
            h.insert("lambda-runtime-invoked-function-arn", hv(&shared.function_arn));
            h.insert("lambda-runtime-trace-id", hv("Root=1-00000000-000000000000000000000000;Sampled=0"));
            Ok(r)
        }
        (&Method::POST, ["invocation", id, kind @ ("response" | "error")]) => {
            let (id, is_error) = (id.to_string(), *kind == "error");
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let sender = shared.state.lock().expect("state lock").inflight.remove(&id);
            match sender {
                Some(tx) if !is_error && body.len() > MAX_RESPONSE => {
                    // AWS's Runtime API refuses the response with 413, and the invoker gets a function
                    // error instead of the body.
                    let _ = tx.send(Outcome::FunctionError(Bytes::from_static(RESPONSE_TOO_LARGE.as_bytes())));
                    Ok(reply(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        r#"{"errorMessage":"Exceeded maximum allowed payload size (6291556 bytes).","errorType":"RequestEntityTooLarge"}"#,
                    ))
                }
                Some(tx) => {
                    let _ = tx.send(if is_error { Outcome::FunctionError(body) } else { Outcome::Response(body) });
                    Ok(reply(StatusCode::ACCEPTED, r#"{"status":"OK"}"#))
                }
                None => Ok(reply(StatusCode::BAD_REQUEST, r#"{"errorMessage":"unknown request id"}"#)),
            }
        }
        (&Method::POST, ["init", "error"]) => {
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            shared.state.lock().expect("state lock").init_error = Some(String::from_utf8_lossy(&body).into_owned());
            shared.ready.notify_waiters();
            Ok(reply(StatusCode::ACCEPTED, r#"{"status":"OK"}"#))
        }
        _ => Ok(reply(StatusCode::NOT_FOUND, "unknown path")),
    }
}

/// Where `cargo build` put a workspace binary: beside the running executable's `deps/` folder
/// (tests) or beside it (the local runner), honouring `CARGO_TARGET_DIR`.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}
