//! Configuration from environment variables, checked once at cold start.
//!
//! Every problem is collected and reported together, each naming the variable, the value and
//! what was expected, so one failed deploy shows everything to fix.
//!
//! ```
//! use pushpull::config::{Env, PushSettings};
//!
//! let env = Env::from_pairs([("PUT_MAX_RECORDS", "900")]);
//! let err = PushSettings::from_env(env).unwrap_err();
//! assert!(err.to_string().contains("PUT_MAX_RECORDS=\"900\""));
//!
//! let err = PushSettings::from_env(Env::from_pairs([("PUT_LINGER_MS", "50")])).unwrap_err();
//! assert!(err.to_string().contains("CHECKPOINT_URI is not set"), "no silent /tmp default: {err}");
//!
//! let env = Env::from_pairs([("PUT_LINGER_MS", "50")]).with_local_locations("/tmp/demo");
//! let ok = PushSettings::from_env(env).unwrap();
//! assert_eq!(ok.put.max_events(), 500);
//! ```
use std::collections::HashMap;
use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;

use crate::batch::BatchConfig;
use crate::store::Location;

/// Kinesis PutRecords: at most 500 records a call.
pub const KINESIS_MAX_RECORDS_PER_CALL: usize = 500;
/// Kinesis PutRecords: 5 MiB a call in the long-standing documentation (the conservative choice;
/// newer documentation says 10 MiB, so the setting allows up to that).
pub const KINESIS_MAX_BYTES_PER_CALL: usize = 5 * 1024 * 1024;
/// Kinesis: 1 MiB a record (data plus partition key) by default.
pub const KINESIS_MAX_RECORD_BYTES: usize = 1024 * 1024;

/// One configuration problem.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required variable is not set (or empty).
    Missing {
        /// Variable name.
        name: &'static str,
        /// What it is for.
        purpose: &'static str,
    },
    /// A variable is set to something unusable.
    Invalid {
        /// Variable name.
        name: &'static str,
        /// The value as set.
        value: String,
        /// What was expected.
        expected: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Missing { name, purpose } => write!(f, "{name} is not set: {purpose}"),
            ConfigError::Invalid { name, value, expected } => write!(f, "{name}={value:?} is invalid: {expected}"),
        }
    }
}

/// All the problems found in one configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration ({} problem{}): ", self.0.len(), if self.0.len() == 1 { "" } else { "s" })?;
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A source of variables that remembers every problem it was asked about.
pub struct Env {
    vars: HashMap<String, String>,
    errors: Vec<ConfigError>,
}

impl Env {
    /// The process environment.
    pub fn from_process() -> Self {
        Self::from_pairs(std::env::vars())
    }

