//! Where input that cannot be processed goes, with its reason: never dropped, never blocking.
//!
//! Entries are NDJSON, written in parts of at most [`PART_MAX_ENTRIES`] entries or about
//! [`PART_MAX_BYTES`] bytes under a prefix that names the source, so memory stays bounded
//! however much of an input is bad.
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
#[non_exhaustive]
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

/// Collects quarantine entries for one source and writes them, when told, as one part object
/// named after the first input line the part covers (`<prefix>/part-<line>.ndjson`).
///
/// Naming parts by the line where they start, and writing a part only at a checkpoint, keeps a
/// retry from duplicating entries: a retry resumes at the line after the last checkpoint, so its
/// next part starts at the same line and replaces whatever an interrupted run wrote there. That
/// next part is written even when it holds no entries ([`QuarantineWriter::replace_next_part`]):
/// the retry's first checkpoint may come before its first bad line, and its later parts start at
/// later lines.
///
/// Every other part is written only if absent: an owner that stalled past its lease and wakes to
/// write the part a retry has already replaced gets [`StoreError::PreconditionFailed`] instead of
/// overwriting the retry's entries with its own (whose lines the retry's later parts hold again).
/// The caller then confirms that it still holds its lease and, if it does (the part was its own
/// write, whose answer was lost), replaces it.
#[derive(Debug)]
pub struct QuarantineWriter {
    store: Store,
    prefix: String,
    buffer: Vec<u8>,
    buffered: usize,
    total: u64,
    replace_next: bool,
}

impl QuarantineWriter {
    /// Entries go under `<prefix>/` in `store`.
    pub fn new(store: Store, prefix: impl Into<String>) -> Self {
        QuarantineWriter {
            store,
            prefix: prefix.into(),
            buffer: Vec::new(),
            buffered: 0,
            total: 0,
            replace_next: false,
        }
    }

    /// The next [`QuarantineWriter::write_part`] writes its part even with no entries, replacing
    /// whatever an interrupted run wrote under that name (a run that wrote the part and then
    /// could not record its checkpoint). Call it when resuming another run's work.
    pub fn replace_next_part(&mut self) {
        self.replace_next = true;
    }

    /// Buffers an entry. Check [`QuarantineWriter::is_full`] and write a part when it is.
    pub fn add<T: Serialize>(&mut self, entry: &T) {
        let line = serde_json::to_vec(entry)
            .unwrap_or_else(|e| format!("{{\"unserializable\":{:?}}}", e.to_string()).into_bytes());
        self.buffer.extend_from_slice(&line);
        self.buffer.push(b'\n');
        self.buffered += 1;
        self.total += 1;
    }

    /// Whether the buffer holds a full part ([`PART_MAX_ENTRIES`] or [`PART_MAX_BYTES`]).
    pub fn is_full(&self) -> bool {
        self.buffered >= PART_MAX_ENTRIES || self.buffer.len() >= PART_MAX_BYTES
    }

    /// Entries buffered and not yet written.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Entries added since this writer was made.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The key of the part that starts at input line `first_line`.
    pub fn part_key(&self, first_line: u64) -> String {
        format!("{}/part-{first_line:012}.ndjson", self.prefix)
    }

    /// Writes the buffered entries as the part starting at input line `first_line`; returns how
    /// many entries it held (0: nothing written). Unless told to replace it
    /// ([`QuarantineWriter::replace_next_part`]), a part that exists already is left as it is and
    /// the answer is [`StoreError::PreconditionFailed`], with the entries still buffered.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// use pushpull::quarantine::QuarantineWriter;
    /// use pushpull::store::{Store, StoreError};
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = Store::file(dir.path());
    /// let mut retry = QuarantineWriter::new(store.clone(), "q");
    /// retry.replace_next_part();
    /// retry.add(&serde_json::json!({"line": 7, "by": "the retry"}));
    /// assert_eq!(retry.write_part(5).await.unwrap(), 1);
    /// // The stalled owner the retry took over from writes the same part late: refused.
    /// let mut stalled = QuarantineWriter::new(store.clone(), "q");
    /// stalled.add(&serde_json::json!({"line": 7, "by": "the stalled owner"}));
    /// assert!(matches!(stalled.write_part(5).await, Err(StoreError::PreconditionFailed { .. })));
    /// assert_eq!(stalled.buffered(), 1);
    /// let part = store.get("q/part-000000000005.ndjson").await.unwrap().unwrap();
    /// assert!(String::from_utf8_lossy(&part.body).contains("the retry"));
    /// # });
    /// ```
    pub async fn write_part(&mut self, first_line: u64) -> Result<usize, StoreError> {
        if self.buffered == 0 && !self.replace_next {
            return Ok(0);
        }
        let key = self.part_key(first_line);
        let condition = if self.replace_next { Precondition::None } else { Precondition::IfAbsent };
        let body = Bytes::from(std::mem::take(&mut self.buffer));
        if let Err(e) = self.store.put(&key, body.clone(), condition).await {
            self.buffer = Vec::from(body);
            return Err(e);
        }
        self.replace_next = false;
        Ok(std::mem::take(&mut self.buffered))
    }
}

