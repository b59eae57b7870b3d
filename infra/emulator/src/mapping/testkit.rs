//! In-memory parts for the core's tests: a partition of numbered records, an invoker that answers
//! with a closure, and a failure sink that keeps what it is sent. With them the core's rules run
//! as unit tests under tokio's paused time, with no broker and no function binary.
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde_json::{Value, json};

use super::destination::FailureSink;
use super::event::WindowPart;
use super::lane::Lanes;
use super::outcome::Answer;
use super::progress::WindowCheckpoint;
use super::source::{Partition, Record};
use super::{Ctx, MappingError, MappingSettings, RawSettings, RunnerOptions};
use crate::invoke::{InvokeError, Invoked, Invoker};

/// A record: its index is its position.
#[derive(Debug, Clone)]
pub(crate) struct TestRec {
    pub index: u64,
    pub position: String,
    pub key: String,
    pub data: Bytes,
    pub arrival: f64,
}

impl TestRec {
    /// Record `index` of key `key` with `data`, arrived at `arrival`.
    pub fn new(index: u64, key: &str, data: &str, arrival: f64) -> Self {
        TestRec { index, position: index.to_string(), key: key.into(), data: Bytes::from(data.to_owned()), arrival }
    }
}

impl Record for TestRec {
    fn index(&self) -> u64 {
        self.index
    }
    fn ordering_key(&self) -> &[u8] {
        self.key.as_bytes()
    }
    fn data(&self) -> &[u8] {
        &self.data
    }
    fn arrival(&self) -> f64 {
        self.arrival
    }
    fn position(&self) -> &str {
        &self.position
    }
}

/// A partition that notes what was committed.
#[derive(Debug, Default)]
pub(crate) struct MemoryPartition {
    /// Indexes done, in the order they were committed.
    pub done: Mutex<Vec<u64>>,
    /// The window state written with each commit that carried one, and `None` at each close.
    pub windows: Mutex<Vec<Option<WindowCheckpoint>>>,
    pub fences: AtomicU32,
}

impl MemoryPartition {
    pub fn done(&self) -> Vec<u64> {
        let mut d = self.done.lock().unwrap().clone();
        d.sort_unstable();
        d
    }
}

impl Partition for MemoryPartition {
    type Record = TestRec;

    fn id(&self) -> &str {
        "p-0"
    }

    fn encoded_len(&self, record: &TestRec) -> usize {
        64 + record.data.len() + record.key.len()
    }

    /// `{"Records":[{"id","key","data"}], window fields}`: data as text.
    fn event(&self, records: &[TestRec], window: Option<&WindowPart<'_>>) -> String {
        let recs: Vec<Value> = records
            .iter()
            .map(|r| json!({"id": r.position, "key": r.key, "data": String::from_utf8_lossy(&r.data)}))
            .collect();
        let mut v = json!({ "Records": recs });
        if let Some(w) = window {
            v["window"] = json!({"start": w.start, "end": w.end});
            v["state"] = json!(w.state);
            v["isFinalInvokeForWindow"] = json!(w.is_final);
            v["isWindowTerminatedEarly"] = json!(w.terminated_early);
        }
        v.to_string()
    }

    fn batch_info(&self, records: &[TestRec]) -> (&'static str, Value) {
        let positions: Vec<&str> = records.iter().map(|r| r.position.as_str()).collect();
        ("TestBatchInfo", json!({ "positions": positions }))
    }

    fn item_index(&self, batch: &[TestRec], identifier: &Value) -> Result<usize, String> {
        batch
            .iter()
            .position(|r| identifier.as_str() == Some(r.position.as_str()))
            .ok_or_else(|| format!("{identifier} is not in the batch"))
    }

    async fn done(&self, records: &[TestRec], window: Option<WindowCheckpoint>) -> Result<(), MappingError> {
        self.done.lock().unwrap().extend(records.iter().map(|r| r.index));
        if window.is_some() {
            self.windows.lock().unwrap().push(window);
        }
        Ok(())
    }

    async fn fence(&self) -> Result<(), MappingError> {
        self.fences.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn window_closed(&self) -> Result<(), MappingError> {
        self.windows.lock().unwrap().push(None);
        Ok(())
    }
}

/// One invocation as the function saw it.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    /// The event.
    pub event: Value,
    /// When (tokio time since the test began).
    pub at: Duration,
}

impl Call {
    /// The ids of the event's records.
    pub fn ids(&self) -> Vec<u64> {
        self.event["Records"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().parse().unwrap()).collect()
    }
}

type Answerer = dyn Fn(&Value, usize) -> Result<Answer, InvokeError> + Send + Sync;

/// A function in the same process: `answer(event, call number)` says what it returns.
pub(crate) struct FnInvoker {
    answer: Box<Answerer>,
    /// How long each invocation takes (on tokio's clock).
    pub duration: Duration,
    pub calls: Arc<Mutex<Vec<Call>>>,
    t0: tokio::time::Instant,
}

