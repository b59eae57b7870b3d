//! Bad and hostile *responses* from a function to the local event source mapping: not JSON,
//! huge, wrong types, identifiers not in the batch. Each case runs the real mapping
//! (`pushpull_local::mapping::Runner`) on a LocalStack stream of three records in front of a real
//! function binary (`raw-answer`, which speaks the Runtime API itself so it can send bytes that
//! `lambda_runtime` never would) answering the case's bytes once and a plain success after.
//! Every case must end with the three records delivered, none given up, the mapping still
//! running, and exactly the invocations AWS's rule gives:
//!
//! AWS, "Configuring partial batch response with Kinesis Data Streams and Lambda"
//! (docs.aws.amazon.com/lambda/latest/dg/services-kinesis-batchfailurereporting.html):
//! > Lambda treats a batch as a complete success if you return any of the following: An empty
//! > `batchItemFailure` list; A null `batchItemFailure` list; An empty `EventResponse`; A null
//! > `EventResponse`. Lambda treats a batch as a complete failure if you return any of the
//! > following: An empty string `itemIdentifier`; A null `itemIdentifier`; An `itemIdentifier` with
//! > a bad key name.
//! > If the `batchItemFailures` array contains multiple items, Lambda uses the record with the
//! > lowest sequence number as the checkpoint. Lambda then retries all records starting from that
//! > checkpoint.
//! > Even when your function code returns partial batch failure responses, these responses will
//! > not be processed by Lambda unless the `ReportBatchItemFailures` feature is explicitly turned
//! > on for your event source mapping.
//!
//! Lambda quotas (docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html): "Invocation
//! payload (request and response): 6 MB each for request and response" (synchronous); over it the
//! Runtime API answers the function 413 "Exceeded maximum allowed payload size (6291556 bytes)."
//! and the invoker gets `Function.ResponseSizeTooLarge`.
//!
//! What AWS does not document, and what we chose (ARCHITECTURE.md, "Responses the mapping
//! reads"): a body that is not JSON, an identifier that is not a sequence number of the batch, and
//! a `batchItemFailures` of the wrong type fail the whole batch (the safe side: nothing is skipped;
//! LocalStack does the same); JSON without a `batchItemFailures` key (a string, a list, a
//! differently spelled key) is a response without failures, i.e. success, as AWS's "empty
//! EventResponse" rule reads.
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use base64::Engine as _;
use futures_util::StreamExt as _;
use pushpull::store::Store;
use pushpull_local::invoke::InvokeServer;
use pushpull_local::localstack::{ACCOUNT, Local, REGION};
use pushpull_local::mapping::{Clients, RawSettings, Runner, RunnerOptions, Summary};
use pushpull_local::runtime_api::FunctionSpec;
use pushpull_tests::{function, local, unique};
use serde_json::{Value, json};

/// The tumbling window of the windowed cases, in seconds.
const WINDOW_S: f64 = 3.0;

/// What the mapping must do with the batch after the case's answer.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Then {
    /// The whole batch is done: one invocation.
    Done,
    /// Records from this index are retried (a partial failure).
    RetryFrom(usize),
    /// The whole batch failed and is retried.
    Failed,
}

/// Whether ReportBatchItemFailures / tumbling windows are on for the case.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Report,
    NoReport,
    Windowed,
}

struct Case {
    name: &'static str,
    answer: Vec<u8>,
    big: usize,
    mode: Mode,
    then: Then,
}

fn case(name: &'static str, answer: impl AsRef<[u8]>, then: Then) -> Case {
    Case { name, answer: answer.as_ref().to_vec(), big: 0, mode: Mode::Report, then }
}

