//! A lane's deliveries: one batch invoked, judged, retried, bisected, aged out or handed to the
//! failure destination, and its records committed; a tumbling window's final invocation.
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tracing::{debug, info, warn};

use super::{Lane, MAX_STATE, Pending, Window};
use crate::mapping::MappingError;
use crate::mapping::clock::now_unix;
use crate::mapping::event::{WindowPart, WindowState};
use crate::mapping::outcome::{Condition, FailureContext, Verdict, failure_record, judge};
use crate::mapping::progress::WindowCheckpoint;
use crate::mapping::source::{Partition, Record};

impl<P: Partition> Lane<P> {
    pub(super) fn backoff(&self, retries: i64) -> Duration {
        let o = &self.ctx.options;
        // Doubling from the first, capped; AWS documents exponential backoff for a failed batch
        // without its constants.
        o.retry_backoff.saturating_mul(1 << retries.clamp(0, 16)).min(o.max_retry_backoff)
    }

    fn event(&self, records: &[P::Record], window: Option<(&Window, bool, bool)>) -> String {
        let part = window.map(|(w, is_final, early)| WindowPart {
            start: w.start,
            end: w.end,
            state: &w.state,
            is_final,
            terminated_early: early,
        });
        self.partition.event(records, part.as_ref())
    }

    /// Invokes. A failure to invoke (a throttle, a 5xx, a transport error, or any other error
    /// status) is retried here with backoff, not counted as an attempt, until the oldest record
    /// passes `MaximumRecordAgeInSeconds`; then `None`. AWS (Lambda developer guide, "Retain
    /// discarded batch records for a Kinesis Data Streams event source in Lambda"): "Before
    /// invocation: If a Lambda event source mapping is unable to invoke the function due to
    /// throttling or other issues, it retries until the records expire or exceed the maximum age
    /// configured on the event source mapping (MaximumRecordAgeInSeconds)." A source may set an
    /// earlier end (`until`, unix seconds: an SQS message's visibility timeout).
    async fn invoke(
        &self,
        payload: String,
        oldest_arrival: f64,
        until: Option<f64>,
    ) -> Result<Option<crate::invoke::Invoked>, MappingError> {
        let payload = Bytes::from(payload);
        let mut failed = 0i64;
        // Records whose time ran out while they waited (an SQS message past its visibility
        // timeout is another receiver's now): not invoked.
        if until.is_some_and(|t| now_unix() >= t) {
            warn!(
                partition = self.partition.id(),
                "the records' time ran out before they were invoked; the source takes them back"
            );
            return Ok(None);
        }
        // The lease fence: no invocation on a lease not confirmed lately (a runner that was
        // paused finds out here that the partition was taken).
        self.partition.fence().await?;
        loop {
            // A provisioned Kafka mapping's pollers invoke so many at once, over all partitions;
            // the slot is held for the invocation only, not for the backoff after a failed one.
            let invoked = {
                let _slot = match &self.ctx.invocation_slots {
                    Some(slots) => slots.clone().acquire_owned().await.ok(), // never closed
                    None => None,
                };
                self.ctx.invoker.invoke(&self.ctx.settings.function_name, payload.clone()).await
            };
            match invoked {
                Ok(i) => {
                    let mut s = self.ctx.stats();
                    s.counts.invocations += 1;
                    s.last_invoke_end = self.ctx.started.elapsed();
                    drop(s);
                    self.ctx.touch();
                    return Ok(Some(i));
                }
                Err(e) => {
                    let throttle = e.is_throttle();
                    {
                        let mut s = self.ctx.stats();
                        if throttle { s.counts.throttles += 1 } else { s.counts.invoke_errors += 1 }
                    }
                    failed += 1;
                    if let Some(max_age) = self.ctx.settings.maximum_record_age
                        && now_unix() - oldest_arrival > max_age.as_secs_f64()
                    {
                        warn!(partition = self.partition.id(), error = %e, "could not invoke before the records passed MaximumRecordAgeInSeconds");
                        return Ok(None);
                    }
                    if until.is_some_and(|t| now_unix() + self.backoff(failed).as_secs_f64() > t) {
                        warn!(partition = self.partition.id(), error = %e, "could not invoke before the records' time ran out; the source takes them back");
                        return Ok(None);
                    }
                    if throttle {
                        warn!(partition = self.partition.id(), error = %e, "invoke throttled or unreachable; retrying");
                    } else {
                        // Not the function's answer: AWS retries these too; the shard waits, the
                        // other shards go on.
                        warn!(partition = self.partition.id(), error = %e, "could not invoke; retrying until the records expire");
                    }
                    tokio::time::sleep(self.backoff(failed)).await;
                }
            }
        }
    }

