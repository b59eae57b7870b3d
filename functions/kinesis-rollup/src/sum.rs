//! Exact decimal sums, independent of the order records arrive in.
use serde::{Deserialize, Serialize};

/// A decimal sum kept as an integer number of billionths: exact for the usual amounts and
/// independent of the order records arrive in (floating-point sums are neither).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sum(pub i128);

/// Digits kept after the decimal point.
pub const SUM_SCALE: u32 = 9;

impl Sum {
    /// Parses a JSON number's text; more than [`SUM_SCALE`] decimals are rounded. Magnitudes of
    /// 10^18 and more are refused (`None`), so that no realistic count of records can overflow
    /// the sum.
    pub fn parse(text: &str) -> Option<Sum> {
        let scale = 10i128.pow(SUM_SCALE);
        // Byte loops, not memchr: amounts are a few bytes long.
        let plain = !text.bytes().any(|b| b | 0x20 == b'e');
        if plain {
            let (neg, digits) = text.strip_prefix('-').map_or((false, text), |d| (true, d));
            let (int, frac) = match digits.bytes().position(|b| b == b'.') {
                Some(dot) => (&digits[..dot], &digits[dot + 1..]),
                None => (digits, ""),
            };
            if !int.is_empty()
                && int.len() <= 18
                && int.bytes().all(|b| b.is_ascii_digit())
                && frac.bytes().all(|b| b.is_ascii_digit())
            {
                let int: i128 = int.parse().ok()?;
                let mut f: i128 = 0;
                for (i, b) in frac.bytes().take(SUM_SCALE as usize).enumerate() {
                    f += i128::from(b - b'0') * 10i128.pow(SUM_SCALE - 1 - i as u32);
                }
                if frac.as_bytes().get(SUM_SCALE as usize).is_some_and(|b| *b >= b'5') {
                    f += 1;
                }
                let v = int * scale + f;
                return Some(Sum(if neg { -v } else { v }));
            }
        }
        let v: f64 = text.parse().ok()?;
        (v.is_finite() && v.abs() < 1e18).then(|| Sum((v * scale as f64).round() as i128))
    }
}

impl std::fmt::Display for Sum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scale = 10i128.pow(SUM_SCALE);
        let (neg, v) = (self.0 < 0, self.0.unsigned_abs());
        let (int, frac) = (v / scale as u128, v % scale as u128);
        if neg {
            f.write_str("-")?;
        }
        if frac == 0 {
            write!(f, "{int}")
        } else {
            let frac = format!("{frac:0width$}", width = SUM_SCALE as usize);
            write!(f, "{int}.{}", frac.trim_end_matches('0'))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sums_are_exact_decimals() {
        let p = |s| Sum::parse(s).unwrap();
        assert_eq!(p("12.34").0 + p("0.66").0, p("13").0);
        assert_eq!(p("-1.5").to_string(), "-1.5");
        assert_eq!(p("1e2").to_string(), "100");
        assert_eq!(p("0.1234567895").to_string(), "0.12345679");
        assert_eq!(Sum(p("0.1").0 * 3).to_string(), "0.3", "no floating-point drift");
        assert!(Sum::parse("\"x\"").is_none());
        assert!(Sum::parse("NaN").is_none());
        assert!(Sum::parse("1000000000000000000").is_none(), "10^18 is refused");
        assert!(Sum::parse("1e30").is_none());
        assert_eq!(Sum::parse("-999999999999999999.5").unwrap().to_string(), "-999999999999999999.5");
    }

    proptest! {
        /// Up to nine decimals, text round-trips exactly (after trimming trailing zeros).
        #[test]
        fn decimals_round_trip(int in -999_999_999_999_999_999i64..=999_999_999_999_999_999, frac in 0u32..1_000_000_000) {
            let text = if frac == 0 { int.to_string() } else {
                format!("{int}.{}", format!("{frac:09}").trim_end_matches('0'))
            };
            prop_assert_eq!(Sum::parse(&text).unwrap().to_string(), text);
        }

        /// Any text parses or is refused; never a panic, never a magnitude of 10^18 or more.
        #[test]
        fn any_text_parses_or_is_refused(s in "\\PC{0,40}") {
            if let Some(v) = Sum::parse(&s) {
                prop_assert!(v.0.unsigned_abs() < 10u128.pow(18 + SUM_SCALE));
            }
        }
    }
}
