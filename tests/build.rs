//! Says, once per build, how to run the integration tests when they are not built.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_INTEGRATION").is_none() {
        println!(
            "cargo:warning=integration tests (LocalStack, the Kafka broker, real function binaries) are off: run `make test`, or with LocalStack and `infra/kafka.sh up` running `cargo build --workspace --bins --features pushpull-tests/integration && cargo nextest run --workspace --features pushpull-tests/integration`"
        );
    }
}
