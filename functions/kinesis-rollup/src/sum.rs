//! Exact decimal sums, independent of the order records arrive in.
//!
//! Every number JSON can write within a double's range is summed exactly: integers of any length,
//! decimals, exponent notation. The common amount (at most 18 integer digits and 9 decimals, no
//! exponent) is kept as an integer count of billionths and added without allocating; any other is
//! kept as an arbitrary-precision decimal (`bigdecimal`), and a sum moves there when the
//! billionths would overflow. Floating point would make a sum depend on the order of its terms
//! and round most decimals.
//!
//! Refused, with an error that says why: text that is not a JSON number, and numbers a double
//! cannot hold: a magnitude above `f64::MAX` (about 1.8e308) or a nonzero one a double reads as 0
//! (at most half the smallest double, about 2.5e-324). Number text is read up to 1,000 characters
//! with an exponent up to 2,000 either way, so that a hostile `1e999999999` cannot cost a billion
//! digits of memory once added to anything. A total is not bounded so: two amounts of `1e308`
//! add up to `2e308`, written exactly (a reader that takes it as a double sees infinity), and a
//! total read back from window state ([`Sum::parse_total`]) only has to be a number.
//!
//! ```
//! use kinesis_rollup::Sum;
//!
//! let mut total = Sum::ZERO;
//! for amount in ["0.1", "0.2", "1e-12", "123456789012345678901234567890"] {
//!     total += &Sum::parse(amount).unwrap();
//! }
//! assert_eq!(total.to_string(), "123456789012345678901234567890.300000000001");
//! assert!(Sum::parse("1e400").unwrap_err().to_string().contains("beyond"));
//! ```
use std::fmt;
use std::ops::AddAssign;
use std::str::FromStr;
use std::sync::LazyLock;

use bigdecimal::num_bigint::BigInt;
use bigdecimal::{BigDecimal, Zero};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An exact decimal sum (or one amount).
#[derive(Debug, Clone)]
pub struct Sum(Repr);

#[derive(Debug, Clone)]
enum Repr {
    /// Billionths: `|v| < 10^18` units with up to nine decimals, and the sums of such.
    Fixed(i128),
    /// Anything else, exactly.
    Big(Box<BigDecimal>),
}

/// Digits the fixed representation keeps after the decimal point.
pub const SUM_SCALE: u32 = 9;
const SCALE: i128 = 1_000_000_000;

/// Why a number cannot be summed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SumError {
    /// Not a JSON number (a string, `null`, `NaN`, a malformed number).
    #[error("{0} is not a JSON number")]
    NotANumber(String),
    /// A JSON number a double cannot hold.
    #[error(
        "{0} is beyond what a double holds (a magnitude above about 1.8e308, or a nonzero one a double reads as 0): not summed"
    )]
    OutOfRange(String),
}

/// The longest number text read (longer is refused before it is parsed): 309 integer digits and
/// the 17 significant digits of the smallest double written in full (its 340th decimal) fit.
const MAX_TEXT: usize = 1_000;

static MAX: LazyLock<BigDecimal> = LazyLock::new(|| BigDecimal::try_from(f64::MAX).expect("finite"));
/// Half the smallest double: a double reads this and less as 0.
static HALF_MIN: LazyLock<BigDecimal> =
    LazyLock::new(|| BigDecimal::try_from(f64::from_bits(1)).expect("finite") / BigDecimal::from(2));
/// The longest total read back: far beyond any total of amounts within the bounds (about 1,650
/// digits), still bounded.
const MAX_TOTAL_TEXT: usize = 100_000;

impl Sum {
    /// Zero.
    pub const ZERO: Sum = Sum(Repr::Fixed(0));

    /// Parses a JSON number's text exactly.
    pub fn parse(text: &str) -> Result<Sum, SumError> {
        if let Some(v) = fixed(text) {
            return Ok(Sum(Repr::Fixed(v)));
        }
        if !is_json_number(text) {
            return Err(SumError::NotANumber(text.to_owned()));
        }
        let out_of_range = || SumError::OutOfRange(text.to_owned());
        if is_zero(text) {
            return Ok(Sum::ZERO);
        }
        if text.len() > MAX_TEXT {
            return Err(out_of_range());
        }
        // The exponent is checked before the value is built: `1e999999999` would be a billion
        // digits wide once added to anything.
        if exponent(text).is_none_or(|e| e.unsigned_abs() > 2 * MAX_TEXT as u64) {
            return Err(out_of_range());
        }
        let v = BigDecimal::from_str(text).map_err(|_| SumError::NotANumber(text.to_owned()))?.normalized();
        let magnitude = v.abs();
        let in_range = magnitude <= *MAX && magnitude > *HALF_MIN;
        if !in_range {
            return Err(out_of_range());
        }
        Ok(Sum(Repr::Big(Box::new(v))))
    }

