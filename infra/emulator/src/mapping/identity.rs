//! Which mapping a runner's positions belong to. Positions are kept under the mapping's UUID
//! ([`super::MappingSettings::uuid`]): a restarted runner of the same mapping resumes after its
//! checkpoints; a new mapping (another event source, polling against enhanced fan-out, another
//! starting position: what CloudFormation would replace) starts at its StartingPosition, as on
//! AWS. The first runner of a mapping writes `<prefix>/mapping.json`; the summary says which it
//! was.
use pushpull::checkpoint::{CheckpointError, Checkpoints};
use pushpull::store::Store;
use serde::{Deserialize, Serialize};

use super::MappingSettings;
use super::clock::now_unix;

/// What `mapping.json` holds: the mapping's identity, for a person reading the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Identity {
    uuid: String,
    function: String,
    event_source_arn: String,
    starting_position: String,
    created_at: f64,
}

/// Whether this mapping's positions were found or are new.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// A new mapping: every partition starts at the StartingPosition.
    New,
    /// The mapping existed: partitions resume after their checkpoints.
    Resumed,
}

/// Notes the mapping of `settings` under `prefix`: new if no runner noted it before.
pub async fn register(
    store: &Checkpoints<Store>,
    prefix: &str,
    settings: &MappingSettings,
) -> Result<Origin, CheckpointError> {
    let key = format!("{prefix}/mapping.json");
    if store.load::<Identity>(&key).await?.is_some() {
        return Ok(Origin::Resumed);
    }
    let identity = Identity {
        uuid: settings.uuid(),
        function: settings.function_name.clone(),
        event_source_arn: settings.event_source_arn().to_owned(),
        starting_position: settings.starting_position.to_string(),
        created_at: now_unix(),
    };
    match store.create(&key, &identity).await {
        Ok(_) => Ok(Origin::New),
        // Another runner of the same mapping was first: the same mapping, started at once.
        Err(CheckpointError::Conflict { .. }) => Ok(Origin::New),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::testkit::settings;

    /// A restarted runner of the same mapping resumes; what CloudFormation would replace
    /// ("Update requires: Replacement" for EventSourceArn, StartingPosition and
    /// StartingPositionTimestamp, AWS::Lambda::EventSourceMapping) is a new mapping with positions
    /// of its own.
    #[tokio::test]
    async fn positions_belong_to_one_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let store = Checkpoints::new(Store::file(dir.path()));
        let polling = settings(|_| {});
        let prefix =
            |s: &MappingSettings| crate::mapping::RunnerOptions::new(s, Store::file(dir.path())).checkpoint_prefix;
        assert_eq!(register(&store, &prefix(&polling), &polling).await.unwrap(), Origin::New);
        assert_eq!(register(&store, &prefix(&polling), &polling).await.unwrap(), Origin::Resumed);
        let fan_out =
            settings(|r| r.stream = Some("arn:aws:kinesis:us-east-1:000000000000:stream/s/consumer/c:1".into()));
        let latest = settings(|r| r.starting_position = Some("LATEST".into()));
        let other_stream = settings(|r| r.stream = Some("arn:aws:kinesis:us-east-1:000000000000:stream/t".into()));
        for s in [&fan_out, &latest, &other_stream] {
            assert_ne!(prefix(s), prefix(&polling));
            assert_eq!(register(&store, &prefix(s), s).await.unwrap(), Origin::New, "{s:?}");
        }
        // The same settings read again (another runner, a restart): the same mapping.
        assert_eq!(prefix(&settings(|_| {})), prefix(&polling));
    }
}
