//! A function on `pushpull::lambda::run_raw` for its own tests: answers the payload's length,
//! fails on `"fail"`, panics on `"panic"`.
use bytes::Bytes;
use lambda_runtime::{Context, Error};

#[tokio::main]
async fn main() -> Result<(), Error> {
    pushpull::lambda::run_raw(|body: Bytes, context: Context| async move {
        match &body[..] {
            b"\"panic\"" => panic!("asked to panic"),
            b"\"fail\"" => Err::<serde_json::Value, Error>("failed as asked".into()),
            _ => Ok(serde_json::json!({ "len": body.len(), "request_id": context.request_id })),
        }
    })
    .await
}
