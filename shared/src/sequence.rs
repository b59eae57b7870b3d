//! Sequence numbers of Kinesis and DynamoDB Streams records, compared as the integers they are.
//!
//! A partial batch response names the records to retry by sequence number, and the event source
//! mapping resumes from the LOWEST one listed: comparing them as text (`"100" < "99"`) would
//! resume from the wrong record. [`SequenceNumber`] parses the decimal text once and orders
//! numbers of any width the APIs allow, without allocating.
use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

/// A Kinesis sequence number, compared as the integer it is, never as text.
///
/// Why not `u128`: the notes we started from say "up to 128 bits", but AWS's own sample records
/// carry 56-digit numbers (about 2^185), and the Kinesis API allows up to 129 digits
/// (`0|([1-9]\d{0,128})`). So the number is kept as its canonical digits (no leading zeros) and
/// ordered by length, then digit by digit: integer order at any width.
///
/// ```
/// use pushpull::pull::SequenceNumber;
/// let n = |s: &str| s.parse::<SequenceNumber>().unwrap();
/// assert!(n("9") < n("10"));
/// assert!(n("49590338271490256608559692538361571095921575989136588898")
///       < n("49590338271490256608559692538361571095921575989136589898"));
/// assert_eq!(n("007"), n("7"));
/// ```
///
/// The digits are kept inline (no allocation): cloning one is a copy of 130 bytes, which is
/// cheaper than a heap allocation on the path of every record.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SequenceNumber {
    len: u8,
    digits: [u8; MAX_SEQUENCE_DIGITS],
}

impl fmt::Debug for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SequenceNumber({})", self.as_str())
    }
}

/// Longest sequence number the Kinesis API allows, in digits.
pub const MAX_SEQUENCE_DIGITS: usize = 129;

/// A sequence number that is not a decimal number the Kinesis API could have produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sequence number {0:?} is not a decimal integer of at most 129 digits")]
pub struct SequenceNumberError(pub String);

impl SequenceNumber {
    /// The canonical digits.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits are ever stored.
        std::str::from_utf8(&self.digits[..usize::from(self.len)]).unwrap_or("0")
    }
}

impl FromStr for SequenceNumber {
    type Err = SequenceNumberError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        // Leading zeros are dropped (one digit kept), so equal numbers have equal digits.
        let start = bytes.iter().position(|b| *b != b'0').unwrap_or(bytes.len().saturating_sub(1));
        let digits = &bytes[start..];
        if bytes.is_empty() || digits.len() > MAX_SEQUENCE_DIGITS || !all_digits(digits) {
            return Err(SequenceNumberError(s.to_owned()));
        }
        let mut out = SequenceNumber { len: digits.len() as u8, digits: [0; MAX_SEQUENCE_DIGITS] };
        out.digits[..digits.len()].copy_from_slice(digits);
        Ok(out)
    }
}

/// Whether every byte is an ASCII digit: without an early exit, so the loop vectorizes (a
/// sequence number is checked for every record of every batch).
fn all_digits(bytes: &[u8]) -> bool {
    bytes.iter().fold(true, |ok, b| ok & b.is_ascii_digit())
}

impl Ord for SequenceNumber {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.len
            .cmp(&other.len)
            .then_with(|| self.digits[..usize::from(self.len)].cmp(&other.digits[..usize::from(other.len)]))
    }
}
impl PartialOrd for SequenceNumber {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for SequenceNumber {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SequenceNumber {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A place in a shard that a consumer of KPL aggregates can checkpoint: a Kinesis record's
/// sequence number and, for a user record unpacked from an aggregate, its sub-sequence number
/// (the KCL's `ExtendedSequenceNumber`). `sub: None` stands for the whole record, after every
/// user record in it.
///
/// ```
/// use pushpull::pull::Position;
/// let seq = "49590338271490256608559692538361571095921575989136588898".parse().unwrap();
/// let user_3 = Position::user(seq, 3);
/// assert!(Position::user(user_3.sequence.clone(), 2) < user_3);
/// assert!(user_3 < Position::whole(user_3.sequence.clone()));
/// assert!(Position::whole(user_3.sequence.clone()) < Position::whole("49590338271490256608559692538361571095921575989136588899".parse().unwrap()));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    /// The Kinesis record's sequence number.
    pub sequence: SequenceNumber,
    /// The user record's sub-sequence number in its aggregate; `None`: the whole record.
    pub sub: Option<u64>,
}

impl Position {
    /// A whole (plain) record.
    pub fn whole(sequence: SequenceNumber) -> Self {
        Position { sequence, sub: None }
    }

    /// User record `sub` of an aggregated record.
    pub fn user(sequence: SequenceNumber, sub: u64) -> Self {
        Position { sequence, sub: Some(sub) }
    }
}

impl Ord for Position {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // `None` (the whole record) sorts after every user record of it.
        let sub = |s: Option<u64>| s.map_or(u128::MAX, u128::from);
        self.sequence.cmp(&other.sequence).then_with(|| sub(self.sub).cmp(&sub(other.sub)))
    }
}
impl PartialOrd for Position {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.sub {
            None => write!(f, "{}", self.sequence),
            Some(sub) => write!(f, "{}/{sub}", self.sequence),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sequence_numbers_compare_as_integers_not_text() {
        let n = |s: &str| s.parse::<SequenceNumber>().unwrap();
        assert!(n("9") < n("10"), "text order would say otherwise");
        assert!(n("0") < n("1"));
        assert_eq!(n("000"), n("0"));
        // Wider than u128 (AWS's sample numbers are 56 digits); the API allows 129 digits.
        let widest = "9".repeat(MAX_SEQUENCE_DIGITS);
        assert!(n("340282366920938463463374607431768211456") < n(&widest));
        for bad in ["", "-1", "1e5", " 1", "0x10", &"1".repeat(MAX_SEQUENCE_DIGITS + 1)] {
            assert!(bad.parse::<SequenceNumber>().is_err(), "{bad:?}");
        }
        assert_eq!(serde_json::to_string(&n("0042")).unwrap(), "\"42\"");
    }

    proptest! {
        /// Order agrees with the integers' order wherever u128 can hold them, and text round-trips.
        #[test]
        fn order_is_integer_order(a: u128, b: u128, zeros in 0usize..5) {
            let pa: SequenceNumber = format!("{}{a}", "0".repeat(zeros)).parse().unwrap();
            let pb: SequenceNumber = b.to_string().parse().unwrap();
            prop_assert_eq!(pa.cmp(&pb), a.cmp(&b));
            prop_assert_eq!(pa.to_string(), a.to_string());
        }

        /// Any text either parses to canonical digits or is refused; never a panic.
        #[test]
        fn any_text_parses_or_is_refused(s in "\\PC{0,140}") {
            match s.parse::<SequenceNumber>() {
                Ok(n) => {
                    prop_assert!(n.as_str().bytes().all(|b| b.is_ascii_digit()));
                    prop_assert!(n.as_str() == "0" || !n.as_str().starts_with('0'));
                }
                Err(e) => prop_assert_eq!(e.0, s),
            }
        }

        /// Wide numbers (up to 129 digits) order by length, then digits.
        #[test]
        fn wide_numbers_order_like_big_integers(a in "[1-9][0-9]{0,128}", b in "[1-9][0-9]{0,128}") {
            let (pa, pb) = (a.parse::<SequenceNumber>().unwrap(), b.parse::<SequenceNumber>().unwrap());
            prop_assert_eq!(pa.cmp(&pb), a.len().cmp(&b.len()).then_with(|| a.cmp(&b)));
        }
    }
}
