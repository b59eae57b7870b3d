//! The core's rules as unit tests: an in-memory partition and an in-process function
//! ([`super::testkit`]) under tokio's paused time, so an hour of retries takes milliseconds and
//! nothing is started. Each rule quotes AWS (Lambda developer guide) where it is written; the
//! same rules run against LocalStack and the real binaries in `tests/tests/esm.rs`.
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::clock::now_unix;
use super::testkit::{
    FnInvoker, MemoryPartition, MemorySink, TestRec, ctx, function_error, ok, respond, run, settings, throttled,
};

fn records(range: std::ops::Range<u64>, arrival: f64) -> Vec<TestRec> {
    range.map(|i| TestRec::new(i, &format!("k{}", i % 4), &format!("{{\"n\":{i}}}"), arrival)).collect()
}

fn page(recs: Vec<TestRec>) -> Vec<(Duration, Vec<TestRec>)> {
    vec![(Duration::ZERO, recs)]
}

fn has(event: &Value, id: u64) -> bool {
    event["Records"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["id"].as_str().and_then(|s| s.parse::<u64>().ok()) == Some(id))
}

#[tokio::test(start_paused = true)]
async fn batches_hold_at_most_batch_size_records_in_order() {
    let s = settings(|r| r.batch_size = Some("10".into()));
    let invoker = FnInvoker::new(|_, _| ok());
    let calls = invoker.calls.clone();
    let c = ctx(s, invoker, None);
    let p = Arc::new(MemoryPartition::default());
    run(&c, &p, page(records(0..25, now_unix())), f64::INFINITY).await.unwrap();
    let ids: Vec<Vec<u64>> = calls.lock().unwrap().iter().map(|c| c.ids()).collect();
    assert_eq!(ids, vec![(0..10).collect::<Vec<_>>(), (10..20).collect(), (20..25).collect()]);
    assert_eq!(p.done(), (0..25).collect::<Vec<_>>());
}

/// AWS (with-kinesis, "Polling and batching streams"): "Lambda invokes the function when one of
/// the following criteria is met: The batching window reaches its maximum value. ... The batch
/// size is met. ... The payload size reaches 6 MB"; for streams the window is timed from the end
/// of the previous invocation (aws-semantics.md).
#[tokio::test(start_paused = true)]
async fn the_batching_window_waits_for_a_fuller_batch() {
    let s = settings(|r| {
        r.batch_size = Some("100".into());
        r.batching_window = Some("5".into());
    });
    let invoker = FnInvoker::new(|_, _| ok());
    let calls = invoker.calls.clone();
    let c = ctx(s, invoker, None);
    let p = Arc::new(MemoryPartition::default());
    let t = now_unix();
    let pages = vec![
        (Duration::ZERO, records(0..3, t)),
        (Duration::from_secs(2), records(3..6, t)),
        (Duration::from_secs(2), records(6..9, t)),
        // After the first invocation: a window of its own.
        (Duration::from_secs(3), records(9..10, t)),
    ];
    run(&c, &p, pages, f64::INFINITY).await.unwrap();
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0].ids(), (0..9).collect::<Vec<_>>());
    assert_eq!(calls[0].at, Duration::from_secs(5), "the window, not the first record, set the time");
    assert_eq!(calls[1].ids(), vec![9]);
    // The reader ended at 7 s: what is held is invoked then, not a window later.
    assert_eq!(calls[1].at, Duration::from_secs(7));
}

