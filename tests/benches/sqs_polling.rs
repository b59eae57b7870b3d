//! The local SQS mapping against a raw ReceiveMessage / DeleteMessageBatch loop, and what long
//! polling saves on an idle queue, on LocalStack's SQS, in one run.
//!
//!     make bench-sqs    # or: cargo bench -p pushpull-tests --features integration --bench sqs_polling -- [messages] [idle seconds]
//!
//! **Throughput.** Two queues of `messages` messages of 100 bytes (default 10,000). One drained by
//! five raw loops (ReceiveMessage up to 10, WaitTimeSeconds 1 so that no loop waits 20 s on the
//! emptied queue at the end, then DeleteMessageBatch), the other by
//! the mapping at MaximumConcurrency 5 (BatchSize 10, window 0, `bench-floor` behind the Invoke
//! API, which answers without reading the event): five pollers each side. Messages per second for
//! both, and their ratio.
//!
//! **Long polling.** The mapping on an empty queue for `idle seconds` (default 60) with
//! WaitTimeSeconds 0 (short polling), then 20 (long polling, what AWS's pollers do): ReceiveMessage
//! calls and empty receives per minute, and what an idle month of them costs at SQS's standard
//! price ($0.40 per million requests beyond the free million; AWS: "Short polling is billed the
//! same as long polling"). Then 20 messages sent 500 ms apart to the still idle queue: delay from
//! `SentTimestamp` to the invocation, p50 and p95.
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, SendMessageBatchRequestEntry};
use pushpull::store::Store;
use pushpull_local::invoke::InvokeServer;
use pushpull_local::localstack::Local;
use pushpull_local::mapping::{Clients, RawSettings, Runner, RunnerOptions, SqsSource, Summary};
use pushpull_tests::{function, unique};

/// SQS standard queues' price per request, beyond the free tier (aws.amazon.com/sqs/pricing).
const PRICE_PER_REQUEST: f64 = 0.40 / 1_000_000.0;
const POLLERS: usize = 5;

async fn make_queue(local: &Local, prefix: &str) -> String {
    let out = local.sqs.create_queue().queue_name(unique(prefix)).send().await.expect("CreateQueue");
    out.queue_url().expect("a URL").to_owned()
}

async fn fill(local: &Local, url: &str, n: usize) {
    let body = "x".repeat(100);
    let mut sends = Vec::new();
    for start in (0..n).step_by(10) {
        let entries: Vec<SendMessageBatchRequestEntry> = (start..(start + 10).min(n))
            .map(|i| SendMessageBatchRequestEntry::builder().id(i.to_string()).message_body(&body).build().unwrap())
            .collect();
        sends.push(local.sqs.send_message_batch().queue_url(url).set_entries(Some(entries)).send());
        if sends.len() == 8 {
            for s in sends.drain(..) {
                s.await.expect("SendMessageBatch");
            }
        }
    }
    for s in sends {
        s.await.expect("SendMessageBatch");
    }
}