    /// Explicit variables, for tests and embedding.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        Env { vars: pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect(), errors: Vec::new() }
    }

    /// Sets `CHECKPOINT_URI`, `OUTPUT_URI` and `QUARANTINE_URI` to `file://` directories under
    /// `dir` where they are not set: for tests and local runs (never for Lambda, where `/tmp` is
    /// per sandbox).
    ///
    /// ```
    /// use pushpull::config::{Env, PushSettings};
    /// let settings = PushSettings::from_env(Env::from_pairs([("PUT_LINGER_MS", "0")]).with_local_locations("/tmp/demo")).unwrap();
    /// assert_eq!(settings.checkpoint.to_string(), "file:///tmp/demo/checkpoints");
    /// ```
    pub fn with_local_locations(mut self, dir: impl AsRef<std::path::Path>) -> Self {
        for (name, sub) in
            [("CHECKPOINT_URI", "checkpoints"), ("OUTPUT_URI", "output"), ("QUARANTINE_URI", "quarantine")]
        {
            if self.raw(name).is_none() {
                self.vars.insert(name.to_owned(), format!("file://{}", dir.as_ref().join(sub).display()));
            }
        }
        self
    }

    fn raw(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    /// A required string.
    pub fn required(&mut self, name: &'static str, purpose: &'static str) -> String {
        match self.raw(name) {
            Some(v) => v.to_owned(),
            None => {
                self.errors.push(ConfigError::Missing { name, purpose });
                String::new()
            }
        }
    }

    /// A required Kinesis stream name from `name`: 1-128 characters of a-z, A-Z, 0-9, `_`, `.`,
    /// `-` (an ARN is refused here, at init, not by every PutRecords later).
    ///
    /// ```
    /// use pushpull::config::Env;
    /// let mut env = Env::from_pairs([("STREAM_NAME", "arn:aws:kinesis:us-east-1:1:stream/orders")]);
    /// env.kinesis_stream_name("STREAM_NAME", "the stream records go to");
    /// assert!(env.finish().unwrap_err().to_string().contains("a Kinesis stream name"));
    /// ```
    pub fn kinesis_stream_name(&mut self, name: &'static str, purpose: &'static str) -> String {
        let value = self.required(name, purpose);
        let ok = value.len() <= 128 && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !value.is_empty() && !ok {
            self.invalid(
                name,
                value.clone(),
                "a Kinesis stream name: 1-128 characters of a-z, A-Z, 0-9, '_', '.', '-'",
            );
        }
        value
    }

    /// An optional string (unset or empty is `None`).
    pub fn optional(&mut self, name: &'static str) -> Option<String> {
        self.raw(name).map(str::to_owned)
    }

    /// A value parsed with `FromStr`, or `default` when unset.
    pub fn parse_or<T>(&mut self, name: &'static str, default: T) -> T
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        let Some(raw) = self.raw(name).map(str::to_owned) else {
            return default;
        };
        match raw.parse() {
            Ok(v) => v,
            Err(e) => {
                self.errors.push(ConfigError::Invalid { name, value: raw, expected: e.to_string() });
                default
            }
        }
    }

    /// A whole number in `range`, or `default` when unset.
    pub fn number_in<T>(&mut self, name: &'static str, default: T, range: RangeInclusive<T>) -> T
    where
        T: FromStr + PartialOrd + fmt::Display + Copy,
    {
        let Some(raw) = self.raw(name).map(str::to_owned) else {
            return default;
        };
        match raw.parse::<T>() {
            Ok(v) if range.contains(&v) => v,
            _ => {
                let expected = format!("a whole number from {} to {}", range.start(), range.end());
                self.errors.push(ConfigError::Invalid { name, value: raw, expected });
                default
            }
        }
    }

    /// Records a problem found by the caller.
    pub fn invalid(&mut self, name: &'static str, value: impl Into<String>, expected: impl Into<String>) {
        self.errors.push(ConfigError::Invalid { name, value: value.into(), expected: expected.into() });
    }

    /// `Ok` when nothing was wrong.
    pub fn finish(self) -> Result<(), ConfigErrors> {
        if self.errors.is_empty() { Ok(()) } else { Err(ConfigErrors(self.errors)) }
    }
}

/// A required storage location from variable `name`, checked. There is no default on purpose:
/// a `file:///tmp` default would, in Lambda, keep checkpoints in one sandbox's `/tmp` and lose them
/// with it, silently.
pub fn location(env: &mut Env, name: &'static str, purpose: &'static str) -> Location {
    let unusable = || Location::File { root: "/nonexistent".into() };
    let raw = env.required(name, purpose);
    if raw.is_empty() {
        return unusable();
    }
    raw.parse().unwrap_or_else(|e: crate::store::LocationError| {
        env.invalid(name, raw, e.reason.to_owned() + " (expected s3://bucket/prefix or file:///absolute/dir)");
        unusable()
    })
}

/// What `CHECKPOINT_URI` is for, in messages.
pub const CHECKPOINT_URI_PURPOSE: &str = "where progress is checkpointed: s3://bucket/prefix (file:///dir only for local runs: Lambda's /tmp is per sandbox)";

/// Settings of the push pipeline (S3 object → records), read from the environment.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PushSettings {
    /// `CHECKPOINT_URI`: where per-object progress is kept.
    pub checkpoint: Location,
    /// `OUTPUT_URI`: where the pipeline's outputs go (the push function refuses objects there).
    pub output: Location,
    /// `QUARANTINE_URI`: where lines that cannot be sent go, with their reason.
    pub quarantine: Location,
    /// `MAX_LINE_BYTES`: longer lines are quarantined without being buffered whole.
    pub max_line_bytes: usize,
    /// `RECORD_MAX_BYTES`: largest Kinesis record (data plus partition key).
    pub record_max_bytes: usize,
    /// `PUT_MAX_RECORDS`, `PUT_MAX_BYTES`, `PUT_LINGER_MS`: one PutRecords call's limits.
    pub put: BatchConfig,
    /// `PUT_MAX_ATTEMPTS`: attempts per record (first try included) before the invocation fails.
    pub put_max_attempts: u32,
    /// `PUT_ORDERING`: `per-key` (default) keeps each partition key's records in line order even
    /// across resends, by never putting two records of one key in the same call (a later record
    /// of a key waits for the next call: [`crate::batch::KeyOrderedBatcher`]); `none` fills calls
    /// regardless (a resent record may land after a later one of its key).
    pub ordering: Ordering,
    /// `PUT_AGGREGATION` (`on`/`off`, default off) and `PUT_AGGREGATION_MAX_BYTES` (default
    /// 250,000): lines packed into KPL aggregated records of at most this many bytes, each
    /// aggregate holding only lines whose keys map to one shard. `None`: one record per line.
    pub aggregation: Option<usize>,
    /// `CHECKPOINT_INTERVAL_MS`: how often progress within an object is checkpointed.
    pub checkpoint_interval: Duration,
    /// `CHECKPOINT_LEASE_MS`: how long an invocation owns an object after its last checkpoint;
    /// another invocation may take the object over (and resume it) only after that.
    pub lease: Duration,
    /// `DEADLINE_MARGIN_MS`: stop this long before the invocation deadline, checkpoint, and fail
    /// so that the retry resumes.
    pub deadline_margin: Duration,
}

