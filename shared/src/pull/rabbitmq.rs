//! RabbitMQ batches (feature `rabbitmq`): Amazon MQ for RabbitMQ events (`aws:rmq`), one handler
//! per message, in the order the queue delivered them.
//!
//! AWS (with-mq.html): "In the RabbitMQ example, `pizzaQueue` is the name of the RabbitMQ queue,
//! and `/` is the name of the virtual host. When receiving messages, the event source lists
//! messages under `pizzaQueue::/`." Each message carries its AMQP `basicProperties` (long-string
//! headers as `{"bytes": [...]}`, the timestamp as text), `redelivered` and its body in base64.
//!
//! **There is no partial batch response for Amazon MQ**: "If your function returns an error for
//! any of the messages in a batch, Lambda retries the whole batch of messages until processing
//! succeeds or the messages expire" (with-mq.html). So a batch with a failed message fails as a
//! whole ([`BatchResult`] says which; [`crate::lambda::run_rabbitmq`] returns the invocation's
//! error), and every message of it comes again: a handler must be idempotent ("Lambda event source
//! mappings process each event at least once", with-mq.html). [`RabbitMqMessage::redelivered`]
//! says the broker delivered a message before.
//!
//! ```
//! use pushpull::pull::{rabbitmq, Options};
//!
//! let event = rabbitmq::RabbitMqEvent::from_slice(br#"{"eventSource":"aws:rmq","rmqMessagesByQueue":{"orders::/":[
//!   {"basicProperties":{"contentType":"application/json","headers":{"tenant":{"bytes":[97,99,109,101]},"tries":2},
//!    "deliveryMode":2,"timestamp":"Dec 7, 2026, 12:14:47 PM","bodySize":8},"redelivered":false,"data":"eyJuIjoxfQ=="}]}}"#).unwrap();
//! #[derive(serde::Deserialize)]
//! struct Order { n: u32 }
//! let result = rabbitmq::process(&event, Options::default(), |message| {
//!     let order: Order = message.json()?;
//!     assert_eq!((order.n, message.header_text("tenant").as_deref()), (1, Some("acme")));
//!     Ok::<_, pushpull::pull::DecodeError>(())
//! })
//! .unwrap();
//! assert_eq!((result.processed, result.failures.len()), (1, 0));
//! ```
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Display;
use std::future::Future;

use serde::{Deserialize, Deserializer};

use super::{BatchResult, DecodeError, Options, ResponseRule, parse_json};

/// An Amazon MQ for RabbitMQ event: the messages of one batch, by `queue::vhost`, the body text
/// borrowed from the payload.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RabbitMqEvent<'a> {
    /// `aws:rmq`.
    #[serde(default, borrow)]
    pub event_source: Cow<'a, str>,
    /// The broker's ARN.
    #[serde(default, borrow, deserialize_with = "borrowed")]
    pub event_source_arn: Option<Cow<'a, str>>,
    /// The messages by `"<queue>::<virtual host>"` (a mapping reads one queue), in delivery order.
    #[serde(default, borrow)]
    pub rmq_messages_by_queue: BTreeMap<Cow<'a, str>, Vec<RabbitMqMessage<'a>>>,
}