/// Longest name [`safe_path`] returns, in bytes: with a prefix and a suffix around it, a
/// checkpoint or quarantine name stays under S3's 1,024-byte key limit.
pub const SAFE_PATH_MAX_BYTES: usize = 800;

/// Makes an object key safe as a path below a store root, one-to-one: `%` and `~` are
/// percent-encoded, then `.`, `..` and empty segments, so no key can climb out of (or collapse
/// within) the store's directory, and two keys never share a name. A name that would pass
/// [`SAFE_PATH_MAX_BYTES`] (S3 keys reach 1,024 bytes) is cut and ends in `~` and a 128-bit hash
/// of the whole key (`~` appears nowhere else).
///
/// ```
/// use pushpull::quarantine::safe_path;
/// assert_eq!(safe_path("../a//b/./c"), "%2E%2E/a/%00/b/%2E/c");
/// assert_ne!(safe_path("a/./b"), safe_path("a/%2E/b"));
/// assert!(safe_path(&"k".repeat(1024)).len() <= pushpull::quarantine::SAFE_PATH_MAX_BYTES);
/// ```
pub fn safe_path(key: &str) -> String {
    let escaped = key
        .split('/')
        .map(|seg| match seg {
            "" => "%00".to_owned(),
            "." => "%2E".to_owned(),
            ".." => "%2E%2E".to_owned(),
            s => s.replace('%', "%25").replace('~', "%7E"),
        })
        .collect::<Vec<_>>()
        .join("/");
    if escaped.len() <= SAFE_PATH_MAX_BYTES {
        return escaped;
    }
    // The hash goes on the last segment, so no segment is left empty, "." or "..".
    let hash = format!("~{:032x}", xxhash_rust::xxh3::xxh3_128(key.as_bytes()));
    let mut cut = SAFE_PATH_MAX_BYTES - hash.len();
    while !escaped.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{hash}", &escaped[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parts_are_bounded_and_named_by_their_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::file(dir.path());
        let mut w = QuarantineWriter::new(store.clone(), "b/k");
        let entry = |line| QuarantinedLine {
            bucket: "b".into(),
            key: "k".into(),
            version: None,
            line,
            offset: line * 10,
            reason: "invalid JSON".into(),
            excerpt: "{".into(),
        };
        for i in 1..=PART_MAX_ENTRIES as u64 {
            assert!(!w.is_full());
            w.add(&entry(i));
        }
        assert!(w.is_full());
        assert_eq!(w.write_part(1).await.unwrap(), PART_MAX_ENTRIES);
        w.add(&entry(5000));
        assert_eq!(w.write_part(4990).await.unwrap(), 1);
        assert_eq!(w.write_part(6000).await.unwrap(), 0, "nothing buffered, nothing written");
        assert_eq!(w.total(), PART_MAX_ENTRIES as u64 + 1);
        let p1 = store.get("b/k/part-000000000001.ndjson").await.unwrap().unwrap();
        assert_eq!(p1.body.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count(), PART_MAX_ENTRIES);
        let p2 = store.get("b/k/part-000000004990.ndjson").await.unwrap().unwrap();
        let first: serde_json::Value = serde_json::from_slice(p2.body.split(|b| *b == b'\n').next().unwrap()).unwrap();
        assert_eq!(first["line"], 5000);
        assert_eq!(first["reason"], "invalid JSON");
        assert!(first.get("version").is_none());
        assert!(store.get("b/k/part-000000006000.ndjson").await.unwrap().is_none());
    }

    #[test]
    fn excerpts_are_bounded_and_lossy() {
        assert_eq!(QuarantinedLine::excerpt_of(b"ab\xffc"), "ab\u{fffd}c");
        assert_eq!(QuarantinedLine::excerpt_of(&[b'x'; 1000]).len(), EXCERPT_BYTES);
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn is_safe(name: &str) -> bool {
            name.len() <= SAFE_PATH_MAX_BYTES && name.split('/').all(|seg| !matches!(seg, "" | "." | ".."))
        }

        proptest! {
            /// Names never climb out, never collapse, stay short enough for S3, and two different
            /// keys (of any length S3 allows) never share one.
            #[test]
            fn names_are_safe_and_one_to_one(a in "[a-z./%~]{0,12}|\\PC{0,300}", b in "[a-z./%~]{0,12}|\\PC{0,300}") {
                let (na, nb) = (safe_path(&a), safe_path(&b));
                prop_assert!(is_safe(&na), "{:?} -> {:?}", a, na);
                prop_assert_eq!(na == nb, a == b, "{:?} and {:?} -> {:?}", a, b, na);
            }

            #[test]
            fn long_keys_get_short_distinct_names(stem in "[a-zA-Z0-9/._%~-]{1,8}", a in any::<u16>(), b in any::<u16>()) {
                let long = |n: u16| format!("{}{n}", stem.repeat(1024 / stem.len()))[..1000].to_owned() + &n.to_string();
                let (ka, kb) = (long(a), long(b));
                let (na, nb) = (safe_path(&ka), safe_path(&kb));
                prop_assert!(is_safe(&na) && is_safe(&nb), "{na:?}");
                prop_assert_eq!(na == nb, ka == kb);
            }
        }
    }
}
