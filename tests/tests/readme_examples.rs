//! README's library section shows two examples whole (all but their `//!` heading and their
//! tests), so that what a reader copies is what `make test` builds and runs as a real function
//! (`tests/tests/examples.rs`). This keeps the README's copies the same as the files.
use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the tests crate is in the workspace")
}

/// An example file without its leading `//!` lines and from `#[cfg(test)]` on.
fn shown_part(example: &str) -> String {
    let path = root().join("examples/src/bin").join(example);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let lines: Vec<&str> = text.lines().skip_while(|l| l.starts_with("//!")).collect();
    let end = lines.iter().position(|l| *l == "#[cfg(test)]").unwrap_or(lines.len());
    lines[..end].join("\n").trim().to_owned()
}

#[test]
fn the_readme_shows_the_kinesis_and_s3_examples_as_they_are() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    for example in ["kinesis-orders.rs", "s3-csv-lines.rs"] {
        let shown = format!("```rust\n{}\n```", shown_part(example));
        assert!(
            readme.contains(&shown),
            "README.md does not show examples/src/bin/{example} as it is; paste this in its place:\n{shown}"
        );
    }
}
