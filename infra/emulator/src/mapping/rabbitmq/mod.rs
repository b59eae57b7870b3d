//! The RabbitMQ source: Lambda's Amazon MQ for RabbitMQ event source mapping, on a real broker.
//!
//! One consumer (`basic.consume`) on the mapping's queue, with a prefetch of twice the batch size
//! (the broker's credit: it pushes no more unacknowledged messages than that), and one lane of the
//! core: AWS (with-mq.html): "For RabbitMQ, the number of concurrent execution environments is
//! limited to 1 per Amazon MQ event source mapping", so one batch at a time, in delivery order.
//!
//! - **Acknowledgement**: each message is acknowledged once its batch succeeded, or when a filter
//!   drops it (AWS, invocation-eventfiltering: "For Amazon MQ, Lambda acknowledges matched messages
//!   after successfully invoking the function and acknowledges unmatched messages when filtering
//!   them").
//! - **A failing batch**: AWS (with-mq.html): "If your function returns an error for any of the
//!   messages in a batch, Lambda retries the whole batch of messages until processing succeeds or
//!   the messages expire." Where AWS is silent (retried in the poller, or handed back to the
//!   broker), ours: the batch is retried [`RETRIES_BEFORE_REQUEUE`] times with the core's backoff,
//!   then nacked with requeue ([`crate::mapping::source::Partition::take_back`]): the broker
//!   delivers it again, marked `redelivered`, and a quorum queue counts the delivery toward its
//!   `x-delivery-limit`, which bounds a poison message as AWS advises (services-mq-errors.html: "To
//!   redeliver messages upon function error, you can use a dead-letter queue").
//! - **A message over the 6 MB payload**: AWS (services-mq-errors.html): "Records also go
//!   unprocessed if Lambda drops them due to their size." Dropped: acknowledged uninvoked, counted.
//! - **The event**: `aws:rmq`, messages under `queue::vhost`, AMQP properties as AWS (a Java
//!   client, Gson) writes them ([`record`]).
pub mod admin;
pub(crate) mod record;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::sync::watch;
use tracing::{info, warn};

use self::record::{Envelope, MqPartition, MqRec};
use super::lane::Lanes;
use super::settings::RabbitMqSource;
use super::{Ctx, MappingError};

/// Retries of a failed batch in the poller before it is handed back to the broker.
pub const RETRIES_BEFORE_REQUEUE: i64 = 2;

/// How often the queue's depth is asked (for the caught-up check and the idle stop).
const DEPTH_CHECK: Duration = Duration::from_millis(500);

fn err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> MappingError {
    MappingError::RabbitMq(format!("{what}: {e}"))
}

/// Runs the RabbitMQ mapping on `source` until `stop` turns true, the queue goes away, or it is
/// idle (if so configured). A connection lost after the first (a broker restart, a connection
/// closed by the broker or the network) is opened again, every [`RECONNECT_EVERY`] until it
/// answers: what was delivered and not acknowledged, the broker requeues (`redelivered`), and
/// the batch in flight, if its function succeeds, cannot be acknowledged on the closed channel:
/// it comes again (at least once: AWS's "Lambda event source mappings process each event at
/// least once", with-mq.html).
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    source: RabbitMqSource,
    stop: watch::Receiver<bool>,
) -> Result<(), MappingError> {
    let mut first = true;
    let mut stopping = stop.clone();
    loop {
        match session(ctx.clone(), &source, stop.clone(), first).await? {
            None => return Ok(()),
            Some(lost) => {
                warn!(broker = %source.redacted(), error = %lost, "rabbitmq mapping: connection lost; connecting again");
                // Asked to stop meanwhile: nothing more to read.
                tokio::select! {
                    () = tokio::time::sleep(RECONNECT_EVERY) => {}
                    _ = stopping.wait_for(|s| *s) => return Ok(()),
                }
                if *stop.borrow() {
                    return Ok(());
                }
            }
        }
        first = false;
    }
}

/// How long opening a connection (and its channels and consumer) may take before it counts as
/// lost and is tried again.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `e` is the broker refusing what the mapping names (no such queue, no access): the
/// mapping's configuration, which connecting again cannot mend.
fn refused(e: &lapin::Error) -> bool {
    let text = e.to_string();
    text.contains("NOT_FOUND") || text.contains("ACCESS_REFUSED") || text.contains("NOT_ALLOWED")
}