/// AWS (kinesis-on-failure-destination / with-kinesis, "Error handling"): "By default, if your
/// function returns an error, the event source mapping reprocesses the entire batch until the
/// function succeeds, or the items in the batch expire."
#[tokio::test(start_paused = true)]
async fn a_failing_batch_is_retried_whole_with_backoff_until_it_succeeds() {
    let s = settings(|_| {});
    let invoker = FnInvoker::new(|_, n| if n < 3 { function_error() } else { ok() });
    let calls = invoker.calls.clone();
    let c = ctx(s, invoker, None);
    let p = Arc::new(MemoryPartition::default());
    run(&c, &p, page(records(0..5, now_unix())), f64::INFINITY).await.unwrap();
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 4);
    assert!(calls.iter().all(|c| c.ids() == vec![0, 1, 2, 3, 4]), "the whole batch each time");
    // Backoff doubles from 100 ms (with jitter: at least half of it).
    let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(gaps.iter().all(|g| *g >= Duration::from_millis(50) && *g <= Duration::from_secs(5)), "{gaps:?}");
    let counts = c.summary().counts;
    assert_eq!((counts.function_errors, counts.retries, counts.to_destination), (3, 3, 0));
    assert_eq!(p.done(), vec![0, 1, 2, 3, 4]);
}

/// AWS (with-kinesis, "Error handling"): "Retry attempts – The maximum number of times that Lambda
/// retries when your function returns an error." Then the batch goes to the on-failure
/// destination with condition `RetryAttemptsExhausted`, and the stream moves on.
#[tokio::test(start_paused = true)]
async fn retries_run_out_and_the_batch_goes_to_the_failure_destination() {
    let s = settings(|r| r.maximum_retry_attempts = Some("2".into()));
    let invoker = FnInvoker::new(|_, _| function_error());
    let calls = invoker.calls.clone();
    let sink = Arc::new(MemorySink::default());
    let c = ctx(s, invoker, Some(sink.clone()));
    let p = Arc::new(MemoryPartition::default());
    run(&c, &p, page(records(0..3, now_unix())), f64::INFINITY).await.unwrap();
    assert_eq!(calls.lock().unwrap().len(), 3, "the first attempt and two retries");
    let sent = sink.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["requestContext"]["condition"], "RetryAttemptsExhausted");
    assert_eq!(sent[0]["requestContext"]["approximateInvokeCount"], 3);
    assert_eq!(sent[0]["responseContext"]["functionError"], "Unhandled");
    assert_eq!(sent[0]["TestBatchInfo"]["positions"], json!(["0", "1", "2"]));
    assert_eq!(p.done(), vec![0, 1, 2], "given up is done: the position moves past them");
    assert_eq!(c.summary().counts.to_destination, 3);
}

/// AWS (with-kinesis, "Error handling"): "Split batch on error – When the function returns an
/// error, split the batch into two before retrying." aws-semantics.md: "splits do not use up
/// retries".
#[tokio::test(start_paused = true)]
async fn bisection_isolates_a_poison_record_without_using_retries() {
    let s = settings(|r| {
        r.bisect = Some("true".into());
        r.maximum_retry_attempts = Some("0".into());
        r.batch_size = Some("8".into());
    });
    let invoker = FnInvoker::new(|e, _| if has(e, 5) { function_error() } else { ok() });
    let calls = invoker.calls.clone();
    let sink = Arc::new(MemorySink::default());
    let c = ctx(s, invoker, Some(sink.clone()));
    let p = Arc::new(MemoryPartition::default());
    run(&c, &p, page(records(0..8, now_unix())), f64::INFINITY).await.unwrap();
    let ids: Vec<Vec<u64>> = calls.lock().unwrap().iter().map(|c| c.ids()).collect();
    assert_eq!(
        ids,
        vec![
            vec![0, 1, 2, 3, 4, 5, 6, 7],
            vec![0, 1, 2, 3],
            vec![4, 5, 6, 7],
            vec![4, 5],
            vec![4],
            vec![5],
            vec![6, 7]
        ]
    );
    let sent = sink.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["TestBatchInfo"]["positions"], json!(["5"]));
    assert_eq!(p.done(), (0..8).collect::<Vec<_>>());
    let counts = c.summary().counts;
    assert_eq!((counts.bisections, counts.retries, counts.to_destination), (3, 0, 1));
}

