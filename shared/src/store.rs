//! Where checkpoints, outputs and quarantined lines are kept: `s3://bucket/prefix` or
//! `file:///dir`, behind one small API with compare-and-swap writes.
//!
//! [`Location`] parses the URIs of `CHECKPOINT_URI`, `OUTPUT_URI` and `QUARANTINE_URI`.
//! [`Store`] reads and writes objects under it with a [`Precondition`]:
//! - S3 uses conditional writes (`If-None-Match: *`, `If-Match: <etag>`), so two concurrent
//!   writers cannot both win: the loser gets [`StoreError::PreconditionFailed`].
//! - The file backend writes to a temporary file and renames it into place (readers and crashed
//!   processes never see a half-written object; there is no fsync, so an OS crash may lose the
//!   latest writes: it is for local runs), and checks preconditions under an exclusive lock file,
//!   so concurrent processes on one machine get the same guarantee.
//!
//! ```
//! use pushpull::store::{Location, Precondition, Store, StoreError};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let dir = tempfile::tempdir().unwrap();
//! let location: Location = format!("file://{}", dir.path().display()).parse().unwrap();
//! let Location::File { root } = location else { unreachable!() };
//! let store = Store::file(root);
//!
//! let v1 = store.put("a/b.json", b"1".to_vec().into(), Precondition::IfAbsent).await.unwrap();
//! // A second create of the same key loses.
//! let lost = store.put("a/b.json", b"2".to_vec().into(), Precondition::IfAbsent).await;
//! assert!(matches!(lost, Err(StoreError::PreconditionFailed { .. })));
//! // Replace only the version we read.
//! store.put("a/b.json", b"2".to_vec().into(), Precondition::IfMatch(v1.clone())).await.unwrap();
//! let stale = store.put("a/b.json", b"3".to_vec().into(), Precondition::IfMatch(v1)).await;
//! assert!(matches!(stale, Err(StoreError::PreconditionFailed { .. })));
//! assert_eq!(&store.get("a/b.json").await.unwrap().unwrap().body[..], b"2");
//! # });
//! ```
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

/// A place for objects: an S3 bucket and key prefix, or a local directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `s3://bucket/prefix` (prefix may be empty; stored without leading or trailing `/`).
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix, without leading or trailing `/`.
        prefix: String,
    },
    /// `file:///absolute/dir`.
    File {
        /// The directory.
        root: PathBuf,
    },
}

/// A URI that is not a usable [`Location`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{uri:?} is not a storage location: {reason} (expected s3://bucket/prefix or file:///absolute/dir)")]
pub struct LocationError {
    /// The URI as given.
    pub uri: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FromStr for Location {
    type Err = LocationError;

    fn from_str(uri: &str) -> Result<Self, LocationError> {
        let err = |reason| LocationError { uri: uri.to_owned(), reason };
        if let Some(rest) = uri.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let valid_bucket = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
            if !valid_bucket {
                return Err(err("bucket names are 3-63 characters of a-z, 0-9, '-' and '.'"));
            }
            Ok(Location::S3 { bucket: bucket.to_owned(), prefix: prefix.trim_matches('/').to_owned() })
        } else if let Some(path) = uri.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(err("a file:// location needs an absolute path (three slashes)"));
            }
            Ok(Location::File { root: PathBuf::from(path) })
        } else {
            Err(err("unknown scheme"))
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Location::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            Location::File { root } => write!(f, "file://{}", root.display()),
        }
    }
}

impl Location {
    /// Whether the S3 object `bucket`/`key` lies under this location: the loop guard's test.
    ///
    /// ```
    /// use pushpull::store::Location;
    /// let out: Location = "s3://data/output".parse().unwrap();
    /// assert!(out.contains("data", "output/part-1.ndjson"));
    /// assert!(!out.contains("data", "outputs/x"));
    /// assert!(!out.contains("other", "output/x"));
    /// ```
    pub fn contains(&self, bucket: &str, key: &str) -> bool {
        match self {
            Location::S3 { bucket: b, prefix } => {
                b == bucket
                    && (prefix.is_empty()
                        || key.strip_prefix(prefix.as_str()).is_some_and(|rest| rest.starts_with('/')))
            }
            Location::File { .. } => false,
        }
    }
}

/// The version of a stored object, as its store names it (the S3 ETag; a content hash for files).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Etag(pub String);

/// When a write may happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// Always write.
    None,
    /// Only if no object exists under the key (`If-None-Match: *`).
    IfAbsent,
    /// Only if the current object has this version (`If-Match`).
    IfMatch(Etag),
}

/// An object read from a [`Store`].
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its bytes.
    pub body: Bytes,
    /// Its version, for a later [`Precondition::IfMatch`].
    pub etag: Etag,
}

