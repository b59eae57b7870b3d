//! KPL record aggregation, both ways: many user records packed into one Kinesis record, and
//! unpacked again on the consumer side (feature `aggregation`, on with `kinesis` and `push`).
//!
//! One Kinesis record is billed as at least one 25 KB PUT payload unit and counts as one of a
//! shard's 1,000 records a second, however small it is. The Kinesis Producer Library (KPL)
//! therefore packs small user records into one Kinesis record in its aggregation format
//! (awslabs/amazon-kinesis-producer, `aggregation-format.md`):
//!
//! ```text
//! F3 89 9A C2 | protobuf AggregatedRecord | MD5 of the protobuf bytes (16)
//! ```
//!
//! Each user record keeps its own partition key (and explicit hash key, if it had one) in the
//! protobuf's key tables. Lambda does not unpack aggregates: a consumer does, and numbers the
//! user records of a Kinesis record by *sub-sequence number* (0, 1, ...), as the KCL does.
//!
//! The reference deaggregators (Python `aws-kinesis-agg`, Java and Node.js in
//! awslabs/kinesis-aggregation) pass a record through unchanged when its magic bytes or its MD5
//! do not match; [`deaggregate`] says why in a [`NotAggregated`] and the caller does the same.
//!
//! ```
//! use bytes::Bytes;
//! use pushpull::aggregation::{deaggregate, Aggregator};
//!
//! let mut agg = Aggregator::new(50_000);
//! agg.add("user-1", None, Bytes::from_static(b"{\"a\":1}")).unwrap();
//! agg.add("user-2", None, Bytes::from_static(b"{\"a\":2}")).unwrap();
//! let record = agg.finish().unwrap();
//! assert_eq!((record.partition_key.as_str(), record.user_records), ("user-1", 2));
//! assert_eq!(&record.data[..4], &[0xF3, 0x89, 0x9A, 0xC2]);
//!
//! let unpacked = deaggregate(&record.data).unwrap();
//! let users: Vec<_> = unpacked.records().map(|r| (r.sub_sequence_number, r.partition_key, r.data)).collect();
//! assert_eq!(users[1], (1, "user-2", &b"{\"a\":2}"[..]));
//!
//! // A plain record is not an aggregate: it is passed through as it is.
//! assert!(deaggregate(b"{\"a\":1}").is_err());
//! ```
use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};
use md5::{Digest, Md5};
use prost::Message;
// xxh3 for the key tables' index: SipHash costs a third of an add for short keys.
use xxhash_rust::xxh3::Xxh3DefaultBuilder;

/// The four bytes an aggregated record starts with.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

/// Bytes of the MD5 digest that ends an aggregated record.
pub const DIGEST_LEN: usize = 16;

/// Kinesis's limit on one record: its data and its partition key together (PutRecords).
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;

/// The protobuf messages of the aggregation format (proto2), as `aggregation-format.md` gives
/// them.
mod proto {
    use bytes::Bytes;

    /// The key tables are proto2 `string`s, read here as bytes (the same wire type): decoded from
    /// a `Bytes`, each key is then a view of the aggregate, not an allocation of its own;
    /// `deaggregate` checks that every key is UTF-8, as a `string` field requires.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AggregatedRecord {
        #[prost(bytes = "bytes", repeated, tag = "1")]
        pub partition_key_table: Vec<Bytes>,
        #[prost(bytes = "bytes", repeated, tag = "2")]
        pub explicit_hash_key_table: Vec<Bytes>,
        #[prost(message, repeated, tag = "3")]
        pub records: Vec<Record>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Record {
        #[prost(uint64, required, tag = "1")]
        pub partition_key_index: u64,
        #[prost(uint64, optional, tag = "2")]
        pub explicit_hash_key_index: Option<u64>,
        #[prost(bytes = "bytes", required, tag = "3")]
        pub data: Bytes,
        #[prost(message, repeated, tag = "4")]
        pub tags: Vec<Tag>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Tag {
        #[prost(string, required, tag = "1")]
        pub key: String,
        #[prost(string, optional, tag = "2")]
        pub value: Option<String>,
    }
}

/// Why a record's data is not an aggregate. The record is then a plain record, as the reference
/// deaggregators treat it; all but [`NotAggregated::NoMagic`] mean the data began like an
/// aggregate and is worth a warning.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotAggregated {
    /// The data does not start with [`MAGIC`].
    #[error("does not start with the aggregation magic bytes")]
    NoMagic,
    /// The magic bytes, but no room for a digest after them.
    #[error("starts with the aggregation magic bytes but is only {len} bytes long")]
    TooShort {
        /// The data's length.
        len: usize,
    },
    /// The MD5 at the end is not the digest of the protobuf bytes.
    #[error("starts with the aggregation magic bytes but its MD5 digest does not match")]
    Digest,
    /// The digest matches but the protobuf does not decode.
    #[error("aggregated record's protobuf does not decode: {0}")]
    Protobuf(String),
    /// A user record names a key-table entry that is not there.
    #[error("user record {sub_sequence_number}: {table} index {index} is outside the table of {len}")]
    KeyIndex {
        /// The user record.
        sub_sequence_number: u64,
        /// `partition_key_table` or `explicit_hash_key_table`.
        table: &'static str,
        /// The index it gave.
        index: u64,
        /// The table's length.
        len: usize,
    },
}