    /// Parses a total as [`Sum`]'s serde and window state write it: any JSON number up to
    /// 100,000 characters, without the bounds on one amount (a total of amounts within them may
    /// go past what a double holds).
    pub fn parse_total(text: &str) -> Result<Sum, SumError> {
        if let Some(v) = fixed(text) {
            return Ok(Sum(Repr::Fixed(v)));
        }
        if !is_json_number(text) {
            return Err(SumError::NotANumber(text.to_owned()));
        }
        if is_zero(text) {
            return Ok(Sum::ZERO);
        }
        if text.len() > MAX_TOTAL_TEXT || exponent(text).is_none_or(|e| e.unsigned_abs() > MAX_TOTAL_TEXT as u64) {
            return Err(SumError::OutOfRange(text.to_owned()));
        }
        let v = BigDecimal::from_str(text).map_err(|_| SumError::NotANumber(text.to_owned()))?;
        Ok(Sum(Repr::Big(Box::new(v.normalized()))))
    }

    fn to_big(&self) -> BigDecimal {
        match &self.0 {
            Repr::Fixed(v) => BigDecimal::new(BigInt::from(*v), i64::from(SUM_SCALE)),
            Repr::Big(b) => (**b).clone(),
        }
    }
}

impl Default for Sum {
    fn default() -> Self {
        Sum::ZERO
    }
}

impl AddAssign<&Sum> for Sum {
    fn add_assign(&mut self, rhs: &Sum) {
        match (&mut self.0, &rhs.0) {
            (Repr::Fixed(a), Repr::Fixed(b)) => match a.checked_add(*b) {
                Some(s) => *a = s,
                None => self.0 = Repr::Big(Box::new(self.to_big() + rhs.to_big())),
            },
            (Repr::Big(a), Repr::Big(b)) => **a += &**b,
            (Repr::Big(a), Repr::Fixed(_)) => **a += rhs.to_big(),
            (Repr::Fixed(_), Repr::Big(b)) => self.0 = Repr::Big(Box::new(self.to_big() + &**b)),
        }
    }
}

impl PartialEq for Sum {
    fn eq(&self, other: &Sum) -> bool {
        match (&self.0, &other.0) {
            (Repr::Fixed(a), Repr::Fixed(b)) => a == b,
            _ => self.to_big() == other.to_big(),
        }
    }
}

impl Eq for Sum {}

impl FromStr for Sum {
    type Err = SumError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Sum::parse(s)
    }
}

/// The exact value in plain decimal notation (no exponent, no trailing zeros): valid JSON number
/// text.
impl fmt::Display for Sum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Fixed(v) => {
                let (neg, v) = (*v < 0, v.unsigned_abs());
                let (int, frac) = (v / SCALE as u128, v % SCALE as u128);
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
            Repr::Big(b) => {
                let b = b.normalized();
                if b.is_zero() { f.write_str("0") } else { f.write_str(&b.to_plain_string()) }
            }
        }
    }
}

