//! Small helpers for errors: one-line chains and panic payloads.
use std::error::Error as StdError;

/// An error and its sources on one line (`a: b: c`), skipping a source whose text the line
/// already holds (errors that print their source themselves).
///
/// ```
/// let io = std::io::Error::other("connection reset");
/// assert_eq!(pushpull::error::chain(&io), "connection reset");
/// ```
pub fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The message of a caught panic (`panic!("...")` carries a `&str` or a `String`).
///
/// ```
/// let caught = std::panic::catch_unwind(|| panic!("boom {}", 1)).unwrap_err();
/// assert_eq!(pushpull::error::panic_message(&*caught), "boom 1");
/// ```
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}
