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
use std::path::PathBuf;
use std::str::FromStr;

use bytes::Bytes;

mod file;
#[cfg(feature = "s3")]
mod s3;

/// A place for objects: an S3 bucket and key prefix, or a local directory.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
#[non_exhaustive]
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
#[non_exhaustive]
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
        /// The SDK's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The location needs a backend this build does not have (`s3://` without the `s3` feature).
    #[error("{uri}: this build of pushpull has no {scheme}:// backend (enable the `{scheme}` feature)")]
    Unsupported {
        /// The object.
        uri: String,
        /// The scheme.
        scheme: &'static str,
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
            StoreError::PreconditionFailed { .. } | StoreError::Unsupported { .. } => false,
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
    #[cfg(feature = "s3")]
    S3 {
        client: aws_sdk_s3::Client,
        bucket: String,
        prefix: String,
    },
    /// An `s3://` location from [`Store::at`]: the client (and the AWS configuration) is made
    /// at the first call, and shared by every store made so.
    #[cfg(feature = "s3")]
    S3Lazy {
        aws: std::sync::Arc<crate::aws::Aws>,
        bucket: String,
        prefix: String,
    },
    /// An `s3://` location in a build without the `s3` feature: every call says so.
    #[cfg(not(feature = "s3"))]
    S3Unsupported {
        bucket: String,
        prefix: String,
    },
    File {
        root: PathBuf,
    },
}

impl StoreError {
    /// A failed S3 call: what S3 said, whether a retry may help, and the SDK error as the source.
    #[cfg(feature = "s3")]
    pub(crate) fn s3<E, R>(operation: &'static str, uri: String, e: aws_sdk_s3::error::SdkError<E, R>) -> StoreError
    where
        E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: fmt::Debug + Send + Sync + 'static,
    {
        let retryable = crate::aws::classify(&e).is_retryable();
        StoreError::S3 { operation, uri, message: crate::aws::describe(&e), retryable, source: Box::new(e) }
    }
}

impl Store {
    /// A store in a local directory.
    pub fn file(root: impl Into<PathBuf>) -> Self {
        Store { backend: Backend::File { root: root.into() } }
    }

    /// A store in an S3 bucket under `prefix`.
    #[cfg(feature = "s3")]
    pub fn s3(client: aws_sdk_s3::Client, bucket: impl Into<String>, prefix: impl Into<String>) -> Self {
        let prefix = prefix.into().trim_matches('/').to_owned();
        Store { backend: Backend::S3 { client, bucket: bucket.into(), prefix } }
    }

    /// A store at `location`; the S3 client is built (once, shared) only for `s3://`.
    #[cfg(feature = "s3")]
    pub async fn connect(location: &Location, aws: &crate::aws::Aws) -> Self {
        match location {
            Location::S3 { bucket, prefix } => Store::s3(aws.s3().await.clone(), bucket, prefix),
            Location::File { root } => Store::file(root),
        }
    }

    /// A store at `location`, in every build. With the `s3` feature an `s3://` location
    /// connects at its first call (the AWS configuration loaded then, once for every store made
    /// so, for the life of the process: one client on the first tokio runtime that used it, so
    /// tests that each start a runtime should use [`Store::connect`]); without it, every call on
    /// an `s3://` store fails with [`StoreError::Unsupported`].
    ///
    /// ```
    /// use pushpull::store::{Location, Store};
    /// let dir = tempfile::tempdir().unwrap();
    /// let location: Location = format!("file://{}", dir.path().display()).parse().unwrap();
    /// let store = Store::at(&location);
    /// assert!(store.uri("a.json").ends_with("/a.json"));
    /// ```
    pub fn at(location: &Location) -> Self {
        match location {
            #[cfg(feature = "s3")]
            Location::S3 { bucket, prefix } => {
                static AWS: std::sync::OnceLock<std::sync::Arc<crate::aws::Aws>> = std::sync::OnceLock::new();
                let aws = AWS.get_or_init(|| std::sync::Arc::new(crate::aws::Aws::new())).clone();
                let prefix = prefix.trim_matches('/').to_owned();
                Store { backend: Backend::S3Lazy { aws, bucket: bucket.clone(), prefix } }
            }
            #[cfg(not(feature = "s3"))]
            Location::S3 { bucket, prefix } => {
                Store { backend: Backend::S3Unsupported { bucket: bucket.clone(), prefix: prefix.clone() } }
            }
            Location::File { root } => Store::file(root),
        }
    }

    /// The full URI of `key` in this store, for messages.
    pub fn uri(&self, key: &str) -> String {
        match &self.backend {
            Backend::File { root } => format!("file://{}", root.join(key).display()),
            #[cfg(feature = "s3")]
            Backend::S3 { bucket, prefix, .. } | Backend::S3Lazy { bucket, prefix, .. } => {
                format!("s3://{bucket}/{}", prefixed(prefix, key))
            }
            #[cfg(not(feature = "s3"))]
            Backend::S3Unsupported { bucket, prefix } => format!("s3://{bucket}/{}", prefixed(prefix, key)),
        }
    }

    /// Reads `key`; `None` when there is no such object.
    pub async fn get(&self, key: &str) -> Result<Option<Stored>, StoreError> {
        match &self.backend {
            Backend::File { root } => file::get(root, key).await,
            #[cfg(feature = "s3")]
            Backend::S3 { client, bucket, prefix } => {
                s3::get(client, bucket, &prefixed(prefix, key), self.uri(key)).await
            }
            #[cfg(feature = "s3")]
            Backend::S3Lazy { aws, bucket, prefix } => {
                s3::get(aws.s3().await, bucket, &prefixed(prefix, key), self.uri(key)).await
            }
            #[cfg(not(feature = "s3"))]
            Backend::S3Unsupported { .. } => Err(StoreError::Unsupported { uri: self.uri(key), scheme: "s3" }),
        }
    }

    /// Writes `body` under `key` if `condition` holds; returns the new version.
    pub async fn put(&self, key: &str, body: Bytes, condition: Precondition) -> Result<Etag, StoreError> {
        match &self.backend {
            Backend::File { root } => file::put(root, key, body, condition).await,
            #[cfg(feature = "s3")]
            Backend::S3 { client, bucket, prefix } => {
                s3::put(client, bucket, &prefixed(prefix, key), self.uri(key), body, condition).await
            }
            #[cfg(feature = "s3")]
            Backend::S3Lazy { aws, bucket, prefix } => {
                s3::put(aws.s3().await, bucket, &prefixed(prefix, key), self.uri(key), body, condition).await
            }
            #[cfg(not(feature = "s3"))]
            Backend::S3Unsupported { .. } => Err(StoreError::Unsupported { uri: self.uri(key), scheme: "s3" }),
        }
    }
}

fn prefixed(prefix: &str, key: &str) -> String {
    if prefix.is_empty() { key.to_owned() } else { format!("{prefix}/{key}") }
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