/// Five loops of ReceiveMessage (10, long polling) and DeleteMessageBatch until `n` are deleted.
async fn raw_throughput(local: &Local, url: &str, n: usize) -> f64 {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let loops = (0..POLLERS).map(|_| {
        let (sqs, url, done) = (local.sqs.clone(), url.to_owned(), done.clone());
        async move {
            while done.load(std::sync::atomic::Ordering::SeqCst) < n {
                let out = sqs
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(1)
                    .send()
                    .await
                    .expect("ReceiveMessage");
                let entries: Vec<DeleteMessageBatchRequestEntry> = out
                    .messages()
                    .iter()
                    .enumerate()
                    .map(|(i, m)| {
                        DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(m.receipt_handle().unwrap_or_default())
                            .build()
                            .unwrap()
                    })
                    .collect();
                if entries.is_empty() {
                    continue;
                }
                let k = entries.len();
                sqs.delete_message_batch().queue_url(&url).set_entries(Some(entries)).send().await.expect("Delete");
                done.fetch_add(k, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    futures_util::future::join_all(loops).await;
    n as f64 / started.elapsed().as_secs_f64()
}

async fn source(local: &Local, url: &str, wait: u8) -> SqsSource {
    pushpull_local::mapping::sqs::describe(&local.sqs, url, wait).await.expect("the queue")
}

fn options(settings: &pushpull_local::mapping::MappingSettings) -> RunnerOptions {
    RunnerOptions::new(settings, Store::file(std::env::temp_dir().join(unique("bench-unused"))))
}

fn settings(source: &SqsSource) -> pushpull_local::mapping::MappingSettings {
    RawSettings {
        function: Some("bench-floor".into()),
        batch_size: Some("10".into()),
        batching_window: Some("0".into()),
        maximum_concurrency: Some(POLLERS.to_string()),
        ..Default::default()
    }
    .validate_sqs(source, Duration::from_secs(3))
    .expect("valid settings")
}

async fn mapping_throughput(local: &Local, server: &InvokeServer, url: &str, n: usize) -> f64 {
    let source = source(local, url, 20).await;
    let settings = settings(&source);
    let options = options(&settings);
    let started = Instant::now();
    let m = Runner::start_sqs(settings, source, options, Clients::from(local), server.client());
    while !(m.progress().0 as usize >= n && m.is_idle()) {
        assert!(started.elapsed() < Duration::from_secs(600), "mapping: {:?}/{n}", m.progress());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed().as_secs_f64();
    m.stop().await.expect("the mapping");
    n as f64 / took
}

/// The mapping on an idle queue for `idle`, then 20 messages 500 ms apart: the idle window's
/// receives and empty receives, and the delays.
async fn idle_run(local: &Local, server: &InvokeServer, wait: u8, idle: Duration) -> (Summary, Summary) {
    let url = make_queue(local, "bench-sqs-idle").await;
    let source = source(local, &url, wait).await;
    let settings = settings(&source);
    let options = options(&settings);
    let m = Runner::start_sqs(settings, source, options, Clients::from(local), server.client());
    tokio::time::sleep(idle).await;
    let during_idle = m.summary();
    for i in 0..20 {
        local.sqs.send_message().queue_url(&url).message_body(format!("{{\"n\":{i}}}")).send().await.expect("send");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while m.progress().0 < 20 || !m.is_idle() {
        assert!(Instant::now() < deadline, "idle run: {:?}", m.progress());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let end = m.stop().await.expect("the mapping");
    (during_idle, end)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let idle_s: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(60);
    let local = pushpull_tests::local().await;
    let server = InvokeServer::start(vec![function("bench-floor", &[])], 0, 10).await.expect("the Invoke API");
    println!("sqs mapping vs raw ReceiveMessage/DeleteMessageBatch loops, {n} messages of 100 bytes, LocalStack's SQS");
    let raw_url = make_queue(&local, "bench-sqs-raw").await;
    fill(&local, &raw_url, n).await;
    let raw = raw_throughput(&local, &raw_url, n).await;
    let mapped_url = make_queue(&local, "bench-sqs-map").await;
    fill(&local, &mapped_url, n).await;
    let mapped = mapping_throughput(&local, &server, &mapped_url, n).await;
    println!(
        "throughput      {POLLERS} raw loops (10 a receive) {raw:.0} msgs/s; mapping (MaximumConcurrency {POLLERS}, BatchSize 10, window 0) {mapped:.0} msgs/s: {:.2}x the raw loops",
        mapped / raw
    );
    println!("idle queue, {idle_s} s each, {POLLERS} pollers (MaximumConcurrency {POLLERS}):");
    for wait in [0u8, 20] {
        let (idle, end) = idle_run(&local, &server, wait, Duration::from_secs(idle_s)).await;
        let per_min = |x: u64| x as f64 * 60.0 / idle_s as f64;
        let calls = per_min(idle.counts.receives);
        let month = calls * 60.0 * 24.0 * 30.0;
        println!(
            "  WaitTimeSeconds {wait:>2}: {calls:>9.0} ReceiveMessage/min ({:.0} empty), an idle month {:.1} million requests = ${:.2} (${:.2} beyond the free million); delay send -> invoke p50 {:.0} ms, p95 {:.0} ms",
            per_min(idle.counts.empty_receives),
            month / 1e6,
            month * PRICE_PER_REQUEST,
            (month - 1e6).max(0.0) * PRICE_PER_REQUEST,
            end.delay_ms_p50,
            end.delay_ms_p95
        );
    }
}
