//! The AWS-realism layer: the limits and misbehaviours of AWS that LocalStack does not have,
//! applied in front of it so that the local world is no kinder than the one users deploy to.
//!
//! - [`proxy::RealismProxy`]: an HTTP proxy on 127.0.0.1 in front of LocalStack that any client
//!   reaches through `AWS_ENDPOINT_URL`. It applies Kinesis's per-shard limits ([`kinesis`]),
//!   S3's `SlowDown` and bodies cut part-way, and checks each function's calls against its role
//!   in the template ([`iam`]).
//! - [`kafka::KafkaFaultProxy`]: a TCP proxy in front of a Kafka broker for the Kafka mapping's
//!   connections (slow and cut fetches, broker restarts), and a stranger joining its consumer group
//!   mid-run ([`kafka::join_and_leave`]).
//! - The local Invoke API ([`crate::invoke`]) answers `429 TooManyRequestsException` at a rate and
//!   past a concurrency limit per function; the S3 event delivery ([`crate::async_invoke`])
//!   duplicates events and delivers them out of order; the pipeline splits a shard mid-run.
//!
//! Everything random is drawn from one seed, one generator per kind of fault, so a run with the
//! same seed makes the same decisions in the same order for each kind (what happens between
//! kinds still depends on timing). Every injected fault is counted by kind ([`FaultTable`]).
//!
//! ```
//! use pushpull_emulator::realism::{Profile, Realism, RealismConfig};
//! let r = Realism::new(RealismConfig::new(Profile::Storm, 7));
//! let a: Vec<bool> = (0..20).map(|_| r.fire("s3.event.duplicated", 0.5)).collect();
//! let again = Realism::new(RealismConfig::new(Profile::Storm, 7));
//! let b: Vec<bool> = (0..20).map(|_| again.fire("s3.event.duplicated", 0.5)).collect();
//! assert_eq!(a, b); // the same seed, the same decisions
//! assert_eq!(r.faults().get("s3.event.duplicated"), a.iter().filter(|x| **x).count() as u64);
//! ```
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

pub mod fanout;
pub mod iam;
pub mod kafka;
pub mod kinesis;
pub mod proxy;

/// How unkind the local world is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    /// LocalStack as it is: no limits, no faults.
    #[default]
    Off,
    /// AWS's documented limits and the template's IAM roles; no random faults.
    Aws,
    /// The limits plus every fault, at rates that make each happen many times in a run.
    Storm,
}

impl FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "off" | "" => Ok(Profile::Off),
            "aws" => Ok(Profile::Aws),
            "storm" => Ok(Profile::Storm),
            other => Err(format!("realism profile {other:?}: one of aws, storm, off")),
        }
    }
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Profile::Off => "off",
            Profile::Aws => "aws",
            Profile::Storm => "storm",
        })
    }
}

/// Kinesis's per-shard limits (AWS: "Kinesis Data Streams quotas and limits").
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Writes: bytes (data plus partition key) a shard takes per second: 1 MiB.
    pub put_bytes_per_s: f64,
    /// Writes: records a shard takes per second: 1,000.
    pub put_records_per_s: f64,
    /// Reads: GetRecords calls per shard per second: 5.
    pub get_calls_per_s: f64,
    /// Reads: bytes per shard per second: 2 MiB (a bigger read is paid for by the calls after it).
    pub get_bytes_per_s: f64,
    /// GetShardIterator calls per shard per second: 5.
    pub iterator_calls_per_s: f64,
    /// A shard iterator is valid for this long after it is issued: 5 minutes.
    pub iterator_ttl: Duration,
    /// Records one GetRecords call returns at most: 10,000.
    pub max_records_per_get: usize,
    /// Bytes one GetRecords call returns at most: 10 MiB.
    pub max_bytes_per_get: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            put_bytes_per_s: 1024.0 * 1024.0,
            put_records_per_s: 1000.0,
            get_calls_per_s: 5.0,
            get_bytes_per_s: 2.0 * 1024.0 * 1024.0,
            iterator_calls_per_s: 5.0,
            iterator_ttl: Duration::from_secs(300),
            max_records_per_get: 10_000,
            max_bytes_per_get: 10 * 1024 * 1024,
        }
    }
}

