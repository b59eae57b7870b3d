//! Reading a large event's records on several threads.
//!
//! A 10,000-record batch is a 6 MB JSON document, and one serde_json pass over it is most of
//! what the pull function spends (BENCHMARKS.md). Its records are independent values of one
//! array, so the array is cut into contiguous parts at record boundaries and each part is read
//! on its own thread, every record with serde_json as the one-pass reader would.
//!
//! A cut is found without parsing, where the bytes `},{"` appear: where two records meet, in a
//! batch as Lambda writes it. Anywhere else (objects side by side in an array nested in a record,
//! or a string that ends in `},{`), the record the cut falls in spans it, so the part before the
//! cut ends inside that record and fails to read, and the whole is refused; the first part starts
//! at the array's `[`, so by induction every cut of a read that succeeds is where two records
//! meet. Whatever else this reader does not fully recognise (the `Records` key not first,
//! whitespace between records, anything after the array it cannot read) returns `None` too, and
//! the caller reads the payload in one pass, which gives the canonical result or error. So for any
//! payload this reader either returns exactly what one pass returns, or nothing.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use super::{KinesisEvent, KinesisEventRecord};

/// The JSON whitespace serde_json skips.
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\t' | b'\r')
}

fn skip_ws(payload: &[u8], mut at: usize) -> usize {
    while payload.get(at).is_some_and(|&b| is_ws(b)) {
        at += 1;
    }
    at
}

/// The index just after the `[` of `{"Records":[`, allowing whitespace between the tokens.
fn records_start(payload: &[u8]) -> Option<usize> {
    let mut at = skip_ws(payload, 0);
    for token in [&b"{"[..], b"\"Records\"", b":", b"["] {
        at = skip_ws(payload, at);
        if !payload.get(at..)?.starts_with(token) {
            return None;
        }
        at += token.len();
    }
    Some(at)
}

/// Where a record starts at or after `from`: the `{` of the first `},{"` from there.
fn cut_at_or_after(payload: &[u8], from: usize) -> Option<usize> {
    memchr::memmem::find(payload.get(from..)?, b"},{\"").map(|i| from + i + 2)
}

/// Reads the records from `from` (just after the array's `[`, or a cut) up to `until` (a cut),
/// or to the array's end when `until` is `None`, into `records`; returns the index of the `]`
/// when it reached the end (`Some(None)` for a part that ends at a cut). `None` if anything is not
/// a record list as expected.
///
/// The part's bytes are checked as UTF-8 once, in one call, and read as text: serde_json then
/// skips the check it makes of every string it borrows from bytes (a tenth of the reading, in
/// a profile of W1). A part with bytes that are not UTF-8 is left to one pass.
fn read_part<'a>(
    payload: &'a [u8],
    from: usize,
    until: Option<usize>,
    records: &mut Vec<KinesisEventRecord<'a>>,
) -> Option<Option<usize>> {
    let text = std::str::from_utf8(payload.get(from..until.unwrap_or(payload.len()))?).ok()?;
    let bytes = text.as_bytes();
    let mut at = skip_ws(bytes, 0);
    loop {
        if until.is_some() && at == bytes.len() {
            return Some(None);
        }
        let mut values = serde_json::Deserializer::from_str(text.get(at..)?).into_iter::<KinesisEventRecord<'a>>();
        // A part that ends inside a record (the cut was between objects nested in it) fails here.
        records.push(values.next()?.ok()?);
        at = skip_ws(bytes, at + values.byte_offset());
        match bytes.get(at) {
            Some(b',') => at = skip_ws(bytes, at + 1),
            Some(b']') if until.is_none() => return Some(Some(from + at)),
            _ => return None,
        }
    }
}

