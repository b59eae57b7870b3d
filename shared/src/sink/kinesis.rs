//! The Kinesis stream as a [`RecordSink`] (feature `kinesis-sink`): PutRecords, and reading
//! back what a crashed invocation wrote.
use std::collections::BTreeMap;

use bytes::Bytes;

use super::{FailedEntry, OutRecord, PutOutcome, RecordSink, SinkError, WrittenRecord};

/// A Kinesis stream.
#[derive(Debug, Clone)]
pub struct KinesisSink {
    client: aws_sdk_kinesis::Client,
    stream_name: String,
}

impl KinesisSink {
    /// Records go to `stream_name`.
    pub fn new(client: aws_sdk_kinesis::Client, stream_name: impl Into<String>) -> Self {
        KinesisSink { client, stream_name: stream_name.into() }
    }
}

impl RecordSink for KinesisSink {
    fn can_read_back(&self) -> bool {
        true
    }

    async fn written_since(
        &self,
        positions: &BTreeMap<String, String>,
        since_ms: u64,
        until_ms: u64,
    ) -> Result<Vec<WrittenRecord>, SinkError> {
        let shards = self.list_shards().await?;
        let shard_ids: Vec<String> = shards.iter().map(|s| s.shard_id().to_owned()).collect();
        let mut out = Vec::new();
        for shard_id in &shard_ids {
            self.read_shard(shard_id, positions.get(shard_id), since_ms, until_ms, &mut out).await?;
        }
        Ok(out)
    }

    async fn shard_map(&self) -> Result<Option<crate::shard_map::ShardMap>, SinkError> {
        let mut shards = Vec::new();
        for shard in self.list_shards().await? {
            // Closed shards (a reshard's parents) take no writes.
            if shard.sequence_number_range().is_some_and(|r| r.ending_sequence_number().is_some()) {
                continue;
            }
            let range = shard.hash_key_range();
            let parse = |s: Option<&str>| s.and_then(|s| s.parse::<u128>().ok());
            let (Some(start), Some(end)) =
                (parse(range.map(|r| r.starting_hash_key())), parse(range.map(|r| r.ending_hash_key())))
            else {
                let message = format!(
                    "ListShards {}: shard {} has no readable hash-key range",
                    self.stream_name,
                    shard.shard_id()
                );
                return Err(SinkError::new(message, false));
            };
            shards.push((shard.shard_id().to_owned(), start, end));
        }
        Ok(Some(crate::shard_map::ShardMap::new(shards)))
    }

