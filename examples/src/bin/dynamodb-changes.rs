//! A DynamoDB Streams function in one closure: item changes, typed from the new image.
use pushpull::invocation::Invocation;
use pushpull::pull::Options;
use pushpull::pull::dynamodb::DynamoDbRecord;

#[derive(Debug, pushpull::serde::Deserialize)]
#[serde(crate = "pushpull::serde")]
struct Item {
    #[serde(rename = "Id")]
    id: u64,
    #[serde(rename = "Message")]
    message: String,
}

async fn handle(record: DynamoDbRecord, _invocation: Invocation) -> Result<(), pushpull::pull::DecodeError> {
    if let Some(item) = record.new_image::<Item>()? {
        pushpull::tracing::info!(id = item.id, message = item.message, change = record.event_name, "item");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), pushpull::lambda::Error> {
    pushpull::lambda::run_dynamodb(Options::default(), handle).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushpull::pull::dynamodb::DynamoDbEvent;

    #[tokio::test]
    async fn the_sample_event_is_handled_whole() {
        let event = DynamoDbEvent::from_slice(include_bytes!("../../../events/dynamodb-batch.json")).unwrap();
        let invocation = Invocation::new("test");
        let result =
            pushpull::pull::dynamodb::process_async(&event, Options::default(), |r| handle(r, invocation.clone()))
                .await
                .unwrap();
        assert_eq!((result.processed, result.item_failures().len()), (3, 0));
    }
}
