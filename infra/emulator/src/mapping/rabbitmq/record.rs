//! A RabbitMQ message as the core's record, the queue as its partition, and the event as AWS
//! writes it.
//!
//! AWS's poller is a Java client whose events Gson writes (by its example, with-mq.html): every
//! property present, `null` when unset; a long-string header as the Java object holding it,
//! `{"bytes": [...]}` with Java's signed bytes; the AMQP timestamp as Gson's default date text in
//! UTC (`"Jan 1, 1970, 12:33:41 AM"`). Other header types as JSON does them: numbers, booleans,
//! nested tables as objects, arrays as arrays, a decimal as its number, a byte array as signed
//! bytes, void as `null`. AWS documents none of these beyond its example; this is our reading.
use base64::Engine as _;
use bytes::Bytes;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use serde_json::{Map, Value, json};

use crate::mapping::MappingError;
use crate::mapping::event::WindowPart;
use crate::mapping::outcome::Condition;
use crate::mapping::progress::WindowCheckpoint;
use crate::mapping::source::{Partition, Record};

/// What every event of the mapping names.
pub(crate) struct Envelope {
    /// The broker's ARN.
    pub event_source_arn: String,
    /// `queue::vhost`.
    pub key: String,
}

/// One delivered message.
pub(crate) struct MqRec {
    index: u64,
    tag: u64,
    position: String,
    data: Bytes,
    /// `basicProperties` as the event writes them.
    properties: Value,
    redelivered: bool,
    arrival: f64,
}

impl MqRec {
    pub(crate) fn from_delivery(index: u64, d: Delivery) -> Self {
        let properties = properties_json(&d.properties, d.data.len());
        MqRec {
            index,
            tag: d.delivery_tag,
            position: d.delivery_tag.to_string(),
            data: Bytes::from(d.data),
            properties,
            redelivered: d.redelivered,
            arrival: crate::mapping::clock::now_unix(),
        }
    }

    fn json(&self) -> Value {
        json!({
            "basicProperties": self.properties,
            "redelivered": self.redelivered,
            "data": base64::engine::general_purpose::STANDARD.encode(&self.data),
        })
    }
}

impl Record for MqRec {
    fn index(&self) -> u64 {
        self.index
    }
    fn ordering_key(&self) -> &[u8] {
        b""
    }
    fn data(&self) -> &[u8] {
        &self.data
    }
    /// When it reached the mapping (AMQP timestamps are whole seconds and set by publishers).
    fn arrival(&self) -> f64 {
        self.arrival
    }
    fn position(&self) -> &str {
        &self.position
    }
}

/// `basicProperties` of a message of `body_size` bytes.
pub(crate) fn properties_json(p: &BasicProperties, body_size: usize) -> Value {
    let text = |s: &Option<lapin::types::ShortString>| s.as_ref().map_or(Value::Null, |s| Value::from(s.as_str()));
    json!({
        "contentType": text(p.content_type()),
        "contentEncoding": text(p.content_encoding()),
        "headers": p.headers().as_ref().map_or(Value::Null, table_json),
        "deliveryMode": p.delivery_mode().map_or(Value::Null, Value::from),
        "priority": p.priority().map_or(Value::Null, Value::from),
        "correlationId": text(p.correlation_id()),
        "replyTo": text(p.reply_to()),
        "expiration": text(p.expiration()),
        "messageId": text(p.message_id()),
        "timestamp": p.timestamp().map_or(Value::Null, |t| Value::from(gson_date(t))),
        "type": text(p.kind()),
        "userId": text(p.user_id()),
        "appId": text(p.app_id()),
        "clusterId": text(p.cluster_id()),
        "bodySize": body_size,
    })
}

fn signed(bytes: &[u8]) -> Value {
    Value::Array(bytes.iter().map(|b| Value::from(*b as i8)).collect())
}

fn table_json(t: &FieldTable) -> Value {
    Value::Object(t.inner().iter().map(|(k, v)| (k.as_str().to_owned(), value_json(v))).collect())
}