/// Written as its decimal text (a JSON string), so that no reader rounds it.
impl Serialize for Sum {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Read from decimal text, or from an integer count of billionths (window state's older format,
/// still read: tumbling windows last at most 15 minutes, so such state is short-lived).
impl<'de> Deserialize<'de> for Sum {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Sum;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal number as text")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Sum, E> {
                Sum::parse_total(v).map_err(E::custom)
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Sum, E> {
                Err(E::custom(format!(
                    "a sum of {v} billionths (window state's older format): too large to read exactly"
                )))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Sum, E> {
                Ok(Sum(Repr::Fixed(i128::from(v))))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Sum, E> {
                Ok(Sum(Repr::Fixed(i128::from(v))))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The fast path: `-?\d{1,18}(\.\d{1,9})?` with JSON's rule on leading zeros, as billionths.
fn fixed(text: &str) -> Option<i128> {
    let b = text.as_bytes();
    let (neg, digits) = match b.first()? {
        b'-' => (true, &b[1..]),
        _ => (false, b),
    };
    let dot = digits.iter().position(|&c| c == b'.').unwrap_or(digits.len());
    let (int, frac) = (&digits[..dot], digits.get(dot + 1..).unwrap_or(&[]));
    if int.is_empty() || int.len() > 18 || (int.len() > 1 && int[0] == b'0') || frac.len() > SUM_SCALE as usize {
        return None;
    }
    if dot < digits.len() && frac.is_empty() {
        return None; // "1." is not JSON
    }
    let mut v: i128 = 0;
    for &c in int {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + i128::from(c - b'0');
    }
    let mut f: i128 = 0;
    for i in 0..SUM_SCALE as usize {
        let c = frac.get(i).copied().unwrap_or(b'0');
        if !c.is_ascii_digit() {
            return None;
        }
        f = f * 10 + i128::from(c - b'0');
    }
    let v = v * SCALE + f;
    Some(if neg { -v } else { v })
}

/// Whether a JSON number's text is zero (every digit before the exponent is 0).
fn is_zero(text: &str) -> bool {
    text.bytes().take_while(|c| c | 0x20 != b'e').all(|c| matches!(c, b'0' | b'-' | b'.'))
}

/// JSON's number grammar (RFC 8259, section 6): `-? (0 | [1-9]\d*) (\.\d+)? ([eE][+-]?\d+)?`.
fn is_json_number(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    };
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

/// The exponent of a JSON number's text (0 without one); `None` when it does not fit an i64.
fn exponent(text: &str) -> Option<i64> {
    match text.bytes().position(|c| c | 0x20 == b'e') {
        None => Some(0),
        Some(at) => text[at + 1..].parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Sum {
        Sum::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    fn sum(terms: &[&str]) -> Sum {
        let mut s = Sum::ZERO;
        for t in terms {
            s += &p(t);
        }
        s
    }

    #[test]
    fn sums_are_exact_decimals() {
        assert_eq!(sum(&["12.34", "0.66"]), p("13"));
        assert_eq!(p("-1.5").to_string(), "-1.5");
        assert_eq!(sum(&["0.1", "0.1", "0.1"]).to_string(), "0.3", "no floating-point drift");
        assert_eq!(p("-999999999999999999.5").to_string(), "-999999999999999999.5");
        assert_eq!(p("0").to_string(), "0");
        assert_eq!(p("-0").to_string(), "0");
        assert_eq!(p("-0.0e5").to_string(), "0");
    }

    #[test]
    fn exponent_notation_long_integers_and_long_decimals_are_exact() {
        assert_eq!(p("1e2").to_string(), "100");
        assert_eq!(p("1.5E-3").to_string(), "0.0015");
        assert_eq!(p("2.5e+1"), p("25"));
        assert_eq!(p("0.1234567895").to_string(), "0.1234567895", "a tenth decimal is kept");
        assert_eq!(p("1000000000000000000").to_string(), "1000000000000000000");
        assert_eq!(
            sum(&["99999999999999999999999999999", "1", "0.000000000000000000001"]).to_string(),
            "100000000000000000000000000000.000000000000000000001"
        );
        assert_eq!(sum(&["1e300", "-1e300", "1e-300"]).to_string(), format!("0.{}1", "0".repeat(299)));
        // The largest and the smallest double, exactly as written.
        assert!(Sum::parse("1.7976931348623157e308").is_ok());
        assert!(Sum::parse("4.9406564584124654e-324").is_ok());
        assert!(Sum::parse("2.5e-324").is_ok(), "a double reads it as the smallest double, not 0");
        assert_eq!(p("0e-99999"), Sum::ZERO, "zero, whatever its exponent");
        assert_eq!(p("-0.000e+400").to_string(), "0");
    }

    #[test]
    fn billionths_that_would_overflow_move_to_the_exact_form() {
        // 1.7e11 amounts of 10^18 are needed to get here: set the sum there directly.
        let mut huge = Sum(Repr::Fixed(i128::MAX - 5));
        huge += &Sum(Repr::Fixed(10));
        assert!(matches!(huge.0, Repr::Big(_)));
        assert_eq!(huge.to_big(), BigDecimal::new(BigInt::from(i128::MAX) + 5, 9));
        huge += &Sum(Repr::Fixed(-10));
        assert_eq!(huge, Sum(Repr::Fixed(i128::MAX - 5)), "equal across the two forms");
    }

    #[test]
    fn what_a_double_cannot_hold_is_refused_and_says_so() {
        for s in ["1e309", "1.8e308", "-1e400", "2.4e-324", "1e-400", "1e999999999", "1e99999999999999999999"] {
            let e = Sum::parse(s).unwrap_err();
            assert_eq!(e, SumError::OutOfRange(s.to_owned()), "{s}");
            assert!(e.to_string().contains("beyond what a double holds"), "{e}");
        }
        let long = format!("1.{}1", "0".repeat(330));
        assert_eq!(p(&long).to_string(), long, "a digit below 10^-324 is kept: the value is in range");
        assert!(
            matches!(Sum::parse(&format!("1.{}", "0".repeat(1_000))), Err(SumError::OutOfRange(_))),
            "text over 1,000 characters"
        );
        for s in ["\"x\"", "NaN", "Infinity", "1.", ".5", "01", "+1", "1e", "0x10", "", "-", "1 ", "null", "true"] {
            assert_eq!(Sum::parse(s), Err(SumError::NotANumber(s.to_owned())), "{s}");
        }
    }

    #[test]
    fn serde_writes_text_and_reads_text_or_older_billionths() {
        let s = sum(&["1e20", "0.5"]);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "\"100000000000000000000.5\"");
        assert_eq!(serde_json::from_str::<Sum>(&json).unwrap(), s);
        assert_eq!(serde_json::from_str::<Sum>("1500000000").unwrap(), p("1.5"), "billionths, as written before");
        assert!(serde_json::from_str::<Sum>("\"1e999999\"").is_err(), "a total is still bounded");
        // A total beyond one amount's bounds reads back: two amounts of 1e308 make 2e308.
        let total = sum(&["1e308", "1e308"]);
        assert_eq!(serde_json::from_str::<Sum>(&serde_json::to_string(&total).unwrap()).unwrap(), total);
        let tiny = sum(&["1e-323", "-9.9e-324"]);
        assert_eq!(serde_json::from_str::<Sum>(&serde_json::to_string(&tiny).unwrap()).unwrap(), tiny);
        let err = serde_json::from_str::<Sum>("18446744073709551616").unwrap_err().to_string();
        assert!(err.contains("too large to read exactly"), "{err}");
    }

    /// Writes `digits` (a nonempty decimal integer text) times 10^`exp`, as a decimal reference
    /// would: by moving the point in the text, with no arithmetic.
    fn reference(neg: bool, digits: &str, exp: i64) -> String {
        let digits = digits.trim_start_matches('0');
        if digits.is_empty() {
            return "0".to_owned();
        }
        let point = digits.len() as i64 + exp; // digits before the point
        let text = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point >= digits.len() as i64 {
            format!("{digits}{}", "0".repeat((point - digits.len() as i64) as usize))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        let text = if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.').to_owned() } else { text };
        if neg { format!("-{text}") } else { text }
    }

    proptest! {
        /// Any JSON number within a double's exponent range reads as exactly the value its text
        /// writes: integer part, decimals and exponent, checked against the point moved by hand.
        #[test]
        fn every_number_reads_exactly(
            neg in any::<bool>(),
            int in "[1-9][0-9]{0,40}|0",
            frac in "[0-9]{0,40}",
            exp in -250i64..250,
            upper in any::<bool>(),
        ) {
            let mut text = format!("{}{int}", if neg { "-" } else { "" });
            if !frac.is_empty() {
                text = format!("{text}.{frac}");
            }
            if exp != 0 {
                text = format!("{text}{}{exp}", if upper { "E" } else { "e" });
            }
            let want = reference(neg, &format!("{int}{frac}"), exp - frac.len() as i64);
            prop_assert_eq!(p(&text).to_string(), want);
        }

        /// Sums do not depend on the order of their terms, and equal the decimal reference's sum.
        #[test]
        fn sums_are_exact_in_any_order(terms in proptest::collection::vec(
            ("-?[1-9][0-9]{0,25}(\\.[0-9]{1,15})?", -30i64..30), 1..40)
        ) {
            let texts: Vec<String> = terms.iter().map(|(m, e)| if *e == 0 { m.clone() } else { format!("{m}e{e}") }).collect();
            let mut forward = Sum::ZERO;
            let mut backward = Sum::ZERO;
            let mut reference = BigDecimal::from(0);
            for t in &texts {
                forward += &p(t);
                reference += BigDecimal::from_str(t).unwrap();
            }
            for t in texts.iter().rev() {
                backward += &p(t);
            }
            prop_assert_eq!(&forward, &backward);
            prop_assert_eq!(forward.to_big(), reference);
        }

        /// Any text parses or is refused; never a panic.
        #[test]
        fn any_text_parses_or_is_refused(s in "\\PC{0,40}") {
            let _ = Sum::parse(&s);
        }
    }
}
