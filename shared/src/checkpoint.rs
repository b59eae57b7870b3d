//! Checkpoints: small JSON documents replaced only by compare-and-swap, so that retries,
//! duplicate events and crashes neither lose nor repeat work, and two concurrent invocations can
//! never both believe they own the same piece of work.
//!
//! [`CheckpointStore`] is the storage contract: read with a version, write with a
//! [`Precondition`]. [`Store`] implements it for `s3://` (conditional writes) and `file://`
//! (atomic rename under a lock). [`Checkpoints`] adds typed JSON on top.
//!
//! ```
//! use pushpull::checkpoint::{CheckpointError, Checkpoints};
//! use pushpull::store::Store;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let dir = tempfile::tempdir().unwrap();
//! let cp = Checkpoints::new(Store::file(dir.path()));
//! let v1 = cp.create("shard-0", &41u64).await.unwrap();
//! // A second creator loses; a writer holding a stale version loses.
//! assert!(matches!(cp.create("shard-0", &1u64).await, Err(CheckpointError::Conflict { .. })));
//! let v2 = cp.replace("shard-0", &42u64, &v1).await.unwrap();
//! assert!(matches!(cp.replace("shard-0", &43u64, &v1).await, Err(CheckpointError::Conflict { .. })));
//! let (value, version) = cp.load::<u64>("shard-0").await.unwrap().unwrap();
//! assert_eq!((value, version), (42, v2));
//! # });
//! ```
use std::future::Future;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::store::{Etag, Precondition, Store, StoreError, Stored};

/// Versioned storage with conditional writes: what checkpoints need from a backend.
pub trait CheckpointStore: Send + Sync {
    /// Reads `key` with its version; `None` if absent.
    fn read(&self, key: &str) -> impl Future<Output = Result<Option<Stored>, StoreError>> + Send;
    /// Writes `key` if `condition` holds; [`StoreError::PreconditionFailed`] if it does not.
    fn write(
        &self,
        key: &str,
        body: Bytes,
        condition: Precondition,
    ) -> impl Future<Output = Result<Etag, StoreError>> + Send;
    /// The full URI of `key`, for messages.
    fn describe(&self, key: &str) -> String;
}

impl CheckpointStore for Store {
    fn read(&self, key: &str) -> impl Future<Output = Result<Option<Stored>, StoreError>> + Send {
        self.get(key)
    }
    fn write(
        &self,
        key: &str,
        body: Bytes,
        condition: Precondition,
    ) -> impl Future<Output = Result<Etag, StoreError>> + Send {
        self.put(key, body, condition)
    }
    fn describe(&self, key: &str) -> String {
        self.uri(key)
    }
}

/// A checkpoint operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// Someone else wrote the checkpoint first (it exists, or changed since it was read).
    #[error("checkpoint {uri} was written by someone else first")]
    Conflict {
        /// The checkpoint.
        uri: String,
    },
    /// The stored document is not what this version of the code writes.
    #[error("checkpoint {uri} is unreadable: {source}")]
    Corrupt {
        /// The checkpoint.
        uri: String,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
}

impl CheckpointError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            CheckpointError::Conflict { .. } => true,
            CheckpointError::Corrupt { .. } => false,
            CheckpointError::Store(e) => e.is_retryable(),
        }
    }
}

/// Typed JSON checkpoints in a [`CheckpointStore`].
#[derive(Debug, Clone)]
pub struct Checkpoints<S> {
    store: S,
}

impl<S: CheckpointStore> Checkpoints<S> {
    /// Checkpoints kept in `store`.
    pub fn new(store: S) -> Self {
        Checkpoints { store }
    }

    /// The underlying store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Reads checkpoint `id` and its version.
    pub async fn load<T: DeserializeOwned>(&self, id: &str) -> Result<Option<(T, Etag)>, CheckpointError> {
        let Some(stored) = self.store.read(id).await.map_err(CheckpointError::Store)? else { return Ok(None) };
        let value = serde_json::from_slice(&stored.body)
            .map_err(|source| CheckpointError::Corrupt { uri: self.store.describe(id), source })?;
        Ok(Some((value, stored.etag)))
    }

    /// Creates checkpoint `id`; [`CheckpointError::Conflict`] if it exists.
    pub async fn create<T: Serialize>(&self, id: &str, value: &T) -> Result<Etag, CheckpointError> {
        self.write(id, value, Precondition::IfAbsent).await
    }

    /// Replaces checkpoint `id` if it is still at `version`.
    pub async fn replace<T: Serialize>(&self, id: &str, value: &T, version: &Etag) -> Result<Etag, CheckpointError> {
        self.write(id, value, Precondition::IfMatch(version.clone())).await
    }

    async fn write<T: Serialize>(&self, id: &str, value: &T, condition: Precondition) -> Result<Etag, CheckpointError> {
        let body = serde_json::to_vec(value)
            .map_err(|source| CheckpointError::Corrupt { uri: self.store.describe(id), source })?;
        match self.store.write(id, body.into(), condition).await {
            Ok(etag) => {
                crate::metrics::checkpoint_written();
                Ok(etag)
            }
            Err(StoreError::PreconditionFailed { uri }) => {
                crate::metrics::checkpoint_conflict();
                Err(CheckpointError::Conflict { uri })
            }
            Err(e) => Err(CheckpointError::Store(e)),
        }
    }
}
