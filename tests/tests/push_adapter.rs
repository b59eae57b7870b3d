//! The push adapter against LocalStack with the real binary: duplicates, disorder, crashes,
//! large and compressed objects, throttling and concurrency. Each test asserts the exact multiset
//! of records that reached the stream.
use std::io::Write;
use std::time::Duration;

use pushpull_local::runtime_api::Outcome;
use pushpull_tests::{
    function, invoke_ok, local, object_created_event, object_json_lines, peak_rss_kib, start, stream_by_key,
    stream_multiset, unique,
};

struct Fixture {
    l: pushpull_local::localstack::Local,
    bucket: String,
    stream: String,
}

async fn fixture(name: &str, shards: i32) -> Fixture {
    let l = local().await;
    let bucket = unique(name);
    let stream = unique(name);
    l.ensure_bucket(&bucket).await.unwrap();
    l.ensure_stream(&stream, shards).await.unwrap();
    Fixture { l, bucket, stream }
}

impl Fixture {
    fn env<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, String)> {
        let mut env = vec![
            ("STREAM_NAME", self.stream.clone()),
            ("CHECKPOINT_URI", format!("s3://{}/checkpoints", self.bucket)),
            ("QUARANTINE_URI", format!("s3://{}/quarantine", self.bucket)),
            ("OUTPUT_URI", format!("s3://{}/output", self.bucket)),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        env
    }

    async fn host(&self, extra: &[(&str, &str)]) -> pushpull_local::runtime_api::FunctionHost {
        let env = self.env(extra);
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        start(function("s3-to-kinesis", &pairs)).await
    }

    async fn put(&self, key: &str, body: Vec<u8>) {
        self.l.s3.put_object().bucket(&self.bucket).key(key).body(body.into()).send().await.unwrap();
    }
}