/// A store operation that failed. Every variant names the object.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer won: the object exists (for `IfAbsent`) or changed (for `IfMatch`).
    #[error("conditional write to {uri} lost: the object exists or changed")]
    PreconditionFailed {
        /// The object.
        uri: String,
    },
    /// S3 refused or failed.
    #[error("{operation} {uri}: {message}")]
    S3 {
        /// `GetObject`, `PutObject`, ...
        operation: &'static str,
        /// The object.
        uri: String,
        /// Code and message from S3, or the transport error.
        message: String,
        /// Whether trying again later may succeed (throttling, 5xx, network).
        retryable: bool,
    },
    /// The file system failed.
    #[error("{operation} {path}: {source}")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether the operation may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::S3 { retryable, .. } => *retryable,
            StoreError::Io { .. } => true,
            StoreError::PreconditionFailed { .. } => false,
        }
    }
}

/// Reads and writes objects under a [`Location`].
#[derive(Debug, Clone)]
pub struct Store {
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    S3 { client: aws_sdk_s3::Client, bucket: String, prefix: String },
    File { root: PathBuf },
}

impl Store {
    /// A store in a local directory.
    pub fn file(root: impl Into<PathBuf>) -> Self {
        Store { backend: Backend::File { root: root.into() } }
    }

    /// A store in an S3 bucket under `prefix`.
    pub fn s3(client: aws_sdk_s3::Client, bucket: impl Into<String>, prefix: impl Into<String>) -> Self {
        let prefix = prefix.into().trim_matches('/').to_owned();
        Store { backend: Backend::S3 { client, bucket: bucket.into(), prefix } }
    }

    /// A store at `location`; the S3 client is built (once, shared) only for `s3://`.
    pub async fn connect(location: &Location, aws: &crate::aws::Aws) -> Self {
        match location {
            Location::S3 { bucket, prefix } => Store::s3(aws.s3().await.clone(), bucket, prefix),
            Location::File { root } => Store::file(root),
        }
    }

    /// The full URI of `key` in this store, for messages.
    pub fn uri(&self, key: &str) -> String {
        match &self.backend {
            Backend::S3 { bucket, .. } => format!("s3://{bucket}/{}", self.s3_key(key)),
            Backend::File { root } => format!("file://{}", root.join(key).display()),
        }
    }

    fn s3_key(&self, key: &str) -> String {
        match &self.backend {
            Backend::S3 { prefix, .. } if !prefix.is_empty() => format!("{prefix}/{key}"),
            _ => key.to_owned(),
        }
    }

    /// Reads `key`; `None` when there is no such object.
    pub async fn get(&self, key: &str) -> Result<Option<Stored>, StoreError> {
        match &self.backend {
            Backend::S3 { client, bucket, .. } => {
                let uri = self.uri(key);
                let out = client.get_object().bucket(bucket).key(self.s3_key(key)).send().await;
                let out = match out {
                    Ok(out) => out,
                    Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => return Ok(None),
                    Err(e) => return Err(s3_error("GetObject", uri, e)),
                };
                let etag = Etag(out.e_tag().unwrap_or_default().to_owned());
                let body = out.body.collect().await.map_err(|e| StoreError::S3 {
                    operation: "GetObject",
                    uri,
                    message: e.to_string(),
                    retryable: true,
                })?;
                Ok(Some(Stored { body: body.into_bytes(), etag }))
            }
            Backend::File { root } => {
                let path = root.join(key);
                blocking(move || match std::fs::read(&path) {
                    Ok(body) => Ok(Some(Stored { etag: content_etag(&body), body: body.into() })),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(source) => Err(StoreError::Io { operation: "read", path: path.display().to_string(), source }),
                })
                .await
            }
        }
    }

    /// Writes `body` under `key` if `condition` holds; returns the new version.
    pub async fn put(&self, key: &str, body: Bytes, condition: Precondition) -> Result<Etag, StoreError> {
        match &self.backend {
            Backend::S3 { client, bucket, .. } => {
                let uri = self.uri(key);
                let mut req = client.put_object().bucket(bucket).key(self.s3_key(key)).body(ByteStream::from(body));
                req = match &condition {
                    Precondition::None => req,
                    Precondition::IfAbsent => req.if_none_match("*"),
                    Precondition::IfMatch(etag) => req.if_match(&etag.0),
                };
                match req.send().await {
                    Ok(out) => Ok(Etag(out.e_tag().unwrap_or_default().to_owned())),
                    Err(e) if is_precondition_failure(&e) => Err(StoreError::PreconditionFailed { uri }),
                    Err(e) => Err(s3_error("PutObject", uri, e)),
                }
            }
            Backend::File { root } => {
                let (root, key) = (root.clone(), key.to_owned());
                blocking(move || file_put(&root, &key, &body, &condition)).await
            }
        }
    }
}

