//! RabbitMQ both ways (`make bench-rabbitmq`): the same messages consumed by push (`basic.consume`)
//! at prefetch 1, 10, 100, 1,000 and unlimited, and by pull (`basic.get`), on the broker
//! `infra/rabbitmq.sh` starts, in one run. Per mode:
//! - throughput: a queue of N messages drained by a consumer acknowledging each one;
//! - what a slow consumer (1 ms a message, a process of its own) holds: 2 s in, the messages the
//!   broker has pushed to it and it has not acknowledged (`N - ready - acknowledged`, the queue's
//!   ready count read on another channel), and its peak resident memory (`VmHWM`) against what it
//!   had connected: the subject's "push can overwhelm the consumer", and prefetch as push's brake
//!   (each held message is in the consumer's memory);
//! - delay: with the consumer caught up, 200 messages published 5 ms apart, from publish to receipt,
//!   p50 and p95; and for pull, the requests an idle consumer makes (a `basic.get` every 10 ms
//!   when the queue is empty: each answered empty).
//!
//! `cargo bench -p pushpull-tests --features integration --bench rabbitmq_both_ways -- [N]`
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use pushpull_tests::rabbitmq::{confirming, connect, fill, queue};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Push(u16),
    Pull,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Push(0) => f.write_str("push, prefetch unlimited"),
            Mode::Push(n) => write!(f, "push, prefetch {n}"),
            Mode::Pull => f.write_str("pull (basic.get)"),
        }
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

