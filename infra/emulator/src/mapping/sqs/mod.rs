//! The SQS source: Lambda's SQS event source mapping, on LocalStack's SQS (or AWS's).
//!
//! **Pollers.** Each poller long-polls the queue (`ReceiveMessage`, `WaitTimeSeconds` 20, up to
//! ten messages a call), hands what it received to its own lane of the core, and receives again
//! only while it holds less than a batch: one invocation at a time per poller, so pollers are
//! concurrent invocations. AWS (services-sqs-scaling.html): "When messages are available, Lambda
//! starts processing five batches at a time with five concurrent invocations of your function. If
//! messages are still available, Lambda increases the number of processes that are reading batches
//! by up to 300 more concurrent invokes per minute. The maximum number of invokes that an event
//! source mapping can process simultaneously is 1,250. When traffic is low, Lambda scales back the
//! processing to five concurrent invokes". Here: five pollers (fewer if `MaximumConcurrency` is
//! lower), one more every 200 ms while a receive comes back full, up to `MaximumConcurrency` or
//! 1,250; a poller above five whose long poll comes back empty stops. AWS's further step down to
//! two is not modelled.
//!
//! **Batches.** The lane batches as for every source: BatchSize, the batching window (default 0:
//! what a receive brought is invoked at once), the 6 MB payload.
//!
//! **Outcomes.** Successes and filtered-out messages are deleted (`DeleteMessageBatch`). A
//! failed batch, or the messages a partial batch response names, are left alone: hidden until
//! the queue's visibility timeout runs out, then delivered again by SQS, which also carries out
//! the queue's redrive policy (`maxReceiveCount`: the dead-letter queue). No retry in the poller
//! and no failure destination ([`crate::mapping::RawSettings::validate_sqs`]). A throttled
//! invocation is retried with backoff until the visibility timeout of its oldest message runs out.
//!
//! **FIFO.** Records of a message group go to one lane in order; SQS itself hands no message of a
//! group to anyone while an earlier one of it is in flight, so a failing message holds its group
//! back until it is deleted or dead-lettered.
pub(crate) mod record;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use aws_sdk_sqs::config::retry::RetryConfig;
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use tokio::sync::watch;
use tracing::{info, warn};

use self::record::{SqsPartition, SqsRec};
use super::lane::Lanes;
use super::settings::SqsSource;
use super::{Ctx, MappingError};

/// Pollers a mapping starts with (AWS: "five batches at a time with five concurrent invocations").
pub const INITIAL_POLLERS: usize = 5;
/// AWS's ceiling of concurrent invocations of one SQS mapping ("The maximum number of invokes that
/// an event source mapping can process simultaneously is 1,250").
pub const MAX_POLLERS: usize = 1250;
/// One more poller this often while messages remain: AWS's "up to 300 more concurrent invokes per
/// minute".
pub const SCALE_UP_EVERY: Duration = Duration::from_millis(200);
/// AWS's long polling: the longest `WaitTimeSeconds` SQS takes ("The maximum long polling wait time
/// is 20 seconds", best-practices-setting-up-long-polling.html). AWS does not say what its pollers
/// use; we take the longest.
pub const LONG_POLL_SECONDS: u8 = 20;
/// How often the queue's depth is asked (the caught-up check and the idle stop).
const DEPTH_CHECK: Duration = Duration::from_millis(500);

fn sqs_err(what: impl std::fmt::Display, e: impl std::error::Error) -> MappingError {
    MappingError::Sqs(format!("{what}: {}", aws_sdk_sqs::error::DisplayErrorContext(e)))
}