/// Whether `data` starts like an aggregated record (the magic bytes only; [`deaggregate`] checks
/// the rest).
pub fn has_magic(data: &[u8]) -> bool {
    data.starts_with(&MAGIC)
}

/// The user records packed in one Kinesis record.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    inner: proto::AggregatedRecord,
}

/// One user record of an [`Aggregate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserRecord<'a> {
    /// Its position in the aggregate: 0, 1, ... (the KCL's sub-sequence number).
    pub sub_sequence_number: u64,
    /// Its own partition key.
    pub partition_key: &'a str,
    /// Its explicit hash key, if the producer gave one.
    pub explicit_hash_key: Option<&'a str>,
    /// Its data.
    pub data: &'a [u8],
}

impl Aggregate {
    /// How many user records it holds.
    pub fn len(&self) -> usize {
        self.inner.records.len()
    }

    /// Whether it holds none (the reference deaggregators then yield nothing for the record).
    pub fn is_empty(&self) -> bool {
        self.inner.records.is_empty()
    }

    /// The user records, in order.
    pub fn records(&self) -> impl ExactSizeIterator<Item = UserRecord<'_>> + '_ {
        let (keys, hash_keys) = (&self.inner.partition_key_table, &self.inner.explicit_hash_key_table);
        self.inner.records.iter().enumerate().map(move |(i, r)| UserRecord {
            sub_sequence_number: i as u64,
            // Indexes were checked by `deaggregate`.
            partition_key: keys.get(r.partition_key_index as usize).map_or("", |k| text(k)),
            explicit_hash_key: r.explicit_hash_key_index.and_then(|i| hash_keys.get(i as usize)).map(|k| text(k)),
            data: &r.data,
        })
    }
}

/// A key of a table `deaggregate` checked as UTF-8.
fn text(key: &[u8]) -> &str {
    std::str::from_utf8(key).unwrap_or_default()
}

/// Unpacks an aggregated record's data (the Kinesis record's data, base64 already undone).
///
/// ```
/// use pushpull::aggregation::{deaggregate, NotAggregated, MAGIC};
/// assert_eq!(deaggregate(b"plain"), Err(NotAggregated::NoMagic));
/// let mut forged = MAGIC.to_vec();
/// forged.extend_from_slice(&[0; 20]);
/// assert_eq!(deaggregate(&forged), Err(NotAggregated::Digest));
/// ```
pub fn deaggregate(data: &[u8]) -> Result<Aggregate, NotAggregated> {
    if !has_magic(data) {
        return Err(NotAggregated::NoMagic);
    }
    // As the reference deaggregators: the protobuf part must be at least one byte.
    if data.len() <= MAGIC.len() + DIGEST_LEN {
        return Err(NotAggregated::TooShort { len: data.len() });
    }
    let (message, digest) = data[MAGIC.len()..].split_at(data.len() - MAGIC.len() - DIGEST_LEN);
    if Md5::digest(message)[..] != *digest {
        return Err(NotAggregated::Digest);
    }
    // Decoded from `Bytes`, every user record's data and key is a view of this one copy.
    let inner = proto::AggregatedRecord::decode(Bytes::copy_from_slice(message))
        .map_err(|e| NotAggregated::Protobuf(e.to_string()))?;
    for (table, keys) in [
        ("partition_key_table", &inner.partition_key_table),
        ("explicit_hash_key_table", &inner.explicit_hash_key_table),
    ] {
        if let Some(index) = keys.iter().position(|k| std::str::from_utf8(k).is_err()) {
            return Err(NotAggregated::Protobuf(format!("{table}[{index}] is not UTF-8")));
        }
    }
    for (i, r) in inner.records.iter().enumerate() {
        let check = |table, index: u64, len: usize| {
            if index as usize >= len || index > usize::MAX as u64 {
                Err(NotAggregated::KeyIndex { sub_sequence_number: i as u64, table, index, len })
            } else {
                Ok(())
            }
        };
        check("partition_key_table", r.partition_key_index, inner.partition_key_table.len())?;
        if let Some(index) = r.explicit_hash_key_index {
            check("explicit_hash_key_table", index, inner.explicit_hash_key_table.len())?;
        }
    }
    Ok(Aggregate { inner })
}

