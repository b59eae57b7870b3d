//! README's "Invoke locally" section, read from README.md itself: the environment its block gives
//! `cargo lambda watch`, the commands it runs, the event table, and what README promises each
//! event answers. `tests/readme_steps.rs` runs it with the binaries hosted by the test harness,
//! `tests/cargo_lambda_steps.rs` through `cargo lambda watch` and `invoke` themselves.
use serde_json::Value;

/// The workspace root.
pub const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// README's block under "## Invoke locally", taken apart.
#[derive(Debug)]
pub struct InvokeLocally {
    /// Its `KEY=value` settings, in order (not its `PATH`, which puts `infra/tools.sh`'s
    /// directory first).
    pub env: Vec<(String, String)>,
    /// Its `cargo lambda watch` command's arguments after `watch`.
    pub watch: Vec<String>,
    /// Its `cargo lambda invoke` commands: (function, arguments after `invoke`, event file).
    pub invokes: Vec<(String, Vec<String>, String)>,
    /// The event files of the table under the block.
    pub table: Vec<String>,
}

fn section() -> String {
    let readme = std::fs::read_to_string(format!("{ROOT}/README.md")).expect("README.md");
    readme
        .split("## Invoke locally")
        .nth(1)
        .expect("README has an Invoke locally section")
        .split("\n## ")
        .next()
        .unwrap()
        .to_owned()
}

/// Reads the section.
pub fn invoke_locally() -> InvokeLocally {
    let section = section();
    let block = section.split("```sh").nth(1).and_then(|b| b.split("```").next()).expect("a sh block");
    let mut env = Vec::new();
    for word in block.split_whitespace() {
        if let Some((k, v)) = word.split_once('=')
            && !k.is_empty()
            && k != "PATH" // the block's `export PATH="$(infra/tools.sh):$PATH"`: cargo lambda's own
            && k.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        {
            env.push((k.to_owned(), v.to_owned()));
        }
    }
    let after = |line: &str, command: &str| -> Vec<String> {
        let rest = line.split(command).nth(1).unwrap();
        rest.split_whitespace().take_while(|w| *w != "&").map(str::to_owned).collect()
    };
    let watch = block
        .lines()
        .find(|l| l.contains("cargo lambda watch"))
        .map(|l| after(l, "cargo lambda watch"))
        .expect("a watch line");
    let mut invokes = Vec::new();
    for line in block.lines().filter(|l| l.starts_with("cargo lambda invoke")) {
        let args = after(line, "cargo lambda invoke");
        let file = args.iter().position(|w| w == "--data-file").map(|i| args[i + 1].clone()).expect("--data-file");
        invokes.push((args[0].clone(), args[1..].to_vec(), file));
    }
    let table = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split('`').next().map(|f| format!("events/{f}")))
        .collect();
    InvokeLocally { env, watch, invokes, table }
}

/// The function an event file is for.
pub fn function_for(file: &str) -> &'static str {
    if file.starts_with("events/kinesis") { "kinesis-rollup" } else { "s3-to-kinesis" }
}

/// Asserts that `answer` is what README promises for `file`, the `nth` time (from 0) it is
/// invoked. Panics on a file README's checks do not know yet.
pub fn assert_promised(file: &str, nth: usize, answer: &Value) {
    let outcomes: Vec<&Value> =
        answer["objects"].as_array().map(|o| o.iter().map(|o| &o["outcome"]).collect()).unwrap_or_default();
    match file {
        "events/s3-test-event.json" => assert_eq!(answer["test_event"], true, "{file}: {answer}"),
        "events/s3-object-removed.json" => assert!(outcomes[0]["skipped"].is_object(), "{file}: {answer}"),
        // "The S3 put events name pushpull-local-data/input/... objects, a bucket nothing creates:
        // the push function answers gone: NoSuchBucket and, invoked again, already_done".
        "events/s3-put.json" | "events/s3-put-encoded-key.json" | "events/s3-put-multi.json" => {
            let want = if file.ends_with("multi.json") { 3 } else { 1 };
            assert_eq!(outcomes.len(), want, "{file}: {answer}");
            for o in outcomes {
                if nth == 0 {
                    assert_eq!(o["gone"]["reason"], "NoSuchBucket", "{file}: {answer}");
                } else {
                    assert_eq!(*o, "already_done", "{file}, invoked again: {answer}");
                }
            }
            if file.ends_with("encoded-key.json") {
                // "a key with spaces (+), %2B and non-ASCII (%C3%A9) as S3 encodes it"
                assert_eq!(answer["objects"][0]["key"], "input/café menu/résumé 2026 + extra.ndjson", "{answer}");
            }
        }
        "events/kinesis-batch.json" => {
            // "five records of shard 0, the third not JSON: the answer names its sequence number"
            let batch: Value = serde_json::from_slice(&std::fs::read(format!("{ROOT}/{file}")).unwrap()).unwrap();
            let third = batch["Records"][2]["kinesis"]["sequenceNumber"].as_str().unwrap();
            assert_eq!(answer["batchItemFailures"], serde_json::json!([{ "itemIdentifier": third }]), "{answer}");
        }
        "events/kinesis-batch-shard1.json" => {
            assert_eq!(answer["batchItemFailures"], serde_json::json!([]), "{file}: {answer}")
        }
        other => panic!("README names {other}: add what it promises to tests/src/readme.rs"),
    }
}
