//! The `s3://` backend: conditional writes (`If-None-Match: *`, `If-Match: <etag>`), so two
//! concurrent writers cannot both win.
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

use super::{Etag, Precondition, StoreError, Stored};
use crate::aws::{SdkErrorKind, classify};

pub(super) async fn get(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    uri: String,
) -> Result<Option<Stored>, StoreError> {
    let out = match client.get_object().bucket(bucket).key(key).send().await {
        Ok(out) => out,
        Err(e) if e.as_service_error().is_some_and(|se| se.is_no_such_key()) => return Ok(None),
        Err(e) => return Err(StoreError::s3("GetObject", uri, e)),
    };
    let etag = Etag(out.e_tag().unwrap_or_default().to_owned());
    let body = out.body.collect().await.map_err(|e| StoreError::S3 {
        operation: "GetObject",
        uri,
        message: format!("reading the body: {e}"),
        retryable: true,
        source: Box::new(e),
    })?;
    Ok(Some(Stored { body: body.into_bytes(), etag }))
}

pub(super) async fn put(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    uri: String,
    body: Bytes,
    condition: Precondition,
) -> Result<Etag, StoreError> {
    let mut req = client.put_object().bucket(bucket).key(key).body(ByteStream::from(body));
    req = match &condition {
        Precondition::None => req,
        Precondition::IfAbsent => req.if_none_match("*"),
        Precondition::IfMatch(etag) => req.if_match(&etag.0),
    };
    match req.send().await {
        Ok(out) => Ok(Etag(out.e_tag().unwrap_or_default().to_owned())),
        Err(e) if classify(&e) == SdkErrorKind::PreconditionFailed => Err(StoreError::PreconditionFailed { uri }),
        Err(e) => Err(StoreError::s3("PutObject", uri, e)),
    }
}