/// A payload that is not an Amazon MQ for RabbitMQ event.
#[derive(Debug, thiserror::Error)]
#[error("not a RabbitMQ event: {0}")]
pub struct RabbitMqEventError(#[source] serde_json::Error);

impl<'a> RabbitMqEvent<'a> {
    /// Parses an invocation payload.
    pub fn from_slice(payload: &'a [u8]) -> Result<Self, RabbitMqEventError> {
        serde_json::from_slice(payload).map_err(RabbitMqEventError)
    }

    /// Every message with its `queue::vhost`, in the event's order.
    pub fn messages(&self) -> impl Iterator<Item = (&str, &RabbitMqMessage<'a>)> {
        self.rmq_messages_by_queue.iter().flat_map(|(q, ms)| ms.iter().map(move |m| (q.as_ref(), m)))
    }

    /// The number of messages.
    pub fn len(&self) -> usize {
        self.rmq_messages_by_queue.values().map(Vec::len).sum()
    }

    /// Whether the batch has no message.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The header in which the RabbitMQ sink (`pushpull::sink::rabbitmq`) carries a record's
/// partition key.
pub const PARTITION_KEY_HEADER: &str = "pushpull-partition-key";

/// An AMQP URL without its password, for logs and errors: the user information ends at the
/// authority's last `@` (a password may hold one); the path is kept.
///
/// ```
/// use pushpull::pull::rabbitmq::redacted;
/// assert_eq!(redacted("amqp://u:p@ss@broker:5672/%2fprod"), "amqp://u:***@broker:5672/%2fprod");
/// assert_eq!(redacted("amqps://h:5671"), "amqps://h:5671");
/// ```
pub fn redacted(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (authority, path) = rest.split_once('/').map_or((rest, None), |(a, p)| (a, Some(p)));
    let (user, host) = authority.rsplit_once('@').map_or((None, authority), |(u, h)| (Some(u), h));
    let user = user.map(|u| format!("{}:***@", u.split(':').next().unwrap_or(u))).unwrap_or_default();
    let path = path.map(|p| format!("/{p}")).unwrap_or_default();
    format!("{scheme}://{user}{host}{path}")
}

#[doc(inline)]
pub use crate::message_name::{message_id, parse_message_id};

/// `"<queue>::<vhost>"` split into the queue and the virtual host (the last `::` separates them:
/// a queue name may contain `::`, a virtual host name may not as AWS writes it).
///
/// ```
/// assert_eq!(pushpull::pull::rabbitmq::queue_and_vhost("orders::/"), ("orders", "/"));
/// ```
pub fn queue_and_vhost(key: &str) -> (&str, &str) {
    key.rsplit_once("::").unwrap_or((key, ""))
}

/// One message as the mapping delivers it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct RabbitMqMessage<'a> {
    /// Its AMQP properties.
    #[serde(default, borrow)]
    pub basic_properties: BasicProperties<'a>,
    /// Whether the broker delivered it before (to this or another consumer) without an
    /// acknowledgement: a retry of a failed batch, or a consumer that went away.
    #[serde(default)]
    pub redelivered: bool,
    /// The body in base64.
    #[serde(default, borrow)]
    pub data: Cow<'a, str>,
}

/// A message's AMQP properties as AWS writes them: absent ones are `null`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct BasicProperties<'a> {
    /// `content-type`.
    #[serde(default, borrow, deserialize_with = "borrowed")]
    pub content_type: Option<Cow<'a, str>>,
    /// `content-encoding`.
    #[serde(default, borrow, deserialize_with = "borrowed")]
    pub content_encoding: Option<Cow<'a, str>>,
    /// Headers: numbers and booleans as JSON values, long strings as `{"bytes": [...]}`
    /// ([`RabbitMqMessage::header_bytes`] reads either).
    #[serde(default)]
    pub headers: Option<BTreeMap<String, serde_json::Value>>,
    /// 1 transient, 2 persistent.
    #[serde(default)]
    pub delivery_mode: Option<u8>,
    /// 0-255 (RabbitMQ uses 0-9).
    #[serde(default)]
    pub priority: Option<u8>,
    /// `correlation-id`.
    #[serde(default, borrow, deserialize_with = "borrowed")]
    pub correlation_id: Option<Cow<'a, str>>,
    /// `reply-to`.
    #[serde(default, borrow, deserialize_with = "borrowed")]
    pub reply_to: Option<Cow<'a, str>>,
    /// The per-message TTL in milliseconds, as text.
    #[serde(default, borrow, deserialize_with = "borrowed")]
    pub expiration: Option<Cow<'a, str>>,
    /// `message-id`.
    #[serde(default, borrow, deserialize_with = "borrowed")]
    pub message_id: Option<Cow<'a, str>>,
    /// The AMQP timestamp as AWS writes it (`"Jan 1, 1970, 12:33:41 AM"`).
    #[serde(default, borrow, deserialize_with = "borrowed")]
    pub timestamp: Option<Cow<'a, str>>,
    /// The AMQP `type`.
    #[serde(default, borrow, deserialize_with = "borrowed", rename = "type")]
    pub kind: Option<Cow<'a, str>>,
    /// `user-id`.
    #[serde(default, borrow, deserialize_with = "borrowed")]
    pub user_id: Option<Cow<'a, str>>,
    /// `app-id`.
    #[serde(default, borrow, deserialize_with = "borrowed")]
    pub app_id: Option<Cow<'a, str>>,
    /// `cluster-id`.
    #[serde(default, borrow, deserialize_with = "borrowed")]
    pub cluster_id: Option<Cow<'a, str>>,
    /// The body's size in bytes.
    #[serde(default)]
    pub body_size: u64,
}

