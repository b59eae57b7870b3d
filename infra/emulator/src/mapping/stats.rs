//! What the mapping counts while it runs ([`Stats`]) and reports at the end ([`Summary`]).
use std::time::Duration;

use serde::Serialize;

use super::event;
use super::identity::Origin;
use super::options::Polling;

/// `HH:MM:SS.mmm` (UTC) of a unix time, for the summary.
fn iso8601_time(t: f64) -> String {
    let full = event::iso8601(t);
    full.split('T').nth(1).map(|s| s.trim_end_matches('Z').to_owned()).unwrap_or(full)
}

/// The mapping's counters: kept while running and reported (in [`Summary`]).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Counts {
    /// Shards read from.
    pub shards_started: u64,
    /// Shards finished (closed and fully processed).
    pub shards_finished: u64,
    /// GetRecords calls.
    pub get_records: u64,
    /// GetRecords calls that returned nothing.
    pub empty_polls: u64,
    /// Records read from the stream.
    pub records_read: u64,
    /// Invocations (with retries and final window invocations).
    pub invocations: u64,
    /// Smallest batch.
    pub batch_size_min: u32,
    /// Largest batch.
    pub batch_size_max: u32,
    /// Whole-batch failures (function errors, timeouts, crashes, unusable responses).
    pub function_errors: u64,
    /// Answers that reported some records failed.
    pub partial_failures: u64,
    /// Retries of a batch or of its failed rest.
    pub retries: u64,
    /// Batches split in two.
    pub bisections: u64,
    /// Invoke API throttles and transport errors (retried, not counted as attempts).
    pub throttles: u64,
    /// Other failures to invoke (an error status such as 413 or 404): retried like throttles.
    #[serde(default)]
    pub invoke_errors: u64,
    /// Records sent to the failure destination after their retries ran out.
    pub to_destination: u64,
    /// Records older than MaximumRecordAgeInSeconds (sent to the destination unprocessed).
    pub expired: u64,
    /// Records given up on with no destination configured (AWS drops them too).
    pub discarded: u64,
    /// Final invocations of tumbling windows.
    pub windows_final: u64,
    /// Records no filter of `FilterCriteria` matched (not invoked; AWS's `FilteredOutEventCount`).
    #[serde(default)]
    pub filtered_out: u64,
    /// Iterator age (ms): the largest seen.
    pub iterator_age_ms_max: f64,
    /// Iterator age at the last batch.
    pub iterator_age_ms_last: f64,
    /// Records handed back to their broker after their retries (RabbitMQ: nacked and requeued).
    #[serde(default)]
    pub requeued: u64,
    /// Connections to the broker opened again after one was lost (RabbitMQ).
    #[serde(default)]
    pub reconnects: u64,
    /// SQS: `ReceiveMessage` calls.
    #[serde(default)]
    pub receives: u64,
    /// SQS: of those, the ones that returned no message.
    #[serde(default)]
    pub empty_receives: u64,
    /// SQS: `ReceiveMessage` calls that failed (retried).
    #[serde(default)]
    pub receive_errors: u64,
    /// SQS: the most pollers (concurrent batches) at once.
    #[serde(default)]
    pub pollers_max: u64,
    /// SQS: deletions SQS refused (the message comes again).
    #[serde(default)]
    pub delete_failures: u64,
    /// SQS: the pollers' `WaitTimeSeconds` (20: long polling; 0: short polling).
    #[serde(default)]
    pub wait_time_seconds: u64,
    /// Kafka: the largest `OffsetLag` reported (records between the end of the topic and the next
    /// record to process, over this member's partitions).
    #[serde(default)]
    pub offset_lag_max: u64,
    /// Shard leases this runner took.
    pub leases_taken: u64,
    /// Of those, leases taken from another runner that had stopped renewing them.
    pub lease_takeovers: u64,
    /// Leases handed over (rebalancing, or stopping): released after a last checkpoint.
    pub leases_released: u64,
    /// Leases found taken by another runner (this one was paused or slow past the failover time).
    pub leases_lost: u64,
    /// Enhanced fan-out: successful `SubscribeToShard` calls (one a shard, then one every 5
    /// minutes and after each error).
    #[serde(default)]
    pub subscriptions: u64,
    /// Enhanced fan-out: `SubscribeToShardEvent`s received.
    #[serde(default)]
    pub subscription_events: u64,
    /// Enhanced fan-out: refused `SubscribeToShard` calls and subscriptions that broke off.
    #[serde(default)]
    pub subscription_errors: u64,
}