fn value_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::from(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Float(f) => Value::from(f64::from(*f)),
        AMQPValue::Double(f) => Value::from(*f),
        AMQPValue::DecimalValue(d) => Value::from(f64::from(d.value) / 10f64.powi(i32::from(d.scale))),
        AMQPValue::ShortString(s) => Value::from(s.as_str()),
        AMQPValue::LongString(s) => json!({ "bytes": signed(s.as_bytes()) }),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_json).collect()),
        AMQPValue::Timestamp(t) => Value::from(gson_date(*t)),
        AMQPValue::FieldTable(t) => table_json(t),
        AMQPValue::ByteArray(b) => signed(b.as_slice()),
        AMQPValue::Void => Value::Null,
    }
}

/// Gson's default date text, in UTC: `"Jan 1, 1970, 12:33:41 AM"` for 2021 s.
pub(crate) fn gson_date(unix_seconds: u64) -> String {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let days = (unix_seconds / 86_400) as i64;
    let secs = unix_seconds % 86_400;
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let (h12, half) = match h {
        0 => (12, "AM"),
        1..=11 => (h, "AM"),
        12 => (12, "PM"),
        _ => (h - 12, "PM"),
    };
    format!("{} {day}, {year}, {h12}:{m:02}:{s:02} {half}", MONTHS[(month - 1) as usize])
}

/// The mapping's queue as the core's partition: acknowledgements through its channel.
pub(crate) struct MqPartition {
    envelope: Envelope,
    channel: Channel,
}

impl MqPartition {
    /// Whether `e` comes of the channel being gone (the connection lost): the broker has then put
    /// every unacknowledged message of it back in the queue already, so an acknowledgement or a
    /// requeue has nothing left to do; they come again (`redelivered`).
    fn lost(&self, e: &lapin::Error, messages: usize) -> bool {
        if self.channel.status().connected() {
            return false;
        }
        tracing::warn!(partition = %self.id(), messages, error = %e, "the channel is gone: the broker requeued these messages; they come again");
        true
    }

    pub(crate) fn new(envelope: Envelope, channel: Channel) -> Self {
        MqPartition { envelope, channel }
    }

    pub(crate) fn name(&self) -> &str {
        &self.envelope.key
    }
}

/// The event for `records` of the queue `key`.
pub(crate) fn event_json(envelope: &Envelope, records: &[MqRec]) -> String {
    let messages: Vec<Value> = records.iter().map(MqRec::json).collect();
    let mut by_queue = Map::new();
    by_queue.insert(envelope.key.clone(), Value::Array(messages));
    json!({
        "eventSource": "aws:rmq",
        "eventSourceArn": envelope.event_source_arn,
        "rmqMessagesByQueue": by_queue,
    })
    .to_string()
}

impl Partition for MqPartition {
    type Record = MqRec;

    fn id(&self) -> &str {
        &self.envelope.key
    }

    fn encoded_len(&self, record: &MqRec) -> usize {
        // Base64 of the body, the properties, and the keys around them.
        record.data.len().div_ceil(3) * 4 + record.properties.to_string().len() + 64
    }

    fn event(&self, records: &[MqRec], _window: Option<&WindowPart<'_>>) -> String {
        event_json(&self.envelope, records)
    }

    fn batch_info(&self, records: &[MqRec]) -> (&'static str, Value) {
        // Amazon MQ mappings have no failure destination (the settings refuse one): named for logs.
        ("RabbitMqBatchInfo", json!({ "queue": self.envelope.key, "batchSize": records.len() }))
    }

    fn item_index(&self, _batch: &[MqRec], _identifier: &Value) -> Result<usize, String> {
        Err("Amazon MQ has no partial batch response".to_owned())
    }