/// The queue named by `queue` (its name, URL or ARN), as `GetQueueAttributes` describes it.
///
/// ```no_run
/// # async fn f(client: aws_sdk_sqs::Client) -> Result<(), pushpull_emulator::mapping::MappingError> {
/// let source = pushpull_emulator::mapping::sqs::describe(&client, "orders", 20).await?;
/// assert!(source.queue_arn.ends_with(":orders"));
/// # Ok(()) }
/// ```
pub async fn describe(
    client: &aws_sdk_sqs::Client,
    queue: &str,
    wait_time_seconds: u8,
) -> Result<SqsSource, MappingError> {
    let url = if queue.starts_with("http://") || queue.starts_with("https://") {
        queue.to_owned()
    } else {
        // An ARN's last part is the queue's name; its account, the owner.
        let (name, owner) = match queue.strip_prefix("arn:") {
            Some(_) => {
                let parts: Vec<&str> = queue.split(':').collect();
                (parts.last().copied().unwrap_or_default(), parts.get(4).copied())
            }
            None => (queue, None),
        };
        client
            .get_queue_url()
            .queue_name(name)
            .set_queue_owner_aws_account_id(owner.map(str::to_owned))
            .send()
            .await
            .map_err(|e| sqs_err(format!("queue {queue}"), e))?
            .queue_url()
            .unwrap_or_default()
            .to_owned()
    };
    let attributes = client
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .map_err(|e| sqs_err(format!("the attributes of queue {queue}"), e))?;
    let get = |a: QueueAttributeName| attributes.attributes().and_then(|m| m.get(&a)).cloned();
    let queue_arn = get(QueueAttributeName::QueueArn)
        .ok_or_else(|| MappingError::Sqs(format!("queue {queue}: GetQueueAttributes gave no QueueArn")))?;
    let visibility = get(QueueAttributeName::VisibilityTimeout).and_then(|v| v.parse::<u64>().ok()).unwrap_or(30);
    Ok(SqsSource {
        queue_url: url,
        queue_arn,
        visibility_timeout: Duration::from_secs(visibility),
        redrive_policy: get(QueueAttributeName::RedrivePolicy),
        wait_time_seconds: wait_time_seconds.min(LONG_POLL_SECONDS),
    })
}

/// What the pollers share.
struct Pollers {
    /// Pollers at work now (those numbered below it).
    active: watch::Sender<usize>,
    /// The most there may be.
    cap: usize,
    /// The fewest (AWS's five, or `MaximumConcurrency` if lower).
    floor: usize,
    /// A receive came back with all it asked for since the last scaling tick: messages remain.
    backlog: AtomicBool,
    /// Records received so far (each record's index).
    next_index: AtomicU64,
    /// When the last receive that brought messages returned (unix seconds, as bits).
    received_at: AtomicU64,
    /// The most pollers at once.
    most: AtomicUsize,
}

/// Runs the SQS mapping on `source` until `stop` turns true or it is idle (if so configured).
/// The queue going away, or SQS refusing the mapping's calls for good, stops it with an error
/// naming the queue.
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    client: aws_sdk_sqs::Client,
    source: SqsSource,
    stop: watch::Receiver<bool>,
) -> Result<(), MappingError> {
    let cap = ctx.settings.maximum_concurrency.map_or(MAX_POLLERS, |m| m as usize).clamp(1, MAX_POLLERS);
    let floor = INITIAL_POLLERS.min(cap);
    let name = source.name().to_owned();
    info!(
        queue = %source.queue_arn, wait_time_seconds = source.wait_time_seconds, pollers = floor, cap,
        visibility_timeout = ?source.visibility_timeout, "sqs mapping: polling"
    );
    ctx.stats().counts.wait_time_seconds = u64::from(source.wait_time_seconds);
    let partition = record::partition(client.clone(), source.clone(), cap);
    if let Ok(mut c) = ctx.caught_up.lock() {
        c.insert(name.clone(), None);
    }
    let (active, _) = watch::channel(floor);
    let pollers = Arc::new(Pollers {
        active,
        cap,
        floor,
        backlog: AtomicBool::new(false),
        next_index: AtomicU64::new(0),
        received_at: AtomicU64::new(0),
        most: AtomicUsize::new(floor),
    });
    let lanes = Lanes::new();
    let (senders, status, running) = lanes.spawn(&ctx, partition.clone(), cap, None);
    let (quit_tx, quit) = watch::channel(false);
    let reader = {
        let (ctx, partition, pollers) = (ctx.clone(), partition.clone(), pollers.clone());
        async move {
            let polls = senders.iter().enumerate().map(|(i, lane)| {
                let lane = lane.clone();
                poll(&ctx, &partition, &pollers, i, lane, quit.clone())
            });
            // The pollers end together (on `quit`), or at the first that fails for good: then at
            // once, the scaler with them.
            let scaler = scale(&pollers, quit.clone());
            tokio::pin!(scaler);
            let all = futures_util::future::try_join_all(polls);
            tokio::pin!(all);
            let mut scaled = false;
            let polled = loop {
                tokio::select! {
                    r = &mut all => break r,
                    () = &mut scaler, if !scaled => scaled = true,
                }
            };
            // Stopping: the lanes finish the batches they hold (for at most the grace period).
            status.send_modify(|s| s.handing_over = true);
            drop(senders);
            polled.map(|_| None::<()>)
        }
    };
    let checker = {
        let (ctx, client, source, pollers) = (ctx.clone(), client.clone(), source.clone(), pollers.clone());
        tokio::spawn(async move { check_depth(&ctx, &client, &source, &pollers).await })
    };
    let grace = ctx.options.stop_grace;
    let watchdog = {
        let ctx = ctx.clone();
        async move {
            ctx.stopped_or_idle(stop).await;
            let _ = quit_tx.send(true);
            tokio::time::sleep(grace).await;
        }
    };
    let result = tokio::select! {
        r = running.drive(reader, Duration::from_secs(3600), || async { Ok(()) }) => r.map(|_| ()),
        () = watchdog => {
            warn!(?grace, "batches still in flight after the grace period: stopped; their messages come back after the visibility timeout");
            Ok(())
        }
    };
    checker.abort();
    let mut s = ctx.stats();
    s.counts.pollers_max = pollers.most.load(Ordering::SeqCst) as u64;
    s.counts.delete_failures = partition.delete_failures.load(Ordering::SeqCst) as u64;
    drop(s);
    if let Ok(mut c) = ctx.caught_up.lock() {
        c.remove(&name);
    }
    result
}