/// How records of one partition key are kept in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ordering {
    /// At most one record per partition key in a PutRecords call.
    PerKey,
    /// No ordering guarantee across resends.
    None,
}

/// The default size limit of an aggregated record (`PUT_AGGREGATION_MAX_BYTES`): ten whole PUT
/// payload units of 25,000 bytes (a full aggregate pays for no unused part of a unit), about a
/// quarter of a shard's 1 MiB/s, so that a throttled shard refuses a fraction of a second's
/// writes at a time (BENCHMARKS.md measures the choice against the KPL's 51,200).
pub const DEFAULT_AGGREGATION_MAX_BYTES: usize = 250_000;

/// An on/off setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Switch {
    On,
    Off,
}

impl std::str::FromStr for Switch {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on" => Ok(Switch::On),
            "off" => Ok(Switch::Off),
            _ => Err("on or off"),
        }
    }
}

impl std::str::FromStr for Ordering {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "per-key" => Ok(Ordering::PerKey),
            "none" => Ok(Ordering::None),
            _ => Err("per-key or none"),
        }
    }
}

impl PushSettings {
    /// Reads and checks the settings; every problem is reported at once.
    pub fn from_env(mut env: Env) -> Result<Self, ConfigErrors> {
        let settings = Self::read(&mut env);
        env.finish()?;
        Ok(settings)
    }

    /// Reads the settings into `env`'s list of problems, for a function that reads settings of
    /// its own as well and reports them all at once ([`Env::finish`]).
    pub fn read(env: &mut Env) -> Self {
        let checkpoint = location(env, "CHECKPOINT_URI", CHECKPOINT_URI_PURPOSE);
        let output =
            location(env, "OUTPUT_URI", "the pipeline's outputs (objects under it are refused: the loop guard)");
        let quarantine = location(env, "QUARANTINE_URI", "where lines that cannot be sent go, with their reason");
        let max_bytes_cap = 2 * KINESIS_MAX_BYTES_PER_CALL;
        let record_max_bytes = env.number_in("RECORD_MAX_BYTES", KINESIS_MAX_RECORD_BYTES, 1..=10 * 1024 * 1024);
        let max_line_bytes = env.number_in("MAX_LINE_BYTES", KINESIS_MAX_RECORD_BYTES, 1..=64 * 1024 * 1024);
        let max_events =
            env.number_in("PUT_MAX_RECORDS", KINESIS_MAX_RECORDS_PER_CALL, 1..=KINESIS_MAX_RECORDS_PER_CALL);
        let max_bytes = env.number_in("PUT_MAX_BYTES", KINESIS_MAX_BYTES_PER_CALL, 1..=max_bytes_cap);
        let linger_ms = env.number_in("PUT_LINGER_MS", 100u64, 0..=60_000);
        let put_max_attempts = env.number_in("PUT_MAX_ATTEMPTS", 8u32, 1..=100);
        let ordering = env.parse_or("PUT_ORDERING", Ordering::PerKey);
        let aggregation_on = env.parse_or("PUT_AGGREGATION", Switch::Off) == Switch::On;
        let aggregation_max =
            env.number_in("PUT_AGGREGATION_MAX_BYTES", DEFAULT_AGGREGATION_MAX_BYTES, 64..=KINESIS_MAX_RECORD_BYTES);
        let interval_ms = env.number_in("CHECKPOINT_INTERVAL_MS", 1_000u64, 10..=600_000);
        let lease_ms = env.number_in("CHECKPOINT_LEASE_MS", 60_000u64, 100..=3_600_000);
        let margin_ms = env.number_in("DEADLINE_MARGIN_MS", 5_000u64, 0..=600_000);
        if interval_ms * 2 > lease_ms {
            env.invalid(
                "CHECKPOINT_LEASE_MS",
                lease_ms.to_string(),
                format!("at least twice CHECKPOINT_INTERVAL_MS ({interval_ms})"),
            );
        }
        if aggregation_on && aggregation_max > record_max_bytes {
            env.invalid(
                "PUT_AGGREGATION_MAX_BYTES",
                aggregation_max.to_string(),
                format!("at most RECORD_MAX_BYTES ({record_max_bytes})"),
            );
        }
        if record_max_bytes > max_bytes {
            env.invalid(
                "RECORD_MAX_BYTES",
                record_max_bytes.to_string(),
                format!("at most PUT_MAX_BYTES ({max_bytes})"),
            );
        }
        let put = BatchConfig::new(max_events, max_bytes, Duration::from_millis(linger_ms))
            .unwrap_or_else(|_| unreachable!("ranges above exclude zero"));
        PushSettings {
            checkpoint,
            output,
            quarantine,
            max_line_bytes,
            record_max_bytes,
            put,
            put_max_attempts,
            ordering,
            aggregation: aggregation_on.then_some(aggregation_max),
            checkpoint_interval: Duration::from_millis(interval_ms),
            lease: Duration::from_millis(lease_ms),
            deadline_margin: Duration::from_millis(margin_ms),
        }
    }