async fn ready(channel: &Channel, queue: &str) -> u32 {
    channel
        .queue_declare(queue.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .expect("passive queue.declare")
        .message_count()
}

/// Takes messages until `until` says stop, calling `each` with the publish time of each; acks each.
/// `slow`: the work per message.
async fn consume(
    connection: &Connection,
    queue: &str,
    mode: Mode,
    slow: Duration,
    mut each: impl FnMut(u64) -> bool,
) -> u64 {
    let channel = connection.create_channel().await.expect("a channel");
    let mut empty_gets = 0u64;
    match mode {
        Mode::Push(prefetch) => {
            channel.basic_qos(prefetch, BasicQosOptions::default()).await.expect("basic.qos");
            let mut consumer = channel
                .basic_consume(queue.into(), "bench".into(), BasicConsumeOptions::default(), FieldTable::default())
                .await
                .expect("basic.consume");
            while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await {
                if !slow.is_zero() {
                    tokio::time::sleep(slow).await;
                }
                let sent = u64::from_be_bytes(d.data[..8].try_into().unwrap_or_default());
                d.ack(BasicAckOptions::default()).await.expect("basic.ack");
                if !each(sent) {
                    break;
                }
            }
        }
        Mode::Pull => loop {
            match channel.basic_get(queue.into(), BasicGetOptions::default()).await.expect("basic.get") {
                Some(m) => {
                    if !slow.is_zero() {
                        tokio::time::sleep(slow).await;
                    }
                    let sent = u64::from_be_bytes(m.delivery.data[..8].try_into().unwrap_or_default());
                    m.delivery.ack(BasicAckOptions::default()).await.expect("basic.ack");
                    if !each(sent) {
                        break;
                    }
                }
                None => {
                    empty_gets += 1;
                    if !each(0) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        },
    }
    let _ = channel.close(200, "bench done".into()).await;
    empty_gets
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
}

/// A resident-memory figure of this process from `/proc/self/status` (`VmRSS`, `VmHWM`), in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.trim_start_matches(':').trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(0)
}

/// The slow consumer's own process (`--slow-consumer QUEUE MODE`): consumes for 2.5 s at 1 ms a
/// message, then prints `acked_by_2s rss_connected_kib peak_kib`.
async fn slow_consumer(queue: &str, mode: Mode) {
    let started = Instant::now();
    let connection = connect().await;
    let connected = status_kib("VmRSS");
    let mut acked = 0u64;
    let mut at_2s = None;
    consume(&connection, queue, mode, Duration::from_millis(1), |sent| {
        if started.elapsed() >= Duration::from_secs(2) {
            at_2s.get_or_insert(acked);
        }
        if sent > 0 {
            acked += 1;
        }
        started.elapsed() < Duration::from_millis(2500)
    })
    .await;
    println!("{} {connected} {}", at_2s.unwrap_or(acked), status_kib("VmHWM"));
}

fn mode_code(mode: Mode) -> String {
    match mode {
        Mode::Push(n) => n.to_string(),
        Mode::Pull => "pull".to_owned(),
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--slow-consumer") {
        let mode = match args[i + 2].as_str() {
            "pull" => Mode::Pull,
            n => Mode::Push(n.parse().expect("a prefetch")),
        };
        return slow_consumer(&args[i + 1], mode).await;
    }
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(20_000);
    let connection = connect().await;
    let publisher = confirming(&connection).await;
    println!("RabbitMQ both ways: {n} messages of 100 bytes per mode, broker {}", pushpull_tests::rabbitmq::url());
    println!(
        "| mode | drain msgs/s | slow consumer holds (unacked, after 2 s) | its peak memory MiB (connected: MiB) | delay p50 ms | delay p95 ms | idle requests/s |"
    );
    println!("|---|---|---|---|---|---|---|");
    for mode in [Mode::Push(1), Mode::Push(10), Mode::Push(100), Mode::Push(1000), Mode::Push(0), Mode::Pull] {
        // Throughput: drain a full queue.
        let q = queue(&publisher, "bench-drain", FieldTable::default()).await;
        fill(&publisher, &q, n).await;
        let started = Instant::now();
        let mut got = 0usize;
        consume(&connection, &q, mode, Duration::ZERO, |sent| {
            if sent > 0 {
                got += 1;
            }
            got < n
        })
        .await;
        let rate = got as f64 / started.elapsed().as_secs_f64();

        // A slow consumer: what the broker has pushed into it, unacknowledged, 2 s in.
        let (held, connected_kib, peak_kib) = held_while_slow(&publisher, mode, n).await;

        // Delay at low load, and the idle consumer's requests.
        let q = queue(&publisher, "bench-delay", FieldTable::default()).await;
        let (delays_tx, delays_rx) = std::sync::mpsc::channel::<f64>();
        let consumer = {
            let q = q.clone();
            let connection = connect().await;
            tokio::spawn(async move {
                let mut seen = 0;
                consume(&connection, &q, mode, Duration::ZERO, |sent| {
                    if sent > 0 {
                        let _ = delays_tx.send((now_us().saturating_sub(sent)) as f64 / 1000.0);
                        seen += 1;
                    }
                    seen < 200
                })
                .await
            })
        };
        // One idle second first: the pull consumer's empty requests.
        tokio::time::sleep(Duration::from_secs(1)).await;
        for _ in 0..200 {
            fill(&publisher, &q, 1).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let empty_gets = consumer.await.expect("the delay consumer");
        let mut delays: Vec<f64> = delays_rx.try_iter().collect();
        delays.sort_by(f64::total_cmp);
        let idle_rate = match mode {
            // Requests answered empty over the idle second and the gaps between messages.
            Mode::Pull => format!("{:.0}", empty_gets as f64 / 2.0),
            Mode::Push(_) => "0".to_owned(),
        };
        println!(
            "| {mode} | {rate:.0} | {held} | {:.1} ({:.1}) | {:.2} | {:.2} | {idle_rate} |",
            peak_kib as f64 / 1024.0,
            connected_kib as f64 / 1024.0,
            pct(&delays, 0.5),
            pct(&delays, 0.95)
        );
    }
}

/// The messages a slow consumer (a process of its own) holds unacknowledged 2 s in, the queue's
/// ready count read by another channel while it runs; and its resident memory once connected and
/// at its peak (KiB).
async fn held_while_slow(publisher: &Channel, mode: Mode, n: usize) -> (u64, u64, u64) {
    let q = queue(publisher, "bench-held", FieldTable::default()).await;
    fill(publisher, &q, n).await;
    let exe = std::env::current_exe().expect("the bench's own path");
    let child = tokio::process::Command::new(exe)
        .args(["--slow-consumer", &q, &mode_code(mode)])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the slow consumer's process");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ready = u64::from(ready(publisher, &q).await);
    let out = child.wait_with_output().await.expect("the slow consumer ends");
    let text = String::from_utf8_lossy(&out.stdout);
    let nums: Vec<u64> = text.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    let [acked_by_2s, connected, peak] = nums[..] else { panic!("the slow consumer said {text:?}") };
    ((n as u64).saturating_sub(ready).saturating_sub(acked_by_2s), connected, peak)
}
