//! README's "Invoke locally" steps, as a new user follows them: the environment its block gives
//! `cargo lambda watch` and every `--data-file` event it invokes, read from README.md itself, run
//! through the real binaries (hosted here behind the Runtime API, as `cargo lambda watch` hosts
//! them; cargo lambda itself is not run: it would rebuild the functions into the shared target
//! directory under the other tests). Each answer must be the one README promises.
use pushpull_local::runtime_api::Outcome;
use pushpull_tests::{function, local, start};
use serde_json::Value;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// Pairs of text: (name, value) settings, or (function, event file) invocations.
type Pairs = Vec<(String, String)>;

/// README's block under "## Invoke locally": its `KEY=value` settings and its event files.
fn readme_block() -> (Pairs, Pairs) {
    let readme = std::fs::read_to_string(format!("{ROOT}/README.md")).unwrap();
    let section = readme.split("## Invoke locally").nth(1).expect("README has an Invoke locally section");
    let block = section.split("```sh").nth(1).and_then(|b| b.split("```").next()).expect("a sh block");
    let mut env = Vec::new();
    let mut invokes = Vec::new();
    for word in block.split_whitespace() {
        if let Some((k, v)) = word.split_once('=')
            && k.chars().all(|c| c.is_ascii_uppercase() || c == '_')
            && !k.is_empty()
        {
            env.push((k.to_owned(), v.to_owned()));
        }
    }
    for line in block.lines().filter(|l| l.starts_with("cargo lambda invoke")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let function = words[3].to_owned();
        let file = words.iter().position(|w| *w == "--data-file").map(|i| words[i + 1].to_owned()).unwrap();
        invokes.push((function, file));
    }
    (env, invokes)
}

async fn invoke(host: &mut pushpull_local::runtime_api::FunctionHost, file: &str) -> Value {
    let payload = std::fs::read(format!("{ROOT}/{file}")).unwrap();
    match host.invoke(payload).await.unwrap().outcome {
        Outcome::Response(body) => serde_json::from_slice(&body).unwrap(),
        other => panic!("{file}: README promises an answer, got {other:?}"),
    }
}

#[tokio::test]
async fn the_readme_invoke_locally_steps_answer_as_the_readme_says() {
    let (env, invokes) = readme_block();
    for required in ["STREAM_NAME", "CHECKPOINT_URI", "OUTPUT_URI", "QUARANTINE_URI"] {
        assert!(env.iter().any(|(k, _)| k == required), "README's block sets {required}");
    }
    let stream = &env.iter().find(|(k, _)| k == "STREAM_NAME").unwrap().1;
    let l = local().await;
    // "With LocalStack up and the stream created".
    l.ensure_stream(stream, 2).await.unwrap();
    let scratch = tempfile::tempdir().unwrap();
    // The block's settings, its /tmp locations moved into a scratch directory; LocalStack's
    // endpoint as the test harness knows it.
    let settings: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| !k.starts_with("AWS_"))
        .map(|(k, v)| (k.clone(), v.replace("/tmp/pushpull", &scratch.path().display().to_string())))
        .collect();
    let pairs: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut push = start(function("s3-to-kinesis", &pairs)).await;
    let mut pull = start(function("kinesis-rollup", &pairs)).await;
    assert!(!invokes.is_empty());
    for (function, file) in &invokes {
        let host = if function == "s3-to-kinesis" { &mut push } else { &mut pull };
        let answer = invoke(host, file).await;
        match file.as_str() {
            "events/s3-test-event.json" => assert_eq!(answer["test_event"], true, "{answer}"),
            "events/s3-object-removed.json" => {
                assert!(answer["objects"][0]["outcome"]["skipped"].is_object(), "{answer}")
            }
            "events/kinesis-batch.json" => {
                // "five records of shard 0, the third not JSON: the answer names its sequence number"
                let batch: Value = serde_json::from_slice(&std::fs::read(format!("{ROOT}/{file}")).unwrap()).unwrap();
                let third = batch["Records"][2]["kinesis"]["sequenceNumber"].as_str().unwrap();
                assert_eq!(answer["batchItemFailures"][0]["itemIdentifier"], third, "{answer}");
            }
            other => panic!("README invokes {other}: add what it promises here"),
        }
    }
    // "The S3 put events name pushpull-local-data/input/... objects; the push function answers
    // gone: NoSuchBucket ...; invoked again, already_done", never Busy.
    let answer = invoke(&mut push, "events/s3-put.json").await;
    assert_eq!(answer["objects"][0]["outcome"]["gone"]["reason"], "NoSuchBucket", "{answer}");
    let answer = invoke(&mut push, "events/s3-put.json").await;
    assert_eq!(answer["objects"][0]["outcome"], "already_done", "{answer}");
}