/// How often a lost connection is tried again.
pub const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// One connection's life: `None` when it ended as asked (stop, idle), `Some(reason)` when the
/// connection was lost (and, except on the `first`, when it could not be opened).
async fn session(
    ctx: Arc<Ctx>,
    source: &RabbitMqSource,
    stop: watch::Receiver<bool>,
    first: bool,
) -> Result<Option<String>, MappingError> {
    // Before the first connection is up, every failure is the caller's (a wrong URL, no such
    // queue); after it, a failure to connect or to set up is a broker still on its way back,
    // unless the broker refuses the queue (deleted, or access taken away).
    let where_ = source.redacted();
    let prefetch = ctx.settings.batch_size.saturating_mul(2).clamp(1, u32::from(u16::MAX)) as u16;
    let opened = tokio::time::timeout(OPEN_TIMEOUT, async {
        let connection = Connection::connect(&source.url, ConnectionProperties::default())
            .await
            .map_err(|e| (format!("connecting to {where_}"), e))?;
        // The queue must exist: a passive declare answers 404 otherwise (and closes its channel).
        let probe = connection.create_channel().await.map_err(|e| ("a channel".to_owned(), e))?;
        probe
            .queue_declare(
                source.queue.as_str().into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(|e| (format!("queue {} on {where_}", source.queue), e))?;
        let channel = connection.create_channel().await.map_err(|e| ("a channel".to_owned(), e))?;
        channel.basic_qos(prefetch, BasicQosOptions::default()).await.map_err(|e| ("basic.qos".to_owned(), e))?;
        let consumer = channel
            .basic_consume(
                source.queue.as_str().into(),
                "pushpull-local-esm".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| (format!("consuming {}", source.queue), e))?;
        Ok::<_, (String, lapin::Error)>((connection, channel, consumer))
    })
    .await;
    let (connection, channel, mut consumer) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err((what, e))) if first || refused(&e) => return Err(err(what, e)),
        Ok(Err((what, e))) => return Ok(Some(format!("{what}: {e}"))),
        Err(_) if first => return Err(MappingError::RabbitMq(format!("{where_} did not answer in {OPEN_TIMEOUT:?}"))),
        Err(_) => return Ok(Some(format!("{where_} did not answer in {OPEN_TIMEOUT:?}"))),
    };
    if !first {
        ctx.stats().counts.reconnects += 1;
    }
    info!(queue = %source.queue, broker = %where_, prefetch, "rabbitmq mapping: consuming");
    let partition = Arc::new(MqPartition::new(
        Envelope { event_source_arn: source.event_source_arn(), key: format!("{}::{}", source.queue, source.vhost()) },
        channel.clone(),
    ));
    let id = partition.name().to_owned();
    let id_of_session = id.clone();
    if let Ok(mut c) = ctx.caught_up.lock() {
        c.insert(id.clone(), None);
    }
    let lanes = Lanes::new();
    let (senders, status, running) = lanes.spawn(&ctx, partition.clone(), 1, None);
    let received_at = Arc::new(AtomicU64::new(0));
    // The reader stops on `quit`: sent on `stop`, or once idle (if so configured).
    let (quit_tx, mut quit) = watch::channel(false);
    let reader = {
        let (ctx, partition, received_at) = (ctx.clone(), partition.clone(), received_at.clone());
        async move {
            let mut index = 0u64;
            let ended = 'read: loop {
                tokio::select! {
                    _ = quit.changed() => break Ok(None),
                    next = consumer.next() => match next {
                        Some(Ok(delivery)) => {
                            received_at.store(super::clock::now_unix().to_bits(), Ordering::SeqCst);
                            if let Ok(mut c) = ctx.caught_up.lock() {
                                c.insert(id.clone(), None);
                            }
                            // With it, every delivery already here (up to a batch): the lane gets
                            // them at once, so a batch is not cut at whatever one delivery brought.
                            let mut records = vec![MqRec::from_delivery(index, delivery)];
                            index += 1;
                            while records.len() < ctx.settings.batch_size as usize {
                                match consumer.next().now_or_never() {
                                    Some(Some(Ok(d))) => {
                                        records.push(MqRec::from_delivery(index, d));
                                        index += 1;
                                    }
                                    Some(Some(Err(e))) => break 'read Ok(Some(format!("the consumer of {id}: {e}"))),
                                    Some(None) | None => break,
                                }
                            }
                            if !super::intake::dispatch(&ctx, &*partition, &senders, records).await? {
                                break Ok(None);
                            }
                        }
                        Some(Err(e)) => break Ok(Some(format!("the consumer of {id}: {e}"))),
                        None => break Err(MappingError::RabbitMq(format!(
                            "the broker cancelled the consumer of {id} (the queue was deleted?)"
                        ))),
                    },
                }
            };
            // Stopping: the lane finishes the invocation in flight and drops the rest, which the
            // broker requeues when the channel closes (never acknowledged).
            status.send_modify(|s| {
                s.handing_over = true;
                s.revoked = true;
            });
            drop(senders);
            ended
        }
    };
    // A depth check that fails (its channel gone with the connection) ends the session as lost.
    let lost_depth: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let checker = {
        let depth = match connection.create_channel().await {
            Ok(c) => c,
            Err(e) if first => return Err(err("a channel", e)),
            Err(e) => return Ok(Some(format!("a channel: {e}"))),
        };
        let (ctx, queue, id, received_at) =
            (ctx.clone(), source.queue.clone(), partition.name().to_owned(), received_at.clone());
        let (lost_depth, quit_tx) = (lost_depth.clone(), quit_tx.clone());
        tokio::spawn(async move {
            let e = check_depth(&ctx, &depth, &queue, &id, &received_at).await;
            if let Ok(mut l) = lost_depth.lock() {
                *l = Some(e);
            }
            let _ = quit_tx.send(true);
        })
    };
    // Stopping (asked to, or idle): the reader stops taking deliveries and the lane finishes its
    // batch in flight, for at most the grace period; what is left unacknowledged goes back to the
    // queue when the connection closes.
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
        r = running.drive(reader, Duration::from_secs(3600), || async { Ok(()) }) => r.map(Option::flatten),
        () = watchdog => {
            warn!(?grace, "a batch still in flight after the grace period: stopped; the broker requeues its messages");
            Ok(None)
        }
    };
    checker.abort();
    if let Ok(mut c) = ctx.caught_up.lock() {
        c.remove(&id_of_session);
    }
    let result = match (result, lost_depth.lock().ok().and_then(|mut l| l.take())) {
        (Ok(None), Some(reason)) => Ok(Some(reason)),
        (other, _) => other,
    };
    let _ = connection.close(200, "pushpull-local esm stopping".into()).await;
    result
}

