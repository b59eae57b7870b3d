//! Turns a Kinesis event (as `make_bench_events.py` writes it) into the `SelfManagedKafka` event
//! a Kafka mapping would send with the same lines, for the rollup's Kafka benchmark
//! (`infra/bench-pull.sh`):
//!
//!     kafka-events IN.json OUT.json FIRST_OFFSET
//!
//! One partition (`bench-0`), the records in order at offsets FIRST_OFFSET, FIRST_OFFSET + 1, ...;
//! a record's partition key becomes its key, its data its value, its arrival time its timestamp.
use base64::Engine as _;
use serde_json::{Value, json};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [Some(input), Some(output), Some(first)] = [args.first(), args.get(1), args.get(2)] else {
        return Err("usage: kafka-events IN.json OUT.json FIRST_OFFSET".into());
    };
    let first: i64 = first.parse()?;
    let event: Value = serde_json::from_slice(&std::fs::read(input)?)?;
    let records = event["Records"].as_array().ok_or("no Records")?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        let k = &r["kinesis"];
        let key = k["partitionKey"].as_str().ok_or("no partitionKey")?;
        let arrival = k["approximateArrivalTimestamp"].as_f64().unwrap_or(0.0);
        out.push(json!({
            "topic": "bench", "partition": 0, "offset": first + i as i64,
            "timestamp": (arrival * 1000.0) as i64, "timestampType": "CREATE_TIME",
            "key": b64.encode(key), "value": k["data"], "headers": [],
        }));
    }
    let kafka = json!({
        "eventSource": "SelfManagedKafka",
        "bootstrapServers": "127.0.0.1:9092",
        "records": { "bench-0": out },
    });
    std::fs::write(output, serde_json::to_vec(&kafka)?)?;
    Ok(())
}
