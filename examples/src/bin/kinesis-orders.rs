//! A Kinesis function in one closure: orders, checked and logged, up to 8 customers at a time
//! with each customer's orders in order, stopping 2 s before the timeout.
use std::time::Duration;

use pushpull::invocation::Invocation;
use pushpull::pull::Options;
use pushpull::pull::kinesis::OwnedRecord;

#[derive(Debug, pushpull::serde::Deserialize)]
#[serde(crate = "pushpull::serde")]
struct Order {
    customer: String,
    amount: f64,
}

/// One record: a record that does not parse, or a negative amount, fails alone (the error's
/// text is the failure's reason in the log).
async fn handle(record: OwnedRecord, _invocation: Invocation) -> Result<(), String> {
    let order: Order = record.json().map_err(|e| e.to_string())?;
    if order.amount < 0.0 {
        return Err(format!("order of {} has a negative amount ({})", order.customer, order.amount));
    }
    pushpull::tracing::info!(customer = order.customer, amount = order.amount, seq = record.sequence_number, "order");
    Ok(())
}

fn options() -> Options {
    Options::default().per_key(8).stop_before_deadline(Duration::from_secs(2))
}

#[tokio::main]
async fn main() -> Result<(), pushpull::lambda::Error> {
    pushpull::lambda::run_kinesis(options(), handle).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use pushpull::kinesis_event::KinesisEvent;

    fn event(orders: &[(&str, &str)]) -> String {
        let records: Vec<_> = orders
            .iter()
            .enumerate()
            .map(|(i, (customer, body))| {
                pushpull::serde_json::json!({"kinesis": {"partitionKey": customer, "sequenceNumber": (100 + i).to_string(),
                    "data": base64::engine::general_purpose::STANDARD.encode(body), "approximateArrivalTimestamp": 1.0},
                    "eventID": format!("shardId-0:{}", 100 + i)})
            })
            .collect();
        pushpull::serde_json::json!({ "Records": records }).to_string()
    }

    #[tokio::test]
    async fn bad_orders_fail_alone_and_the_response_names_the_lowest() {
        let payload = event(&[
            ("a", r#"{"customer":"a","amount":1}"#),
            ("b", r#"{"customer":"b","amount":-1}"#),
            ("a", "not json"),
            ("c", r#"{"customer":"c","amount":2}"#),
        ]);
        let event = KinesisEvent::from_slice(payload.as_bytes()).unwrap();
        let invocation = Invocation::new("test").with_time_left(Duration::from_secs(60));
        let result = pushpull::pull::kinesis::process_async(&event, options().for_invocation(&invocation), |r| {
            handle(r, invocation.clone())
        })
        .await
        .unwrap();
        assert_eq!(result.processed, 2);
        let response = pushpull::serde_json::to_value(result.response()).unwrap();
        assert_eq!(
            response,
            pushpull::serde_json::json!({"batchItemFailures": [{"itemIdentifier": "101"}, {"itemIdentifier": "102"}]})
        );
    }
}