fn cases() -> Vec<Case> {
    use Then::*;
    let one = |id: &str| format!(r#"{{"batchItemFailures":[{{"itemIdentifier":{id}}}]}}"#);
    let deep = "[".repeat(200_000);
    vec![
        // AWS's four success shapes, and what reads as them.
        case("empty_body", "", Done),
        case("null_body", "null", Done),
        case("empty_object", "{}", Done),
        case("null_list", r#"{"batchItemFailures":null}"#, Done),
        case("empty_list", r#"{"batchItemFailures":[]}"#, Done),
        case("whitespace_only", " \r\n\t ", Done),
        case("unknown_fields_ignored", r#"{"batchItemFailures":[],"statusCode":200,"x":{"y":[1,{"z":null}]}}"#, Done),
        case("a_json_string", r#""OK""#, Done),
        case("a_json_list", "[1,2,3]", Done),
        case("key_in_the_wrong_case", r#"{"BatchItemFailures":[{"itemIdentifier":"{seq1}"}]}"#, Done),
        // Partial failures: retry from the lowest.
        case("one_failure", one(r#""{seq1}""#), RetryFrom(1)),
        case(
            "unsorted_failures",
            r#"{"batchItemFailures":[{"itemIdentifier":"{seq2}"},{"itemIdentifier":"{seq1}"}]}"#,
            RetryFrom(1),
        ),
        case(
            "the_same_failure_twice",
            r#"{"batchItemFailures":[{"itemIdentifier":"{seq1}"},{"itemIdentifier":"{seq1}"}]}"#,
            RetryFrom(1),
        ),
        case(
            "extra_fields_in_an_entry",
            r#"{"batchItemFailures":[{"itemIdentifier":"{seq2}","reason":"x"}]}"#,
            RetryFrom(2),
        ),
        case(
            "every_record_failed",
            r#"{"batchItemFailures":[{"itemIdentifier":"{seq0}"},{"itemIdentifier":"{seq1}"},{"itemIdentifier":"{seq2}"}]}"#,
            RetryFrom(0),
        ),
        case(
            "state_without_a_window_ignored",
            r#"{"batchItemFailures":[{"itemIdentifier":"{seq1}"}],"state":{"a":"1"}}"#,
            RetryFrom(1),
        ),
        // AWS's three failure shapes.
        case("empty_identifier", one(r#""""#), Failed),
        case("null_identifier", one("null"), Failed),
        case("bad_key_name", r#"{"batchItemFailures":[{"itemId":"{seq1}"}]}"#, Failed),
        case("entry_without_a_key", r#"{"batchItemFailures":[{}]}"#, Failed),
        case(
            "a_good_and_an_empty_identifier",
            r#"{"batchItemFailures":[{"itemIdentifier":"{seq1}"},{"itemIdentifier":""}]}"#,
            Failed,
        ),
        // Identifiers that name no record of the batch.
        case("identifier_not_in_the_batch", one(r#""{seq2}0""#), Failed),
        case("identifier_not_a_number", one(r#""abc""#), Failed),
        case("identifier_a_json_number", one("12345"), Failed),
        case("identifier_with_spaces", one(r#"" {seq1} ""#), Failed),
        case("identifier_an_event_id", one(r#""shardId-000000000000:{seq1}""#), Failed),
        // batchItemFailures of the wrong type.
        case("failures_an_object", r#"{"batchItemFailures":{"itemIdentifier":"{seq1}"}}"#, Failed),
        case("failures_a_string", r#"{"batchItemFailures":"{seq1}"}"#, Failed),
        case("failures_a_list_of_strings", r#"{"batchItemFailures":["{seq1}"]}"#, Failed),
        // Not JSON at all.
        case("not_json", "not json", Failed),
        case("truncated_json", r#"{"batchItemFailures":[{"itemIdent"#, Failed),
        case("invalid_utf8", b"\xff\xfe{\"batchItemFailures\":[]}", Failed),
        case("nested_200000_deep", deep, Failed),
        // Size: over the 6 MB response limit is a function error; under it is read.
        Case { big: 6_400_000, ..case("over_6_mb", r#"{"pad":"{big}","batchItemFailures":[]}"#, Failed) },
        Case { big: 6_000_000, ..case("just_under_6_mb", r#"{"pad":"{big}","batchItemFailures":[]}"#, Done) },
        // Without ReportBatchItemFailures the body is not read, but a function error still counts.
        Case { mode: Mode::NoReport, ..case("no_report_not_json", "not json", Done) },
        Case { mode: Mode::NoReport, ..case("no_report_a_failure_ignored", one(r#""{seq1}""#), Done) },
        Case { mode: Mode::NoReport, big: 6_400_000, ..case("no_report_over_6_mb", "\"{big}\"", Failed) },
        // Tumbling windows: the response must carry state.
        Case { mode: Mode::Windowed, ..case("window_without_state", r#"{"batchItemFailures":[]}"#, Failed) },
        Case {
            mode: Mode::Windowed,
            ..case("window_state_a_string", r#"{"state":"s","batchItemFailures":[]}"#, Failed)
        },
        Case {
            mode: Mode::Windowed,
            ..case(
                "window_partial",
                r#"{"state":{"n":"1"},"batchItemFailures":[{"itemIdentifier":"{seq1}"}]}"#,
                RetryFrom(1),
            )
        },
    ]
}

/// The ids of one case's records.
fn ids(name: &str) -> [String; 3] {
    ["a", "b", "c"].map(|r| format!("{name}.{r}"))
}

async fn run_case(l: &Local, server: &InvokeServer, dir: &std::path::Path, c: &Case) -> Summary {
    let stream = unique("hostile-resp");
    l.ensure_stream(&stream, 1).await.unwrap();
    if c.mode == Mode::Windowed {
        // Put all three just after a window opens, so that one window holds them.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        tokio::time::sleep(Duration::from_secs_f64(WINDOW_S - now % WINDOW_S + 0.1)).await;
    }
    for (i, id) in ids(c.name).iter().enumerate() {
        let mut data = json!({ "id": id });
        if i == 0 {
            data["answer_b64"] = Value::from(base64::engine::general_purpose::STANDARD.encode(&c.answer));
            data["times"] = Value::from(1);
            data["big"] = Value::from(c.big);
        }
        l.kinesis
            .put_record()
            .stream_name(&stream)
            .partition_key("k")
            .data(Blob::new(data.to_string()))
            .send()
            .await
            .unwrap();
    }
    let raw = RawSettings {
        stream: Some(format!("arn:aws:kinesis:{REGION}:{ACCOUNT}:stream/{stream}")),
        function: Some("raw-answer".into()),
        starting_position: Some("TRIM_HORIZON".into()),
        function_response_types: Some(if c.mode == Mode::NoReport { "" } else { "ReportBatchItemFailures" }.into()),
        tumbling_window: (c.mode == Mode::Windowed).then(|| WINDOW_S.to_string()),
        maximum_retry_attempts: Some("3".into()),
        ..Default::default()
    };
    let settings = raw.validate().unwrap();
    let mut o = RunnerOptions::new(&settings, Store::file(dir.join("checkpoints").join(c.name))).fast_polling();
    o.stop_when_idle = Some(Duration::from_millis(1500));
    o.list_shards_every = Duration::from_millis(500);
    o.retry_backoff = Duration::from_millis(10);
    o.max_retry_backoff = Duration::from_millis(100);
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let s = Runner::run(settings, o, Clients::from(l), server.client(), rx).await;
    l.kinesis.delete_stream().stream_name(&stream).send().await.ok();
    s.unwrap_or_else(|e| panic!("{}: the mapping stopped: {e}", c.name))
}

#[tokio::test]
async fn hostile_responses_are_judged_by_aws_rule_and_nothing_is_lost_or_skipped() {
    let l = local().await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec: FunctionSpec = function("raw-answer", &[("SCRIPT_DIR", dir.path().to_str().unwrap())]);
    spec.timeout = Duration::from_secs(20);
    let server = InvokeServer::start(vec![spec], 0, 10).await.unwrap();
    let cases = cases();
    assert!(cases.len() >= 30, "{} cases", cases.len());

    let summaries: Vec<(usize, Summary)> = futures_util::stream::iter(cases.iter().enumerate())
        .map(|(i, c)| {
            let (l, server, dir) = (&l, &server, dir.path());
            async move {
                // A mapping that never goes idle is a failure of its own case, named.
                match tokio::time::timeout(Duration::from_secs(120), run_case(l, server, dir, c)).await {
                    Ok(s) => (i, s),
                    Err(_) => panic!("{}: the mapping did not finish the batch in 120 s", c.name),
                }
            }
        })
        .buffer_unordered(6)
        .collect()
        .await;

    let log: Vec<Value> = std::fs::read_to_string(dir.path().join("log.ndjson"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut wrong = Vec::new();
    for (i, s) in &summaries {
        let c = &cases[*i];
        let all = ids(c.name);
        let invocations: Vec<Vec<String>> = log
            .iter()
            .filter(|l| l["final"] != json!(true))
            .map(|l| l["ids"].as_array().unwrap().iter().map(|i| i.as_str().unwrap().to_owned()).collect::<Vec<_>>())
            .filter(|ids| ids.first().is_some_and(|id| id.starts_with(&format!("{}.", c.name))))
            .collect();
        let expected = match c.then {
            Then::Done => vec![all.to_vec()],
            Then::RetryFrom(i) => vec![all.to_vec(), all[i..].to_vec()],
            Then::Failed => vec![all.to_vec(), all.to_vec()],
        };
        let counts = (s.counts.function_errors, s.counts.partial_failures, s.counts.to_destination);
        let expected_counts = match c.then {
            Then::Done => (0, 0, 0),
            Then::RetryFrom(_) => (0, 1, 0),
            Then::Failed => (1, 0, 0),
        };
        if invocations != expected || counts != expected_counts || s.records_delivered != 3 {
            wrong.push(format!(
                "{}: expected {:?} {expected:?} (errors, partial, given up) {expected_counts:?}; got {invocations:?} {counts:?}, {} delivered",
                c.name, c.then, s.records_delivered
            ));
        }
    }
    assert!(wrong.is_empty(), "{} of {} cases wrong:\n{}", wrong.len(), cases.len(), wrong.join("\n"));
}