/// The rates (0 to 1) of the random faults: each is the chance per call or per event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rates {
    /// GetRecords answers an empty page (`MillisBehindLatest` > 0) where records exist.
    pub empty_page: f64,
    /// GetRecords answers `ExpiredIteratorException` for an iterator younger than its TTL (as if
    /// the reader had paused for 5 minutes).
    pub expired_iterator: f64,
    /// GetObject answers `503 SlowDown`.
    pub s3_slow_down: f64,
    /// GetObject's body is cut part-way (the connection drops).
    pub s3_cut_body: f64,
    /// An S3 event is delivered twice.
    pub s3_duplicate: f64,
    /// An S3 event is held back and delivered after later ones.
    pub s3_reorder: f64,
    /// The Invoke API answers `429 TooManyRequestsException`.
    pub lambda_throttle: f64,
    /// An enhanced fan-out subscription's connection is cut (per event it would send).
    pub subscription_cut: f64,
    /// A Kafka Fetch answer is held back 0.2-1 s ([`kafka::KafkaFaultProxy`]).
    pub kafka_fetch_slowed: f64,
    /// A Kafka connection is cut half-way through a Fetch answer.
    pub kafka_fetch_cut: f64,
    /// SQS `ReceiveMessage` answers 500 `InternalError`.
    pub sqs_receive_error: f64,
    /// A message SQS hands out is made visible again at once: delivered twice (per message).
    pub sqs_duplicate: f64,
}

/// One realism setting: a profile, its seed, and what the profile turns on.
#[derive(Debug, Clone, PartialEq)]
pub struct RealismConfig {
    /// The profile it was made from.
    pub profile: Profile,
    /// The seed of every random decision.
    pub seed: u64,
    /// Kinesis's limits (none: unlimited).
    pub limits: Option<Limits>,
    /// Check each function's calls against its role in the template.
    pub iam: bool,
    /// Random faults.
    pub rates: Rates,
    /// Split a shard of the stream this long after the run starts, and merge two adjacent ones
    /// half as long after that (none: never).
    pub reshard_after: Option<Duration>,
    /// Concurrent invocations per function before the Invoke API answers 429 (none: queue).
    pub function_concurrency: Option<usize>,
    /// How long an enhanced fan-out subscription lasts before the subscriber must call
    /// `SubscribeToShard` again: AWS's 5 minutes (shorter in tests).
    pub subscription_lifetime: Duration,
    /// On a Kafka run, every other time this passes (none: never) the broker restarts (every
    /// connection closed, new ones closed at once for 2 s), and this long after the previous one left a stranger
    /// joins the mapping's consumer group for 3 s and leaves (two rebalances) ([`kafka`]).
    pub kafka_disruption_every: Option<Duration>,
    /// RabbitMQ: this often the broker closes every connection (the mapping's and the push
    /// function's: `rabbitmq.connections.closed`), and with [`RealismConfig::rabbitmq_restarts`]
    /// every other time it restarts instead (`rabbitmq.broker.restart`).
    pub rabbitmq_disruption_every: Option<Duration>,
    /// Whether RabbitMQ's disruptions include restarts.
    pub rabbitmq_restarts: bool,
}

