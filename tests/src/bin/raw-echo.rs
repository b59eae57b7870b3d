//! A function on `pushpull::lambda::run_raw` for its own tests: answers the payload's length,
//! fails on `"fail"`, panics on `"panic"`; logs one line and counts the bytes it echoed (a user's
//! own metric, in the same EMF document as the library's).
use bytes::Bytes;
use lambda_runtime::{Context, Error};

#[tokio::main]
async fn main() -> Result<(), Error> {
    pushpull::telemetry::init();
    pushpull::lambda::run_raw(|body: Bytes, context: Context| async move {
        let span = tracing::info_span!("echo", payload_bytes = body.len());
        let _entered = span.enter();
        tracing::info!("echoing");
        metrics::counter!("EchoedBytes").increment(body.len() as u64);
        match &body[..] {
            b"\"panic\"" => panic!("asked to panic"),
            b"\"fail\"" => Err::<serde_json::Value, Error>("failed as asked".into()),
            _ => Ok(serde_json::json!({ "len": body.len(), "request_id": context.request_id })),
        }
    })
    .await
}
