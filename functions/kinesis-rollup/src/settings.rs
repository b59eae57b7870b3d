//! The rollup's settings, from environment variables, every problem reported at once.
use pushpull::config::{CHECKPOINT_URI_PURPOSE, ConfigErrors, Env, location};
use pushpull::store::Location;

/// Settings of the rollup function.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RollupSettings {
    /// `CHECKPOINT_URI`: where per-shard progress is kept.
    pub checkpoint: Location,
    /// `OUTPUT_URI`: where rollups are written.
    pub output: Location,
    /// `GROUP_BY_FIELD`: top-level JSON field to group by; unset means the partition key. A
    /// record without the field (or with `null`) is counted in the group with `"key": null`.
    pub group_by_field: Option<String>,
    /// `SUM_FIELD`: numeric top-level JSON field to sum per group, if any.
    pub sum_field: Option<String>,
    /// `ROLLUP_POSITIONS`: what the rollup remembers of what it counted.
    pub positions: Positions,
    /// Faults to inject (feature `fault-injection` only).
    pub faults: Faults,
}

/// What the rollup remembers of what it counted, per shard (`ROLLUP_POSITIONS`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Positions {
    /// `per-key` (the default): one position per partition key, exact at every
    /// `ParallelizationFactor` (AWS keeps order per partition key, and batches of one shard run
    /// at once), at one entry per partition key the shard has seen and two checkpoint writes a
    /// batch (a write-ahead note, then the positions).
    #[default]
    PerKey,
    /// `per-shard`: one position per shard, the highest record counted. Exact only at
    /// `ParallelizationFactor` 1, where a shard's batches come one at a time in order; a few bytes
    /// whatever the keys (the template picks it at factor 1).
    PerShard,
}

/// Faults injected on purpose, for the fault tests (feature `fault-injection`; a build without
/// it refuses to start when they are asked for, so a deployed function never injects).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// `PUSHPULL_INJECT_CRASH=after-output`: abort between writing an output and advancing the
    /// checkpoint.
    pub crash_after_output: bool,
    /// `PUSHPULL_INJECT_FAILURES`: fraction (0-1) of invocations to fail before any work.
    pub failures: f64,
    /// `PUSHPULL_INJECT_DELAY_MS`: milliseconds every invocation waits before its work (a slow
    /// function, for the overload runs).
    pub delay_ms: u64,
}

impl RollupSettings {
    /// Reads and checks the settings.
    ///
    /// ```
    /// use kinesis_rollup::settings::RollupSettings;
    /// use pushpull::config::Env;
    /// let s = RollupSettings::from_env(Env::from_pairs([("GROUP_BY_FIELD", "user")]).with_local_locations("/tmp/r")).unwrap();
    /// assert_eq!(s.group_by_field.as_deref(), Some("user"));
    /// ```
    pub fn from_env(mut env: Env) -> Result<Self, ConfigErrors> {
        let checkpoint = location(&mut env, "CHECKPOINT_URI", CHECKPOINT_URI_PURPOSE);
        let output = location(&mut env, "OUTPUT_URI", "where rollups are written");
        let group_by_field = env.optional("GROUP_BY_FIELD");
        let sum_field = env.optional("SUM_FIELD");
        let positions = match env.optional("ROLLUP_POSITIONS").as_deref() {
            None | Some("per-key") => Positions::PerKey,
            Some("per-shard") => Positions::PerShard,
            Some(other) => {
                env.invalid(
                    "ROLLUP_POSITIONS",
                    other,
                    "per-key (for any ParallelizationFactor) or per-shard (factor 1 only)",
                );
                Positions::PerKey
            }
        };
        let faults = Faults::read(&mut env);
        env.finish()?;
        Ok(RollupSettings { checkpoint, output, group_by_field, sum_field, positions, faults })
    }
}

impl Faults {
    #[cfg(feature = "fault-injection")]
    fn read(env: &mut Env) -> Self {
        let crash_after_output = match env.optional("PUSHPULL_INJECT_CRASH").as_deref() {
            None => false,
            Some("after-output") => true,
            Some(other) => {
                env.invalid("PUSHPULL_INJECT_CRASH", other, "after-output, or unset");
                false
            }
        };
        let failures = env.parse_or("PUSHPULL_INJECT_FAILURES", 0.0f64);
        if !(0.0..=1.0).contains(&failures) {
            env.invalid("PUSHPULL_INJECT_FAILURES", failures.to_string(), "a fraction from 0 to 1");
        }
        let delay_ms = env.parse_or("PUSHPULL_INJECT_DELAY_MS", 0u64);
        Faults { crash_after_output, failures, delay_ms }
    }

    #[cfg(not(feature = "fault-injection"))]
    fn read(env: &mut Env) -> Self {
        for name in ["PUSHPULL_INJECT_CRASH", "PUSHPULL_INJECT_FAILURES", "PUSHPULL_INJECT_DELAY_MS"] {
            if let Some(v) = env.optional(name) {
                env.invalid(name, v, "unset: this build has no fault injection (feature fault-injection)");
            }
        }
        Faults::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_locations_have_no_default() {
        let err = RollupSettings::from_env(Env::from_pairs([("GROUP_BY_FIELD", "user")])).unwrap_err().to_string();
        assert!(err.contains("CHECKPOINT_URI is not set") && err.contains("OUTPUT_URI is not set"), "{err}");
    }

    #[test]
    fn positions_are_per_key_unless_asked() {
        let s = |v: Option<&str>| {
            let mut pairs = vec![];
            if let Some(v) = v {
                pairs.push(("ROLLUP_POSITIONS", v));
            }
            RollupSettings::from_env(Env::from_pairs(pairs).with_local_locations("/tmp/r"))
        };
        assert_eq!(s(None).unwrap().positions, Positions::PerKey);
        assert_eq!(s(Some("per-shard")).unwrap().positions, Positions::PerShard);
        assert!(s(Some("per-lane")).unwrap_err().to_string().contains("ROLLUP_POSITIONS"));
    }

    #[test]
    fn empty_values_count_as_unset() {
        let env = Env::from_pairs([("GROUP_BY_FIELD", " "), ("SUM_FIELD", "amount")]).with_local_locations("/tmp/r");
        let s = RollupSettings::from_env(env).unwrap();
        assert_eq!(s.group_by_field, None);
        assert_eq!(s.sum_field.as_deref(), Some("amount"));
    }

    #[cfg(not(feature = "fault-injection"))]
    #[test]
    fn a_build_without_fault_injection_refuses_to_inject() {
        let env = Env::from_pairs([("PUSHPULL_INJECT_FAILURES", "0.5")]).with_local_locations("/tmp/r");
        let err = RollupSettings::from_env(env).unwrap_err();
        assert!(err.to_string().contains("this build has no fault injection"), "{err}");
    }
}
