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

/// The poison-message bound the sample's queue will use: a dead-letter exchange of its own with a
/// queue bound to it (returned), and the arguments of a quorum queue that dead-letters a message
/// delivered more than `delivery_limit` times after the first.
pub async fn dead_lettering(channel: &Channel, delivery_limit: i32) -> (FieldTable, String) {
    let (dlx, dlq) = (crate::unique("rmq-dlx"), crate::unique("rmq-dlq"));
    pushpull_local::mapping::rabbitmq::admin::dead_letters(channel, &dlx, &dlq)
        .await
        .expect("the dead letters' exchange and queue");
    (pushpull_local::mapping::rabbitmq::admin::quorum_arguments(delivery_limit, &dlx), dlq)
}

/// Publishes `n` messages of 100 bytes to `queue` (the first 8: the publish time in µs since the
/// epoch, big-endian) and waits for every confirm (published all at once, confirmed after).
pub async fn fill(channel: &Channel, queue: &str, n: usize) {
    let pad = [b'x'; 92];
    let mut confirms = Vec::with_capacity(n);
    for _ in 0..n {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        let mut body = now.to_be_bytes().to_vec();
        body.extend_from_slice(&pad);
        confirms.push(
            channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default(),
                )
                .await
                .expect("basic.publish"),
        );
    }
    for c in confirms {
        assert!(c.await.expect("a confirm").is_ack(), "the broker took the message");
    }
}

/// A RabbitMQ node of one test's own on `port` (`infra/rabbitmq.sh up`), stopped when dropped: for
/// tests that close its connections or restart it, which would disturb every other test on the
/// shared broker. Its ports: `port`, `port + 20000`, `port + 20001` (not 5673: its distribution
/// port would be 5672's epmd port).
pub struct OwnBroker {
    script: std::path::PathBuf,
    port: u16,
}

impl OwnBroker {
    /// Starts it (about 4 s); panics if it does not answer. A node a killed run of the same test
    /// left on `port` is stopped first (the port is the test's own).
    pub fn start(port: u16) -> Self {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/rabbitmq.sh");
        let _ = std::process::Command::new(&script).arg("down").env("RABBITMQ_PORT", port.to_string()).status();
        let status = std::process::Command::new(&script)
            .arg("up")
            .env("RABBITMQ_PORT", port.to_string())
            .status()
            .expect("infra/rabbitmq.sh runs");
        assert!(status.success(), "a RabbitMQ node of the test's own on 127.0.0.1:{port}");
        OwnBroker { script, port }
    }

    /// Its AMQP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its URL (the sample's user and virtual host).
    pub fn url(&self) -> String {
        format!("amqp://pushpull:pushpull@127.0.0.1:{}/pushpull", self.port)
    }

    /// `infra/rabbitmq.sh <command>` on it (`close-connections`, `restart-app`).
    pub fn control(&self, command: &str) {
        let status = std::process::Command::new(&self.script)
            .arg(command)
            .env("RABBITMQ_PORT", self.port.to_string())
            .stdout(std::process::Stdio::null())
            .status()
            .expect("infra/rabbitmq.sh runs");
        assert!(status.success(), "infra/rabbitmq.sh {command}");
    }

    /// The script that controls it.
    pub fn script(&self) -> &std::path::Path {
        &self.script
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ =
            std::process::Command::new(&self.script).arg("down").env("RABBITMQ_PORT", self.port.to_string()).status();
    }
}
