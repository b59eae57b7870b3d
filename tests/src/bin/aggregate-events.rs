//! Packs the records of a Kinesis event (as `make_bench_events.py` writes them) into KPL
//! aggregates of `per` records each, for the aggregated W1 benchmark (`infra/bench-pull.sh`):
//!
//!     aggregate-events IN.json OUT.json [per]   (100)
//!
//! Each aggregate keeps its records' partition keys and data, in order; the Kinesis record that
//! carries it takes the first record's sequence number, partition key and event fields, as the
//! stream would give an aggregate put with its first record's key.
use base64::Engine as _;
use pushpull::aggregation::Aggregator;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = [args.first(), args.get(1)].map(|a| a.cloned().unwrap_or_default());
    if input.is_empty() || output.is_empty() {
        return Err("usage: aggregate-events IN.json OUT.json [per]".into());
    }
    let per: usize = args.get(2).map_or(Ok(100), |p| p.parse())?;
    let mut event: serde_json::Value = serde_json::from_slice(&std::fs::read(&input)?)?;
    let records = event["Records"].as_array().ok_or("no Records")?.clone();
    let mut packed = Vec::new();
    for chunk in records.chunks(per.max(1)) {
        let mut agg = Aggregator::new(pushpull::aggregation::MAX_RECORD_BYTES);
        for r in chunk {
            let key = r["kinesis"]["partitionKey"].as_str().ok_or("no partitionKey")?;
            let data = B64.decode(r["kinesis"]["data"].as_str().ok_or("no data")?)?;
            agg.add(key, None, data.into())?;
        }
        let Some(finished) = agg.finish() else { continue };
        let mut first = chunk[0].clone();
        first["kinesis"]["data"] = B64.encode(&finished.data).into();
        packed.push(first);
    }
    event["Records"] = packed.into();
    std::fs::write(&output, serde_json::to_vec(&event)?)?;
    Ok(())
}