    /// Whether an object lies under this function's own output or quarantine location (the
    /// loop guard: processing it could trigger the function again, forever).
    pub fn is_own_output(&self, bucket: &str, key: &str) -> bool {
        self.output.contains(bucket, key) || self.quarantine.contains(bucket, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_defaults_are_the_aws_limits() {
        let s = PushSettings::from_env(Env::from_pairs([("UNRELATED", "s")]).with_local_locations("/tmp/x")).unwrap();
        assert_eq!(s.put.max_events(), 500);
        assert_eq!(s.put.max_bytes(), 5 * 1024 * 1024);
        assert_eq!(s.record_max_bytes, 1024 * 1024);
        assert_eq!(s.checkpoint, "file:///tmp/x/checkpoints".parse().unwrap());
    }

    #[test]
    fn every_problem_is_reported_with_its_variable() {
        let err = PushSettings::from_env(Env::from_pairs([
            ("PUT_MAX_RECORDS", "0"),
            ("PUT_LINGER_MS", "soon"),
            ("CHECKPOINT_URI", "dynamodb://table"),
            ("OUTPUT_URI", "file://relative/dir"),
        ]))
        .unwrap_err();
        let names: Vec<_> = err
            .0
            .iter()
            .map(|e| match e {
                ConfigError::Missing { name, .. } | ConfigError::Invalid { name, .. } => *name,
            })
            .collect();
        assert_eq!(names, ["CHECKPOINT_URI", "OUTPUT_URI", "QUARANTINE_URI", "PUT_MAX_RECORDS", "PUT_LINGER_MS"]);
        let text = err.to_string();
        assert!(text.starts_with("invalid configuration (5 problems): CHECKPOINT_URI="), "{text}");
        assert!(text.contains("QUARANTINE_URI is not set: where lines that cannot be sent go"), "{text}");
        assert!(text.contains("PUT_MAX_RECORDS=\"0\" is invalid: a whole number from 1 to 500"), "{text}");
        assert!(text.contains("CHECKPOINT_URI=\"dynamodb://table\" is invalid: unknown scheme"), "{text}");
    }

    #[test]
    fn record_limits_are_checked() {
        let err = PushSettings::from_env(Env::from_pairs([("RECORD_MAX_BYTES", "6000000")])).unwrap_err().to_string();
        assert!(err.contains("RECORD_MAX_BYTES=\"6000000\" is invalid: at most PUT_MAX_BYTES"), "{err}");
    }

    #[test]
    fn empty_values_count_as_unset() {
        let mut env = Env::from_pairs([("A", " "), ("B", "x")]);
        assert_eq!((env.optional("A"), env.optional("B").as_deref()), (None, Some("x")));
    }

    #[test]
    fn loop_guard_covers_output_and_quarantine() {
        let s = PushSettings::from_env(Env::from_pairs([
            ("CHECKPOINT_URI", "s3://data/checkpoints"),
            ("OUTPUT_URI", "s3://data/output"),
            ("QUARANTINE_URI", "s3://data/quarantine"),
        ]))
        .unwrap();
        assert!(s.is_own_output("data", "output/a"));
        assert!(s.is_own_output("data", "quarantine/a"));
        assert!(!s.is_own_output("data", "input/a"));
    }
}
