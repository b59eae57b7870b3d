//! The RabbitMQ sink (feature `rabbitmq-sink`): records into one queue, through the default
//! exchange, each confirmed by the broker before it counts as written.
//!
//! - **Nothing silently dropped.** Publisher confirms are on; every message is `mandatory`, so a
//!   message no queue takes comes back (`basic.return`, 312 NO_ROUTE) and the call fails, never
//!   counted as written; a `basic.nack` fails its entry (resent).
//! - **Durable.** Messages are persistent (`delivery-mode` 2): a durable queue keeps them across
//!   a broker restart.
//! - **Named.** Each message's `message-id` is the object and line it came from
//!   ([`message_id`]: `<bucket>/<key>@<version>#<line>`), the same on every resend and every
//!   retried invocation, so that a consumer recognises duplicates. RabbitMQ keeps no offsets to
//!   read back ([`RecordSink::can_read_back`] is false): a crashed invocation's retry publishes the
//!   lines after the last checkpoint again, and the consumer drops what it has already counted
//!   by these ids (the sample rollup does: ARCHITECTURE.md).
//! - **Order.** One channel publishes, one call at a time: a call's messages enter the queue in
//!   the call's order. An entry that fails fails the entries after it in the call too (they are
//!   resent after it, in order; those the broker had taken are then in the queue twice, under
//!   the same id). The partition key travels in the `pushpull-partition-key` header.
//! - **Reconnects.** A lost connection fails the call's unconfirmed entries (retryable); the next
//!   call connects again.
//!
//! `amqp://` or `amqps://` (TLS, the system's root certificates): Amazon MQ's brokers take
//! `amqps://` only.
//!
//! ```no_run
//! # async fn f() -> Result<(), pushpull::sink::SinkError> {
//! use pushpull::sink::rabbitmq::RabbitMqSink;
//! use pushpull::sink::{OutRecord, RecordSink};
//! let sink = RabbitMqSink::connect("amqp://pushpull:pushpull@127.0.0.1:5672/pushpull", "records").await?;
//! let outcome = sink.put_records(&[OutRecord::keyed("customer-7", "{\"total\": 3}")]).await?;
//! assert!(outcome.failed.is_empty());
//! # Ok(())
//! # }
//! ```
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use super::{FailedEntry, OutRecord, PutOutcome, RecordSink, SinkError};

#[doc(inline)]
pub use crate::pull::rabbitmq::{PARTITION_KEY_HEADER, message_id, parse_message_id, redacted};

/// How long one call waits for the broker (publishing and confirming) before its unconfirmed
/// entries fail (retryable) and the connection is dropped.
const CALL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);

/// Records into one RabbitMQ queue.
pub struct RabbitMqSink {
    url: String,
    queue: String,
    /// The open connection and its confirming channel; `None` after a failure, until the next
    /// call connects again. Held for a whole call: one call publishes at a time.
    open: Mutex<Option<(Connection, Channel)>>,
}

impl std::fmt::Debug for RabbitMqSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqSink").field("broker", &redacted(&self.url)).field("queue", &self.queue).finish()
    }
}

fn error(what: String, e: lapin::Error, retryable: bool) -> SinkError {
    SinkError::new(format!("{what}: {e}"), retryable).with_source(e)
}

impl RabbitMqSink {
    /// Connects to the broker at `url` (`amqp[s]://user:pass@host:port/vhost`) and checks that
    /// `queue` exists: a missing queue is refused here (not retryable), not at the first record.
    pub async fn connect(url: &str, queue: &str) -> Result<Self, SinkError> {
        let sink = RabbitMqSink { url: url.to_owned(), queue: queue.to_owned(), open: Mutex::new(None) };
        let opened = sink.open().await?;
        *sink.open.lock().await = Some(opened);
        Ok(sink)
    }

    /// The queue.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    async fn open(&self) -> Result<(Connection, Channel), SinkError> {
        let broker = redacted(&self.url);
        let connection = Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .map_err(|e| error(format!("connecting to RabbitMQ at {broker}"), e, true))?;
        let channel =
            connection.create_channel().await.map_err(|e| error(format!("a channel on {broker}"), e, true))?;
        // A passive declare answers 404 NOT_FOUND for a queue that does not exist.
        if let Err(e) = channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
        {
            let missing = e.to_string().contains("NOT_FOUND") || e.to_string().contains("404");
            return Err(error(format!("RabbitMQ queue {} on {broker}", self.queue), e, !missing));
        }
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| error(format!("confirm.select on {broker}"), e, true))?;
        Ok((connection, channel))
    }

    fn properties(&self, record: &OutRecord, now_s: u64) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from(PARTITION_KEY_HEADER),
            AMQPValue::LongString(LongString::from(record.partition_key.as_bytes())),
        );
        let mut p = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_app_id("pushpull".into())
            .with_timestamp(now_s)
            .with_headers(headers);
        if let Some(origin) = &record.origin {
            p = p.with_message_id(message_id(origin, record.line).into());
        }
        p
    }
}

