//! The library's cargo features keep each side to what it uses: the core compiles no AWS SDK,
//! a pull-only function compiles no S3 SDK (the dependency graph, as `cargo tree` reads it from
//! Cargo.lock).
use std::process::Command;

fn normal_deps(features: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["tree", "--offline", "-p", "pushpull", "-e", "normal", "--prefix", "none", "--no-default-features"]);
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    let out = cmd.current_dir(env!("CARGO_MANIFEST_DIR")).output().expect("cargo tree runs");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn the_core_compiles_no_aws_sdk_and_pull_only_compiles_no_s3() {
    let core = normal_deps(&[]);
    assert!(!core.contains("aws-"), "the core pulls an AWS crate:\n{core}");
    assert!(!core.contains("lambda_runtime"), "the core pulls the Lambda runtime:\n{core}");
    let pull = normal_deps(&["runtime", "kinesis", "sqs", "dynamodb"]);
    assert!(!pull.contains("aws-sdk-"), "a pull-only build pulls an AWS SDK:\n{pull}");
    assert!(!pull.contains("async-compression"), "a pull-only build pulls gzip:\n{pull}");
    let push = normal_deps(&["runtime", "push", "s3", "kinesis-sink"]);
    assert!(push.contains("aws-sdk-s3") && push.contains("aws-sdk-kinesis"));
}