    async fn done(&self, records: &[P::Record]) -> Result<(), MappingError> {
        if records.is_empty() {
            return Ok(());
        }
        self.ctx.pending.fetch_sub(records.len() as i64, Ordering::SeqCst);
        let window = self.window.as_ref().map(|w| WindowCheckpoint { start: w.start, state: w.state.clone() });
        self.partition.done(records, window).await
    }

    pub(super) async fn give_up(
        &self,
        records: &[P::Record],
        condition: Condition,
        last: Option<(&str, Option<&str>)>,
        invokes: u32,
    ) -> Result<(), MappingError> {
        if self.partition.take_back(records, condition).await? {
            self.ctx.pending.fetch_sub(records.len() as i64, Ordering::SeqCst);
            warn!(
                partition = self.partition.id(),
                count = records.len(),
                condition = condition.as_str(),
                "records handed back to the broker (requeued)"
            );
            self.ctx.stats().counts.requeued += records.len() as u64;
            return Ok(());
        }
        let window = self.window.as_ref().map(|w| (w, false, false));
        let payload = self.event(records, window);
        let fresh = uuid::Uuid::new_v4().to_string();
        let (request_id, function_error) = last.unwrap_or((&fresh, None));
        let function_arn = self.ctx.settings.function_arn();
        let ctx = FailureContext {
            request_id,
            function_arn: &function_arn,
            condition,
            invoke_count: invokes,
            function_error,
        };
        let record = failure_record(&ctx, self.partition.batch_info(records), now_unix());
        let (first, last_seq) = (records[0].position(), records[records.len() - 1].position());
        // AWS (monitoring-metrics-types): DroppedEventCount counts the records given up; "Dropped
        // events also excludes events that you send to an on-failure destination".
        match &self.ctx.destination {
            Some(d) => {
                let at = d.send(&record, Some(&payload), self.partition.id()).await?;
                self.ctx.settings.event_counts(&[("OnFailureDestinationDeliveredEventCount", records.len() as u64)]);
                warn!(
                    partition = self.partition.id(),
                    first,
                    last = last_seq,
                    count = records.len(),
                    condition = condition.as_str(),
                    destination = at,
                    "records sent to the failure destination"
                );
                let mut s = self.ctx.stats();
                match condition {
                    Condition::RecordAgeExceeded => s.counts.expired += records.len() as u64,
                    Condition::RetryAttemptsExhausted | Condition::MaximumPayloadSizeExceeded => {
                        s.counts.to_destination += records.len() as u64
                    }
                }
            }
            None => {
                self.ctx.settings.event_counts(&[("DroppedEventCount", records.len() as u64)]);
                warn!(
                    partition = self.partition.id(),
                    first,
                    last = last_seq,
                    count = records.len(),
                    condition = condition.as_str(),
                    "records given up with no failure destination: discarded"
                );
                self.ctx.stats().counts.discarded += records.len() as u64;
            }
        }
        self.done(records).await
    }

