//! Checking one NDJSON line and picking its partition key, in one pass, without allocating.
// Parts of it serve only the `push` feature.
#![cfg_attr(not(feature = "push"), allow(dead_code))]
use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// Why a line is not a record.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LineError {
    /// Not UTF-8.
    #[error("not UTF-8 (invalid byte at offset {at} of the line)")]
    Utf8 {
        /// Offset of the first invalid byte within the line.
        at: usize,
    },
    /// Not one JSON value.
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Checks that `line` is UTF-8 holding exactly one JSON value and, when `field` is given and
/// the value is an object with that top-level field, returns the field's value as text: a JSON
/// string unescaped, anything else (number, bool, array, object) as its JSON text; `null` is
/// treated as absent.
pub fn inspect<'a>(line: &'a [u8], field: Option<&str>) -> Result<Option<Cow<'a, str>>, LineError> {
    // Checked first: serde_json does not check the UTF-8 of strings it skips.
    if let Err(e) = std::str::from_utf8(line) {
        return Err(LineError::Utf8 { at: e.valid_up_to() });
    }
    let mut de = serde_json::Deserializer::from_slice(line);
    let found = match field {
        None => de::Deserialize::deserialize(&mut de).map(|IgnoredAny| None)?,
        Some(field) => FindField { field }.deserialize(&mut de)?,
    };
    de.end()?;
    match found {
        None => Ok(None),
        Some(raw) => as_text(raw),
    }
}

/// Several top-level fields of a JSON line in one pass, without building a value: the value of
/// each named field (as text, strings unescaped; `null` and absent are `None`), in the order of
/// `names`; an error if the line is not UTF-8 or not JSON.
///
/// ```
/// let line = br#"{"user":"u1","amount":2.5,"other":[1]}"#;
/// let [user, amount] = pushpull::pull::fields(line, [Some("user"), Some("amount")]).unwrap();
/// assert_eq!((user.as_deref(), amount.as_deref()), (Some("u1"), Some("2.5")));
/// ```
pub fn fields<'a, const N: usize>(
    line: &'a [u8],
    names: [Option<&str>; N],
) -> Result<[Option<Cow<'a, str>>; N], LineError> {
    if let Err(e) = std::str::from_utf8(line) {
        return Err(LineError::Utf8 { at: e.valid_up_to() });
    }
    let mut de = serde_json::Deserializer::from_slice(line);
    let raw = FindFields { names }.deserialize(&mut de)?;
    de.end()?;
    let mut out: [Option<Cow<'a, str>>; N] = std::array::from_fn(|_| None);
    for (slot, raw) in out.iter_mut().zip(raw) {
        *slot = match raw {
            None => None,
            Some(r) => as_text(r)?,
        };
    }
    Ok(out)
}

fn as_text(raw: &RawValue) -> Result<Option<Cow<'_, str>>, LineError> {
    let text = raw.get();
    // A string without escapes is the text between its quotes: no second parse.
    if text.len() >= 2 && text.starts_with('"') && memchr::memchr(b'\\', text.as_bytes()).is_none() {
        return Ok(Some(Cow::Borrowed(&text[1..text.len() - 1])));
    }
    if text.starts_with('"') {
        Ok(Some(serde_json::from_str::<Cow<'_, str>>(text)?))
    } else if text == "null" {
        Ok(None)
    } else {
        Ok(Some(Cow::Borrowed(text)))
    }
}

/// An object key as bytes, escapes undone: compared with the names sought, it needs no UTF-8
/// check of its own (the caller checked the whole line already).
struct Key<'de>(Cow<'de, [u8]>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_bytes<E>(self, v: &'de [u8]) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v.as_bytes())))
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_vec())))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.as_bytes().to_vec())))
            }
        }
        d.deserialize_bytes(V)
    }
}

struct FindFields<'f, const N: usize> {
    names: [Option<&'f str>; N],
}

impl<'de, const N: usize> DeserializeSeed<'de> for FindFields<'_, N> {
    type Value = [Option<&'de RawValue>; N];
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, const N: usize> Visitor<'de> for FindFields<'_, N> {
    type Value = [Option<&'de RawValue>; N];

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = [None; N];
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            match self.names.iter().position(|n| n.is_some_and(|n| n.as_bytes() == &*key)) {
                Some(i) if found[i].is_none() => found[i] = Some(map.next_value::<&'de RawValue>()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(found)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok([None; N])
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok([None; N])
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok([None; N])
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok([None; N])
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok([None; N])
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok([None; N])
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok([None; N])
    }
}

struct FindField<'f> {
    field: &'f str,
}

impl<'de> DeserializeSeed<'de> for FindField<'_> {
    type Value = Option<&'de RawValue>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FindField<'_> {
    type Value = Option<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if found.is_none() && &*key == self.field.as_bytes() {
                found = Some(map.next_value::<&'de RawValue>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspect_reads_a_field_as_text_and_names_what_is_wrong() {
        let line = br#"{"user":"u7","amount":3.5}"#;
        assert_eq!(inspect(line, Some("user")).unwrap().as_deref(), Some("u7"));
        assert_eq!(inspect(br#"{"user":42}"#, Some("user")).unwrap().as_deref(), Some("42"));
        assert_eq!(inspect(line, None).unwrap(), None);
        assert!(matches!(inspect(b"{\"user\":", Some("user")), Err(LineError::Json(_))));
        assert!(matches!(inspect(b"\xff", None), Err(LineError::Utf8 { at: 0 })));
    }

    #[test]
    fn finds_top_level_fields_only() {
        let line = br#"{"nested":{"user":"inner"},"user":"outer"}"#;
        assert_eq!(inspect(line, Some("user")).unwrap().as_deref(), Some("outer"));
        assert_eq!(inspect(br#"{"a":1}"#, Some("user")).unwrap(), None);
        assert_eq!(inspect(br#"{"user":null}"#, Some("user")).unwrap(), None);
        assert_eq!(inspect(br#"{"user":"a\"b"}"#, Some("user")).unwrap().as_deref(), Some("a\"b"));
        // Keys are compared with their escapes undone.
        assert_eq!(inspect(br#"{"us\u0065r":"e"}"#, Some("user")).unwrap().as_deref(), Some("e"));
        let [a, b] = fields(br#"{"\u0061":1,"b\n":2}"#, [Some("a"), Some("b\n")]).unwrap();
        assert_eq!((a.as_deref(), b.as_deref()), (Some("1"), Some("2")));
        assert_eq!(inspect(br#"{"user":[1, 2]}"#, Some("user")).unwrap().as_deref(), Some("[1, 2]"));
        assert_eq!(inspect(br#"[{"user":"x"}]"#, Some("user")).unwrap(), None);
        assert_eq!(inspect(br#""just a string""#, Some("user")).unwrap(), None);
        assert_eq!(inspect(b" 12 ", Some("user")).unwrap(), None);
    }

    #[test]
    fn rejects_what_is_not_one_json_value() {
        for bad in [&b"{}{}"[..], b"{\"a\":}", b"nul", b"{\"a\":1", b"", b"   "] {
            assert!(matches!(inspect(bad, None), Err(LineError::Json(_))), "{:?}", String::from_utf8_lossy(bad));
            assert!(matches!(inspect(bad, Some("a")), Err(LineError::Json(_))));
        }
        assert!(matches!(inspect(b"{\"a\":\"\xc3\x28\"}", None), Err(LineError::Utf8 { at: 6 })));
    }
}