/// AWS (with-kinesis, "Implementing partial batch responses"): "If your function returns a
/// partial batch response, Lambda ... checkpoints at the lowest sequence number in the response"
/// and retries from it: records before it are done, the rest (successes after it too) retried.
#[tokio::test(start_paused = true)]
async fn a_partial_batch_response_retries_from_the_lowest_failure() {
    let s = settings(|r| r.function_response_types = Some("ReportBatchItemFailures".into()));
    let invoker = FnInvoker::new(|_, n| {
        if n == 0 {
            respond(json!({"batchItemFailures": [{"itemIdentifier": "6"}, {"itemIdentifier": "3"}]}))
        } else {
            respond(json!({"batchItemFailures": []}))
        }
    });
    let calls = invoker.calls.clone();
    let c = ctx(s, invoker, None);
    let p = Arc::new(MemoryPartition::default());
    run(&c, &p, page(records(0..8, now_unix())), f64::INFINITY).await.unwrap();
    let ids: Vec<Vec<u64>> = calls.lock().unwrap().iter().map(|c| c.ids()).collect();
    assert_eq!(ids, vec![(0..8).collect::<Vec<_>>(), (3..8).collect()]);
    assert_eq!(p.done.lock().unwrap()[..3], [0, 1, 2], "0-2 committed before the retry");
    let counts = c.summary().counts;
    assert_eq!((counts.partial_failures, counts.retries), (1, 1));
}

/// AWS (with-kinesis, "Error handling"): "Maximum age of record – The maximum age of a record that
/// Lambda sends to your function", and records past it go to the on-failure destination with
/// condition `RecordAgeExceeded`, whether they were never sent or kept failing.
#[tokio::test(start_paused = true)]
async fn records_past_the_maximum_age_are_given_up() {
    let s = settings(|r| r.maximum_record_age = Some("60".into()));
    let invoker = FnInvoker::new(|_, _| function_error());
    let calls = invoker.calls.clone();
    let sink = Arc::new(MemorySink::default());
    let c = ctx(s, invoker, Some(sink.clone()));
    let p = Arc::new(MemoryPartition::default());
    let now = now_unix();
    let mut recs = records(0..2, now - 120.0); // already too old: never invoked
    recs.extend(records(2..4, now)); // fail (retries forever) until a minute has passed
    run(&c, &p, page(recs), f64::INFINITY).await.unwrap();
    let sent = sink.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[0]["requestContext"]["condition"], "RecordAgeExceeded");
    assert_eq!(sent[0]["requestContext"]["approximateInvokeCount"], 0);
    assert_eq!(sent[0]["TestBatchInfo"]["positions"], json!(["0", "1"]));
    assert_eq!(sent[1]["requestContext"]["condition"], "RecordAgeExceeded");
    assert_eq!(sent[1]["TestBatchInfo"]["positions"], json!(["2", "3"]));
    let calls = calls.lock().unwrap().clone();
    assert!(calls.iter().all(|c| c.ids() == vec![2, 3]), "the old records were never sent");
    let last = calls.last().unwrap().at;
    assert!(last >= Duration::from_secs(55) && last <= Duration::from_secs(61), "retried for a minute: {last:?}");
    assert_eq!(p.done(), vec![0, 1, 2, 3]);
    assert_eq!(c.summary().counts.expired, 4);
}

/// AWS (kinesis-on-failure-destination): "Before invocation: If a Lambda event source mapping is
/// unable to invoke the function due to throttling or other issues, it retries until the records
/// expire or exceed the maximum age configured on the event source mapping." Throttles are no
/// function errors: they use up no retry.
#[tokio::test(start_paused = true)]
async fn throttles_are_retried_without_using_retries() {
    let s = settings(|r| r.maximum_retry_attempts = Some("0".into()));
    let invoker = FnInvoker::new(|_, n| if n < 3 { throttled() } else { ok() });
    let c = ctx(s, invoker, None);
    let p = Arc::new(MemoryPartition::default());
    run(&c, &p, page(records(0..2, now_unix())), f64::INFINITY).await.unwrap();
    let counts = c.summary().counts;
    assert_eq!((counts.throttles, counts.retries, counts.function_errors, counts.invocations), (3, 0, 0, 1));
    assert_eq!(p.done(), vec![0, 1]);
}