    async fn put_records(&self, records: &[OutRecord]) -> Result<PutOutcome, SinkError> {
        use aws_sdk_kinesis::types::PutRecordsRequestEntry;
        let entries = records
            .iter()
            .map(|r| {
                PutRecordsRequestEntry::builder()
                    .partition_key(r.partition_key.as_str())
                    .data(aws_sdk_kinesis::primitives::Blob::new(r.data.to_vec()))
                    .build()
                    .map_err(|e| SinkError::new(format!("line {}: {e}", r.line), false).with_source(e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let out =
            self.client.put_records().stream_name(&self.stream_name).set_records(Some(entries)).send().await.map_err(
                |e| {
                    let message = format!("PutRecords to stream {}: {}", self.stream_name, crate::aws::describe(&e));
                    SinkError::new(message, crate::aws::classify(&e).is_retryable()).with_source(e)
                },
            )?;
        if out.records().len() != records.len() {
            return Err(SinkError::new(
                format!(
                    "PutRecords to stream {}: {} results for {} records",
                    self.stream_name,
                    out.records().len(),
                    records.len()
                ),
                true,
            ));
        }
        let mut outcome = PutOutcome::default();
        for (index, r) in out.records().iter().enumerate() {
            match r.error_code() {
                None => outcome.note_written(r.shard_id().unwrap_or_default(), r.sequence_number().unwrap_or_default()),
                Some(code) => outcome.failed.push(FailedEntry {
                    index,
                    code: code.to_owned(),
                    message: r.error_message().unwrap_or_default().to_owned(),
                }),
            }
        }
        Ok(outcome)
    }
}

impl KinesisSink {
    /// Every shard of the stream, closed ones included. ListShards pages: the first call names the
    /// stream, later ones only the token.
    async fn list_shards(&self) -> Result<Vec<aws_sdk_kinesis::types::Shard>, SinkError> {
        let mut shards = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let req = match &token {
                Some(t) => self.client.list_shards().next_token(t),
                None => self.client.list_shards().stream_name(&self.stream_name),
            };
            let page = req.send().await.map_err(|e| {
                let message = format!("ListShards {}: {}", self.stream_name, crate::aws::describe(&e));
                SinkError::new(message, crate::aws::classify(&e).is_retryable()).with_source(e)
            })?;
            shards.extend(page.shards().iter().cloned());
            token = page.next_token().map(str::to_owned);
            if token.is_none() {
                return Ok(shards);
            }
        }
    }

    async fn read_shard(
        &self,
        shard_id: &str,
        after: Option<&String>,
        since_ms: u64,
        until_ms: u64,
        out: &mut Vec<WrittenRecord>,
    ) -> Result<(), SinkError> {
        use aws_sdk_kinesis::types::ShardIteratorType;
        let fail = |op: &str, e: &dyn std::fmt::Display, retryable: bool| {
            SinkError::new(format!("{op} {}/{shard_id}: {e}", self.stream_name), retryable)
        };
        // Throttles (a shard serves 5 reads a second to all its readers) are waited out;
        // an iterator that expires (5 minutes, or as the realism layer injects) is renewed
        // after the last record read.
        let mut last_seq: Option<String> = after.cloned();
        let mut throttled = 0u32;
        let mut renewals = 0u32;
        let mut iterator = None;
        loop {
            if iterator.is_none() {
                let mut req = self.client.get_shard_iterator().stream_name(&self.stream_name).shard_id(shard_id);
                req = match &last_seq {
                    Some(seq) => {
                        req.shard_iterator_type(ShardIteratorType::AfterSequenceNumber).starting_sequence_number(seq)
                    }
                    None => req
                        .shard_iterator_type(ShardIteratorType::AtTimestamp)
                        .timestamp(aws_smithy_types::DateTime::from_millis(since_ms as i64)),
                };
                match req.send().await {
                    Ok(it) => iterator = it.shard_iterator().map(str::to_owned),
                    Err(e) if crate::aws::classify(&e).is_retryable() && throttled < MAX_THROTTLED => {
                        throttled += 1;
                        tokio::time::sleep(read_backoff(throttled)).await;
                        continue;
                    }
                    Err(e) => {
                        let retryable = crate::aws::classify(&e).is_retryable();
                        return Err(fail("GetShardIterator", &crate::aws::describe(&e), retryable).with_source(e));
                    }
                }
                if iterator.is_none() {
                    return Ok(());
                }
            }
            let Some(current) = iterator.take() else { return Ok(()) };
            let page = match self.client.get_records().shard_iterator(&current).limit(10_000).send().await {
                Ok(page) => page,
                Err(e) => {
                    let expired = e.as_service_error().is_some_and(|se| se.is_expired_iterator_exception());
                    if expired && renewals < MAX_THROTTLED {
                        renewals += 1;
                        continue; // a new iterator after the last record read
                    }
                    if crate::aws::classify(&e).is_retryable() && throttled < MAX_THROTTLED {
                        throttled += 1;
                        tokio::time::sleep(read_backoff(throttled)).await;
                        iterator = Some(current);
                        continue;
                    }
                    let retryable = crate::aws::classify(&e).is_retryable();
                    return Err(fail("GetRecords", &crate::aws::describe(&e), retryable).with_source(e));
                }
            };
            if let Some(r) = page.records().last() {
                last_seq = Some(r.sequence_number().to_owned());
            }
            let mut past_window = false;
            for r in page.records() {
                let arrival = r.approximate_arrival_timestamp().map_or(0, |t| t.to_millis().unwrap_or(0).max(0) as u64);
                if arrival > until_ms {
                    past_window = true;
                    break;
                }
                out.push(WrittenRecord {
                    partition_key: r.partition_key().unwrap_or_default().to_owned(),
                    data: Bytes::copy_from_slice(r.data().as_ref()),
                });
            }
            // An empty page is not the end: AWS may answer empty pages before records that exist
            // ("it might take multiple calls" to get past empty parts of a shard); caught up is
            // MillisBehindLatest 0.
            let caught_up = page.records().is_empty() && page.millis_behind_latest().unwrap_or(0) == 0;
            if past_window || caught_up {
                return Ok(());
            }
            iterator = page.next_shard_iterator().map(str::to_owned);
            if iterator.is_none() {
                return Ok(()); // a closed shard read to its end
            }
        }
    }
}

/// Throttled or failed reads in a row before reading back gives up (the invocation fails and is
/// retried).
const MAX_THROTTLED: u32 = 40;

fn read_backoff(attempt: u32) -> std::time::Duration {
    crate::backoff::Backoff::new(std::time::Duration::from_millis(100), std::time::Duration::from_secs(1))
        .delay(attempt)
}
