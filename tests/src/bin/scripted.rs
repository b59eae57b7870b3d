//! A Kinesis, Kafka, Amazon MQ, SQS or Redis function whose answers are scripted by the records themselves, for the event
//! source mappings' fidelity tests. Each record's data is JSON: `{"id": "a", <directive>: n, ...}`; a
//! directive applies the first `n` times the function sees that record:
//!
//! - `"item_fail": n`: report the record in `batchItemFailures`;
//! - `"error": n`: fail the whole invocation (a function error);
//! - `"bad_id": n`: answer a failure with an empty `itemIdentifier`;
//! - `"timeout": n`: sleep past the timeout; `"crash": n`: exit the process;
//! - `"sleep_ms": m`: take this long (every time).
//!
//! An invocation record (a Lambda destination's event) is logged whole as `destination_record`.
//!
//! A Kafka event's records are read as a Kinesis event's: `shard` is the `topic-N` partition,
//! `seqs` are offsets, a failure names `{"partition": "topic-N", "offset": n}`; each Kafka event is
//! also appended whole to `$SCRIPT_DIR/events.ndjson`. An SQS event's `seqs` are message ids (what
//! a failure names) and its body is the data; it is kept whole too. A Redis event's (Streams or
//! pub/sub) `seqs` are entry ids, and its base64 `data` the data; kept whole too.
//!
//! Every invocation is appended to `$SCRIPT_DIR/log.ndjson` (shard, ids, sequence numbers,
//! window fields, the answer); sightings are counted in `$SCRIPT_DIR/seen/<id>` (one byte each,
//! appended, so concurrent sandboxes and restarts keep the count). With tumbling windows the
//! state is `{"ids": "<ids so far, comma-separated>"}`.
use std::io::Write;
use std::path::PathBuf;

use bytes::Bytes;
use lambda_runtime::{Context, Error};
use serde_json::{Value, json};

fn seen(dir: &std::path::Path, id: &str) -> std::io::Result<u64> {
    let path = dir.join("seen").join(id);
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    f.write_all(b".")?;
    Ok(std::fs::metadata(&path)?.len())
}

fn log(dir: &std::path::Path, line: &Value) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("log.ndjson"))?;
    f.write_all(format!("{line}\n").as_bytes())
}

