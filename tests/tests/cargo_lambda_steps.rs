//! README's "Invoke locally" steps through cargo lambda itself: `cargo lambda watch` started with
//! the block's environment and arguments, every event of the block and of the table sent with
//! `cargo lambda invoke` as the block sends them, each answering as README says
//! (`pushpull_tests::readme`). Only the port is changed (a free one) and the block's `/tmp`
//! locations moved into a scratch directory.
//!
//! cargo lambda builds the functions as `cargo run --bin <name>` at the workspace root: here into
//! a target directory of its own (`target/cargo-lambda`), so that it does not replace the
//! fault-injecting binaries the other tests run. cargo-lambda comes from `infra/tools.sh` (PyPI,
//! the version pinned there).
//!
//! What this caught: `cargo lambda watch` 1.9.2 sends `Lambda-Runtime-Deadline-Ms: 600000` (its
//! timeout), not the Unix time in milliseconds AWS defines; read as AWS defines it, every
//! invocation started 56 years past its deadline and the push function stopped "at line 0"
//! (`pushpull::invocation::deadline_of`).
use std::process::Stdio;
use std::time::Duration;

use pushpull_tests::local;
use pushpull_tests::readme::{self, ROOT};
use serde_json::Value;
use tokio::process::{Child, Command};

/// `cargo lambda watch`, stopped on drop with everything it started: its process group by PID
/// (TERM, then KILL after 3 s), and any process still running a binary of its target directory
/// (the functions, which its file watcher may start in a group of their own).
struct Watch {
    child: Child,
    pgid: Option<u32>,
    target: std::path::PathBuf,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let signal = |sig: &str, pid: String| {
            let _ = std::process::Command::new("kill").args([sig, "--", &pid]).status();
        };
        if let Some(pgid) = self.pgid {
            signal("-TERM", format!("-{pgid}"));
            let until = std::time::Instant::now() + Duration::from_secs(3);
            while std::time::Instant::now() < until && !matches!(self.child.try_wait(), Ok(Some(_))) {
                std::thread::sleep(Duration::from_millis(100));
            }
            signal("-KILL", format!("-{pgid}"));
        }
        for pid in running_from(&self.target) {
            signal("-KILL", pid.to_string());
        }
    }
}

/// PIDs of the processes whose executable lies under `dir`.
fn running_from(dir: &std::path::Path) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    procs
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let exe = std::fs::read_link(e.path().join("exe")).ok()?;
            exe.starts_with(dir).then_some(pid)
        })
        .collect()
}

fn tools_path() -> String {
    let out =
        std::process::Command::new("bash").arg(format!("{ROOT}/infra/tools.sh")).output().expect("run infra/tools.sh");
    assert!(out.status.success(), "infra/tools.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    let bin = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    format!("{bin}:{}", std::env::var("PATH").unwrap_or_default())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn the_readme_invoke_locally_steps_answer_as_the_readme_says_through_cargo_lambda() {
    let steps = readme::invoke_locally();
    let path = tools_path();
    let stream = &steps.env.iter().find(|(k, _)| k == "STREAM_NAME").expect("README's block sets STREAM_NAME").1;
    let l = local().await;
    l.ensure_stream(stream, 2).await.unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let target = format!("{ROOT}/target/cargo-lambda");
    let port = free_port().to_string();
    let with_port = |args: &[String]| -> Vec<String> {
        args.iter().map(|a| if a == "9000" { port.clone() } else { a.clone() }).collect()
    };
    assert!(steps.watch.contains(&"9000".to_owned()), "README's watch line serves port 9000: {:?}", steps.watch);
    // Built before watch starts, as watch builds (`cargo run --bin`, the workspace's default
    // members): the first invocation then does not wait out a compile.
    let built = Command::new("cargo")
        .current_dir(ROOT)
        .args(["build", "--bin", "s3-to-kinesis", "--bin", "kinesis-rollup"])
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .await
        .unwrap();
    assert!(built.success(), "cargo build into {target} failed");

    let mut watch = Command::new("cargo");
    watch.current_dir(ROOT).env("PATH", &path).env("CARGO_TARGET_DIR", &target).arg("lambda").arg("watch");
    watch.args(with_port(&steps.watch)).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    for (k, v) in &steps.env {
        let v = if k == "AWS_ENDPOINT_URL" { pushpull_local::localstack::endpoint() } else { v.clone() };
        watch.env(k, v.replace("/tmp/pushpull", &scratch.path().display().to_string()));
    }
    let mut child = watch.kill_on_drop(true).spawn().expect("cargo lambda watch");
    let log = scratch.path().join("watch.log");
    let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let pgid = child.id();
    let target_dir = std::fs::canonicalize(&target).expect("the target directory, built above");
    let _watch = Watch { child, pgid, target: target_dir };
    for stream in [Box::new(out) as Box<dyn tokio::io::AsyncRead + Unpin + Send>, Box::new(err)] {
        let log = log.clone();
        tokio::spawn(async move {
            let mut file = tokio::fs::OpenOptions::new().create(true).append(true).open(log).await.unwrap();
            let mut stream = stream;
            let _ = tokio::io::copy(&mut stream, &mut file).await;
        });
    }
    let watch_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let started = tokio::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).is_err() {
        assert!(started.elapsed() < Duration::from_secs(120), "cargo lambda watch did not listen:\n{}", watch_log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let invoke = |function: String, args: Vec<String>| {
        let path = path.clone();
        async move {
            let invoke = Command::new("cargo")
                .current_dir(ROOT)
                .env("PATH", path)
                .args(["lambda", "invoke", &function])
                .args(&args)
                .kill_on_drop(true)
                .output();
            // README's watch line sets no --timeout: a function that never answered would hold
            // the invoke forever.
            let out = tokio::time::timeout(Duration::from_secs(300), invoke)
                .await
                .unwrap_or_else(|_| panic!("cargo lambda invoke {function} {args:?}: no answer in 300 s"))
                .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    // The block's invokes as written, then each event of the table (s3-put.json twice: README
    // promises what the second answer is).
    let block_files: Vec<String> = steps.invokes.iter().map(|(_, _, f)| f.clone()).collect();
    let mut calls: Vec<(String, Vec<String>, String)> = steps.invokes.clone();
    let (_, template, _) = steps.invokes.first().expect("README's block invokes").clone();
    for file in steps.table.iter().chain(std::iter::once(&"events/s3-put.json".to_owned())) {
        let args = template.iter().map(|a| if block_files.contains(a) { file.clone() } else { a.clone() }).collect();
        calls.push((readme::function_for(file).to_owned(), args, file.clone()));
    }
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for (function, args, file) in calls {
        let (ok, stdout, stderr) = invoke(function.clone(), with_port(&args)).await;
        assert!(
            ok,
            "cargo lambda invoke {function} {args:?} failed:\n{stdout}{stderr}\n--- watch ---\n{}",
            watch_log()
        );
        let answer: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!("{file}: the answer is not JSON ({e}): {stdout}{stderr}\n--- watch ---\n{}", watch_log())
        });
        let nth = seen.entry(file.clone()).or_default();
        readme::assert_promised(&file, *nth, &answer);
        *nth += 1;
    }
    assert!(seen.get("events/s3-put.json").is_some_and(|n| *n >= 2));
}