/// A change of a shard's lease, as this runner saw it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LeaseEvent {
    /// The shard.
    pub shard_id: String,
    /// `taken`, `released`, `lost` or `finished`.
    pub event: &'static str,
    /// For `taken`: the runner that held it before, if another.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// When, unix seconds.
    pub at: f64,
}

/// Counters kept while running.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) counts: Counts,
    batches: u64,
    batch_records: u64,
    pub(crate) delays: Delays,
    /// When the last invocation ended, from the start of the run.
    pub(crate) last_invoke_end: Duration,
    pub(crate) leases: Vec<LeaseEvent>,
    /// Whether the mapping's positions were new or found.
    pub(crate) origin: Option<Origin>,
}

/// What the mapping did: printed at the end of a run, and returned to tests.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Summary {
    /// The counters.
    #[serde(flatten)]
    pub counts: Counts,
    /// Records handed to the function on their first delivery.
    pub records_delivered: u64,
    /// Mean batch size.
    pub batch_size_mean: f64,
    /// Delay from a record's arrival in the stream to its first invocation, percentiles (ms, to 3
    /// significant digits).
    pub delay_ms_p50: f64,
    /// 95th percentile.
    pub delay_ms_p95: f64,
    /// 99th percentile.
    pub delay_ms_p99: f64,
    /// Largest delay.
    pub delay_ms_max: f64,
    /// Seconds from the start of the run to the end of its last invocation (the time the work
    /// took, without the idle wait before stopping).
    pub active_s: f64,
    /// This runner's worker id.
    pub worker_id: String,
    /// Every lease this runner took, released, lost or finished, in order.
    pub leases: Vec<LeaseEvent>,
    /// `Enabled` or `Disabled` (`Enabled: false`: the mapping reads nothing).
    #[serde(default)]
    pub state: String,
    /// The polling cadence used.
    #[serde(default)]
    pub polling: Polling,
    /// Batches of one partition in flight at once (`ParallelizationFactor`; 0 in a summary that
    /// predates it).
    #[serde(default)]
    pub parallelization_factor: u32,
    /// The mapping's UUID: its positions are its own ([`super::identity`]).
    #[serde(default)]
    pub mapping_uuid: String,
    /// A Kafka mapping's consumer group as this member saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<super::kafka::GroupView>,
    /// An Amazon MQ mapping's broker (its `EventSourceArn`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amazon_mq: Option<String>,
    /// An SQS mapping's queue (its `EventSourceArn`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sqs: Option<String>,
    /// `new` (every partition started at the StartingPosition) or `resumed` (after the
    /// checkpoints of a runner of the same mapping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    /// The stream consumer read through with enhanced fan-out (`SubscribeToShard`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
}

/// Delays from arrival to first invocation, in a histogram (microseconds, 3 significant digits):
/// a few kilobytes however long the mapping runs, where a list grew by 8 bytes a record.
#[derive(Debug)]
pub(crate) struct Delays(hdrhistogram::Histogram<u64>);

impl Default for Delays {
    fn default() -> Self {
        // An auto-resizing histogram; 3 significant digits is always a valid precision.
        Delays(hdrhistogram::Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits")))
    }
}

impl Delays {
    /// Notes one record's delay.
    pub(crate) fn record(&mut self, ms: f64) {
        let us = (ms.max(0.0) * 1000.0) as u64;
        // `record` grows the histogram as needed; only past its hard limit is the value clamped.
        if self.0.record(us).is_err() {
            self.0.saturating_record(us);
        }
    }

    fn count(&self) -> u64 {
        self.0.len()
    }

    /// The `q` quantile in ms; 0 when empty.
    fn quantile_ms(&self, q: f64) -> f64 {
        if self.0.is_empty() { 0.0 } else { self.0.value_at_quantile(q) as f64 / 1000.0 }
    }

    fn max_ms(&self) -> f64 {
        if self.0.is_empty() { 0.0 } else { self.0.max() as f64 / 1000.0 }
    }
}

impl Stats {
    pub(crate) fn batch(&mut self, size: u32) {
        let c = &mut self.counts;
        c.batch_size_min = if self.batches == 0 { size } else { c.batch_size_min.min(size) };
        c.batch_size_max = c.batch_size_max.max(size);
        self.batches += 1;
        self.batch_records += u64::from(size);
    }

