//! A Kinesis function that answers the event source mapping with raw bytes of the records'
//! choosing, for the table of hostile responses (`tests/tests/hostile_responses.rs`). It speaks
//! the Lambda Runtime API itself instead of through `lambda_runtime`, which can only send JSON: a
//! function in another runtime can send anything.
//!
//! The first record's data is JSON `{"id": "...", "answer_b64": "<base64>", "times": n,
//! "big": m}`: for the first `n` sightings of that id the response is the decoded bytes, with
//! `{seq0}`, `{seq1}`, ... replaced by the batch's sequence numbers, and `{big}` by `m` bytes of
//! `x`; after that, or without `answer_b64`, it is `{"batchItemFailures":[]}` (with `"state":{}`
//! in a tumbling window). Each invocation is appended to `$SCRIPT_DIR/log.ndjson` (the ids, in
//! order), and sightings are counted in `$SCRIPT_DIR/seen/<id>`.
use std::io::Write;
use std::path::Path;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn seen(dir: &Path, id: &str) -> std::io::Result<u64> {
    let path = dir.join("seen").join(id);
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    f.write_all(b".")?;
    Ok(std::fs::metadata(&path)?.len())
}

fn answer(dir: &Path, event: &[u8]) -> Result<Vec<u8>, Error> {
    let event: Value = serde_json::from_slice(event)?;
    let records = event["Records"].as_array().cloned().unwrap_or_default();
    let seqs: Vec<&str> = records.iter().map(|r| r["kinesis"]["sequenceNumber"].as_str().unwrap_or("")).collect();
    let data: Vec<Value> = records
        .iter()
        .map(|r| {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(r["kinesis"]["data"].as_str().unwrap_or(""))
                .unwrap_or_default();
            serde_json::from_slice(&raw).unwrap_or(Value::Null)
        })
        .collect();
    let ids: Vec<&str> = data.iter().map(|d| d["id"].as_str().unwrap_or("?")).collect();
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("log.ndjson"))?;
    // One write per line: several sandboxes append to the log at once.
    log.write_all(format!("{}\n", json!({ "ids": ids, "final": event["isFinalInvokeForWindow"] })).as_bytes())?;
    let windowed = event.get("window").is_some();
    let plain = if windowed { json!({"state": {}, "batchItemFailures": []}) } else { json!({"batchItemFailures": []}) };
    let Some(first) = data.first() else { return Ok(plain.to_string().into_bytes()) };
    let Some(b64) = first["answer_b64"].as_str() else { return Ok(plain.to_string().into_bytes()) };
    if seen(dir, ids[0])? > first["times"].as_u64().unwrap_or(1) {
        return Ok(plain.to_string().into_bytes());
    }
    let mut body = base64::engine::general_purpose::STANDARD.decode(b64)?;
    for (i, seq) in seqs.iter().enumerate() {
        body = replace(&body, format!("{{seq{i}}}").as_bytes(), seq.as_bytes());
    }
    let big = "x".repeat(first["big"].as_u64().unwrap_or(0) as usize);
    Ok(replace(&body, b"{big}", big.as_bytes()))
}

fn replace(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let dir = std::path::PathBuf::from(std::env::var("SCRIPT_DIR").map_err(|_| "SCRIPT_DIR is not set")?);
    std::fs::create_dir_all(dir.join("seen"))?;
    let api = std::env::var("AWS_LAMBDA_RUNTIME_API").map_err(|_| "AWS_LAMBDA_RUNTIME_API is not set")?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    loop {
        let next = Request::get(format!("http://{api}/2018-06-01/runtime/invocation/next")).body(Full::default())?;
        let response = client.request(next).await?;
        let id = response
            .headers()
            .get("lambda-runtime-aws-request-id")
            .and_then(|v| v.to_str().ok())
            .ok_or("no request id")?
            .to_owned();
        let event = response.into_body().collect().await?.to_bytes();
        let (kind, body) = match answer(&dir, &event) {
            Ok(body) => ("response", body),
            Err(e) => {
                ("error", json!({"errorType": "RawAnswer", "errorMessage": e.to_string()}).to_string().into_bytes())
            }
        };
        let post = Request::post(format!("http://{api}/2018-06-01/runtime/invocation/{id}/{kind}"))
            .body(Full::new(Bytes::from(body)))?;
        client.request(post).await?.into_body().collect().await?;
    }
}
