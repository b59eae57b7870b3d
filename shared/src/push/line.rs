//! How a line becomes a record: your [`LineHandler`], usually a closure
//! `|line| -> Result<Option<OutRecord>, LineReject>`.
//!
//! `Ok(Some(record))` sends it, `Ok(None)` drops the line on purpose (a filter; counted as
//! skipped), `Err(reason)` quarantines it with the reason. [`Line::into_record`] copies the line
//! into a block shared with its neighbours (no allocation per record); [`OutRecord::new`] takes
//! any data you made yourself. [`JsonLines`] is the built-in: each line one JSON object, the
//! partition key from a field or a stable hash.
//!
//! ```
//! use pushpull::push::line::{Line, LineHandler, LineReject};
//! use pushpull::sink::OutRecord;
//!
//! // Upper-case every line, keyed by its first word; refuse empty words.
//! let handler = |line: Line<'_>| -> Result<Option<OutRecord>, LineReject> {
//!     let text = line.text()?;
//!     let key = text.split(' ').next().filter(|w| !w.is_empty()).ok_or("no first word")?.to_owned();
//!     Ok(Some(OutRecord::new(key, text.to_uppercase().into(), line.number())))
//! };
//! let mut blocks = Default::default();
//! let record = handler.to_record(Line::new(b"alice bought tea", 1, 0, &mut blocks)).unwrap().unwrap();
//! assert_eq!((record.partition_key.as_str(), &record.data[..]), ("alice", &b"ALICE BOUGHT TEA"[..]));
//! assert_eq!(handler.to_record(Line::new(b" x", 2, 17, &mut blocks)).unwrap_err().to_string(), "no first word");
//! ```
use bytes::Bytes;
use compact_str::CompactString;

use crate::ndjson::{self, LineError};
use crate::sink::OutRecord;

/// Longest partition key Kinesis accepts (characters).
pub const MAX_PARTITION_KEY_CHARS: usize = 256;

/// Why a line is quarantined instead of sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LineReject(pub String);

impl From<String> for LineReject {
    fn from(s: String) -> Self {
        LineReject(s)
    }
}

impl From<&str> for LineReject {
    fn from(s: &str) -> Self {
        LineReject(s.to_owned())
    }
}

/// One line of an object, without its line ending.
#[derive(Debug)]
pub struct Line<'a> {
    bytes: &'a [u8],
    number: u64,
    offset: u64,
    blocks: &'a mut DataBlocks,
}

impl<'a> Line<'a> {
    /// Line `number` (1-based) at byte `offset` of the (decompressed) object; records made from it
    /// share `blocks`.
    pub fn new(bytes: &'a [u8], number: u64, offset: u64, blocks: &'a mut DataBlocks) -> Self {
        Line { bytes, number, offset, blocks }
    }

    /// The bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The 1-based line number.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// The byte offset of the line's start.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The line as UTF-8 text, or a reason naming the first invalid byte.
    pub fn text(&self) -> Result<&'a str, LineReject> {
        std::str::from_utf8(self.bytes)
            .map_err(|e| LineReject(format!("not UTF-8 (invalid byte at offset {} of the line)", e.valid_up_to())))
    }

    /// A stable hash of the line as a partition key: the same on every retry, spread evenly.
    pub fn hash_key(&self) -> CompactString {
        compact_str::format_compact!("{:016x}", xxhash_rust::xxh3::xxh3_64(self.bytes))
    }

    /// The line as the record's data, copied into a block shared with its neighbours.
    pub fn into_record(self, partition_key: impl Into<CompactString>) -> OutRecord {
        OutRecord::new(partition_key, self.blocks.copy(self.bytes), self.number)
    }
}