/// A user record too large to be aggregated even alone under the aggregator's limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a user record of {size} bytes does not fit in an aggregated record of at most {max_bytes} bytes")]
pub struct TooLarge {
    /// The size the aggregate would have had with this record alone.
    pub size: usize,
    /// The aggregator's limit.
    pub max_bytes: usize,
}

/// What [`Aggregator::add`] could not do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddError {
    /// The aggregate is full: [`Aggregator::finish`] it and add the record to the next.
    #[error("the aggregated record is full")]
    Full,
    /// The record would not fit even in an empty aggregate: send it as a plain record.
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
}

/// A finished aggregated record, ready for PutRecords.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// The partition key to put it with: its first user record's. Records are aggregated only
    /// with records bound for the same shard (the shard map of `pushpull::sink::ShardMap`), so the whole
    /// aggregate lands where each of its keys maps, as the KPL arranges it.
    pub partition_key: String,
    /// Magic bytes, protobuf, MD5.
    pub data: Bytes,
    /// How many user records it holds.
    pub user_records: usize,
}

/// Packs user records into one aggregated record of at most `max_bytes` (data and partition key,
/// as Kinesis counts a record).
///
/// Each user record is encoded (by prost) and fed to the MD5 as it is added, while its bytes are
/// in cache, and the key tables follow the records at [`Aggregator::finish`]: protobuf fields may
/// come in any order, and every reader (the KCL, `aws-kinesis-agg`, [`deaggregate`]) parses them
/// so. The data is written once and read once.
#[derive(Debug, Clone)]
pub struct Aggregator {
    max_bytes: usize,
    /// Magic bytes, then the encoded `records` entries so far.
    body: BytesMut,
    /// The MD5 of the protobuf bytes in `body` so far.
    digest: Md5,
    records: usize,
    keys: Vec<String>,
    hash_keys: Vec<String>,
    key_index: HashMap<String, u64, Xxh3DefaultBuilder>,
    hash_key_index: HashMap<String, u64, Xxh3DefaultBuilder>,
    /// The encoded length of the whole protobuf message (records and tables), kept as records
    /// are added.
    proto_len: usize,
}

impl Aggregator {
    /// An empty aggregator; `max_bytes` is capped at [`MAX_RECORD_BYTES`].
    pub fn new(max_bytes: usize) -> Self {
        let max_bytes = max_bytes.min(MAX_RECORD_BYTES);
        let mut body = BytesMut::new();
        body.put_slice(&MAGIC);
        Aggregator {
            max_bytes,
            body,
            digest: Md5::new(),
            records: 0,
            keys: Vec::new(),
            hash_keys: Vec::new(),
            key_index: HashMap::default(),
            hash_key_index: HashMap::default(),
            proto_len: 0,
        }
    }