/// Text borrowed from the payload where it has no escapes.
#[derive(Deserialize)]
struct BorrowedText<'a>(#[serde(borrow)] Cow<'a, str>);

fn borrowed<'de: 'a, 'a, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'a, str>>, D::Error> {
    Ok(Option::<BorrowedText<'a>>::deserialize(d)?.map(|t| t.0))
}

impl RabbitMqMessage<'_> {
    /// The message with everything it borrows copied, to outlive the payload.
    pub fn into_owned(self) -> RabbitMqMessage<'static> {
        fn own(c: Option<Cow<'_, str>>) -> Option<Cow<'static, str>> {
            c.map(|c| Cow::Owned(c.into_owned()))
        }
        let p = self.basic_properties;
        RabbitMqMessage {
            basic_properties: BasicProperties {
                content_type: own(p.content_type),
                content_encoding: own(p.content_encoding),
                headers: p.headers,
                delivery_mode: p.delivery_mode,
                priority: p.priority,
                correlation_id: own(p.correlation_id),
                reply_to: own(p.reply_to),
                expiration: own(p.expiration),
                message_id: own(p.message_id),
                timestamp: own(p.timestamp),
                kind: own(p.kind),
                user_id: own(p.user_id),
                app_id: own(p.app_id),
                cluster_id: own(p.cluster_id),
                body_size: p.body_size,
            },
            redelivered: self.redelivered,
            data: Cow::Owned(self.data.into_owned()),
        }
    }

    /// How errors name it: its message id if it has one, else its body's size.
    fn name(&self) -> String {
        match &self.basic_properties.message_id {
            Some(id) => format!("message {id}"),
            None => format!("message of {} bytes", self.basic_properties.body_size),
        }
    }

    /// The body's bytes (forgiving base64, as for the other sources).
    pub fn data_bytes(&self) -> Result<Vec<u8>, DecodeError> {
        base64_simd::forgiving_decode_to_vec(self.data.as_bytes()).map_err(|e| DecodeError {
            item: self.name(),
            format: "base64",
            source: e.to_string().into(),
        })
    }

    /// The body as JSON into `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, DecodeError> {
        parse_json::<T>(&self.data_bytes()?, || self.name())
    }

    /// A header's bytes: a long string (`{"bytes": [...]}`, signed or unsigned bytes) as its
    /// bytes, any other value as its JSON text; `None` without the header.
    pub fn header_bytes(&self, name: &str) -> Option<Vec<u8>> {
        let value = self.basic_properties.headers.as_ref()?.get(name)?;
        let bytes = value
            .get("bytes")
            .and_then(serde_json::Value::as_array)
            .and_then(|a| a.iter().map(|b| b.as_i64().filter(|b| (-128..=255).contains(b)).map(|b| b as u8)).collect());
        Some(bytes.unwrap_or_else(|| value.to_string().into_bytes()))
    }

    /// A header as text (see [`RabbitMqMessage::header_bytes`]; bytes that are not UTF-8 are
    /// replaced).
    pub fn header_text(&self, name: &str) -> Option<String> {
        self.header_bytes(name).map(|b| String::from_utf8_lossy(&b).into_owned())
    }
}

/// The batch's result: every message that failed, and every one not reached. Amazon MQ has no
/// partial batch response: any failure fails the whole batch ([`crate::lambda::run_rabbitmq`]).
fn result_of(names: &[String], outcomes: super::Outcomes) -> BatchResult {
    let mut result = BatchResult { rule: ResponseRule::Queue, ..Default::default() };
    result.absorb(outcomes, |i| names[i].clone());
    result
}

fn names(event: &RabbitMqEvent<'_>) -> Vec<String> {
    event.messages().map(|(_, m)| m.name()).collect()
}