/// Makes a record of each line of an object: any closure
/// `|line: Line<'_>| -> Result<Option<OutRecord>, LineReject>`, or [`JsonLines`].
pub trait LineHandler: Send + Sync {
    /// The record for `line`, `None` to skip it, or why it must be quarantined.
    fn to_record(&self, line: Line<'_>) -> Result<Option<OutRecord>, LineReject>;
}

impl<F> LineHandler for F
where
    F: Fn(Line<'_>) -> Result<Option<OutRecord>, LineReject> + Send + Sync,
{
    fn to_record(&self, line: Line<'_>) -> Result<Option<OutRecord>, LineReject> {
        self(line)
    }
}

/// Makes the records of a whole object at once, for formats that are not line-based (a JSON
/// document, XML, a binary format); [`WholeObject`] makes one of a closure. The object is read
/// into memory up to [`ObjectHandler::max_bytes`] (a larger object is quarantined), its records
/// sent and checkpointed together at the end. A resumed object is read again from the start, and
/// what the interrupted invocation sent is found in the stream and not sent again, as for lines;
/// the records must be sent within `CHECKPOINT_LEASE_MS`.
pub trait ObjectHandler: Send + Sync {
    /// The largest object read.
    fn max_bytes(&self) -> usize;

    /// The records of `object`, in order, or why the object must be quarantined.
    fn records(&self, object: &[u8]) -> Result<Vec<OutRecord>, LineReject>;
}

/// An [`ObjectHandler`] of a closure `|bytes| -> Result<Vec<OutRecord>, LineReject>`.
///
/// ```
/// use pushpull::push::line::{LineReject, ObjectHandler, WholeObject};
/// use pushpull::sink::OutRecord;
///
/// // A JSON array document: one record per element, keyed by its "id".
/// let handler = WholeObject::new(16 << 20, |bytes: &[u8]| -> Result<Vec<OutRecord>, LineReject> {
///     let items: Vec<serde_json::Value> = serde_json::from_slice(bytes).map_err(|e| format!("not a JSON array: {e}"))?;
///     Ok(items.iter().map(|v| OutRecord::keyed(v["id"].to_string(), v.to_string())).collect())
/// });
/// assert_eq!(handler.max_bytes(), 16 << 20);
/// assert_eq!(handler.records(br#"[{"id":1},{"id":2}]"#).unwrap().len(), 2);
/// assert!(handler.records(b"{").is_err());
/// ```
#[derive(Debug, Clone)]
pub struct WholeObject<F> {
    max_bytes: usize,
    records: F,
}

impl<F> WholeObject<F>
where
    F: Fn(&[u8]) -> Result<Vec<OutRecord>, LineReject> + Send + Sync,
{
    /// Objects of at most `max_bytes`, made into records by `records`.
    pub fn new(max_bytes: usize, records: F) -> Self {
        WholeObject { max_bytes, records }
    }
}

impl<F> ObjectHandler for WholeObject<F>
where
    F: Fn(&[u8]) -> Result<Vec<OutRecord>, LineReject> + Send + Sync,
{
    fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    fn records(&self, object: &[u8]) -> Result<Vec<OutRecord>, LineReject> {
        (self.records)(object)
    }
}

/// An [`ObjectHandler`] as a [`crate::push::PushHandler`] takes one (the builder's
/// [`crate::push::PushBuilder::objects`] wraps it).
#[derive(Debug, Clone)]
pub struct Objects<H>(pub H);

/// What a [`crate::push::PushHandler`] makes records with: a [`LineHandler`] (lines) or
/// [`Objects`] of an [`ObjectHandler`] (whole objects). Sealed: implement one of those two.
pub trait Records: Send + Sync + sealed::Sealed {
    /// `Some(max_bytes)` for whole objects, `None` for lines.
    #[doc(hidden)]
    fn whole_object(&self) -> Option<usize>;
    #[doc(hidden)]
    fn line_record(&self, line: Line<'_>) -> Result<Option<OutRecord>, LineReject>;
    #[doc(hidden)]
    fn object_records(&self, object: &[u8]) -> Result<Vec<OutRecord>, LineReject>;
}

mod sealed {
    pub trait Sealed {}
    impl<H: super::LineHandler> Sealed for H {}
    impl<H: super::ObjectHandler> Sealed for super::Objects<H> {}
}

impl<H: LineHandler> Records for H {
    fn whole_object(&self) -> Option<usize> {
        None
    }

    fn line_record(&self, line: Line<'_>) -> Result<Option<OutRecord>, LineReject> {
        self.to_record(line)
    }

    fn object_records(&self, _object: &[u8]) -> Result<Vec<OutRecord>, LineReject> {
        Err(LineReject("this handler reads lines, not whole objects".into()))
    }
}

impl<H: ObjectHandler> Records for Objects<H> {
    fn whole_object(&self) -> Option<usize> {
        Some(self.0.max_bytes())
    }

    fn line_record(&self, line: Line<'_>) -> Result<Option<OutRecord>, LineReject> {
        Ok(self.0.records(line.bytes())?.into_iter().next())
    }

    fn object_records(&self, object: &[u8]) -> Result<Vec<OutRecord>, LineReject> {
        self.0.records(object)
    }
}

/// The built-in handler: each line is one JSON object, sent as it is; the partition key is the
/// value of a top-level field (a string unescaped, other values as their JSON text) or, when the
/// field is unset, absent, `null`, empty or longer than 256 characters, a stable hash of the line.
///
/// Lines that are not UTF-8, not JSON, or JSON but not an object (`null`, `[1,2]`, `"text"`,
/// `42`) are quarantined with the reason: a consumer reading fields of records would otherwise
/// meet values with no fields at all.
///
/// ```
/// use pushpull::push::line::{JsonLines, Line, LineHandler};
/// let h = JsonLines::new(Some("user".into()));
/// let mut blocks = Default::default();
/// let r = h.to_record(Line::new(br#"{"user":"u1"}"#, 1, 0, &mut blocks)).unwrap().unwrap();
/// assert_eq!(r.partition_key, "u1");
/// let why = h.to_record(Line::new(b"[1,2]", 2, 14, &mut blocks)).unwrap_err();
/// assert_eq!(why.to_string(), "JSON but not an object (an array)");
/// ```
#[derive(Debug, Clone, Default)]
pub struct JsonLines {
    partition_key_field: Option<String>,
}

impl JsonLines {
    /// Partition keys from `partition_key_field`, or hashes.
    pub fn new(partition_key_field: Option<String>) -> Self {
        JsonLines { partition_key_field }
    }
}

impl LineHandler for JsonLines {
    fn to_record(&self, line: Line<'_>) -> Result<Option<OutRecord>, LineReject> {
        let bytes = line.bytes();
        let key = match ndjson::inspect(bytes, self.partition_key_field.as_deref()) {
            Ok(key) => key,
            Err(e @ LineError::Utf8 { .. }) => return Err(LineReject(e.to_string())),
            Err(LineError::Json(e)) => return Err(LineReject(format!("invalid JSON: {e}"))),
        };
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace()).copied();
        if first != Some(b'{') {
            let what = match first {
                Some(b'[') => "an array",
                Some(b'"') => "a string",
                Some(b'n') => "null",
                Some(b't' | b'f') => "a boolean",
                _ => "a number",
            };
            return Err(LineReject(format!("JSON but not an object ({what})")));
        }
        let partition_key = match key {
            Some(k) if !k.is_empty() && k.chars().count() <= MAX_PARTITION_KEY_CHARS => CompactString::from(&*k),
            _ => line.hash_key(),
        };
        Ok(Some(line.into_record(partition_key)))
    }
}

/// Copies record data into shared 64 KiB blocks: a record then costs no allocation of its own,
/// and keeps alive at most the block it shares with its neighbours in the batch, never the read
/// buffer it came from (megabytes when long lines surround short ones).
#[derive(Debug, Default)]
pub struct DataBlocks {
    block: bytes::BytesMut,
}

impl DataBlocks {
    const SIZE: usize = 64 * 1024;

    /// `data` as `Bytes` in the current block (or alone, when long).
    pub fn copy(&mut self, data: &[u8]) -> Bytes {
        if data.len() > Self::SIZE / 8 {
            return Bytes::copy_from_slice(data);
        }
        if self.block.capacity() - self.block.len() < data.len() {
            self.block = bytes::BytesMut::with_capacity(Self::SIZE);
        }
        self.block.extend_from_slice(data);
        self.block.split().freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(h: &JsonLines, line: &[u8]) -> Result<Option<OutRecord>, LineReject> {
        h.to_record(Line::new(line, 1, 0, &mut DataBlocks::default()))
    }

    #[test]
    fn record_data_shares_blocks_but_never_the_read_buffer() {
        let mut blocks = DataBlocks::default();
        let read_buffer = bytes::Bytes::from(vec![b'x'; 1 << 20]);
        let a = blocks.copy(&read_buffer[..100]);
        let b = blocks.copy(&read_buffer[100..300]);
        assert_eq!((&a[..], &b[..]), (&read_buffer[..100], &read_buffer[100..300]));
        assert_eq!(a.as_ptr().wrapping_add(100), b.as_ptr(), "neighbours share a block");
        let big = blocks.copy(&read_buffer[..DataBlocks::SIZE]);
        assert_eq!(big.len(), DataBlocks::SIZE, "long data gets its own allocation");
        drop(read_buffer); // nothing above refers to it
        assert_eq!(&a[..3], b"xxx");
    }

    #[test]
    fn records_take_the_field_or_a_stable_hash() {
        let line = br#"{"user":"u1","n":1}"#;
        assert_eq!(record(&JsonLines::new(Some("user".into())), line).unwrap().unwrap().partition_key, "u1");
        let hashed = record(&JsonLines::new(None), line).unwrap().unwrap().partition_key;
        assert_eq!(hashed.len(), 16);
        assert_eq!(hashed, record(&JsonLines::new(Some("missing".into())), line).unwrap().unwrap().partition_key);
        let long = format!(r#"{{"user":"{}"}}"#, "x".repeat(300));
        assert_eq!(
            record(&JsonLines::new(Some("user".into())), long.as_bytes()).unwrap().unwrap().partition_key.len(),
            16
        );
    }

    #[test]
    fn bad_lines_get_reasons() {
        let h = JsonLines::default();
        assert!(record(&h, b"{nope").unwrap_err().0.starts_with("invalid JSON: key must be a string"));
        assert_eq!(record(&h, b"\"\xfe\"").unwrap_err().0, "not UTF-8 (invalid byte at offset 1 of the line)");
        for (line, what) in [
            (&b"null"[..], "null"),
            (b"[1,2]", "an array"),
            (b"\"text\"", "a string"),
            (b" 42", "a number"),
            (b"true", "a boolean"),
        ] {
            assert_eq!(record(&h, line).unwrap_err().0, format!("JSON but not an object ({what})"));
        }
    }

    proptest! {
        /// Any bytes: a record carrying the line unchanged, or a reason; never a panic.
        #[test]
        fn any_line_is_a_record_or_a_reason(line in prop::collection::vec(any::<u8>(), 0..200), field in prop::option::of("[a-z]{1,3}")) {
            let h = JsonLines::new(field);
            match record(&h, &line) {
                Ok(Some(r)) => {
                    prop_assert_eq!(&r.data[..], &line[..]);
                    prop_assert!(!r.partition_key.is_empty() && r.partition_key.chars().count() <= MAX_PARTITION_KEY_CHARS);
                }
                Ok(None) => prop_assert!(false, "JsonLines never skips"),
                Err(reason) => prop_assert!(!reason.0.is_empty()),
            }
        }
    }
}
