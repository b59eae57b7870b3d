//! How deeply a JSON text nests, measured without parsing it, so that a payload built to
//! exhaust a recursive parser's stack is refused before it reaches one. `sonic-rs` (the Kinesis
//! event's parser) has no depth limit on every path (cloudwego/sonic-rs#232, #239): 100,000
//! nested brackets abort the process instead of failing the batch.
//!
//! ```
//! use pushpull::nesting::deeper_than;
//! assert_eq!(deeper_than(br#"{"a":[1,{"b":2}]}"#, 3), None);
//! assert_eq!(deeper_than(br#"{"a":[1,{"b":2}]}"#, 2), Some(8)); // the third opening, at byte 8
//! assert_eq!(deeper_than(br#"{"a":"[[[[[[\"[[["}"#, 1), None); // brackets in strings do not count
//! ```

/// The byte offset of the first `[` or `{` that opens level `max + 1`, if the text nests deeper
/// than `max`. Strings are skipped (escapes included); the text need not be valid JSON (a parser
/// says what else is wrong with it).
pub fn deeper_than(text: &[u8], max: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'"' => {
                // To the closing quote, past escaped characters. Most strings of an event are
                // short (keys, ids): a plain loop; a long one (base64 data) is left to memchr.
                i += 1;
                loop {
                    let rest = text.get(i..)?;
                    let j = match rest.iter().take(32).position(|b| *b == b'"' || *b == b'\\') {
                        Some(j) => j,
                        None if rest.len() <= 32 => return None,
                        None => 32 + memchr::memchr2(b'"', b'\\', &rest[32..])?,
                    };
                    i += j;
                    if text[i] == b'\\' {
                        i += 2;
                    } else {
                        break;
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Some(i);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// JSON values of a known depth, with strings full of brackets, quotes and escapes.
    fn value(depth: u32) -> BoxedStrategy<(String, usize)> {
        let leaf = prop_oneof![
            Just(("1".to_owned(), 0)),
            "[\\[\\]{}\"\\\\a-z]{0,8}".prop_map(|s| (serde_json::to_string(&s).unwrap(), 0)),
        ];
        leaf.prop_recursive(depth, 64, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(|items| {
                    let d = items.iter().map(|(_, d)| *d).max().unwrap_or(0) + 1;
                    (format!("[{}]", items.into_iter().map(|(t, _)| t).collect::<Vec<_>>().join(",")), d)
                }),
                prop::collection::vec(("[a-z\\[{\"]{0,4}", inner), 0..4).prop_map(|fields| {
                    let d = fields.iter().map(|(_, (_, d))| *d).max().unwrap_or(0) + 1;
                    let body: Vec<String> = fields
                        .into_iter()
                        .map(|(k, (t, _))| format!("{}:{t}", serde_json::to_string(&k).unwrap()))
                        .collect();
                    (format!("{{{}}}", body.join(",")), d)
                }),
            ]
        })
        .boxed()
    }

    proptest! {
        #[test]
        fn the_measured_depth_is_the_values_depth((text, depth) in value(12), max in 0usize..14) {
            prop_assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok(), "{}", text);
            prop_assert_eq!(deeper_than(text.as_bytes(), max).is_some(), depth > max, "{} (depth {})", text, depth);
        }

        #[test]
        fn any_bytes_are_measured_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = deeper_than(&bytes, 3);
        }
    }

    #[test]
    fn a_hundred_thousand_levels_are_refused_at_the_limit() {
        let text = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(deeper_than(text.as_bytes(), 128), Some(128));
    }
}