/// Adds a poller every [`SCALE_UP_EVERY`] while messages remain, up to the cap.
async fn scale(pollers: &Pollers, mut quit: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(SCALE_UP_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = quit.wait_for(|q| *q) => return,
            _ = ticks.tick() => {}
        }
        if pollers.backlog.swap(false, Ordering::SeqCst) {
            pollers.active.send_if_modified(|n| {
                if *n < pollers.cap {
                    *n += 1;
                    pollers.most.fetch_max(*n, Ordering::SeqCst);
                    true
                } else {
                    false
                }
            });
        }
    }
}

/// Poller `me`: receives while it is active and holds less than a batch, and hands what it
/// received to its lane.
async fn poll(
    ctx: &Arc<Ctx>,
    partition: &Arc<SqsPartition>,
    pollers: &Pollers,
    me: usize,
    lane: tokio::sync::mpsc::Sender<Vec<SqsRec>>,
    mut quit: watch::Receiver<bool>,
) -> Result<(), MappingError> {
    let batch = ctx.settings.batch_size as usize;
    let slot = &partition.slots[me];
    let source = &partition.source;
    let mut active = pollers.active.subscribe();
    let mut failures = 0u32;
    loop {
        // Not among the active pollers: wait to be.
        tokio::select! {
            _ = quit.wait_for(|q| *q) => return Ok(()),
            r = active.wait_for(|n| *n > me) => if r.is_err() { return Ok(()) },
        }
        // One batch at a time: receive again once what this poller holds is done; with a
        // batching window, while the batch it gathers is short of BatchSize.
        let gathering = !ctx.settings.batching_window.is_zero();
        loop {
            let freed = slot.freed.notified();
            let held = slot.held.load(Ordering::SeqCst);
            if held == 0 || (gathering && held < batch) {
                break;
            }
            tokio::select! {
                _ = quit.wait_for(|q| *q) => return Ok(()),
                () = freed => {}
            }
        }
        let want = (batch - slot.held.load(Ordering::SeqCst)).clamp(1, 10) as i32;
        let receive = partition
            .client
            .receive_message()
            .queue_url(&source.queue_url)
            .max_number_of_messages(want)
            .wait_time_seconds(i32::from(source.wait_time_seconds))
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            // The poller retries (and counts) a failed receive itself, as Lambda's
            // pollers do; the SDK's own retries would hide the failure from the counts.
            .customize()
            .config_override(aws_sdk_sqs::config::Builder::default().retry_config(RetryConfig::disabled()))
            .send();
        let out = tokio::select! {
            _ = quit.wait_for(|q| *q) => return Ok(()),
            out = receive => out,
        };
        let received_at = super::clock::now_unix();
        {
            let mut s = ctx.stats();
            s.counts.receives += 1;
        }
        let out = match out {
            Ok(out) => {
                failures = 0;
                out
            }
            Err(e) => {
                let gone = e.as_service_error().is_some_and(|e| e.is_queue_does_not_exist());
                let text = aws_sdk_sqs::error::DisplayErrorContext(&e).to_string();
                if gone || text.contains("NonExistentQueue") || text.contains("AccessDenied") {
                    return Err(MappingError::Sqs(format!("ReceiveMessage on {}: {text}", source.queue_arn)));
                }
                failures += 1;
                ctx.stats().counts.receive_errors += 1;
                warn!(queue = source.name(), poller = me, error = %text, "ReceiveMessage failed; trying again");
                let wait = Duration::from_millis(100 << failures.min(5));
                tokio::select! {
                    _ = quit.wait_for(|q| *q) => return Ok(()),
                    () = tokio::time::sleep(wait) => {}
                }
                continue;
            }
        };
        let messages = out.messages();
        if messages.is_empty() {
            ctx.stats().counts.empty_receives += 1;
            // Traffic is low: a poller above the floor stops (the highest first).
            if me + 1 > pollers.floor {
                pollers.active.send_if_modified(|n| {
                    if *n == me + 1 && *n > pollers.floor {
                        *n -= 1;
                        true
                    } else {
                        false
                    }
                });
            }
            continue;
        }
        if messages.len() as i32 >= want {
            pollers.backlog.store(true, Ordering::SeqCst);
        }
        pollers.received_at.store(received_at.to_bits(), Ordering::SeqCst);
        if let Ok(mut c) = ctx.caught_up.lock() {
            c.insert(source.name().to_owned(), None);
        }
        let records: Vec<SqsRec> = messages
            .iter()
            .map(|m| {
                let index = pollers.next_index.fetch_add(1, Ordering::SeqCst);
                SqsRec::from_message(index, me, m, source, received_at)
            })
            .collect();
        slot.held.fetch_add(records.len(), Ordering::SeqCst);
        if !super::intake::dispatch(ctx, &**partition, std::slice::from_ref(&lane), records).await? {
            return Ok(());
        }
    }
}

