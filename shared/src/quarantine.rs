//! Where input that cannot be processed goes, with its reason: never dropped, never blocking.
//!
//! Entries are NDJSON, written in parts of at most [`PART_MAX_ENTRIES`] entries or
//! [`PART_MAX_BYTES`] bytes under a prefix that names the source, so memory stays bounded
//! however much of an input is bad. Part names are deterministic (`part-00001.ndjson`, ...), so
//! a retry that meets the same bad lines overwrites the same parts instead of adding copies.
use bytes::Bytes;
use serde::Serialize;

use crate::store::{Precondition, Store, StoreError};

/// Most entries in one part object.
pub const PART_MAX_ENTRIES: usize = 1000;
/// Most bytes in one part object (entries are never split).
pub const PART_MAX_BYTES: usize = 1024 * 1024;
/// How much of a bad line is kept, as (lossy UTF-8) text.
pub const EXCERPT_BYTES: usize = 256;

/// One quarantined line of an S3 object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuarantinedLine {
    /// Source bucket.
    pub bucket: String,
    /// Source key (decoded).
    pub key: String,
    /// Source version id or ETag, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// 1-based line number.
    pub line: u64,
    /// Byte offset of the line in the (decompressed) object.
    pub offset: u64,
    /// Why it was not sent.
    pub reason: String,
    /// The start of the line, lossily decoded.
    pub excerpt: String,
}

impl QuarantinedLine {
    /// Keeps at most [`EXCERPT_BYTES`] of `line` as the excerpt.
    pub fn excerpt_of(line: &[u8]) -> String {
        String::from_utf8_lossy(&line[..line.len().min(EXCERPT_BYTES)]).into_owned()
    }
}

/// Writes quarantine entries for one source under `prefix` in a [`Store`].
#[derive(Debug)]
pub struct QuarantineWriter {
    store: Store,
    prefix: String,
    buffer: Vec<u8>,
    buffered: usize,
    parts: u32,
    total: u64,
}

impl QuarantineWriter {
    /// Entries go to `<prefix>/part-NNNNN.ndjson` in `store`.
    pub fn new(store: Store, prefix: impl Into<String>) -> Self {
        QuarantineWriter { store, prefix: prefix.into(), buffer: Vec::new(), buffered: 0, parts: 0, total: 0 }
    }

    /// Adds an entry, writing a part when one is full.
    pub async fn add<T: Serialize>(&mut self, entry: &T) -> Result<(), StoreError> {
        let line = serde_json::to_vec(entry)
            .unwrap_or_else(|e| format!("{{\"unserializable\":{:?}}}", e.to_string()).into_bytes());
        if self.buffered > 0 && self.buffer.len() + line.len() + 1 > PART_MAX_BYTES {
            self.flush().await?;
        }
        self.buffer.extend_from_slice(&line);
        self.buffer.push(b'\n');
        self.buffered += 1;
        self.total += 1;
        if self.buffered >= PART_MAX_ENTRIES {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes what is buffered; returns how many entries were quarantined in all.
    pub async fn finish(mut self) -> Result<u64, StoreError> {
        self.flush().await?;
        Ok(self.total)
    }

    /// Entries added so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    async fn flush(&mut self) -> Result<(), StoreError> {
        if self.buffered == 0 {
            return Ok(());
        }
        self.parts += 1;
        let key = format!("{}/part-{:05}.ndjson", self.prefix, self.parts);
        let body = Bytes::from(std::mem::take(&mut self.buffer));
        self.buffered = 0;
        self.store.put(&key, body, Precondition::None).await?;
        Ok(())
    }
}

/// Makes an object key safe as a path below a store root: `.`, `..` and empty segments are
/// percent-encoded, so no key can climb out of (or collapse within) the store's directory.
///
/// ```
/// assert_eq!(pushpull::quarantine::safe_path("../a//b/./c"), "%2E%2E/a/%00/b/%2E/c");
/// ```
pub fn safe_path(key: &str) -> String {
    key.split('/')
        .map(|seg| match seg {
            "" => "%00".to_owned(),
            "." => "%2E".to_owned(),
            ".." => "%2E%2E".to_owned(),
            s => s.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_parts_of_bounded_size_with_stable_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::file(dir.path());
        let mut w = QuarantineWriter::new(store.clone(), "b/k");
        for i in 0..(PART_MAX_ENTRIES as u64 + 5) {
            let entry = QuarantinedLine {
                bucket: "b".into(),
                key: "k".into(),
                version: None,
                line: i + 1,
                offset: i * 10,
                reason: "invalid JSON".into(),
                excerpt: "{".into(),
            };
            w.add(&entry).await.unwrap();
        }
        assert_eq!(w.finish().await.unwrap(), PART_MAX_ENTRIES as u64 + 5);
        let p1 = store.get("b/k/part-00001.ndjson").await.unwrap().unwrap();
        let p2 = store.get("b/k/part-00002.ndjson").await.unwrap().unwrap();
        assert_eq!(p1.body.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count(), PART_MAX_ENTRIES);
        assert_eq!(p2.body.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count(), 5);
        let first: serde_json::Value = serde_json::from_slice(p1.body.split(|b| *b == b'\n').next().unwrap()).unwrap();
        assert_eq!(first["line"], 1);
        assert_eq!(first["reason"], "invalid JSON");
        assert!(first.get("version").is_none());
    }

    #[test]
    fn excerpts_are_bounded_and_lossy() {
        assert_eq!(QuarantinedLine::excerpt_of(b"ab\xffc"), "ab\u{fffd}c");
        assert_eq!(QuarantinedLine::excerpt_of(&[b'x'; 1000]).len(), EXCERPT_BYTES);
    }
}