impl RecordSink for RabbitMqSink {
    /// A call's messages enter the queue in its order; an entry that fails fails those after it.
    fn keeps_key_order_in_a_call(&self) -> bool {
        true
    }

    /// The push loop names each record's object, for its message id.
    fn names_records(&self) -> bool {
        true
    }

    async fn put_records(&self, records: &[OutRecord]) -> Result<PutOutcome, SinkError> {
        let mut open = self.open.lock().await;
        let usable = open.as_ref().is_some_and(|(c, ch)| c.status().connected() && ch.status().connected());
        if !usable {
            *open = None;
            let opened = tokio::time::timeout(CALL_DEADLINE, self.open()).await.map_err(|_| {
                SinkError::new(format!("RabbitMQ at {} did not answer in {CALL_DEADLINE:?}", redacted(&self.url)), true)
            })?;
            *open = Some(opened?);
        }
        let Some((_, channel)) = open.as_ref() else { unreachable!("opened above") };
        let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        // Published all at once (the broker confirms them as it takes them), confirmed after.
        let mut confirms = Vec::with_capacity(records.len());
        let mut first_failure: Option<(usize, String, String)> = None;
        // A broker that stops answering (a connection half-gone, publishers blocked by a memory
        // alarm) fails the call's unconfirmed entries after this, rather than holding the
        // invocation until its timeout.
        let deadline = tokio::time::Instant::now() + CALL_DEADLINE;
        let late = || ("NoAnswer".to_owned(), format!("no answer from the broker in {CALL_DEADLINE:?}"));
        for (i, r) in records.iter().enumerate() {
            let published = tokio::time::timeout_at(
                deadline,
                channel.basic_publish(
                    "".into(),
                    self.queue.as_str().into(),
                    BasicPublishOptions { mandatory: true, ..Default::default() },
                    &r.data,
                    self.properties(r, now_s),
                ),
            )
            .await;
            match published {
                Ok(Ok(confirm)) => confirms.push(confirm),
                Ok(Err(e)) => {
                    first_failure = Some((i, "PublishFailed".to_owned(), e.to_string()));
                    break;
                }
                Err(_) => {
                    let (code, message) = late();
                    first_failure = Some((i, code, message));
                    break;
                }
            }
        }
        let mut returned: Option<String> = None;
        for (i, confirm) in confirms.into_iter().enumerate() {
            if first_failure.as_ref().is_some_and(|f| f.0 <= i) {
                break;
            }
            let Ok(confirmed) = tokio::time::timeout_at(deadline, confirm).await else {
                let (code, message) = late();
                first_failure = Some((i, code, message));
                break;
            };
            match confirmed {
                Ok(Confirmation::Ack(None)) => {}
                Ok(Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r))) => {
                    returned.get_or_insert_with(|| format!("{} {}", r.reply_code, r.reply_text));
                    first_failure = Some((i, "Returned".to_owned(), format!("{} {}", r.reply_code, r.reply_text)));
                }
                Ok(Confirmation::Nack(None)) => {
                    first_failure = Some((i, "Nack".to_owned(), "the broker did not take the message".to_owned()));
                }
                Ok(Confirmation::NotRequested) => {
                    first_failure = Some((i, "NotConfirmed".to_owned(), "publisher confirms are off".to_owned()));
                }
                Err(e) => first_failure = Some((i, "ConfirmLost".to_owned(), e.to_string())),
            }
        }
        if let Some(reply) = returned {
            // Mandatory and no queue took it: the queue was deleted (or never bound). Resending
            // cannot help.
            *open = None;
            return Err(SinkError::new(
                format!(
                    "RabbitMQ returned a message published to queue {} on {}: {reply} (no queue takes it)",
                    self.queue,
                    redacted(&self.url)
                ),
                false,
            ));
        }
        let mut outcome = PutOutcome::default();
        if let Some((from, code, message)) = first_failure {
            if !matches!(code.as_str(), "Nack") {
                *open = None; // the connection or channel is gone: the next call opens another
            }
            let message = format!("queue {}: {message}", self.queue);
            outcome.failed = (from..records.len())
                .map(|index| FailedEntry { index, code: code.clone(), message: message.clone() })
                .collect();
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn a_message_id_fits_amqp_and_reads_back(origin in ".{0,400}", line in 0u64..u64::MAX) {
            let id = message_id(&origin, line);
            proptest::prop_assert!(id.len() <= 255);
            let (o, l) = parse_message_id(&id).expect("reads back");
            proptest::prop_assert_eq!(l, line);
            if id.len() == origin.len() + 1 + line.to_string().len() {
                proptest::prop_assert_eq!(o, origin.as_str());
            }
        }
    }
}
