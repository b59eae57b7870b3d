//! An Amazon MQ for RabbitMQ function in one closure: orders from a queue, in delivery order.
//! Amazon MQ has no partial batch response: a negative amount fails the invocation, and AWS
//! delivers the whole batch again ("Lambda retries the whole batch of messages until processing
//! succeeds or the messages expire", with-mq.html), so the handler must be idempotent: a message
//! that comes again says so (`redelivered`), and its `message-id` (when the publisher set one)
//! names it. Bound a poison message on the broker: a quorum queue's `x-delivery-limit` with a
//! dead-letter exchange (`pushpull::pull::rabbitmq`).
use pushpull::invocation::Invocation;
use pushpull::pull::Options;
use pushpull::pull::rabbitmq::RabbitMqMessage;

#[derive(Debug, pushpull::serde::Deserialize)]
#[serde(crate = "pushpull::serde")]
struct Order {
    customer: String,
    amount: f64,
}

async fn handle(message: RabbitMqMessage<'static>, _invocation: Invocation) -> Result<(), String> {
    let order: Order = message.json().map_err(|e| e.to_string())?;
    if order.amount < 0.0 {
        return Err(format!("order of {} has a negative amount ({})", order.customer, order.amount));
    }
    let id = message.basic_properties.message_id.as_deref().unwrap_or("");
    pushpull::tracing::info!(
        customer = order.customer,
        amount = order.amount,
        id,
        redelivered = message.redelivered,
        "order"
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), pushpull::lambda::Error> {
    pushpull::lambda::run_rabbitmq(Options::default(), handle).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushpull::pull::rabbitmq::{self, RabbitMqEvent};

    #[tokio::test]
    async fn a_bad_order_fails_and_names_its_message() {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let msg = |id: &str, body: &str| pushpull::serde_json::json!({"basicProperties": {"messageId": id, "bodySize": body.len()}, "redelivered": false, "data": b64(body)});
        let payload = pushpull::serde_json::json!({"eventSource": "aws:rmq", "rmqMessagesByQueue": {"orders::/": [
            msg("o-1", r#"{"customer":"a","amount":1}"#), msg("o-2", r#"{"customer":"b","amount":-1}"#)]}})
        .to_string();
        let event = RabbitMqEvent::from_slice(payload.as_bytes()).unwrap();
        let invocation = Invocation::new("test");
        let result = rabbitmq::process_async(&event, Options::default(), |m| handle(m, invocation.clone())).await;
        assert_eq!(result.failures.len(), 1, "{result:?}");
        assert!(result.failures[0].reason.contains("negative"), "{result:?}");
    }
}