    /// The limit this aggregator packs to.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// User records held.
    pub fn len(&self) -> usize {
        self.records
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// The size the finished record would have now: magic, protobuf, digest and its partition
    /// key, which Kinesis counts against the record's limit.
    pub fn size(&self) -> usize {
        let key = self.keys.first().map_or(0, String::len);
        MAGIC.len() + self.proto_len + DIGEST_LEN + key
    }

    /// Adds a user record; [`AddError::Full`] if it would take the aggregate past its limit.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use pushpull::aggregation::{AddError, Aggregator};
    /// let mut agg = Aggregator::new(100);
    /// agg.add("k", None, Bytes::from(vec![b'x'; 40])).unwrap();
    /// assert_eq!(agg.add("k", None, Bytes::from(vec![b'x'; 40])), Err(AddError::Full));
    /// assert!(matches!(Aggregator::new(100).add("k", None, Bytes::from(vec![b'x'; 100])), Err(AddError::TooLarge(_))));
    /// ```
    pub fn add(&mut self, partition_key: &str, explicit_hash_key: Option<&str>, data: Bytes) -> Result<(), AddError> {
        use prost::encoding::{message, string};
        let (key_index, new_key) = match self.key_index.get(partition_key) {
            Some(&i) => (i, false),
            None => (self.keys.len() as u64, true),
        };
        let hash_key = explicit_hash_key.map(|k| match self.hash_key_index.get(k) {
            Some(&i) => (i, false),
            None => (self.hash_keys.len() as u64, true),
        });
        let record = proto::Record {
            partition_key_index: key_index,
            explicit_hash_key_index: hash_key.map(|h| h.0),
            data,
            tags: Vec::new(),
        };
        let added = message::encoded_len(3, &record)
            + if new_key { string::encoded_len(1, &partition_key.to_owned()) } else { 0 }
            + match (explicit_hash_key, hash_key) {
                (Some(k), Some((_, true))) => string::encoded_len(2, &k.to_owned()),
                _ => 0,
            };
        let first_key = if self.is_empty() { partition_key.len() } else { 0 };
        if self.size() + added + first_key > self.max_bytes {
            if self.is_empty() {
                return Err(TooLarge { size: self.size() + added + first_key, max_bytes: self.max_bytes }.into());
            }
            return Err(AddError::Full);
        }
        if new_key {
            self.key_index.insert(partition_key.to_owned(), key_index);
            self.keys.push(partition_key.to_owned());
        }
        if let (Some(k), Some((i, true))) = (explicit_hash_key, hash_key) {
            self.hash_key_index.insert(k.to_owned(), i);
            self.hash_keys.push(k.to_owned());
        }
        let start = self.body.len();
        message::encode(3, &record, &mut self.body);
        self.digest.update(&self.body[start..]);
        self.records += 1;
        self.proto_len += added;
        Ok(())
    }

    /// The aggregated record of everything added since the last `finish`, and an empty
    /// aggregator; `None` if nothing was added.
    pub fn finish(&mut self) -> Option<Finished> {
        use prost::encoding::string;
        if self.is_empty() {
            return None;
        }
        let mut fresh = Aggregator::new(self.max_bytes);
        // The next aggregate's buffer starts at the size this one reached.
        fresh.body.reserve(self.body.len());
        let done = std::mem::replace(self, fresh);
        let Aggregator { mut body, mut digest, records, keys, hash_keys, .. } = done;
        let tables = body.len();
        for k in &keys {
            string::encode(1, k, &mut body);
        }
        for k in &hash_keys {
            string::encode(2, k, &mut body);
        }
        digest.update(&body[tables..]);
        body.put_slice(&digest.finalize());
        Some(Finished {
            partition_key: keys.into_iter().next().unwrap_or_default(),
            data: body.freeze(),
            user_records: records,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_size_it_predicts_is_the_size_it_makes() {
        let mut agg = Aggregator::new(MAX_RECORD_BYTES);
        for i in 0..300u32 {
            let key = format!("user-{}", i % 17);
            let hash_key = (i % 5 == 0).then(|| format!("{}", u128::from(i) << 100));
            agg.add(&key, hash_key.as_deref(), Bytes::from(vec![b'x'; (i % 90) as usize])).unwrap();
        }
        let predicted = agg.size();
        let done = agg.finish().unwrap();
        assert_eq!(predicted, done.data.len() + done.partition_key.len());
        assert!(agg.is_empty() && agg.size() == MAGIC.len() + DIGEST_LEN);
    }

    #[test]
    fn a_corrupted_aggregate_is_named_and_passed_through() {
        let mut agg = Aggregator::new(1000);
        agg.add("k", None, Bytes::from_static(b"abc")).unwrap();
        let good = agg.finish().unwrap().data;
        let mut flipped = good.to_vec();
        flipped[6] ^= 1;
        assert_eq!(deaggregate(&flipped), Err(NotAggregated::Digest));
        assert_eq!(deaggregate(&good[..20]), Err(NotAggregated::TooShort { len: 20 }));
        // A valid digest over a protobuf that points past its key table.
        let bad = proto::AggregatedRecord {
            partition_key_table: vec![Bytes::from_static(b"k")],
            explicit_hash_key_table: vec![],
            records: vec![proto::Record { partition_key_index: 3, data: Bytes::new(), ..Default::default() }],
        };
        let mut data = MAGIC.to_vec();
        let body = bad.encode_to_vec();
        data.extend_from_slice(&body);
        data.extend_from_slice(&Md5::digest(&body));
        assert!(matches!(deaggregate(&data), Err(NotAggregated::KeyIndex { index: 3, len: 1, .. })));
        let mut garbage = MAGIC.to_vec();
        garbage.extend_from_slice(&[0xff; 3]);
        garbage.extend_from_slice(&Md5::digest([0xff; 3]));
        assert!(matches!(deaggregate(&garbage), Err(NotAggregated::Protobuf(_))));
        // A key that is not UTF-8: a proto2 `string` must be, as prost's own decoding requires.
        for (keys, hash_keys) in [
            (vec![Bytes::from_static(b"\xff")], vec![]),
            (vec![Bytes::from_static(b"k")], vec![Bytes::from_static(b"\xc3")]),
        ] {
            let bad = proto::AggregatedRecord {
                partition_key_table: keys,
                explicit_hash_key_table: hash_keys,
                records: vec![proto::Record { partition_key_index: 0, data: Bytes::new(), ..Default::default() }],
            };
            let body = bad.encode_to_vec();
            let mut data = MAGIC.to_vec();
            data.extend_from_slice(&body);
            data.extend_from_slice(&Md5::digest(&body));
            assert!(matches!(deaggregate(&data), Err(NotAggregated::Protobuf(m)) if m.ends_with("[0] is not UTF-8")));
        }
    }

    proptest! {
        /// Whatever is aggregated comes back in order with its keys, and the limit holds.
        #[test]
        fn round_trip(records in prop::collection::vec(("\\PC{1,12}", prop::option::of("[0-9]{1,39}"), prop::collection::vec(any::<u8>(), 0..200)), 1..60), max in 300usize..5000) {
            let mut agg = Aggregator::new(max);
            let mut out: Vec<Finished> = Vec::new();
            for (key, hash_key, data) in &records {
                match agg.add(key, hash_key.as_deref(), Bytes::from(data.clone())) {
                    Ok(()) => {}
                    Err(AddError::Full) => {
                        out.push(agg.finish().unwrap());
                        // Too large even alone: left out, as the caller sends such a record plain.
                        if let Err(e) = agg.add(key, hash_key.as_deref(), Bytes::from(data.clone())) {
                            prop_assert!(matches!(e, AddError::TooLarge(_)), "{e}");
                        }
                    }
                    Err(AddError::TooLarge(e)) => prop_assert!(e.size > max),
                }
            }
            out.extend(agg.finish());
            let mut back = Vec::new();
            for f in &out {
                prop_assert!(f.data.len() + f.partition_key.len() <= max);
                let a = deaggregate(&f.data).unwrap();
                prop_assert_eq!(a.len(), f.user_records);
                prop_assert_eq!(a.records().next().unwrap().partition_key, f.partition_key.as_str());
                for (i, r) in a.records().enumerate() {
                    prop_assert_eq!(r.sub_sequence_number, i as u64);
                    back.push((r.partition_key.to_owned(), r.explicit_hash_key.map(str::to_owned), r.data.to_vec()));
                }
            }
            let fitting: Vec<_> = records.iter().filter(|(k, h, d)| {
                let mut lone = Aggregator::new(max);
                lone.add(k, h.as_deref(), Bytes::from(d.clone())).is_ok()
            }).cloned().collect();
            prop_assert_eq!(back, fitting);
        }

        /// Any bytes after the magic: an aggregate or a reason, never a panic.
        #[test]
        fn any_bytes_deaggregate_or_are_refused(tail in prop::collection::vec(any::<u8>(), 0..200), fix_digest in any::<bool>()) {
            let mut data = MAGIC.to_vec();
            data.extend_from_slice(&tail);
            if fix_digest {
                data.extend_from_slice(&Md5::digest(&tail));
            }
            if let Ok(a) = deaggregate(&data) {
                for r in a.records() {
                    prop_assert!(r.data.len() <= data.len());
                }
            }
        }
    }
}
