//! README's "Invoke locally" steps with the binaries hosted here behind the Runtime API (as
//! `cargo lambda watch` hosts them): the environment its block gives `cargo lambda watch`, every
//! `--data-file` event it invokes and every event of its table, each answering as README says
//! (`pushpull_tests::readme`). `cargo_lambda_steps.rs` runs the same through cargo lambda itself.
use pushpull_local::runtime_api::{FunctionHost, Outcome};
use pushpull_tests::readme::{self, ROOT};
use pushpull_tests::{function, local, start};
use serde_json::Value;

async fn invoke(host: &mut FunctionHost, file: &str) -> Value {
    let payload = std::fs::read(format!("{ROOT}/{file}")).unwrap();
    match host.invoke(payload).await.unwrap().outcome {
        Outcome::Response(body) => serde_json::from_slice(&body).unwrap(),
        other => panic!("{file}: README promises an answer, got {other:?}"),
    }
}

#[tokio::test]
async fn the_readme_invoke_locally_steps_answer_as_the_readme_says() {
    let steps = readme::invoke_locally();
    for required in ["STREAM_NAME", "CHECKPOINT_URI", "OUTPUT_URI", "QUARANTINE_URI"] {
        assert!(steps.env.iter().any(|(k, _)| k == required), "README's block sets {required}");
    }
    let stream = &steps.env.iter().find(|(k, _)| k == "STREAM_NAME").unwrap().1;
    let l = local().await;
    // "With LocalStack up and the stream created".
    l.ensure_stream(stream, 2).await.unwrap();
    let scratch = tempfile::tempdir().unwrap();
    // The block's settings, its /tmp locations moved into a scratch directory; LocalStack's
    // endpoint as the test harness knows it.
    let settings: Vec<(String, String)> = steps
        .env
        .iter()
        .filter(|(k, _)| !k.starts_with("AWS_"))
        .map(|(k, v)| (k.clone(), v.replace("/tmp/pushpull", &scratch.path().display().to_string())))
        .collect();
    let pairs: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut push = start(function("s3-to-kinesis", &pairs)).await;
    let mut pull = start(function("kinesis-rollup", &pairs)).await;
    assert!(!steps.invokes.is_empty() && steps.table.len() >= 7, "{steps:?}");
    let files = steps.invokes.iter().map(|(_, _, f)| f.clone()).chain(steps.table.iter().cloned());
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for file in files {
        let host = if readme::function_for(&file) == "s3-to-kinesis" { &mut push } else { &mut pull };
        let answer = invoke(host, &file).await;
        let nth = seen.entry(file.clone()).or_default();
        readme::assert_promised(&file, *nth, &answer);
        *nth += 1;
    }
    assert_eq!(seen.get("events/s3-put.json"), Some(&1), "s3-put.json is invoked once: README's block does not");
    // "invoked again, already_done", never Busy.
    let answer = invoke(&mut push, "events/s3-put.json").await;
    readme::assert_promised("events/s3-put.json", 1, &answer);
}