async fn handle(dir: PathBuf, body: Bytes) -> Result<Value, Error> {
    let event: Value = serde_json::from_slice(&body)?;
    if event.get("requestContext").is_some() {
        // An invocation record from an asynchronous invocation's destination: logged whole.
        log(&dir, &json!({ "destination_record": event }))?;
        return Ok(json!({}));
    }
    let mut shard = event["shardId"].as_str().unwrap_or_default().to_owned();
    // (position, data, itemIdentifier) of each record.
    let mut records: Vec<(Value, Vec<u8>, Value)> = Vec::new();
    // Amazon MQ for RabbitMQ: whether each message was redelivered.
    let mut redelivered = Vec::new();
    if let Some(queues) = event["rmqMessagesByQueue"].as_object() {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("events.ndjson"))?;
        f.write_all(&body)?;
        f.write_all(b"\n")?;
        for (name, list) in queues {
            shard = name.clone();
            for (i, m) in list.as_array().into_iter().flatten().enumerate() {
                let data = base64_decode(m["data"].as_str().unwrap_or_default());
                redelivered.push(m["redelivered"].as_bool().unwrap_or(false));
                records.push((Value::from(i), data, Value::Null));
            }
        }
    } else if let Some(parts) = event["records"].as_object() {
        // Kafka: one partition per event from the local mapping. The event itself is kept too.
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("events.ndjson"))?;
        f.write_all(&body)?;
        f.write_all(b"\n")?;
        for (name, list) in parts {
            shard = name.clone();
            for r in list.as_array().into_iter().flatten() {
                let offset = r["offset"].clone();
                let data = base64_decode(r["value"].as_str().unwrap_or_default());
                records.push((offset.clone(), data, json!({ "partition": name, "offset": offset })));
            }
        }
    } else if event["Records"][0]["eventSource"].as_str().is_some_and(|s| s.starts_with("pushpull:redis")) {
        // Redis (Streams or the pub/sub relay): the data in base64, named by its entry id; the
        // event is kept too (one write: concurrent sandboxes append to the same file).
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("events.ndjson"))?;
        f.write_all(&[&body[..], b"\n"].concat())?;
        for r in event["Records"].as_array().into_iter().flatten() {
            shard = r["stream"].as_str().or(r["channel"].as_str()).unwrap_or_default().to_owned();
            let id = r["id"].clone();
            records.push((id.clone(), base64_decode(r["data"].as_str().unwrap_or_default()), id));
        }
    } else if event["Records"][0]["eventSource"] == "aws:sqs" {
        // SQS: the body as text, named by its message id; the event is kept too.
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("events.ndjson"))?;
        f.write_all(&body)?;
        f.write_all(b"\n")?;
        for r in event["Records"].as_array().into_iter().flatten() {
            shard = r["eventSourceARN"].as_str().unwrap_or_default().rsplit(':').next().unwrap_or_default().to_owned();
            let id = r["messageId"].clone();
            records.push((id.clone(), r["body"].as_str().unwrap_or_default().as_bytes().to_vec(), id));
        }
    } else {
        for r in event["Records"].as_array().into_iter().flatten() {
            let seq = r["kinesis"]["sequenceNumber"].as_str().unwrap_or_default().to_owned();
            if shard.is_empty() {
                shard = r["eventID"].as_str().unwrap_or_default().split(':').next().unwrap_or_default().to_owned();
            }
            let data = base64_decode(r["kinesis"]["data"].as_str().unwrap_or_default());
            records.push((Value::from(seq.clone()), data, Value::from(seq)));
        }
    }
    let mut ids = Vec::new();
    let mut seqs = Vec::new();
    let mut answer: Option<(&str, Value)> = None;
    let mut failures = Vec::new();
    let mut ok_ids = Vec::new();
    let mut sleep_ms = 0;
    for (seq, data, item) in records {
        let d: Value = serde_json::from_slice(&data).unwrap_or(Value::Null);
        let id = d["id"].as_str().unwrap_or("?").to_owned();
        let n = seen(&dir, &id)?;
        let applies = |k: &str| d[k].as_u64().is_some_and(|times| n <= times);
        sleep_ms = sleep_ms.max(d["sleep_ms"].as_u64().unwrap_or(0));
        if answer.is_none() {
            if applies("crash") {
                answer = Some(("crash", Value::Null));
            } else if applies("timeout") {
                answer = Some(("timeout", Value::Null));
            } else if applies("error") {
                answer = Some(("error", Value::from(id.clone())));
            } else if applies("bad_id") {
                answer = Some(("bad_id", Value::Null));
            }
        }
        if applies("item_fail") {
            failures.push(json!({ "itemIdentifier": item }));
        } else if failures.is_empty() {
            ok_ids.push(id.clone());
        }
        ids.push(id);
        seqs.push(seq);
    }
    let kind = answer.as_ref().map_or(if failures.is_empty() { "ok" } else { "partial" }, |a| a.0);
    log(
        &dir,
        &json!({
            "shard": shard, "ids": ids, "seqs": seqs, "answer": kind,
            "t": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
            "window": event["window"]["start"], "state": event["state"],
            "final": event["isFinalInvokeForWindow"], "early": event["isWindowTerminatedEarly"],
            "servers": event["bootstrapServers"],
            "redelivered": redelivered,
        }),
    )?;
    tokio::time::sleep(std::time::Duration::from_millis(sleep_ms)).await;
    match answer {
        Some(("crash", _)) => std::process::exit(3),
        Some(("timeout", _)) => {
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            Err("unreachable".into())
        }
        Some(("error", id)) => Err(format!("scripted error on record {id}").into()),
        Some(("bad_id", _)) => Ok(json!({ "batchItemFailures": [{ "itemIdentifier": "" }] })),
        _ => {
            let mut response = json!({ "batchItemFailures": failures });
            if event.get("window").is_some() {
                let mut all: Vec<String> = event["state"]["ids"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .map(|s| s.split(',').map(str::to_owned).collect())
                    .unwrap_or_default();
                all.extend(ok_ids);
                let is_final = event["isFinalInvokeForWindow"].as_bool().unwrap_or(false);
                response["state"] = if is_final { json!({}) } else { json!({ "ids": all.join(",") }) };
            }
            Ok(response)
        }
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap_or_default()
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let dir = PathBuf::from(std::env::var("SCRIPT_DIR").map_err(|_| "SCRIPT_DIR is not set")?);
    std::fs::create_dir_all(dir.join("seen"))?;
    pushpull::lambda::run_raw(move |body: Bytes, _ctx: Context| handle(dir.clone(), body)).await
}