/// AWS (invocation-eventfiltering): "If an event doesn't meet any of the filter criteria, Lambda
/// drops the event"; for streams "the streams iterator advances past this record".
#[tokio::test(start_paused = true)]
async fn records_no_filter_matches_are_done_without_an_invocation() {
    let s = settings(|r| {
        r.filter_criteria = Some(json!({"Filters": [{"Pattern": "{\"data\":{\"n\":[1,3]}}"}]}).to_string())
    });
    let invoker = FnInvoker::new(|_, _| ok());
    let calls = invoker.calls.clone();
    let c = ctx(s, invoker, None);
    let p = Arc::new(MemoryPartition::default());
    run(&c, &p, page(records(0..5, now_unix())), f64::INFINITY).await.unwrap();
    let ids: Vec<Vec<u64>> = calls.lock().unwrap().iter().map(|c| c.ids()).collect();
    assert_eq!(ids, vec![vec![1, 3]]);
    assert_eq!(p.done(), (0..5).collect::<Vec<_>>());
    assert_eq!(c.summary().counts.filtered_out, 3);
}

/// aws-semantics.md: ParallelizationFactor 1..10 concurrent batches per shard; "order is kept per
/// partition key".
#[tokio::test(start_paused = true)]
async fn parallel_lanes_keep_order_per_key_and_deliver_each_record_once() {
    let s = settings(|r| {
        r.parallelization_factor = Some("4".into());
        r.batch_size = Some("3".into());
    });
    let mut invoker = FnInvoker::new(|_, n| if n % 5 == 2 { function_error() } else { ok() });
    invoker.duration = Duration::from_millis(30);
    let calls = invoker.calls.clone();
    let c = ctx(s, invoker, None);
    let p = Arc::new(MemoryPartition::default());
    let t = now_unix();
    let recs: Vec<TestRec> = (0..60).map(|i| TestRec::new(i, &format!("key-{}", i % 7), "{}", t)).collect();
    let pages = recs.chunks(10).map(|c| (Duration::from_millis(10), c.to_vec())).collect();
    run(&c, &p, pages, f64::INFINITY).await.unwrap();
    assert_eq!(p.done(), (0..60).collect::<Vec<_>>(), "each record done once");
    // Per key, first deliveries come in order.
    let mut seen = std::collections::HashSet::new();
    let mut last: std::collections::HashMap<String, u64> = Default::default();
    for call in calls.lock().unwrap().iter() {
        for r in call.event["Records"].as_array().unwrap() {
            let id: u64 = r["id"].as_str().unwrap().parse().unwrap();
            if seen.insert(id) {
                let key = r["key"].as_str().unwrap().to_owned();
                let prev = last.insert(key.clone(), id);
                assert!(prev.is_none_or(|p| p < id), "key {key}: {id} after {prev:?}");
            }
        }
    }
    assert_eq!(seen.len(), 60);
}

fn window_answer(e: &Value) -> Result<super::outcome::Answer, crate::invoke::InvokeError> {
    let n = e["state"]["n"].as_str().and_then(|s| s.parse::<usize>().ok()).unwrap_or(0);
    respond(json!({"state": {"n": (n + e["Records"].as_array().unwrap().len()).to_string()}}))
}

