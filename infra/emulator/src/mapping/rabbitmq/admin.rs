//! The sample's queue on a RabbitMQ broker, as its provisioning sets it up: a quorum queue that
//! dead-letters a message delivered more than its limit (AWS, services-mq-errors.html, advises a
//! dead-letter queue to bound what a failing function redelivers), and how many messages a queue
//! holds.
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Connection, ConnectionProperties, ExchangeKind};

use super::super::MappingError;
use super::super::settings::RabbitMqSource;

/// Deliveries after the first before the broker dead-letters a message (`x-delivery-limit`).
pub const DELIVERY_LIMIT: i32 = 20;

fn err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> MappingError {
    MappingError::RabbitMq(format!("{what}: {e}"))
}

/// The dead-letter queue of `queue`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead-letters")
}

/// Declares `source`'s queue (durable, quorum, `x-delivery-limit` [`DELIVERY_LIMIT`], its dead
/// letters to the exchange `<queue>.dlx` and from it to the queue [`dead_letter_queue`]) if it is
/// not there; an existing queue of other arguments is an error naming them. Returns the
/// dead-letter queue.
pub async fn ensure_queue(source: &RabbitMqSource) -> Result<String, MappingError> {
    let broker = source.redacted();
    let connection = Connection::connect(&source.url, ConnectionProperties::default())
        .await
        .map_err(|e| err(format!("connecting to {broker}"), e))?;
    let channel = connection.create_channel().await.map_err(|e| err("a channel", e))?;
    let (dlx, dlq) = (format!("{}.dlx", source.queue), dead_letter_queue(&source.queue));
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    dead_letters(&channel, &dlx, &dlq).await?;
    let args = quorum_arguments(DELIVERY_LIMIT, &dlx);
    channel.queue_declare(source.queue.as_str().into(), durable, args).await.map_err(|e| {
        err(
            format!("queue {} (a durable quorum queue, x-delivery-limit {DELIVERY_LIMIT}, dead letters to {dlx}; a queue of that name with other arguments is refused)", source.queue),
            e,
        )
    })?;
    let _ = connection.close(200, "provisioned".into()).await;
    Ok(dlq)
}

/// A durable fanout exchange `dlx` and a durable queue `dlq` bound to it: where a queue whose
/// `x-dead-letter-exchange` is `dlx` sends its dead letters.
pub async fn dead_letters(channel: &lapin::Channel, dlx: &str, dlq: &str) -> Result<(), MappingError> {
    channel
        .exchange_declare(
            dlx.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .map_err(|e| err(format!("exchange {dlx}"), e))?;
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    channel
        .queue_declare(dlq.into(), durable, FieldTable::default())
        .await
        .map_err(|e| err(format!("queue {dlq}"), e))?;
    channel
        .queue_bind(dlq.into(), dlx.into(), "".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .map_err(|e| err(format!("binding {dlq} to {dlx}"), e))?;
    Ok(())
}

/// The arguments of a quorum queue that dead-letters to `dead_letter_exchange` a message delivered
/// more than `delivery_limit` times after the first (`x-delivery-limit`).
pub fn quorum_arguments(delivery_limit: i32, dead_letter_exchange: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-queue-type"), AMQPValue::LongString(LongString::from("quorum")));
    args.insert(ShortString::from("x-delivery-limit"), AMQPValue::LongInt(delivery_limit));
    args.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString(LongString::from(dead_letter_exchange)),
    );
    args
}

/// How many messages `queue` holds ready for delivery (a passive declare's count).
pub async fn depth(source: &RabbitMqSource, queue: &str) -> Result<u32, MappingError> {
    let connection = Connection::connect(&source.url, ConnectionProperties::default())
        .await
        .map_err(|e| err(format!("connecting to {}", source.redacted()), e))?;
    let channel = connection.create_channel().await.map_err(|e| err("a channel", e))?;
    let q = channel
        .queue_declare(queue.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .map_err(|e| err(format!("queue {queue}"), e))?;
    let _ = connection.close(200, "counted".into()).await;
    Ok(q.message_count())
}
