//! An S3 push function in one closure: CSV lines `customer,amount` become JSON records keyed by
//! customer; the header is skipped and lines that do not parse are quarantined with their reason.
//! Settings come from the environment (`STREAM_NAME`, `CHECKPOINT_URI`, `OUTPUT_URI`,
//! `QUARANTINE_URI`, ...); streaming, gzip, checkpoints and resume come from the library.
use pushpull::push::line::{Line, LineReject};
use pushpull::sink::OutRecord;

/// One line: `Ok(Some(record))` to send, `Ok(None)` to skip, `Err(reason)` to quarantine.
fn csv_line(line: Line<'_>) -> Result<Option<OutRecord>, LineReject> {
    let text = line.text()?;
    if text.starts_with("customer,") {
        return Ok(None); // the header
    }
    let (customer, amount) = text.split_once(',').ok_or("expected customer,amount")?;
    let amount: f64 = amount.trim().parse().map_err(|e| format!("amount {amount:?}: {e}"))?;
    let json = pushpull::serde_json::json!({ "customer": customer, "amount": amount }).to_string();
    Ok(Some(OutRecord::keyed(customer, json)))
}

#[tokio::main]
async fn main() -> Result<(), pushpull::lambda::Error> {
    pushpull::lambda::run_s3_lines(csv_line).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushpull::config::{Env, PushSettings};
    use pushpull::invocation::Invocation;
    use pushpull::push::PushHandler;
    use pushpull::push::source::FileSource;
    use pushpull::sink::{PutOutcome, RecordSink, SinkError};

    #[derive(Default)]
    struct Memory(std::sync::Mutex<Vec<OutRecord>>);

    impl RecordSink for Memory {
        async fn put_records(&self, records: &[OutRecord]) -> Result<PutOutcome, SinkError> {
            self.0.lock().unwrap().extend_from_slice(records);
            Ok(PutOutcome::all_written("shardId-0", "1"))
        }
    }

    #[tokio::test]
    async fn csv_lines_become_records_and_bad_ones_are_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("in/bucket")).unwrap();
        std::fs::write(dir.path().join("in/bucket/orders.csv"), "customer,amount\nann,3.5\nbob,lots\nann,1\n").unwrap();
        let settings =
            PushSettings::from_env(Env::from_pairs([("PUT_LINGER_MS", "0")]).with_local_locations(dir.path())).unwrap();
        let handler = PushHandler::builder(settings)
            .source(FileSource::new(dir.path().join("in")))
            .lines(csv_line)
            .sink(Memory::default())
            .build();
        let event = r#"{"Records":[{"eventVersion":"2.1","eventSource":"aws:s3","eventName":"ObjectCreated:Put",
            "s3":{"bucket":{"name":"bucket"},"object":{"key":"orders.csv","eTag":"e","sequencer":"01"}}}]}"#;
        let summary = handler.handle(event.as_bytes(), &Invocation::new("r1")).await.unwrap();
        let object = &summary.objects[0];
        assert_eq!((object.records, object.quarantined, object.skipped_lines), (2, 1, 1));
        let sent = handler.sink().0.lock().unwrap();
        assert_eq!(sent[0].partition_key, "ann");
        assert_eq!(&sent[1].data[..], br#"{"amount":1.0,"customer":"ann"}"#);
        assert_eq!((sent[0].line, sent[1].line), (2, 4), "the loop notes each record's line");
    }
}
