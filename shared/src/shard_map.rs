//! Which shard a partition key maps to, as Kinesis maps it (feature `aggregation`).
//!
//! AWS: "An MD5 hash function is used to map partition keys to 128-bit integer values and to map
//! associated data records to shards" (Kinesis API reference, PutRecords); each open shard owns
//! a range of those integers (`HashKeyRange` in ListShards). The KPL predicts each user record's
//! shard this way and aggregates only records bound for the same shard, so that an aggregate put
//! with its first record's partition key lands on the shard of every key in it.
use md5::{Digest, Md5};

/// The 128-bit hash key Kinesis derives from a partition key: its MD5, read big-endian.
pub fn hash_key(partition_key: &str) -> u128 {
    u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into())
}

/// An open shard, by its position in a [`ShardMap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardIndex(pub usize);

/// The open shards of a stream and the hash-key range each owns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardMap {
    /// (shard id, first hash key, last hash key), sorted by first hash key.
    shards: Vec<(String, u128, u128)>,
}

impl ShardMap {
    /// A map from (shard id, starting hash key, ending hash key) of each open shard, both ends
    /// inclusive as ListShards gives them.
    pub fn new(mut shards: Vec<(String, u128, u128)>) -> Self {
        shards.sort_by_key(|s| s.1);
        ShardMap { shards }
    }

    /// Whether the map has no shard.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// The shard that owns `partition_key`'s hash key; `None` if no shard's range holds it (a
    /// map read in the middle of a reshard).
    pub fn shard_of(&self, partition_key: &str) -> Option<ShardIndex> {
        self.shard_of_hash(hash_key(partition_key))
    }

    /// The shard that owns a hash key (an explicit hash key, for example).
    pub fn shard_of_hash(&self, hash: u128) -> Option<ShardIndex> {
        let i = self.shards.partition_point(|s| s.1 <= hash).checked_sub(1)?;
        (hash <= self.shards[i].2).then_some(ShardIndex(i))
    }

    /// The id of a shard of this map.
    pub fn shard_id(&self, shard: ShardIndex) -> &str {
        self.shards.get(shard.0).map_or("", |s| s.0.as_str())
    }

    /// How many shards the map has.
    pub fn len(&self) -> usize {
        self.shards.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_maps_to_the_shard_whose_range_holds_its_hash() {
        let map = ShardMap::new(vec![
            ("shardId-000000000000".into(), 0, u128::MAX / 2),
            ("shardId-000000000001".into(), u128::MAX / 2 + 1, u128::MAX),
        ]);
        let shard = map.shard_of("user-1").unwrap();
        assert_eq!(shard.0 == 0, hash_key("user-1") <= u128::MAX / 2);
        assert_eq!(map.shard_id(shard), if shard.0 == 0 { "shardId-000000000000" } else { "shardId-000000000001" });
    }

    #[test]
    fn hash_keys_are_the_md5_of_the_key_as_kinesis_computes_it() {
        // MD5("a") = 0cc175b9c0f1b6a831c399e269772661.
        assert_eq!(hash_key("a"), 0x0cc175b9c0f1b6a831c399e269772661);
    }

    #[test]
    fn every_hash_finds_its_shard_and_gaps_find_none() {
        let map = ShardMap::new(vec![("b".into(), 100, 199), ("a".into(), 0, 99), ("c".into(), 300, u128::MAX)]);
        assert_eq!(map.shard_of_hash(0).map(|s| map.shard_id(s)), Some("a"));
        assert_eq!(map.shard_of_hash(99).map(|s| map.shard_id(s)), Some("a"));
        assert_eq!(map.shard_of_hash(100).map(|s| map.shard_id(s)), Some("b"));
        assert_eq!(map.shard_of_hash(250), None);
        assert_eq!(map.shard_of_hash(u128::MAX).map(|s| map.shard_id(s)), Some("c"));
        assert_eq!(ShardMap::default().shard_of("k"), None);
    }
}
