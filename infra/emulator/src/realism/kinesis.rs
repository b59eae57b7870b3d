//! Kinesis's per-shard limits as pure logic (the clock is passed in): token buckets per shard for
//! writes (1 MiB/s, 1,000 records/s), reads (5 calls/s, 2 MiB/s) and GetShardIterator (5
//! calls/s); which shard a partition key maps to; and the proxy's own shard iterators, which
//! expire as AWS's do.
//!
//! AWS, "Quotas and limits" (Kinesis Data Streams developer guide): "Each shard can support up to
//! 1,000 records per second for writes, up to a maximum total data write rate of 1 MB per second
//! (including partition keys)"; "each shard can support up to five read transactions per second
//! ... up to a maximum total data read rate of 2 MB per second"; GetRecords "can retrieve up to
//! 10 MB of data per call from a single shard, and up to 10,000 records per call" and "If a call
//! returns 10 MB, subsequent calls made within the next 5 seconds throw an exception"
//! (`ProvisionedThroughputExceededException`). GetShardIterator (API reference): "A shard iterator
//! expires 5 minutes after it is returned to the requester" and "GetShardIterator has a limit of
//! five transactions per second per account per open shard".
use std::collections::HashMap;
use std::time::Instant;

use md5::{Digest, Md5};

use super::Limits;

/// A token bucket: `rate` tokens a second, at most `cap`. Reads may overdraw it (a 10 MiB read
/// leaves a debt that the next seconds pay back).
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    rate: f64,
    cap: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: f64, now: Instant) -> Self {
        Bucket { tokens: rate, rate, cap: rate, last: now }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.cap);
        self.last = self.last.max(now);
    }

    /// Takes `n` tokens if there are that many.
    pub fn try_take(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is not in debt.
    pub fn solvent(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens > 0.0
    }

    /// Takes `n` tokens, going into debt if needed.
    pub fn charge(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.tokens -= n;
    }
}

#[derive(Debug)]
struct ShardBuckets {
    put_bytes: Bucket,
    put_records: Bucket,
    get_calls: Bucket,
    get_bytes: Bucket,
    iterator_calls: Bucket,
}

/// The limits of every shard seen, by `stream/shard`.
#[derive(Debug)]
pub struct ShardLimits {
    limits: Limits,
    shards: HashMap<String, ShardBuckets>,
}

impl ShardLimits {
    /// Limits as given.
    pub fn new(limits: Limits) -> Self {
        ShardLimits { limits, shards: HashMap::new() }
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn shard(&mut self, stream: &str, shard: &str, now: Instant) -> &mut ShardBuckets {
        let l = &self.limits;
        self.shards.entry(format!("{stream}/{shard}")).or_insert_with(|| ShardBuckets {
            put_bytes: Bucket::new(l.put_bytes_per_s, now),
            put_records: Bucket::new(l.put_records_per_s, now),
            get_calls: Bucket::new(l.get_calls_per_s, now),
            get_bytes: Bucket::new(l.get_bytes_per_s, now),
            iterator_calls: Bucket::new(l.iterator_calls_per_s, now),
        })
    }

    /// Admits one record of `bytes` (data plus partition key) into the shard, or not.
    pub fn admit_put(&mut self, stream: &str, shard: &str, bytes: usize, now: Instant) -> bool {
        let s = self.shard(stream, shard, now);
        // Check both before taking either, so that a refused record costs nothing.
        s.put_bytes.refill(now);
        s.put_records.refill(now);
        if s.put_bytes.tokens >= bytes as f64 && s.put_records.tokens >= 1.0 {
            s.put_bytes.tokens -= bytes as f64;
            s.put_records.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Admits a GetRecords call on the shard: a call is left this second and the bytes read
    /// before are paid for.
    pub fn admit_get(&mut self, stream: &str, shard: &str, now: Instant) -> bool {
        let s = self.shard(stream, shard, now);
        s.get_bytes.solvent(now) && s.get_calls.try_take(1.0, now)
    }

    /// Charges the bytes a GetRecords call returned.
    pub fn charge_get(&mut self, stream: &str, shard: &str, bytes: usize, now: Instant) {
        self.shard(stream, shard, now).get_bytes.charge(bytes as f64, now);
    }

    /// Admits a GetShardIterator call on the shard.
    pub fn admit_iterator(&mut self, stream: &str, shard: &str, now: Instant) -> bool {
        self.shard(stream, shard, now).iterator_calls.try_take(1.0, now)
    }
}

/// The hash key of a partition key: its MD5 as a 128-bit unsigned integer (AWS: "Kinesis Data
/// Streams uses MD5 to map partition keys to 128-bit integer values").
pub fn hash_key(partition_key: &str) -> u128 {
    u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into())
}

/// One shard's hash key range.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardRange {
    /// Its id.
    pub shard_id: String,
    /// First hash key.
    pub start: u128,
    /// Last hash key.
    pub end: u128,
    /// Still taking writes (no ending sequence number).
    pub open: bool,
}

/// The shard a record goes to: by its explicit hash key if given, else by its partition key's,
/// among the open shards.
pub fn shard_for<'a>(shards: &'a [ShardRange], partition_key: &str, explicit: Option<&str>) -> Option<&'a str> {
    let h = explicit.and_then(|e| e.parse::<u128>().ok()).unwrap_or_else(|| hash_key(partition_key));
    shards.iter().find(|s| s.open && s.start <= h && h <= s.end).map(|s| s.shard_id.as_str())
}