    /// Each message acknowledged on its own (a filtered one may be done before an earlier one).
    async fn done(&self, records: &[MqRec], _window: Option<WindowCheckpoint>) -> Result<(), MappingError> {
        for r in records {
            if let Err(e) = self.channel.basic_ack(r.tag, BasicAckOptions::default()).await {
                if self.lost(&e, records.len()) {
                    return Ok(());
                }
                return Err(MappingError::RabbitMq(format!("acknowledging message {} of {}: {e}", r.tag, self.id())));
            }
        }
        Ok(())
    }

    /// A batch whose retries ran out goes back to the broker (nack, requeue): delivered again,
    /// `redelivered`, counted toward a quorum queue's delivery limit. A message over the payload
    /// limit is not: AWS drops it ("Records also go unprocessed if Lambda drops them due to their
    /// size"), and so it is acknowledged.
    async fn take_back(&self, records: &[MqRec], condition: Condition) -> Result<bool, MappingError> {
        if condition == Condition::MaximumPayloadSizeExceeded {
            return Ok(false);
        }
        for r in records {
            if let Err(e) =
                self.channel.basic_nack(r.tag, BasicNackOptions { requeue: true, ..Default::default() }).await
            {
                if self.lost(&e, records.len()) {
                    return Ok(true);
                }
                return Err(MappingError::RabbitMq(format!("requeueing message {} of {}: {e}", r.tag, self.id())));
            }
        }
        Ok(true)
    }

    async fn fence(&self) -> Result<(), MappingError> {
        Ok(())
    }

    async fn window_closed(&self) -> Result<(), MappingError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_read_as_gson_writes_them() {
        assert_eq!(gson_date(2021), "Jan 1, 1970, 12:33:41 AM", "AWS's example");
        assert_eq!(gson_date(1_796_646_210), "Dec 7, 2026, 12:23:30 PM");
        assert_eq!(gson_date(951_782_400), "Feb 29, 2000, 12:00:00 AM");
    }

    #[test]
    fn properties_are_written_as_aws_example_shows_them() {
        let mut headers = FieldTable::default();
        headers.insert("header1".into(), AMQPValue::LongString("value1".into()));
        headers.insert("numberInHeader".into(), AMQPValue::LongInt(10));
        headers.insert("e".into(), AMQPValue::LongString("ë".into()));
        let p = BasicProperties::default()
            .with_content_type("text/plain".into())
            .with_headers(headers)
            .with_delivery_mode(1)
            .with_priority(34)
            .with_expiration("60000".into())
            .with_timestamp(2021)
            .with_user_id("AIDACKCEVSQ6C2EXAMPLE".into());
        let v = properties_json(&p, 80);
        assert_eq!(v["headers"]["header1"], json!({"bytes": [118, 97, 108, 117, 101, 49]}));
        assert_eq!(v["headers"]["numberInHeader"], 10);
        assert_eq!(v["headers"]["e"], json!({"bytes": [-61, -85]}), "Java's signed bytes");
        assert_eq!(v["timestamp"], "Jan 1, 1970, 12:33:41 AM");
        assert_eq!(
            (v["deliveryMode"].clone(), v["priority"].clone(), v["bodySize"].clone()),
            (json!(1), json!(34), json!(80))
        );
        for unset in ["contentEncoding", "correlationId", "replyTo", "messageId", "type", "appId", "clusterId"] {
            assert!(v[unset].is_null(), "{unset} written as null");
        }
        // What the library reads back.
        let event = event_json(
            &Envelope { event_source_arn: "arn:aws:mq:us-east-1:000000000000:broker:b:b-1".into(), key: "q::/".into() },
            &[MqRec {
                index: 0,
                tag: 1,
                position: "1".into(),
                data: Bytes::from_static(b"{\"n\":1}"),
                properties: v,
                redelivered: true,
                arrival: 0.0,
            }],
        );
        let e = pushpull::pull::rabbitmq::RabbitMqEvent::from_slice(event.as_bytes()).unwrap();
        let (_, m) = e.messages().next().unwrap();
        assert!(m.redelivered);
        assert_eq!(m.header_text("e").as_deref(), Some("ë"));
        assert_eq!(m.json::<Value>().unwrap()["n"], 1);
    }
}