fn is_precondition_failure<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    match e {
        SdkError::ServiceError(se) => {
            matches!(se.err().code(), Some("PreconditionFailed" | "ConditionalRequestConflict"))
        }
        _ => false,
    }
}

/// Turns an SDK error into a [`StoreError::S3`] that says what S3 said.
pub(crate) fn s3_error<E, R>(operation: &'static str, uri: String, e: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: fmt::Debug,
{
    let retryable = crate::aws::is_retryable(&e);
    StoreError::S3 { operation, uri, message: crate::aws::describe(&e), retryable }
}

fn content_etag(body: &[u8]) -> Etag {
    Etag(format!("{:032x}", xxhash_rust::xxh3::xxh3_128(body)))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|join| {
        Err(StoreError::Io {
            operation: "run blocking file task",
            path: String::new(),
            source: std::io::Error::other(join),
        })
    })
}

fn file_put(root: &Path, key: &str, body: &[u8], condition: &Precondition) -> Result<Etag, StoreError> {
    let io = |operation, path: &Path| {
        let path = path.display().to_string();
        move |source| StoreError::Io { operation, path, source }
    };
    let path = root.join(key);
    let dir = path.parent().unwrap_or(root);
    std::fs::create_dir_all(dir).map_err(io("create directory", dir))?;
    // One lock per store directory serialises check-and-replace across processes.
    let lock_path = root.join(".pushpull.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io("open lock", &lock_path))?;
    lock.lock().map_err(io("lock", &lock_path))?;
    let current = match std::fs::read(&path) {
        Ok(bytes) => Some(content_etag(&bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io("read", &path)(e)),
    };
    let allowed = match (condition, &current) {
        (Precondition::None, _) => true,
        (Precondition::IfAbsent, current) => current.is_none(),
        (Precondition::IfMatch(want), Some(have)) => want == have,
        (Precondition::IfMatch(_), None) => false,
    };
    if !allowed {
        return Err(StoreError::PreconditionFailed { uri: format!("file://{}", path.display()) });
    }
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io("create temporary file in", dir))?;
    tmp.write_all(body).map_err(io("write", tmp.path()))?;
    // No fsync: the rename makes the write atomic for readers and for a crashed process, which is
    // what this local backend promises; surviving a power cut is the S3 backend's job.
    tmp.persist(&path).map_err(|e| io("rename into", &path)(e.error))?;
    Ok(content_etag(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations() {
        assert_eq!(
            "s3://my-bucket/a/b/".parse::<Location>().unwrap(),
            Location::S3 { bucket: "my-bucket".into(), prefix: "a/b".into() }
        );
        assert_eq!(
            "s3://my-bucket".parse::<Location>().unwrap(),
            Location::S3 { bucket: "my-bucket".into(), prefix: "".into() }
        );
        assert_eq!("file:///tmp/x".parse::<Location>().unwrap(), Location::File { root: "/tmp/x".into() });
        for bad in ["s3://", "s3://B", "file://relative", "http://x", "/tmp/x", ""] {
            let err = bad.parse::<Location>().unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        assert_eq!("s3://b-1/p".parse::<Location>().unwrap().to_string(), "s3://b-1/p");
    }

    #[test]
    fn contains_respects_bucket_and_whole_prefix_segments() {
        let all: Location = "s3://bkt".parse().unwrap();
        assert!(all.contains("bkt", "anything"));
        let q: Location = "s3://bkt/quarantine".parse().unwrap();
        assert!(q.contains("bkt", "quarantine/x"));
        assert!(!q.contains("bkt", "quarantine"));
        assert!(!q.contains("bkt", "quarantined/x"));
        let f: Location = "file:///tmp".parse().unwrap();
        assert!(!f.contains("bkt", "x"));
    }

    #[tokio::test]
    async fn file_store_round_trip_and_missing_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::file(dir.path());
        assert!(store.get("nope").await.unwrap().is_none());
        let e1 = store.put("x/y", Bytes::from_static(b"hello"), Precondition::None).await.unwrap();
        let got = store.get("x/y").await.unwrap().unwrap();
        assert_eq!((&got.body[..], got.etag), (&b"hello"[..], e1.clone()));
        // IfMatch on a missing key fails, as on S3.
        let missing = store.put("zz", Bytes::new(), Precondition::IfMatch(e1)).await;
        assert!(matches!(missing, Err(StoreError::PreconditionFailed { .. })));
    }
}