/// The shards of a ListShards answer (`Shards[].HashKeyRange`).
pub fn shard_ranges(list_shards: &serde_json::Value) -> Vec<ShardRange> {
    list_shards["Shards"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            Some(ShardRange {
                shard_id: s["ShardId"].as_str()?.to_owned(),
                start: s["HashKeyRange"]["StartingHashKey"].as_str()?.parse().ok()?,
                end: s["HashKeyRange"]["EndingHashKey"].as_str()?.parse().ok()?,
                open: s["SequenceNumberRange"]["EndingSequenceNumber"].is_null(),
            })
        })
        .collect()
}

/// A shard iterator handed out by the proxy in place of LocalStack's.
#[derive(Debug, Clone, PartialEq)]
pub struct Iterator {
    /// LocalStack's iterator.
    pub real: String,
    /// The stream's name.
    pub stream: String,
    /// The shard.
    pub shard: String,
    /// When it was handed out.
    pub issued: Instant,
}

const PREFIX: &str = "pushpull-it-";

/// The proxy's iterators: each stands for LocalStack's and knows its shard and age.
#[derive(Debug, Default)]
pub struct Iterators {
    next: u64,
    live: HashMap<u64, Iterator>,
}

/// What an iterator given to GetRecords turned out to be.
#[derive(Debug, PartialEq)]
pub enum Lookup {
    /// One of ours, still valid.
    Valid(Iterator),
    /// One of ours, too old (or forgotten because it was).
    Expired {
        /// When it was issued, if still known.
        issued: Option<Instant>,
    },
    /// Not one of ours (handed out by LocalStack directly): passed through.
    Foreign,
}

impl Iterators {
    /// Hands out an iterator for `it`.
    pub fn wrap(&mut self, it: Iterator, ttl: std::time::Duration, now: Instant) -> String {
        if self.next.is_multiple_of(1024) {
            self.live.retain(|_, i| now.saturating_duration_since(i.issued) <= ttl * 2);
        }
        self.next += 1;
        self.live.insert(self.next, it);
        format!("{PREFIX}{}", self.next)
    }