/// Runs `handler` on each message in delivery order; the first failure stops the batch (the
/// whole batch is retried: what comes after it would run again anyway).
pub fn process<'a, F, E>(event: &RabbitMqEvent<'a>, mut options: Options, mut handler: F) -> Result<BatchResult, E>
where
    F: FnMut(&RabbitMqMessage<'a>) -> Result<(), E>,
    E: Display,
{
    options.stop_at_first_failure = true;
    let messages: Vec<&RabbitMqMessage<'a>> = event.messages().map(|(_, m)| m).collect();
    let outcomes = super::run_in_order(messages.len(), &options, |i| handler(messages[i]));
    Ok(result_of(&names(event), outcomes))
}

/// Runs an async `handler` on each message (its own copy: [`RabbitMqMessage::into_owned`]), in
/// delivery order, or with [`Options::concurrency`] that many at once (no order then holds); the
/// first failure stops what has not started.
pub async fn process_async<F, Fut, E>(event: &RabbitMqEvent<'_>, mut options: Options, handler: F) -> BatchResult
where
    F: Fn(RabbitMqMessage<'static>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    options.stop_at_first_failure = true;
    let messages: Vec<&RabbitMqMessage<'_>> = event.messages().map(|(_, m)| m).collect();
    // A key per message: with `concurrency` 1 one at a time in delivery order, else that many at
    // once (a queue orders nothing across messages once several run).
    let texts: Vec<String> = (0..messages.len()).map(|i| i.to_string()).collect();
    let keys: Vec<&str> = texts.iter().map(String::as_str).collect();
    let handler = &handler;
    let outcomes = super::run_concurrently(&keys, &options, |i| handler(messages[i].clone().into_owned())).await;
    result_of(&names(event), outcomes)
}

/// The batch's measures for [`crate::metrics::PullBatch`], before processing: the queue (the
/// dimension), the messages. AMQP timestamps are in seconds and AWS writes them as text: no
/// arrival time is taken from them.
pub fn batch_metrics(event: &RabbitMqEvent<'_>) -> crate::metrics::PullBatch {
    let queue = event.rmq_messages_by_queue.keys().next().map_or("unknown", |k| queue_and_vhost(k).0);
    crate::metrics::PullBatch {
        stream: queue.to_owned(),
        batch_size: event.len(),
        records_in: event.len(),
        processed: 0,
        failed: 0,
        oldest_arrival: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// AWS's example event (with-mq.html), as it is written there.
    const AWS_EXAMPLE: &str = r#"{
      "eventSource": "aws:rmq",
      "eventSourceArn": "arn:aws:mq:us-west-2:111122223333:broker:pizzaBroker:b-9bcfa592-423a-4942-879d-eb284b418fc8",
      "rmqMessagesByQueue": {
        "pizzaQueue::/": [
          {
            "basicProperties": {
              "contentType": "text/plain",
              "contentEncoding": null,
              "headers": {
                "header1": {"bytes": [118, 97, 108, 117, 101, 49]},
                "header2": {"bytes": [118, 97, 108, 117, 101, 50]},
                "numberInHeader": 10
              },
              "deliveryMode": 1,
              "priority": 34,
              "correlationId": null,
              "replyTo": null,
              "expiration": "60000",
              "messageId": null,
              "timestamp": "Jan 1, 1970, 12:33:41 AM",
              "type": null,
              "userId": "AIDACKCEVSQ6C2EXAMPLE",
              "appId": null,
              "clusterId": null,
              "bodySize": 80
            },
            "redelivered": false,
            "data": "eyJ0aW1lb3V0IjowLCJkYXRhIjoiQ1pybWYwR3c4T3Y0YnFMUXhENEUifQ=="
          }
        ]
      }
    }"#;

    #[test]
    fn aws_example_event_reads_as_aws_wrote_it() {
        let e = RabbitMqEvent::from_slice(AWS_EXAMPLE.as_bytes()).unwrap();
        assert_eq!(e.event_source, "aws:rmq");
        let (key, m) = e.messages().next().unwrap();
        assert_eq!(queue_and_vhost(key), ("pizzaQueue", "/"));
        let p = &m.basic_properties;
        assert_eq!((p.delivery_mode, p.priority, p.body_size), (Some(1), Some(34), 80));
        assert_eq!(p.timestamp.as_deref(), Some("Jan 1, 1970, 12:33:41 AM"));
        assert_eq!(p.expiration.as_deref(), Some("60000"));
        assert_eq!((p.content_encoding.as_deref(), p.kind.as_deref()), (None, None));
        assert_eq!(m.header_text("header1").as_deref(), Some("value1"));
        assert_eq!(m.header_text("numberInHeader").as_deref(), Some("10"));
        assert_eq!(m.header_bytes("absent"), None);
        let body: serde_json::Value = m.json().unwrap();
        assert_eq!(body["data"], "CZrmf0Gw8Ov4bqLQxD4E");
        assert!(!m.redelivered);
    }

    #[test]
    fn a_failure_fails_the_batch_and_stops_what_follows() {
        let payload = serde_json::json!({"eventSource": "aws:rmq", "rmqMessagesByQueue": {"q::/": [
            {"basicProperties": {"messageId": "a", "bodySize": 2}, "data": "e30="},
            {"basicProperties": {"messageId": "b", "bodySize": 1}, "data": "eA=="},
            {"basicProperties": {"messageId": "c", "bodySize": 2}, "data": "e30="},
        ]}})
        .to_string();
        let e = RabbitMqEvent::from_slice(payload.as_bytes()).unwrap();
        let r = process(&e, Options::default(), |m| m.json::<serde_json::Value>().map(drop)).unwrap();
        assert_eq!(r.processed, 1);
        assert_eq!(r.failures.len(), 1);
        assert!(r.failures[0].item_identifier.contains("message b"), "{:?}", r.failures);
        assert_eq!(r.unprocessed.len(), 1, "c was not reached");
    }

    #[tokio::test]
    async fn with_concurrency_several_messages_run_at_once() {
        let payload = serde_json::json!({"rmqMessagesByQueue": {"q::/": [
            {"data": "e30="}, {"data": "e30="}, {"data": "e30="}, {"data": "e30="}]}})
        .to_string();
        let e = RabbitMqEvent::from_slice(payload.as_bytes()).unwrap();
        let running = std::sync::atomic::AtomicUsize::new(0);
        let most = std::sync::atomic::AtomicUsize::new(0);
        let r = process_async(&e, Options::default().per_key(4), |_| async {
            let now = running.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            most.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
            tokio::task::yield_now().await;
            running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, String>(())
        })
        .await;
        assert_eq!(r.processed, 4);
        assert!(most.into_inner() > 1, "several at once");
    }

    #[tokio::test]
    async fn the_async_runner_hands_each_message_its_own_copy_in_order() {
        let e = RabbitMqEvent::from_slice(AWS_EXAMPLE.as_bytes()).unwrap();
        let seen = std::sync::Mutex::new(Vec::new());
        let r = process_async(&e, Options::default(), |m| {
            seen.lock().unwrap().push(m.basic_properties.body_size);
            async { Ok::<_, String>(()) }
        })
        .await;
        assert_eq!((r.processed, seen.into_inner().unwrap()), (1, vec![80]));
        assert!(RabbitMqEvent::from_slice(b"\"text\"").unwrap_err().to_string().starts_with("not a RabbitMQ event"));
    }

    proptest! {
        /// Any message reads or fails naming itself: never a panic.
        #[test]
        fn any_message_reads_or_fails_naming_itself(
            data in "\\PC{0,16}",
            id in proptest::option::of("[a-z0-9]{1,8}"),
            header in proptest::collection::vec(-300i64..300, 0..6),
        ) {
            let m = serde_json::json!({"basicProperties": {"messageId": id, "headers": {"h": {"bytes": header}}, "bodySize": 3}, "data": data});
            let payload = serde_json::json!({"rmqMessagesByQueue": {"q::v": [m]}}).to_string();
            if let Ok(e) = RabbitMqEvent::from_slice(payload.as_bytes()) {
                let (_, m) = e.messages().next().unwrap();
                let _ = m.header_bytes("h");
                for err in [m.data_bytes().err(), m.json::<serde_json::Value>().err()].into_iter().flatten() {
                    let name = id.as_ref().map_or("message of 3 bytes".to_owned(), |i| format!("message {i}"));
                    prop_assert!(err.to_string().contains(&name), "{}", err);
                }
            }
        }
    }
}