impl RealismConfig {
    /// The settings of `profile`, drawn from `seed`.
    pub fn new(profile: Profile, seed: u64) -> Self {
        let off = RealismConfig {
            profile,
            seed,
            limits: None,
            iam: false,
            rates: Rates::default(),
            reshard_after: None,
            function_concurrency: None,
            subscription_lifetime: Duration::from_secs(300),
            kafka_disruption_every: None,
            rabbitmq_disruption_every: None,
            rabbitmq_restarts: false,
        };
        match profile {
            Profile::Off => off,
            Profile::Aws => {
                // A broker's connections are closed now and then (maintenance, a network blip); a
                // restart is a storm's.
                RealismConfig {
                    limits: Some(Limits::default()),
                    iam: true,
                    function_concurrency: Some(10),
                    rabbitmq_disruption_every: Some(Duration::from_secs(20)),
                    // SQS now and then fails a receive and hands a message out twice.
                    rates: Rates { sqs_receive_error: 0.01, sqs_duplicate: 0.002, ..Rates::default() },
                    ..off
                }
            }
            Profile::Storm => RealismConfig {
                limits: Some(Limits::default()),
                iam: true,
                function_concurrency: Some(10),
                rates: Rates {
                    empty_page: 0.15,
                    expired_iterator: 0.03,
                    s3_slow_down: 0.1,
                    s3_cut_body: 0.1,
                    s3_duplicate: 0.3,
                    s3_reorder: 0.3,
                    lambda_throttle: 0.05,
                    subscription_cut: 0.05,
                    kafka_fetch_slowed: 0.3,
                    kafka_fetch_cut: 0.1,
                    sqs_receive_error: 0.1,
                    sqs_duplicate: 0.05,
                },
                reshard_after: Some(Duration::from_secs(4)),
                kafka_disruption_every: Some(Duration::from_secs(4)),
                rabbitmq_disruption_every: Some(Duration::from_secs(4)),
                rabbitmq_restarts: true,
                ..off
            },
        }
    }

    /// Whether anything is on.
    pub fn is_on(&self) -> bool {
        self.profile != Profile::Off
    }
}

/// The realism of one run: its settings, its dice and its count of what was injected.
#[derive(Debug)]
pub struct Realism {
    config: RealismConfig,
    dice: Mutex<HashMap<&'static str, fastrand::Rng>>,
    faults: Mutex<BTreeMap<&'static str, u64>>,
}

impl Realism {
    /// A realism layer with `config`.
    pub fn new(config: RealismConfig) -> Self {
        Realism { config, dice: Mutex::new(HashMap::new()), faults: Mutex::new(BTreeMap::new()) }
    }

    /// Its settings.
    pub fn config(&self) -> &RealismConfig {
        &self.config
    }

    /// A number in `0..1` from the generator of `kind` (seeded by the seed and the kind's name).
    pub fn draw(&self, kind: &'static str) -> f64 {
        let mut dice = self.dice.lock().unwrap_or_else(|p| p.into_inner());
        let seed = self.config.seed ^ xxhash_rust::xxh3::xxh3_64(kind.as_bytes());
        dice.entry(kind).or_insert_with(|| fastrand::Rng::with_seed(seed)).f64()
    }

    /// Rolls `kind`'s die: true (and counted as injected) with probability `rate`.
    pub fn fire(&self, kind: &'static str, rate: f64) -> bool {
        if rate <= 0.0 {
            return false;
        }
        let hit = self.draw(kind) < rate;
        if hit {
            self.count(kind, 1);
        }
        hit
    }

    /// Counts `n` injected faults of `kind` (limits enforced count here too).
    pub fn count(&self, kind: &'static str, n: u64) {
        if n > 0 {
            *self.faults.lock().unwrap_or_else(|p| p.into_inner()).entry(kind).or_default() += n;
            crate::cloudwatch::put(
                crate::cloudwatch::REALISM,
                &[("Fault", kind)],
                &[("InjectedFaults", "Count", n as f64)],
            );
        }
    }