    /// What `token` is.
    pub fn lookup(&self, token: &str, ttl: std::time::Duration, now: Instant) -> Lookup {
        let Some(id) = token.strip_prefix(PREFIX) else { return Lookup::Foreign };
        match id.parse::<u64>().ok().and_then(|id| self.live.get(&id)) {
            Some(i) if now.saturating_duration_since(i.issued) <= ttl => Lookup::Valid(i.clone()),
            Some(i) => Lookup::Expired { issued: Some(i.issued) },
            None => Lookup::Expired { issued: None },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn writes_past_a_shards_second_are_refused_and_come_back_as_it_refills() {
        let t0 = Instant::now();
        let mut l = ShardLimits::new(Limits::default());
        let admitted = (0..1500).filter(|_| l.admit_put("s", "shard-0", 10, t0)).count();
        assert_eq!(admitted, 1000, "1,000 records a second");
        assert!(l.admit_put("s", "shard-1", 10, t0), "another shard has its own limit");
        assert!(!l.admit_put("s", "shard-0", 10, t0 + Duration::from_millis(0)));
        let half = t0 + Duration::from_millis(500);
        assert_eq!((0..1000).filter(|_| l.admit_put("s", "shard-0", 10, half)).count(), 500);
        // Bytes: 1 MiB a second, partition key included.
        let mut l = ShardLimits::new(Limits::default());
        assert_eq!((0..10).filter(|_| l.admit_put("s", "a", 300 * 1024, t0)).count(), 3);
        // A refused record costs nothing: small ones still fit.
        assert!(l.admit_put("s", "a", 1000, t0));
    }

    #[test]
    fn reads_allow_five_calls_a_second_and_a_big_read_is_paid_for_after() {
        let t0 = Instant::now();
        let mut l = ShardLimits::new(Limits::default());
        assert_eq!((0..8).filter(|_| l.admit_get("s", "a", t0)).count(), 5);
        let t1 = t0 + Duration::from_secs(1);
        assert!(l.admit_get("s", "a", t1));
        // 10 MiB read: the shard owes 8 MiB (at 2 MiB/s: about 4 more seconds).
        l.charge_get("s", "a", 10 * 1024 * 1024, t1);
        assert!(!l.admit_get("s", "a", t1 + Duration::from_secs(3)));
        assert!(l.admit_get("s", "a", t1 + Duration::from_millis(4100)));
        assert_eq!((0..8).filter(|_| l.admit_iterator("s", "b", t0)).count(), 5);
    }

    #[test]
    fn partition_keys_map_to_shards_by_md5() {
        // MD5("a") = 0cc175b9c0f1b6a831c399e269772661
        assert_eq!(hash_key("a"), 0x0cc175b9c0f1b6a831c399e269772661);
        let half = u128::MAX / 2;
        let shards = vec![
            ShardRange { shard_id: "p".into(), start: 0, end: u128::MAX, open: false },
            ShardRange { shard_id: "lo".into(), start: 0, end: half, open: true },
            ShardRange { shard_id: "hi".into(), start: half + 1, end: u128::MAX, open: true },
        ];
        assert_eq!(shard_for(&shards, "a", None), Some("lo"));
        assert_eq!(shard_for(&shards, "a", Some(&u128::MAX.to_string())), Some("hi"));
        let listed = serde_json::json!({"Shards": [
            {"ShardId": "shardId-000000000000", "HashKeyRange": {"StartingHashKey": "0", "EndingHashKey": "340282366920938463463374607431768211455"},
             "SequenceNumberRange": {"StartingSequenceNumber": "1"}}
        ]});
        assert_eq!(shard_ranges(&listed)[0].end, u128::MAX);
        assert!(shard_ranges(&listed)[0].open);
    }

    #[test]
    fn iterators_expire_after_their_ttl() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(300);
        let mut its = Iterators::default();
        let it = Iterator { real: "r".into(), stream: "s".into(), shard: "a".into(), issued: t0 };
        let token = its.wrap(it.clone(), ttl, t0);
        assert_eq!(its.lookup(&token, ttl, t0 + Duration::from_secs(299)), Lookup::Valid(it));
        assert_eq!(its.lookup(&token, ttl, t0 + Duration::from_secs(301)), Lookup::Expired { issued: Some(t0) });
        assert_eq!(its.lookup("AAAA", ttl, t0), Lookup::Foreign);
        assert_eq!(its.lookup("pushpull-it-999", ttl, t0), Lookup::Expired { issued: None });
    }
}
