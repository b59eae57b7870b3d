//! A Kafka function in one closure (MSK or self-managed Kafka): orders, each partition's in
//! offset order, up to 4 partitions at a time; a record that does not parse, a tombstone, or a
//! negative amount fails and holds back the rest of its partition (other partitions go on), and
//! the response names them by partition and offset. (A mapping reads that response only in
//! provisioned mode: `pushpull::pull::kafka`.)
use pushpull::invocation::Invocation;
use pushpull::pull::Options;
use pushpull::pull::kafka::OwnedKafkaRecord;

#[derive(Debug, pushpull::serde::Deserialize)]
#[serde(crate = "pushpull::serde")]
struct Order {
    customer: String,
    amount: f64,
}

async fn handle(record: OwnedKafkaRecord, _invocation: Invocation) -> Result<(), String> {
    let order: Order = record.json().map_err(|e| e.to_string())?;
    if order.amount < 0.0 {
        return Err(format!("order of {} has a negative amount ({})", order.customer, order.amount));
    }
    pushpull::tracing::info!(customer = order.customer, amount = order.amount, offset = record.offset, "order");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), pushpull::lambda::Error> {
    pushpull::lambda::run_kafka(Options::default().per_key(4), handle).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushpull::pull::kafka::{self, KafkaEvent};

    #[tokio::test]
    async fn a_bad_order_fails_alone_and_holds_back_its_partition() {
        use base64::Engine as _;
        let b64 = |s: &str| pushpull::serde_json::Value::from(base64::engine::general_purpose::STANDARD.encode(s));
        let rec = |partition: i32, offset: i64, value: &str| {
            pushpull::serde_json::json!({"topic": "orders", "partition": partition, "offset": offset,
                "timestamp": 1, "timestampType": "CREATE_TIME", "value": b64(value), "headers": []})
        };
        let event = pushpull::serde_json::json!({"eventSource": "SelfManagedKafka", "bootstrapServers": "127.0.0.1:9092", "records": {
            "orders-0": [rec(0, 1, r#"{"customer":"a","amount":1}"#), rec(0, 2, r#"{"customer":"b","amount":-1}"#), rec(0, 3, r#"{"customer":"a","amount":2}"#)],
            "orders-1": [rec(1, 7, r#"{"customer":"c","amount":3}"#)]}});
        let payload = event.to_string();
        let event = KafkaEvent::from_slice(payload.as_bytes()).unwrap();
        let invocation = Invocation::new("test");
        let result = kafka::process_async(&event, Options::default().per_key(4), |r| handle(r, invocation.clone()))
            .await
            .unwrap();
        let listed: Vec<_> = kafka::response(&event, &result)
            .batch_item_failures
            .into_iter()
            .map(|f| (f.item_identifier.partition, f.item_identifier.offset))
            .collect();
        assert_eq!(listed, [("orders-0".to_owned(), 2), ("orders-0".to_owned(), 3)], "offset 3 waits behind 2");
    }
}