fn lines(n: usize, tag: &str) -> (Vec<String>, Vec<u8>) {
    let lines: Vec<String> = (0..n).map(|i| format!(r#"{{"id":{i},"tag":"{tag}","user":"u{}"}}"#, i % 5)).collect();
    let mut body = lines.join("\n").into_bytes();
    body.push(b'\n');
    let mut sorted = lines;
    sorted.sort();
    (sorted, body)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

#[tokio::test]
async fn a_duplicate_notification_of_a_completed_object_sends_nothing() {
    let f = fixture("pp-dup", 1).await;
    let (expected, body) = lines(30, "dup");
    f.put("input/dup.ndjson", body).await;
    let event = object_created_event(&f.l, &f.bucket, "input/dup.ndjson", "00A1").await;
    let mut host = f.host(&[]).await;
    let first = invoke_ok(&mut host, event.as_str()).await;
    assert_eq!(first["objects"][0]["outcome"], "processed");
    let second = invoke_ok(&mut host, event.as_str()).await;
    assert_eq!(second["objects"][0]["outcome"], "already_done");
    assert_eq!(second["objects"][0]["records"], 30, "the summary reports the earlier work");
    assert_eq!(stream_multiset(&f.l, &f.stream).await, expected);
}

#[tokio::test]
async fn an_older_event_for_a_key_arriving_late_is_stale() {
    let f = fixture("pp-order", 1).await;
    f.l.s3
        .put_bucket_versioning()
        .bucket(&f.bucket)
        .versioning_configuration(
            aws_sdk_s3::types::VersioningConfiguration::builder()
                .status(aws_sdk_s3::types::BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let (_, v1) = lines(10, "v1");
    f.put("input/o.ndjson", v1).await;
    let old = object_created_event(&f.l, &f.bucket, "input/o.ndjson", "0055AED6DCD90281E5").await;
    let (expected, v2) = lines(12, "v2");
    f.put("input/o.ndjson", v2).await;
    let new = object_created_event(&f.l, &f.bucket, "input/o.ndjson", "0055AED6DCD90281E6").await;
    assert_ne!(old, new, "two versions, two events");
    let mut host = f.host(&[]).await;
    // Delivered out of order: the newer first. The older one names a version that still exists,
    // so only its sequencer tells that it is stale.
    assert_eq!(invoke_ok(&mut host, new.as_str()).await["objects"][0]["outcome"], "processed");
    let late = invoke_ok(&mut host, old.as_str()).await;
    assert_eq!(late["objects"][0]["outcome"]["skipped"]["reason"], "stale event (older sequencer)");
    assert_eq!(stream_multiset(&f.l, &f.stream).await, expected);
}

/// The object's progress checkpoint as the function last wrote it (`lines_done`), if any.
async fn checkpointed_lines(f: &Fixture) -> Option<u64> {
    let list = f.l.s3.list_objects_v2().bucket(&f.bucket).prefix("checkpoints/objects/").send().await.ok()?;
    let key = list.contents().first()?.key()?.to_owned();
    let body = f.l.s3.get_object().bucket(&f.bucket).key(key).send().await.ok()?.body.collect().await.ok()?;
    serde_json::from_slice::<serde_json::Value>(&body.into_bytes()).ok()?["lines_done"].as_u64()
}

/// Ends the dead owner's lease now, as if its lease time had passed (the retry of an async invoke
/// comes a minute or more later): the checkpoint is rewritten with `lease_until_ms` in the past,
/// everything else as the dead owner left it.
async fn expire_lease(f: &Fixture) {
    let list = f.l.s3.list_objects_v2().bucket(&f.bucket).prefix("checkpoints/objects/").send().await.unwrap();
    let key = list.contents().first().and_then(|o| o.key()).expect("the claim wrote a checkpoint").to_owned();
    let body = f.l.s3.get_object().bucket(&f.bucket).key(&key).send().await.unwrap().body.collect().await.unwrap();
    let mut cp: serde_json::Value = serde_json::from_slice(&body.into_bytes()).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    cp["lease_until_ms"] = (now - 1).into();
    f.l.s3.put_object().bucket(&f.bucket).key(&key).body(serde_json::to_vec(&cp).unwrap().into()).send().await.unwrap();
}

/// Invokes the push function on a 4,000-line object, kills it with SIGKILL once `ready` says so
/// (checked every 50 ms while the invocation runs), ends the dead owner's lease and invokes
/// again. Returns the retry's object summary after asserting the stream holds every line once.
///
/// The kill is triggered by what the test observes (records in the stream, the checkpoint), not
/// by a timer: a loaded machine (CI runs the 100k-line pipeline tests alongside) must not move
/// the crash to before the first record or after the last.
async fn crash_then_retry<F, Fut>(name: &str, settings: &[(&str, &str)], ready: F) -> serde_json::Value
where
    F: Fn(std::sync::Arc<Fixture>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let f = std::sync::Arc::new(fixture(name, 2).await);
    let (expected, body) = lines(4000, "crash");
    f.put("input/big one.ndjson", body).await;
    let event = object_created_event(&f.l, &f.bucket, "input/big one.ndjson", "00B1").await;
    let mut host = f.host(settings).await;
    let pid = host.pid().expect("running");
    let watched = f.clone();
    let killer = tokio::spawn(async move {
        while !ready(watched.clone()).await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
    });
    let inv = host.invoke(event.clone()).await.unwrap();
    let killed = killer.is_finished();
    killer.abort();
    assert!(
        matches!(inv.outcome, Outcome::Crashed { .. }),
        "killed mid-object (killer done: {killed}): {:?}",
        inv.outcome
    );
    let partial = stream_multiset(&f.l, &f.stream).await.len();
    assert!(partial > 0 && partial < expected.len(), "killed part-way: {partial} of {} written", expected.len());

    expire_lease(&f).await;
    let retry = invoke_ok(&mut host, event.as_str()).await;
    let o = retry["objects"][0].clone();
    assert_eq!(o["outcome"], "processed", "{o}");
    assert_eq!(o["records"], 4000, "{o}");
    assert_eq!(stream_multiset(&f.l, &f.stream).await, expected, "every line exactly once");
    o
}

#[tokio::test]
async fn a_crash_mid_object_then_the_retry_resumes_from_the_checkpoint_and_sends_every_line_once() {
    let settings = [("PUT_MAX_RECORDS", "40"), ("CHECKPOINT_INTERVAL_MS", "150"), ("CHECKPOINT_LEASE_MS", "1000")];
    let o =
        crash_then_retry(
            "pp-crash",
            &settings,
            |f| async move { checkpointed_lines(&f).await.is_some_and(|n| n >= 400) },
        )
        .await;
    assert!(o["resumed_after_line"].as_u64().unwrap() >= 400, "resumed from the checkpoint: {o}");
}

#[tokio::test]
async fn a_crash_before_the_first_progress_checkpoint_finds_what_was_sent_in_the_stream() {
    // Only the claim is checkpointed (the first progress checkpoint is due 10 minutes in, the
    // longest interval allowed): the retry starts at line 1 and must recognise every record the
    // dead owner sent (read back from the stream by arrival time) instead of resending it.
    let settings =
        [("PUT_MAX_RECORDS", "40"), ("CHECKPOINT_INTERVAL_MS", "600000"), ("CHECKPOINT_LEASE_MS", "1200000")];
    let o = crash_then_retry("pp-crash0", &settings, |f| async move {
        f.l.read_stream(&f.stream).await.is_ok_and(|r| r.len() >= 200)
    })
    .await;
    assert_eq!(o["resumed_after_line"], 0, "{o}");
    assert!(o["found_written"].as_u64().unwrap() >= 200, "found in the stream, not resent: {o}");
}

#[tokio::test]
async fn gzip_objects_by_suffix_or_content_encoding_and_multi_member() {
    let f = fixture("pp-gzip", 1).await;
    let (a, body_a) = lines(500, "gz-suffix");
    f.put("input/a.ndjson.gz", gzip(&body_a)).await;
    let (b, body_b) = lines(300, "gz-encoding");
    f.l.s3
        .put_object()
        .bucket(&f.bucket)
        .key("input/b.ndjson")
        .content_encoding("gzip")
        .body(gzip(&body_b).into())
        .send()
        .await
        .unwrap();
    // Two gzip members back to back (what `cat x.gz y.gz` makes) are one stream of lines.
    let (c1, body_c1) = lines(7, "member-1");
    let (c2, body_c2) = lines(9, "member-2");
    let mut multi = gzip(&body_c1);
    multi.extend(gzip(&body_c2));
    f.put("input/c.ndjson.gz", multi).await;
    let mut host = f.host(&[]).await;
    for (key, n) in [("input/a.ndjson.gz", 500), ("input/b.ndjson", 300), ("input/c.ndjson.gz", 16)] {
        let s = invoke_ok(&mut host, object_created_event(&f.l, &f.bucket, key, "00C1").await).await;
        assert_eq!(s["objects"][0]["records"], n, "{key}: {s}");
    }
    let mut expected = [a, b, c1, c2].concat();
    expected.sort();
    assert_eq!(stream_multiset(&f.l, &f.stream).await, expected);
}

#[tokio::test]
async fn bad_lines_of_every_kind_are_quarantined_and_empty_objects_are_fine() {
    let f = fixture("pp-bad", 1).await;
    let mut body = b"{\"ok\":1}\n".to_vec();
    body.extend(b"{\"ok\":\xff}\n"); // not UTF-8
    body.extend(format!("{{\"long\":\"{}\"}}\n", "x".repeat(2000)).into_bytes()); // too long
    body.extend(b"[1,2\n"); // not JSON
    body.extend(b"{\"ok\":2}"); // last line without newline
    f.put("input/bad.ndjson", body).await;
    f.put("input/empty.ndjson", Vec::new()).await;
    f.put("input/blank.ndjson", b"\n  \n\r\n".to_vec()).await;
    let mut host = f.host(&[("MAX_LINE_BYTES", "1000")]).await;
    let s = invoke_ok(&mut host, object_created_event(&f.l, &f.bucket, "input/bad.ndjson", "00D1").await).await;
    assert_eq!(
        (s["objects"][0]["records"].as_u64(), s["objects"][0]["quarantined"].as_u64()),
        (Some(2), Some(3)),
        "{s}"
    );
    for key in ["input/empty.ndjson", "input/blank.ndjson"] {
        let s = invoke_ok(&mut host, object_created_event(&f.l, &f.bucket, key, "00D2").await).await;
        assert_eq!(s["objects"][0]["outcome"], "processed", "{key}");
        assert_eq!(s["objects"][0]["records"], 0, "{key}");
    }
    assert_eq!(stream_multiset(&f.l, &f.stream).await, vec![r#"{"ok":1}"#.to_string(), r#"{"ok":2}"#.to_string()]);
    let etag =
        f.l.s3
            .head_object()
            .bucket(&f.bucket)
            .key("input/bad.ndjson")
            .send()
            .await
            .unwrap()
            .e_tag()
            .unwrap()
            .trim_matches('"')
            .to_owned();
    let part = format!("quarantine/{}/input/bad.ndjson/{etag}/part-000000000001.ndjson", f.bucket);
    let entries = object_json_lines(&f.l, &f.bucket, &part).await;
    let summary: Vec<(u64, u64, &str)> = entries
        .iter()
        .map(|e| (e["line"].as_u64().unwrap(), e["offset"].as_u64().unwrap(), e["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(summary[0], (2, 9, "not UTF-8 (invalid byte at offset 6 of the line)"));
    assert_eq!((summary[1].0, summary[1].1), (3, 18));
    assert_eq!(summary[1].2, "line of 2011 bytes exceeds MAX_LINE_BYTES (1000)");
    assert_eq!(summary[2].0, 4);
    assert!(summary[2].2.starts_with("invalid JSON"), "{}", summary[2].2);
}

#[tokio::test]
async fn throttled_put_records_resends_only_failures_and_keeps_per_key_order() {
    let f = fixture("pp-throttle", 2).await;
    let (_, body) = lines(300, "throttle");
    f.put("input/t.ndjson", body.clone()).await;
    let mut host = f
        .host(&[("PARTITION_KEY_FIELD", "user"), ("PUSHPULL_INJECT_PUT_FAILURES", "0.3"), ("PUT_MAX_ATTEMPTS", "40")])
        .await;
    let s = invoke_ok(&mut host, object_created_event(&f.l, &f.bucket, "input/t.ndjson", "00E1").await).await;
    let o = &s["objects"][0];
    assert_eq!(o["records"], 300);
    assert!(o["resent"].as_u64().unwrap() > 30, "about 30% of entries fail at least once: {o}");
    // Exactly the input, and each key's records in input order despite the resends.
    let mut expected: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for line in String::from_utf8(body).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        expected.entry(v["user"].as_str().unwrap().to_owned()).or_default().push(line.to_owned());
    }
    assert_eq!(stream_by_key(&f.l, &f.stream).await, expected);
}

#[tokio::test]
async fn two_concurrent_invocations_for_one_object_write_it_once() {
    let f = fixture("pp-race", 2).await;
    let (expected, body) = lines(1500, "race");
    f.put("input/race.ndjson", body).await;
    let event = object_created_event(&f.l, &f.bucket, "input/race.ndjson", "00F1").await;
    let settings = [("PUT_MAX_RECORDS", "100")];
    let (mut a, mut b) = (f.host(&settings).await, f.host(&settings).await);
    let (ra, rb) = tokio::join!(a.invoke(event.clone()), b.invoke(event.clone()));
    let outcomes = [ra.unwrap().outcome, rb.unwrap().outcome];
    let processed = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Response(r) if String::from_utf8_lossy(r).contains("\"processed\"")))
        .count();
    assert_eq!(processed, 1, "exactly one invocation does the work: {outcomes:?}");
    for o in &outcomes {
        match o {
            Outcome::Response(_) => {}
            // The loser waits for the winner (then already_done), or past its wait is told Busy.
            Outcome::FunctionError(e) => assert!(String::from_utf8_lossy(e).contains("PushError.Busy"), "{o:?}"),
            other => panic!("{other:?}"),
        }
    }
    let again = invoke_ok(&mut b, event.as_str()).await;
    assert_eq!(again["objects"][0]["outcome"], "already_done");
    assert_eq!(stream_multiset(&f.l, &f.stream).await, expected);
}

#[tokio::test]
async fn a_200_mb_object_streams_in_bounded_memory() {
    let f = fixture("pp-large", 2).await;
    // 210 MB: 2,100 records, each followed by a 100 KB line of spaces (blank: read, counted and
    // skipped). Every byte goes through the stream, the decompression-free reader and the line
    // codec; only the records go on to Kinesis. Why not 210 MB of records: kinesis-mock accepts
    // about 2 MB/s, which would make this a two-minute test of LocalStack rather than of us.
    let n = 2100;
    let padding = " ".repeat(100_000);
    let mut body = Vec::with_capacity(211_000_000);
    let mut expected = Vec::new();
    for i in 0..n {
        let line = format!(r#"{{"id":{i},"user":"u{}"}}"#, i % 10);
        body.extend_from_slice(line.as_bytes());
        body.push(b'\n');
        body.extend_from_slice(padding.as_bytes());
        body.push(b'\n');
        expected.push(line);
    }
    assert!(body.len() > 200_000_000);
    f.put("input/large.ndjson", body).await;
    let event = object_created_event(&f.l, &f.bucket, "input/large.ndjson", "0100").await;
    let mut host = f.host(&[]).await;
    let pid = host.pid().unwrap();
    let s = invoke_ok(&mut host, event).await;
    let peak_mib = peak_rss_kib(pid).unwrap() / 1024;
    eprintln!("peak RSS {peak_mib} MiB for {n} lines");
    let o = &s["objects"][0];
    assert_eq!(
        (o["records"].as_u64(), o["blank_lines"].as_u64(), o["lines"].as_u64()),
        (Some(2100), Some(2100), Some(4200)),
        "{s}"
    );
    assert!(o["bytes"].as_u64().unwrap() > 200_000_000, "{o}");
    assert!(peak_mib < 64, "peak RSS {peak_mib} MiB for a 210 MB object");
    expected.sort();
    assert_eq!(stream_multiset(&f.l, &f.stream).await, expected);
}