    /// Delivers one batch: retries, bisection, record age and the failure destination.
    pub(crate) async fn deliver(&mut self, batch: Vec<P::Record>) -> Result<(), MappingError> {
        let settings = self.ctx.settings.clone();
        if let (Some(ws), Some(t)) = (batch.first().and_then(|r| self.window_of(r)), settings.tumbling_window)
            && self.window.is_none()
        {
            self.open_window(ws, t.as_secs() as i64, WindowState::new());
        }
        let mut queue = VecDeque::from([Pending::<P::Record> { records: batch, retries: 0, invokes: 0, first: true }]);
        while let Some(mut p) = queue.pop_front() {
            if let Some(max_age) = settings.maximum_record_age {
                let oldest_allowed = now_unix() - max_age.as_secs_f64();
                let expired = p.records.iter().take_while(|r| r.arrival() < oldest_allowed).count();
                if expired > 0 {
                    let old: Vec<P::Record> = p.records.drain(..expired).collect();
                    self.give_up(&old, Condition::RecordAgeExceeded, None, p.invokes).await?;
                }
                if p.records.is_empty() {
                    continue;
                }
            }
            let window = self.window.as_ref().map(|w| (w, false, false));
            let payload = self.event(&p.records, window);
            // IteratorAge as AWS defines it (monitoring-metrics-types): "the age of the last
            // record in the event ... the time between when a stream receives the record and when
            // the event source mapping sends the event to the function": at every send, retries
            // and bisected halves included, so a partition blocked on a failing batch shows an
            // age that grows until it is unblocked.
            self.record_age(&p.records);
            if p.first {
                let now = now_unix();
                let mut s = self.ctx.stats();
                for r in &p.records {
                    s.delays.record((now - r.arrival()) * 1000.0);
                }
                if let Some(tx) = &self.ctx.options.delivered {
                    let send = |data: &[u8]| {
                        let _ = tx.send(crate::mapping::Delivered {
                            hash: xxhash_rust::xxh3::xxh3_64(data),
                            invoked_at: now,
                        });
                    };
                    for r in &p.records {
                        self.partition.delivered_items(r, &mut |data| send(data));
                    }
                }
            }
            self.ctx.stats().batch(p.records.len() as u32);
            debug!(
                partition = self.partition.id(),
                lane = self.lane_no,
                records = p.records.len(),
                first = p.records[0].position(),
                "invoking"
            );
            let oldest = p.records.iter().map(|r| r.arrival()).fold(f64::INFINITY, f64::min);
            let until = self.partition.invoke_until(&p.records);
            let Some(invoked) = self.invoke(payload, oldest, until).await? else {
                // Never invoked and now too old: given up as AWS does, with the record age.
                let records = std::mem::take(&mut p.records);
                self.give_up(&records, Condition::RecordAgeExceeded, None, p.invokes).await?;
                continue;
            };
            p.invokes += 1;
            p.first = false;
            let verdict = judge(
                &invoked.answer,
                |id| self.partition.item_index(&p.records, id),
                settings.report_batch_item_failures,
                self.window.is_some(),
            );
            // AWS: FailedInvokeEventCount counts the events of a failed invocation and, with
            // partial batch responses, those of a response with batch item failures.
            let failed_events = match &verdict {
                Verdict::Success { .. } => 0,
                Verdict::RetryFrom { index, failed, .. } => match self.partition.failures_stand_alone() {
                    true => failed.len(),
                    false => p.records.len() - index,
                },
                Verdict::Failed { .. } => p.records.len(),
            };
            settings.event_counts(&[
                ("InvokedEventCount", p.records.len() as u64),
                ("FailedInvokeEventCount", failed_events as u64),
            ]);
            match verdict {
                Verdict::Success { state } => {
                    self.set_state(state);
                    self.done(&p.records).await?;
                }
                Verdict::RetryFrom { index, failed, state } => {
                    self.ctx.stats().counts.partial_failures += 1;
                    self.set_state(state);
                    let ok: Vec<P::Record> = if self.partition.failures_stand_alone() {
                        // A queue: every message the response does not name succeeded.
                        let mut failed = failed.into_iter().peekable();
                        let (mut ok, mut bad) = (Vec::new(), Vec::new());
                        for (i, r) in std::mem::take(&mut p.records).into_iter().enumerate() {
                            if failed.next_if_eq(&i).is_some() { bad.push(r) } else { ok.push(r) }
                        }
                        p.records = bad;
                        ok
                    } else {
                        p.records.drain(..index).collect()
                    };
                    self.done(&ok).await?;
                    info!(
                        partition = self.partition.id(),
                        from = p.records[0].position(),
                        retries = p.retries,
                        "partial failure: retrying from the lowest failed record"
                    );
                    // A partial failure answered normally: no functionError in the failure record.
                    self.retry_or_give_up(p, &mut queue, &invoked.request_id, None).await?;
                }
                Verdict::Failed { reason, function_error } => {
                    self.ctx.stats().counts.function_errors += 1;
                    warn!(
                        partition = self.partition.id(),
                        first = p.records[0].position(),
                        records = p.records.len(),
                        retries = p.retries,
                        reason,
                        "batch failed"
                    );
                    if settings.bisect_on_error && p.records.len() > 1 {
                        // Splitting does not use up a retry.
                        self.ctx.stats().counts.bisections += 1;
                        let second = p.records.split_off(p.records.len() / 2);
                        queue.push_front(Pending {
                            records: second,
                            retries: p.retries,
                            invokes: p.invokes,
                            first: false,
                        });
                        queue.push_front(Pending {
                            records: p.records,
                            retries: p.retries,
                            invokes: p.invokes,
                            first: false,
                        });
                    } else {
                        let fe = function_error.as_deref().or(Some("Unhandled"));
                        self.retry_or_give_up(p, &mut queue, &invoked.request_id, fe).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// After a failed attempt: retry `p` (first in line, after a backoff), or, with its retries
    /// used up, hand it to the failure destination.
    async fn retry_or_give_up(
        &self,
        mut p: Pending<P::Record>,
        queue: &mut VecDeque<Pending<P::Record>>,
        request_id: &str,
        function_error: Option<&str>,
    ) -> Result<(), MappingError> {
        let max = self.ctx.settings.maximum_retry_attempts;
        if max >= 0 && p.retries >= max {
            let last = Some((request_id, function_error));
            return self.give_up(&p.records, Condition::RetryAttemptsExhausted, last, p.invokes).await;
        }
        tokio::time::sleep(self.backoff(p.retries)).await;
        p.retries += 1;
        self.ctx.stats().counts.retries += 1;
        queue.push_front(p);
        Ok(())
    }

    fn set_state(&mut self, state: Option<WindowState>) {
        if let (Some(w), Some(state)) = (self.window.as_mut(), state) {
            // Its size as JSON, as the function returned it.
            let size = serde_json::to_vec(&state).map_or(usize::MAX, |v| v.len());
            w.early = size > MAX_STATE;
            w.state = state;
        }
    }

    fn record_age(&self, records: &[P::Record]) {
        if let Some(last) = records.last() {
            let age = ((now_unix() - last.arrival()) * 1000.0).max(0.0);
            // AWS publishes IteratorAge for streams only (monitoring-metrics-types: "For event
            // source mappings that read from streams"); a Kafka mapping publishes OffsetLag, an
            // Amazon MQ one neither.
            if self.ctx.reads_a_stream() {
                crate::cloudwatch::put(
                    crate::cloudwatch::LAMBDA,
                    &[("FunctionName", &self.ctx.settings.function_name)],
                    &[("IteratorAge", "Milliseconds", age)],
                );
            }
            let mut s = self.ctx.stats();
            s.counts.iterator_age_ms_last = age;
            s.counts.iterator_age_ms_max = s.counts.iterator_age_ms_max.max(age);
        }
    }

    /// The window's final invocation (no records, the state so far); retried until it succeeds,
    /// as AWS does: the shard waits.
    pub(super) async fn finalize_window(&mut self, early: bool) -> Result<(), MappingError> {
        let Some(w) = self.window.as_ref() else { return Ok(()) };
        let payload = self.event(&[], Some((w, true, early)));
        let start = w.start;
        let mut failures = 0i64;
        loop {
            // No records to age: retried until it is invoked.
            let Some(invoked) = self.invoke(payload.clone(), f64::INFINITY, None).await? else { continue };
            match judge(
                &invoked.answer,
                |id| Err(format!("itemIdentifier {id} names no record: a final window invocation has none")),
                self.ctx.settings.report_batch_item_failures,
                true,
            ) {
                Verdict::Success { .. } => break,
                other => {
                    self.ctx.stats().counts.function_errors += 1;
                    warn!(partition = self.partition.id(), window = start, verdict = ?other, "final window invocation failed; the shard waits and retries");
                    tokio::time::sleep(self.backoff(failures)).await;
                    failures += 1;
                    self.ctx.stats().counts.retries += 1;
                }
            }
        }
        info!(partition = self.partition.id(), window = start, early, "window final invocation done");
        self.ctx.stats().counts.windows_final += 1;
        self.window = None;
        self.window_closed();
        self.partition.window_closed().await
    }
}
