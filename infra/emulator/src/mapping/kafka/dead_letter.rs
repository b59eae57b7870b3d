//! A Kafka topic as a Kafka mapping's on-failure destination (`kafka://TOPIC`). AWS
//! (kafka-on-failure-destination.html): "Lambda acts as a Kafka producer and writes failed records
//! to the destination topic"; "The destination topic must exist in the same Kafka cluster as your
//! source topics"; "Kafka destinations receive the actual failed records along with failure
//! metadata"; "Lambda prevents infinite loops by blocking configurations where the source and
//! destination topics are the same". Its example is one message per failed record: the failure
//! record with `"condition": "RetriesExhausted"`, `KafkaBatchInfo` of `batchSize` 1 with a
//! `recordInfo` (offset as text, timestamp), and `payload` the one-record event as an object; the
//! message keyed as the original record ("Lambda uses the same partition key from the original
//! record").
use base64::Engine as _;
use serde_json::{Value, json};

use crate::mapping::event::iso8601_millis;

/// One message for the destination topic: the original record's key, and the value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub value: Value,
}

/// The messages for a batch given up on: `record` is the batch's failure record (as SQS gets it),
/// `payload` the event the function was (or would have been) invoked with.
pub(crate) fn dead_letters(record: &Value, payload: &str) -> Result<Vec<DeadLetter>, String> {
    let event: Value = serde_json::from_str(payload).map_err(|e| format!("the batch's event is not JSON: {e}"))?;
    let partitions = event["records"].as_object().ok_or("the batch's event has no records")?;
    let mut out = Vec::new();
    for (name, records) in partitions {
        for rec in records.as_array().into_iter().flatten() {
            let mut one = json!({
                "eventSource": event["eventSource"],
                "bootstrapServers": event["bootstrapServers"],
                "records": { name.as_str(): [rec] },
            });
            if let Some(arn) = event.get("eventSourceArn") {
                one["eventSourceArn"] = arn.clone();
            }
            let mut value = record.clone();
            // The destination page's name for the batch record's RetryAttemptsExhausted.
            if value["requestContext"]["condition"] == "RetryAttemptsExhausted" {
                value["requestContext"]["condition"] = Value::from("RetriesExhausted");
            }
            let timestamp = rec["timestamp"].as_f64().map(|ms| iso8601_millis(ms / 1000.0));
            let mut info = json!({
                "batchSize": 1,
                "bootstrapServers": event["bootstrapServers"],
                "payloadSize": one.to_string().len(),
                "recordInfo": { "offset": rec["offset"].as_i64().map(|o| o.to_string()), "timestamp": timestamp },
            });
            if let Some(arn) = event.get("eventSourceArn") {
                info["eventSourceArn"] = arn.clone();
            }
            value["KafkaBatchInfo"] = info;
            value["payload"] = one;
            let key = match rec["key"].as_str() {
                Some(k) => Some(
                    base64::engine::general_purpose::STANDARD
                        .decode(k)
                        .map_err(|e| format!("{name} offset {}: the key is not base64: {e}", rec["offset"]))?,
                ),
                None => None,
            };
            out.push(DeadLetter { key, value });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_message_per_record_keyed_as_the_record_with_its_own_one_record_event() {
        let record = json!({
            "requestContext": {"requestId": "r", "condition": "RetryAttemptsExhausted", "approximateInvokeCount": 2},
            "responseContext": {"statusCode": 200, "functionError": "Unhandled"},
            "version": "1.0",
            "timestamp": "2026-12-07T10:00:00.000Z",
            "KafkaBatchInfo": {"batchSize": 2, "recordsInfo": {}},
        });
        let payload = json!({
            "eventSource": "SelfManagedKafka",
            "bootstrapServers": "127.0.0.1:9092",
            "records": {"orders-3": [
                {"topic": "orders", "partition": 3, "offset": 15, "timestamp": 1545084650987_i64, "key": "YQ==", "value": "e30="},
                {"topic": "orders", "partition": 3, "offset": 16, "timestamp": 1545084650988_i64, "value": "e30="},
            ]},
        })
        .to_string();
        let out = dead_letters(&record, &payload).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].key.as_deref(), Some(&b"a"[..]));
        assert_eq!(out[1].key, None, "a null key stays null");
        let v = &out[0].value;
        assert_eq!(v["requestContext"]["condition"], "RetriesExhausted");
        assert_eq!(v["requestContext"]["approximateInvokeCount"], 2);
        assert_eq!(v["KafkaBatchInfo"]["batchSize"], 1);
        assert_eq!(v["KafkaBatchInfo"]["recordInfo"]["offset"], "15");
        assert_eq!(v["KafkaBatchInfo"]["recordInfo"]["timestamp"], "2018-12-17T22:10:50.987Z");
        assert!(v["KafkaBatchInfo"].get("recordsInfo").is_none());
        assert_eq!(v["payload"]["records"]["orders-3"].as_array().unwrap().len(), 1);
        assert_eq!(v["payload"]["records"]["orders-3"][0]["offset"], 15);
        assert_eq!(v["KafkaBatchInfo"]["payloadSize"], v["payload"].to_string().len());
        // Other conditions keep their names.
        let age = json!({"requestContext": {"condition": "RecordAgeExceeded"}});
        assert_eq!(dead_letters(&age, &payload).unwrap()[1].value["requestContext"]["condition"], "RecordAgeExceeded");
        assert!(dead_letters(&record, "nope").unwrap_err().contains("not JSON"));
    }
}