    pub(crate) fn summary(&self) -> Summary {
        let d = &self.delays;
        Summary {
            counts: self.counts.clone(),
            records_delivered: d.count(),
            batch_size_mean: if self.batches == 0 { 0.0 } else { self.batch_records as f64 / self.batches as f64 },
            delay_ms_p50: d.quantile_ms(0.5),
            delay_ms_p95: d.quantile_ms(0.95),
            delay_ms_p99: d.quantile_ms(0.99),
            delay_ms_max: d.max_ms(),
            active_s: self.last_invoke_end.as_secs_f64(),
            worker_id: String::new(),
            leases: self.leases.clone(),
            state: String::new(),
            polling: Polling::default(),
            parallelization_factor: 1,
            consumer: None,
            mapping_uuid: String::new(),
            group: None,
            amazon_mq: None,
            sqs: None,
            origin: self.origin,
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.consumer, &self.group) {
            (Some(c), _) => write!(f, "  state            {}; enhanced fan-out through {c}", self.state)?,
            // A consumer group member: Kafka's fetches are long polls, not AWS's Kinesis cadence.
            (None, Some(_)) => {
                write!(f, "  state            {}; a consumer group member (long-polling fetches)", self.state)?
            }
            // A queue's pollers: each receives a batch and invokes with it.
            (None, None) if self.sqs.is_some() => write!(
                f,
                "  state            {}; {} polling (ReceiveMessage WaitTimeSeconds {}), one batch per poller, up to {} pollers at once",
                self.state,
                if self.counts.wait_time_seconds > 0 { "long" } else { "short" },
                self.counts.wait_time_seconds,
                self.counts.pollers_max
            )?,
            (None, None) if self.amazon_mq.is_some() => write!(
                f,
                "  state            {}; a queue consumer (the broker pushes up to the prefetch), one batch at a time",
                self.state
            )?,
            (None, None) => write!(f, "  state            {}; polling: {}", self.state, self.polling)?,
        }
        match self.parallelization_factor {
            0 | 1 => writeln!(f)?,
            n => writeln!(f, "; {n} batches of a shard at once (ParallelizationFactor), in order per partition key")?,
        }
        match self.origin {
            Some(Origin::New) => {
                writeln!(f, "  mapping          {}: new, started at its StartingPosition", self.mapping_uuid)?
            }
            Some(Origin::Resumed) => {
                writeln!(f, "  mapping          {}: resumed after its checkpoints", self.mapping_uuid)?
            }
            None => {}
        }
        match &self.group {
            Some(g) => {
                writeln!(
                    f,
                    "  consumer group   {}: generation {}, {} assignments received, the last of partitions {:?}; coordinator {}",
                    g.group_id,
                    g.generation.map_or("unknown".to_owned(), |n| n.to_string()),
                    g.assignments(),
                    g.last_assigned(),
                    g.coordinator.as_deref().unwrap_or("unknown")
                )?;
                if !g.members.is_empty() {
                    let members: Vec<String> = g
                        .members
                        .iter()
                        .map(|m| {
                            let me = g.member_id.as_deref() == Some(m.id.as_str());
                            let notes: Vec<&str> = [m.client_id.as_str(), if me { "this runner" } else { "" }]
                                .into_iter()
                                .filter(|n| !n.is_empty())
                                .collect();
                            match notes.is_empty() {
                                true => m.id.clone(),
                                false => format!("{} ({})", m.id, notes.join(", ")),
                            }
                        })
                        .collect();
                    writeln!(f, "  members          {} at the last look: {}", members.len(), members.join(", "))?;
                }
            }
            None if self.sqs.is_some() => writeln!(
                f,
                "  queue            {} messages left to come back after their visibility timeout; {} deletions refused",
                self.counts.requeued, self.counts.delete_failures
            )?,
            None if self.amazon_mq.is_some() => writeln!(
                f,
                "  queue            {} messages handed back (requeued) after their retries; {} connections opened again after one was lost",
                self.counts.requeued, self.counts.reconnects
            )?,
            None => writeln!(
                f,
                "  shards           {} read, {} finished",
                self.counts.shards_started, self.counts.shards_finished
            )?,
        }
        if self.consumer.is_some() {
            writeln!(
                f,
                "  SubscribeToShard {} subscriptions, {} events, {} errors; {} records",
                self.counts.subscriptions,
                self.counts.subscription_events,
                self.counts.subscription_errors,
                self.counts.records_read
            )?;
        } else if self.group.is_some() {
            writeln!(
                f,
                "  Fetch            {} records (the consumer's long-polling fetches)",
                self.counts.records_read
            )?;
        } else if self.sqs.is_some() {
            writeln!(
                f,
                "  ReceiveMessage   {} calls ({} empty, {} failed), {} messages",
                self.counts.receives, self.counts.empty_receives, self.counts.receive_errors, self.counts.records_read
            )?;
        } else if self.amazon_mq.is_some() {
            writeln!(f, "  deliveries       {} messages (basic.consume)", self.counts.records_read)?;
        } else {
            writeln!(
                f,
                "  GetRecords       {} calls ({} empty), {} records",
                self.counts.get_records, self.counts.empty_polls, self.counts.records_read
            )?;
        }
        writeln!(
            f,
            "  invocations      {} for {} records; batch size min {} mean {:.1} max {}",
            self.counts.invocations,
            self.records_delivered,
            self.counts.batch_size_min,
            self.batch_size_mean,
            self.counts.batch_size_max
        )?;
        writeln!(
            f,
            "  failures         {} function errors, {} partial, {} retries, {} bisections, {} throttles, {} other invoke errors",
            self.counts.function_errors,
            self.counts.partial_failures,
            self.counts.retries,
            self.counts.bisections,
            self.counts.throttles,
            self.counts.invoke_errors
        )?;
        writeln!(
            f,
            "  given up         {} to the failure destination, {} expired, {} discarded",
            self.counts.to_destination, self.counts.expired, self.counts.discarded
        )?;
        let a_queue = self.amazon_mq.is_some() || self.sqs.is_some();
        if self.group.is_none() && !a_queue {
            writeln!(f, "  windows          {} final invocations", self.counts.windows_final)?;
        }
        if self.counts.filtered_out > 0 {
            writeln!(f, "  filtered out     {} records (FilterCriteria: not invoked)", self.counts.filtered_out)?;
        }
        if let Some(g) = &self.group {
            // The group's coordinator assigns partitions: no leases of ours.
            for e in &g.rebalances {
                match &e.broker {
                    Some(b) => writeln!(f, "                   {} coordinator {b}", iso8601_time(e.at))?,
                    None => writeln!(f, "                   {} {} {:?}", iso8601_time(e.at), e.event, e.partitions)?,
                }
            }
        } else if !a_queue {
            writeln!(
                f,
                "  leases           {} taken ({} from a runner that stopped renewing), {} released, {} lost; as {}",
                self.counts.leases_taken,
                self.counts.lease_takeovers,
                self.counts.leases_released,
                self.counts.leases_lost,
                self.worker_id
            )?;
            // Per shard: when this runner held it.
            let mut held: Vec<(String, String)> = Vec::new();
            for e in &self.leases {
                let at = iso8601_time(e.at);
                let text = match (e.event, &e.from) {
                    ("taken", Some(from)) => format!("taken {at} (from {from})"),
                    (event, _) => format!("{event} {at}"),
                };
                match held.iter_mut().find(|(s, _)| *s == e.shard_id) {
                    Some((_, t)) => *t = format!("{t}, {text}"),
                    None => held.push((e.shard_id.clone(), text)),
                }
            }
            for (shard, text) in held {
                writeln!(f, "    {shard}: {text}")?;
            }
        }
        // Kinesis's IteratorAge; on Kafka the same measure (a record's age when it is sent), and
        // AWS's Kafka metric, OffsetLag.
        let age = if self.group.is_some() || self.amazon_mq.is_some() || self.sqs.is_some() {
            "record age  "
        } else {
            "iterator age"
        };
        write!(
            f,
            "  {age}     max {:.0} ms, last {:.0} ms",
            self.counts.iterator_age_ms_max, self.counts.iterator_age_ms_last
        )?;
        match self.group {
            Some(_) => writeln!(f, "; OffsetLag max {} records", self.counts.offset_lag_max)?,
            None => writeln!(f)?,
        }
        write!(
            f,
            "  delay (put->invoke) p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            self.delay_ms_p50, self.delay_ms_p95, self.delay_ms_p99, self.delay_ms_max
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_keep_their_percentiles_in_bounded_space() {
        let mut d = Delays::default();
        assert_eq!((d.count(), d.quantile_ms(0.5), d.max_ms()), (0, 0.0, 0.0));
        // 1 ms .. 1,000 ms, 1,000 times over: a million records.
        for _ in 0..1_000 {
            for ms in 1..=1_000 {
                d.record(f64::from(ms));
            }
        }
        d.record(-5.0); // clock skew: counted as 0
        assert_eq!(d.count(), 1_000_001);
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(near(d.quantile_ms(0.5), 500.0), "{}", d.quantile_ms(0.5));
        assert!(near(d.quantile_ms(0.99), 990.0), "{}", d.quantile_ms(0.99));
        assert!(near(d.max_ms(), 1_000.0), "{}", d.max_ms());
        // The counts array, not the records, sets the size: about 11,000 buckets (90 KB) for
        // values up to a second, growing by about 2,000 per doubling of the largest value.
        assert!(d.0.distinct_values() < 20_000, "{}", d.0.distinct_values());
    }
}
