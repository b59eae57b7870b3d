//! The `file://` backend: objects are files under a directory; writes go to a temporary file
//! renamed into place, and preconditions are checked under an exclusive lock file, so concurrent
//! processes on one machine get the same compare-and-swap guarantee as S3's conditional writes.
use std::io::Write;
use std::path::Path;

use bytes::Bytes;

use super::{Etag, Precondition, StoreError, Stored};

pub(super) async fn get(root: &Path, key: &str) -> Result<Option<Stored>, StoreError> {
    let path = root.join(key);
    blocking(move || match std::fs::read(&path) {
        Ok(body) => Ok(Some(Stored { etag: content_etag(&body), body: body.into() })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io { operation: "read", path: path.display().to_string(), source }),
    })
    .await
}

pub(super) async fn put(root: &Path, key: &str, body: Bytes, condition: Precondition) -> Result<Etag, StoreError> {
    let (root, key) = (root.to_owned(), key.to_owned());
    blocking(move || file_put(&root, &key, &body, &condition)).await
}

pub(super) fn content_etag(body: &[u8]) -> Etag {
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