/// Reads `payload` in `parts` parts on `threads` threads (the calling thread and
/// `threads - 1` helpers of [`crate::parallel`]), or returns `None` for the caller to read it in
/// one pass (see the module documentation).
///
/// The parts are more than the threads, and each thread takes the next part not yet taken until
/// none is left: a helper that starts late (on Firecracker, which Lambda runs on, a thread
/// started on an idle vCPU often begins when the caller has read half the batch alone;
/// BENCHMARKS.md) costs only the parts it did not take, never a wait for it.
pub(super) fn parse(payload: &[u8], threads: usize, parts: usize) -> Option<KinesisEvent<'_>> {
    let open = records_start(payload)?;
    // An empty array, or one record: nothing to cut.
    if payload.get(skip_ws(payload, open)) == Some(&b']') {
        return None;
    }
    let mut cuts = Vec::with_capacity(parts);
    for k in 1..parts {
        let target = open + (payload.len() - open) * k / parts;
        let from = cuts.last().map_or(target, |&c: &usize| target.max(c + 1));
        match cut_at_or_after(payload, from) {
            Some(cut) => cuts.push(cut),
            None => break,
        }
    }
    if cuts.is_empty() {
        return None;
    }
    let bounds: Vec<(usize, Option<usize>)> = std::iter::once(open)
        .chain(cuts.iter().copied())
        .zip(cuts.iter().copied().map(Some).chain(std::iter::once(None)))
        .collect();
    // Every part's vector is allocated here, sized by the first record (records of a batch are
    // about the same size), and the first part's has room for the whole batch: the records stay
    // in this thread's allocator arena, which the next batch reuses, instead of growing an arena
    // for each reading thread (measured: 3-4 MiB more peak RSS in W1 that way).
    let first_len = cut_at_or_after(payload, open).map_or(payload.len(), |next| next - open).max(1);
    let room = |from: usize, until: Option<usize>| (until.unwrap_or(payload.len()) - from) / first_len * 9 / 8 + 16;
    type Slot<'a> = Mutex<(Vec<KinesisEventRecord<'a>>, Option<Option<usize>>)>;
    let slots: Vec<Slot<'_>> = bounds
        .iter()
        .enumerate()
        .map(|(i, &(from, until))| {
            Mutex::new((Vec::with_capacity(if i == 0 { room(open, None) } else { room(from, until) }), None))
        })
        .collect();
    let failed = AtomicBool::new(false);
    crate::parallel::each_part(threads, bounds.len(), |i| {
        if failed.load(Ordering::Relaxed) {
            return;
        }
        let (from, until) = bounds[i];
        let mut slot = slots[i].lock().unwrap_or_else(PoisonError::into_inner);
        let (records, outcome) = &mut *slot;
        *outcome = read_part(payload, from, until, records);
        if outcome.is_none() {
            failed.store(true, Ordering::Relaxed);
        }
    });
    // A part not read (another failed first) has no outcome: the whole is left to one pass.
    let mut slots = slots.into_iter().map(|slot| slot.into_inner().unwrap_or_else(PoisonError::into_inner));
    let (mut records, outcome) = slots.next()?;
    let mut close = outcome?;
    for (mut part, outcome) in slots {
        close = outcome?;
        records.append(&mut part);
    }
    // The envelope without its records: `{"Records":[` and what follows the `]`, read as one
    // pass would (its other fields, a duplicate `Records`, trailing bytes).
    let close = close?;
    let mut envelope = Vec::with_capacity(open + payload.len() - close);
    envelope.extend_from_slice(&payload[..open]);
    envelope.extend_from_slice(&payload[close..]);
    let rest: KinesisEvent<'_> = serde_json::from_slice(&envelope).ok()?;
    if !rest.records.is_empty() {
        return None;
    }
    Some(KinesisEvent {
        records,
        window: rest.window,
        state: rest.state,
        shard_id: rest.shard_id,
        event_source_arn: rest.event_source_arn,
        is_final_invoke_for_window: rest.is_final_invoke_for_window,
        is_window_terminated_early: rest.is_window_terminated_early,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What one pass reads, field by field (the state map's order is its own).
    fn assert_same(split: &KinesisEvent<'_>, one_pass: &KinesisEvent<'_>) {
        assert_eq!(format!("{:?}", split.records), format!("{:?}", one_pass.records));
        assert_eq!(split.window, one_pass.window);
        assert_eq!(split.state, one_pass.state);
        assert_eq!(split.shard_id, one_pass.shard_id);
        assert_eq!(split.event_source_arn, one_pass.event_source_arn);
        assert_eq!(split.is_final_invoke_for_window, one_pass.is_final_invoke_for_window);
        assert_eq!(split.is_window_terminated_early, one_pass.is_window_terminated_early);
    }

    fn record(seq: usize, key: &str, extra: &str) -> String {
        format!(
            r#"{{"kinesis":{{"partitionKey":{},"sequenceNumber":"{seq}","data":"e30=","approximateArrivalTimestamp":1.5}}{extra},"eventID":"shardId-000000000001:{seq}","eventSourceARN":"arn:aws:kinesis:us-east-1:1:stream/s"}}"#,
            serde_json::to_string(key).unwrap()
        )
    }

    fn event(records: &[String], after: &str) -> String {
        format!(r#"{{"Records":[{}]{after}}}"#, records.join(","))
    }

    /// `parse` either declines or reads exactly what one pass reads; one pass must then succeed.
    fn check(payload: &str, parts: usize) -> Option<()> {
        // Parts on fewer, as many, and more threads than there are parts.
        let split = parse(payload.as_bytes(), 1 + parts % 3, parts);
        let one_pass = serde_json::from_slice::<KinesisEvent<'_>>(payload.as_bytes());
        if let Some(split) = &split {
            let one_pass = one_pass.unwrap_or_else(|e| panic!("split read what one pass refuses ({e}): {payload}"));
            assert_same(split, &one_pass);
        }
        split.map(|_| ())
    }

    #[test]
    fn a_batch_read_in_parts_is_the_batch_read_in_one_pass() {
        let records: Vec<String> = (0..50).map(|i| record(i, &format!("u{i}"), "")).collect();
        let windowed = r#","window":{"start":"2026-11-26T00:00:00Z","end":"2026-11-26T00:01:00Z"},"state":{"a":"1","b":"2"},"shardId":"shardId-000000000001","isFinalInvokeForWindow":true"#;
        for after in ["", windowed] {
            for parts in 2..=7 {
                let payload = event(&records, after);
                assert!(check(&payload, parts).is_some(), "{parts} parts of {payload}");
                assert_eq!(parse(payload.as_bytes(), 2, parts).unwrap().records.len(), 50);
            }
        }
    }

    #[test]
    fn anything_else_is_left_to_one_pass() {
        let records: Vec<String> = (0..20).map(|i| record(i, "k", "")).collect();
        let declined = [
            // Records not the first key.
            format!(r#"{{"shardId":"s","Records":[{}]}}"#, records.join(",")),
            // Whitespace between records: no cut is found.
            format!(r#"{{"Records":[{}]}}"#, records.join(", ")),
            // A duplicate Records key, trailing bytes, a record that is not one, no records.
            event(&records, r#","Records":[]"#),
            format!("{} x", event(&records, "")),
            event(&[records[..15].join(","), "{\"kinesis\":1}".to_owned(), records[15..].join(",")], ""),
            event(&[], ""),
            event(&records[..1], ""),
        ];
        for payload in &declined {
            assert!(check(payload, 2).is_none(), "{payload}");
        }
        // Objects side by side inside a record where the cut would fall: refused there, and a
        // cut found beyond them still reads the batch as one pass does.
        let nested: Vec<String> =
            (0..20).map(|i| record(i, "k", &format!(r#","x":[{}]"#, vec![r#"{"a":1}"#; 40].join(",")))).collect();
        for parts in 2..=6 {
            check(&event(&nested, ""), parts);
        }
        // `},{"` inside a string is escaped, so never a cut.
        let quoted: Vec<String> = (0..20).map(|i| record(i, r#"},{"kinesis":{"#, "")).collect();
        assert!(check(&event(&quoted, ""), 3).is_some());
        // A string that ends in `},{` makes those bytes with its closing quote: such a cut is
        // refused, or a later one is used, and the batch still reads as one pass reads it.
        let ending: Vec<String> = (0..20).map(|i| record(i, "x},{", "")).collect();
        for parts in 2..=6 {
            check(&event(&ending, ""), parts);
        }
    }

    proptest! {
        /// Generated batches (keys with any characters, records with nested unknown values,
        /// whitespace between tokens): read in parts exactly as in one pass, or left to it.
        #[test]
        fn generated_batches_read_in_parts_as_in_one_pass(
            keys in prop::collection::vec("\\PC{0,12}", 2..40),
            nested in prop::collection::vec(0usize..4, 2..40),
            spaced in any::<bool>(),
            parts in 2usize..6,
        ) {
            let records: Vec<String> = keys.iter().zip(nested.iter().cycle()).enumerate()
                .map(|(i, (key, &n))| record(i, key, &if n == 0 { String::new() } else { format!(r#","x":[{}]"#, vec![r#"{"a":[{"b":{}}]}"#; n].join(",")) }))
                .collect();
            let mut payload = event(&records, "");
            if spaced {
                payload = payload.replacen("{\"Records\":[", " {\n \"Records\" :\t[ ", 1);
            }
            let read = check(&payload, parts);
            if nested.iter().all(|&n| n == 0) && !keys.iter().any(|k| k.ends_with("},{")) {
                prop_assert!(read.is_some(), "declined {payload}");
            }
        }

        /// Any change to a batch: the parts read what one pass reads, or nothing; never a panic.
        #[test]
        fn damaged_batches_are_never_read_differently(
            at in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4),
            parts in 2usize..5,
        ) {
            let records: Vec<String> = (0..12).map(|i| record(i, "k", "")).collect();
            let mut payload = event(&records, r#","shardId":"s""#).into_bytes();
            for (index, byte, how) in at {
                let i = index.index(payload.len());
                match how {
                    0 => payload[i] = byte,
                    1 => payload.insert(i, byte),
                    _ => { payload.remove(i); }
                }
            }
            let split = parse(&payload, 2, parts);
            if let Some(split) = &split {
                let one_pass = serde_json::from_slice::<KinesisEvent<'_>>(&payload);
                prop_assert!(one_pass.is_ok(), "split read what one pass refuses");
                assert_same(split, &one_pass.unwrap());
            }
        }
    }
}
