//! The RabbitMQ broker `make test` starts (`infra/rabbitmq.sh`): its URL, connections, and queues
//! of a test's own. The URL: `RABBITMQ_URL`, else the sample's user and virtual host on
//! `127.0.0.1:$RABBITMQ_PORT` (5672).
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

/// The broker's AMQP URL, credentials and virtual host included.
pub fn url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| {
        let port = std::env::var("RABBITMQ_PORT").unwrap_or_else(|_| "5672".into());
        format!("amqp://pushpull:pushpull@127.0.0.1:{port}/pushpull")
    })
}

/// A connection to the broker; panics, saying how to start it, if it is not there.
pub async fn connect() -> Connection {
    match Connection::connect(&url(), ConnectionProperties::default()).await {
        Ok(c) => c,
        Err(e) => panic!("no RabbitMQ broker at {} ({e}): start one with `infra/rabbitmq.sh up`", url()),
    }
}

/// A channel with publisher confirms on.
pub async fn confirming(connection: &Connection) -> Channel {
    let channel = connection.create_channel().await.expect("a channel");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm.select");
    channel
}

/// A durable queue of its own (named after `prefix`), with `arguments` (`x-queue-type`...).
pub async fn queue(channel: &Channel, prefix: &str, arguments: FieldTable) -> String {
    let name = crate::unique(prefix);
    channel
        .queue_declare(name.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, arguments)
        .await
        .expect("queue.declare");
    name
}

/// Publishes each body to `queue` through the default exchange, persistent and mandatory, and
/// waits for the broker's confirms.
pub async fn publish(channel: &Channel, queue: &str, bodies: &[&[u8]]) {
    for body in bodies {
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("basic.publish");
        let confirmation = confirm.await.expect("a confirm");
        assert!(confirmation.is_ack(), "the broker took the message: {confirmation:?}");
    }
}