/// The queue is caught up while the broker has no message ready for it and none arrived since
/// the last look, twice in a row, on a connection at least [`SETTLE`] old: just after a broker
/// restart a quorum queue answers a passive declare before it has recovered the messages it
/// requeued (a 100,000-line storm ended "caught up" with 356 of them still to come).
async fn check_depth(ctx: &Ctx, channel: &lapin::Channel, queue: &str, id: &str, received_at: &AtomicU64) -> String {
    let opened = tokio::time::Instant::now();
    let mut empty_looks = 0u32;
    loop {
        tokio::time::sleep(DEPTH_CHECK).await;
        let asked_at = super::clock::now_unix();
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await;
        let ready = match declared {
            Ok(q) => q.message_count(),
            Err(e) => {
                warn!(queue, error = %e, "could not ask the queue's depth");
                return format!("asking the depth of {queue}: {e}");
            }
        };
        let last = f64::from_bits(received_at.load(Ordering::SeqCst));
        empty_looks = if ready == 0 && last < asked_at { empty_looks + 1 } else { 0 };
        if empty_looks >= 2
            && opened.elapsed() >= SETTLE
            && let Ok(mut c) = ctx.caught_up.lock()
            && c.get(id).is_some_and(Option::is_none)
        {
            c.insert(id.to_owned(), Some(asked_at));
        }
    }
}

/// How long a connection is up before its queue may be called caught up.
const SETTLE: Duration = Duration::from_secs(3);