/// AWS (with-kinesis, "Tumbling windows"): state is passed "across invocations" of a window, and
/// at its end Lambda invokes once more with `isFinalInvokeForWindow` true; a window is grouped by
/// the records' arrival time.
#[tokio::test(start_paused = true)]
async fn a_tumbling_window_carries_state_to_its_final_invocation() {
    let s = settings(|r| {
        r.tumbling_window = Some("60".into());
        r.batch_size = Some("2".into());
    });
    let invoker = FnInvoker::new(|e, _| window_answer(e));
    let calls = invoker.calls.clone();
    let c = ctx(s, invoker, None);
    let p = Arc::new(MemoryPartition::default());
    // A window that is over: records arrived five minutes ago.
    let start = ((now_unix() - 300.0) / 60.0).floor() * 60.0;
    run(&c, &p, page(records(0..5, start + 1.0)), now_unix()).await.unwrap();
    let calls = calls.lock().unwrap().clone();
    let shape: Vec<(usize, bool, String)> = calls
        .iter()
        .map(|c| {
            let e = &c.event;
            (
                e["Records"].as_array().unwrap().len(),
                e["isFinalInvokeForWindow"].as_bool().unwrap(),
                e["state"]["n"].as_str().unwrap_or("-").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        shape,
        vec![(2, false, "-".into()), (2, false, "2".into()), (1, false, "4".into()), (0, true, "5".into())]
    );
    assert!(calls.iter().all(|c| c.event["window"]["start"] == json!(start as i64)));
    assert_eq!(calls[3].event["isWindowTerminatedEarly"], false);
    assert_eq!(p.windows.lock().unwrap().last(), Some(&None), "closed in the checkpoint");
}

/// AWS (with-kinesis, "Tumbling windows"): the state is limited to 1 MB per shard; "If that size
/// is exceeded, Lambda terminates the window early" (`isWindowTerminatedEarly`).
#[tokio::test(start_paused = true)]
async fn a_window_whose_state_passes_1_mb_ends_early() {
    let s = settings(|r| {
        r.tumbling_window = Some("60".into());
        r.batch_size = Some("2".into());
    });
    let invoker = FnInvoker::new(|e, _| {
        if e["isFinalInvokeForWindow"] == true {
            respond(json!({"state": {}}))
        } else {
            respond(json!({"state": {"big": "x".repeat(1024 * 1024 + 1)}}))
        }
    });
    let calls = invoker.calls.clone();
    let c = ctx(s, invoker, None);
    let p = Arc::new(MemoryPartition::default());
    let start = ((now_unix() - 300.0) / 60.0).floor() * 60.0;
    run(&c, &p, page(records(0..4, start + 1.0)), now_unix()).await.unwrap();
    let calls = calls.lock().unwrap().clone();
    let flags: Vec<(usize, bool, bool)> = calls
        .iter()
        .map(|c| {
            let e = &c.event;
            (
                e["Records"].as_array().unwrap().len(),
                e["isFinalInvokeForWindow"].as_bool().unwrap(),
                e["isWindowTerminatedEarly"].as_bool().unwrap(),
            )
        })
        .collect();
    // Each batch's state passes 1 MB: the window ends early after it, and the next batch opens
    // a new one (same start: its records arrived in the same minute).
    assert_eq!(flags, vec![(2, false, false), (0, true, true), (2, false, false), (0, true, true)]);
    assert_eq!(p.done(), vec![0, 1, 2, 3]);
}

/// AWS (monitoring-metrics-types): IteratorAge is "the age of the last record in the event ...
/// the time between when a stream receives the record and when the event source mapping sends
/// the event to the function", so it grows while a shard is blocked on a batch that keeps
/// failing (AWS Knowledge Center, "dynamodb-lambda-iteratorage": "if a function returns an error
/// every time it's invoked, then Lambda keeps retrying"). The template's IteratorAgeAlarm
/// (Maximum over a minute > 60 s) fires on the metrics the blocked shard writes.
#[tokio::test(start_paused = true)]
async fn a_shard_blocked_on_a_failing_batch_fires_the_iterator_age_alarm() {
    use crate::alarms;
    use crate::cloudwatch;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../template.yaml");
    let template = crate::template::Template::load(&path, "pushpull-local", &[]).unwrap();
    let alarm = alarms::from_template(&template).unwrap().into_iter().find(|a| a.id == "IteratorAgeAlarm").unwrap();
    let alarms::Watched::Metric(m) = &alarm.watched else { panic!("one metric") };
    let function = m.dimensions["FunctionName"].clone();
    let dir = tempfile::tempdir().unwrap();
    let (_turn, log) = super::testkit::metric_log(&dir.path().join("metrics.ndjson")).await;
    // Five minutes of failures, then the records age out and the shard moves on.
    let s = settings(|r| {
        r.function = Some(function.clone());
        r.maximum_record_age = Some("300".into());
    });
    let c = ctx(s, FnInvoker::new(|_, _| function_error()), None);
    let p = Arc::new(MemoryPartition::default());
    run(&c, &p, page(records(0..3, now_unix())), f64::INFINITY).await.unwrap();
    log.finish().unwrap();
    let data: Vec<cloudwatch::Datum> = cloudwatch::read(log.path())
        .unwrap()
        .into_iter()
        .filter(|d| d.dim("FunctionName") == Some(function.as_str()))
        .collect();
    let ages: Vec<f64> = data.iter().filter(|d| d.name == "IteratorAge").flat_map(|d| d.values.clone()).collect();
    assert!(ages.len() > 10, "one a send, retries included: {}", ages.len());
    assert!(ages.windows(2).all(|w| w[1] >= w[0]), "it grows while the shard is blocked");
    assert!(*ages.last().unwrap() > 250_000.0, "{ages:?}");
    let verdict = alarm.evaluate(&data);
    let fired = verdict.fires_at_ms.expect("the alarm fires");
    let started = (now_unix() * 1000.0) as u64 - 300_000;
    assert!(fired <= started + 180_000, "within its second or third minute: {}", fired.saturating_sub(started));
}

/// AWS (monitoring-metrics-types, "Event source mapping metrics"): "You must opt-in the metric
/// group to receive metrics related metrics. for example set EventCount in metrics config to have:
/// (PolledEventCount, FilteredOutEventCount, InvokedEventCount, FailedInvokeEventCount,
/// DroppedEventCount, OnFailureDestinationDeliveredEventCount ...)".
#[tokio::test(start_paused = true)]
async fn event_count_metrics_are_written_only_when_asked() {
    use crate::cloudwatch;
    let dir = tempfile::tempdir().unwrap();
    let (_turn, log) = super::testkit::metric_log(&dir.path().join("metrics.ndjson")).await;
    let mut uuids = Vec::new();
    for (function, metrics) in [("counts-off", None), ("counts-on", Some("EventCount"))] {
        let s = settings(|r| {
            r.function = Some(function.into());
            r.metrics = metrics.map(str::to_owned);
        });
        uuids.push(s.uuid());
        let c = ctx(s, FnInvoker::new(|_, _| ok()), None);
        let p = Arc::new(MemoryPartition::default());
        run(&c, &p, page(records(0..4, now_unix())), f64::INFINITY).await.unwrap();
    }
    log.finish().unwrap();
    let data = cloudwatch::read(log.path()).unwrap();
    let named = |uuid: &str, name: &str| -> f64 {
        data.iter()
            .filter(|d| d.dim("EventSourceMappingUUID") == Some(uuid) && d.name == name)
            .flat_map(|d| d.values.clone())
            .sum()
    };
    assert_eq!(named(&uuids[0], "PolledEventCount"), 0.0, "not asked for");
    assert_eq!(named(&uuids[1], "PolledEventCount"), 4.0);
    assert_eq!(named(&uuids[1], "InvokedEventCount"), 4.0);
}

/// AWS (monitoring-metrics-types): "DroppedEventCount – ... the number of records that exceed
/// your configured values for MaximumRecordAgeInSeconds or MaximumRetryAttempts ... Dropped
/// events also excludes events that you send to an on-failure destination."
#[tokio::test(start_paused = true)]
async fn records_sent_to_the_destination_are_not_counted_as_dropped() {
    use crate::cloudwatch;
    let dir = tempfile::tempdir().unwrap();
    let (_turn, log) = super::testkit::metric_log(&dir.path().join("metrics.ndjson")).await;
    let mut uuids = Vec::new();
    for (function, sink) in
        [("gives-up-to-a-queue", Some(Arc::new(MemorySink::default()))), ("gives-up-to-nothing", None)]
    {
        let s = settings(|r| {
            r.function = Some(function.into());
            r.metrics = Some("EventCount".into());
            r.maximum_retry_attempts = Some("0".into());
        });
        uuids.push(s.uuid());
        let c = ctx(s, FnInvoker::new(|_, _| function_error()), sink);
        let p = Arc::new(MemoryPartition::default());
        run(&c, &p, page(records(0..3, now_unix())), f64::INFINITY).await.unwrap();
    }
    log.finish().unwrap();
    let data = cloudwatch::read(log.path()).unwrap();
    let named = |uuid: &str, name: &str| -> f64 {
        data.iter()
            .filter(|d| d.dim("EventSourceMappingUUID") == Some(uuid) && d.name == name)
            .flat_map(|d| d.values.clone())
            .sum()
    };
    assert_eq!(named(&uuids[0], "OnFailureDestinationDeliveredEventCount"), 3.0);
    assert_eq!(named(&uuids[0], "DroppedEventCount"), 0.0);
    assert_eq!(named(&uuids[1], "DroppedEventCount"), 3.0);
}

/// AWS (kinesis-on-failure-destination): "Before invocation: If a Lambda event source mapping is
/// unable to invoke the function due to throttling or other issues, it retries until the records
/// expire or exceed the maximum age configured on the event source mapping." An Invoke API that
/// answers 404 (no such function) forever: retried, never counted as an invocation, and the batch
/// goes to the destination once, `RecordAgeExceeded`, with `approximateInvokeCount` 0.
#[tokio::test(start_paused = true)]
async fn a_function_that_cannot_be_invoked_is_retried_until_its_records_are_too_old() {
    let s = settings(|r| r.maximum_record_age = Some("60".into()));
    let not_found = |_: &Value, _| {
        Err(crate::invoke::InvokeError::Status {
            function: "f".into(),
            status: 404,
            body: "ResourceNotFoundException".into(),
        })
    };
    let sink = Arc::new(MemorySink::default());
    let c = ctx(s, FnInvoker::new(not_found), Some(sink.clone()));
    let p = Arc::new(MemoryPartition::default());
    run(&c, &p, page(records(0..2, now_unix())), f64::INFINITY).await.unwrap();
    let counts = c.summary().counts;
    assert_eq!(counts.invocations, 0);
    assert!(counts.invoke_errors > 1, "retried: {counts:?}");
    let sent = sink.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1, "the batch, given up once");
    assert_eq!(sent[0]["requestContext"]["condition"], "RecordAgeExceeded");
    assert_eq!(sent[0]["requestContext"]["approximateInvokeCount"], 0);
    assert_eq!(sent[0]["TestBatchInfo"]["positions"], json!(["0", "1"]));
    assert_eq!(p.done(), vec![0, 1]);
}

/// AWS (kafka-scaling-modes.html): "each event poller can handle up to 5 MB/sec of throughput or
/// up to 5 concurrent invocations"; in provisioned mode with MaximumPollers 1, eight partitions'
/// batches are invoked five at a time, the other three as slots free up.
#[tokio::test(start_paused = true)]
async fn a_provisioned_kafka_mapping_invokes_five_batches_at_once_per_poller() {
    let mut s = settings(|_| {});
    s.provisioned_pollers = Some((1, 1));
    let mut invoker = FnInvoker::new(|_, _| ok());
    invoker.duration = Duration::from_secs(1);
    let calls = invoker.calls.clone();
    let c = ctx(s, invoker, None);
    let runs = (0..8u64).map(|i| {
        let (c, p) = (c.clone(), Arc::new(MemoryPartition::default()));
        async move { run(&c, &p, page(records(i..i + 1, now_unix())), f64::INFINITY).await }
    });
    for r in futures_util::future::join_all(runs).await {
        r.unwrap();
    }
    let mut starts: Vec<u64> = calls.lock().unwrap().iter().map(|c| c.at.as_secs()).collect();
    starts.sort_unstable();
    assert_eq!(starts, [0, 0, 0, 0, 0, 1, 1, 1], "five at once, then the rest");
}