/// Every message the queue at `url` holds: visible, in flight and delayed
/// (`ApproximateNumberOfMessages`, `...NotVisible`, `...Delayed`).
pub async fn held(
    client: &aws_sdk_sqs::Client,
    url: &str,
) -> Result<u64, aws_sdk_sqs::error::SdkError<aws_sdk_sqs::operation::get_queue_attributes::GetQueueAttributesError>> {
    let out = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
        .send()
        .await?;
    Ok(out.attributes().into_iter().flatten().filter_map(|(_, v)| v.parse::<u64>().ok()).sum())
}

/// The queue is caught up while it holds no message (visible, in flight or delayed) and none was
/// received since the last look, twice in a row; the partition's caught-up time is the latest such
/// look.
async fn check_depth(ctx: &Ctx, client: &aws_sdk_sqs::Client, source: &SqsSource, pollers: &Pollers) {
    let mut empty_looks = 0u32;
    loop {
        tokio::time::sleep(DEPTH_CHECK).await;
        let asked_at = super::clock::now_unix();
        let held = match held(client, &source.queue_url).await {
            Ok(n) => n,
            Err(e) => {
                warn!(queue = source.name(), error = %aws_sdk_sqs::error::DisplayErrorContext(e), "could not ask the queue's depth");
                empty_looks = 0;
                continue;
            }
        };
        let last = f64::from_bits(pollers.received_at.load(Ordering::SeqCst));
        empty_looks = if held == 0 && last < asked_at { empty_looks + 1 } else { 0 };
        // The time of the latest look that found it caught up: everything sent before it was read.
        if let Ok(mut c) = ctx.caught_up.lock() {
            c.insert(source.name().to_owned(), (empty_looks >= 2).then_some(asked_at));
        }
    }
}
