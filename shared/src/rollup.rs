//! The sample pull function's logic: check each Kinesis record is JSON, count records per
//! group, and report the records it could not handle by the partial batch response rule.
//!
//! ```
//! use pushpull::config::{Env, PullSettings};
//! use pushpull::rollup::RollupHandler;
//!
//! let handler = RollupHandler::new(PullSettings::from_env(Env::from_pairs([("GROUP_BY_FIELD", "user")])).unwrap());
//! let payload = r#"{"Records":[
//!  {"kinesis":{"partitionKey":"p","sequenceNumber":"1","data":"eyJ1c2VyIjoiYSJ9","approximateArrivalTimestamp":1},"eventID":"shardId-0:1"},
//!  {"kinesis":{"partitionKey":"p","sequenceNumber":"2","data":"bm9wZQ==","approximateArrivalTimestamp":1},"eventID":"shardId-0:2"}]}"#;
//! let (response, rollup) = handler.handle(payload).unwrap();
//! assert_eq!(response.batch_item_failures[0].item_identifier.as_deref(), Some("2"));
//! assert_eq!(rollup.groups["a"].count, 1);
//! ```
use std::collections::BTreeMap;

use aws_lambda_events::event::streams::KinesisEventResponse;
use serde::Serialize;
use tracing::{info, warn};

use crate::config::PullSettings;
use crate::kinesis_event::KinesisEvent;
use crate::ndjson;
use crate::pull::{PullError, process_batch};

/// Why an invocation failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum RollupError {
    /// The payload is not a Kinesis event.
    #[error("not a Kinesis event: {0}")]
    Event(#[from] serde_json::Error),
    /// A record cannot be reported.
    #[error(transparent)]
    Pull(#[from] PullError),
}

impl From<RollupError> for lambda_runtime::Diagnostic {
    fn from(e: RollupError) -> Self {
        let error_type = match e {
            RollupError::Event(_) => "RollupError.Event",
            RollupError::Pull(_) => "RollupError.Pull",
        };
        tracing::error!(error_type, error = %e, "invocation failed");
        lambda_runtime::Diagnostic { error_type: error_type.to_owned(), error_message: e.to_string() }
    }
}

/// Counts for one group.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Group {
    /// Records in the group.
    pub count: u64,
    /// Sum of `SUM_FIELD` over them (0 when unset).
    pub sum: f64,
}

/// Totals of one batch.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Rollup {
    /// Per group key.
    pub groups: BTreeMap<String, Group>,
}

/// Handles Kinesis batches for the sample pipeline.
#[derive(Debug, Clone)]
pub struct RollupHandler {
    settings: PullSettings,
}

impl RollupHandler {
    /// A handler with these settings.
    pub fn new(settings: PullSettings) -> Self {
        RollupHandler { settings }
    }

    /// Settings from the environment, every problem reported at once.
    pub fn from_env() -> Result<Self, crate::config::ConfigErrors> {
        Ok(Self::new(PullSettings::from_env(crate::config::Env::from_process())?))
    }

    /// Processes one invocation payload.
    pub fn handle(&self, payload: &str) -> Result<(KinesisEventResponse, Rollup), RollupError> {
        let event: KinesisEvent<'_> = serde_json::from_str(payload)?;
        let mut rollup = Rollup::default();
        let group_field = self.settings.group_by_field.as_deref();
        let sum_field = self.settings.sum_field.as_deref();
        let result = process_batch(&event, |record| -> Result<(), String> {
            let group = match group_field {
                Some(field) => ndjson::inspect(record.data, Some(field))
                    .map_err(|e| e.to_string())?
                    .map(|g| g.into_owned())
                    .unwrap_or_default(),
                None => {
                    ndjson::inspect(record.data, None).map_err(|e| e.to_string())?;
                    record.partition_key.to_owned()
                }
            };
            let amount = match sum_field {
                Some(field) => match ndjson::inspect(record.data, Some(field)).map_err(|e| e.to_string())? {
                    None => 0.0,
                    Some(v) => v.parse::<f64>().map_err(|_| format!("{field} is not a number: {v}"))?,
                },
                None => 0.0,
            };
            let g = rollup.groups.entry(group).or_default();
            g.count += 1;
            g.sum += amount;
            Ok(())
        })?;
        for f in &result.failures {
            warn!(shard_id = %f.shard_id, sequence_number = %f.sequence_number, reason = %f.reason, "record failed");
        }
        info!(
            records = event.records.len(),
            processed = result.processed,
            failed = result.failures.len(),
            groups = rollup.groups.len(),
            "batch processed"
        );
        Ok((result.response(), rollup))
    }
}