impl FnInvoker {
    pub fn new(answer: impl Fn(&Value, usize) -> Result<Answer, InvokeError> + Send + Sync + 'static) -> Self {
        FnInvoker {
            answer: Box::new(answer),
            duration: Duration::ZERO,
            calls: Arc::default(),
            t0: tokio::time::Instant::now(),
        }
    }
}

impl Invoker for FnInvoker {
    fn invoke<'a>(&'a self, _function: &'a str, payload: Bytes) -> BoxFuture<'a, Result<Invoked, InvokeError>> {
        Box::pin(async move {
            let event: Value = serde_json::from_slice(&payload).expect("the core sends JSON");
            let n = {
                let mut calls = self.calls.lock().unwrap();
                calls.push(Call { event: event.clone(), at: self.t0.elapsed() });
                calls.len() - 1
            };
            tokio::time::sleep(self.duration).await;
            let answer = (self.answer)(&event, n)?;
            Ok(Invoked { answer, request_id: format!("req-{n}") })
        })
    }
}

/// The function's answers in the Invoke API's shape.
pub(crate) fn ok() -> Result<Answer, InvokeError> {
    Ok(Answer::Response(Bytes::new()))
}

pub(crate) fn respond(body: Value) -> Result<Answer, InvokeError> {
    Ok(Answer::Response(Bytes::from(body.to_string())))
}

pub(crate) fn function_error() -> Result<Answer, InvokeError> {
    Ok(Answer::FunctionError(Bytes::from_static(br#"{"errorType":"Boom","errorMessage":"failed"}"#)))
}

pub(crate) fn throttled() -> Result<Answer, InvokeError> {
    Err(InvokeError::Status { function: "f".into(), status: 429, body: "TooManyRequestsException".into() })
}

/// A failure destination that keeps what it is sent.
#[derive(Debug, Default)]
pub(crate) struct MemorySink {
    pub sent: Mutex<Vec<Value>>,
}

impl FailureSink for MemorySink {
    fn send<'a>(
        &'a self,
        record: &'a Value,
        _payload: Option<&'a str>,
        _partition: &'a str,
    ) -> BoxFuture<'a, Result<String, MappingError>> {
        Box::pin(async move {
            self.sent.lock().unwrap().push(record.clone());
            Ok("memory".to_owned())
        })
    }
}

/// Settings as a template would give them, on a made-up stream.
pub(crate) fn settings(edit: impl FnOnce(&mut RawSettings)) -> MappingSettings {
    let mut raw = RawSettings {
        stream: Some("arn:aws:kinesis:us-east-1:000000000000:stream/s".into()),
        function: Some("f".into()),
        starting_position: Some("TRIM_HORIZON".into()),
        ..Default::default()
    };
    edit(&mut raw);
    raw.validate().expect("valid settings")
}

/// The core's context around `invoker` and `sink`.
pub(crate) fn ctx(settings: MappingSettings, invoker: FnInvoker, sink: Option<Arc<MemorySink>>) -> Arc<Ctx> {
    let mut options = RunnerOptions::new(&settings, pushpull::store::Store::file(std::env::temp_dir()));
    options.retry_backoff = Duration::from_millis(100);
    options.max_retry_backoff = Duration::from_secs(5);
    let sink = sink.map(|s| s as Arc<dyn FailureSink>);
    Arc::new(Ctx::new(settings, options, Arc::new(invoker), sink))
}

/// Runs one partition's lanes over `pages` (each handed in as a source would hand a page, after
/// waiting its delay on tokio's clock), marking the partition caught up at `caught_up_at` after the
/// last page, until every lane ends.
pub(crate) async fn run(
    ctx: &Arc<Ctx>,
    partition: &Arc<MemoryPartition>,
    pages: Vec<(Duration, Vec<TestRec>)>,
    caught_up_at: f64,
) -> Result<(), MappingError> {
    let lanes = Lanes::new();
    let factor = ctx.settings.parallelization_factor as usize;
    let (senders, status, running) = lanes.spawn(ctx, partition.clone(), factor, None);
    let reader = {
        let (ctx, partition) = (ctx.clone(), partition.clone());
        async move {
            for (delay, page) in pages {
                tokio::time::sleep(delay).await;
                super::intake::dispatch(&ctx, &*partition, &senders, page).await?;
            }
            status.send_modify(|s| s.caught_up_at = caught_up_at);
            drop(senders);
            Ok::<_, MappingError>(())
        }
    };
    running.drive(reader, Duration::from_secs(3600), || async { Ok(()) }).await.map(|_| ())
}

/// The process has one metric log ([`crate::cloudwatch`]): tests that install one take turns.
pub(crate) async fn metric_log(
    path: &std::path::Path,
) -> (tokio::sync::MutexGuard<'static, ()>, Arc<crate::cloudwatch::MetricLog>) {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let turn = TURN.lock().await;
    let log = crate::cloudwatch::MetricLog::install(path).expect("a metric log in a temporary directory");
    (turn, log)
}
