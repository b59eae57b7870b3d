//! Where objects are read from: [`ObjectSource`]. [`S3Source`] (feature `s3`) reads exactly the
//! object version an event announced and survives dropped connections ([`crate::object_reader`]);
//! [`FileSource`] reads `<root>/<bucket>/<key>`, for tests and local runs.
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use tokio::io::AsyncRead;

use crate::s3_notification::ObjectEvent;

/// An object's body, opened at a byte offset.
pub struct OpenedObject {
    /// The bytes from the offset asked for to the end.
    pub body: Pin<Box<dyn AsyncRead + Send>>,
    /// The object says it is gzip (`Content-Encoding: gzip`); a `.gz` key is gzip regardless.
    pub content_gzip: bool,
}

impl std::fmt::Debug for OpenedObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedObject").field("content_gzip", &self.content_gzip).finish_non_exhaustive()
    }
}

/// Why an object could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The object is gone or was replaced: nothing to do, and retrying could never succeed.
    #[error("gone: {reason}")]
    Gone {
        /// `NoSuchKey`, `NoSuchVersion`, `ETag changed: the object was replaced`.
        reason: String,
    },
    /// The offset is at or past the end of the object.
    #[error("the range starts past the end of the object")]
    RangeNotSatisfiable,
    /// Reading failed (access denied, throttling, network, 5xx): an error, retried by the caller.
    #[error("{operation}: {message}")]
    Failed {
        /// `GetObject`, `open`.
        operation: &'static str,
        /// What the service or the file system said.
        message: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Opens objects named by S3 events.
pub trait ObjectSource: Send + Sync {
    /// Opens `object` (its version, or its ETag on an unversioned bucket) at byte `start`.
    fn open(&self, object: &ObjectEvent, start: u64) -> impl Future<Output = Result<OpenedObject, SourceError>> + Send;
}

/// Objects as files: `<root>/<bucket>/<key>`. No versions: the file as it is now.
#[derive(Debug, Clone)]
pub struct FileSource {
    root: PathBuf,
}

impl FileSource {
    /// Objects under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FileSource { root: root.into() }
    }
}

impl ObjectSource for FileSource {
    async fn open(&self, object: &ObjectEvent, start: u64) -> Result<OpenedObject, SourceError> {
        use tokio::io::AsyncSeekExt;
        let path = self.root.join(&object.bucket).join(&object.key);
        let failed = |operation, e: std::io::Error| SourceError::Failed {
            operation,
            message: format!("{}: {e}", path.display()),
            source: Box::new(e),
        };
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SourceError::Gone { reason: "NoSuchKey".into() });
            }
            Err(e) => return Err(failed("open", e)),
        };
        if start > 0 {
            let len = file.metadata().await.map_err(|e| failed("stat", e))?.len();
            if start >= len {
                return Err(SourceError::RangeNotSatisfiable);
            }
            file.seek(std::io::SeekFrom::Start(start)).await.map_err(|e| failed("seek", e))?;
        }
        Ok(OpenedObject { body: Box::pin(file), content_gzip: false })
    }
}

/// Objects in S3, read with `GetObject` pinned to the event's version (or ETag), resumed with
/// ranged reads when a connection drops mid-body.
#[cfg(feature = "s3")]
#[derive(Debug, Clone)]
pub struct S3Source {
    client: aws_sdk_s3::Client,
}

#[cfg(feature = "s3")]
impl S3Source {
    /// Reads with `client`.
    pub fn new(client: aws_sdk_s3::Client) -> Self {
        S3Source { client }
    }
}

#[cfg(feature = "s3")]
impl ObjectSource for S3Source {
    async fn open(&self, ev: &ObjectEvent, start: u64) -> Result<OpenedObject, SourceError> {
        use crate::object_reader::{ObjectReader, ObjectRef};
        use aws_sdk_s3::error::ProvideErrorMetadata;
        let mut get = self.client.get_object().bucket(&ev.bucket).key(&ev.key);
        if let Some(v) = &ev.version_id {
            get = get.version_id(v);
        } else if let Some(etag) = &ev.etag {
            // Unversioned bucket: read only the object the event announced.
            get = get.if_match(format!("\"{etag}\""));
        }
        if start > 0 {
            get = get.range(format!("bytes={start}-"));
        }
        let object = match get.send().await {
            Ok(o) => o,
            Err(e) => {
                let service = e.as_service_error();
                let gone = match service.and_then(|se| se.code()) {
                    _ if service.is_some_and(|se| se.is_no_such_key()) => Some("NoSuchKey"),
                    Some("NoSuchKey") => Some("NoSuchKey"),
                    // The bucket is gone, and the object with it: no retry can read it.
                    Some("NoSuchBucket") => Some("NoSuchBucket"),
                    Some("NoSuchVersion") => Some("NoSuchVersion"),
                    Some("PreconditionFailed") => Some("ETag changed: the object was replaced"),
                    _ => None,
                };
                if let Some(reason) = gone {
                    return Err(SourceError::Gone { reason: reason.to_owned() });
                }
                if start > 0 && crate::aws::classify(&e) == crate::aws::SdkErrorKind::InvalidRange {
                    return Err(SourceError::RangeNotSatisfiable);
                }
                return Err(SourceError::Failed {
                    operation: "GetObject",
                    message: crate::aws::describe(&e),
                    source: Box::new(e),
                });
            }
        };
        let content_gzip = object.content_encoding().is_some_and(|c| c.eq_ignore_ascii_case("gzip"));
        let object_ref = ObjectRef {
            bucket: ev.bucket.clone(),
            key: ev.key.clone(),
            version_id: ev.version_id.clone(),
            etag: object.e_tag().map(str::to_owned),
        };
        let body = ObjectReader::new(self.client.clone(), object_ref, start, object.body);
        Ok(OpenedObject { body: Box::pin(body), content_gzip })
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::s3_notification::S3Notification;

    fn event(key: &str) -> ObjectEvent {
        let payload = format!(
            r#"{{"Records":[{{"eventVersion":"2.1","eventSource":"aws:s3","eventName":"ObjectCreated:Put","s3":{{"bucket":{{"name":"b"}},"object":{{"key":"{key}"}}}}}}]}}"#
        );
        match S3Notification::from_slice(payload.as_bytes()).unwrap() {
            S3Notification::Records(mut r) => r.remove(0),
            S3Notification::TestEvent { .. } => unreachable!(),
        }
    }

    #[tokio::test]
    async fn files_open_at_an_offset_and_missing_ones_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("b/in")).unwrap();
        std::fs::write(dir.path().join("b/in/x.ndjson"), "line 1\nline 2\n").unwrap();
        let source = FileSource::new(dir.path());
        let mut opened = source.open(&event("in/x.ndjson"), 7).await.unwrap();
        let mut rest = String::new();
        opened.body.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "line 2\n");
        assert!(matches!(source.open(&event("in/x.ndjson"), 14).await, Err(SourceError::RangeNotSatisfiable)));
        let gone = source.open(&event("in/nope"), 0).await.unwrap_err();
        assert_eq!(gone.to_string(), "gone: NoSuchKey");
    }
}