    /// What was injected so far.
    pub fn faults(&self) -> FaultTable {
        FaultTable {
            profile: self.config.profile,
            seed: self.config.seed,
            counts: self.faults.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

/// What a run injected, by kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultTable {
    /// The profile.
    pub profile: Profile,
    /// The seed.
    pub seed: u64,
    /// Count per kind.
    pub counts: BTreeMap<&'static str, u64>,
}

impl FaultTable {
    /// The count of `kind` (0 if none).
    pub fn get(&self, kind: &str) -> u64 {
        self.counts.get(kind).copied().unwrap_or(0)
    }

    /// Every count added up.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }
}

/// What each kind means, for the table.
pub fn describe(kind: &str) -> &'static str {
    match kind {
        "kinesis.put.throttled_entries" => "PutRecords entries failed: shard over 1 MiB/s or 1,000 records/s",
        "kinesis.put_record.throttled" => "PutRecord calls failed: shard over its write limit",
        "kinesis.get.throttled" => "GetRecords calls failed: shard over 5 calls/s or 2 MiB/s",
        "kinesis.get.empty_page" => "GetRecords pages answered empty before records that exist",
        "kinesis.get.expired_iterator" => "GetRecords calls answered ExpiredIteratorException",
        "kinesis.get.truncated" => "GetRecords pages cut to 10,000 records or 10 MiB",
        "kinesis.iterator.throttled" => "GetShardIterator calls failed: shard over 5 calls/s",
        "kinesis.reshard" => "shards split or merged mid-run",
        "s3.get.slow_down" => "GetObject answered 503 SlowDown",
        "s3.get.cut_body" => "GetObject bodies cut part-way",
        "s3.event.duplicated" => "S3 events delivered twice",
        "s3.event.reordered" => "S3 events held back and delivered late",
        "lambda.invoke.throttled" => "Invoke answered 429 (rate)",
        "lambda.invoke.concurrency" => "Invoke answered 429 (concurrency limit)",
        "iam.denied" => "calls denied by the function's role",
        "kinesis.subscription.cut" => "enhanced fan-out subscriptions cut mid-stream",
        "kafka.fetch.slowed" => "Kafka Fetch answers held back 0.2-1 s",
        "kafka.fetch.cut" => "Kafka connections cut half-way through a Fetch answer",
        "kafka.broker.restart" => "Kafka broker restarts (connections closed, new ones for 2 s)",
        "kafka.group.rebalance" => "consumer group rebalances (a stranger joined or left)",
        "sqs.receive.error" => "SQS ReceiveMessage answered 500 InternalError",
        "sqs.message.duplicated" => "SQS messages delivered twice (made visible again at once)",
        _ => "",
    }
}

impl std::fmt::Display for FaultTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "  realism          profile {}, seed {}: {} injected", self.profile, self.seed, self.total())?;
        for (kind, n) in &self.counts {
            writeln!(f, "    {kind:<30} {n:>8}  {}", describe(kind))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse_and_differ() {
        assert_eq!("AWS".parse::<Profile>(), Ok(Profile::Aws));
        assert!("stormy".parse::<Profile>().is_err());
        let aws = RealismConfig::new(Profile::Aws, 1);
        assert!(aws.limits.is_some() && aws.iam && aws.reshard_after.is_none());
        // AWS's own faults only: SQS's at-least-once delivery and its occasional 500s.
        let sqs_only = Rates {
            sqs_receive_error: aws.rates.sqs_receive_error,
            sqs_duplicate: aws.rates.sqs_duplicate,
            ..Rates::default()
        };
        assert!(aws.rates == sqs_only && aws.rates.sqs_duplicate > 0.0);
        let storm = RealismConfig::new(Profile::Storm, 1);
        assert!(storm.rates.empty_page > 0.0 && storm.reshard_after.is_some());
        assert!(!RealismConfig::new(Profile::Off, 1).is_on());
    }

    #[test]
    fn kinds_draw_from_their_own_generators() {
        let r = Realism::new(RealismConfig::new(Profile::Storm, 3));
        let a: Vec<f64> = (0..5).map(|_| r.draw("a")).collect();
        let r2 = Realism::new(RealismConfig::new(Profile::Storm, 3));
        // Interleaving another kind does not change a's sequence.
        let b: Vec<f64> = (0..5)
            .map(|_| {
                r2.draw("b");
                r2.draw("a")
            })
            .collect();
        assert_eq!(a, b);
        let other_seed = Realism::new(RealismConfig::new(Profile::Storm, 4));
        assert_ne!(a[0], other_seed.draw("a"));
        assert!(!r.fire("a", 0.0));
    }
}
