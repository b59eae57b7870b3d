//! The realism proxy (`pushpull_local::realism`) against LocalStack: AWS's limits and answers as
//! AWS documents them, and the template's IAM roles enforced. Each rule is quoted where it is
//! written.
use std::collections::BTreeMap;
use std::sync::Arc;

use aws_sdk_kinesis::error::ProvideErrorMetadata;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ShardIteratorType};
use pushpull::sink::RecordSink;
use pushpull::sink::kinesis::KinesisSink;
use pushpull_local::localstack::{Local, endpoint};
use pushpull_local::realism::iam::{Policies, access_key};
use pushpull_local::realism::proxy::RealismProxy;
use pushpull_local::realism::{Profile, Rates, Realism, RealismConfig};
use pushpull_local::template::Template;
use pushpull_tests::{local, unique};

const TEMPLATE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../infra/template.yaml");

async fn proxy(config: RealismConfig, policies: Policies) -> RealismProxy {
    RealismProxy::start(Arc::new(Realism::new(config)), policies, &endpoint()).await.unwrap()
}

/// AWS's message for a denied call (IAM user guide, "Troubleshoot access denied error messages":
/// "User: <arn> is not authorized to perform: <action> on resource: <arn> because no
/// identity-based policy allows the <action> action").
#[tokio::test]
async fn each_function_may_do_what_its_role_allows_and_nothing_else() {
    let bucket = unique("pp-iam");
    let stack = unique("iam");
    let mut t = Template::load(std::path::Path::new(TEMPLATE), &stack, &[format!("DataBucketName={bucket}")]).unwrap();
    let l = local().await;
    let r = pushpull_local::pipeline::provision(&mut t, &l).await.unwrap();
    let policies = Policies::from_template(&t).unwrap();
    let p = proxy(RealismConfig::new(Profile::Aws, 1), policies).await;
    let push = Local::at(&p.endpoint(), &access_key("PushRole")).await;
    let pull = Local::at(&p.endpoint(), &access_key("PullRole")).await;
    l.s3.put_object().bucket(&bucket).key("input/a.ndjson").body(b"{}\n".to_vec().into()).send().await.unwrap();

    // S3: the push role reads input and writes checkpoints, never outputs.
    push.s3.get_object().bucket(&bucket).key("input/a.ndjson").send().await.unwrap();
    push.s3.put_object().bucket(&bucket).key("checkpoints/push/x").body(b"{}".to_vec().into()).send().await.unwrap();
    let e = push.s3.put_object().bucket(&bucket).key("output/x").body(b"{}".to_vec().into()).send().await.unwrap_err();
    assert_eq!(e.code(), Some("AccessDenied"), "{e:?}");
    let message = e.message().unwrap_or_default();
    assert!(
        message.ends_with(&format!(
            "-push-role/{stack}-s3-to-kinesis is not authorized to perform: s3:PutObject on resource: arn:aws:s3:::{bucket}/output/x because no identity-based policy allows the s3:PutObject action"
        )),
        "{message}"
    );
    // A missing key: 404 with s3:ListBucket (the push role has it), else 403. AWS (S3 API
    // reference, GetObject): "If you have the s3:ListBucket permission on the bucket, Amazon S3
    // returns an HTTP status code 404 Not Found error. If you don't have the s3:ListBucket
    // permission, Amazon S3 returns an HTTP status code 403 Access Denied error."
    let e = push.s3.get_object().bucket(&bucket).key("input/missing").send().await.unwrap_err();
    assert!(e.as_service_error().is_some_and(|s| s.is_no_such_key()), "{e:?}");
    let e = pull.s3.get_object().bucket(&bucket).key("input/a.ndjson").send().await.unwrap_err();
    assert_eq!(e.code(), Some("AccessDenied"), "the pull role does not read input: {e:?}");

    // Kinesis: the push role writes and reads back (to resume after a crash); it may not delete.
    let entry = PutRecordsRequestEntry::builder().data(Blob::new("x")).partition_key("k").build().unwrap();
    push.kinesis.put_records().stream_name(&r.stream).records(entry.clone()).send().await.unwrap();
    let shards = push.kinesis.list_shards().stream_name(&r.stream).send().await.unwrap();
    let it = push
        .kinesis
        .get_shard_iterator()
        .stream_name(&r.stream)
        .shard_id(shards.shards()[0].shard_id())
        .shard_iterator_type(ShardIteratorType::TrimHorizon)
        .send()
        .await
        .unwrap();
    push.kinesis.get_records().shard_iterator(it.shard_iterator().unwrap()).send().await.unwrap();
    let e = push.kinesis.delete_stream().stream_name(&r.stream).send().await.unwrap_err();
    assert_eq!(e.code(), Some("AccessDeniedException"), "{e:?}");
    // The pull role reads the stream (its mapping does) and may not write to it.
    let e = pull.kinesis.put_records().stream_name(&r.stream).records(entry).send().await.unwrap_err();
    assert_eq!(e.code(), Some("AccessDeniedException"), "{e:?}");
    assert!(e.message().unwrap_or_default().contains("kinesis:PutRecords"), "{e:?}");
    assert_eq!(p.realism().faults().get("iam.denied"), 4);
}

async fn one_shard_stream(l: &Local, name: &str) {
    l.ensure_stream(name, 1).await.unwrap();
}

/// AWS (Kinesis developer guide, "Quotas and limits"): "Each shard can support up to 1,000
/// records per second for writes, up to a maximum total data write rate of 1 MB per second";
/// past it, PutRecords fails the entries, not the call (API reference, PutRecords: "An
/// unsuccessfully processed record includes ErrorCode and ErrorMessage values. ErrorCode
/// reflects the type of error and can be one of the following values:
/// ProvisionedThroughputExceededException or InternalFailure. ErrorMessage provides more
/// detailed information about the ProvisionedThroughputExceededException exception including the
/// account ID, stream name, and shard ID of the record that was throttled."), and PutRecord fails
/// whole. Reads: "each shard can support up to five read transactions per second".
#[tokio::test]
async fn a_shard_takes_a_thousand_records_a_second_and_five_reads() {
    let l = local().await;
    let stream = unique("pp-limits");
    one_shard_stream(&l, &stream).await;
    let p = proxy(RealismConfig::new(Profile::Aws, 1), Policies::default()).await;
    let c = Local::at(&p.endpoint(), "test").await;
    let started = std::time::Instant::now();
    let (mut ok, mut failed) = (0usize, 0usize);
    // Ten calls of 500 at once: they reach the proxy within the same second however slowly
    // LocalStack answers (one after another, a loaded LocalStack spaced them 2 s apart).
    let calls = (0..10).map(|call| {
        let entries: Vec<_> = (0..500)
            .map(|i| {
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(format!("{call}-{i}")))
                    .partition_key(format!("k{i}"))
                    .build()
                    .unwrap()
            })
            .collect();
        c.kinesis.put_records().stream_name(&stream).set_records(Some(entries)).send()
    });
    for out in futures_util::future::join_all(calls).await {
        let out = out.unwrap();
        let failures: Vec<_> = out.records().iter().filter(|r| r.error_code().is_some()).collect();
        assert_eq!(out.failed_record_count(), Some(failures.len() as i32));
        for f in &failures {
            assert_eq!(f.error_code(), Some("ProvisionedThroughputExceededException"));
            assert_eq!(
                f.error_message(),
                Some(
                    format!(
                        "Rate exceeded for shard shardId-000000000000 in stream {stream} under account 000000000000."
                    )
                    .as_str()
                )
            );
        }
        ok += out.records().len() - failures.len();
        failed += failures.len();
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(failed > 0, "5,000 records in {elapsed:.1} s: some must be refused");
    assert!(ok as f64 <= 1000.0 * (1.0 + elapsed) + 1.0, "{ok} records admitted in {elapsed:.1} s");
    // The SDK retries a throttled call by itself (ProvisionedThroughputExceededException is a
    // throttling error to it): without its retries, the whole call is seen failing.
    let k = aws_sdk_kinesis::Client::from_conf(
        c.kinesis.config().to_builder().retry_config(aws_sdk_kinesis::config::retry::RetryConfig::disabled()).build(),
    );
    // Records of 900 KB: the second within a second is past the shard's 1 MiB/s.
    let mut refused = 0;
    for i in 0..5 {
        let r = k
            .put_record()
            .stream_name(&stream)
            .data(Blob::new(vec![b'x'; 900 * 1024]))
            .partition_key(format!("{i}"))
            .send()
            .await;
        if r.err().is_some_and(|e| e.code() == Some("ProvisionedThroughputExceededException")) {
            refused += 1;
            break;
        }
    }
    assert!(refused > 0, "PutRecord past the limit fails whole");

    let shard = "shardId-000000000000";
    let it = c
        .kinesis
        .get_shard_iterator()
        .stream_name(&stream)
        .shard_id(shard)
        .shard_iterator_type(ShardIteratorType::Latest)
        .send()
        .await
        .unwrap();
    let it = it.shard_iterator().unwrap().to_owned();
    let reads = futures_util::future::join_all((0..12).map(|_| k.get_records().shard_iterator(&it).send())).await;
    let throttled = reads
        .iter()
        .filter(|r| r.as_ref().err().is_some_and(|e| e.code() == Some("ProvisionedThroughputExceededException")))
        .count();
    assert!(throttled > 0, "12 reads at once: some throttled");
    assert!(p.realism().faults().get("kinesis.get.throttled") > 0);
}

/// AWS (API reference, GetRecords): "If there are no records available in the portion of the
/// shard that the iterator points to, GetRecords returns an empty list. It might take multiple
/// calls to get to a portion of the shard that contains records." Reading back what a crashed
/// invocation wrote (the push side's resume) must go on past empty pages until the shard is
/// caught up (`MillisBehindLatest` 0): stopping at the first empty page would miss records and
/// send their lines again.
#[tokio::test]
async fn reading_back_goes_on_past_empty_pages_until_caught_up() {
    let l = local().await;
    let stream = unique("pp-empty-pages");
    l.ensure_stream(&stream, 2).await.unwrap();
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64 - 1000;
    for batch in 0..3 {
        let entries: Vec<_> = (0..100)
            .map(|i| {
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(format!("line {batch}-{i}")))
                    .partition_key(format!("k{i}"))
                    .build()
                    .unwrap()
            })
            .collect();
        l.kinesis.put_records().stream_name(&stream).set_records(Some(entries)).send().await.unwrap();
    }
    // Every other page with records is answered empty first (and some iterators expire).
    let mut config = RealismConfig::new(Profile::Storm, 5);
    config.rates = Rates { empty_page: 0.6, expired_iterator: 0.1, ..Rates::default() };
    let p = proxy(config, Policies::default()).await;
    let c = Local::at(&p.endpoint(), "test").await;
    let sink = KinesisSink::new(c.kinesis.clone(), &stream);
    let until = since + 600_000;
    let read = sink.written_since(&BTreeMap::new(), since, until).await.unwrap();
    assert_eq!(read.len(), 300, "every record read back");
    assert!(p.realism().faults().get("kinesis.get.empty_page") > 0, "{}", p.realism().faults());
}

/// AWS (API reference, GetRecords): "Each data record can be up to 1 MiB in size, and each shard
/// can read up to 2 MiB per second. [...] The maximum size of data that GetRecords can return is
/// 10 MiB. If a call returns this amount of data, subsequent calls made within the next 5 seconds
/// throw ProvisionedThroughputExceededException." Twelve records of a million bytes: the first
/// page stops at ten (under 10 MiB), the reads after it are throttled while the shard's read
/// budget is paid back, and the page after that holds the last two. (LocalStack cuts its pages at
/// 10 MiB too; the proxy's own cut is shown with a smaller page.)
#[tokio::test]
async fn a_page_stops_at_10_mib_and_the_reads_after_it_wait() {
    let l = local().await;
    let stream = unique("pp-10mib");
    one_shard_stream(&l, &stream).await;
    for i in 0..12u8 {
        l.kinesis
            .put_record()
            .stream_name(&stream)
            .partition_key("k")
            .data(Blob::new(vec![b'a' + i; 1_000_000]))
            .send()
            .await
            .unwrap();
    }
    let (pages, throttled) = read_pages(&stream, RealismConfig::new(Profile::Aws, 1), 0).await;
    assert_eq!(pages, vec![(10, b'a'), (2, b'a' + 10)], "pages of at most 10 MiB, in order");
    assert!(throttled > 0, "10 MB read: the calls after it are throttled");

    let mut config = RealismConfig::new(Profile::Aws, 1);
    if let Some(limits) = config.limits.as_mut() {
        limits.max_bytes_per_get = 2_500_000;
    }
    // Five cuts: the last two records come as LocalStack's own page.
    let (pages, _) = read_pages(&stream, config, 5).await;
    let want: Vec<(usize, u8)> = (0..6).map(|i| (2, b'a' + 2 * i)).collect();
    assert_eq!(pages, want, "the proxy's own cut: two records a page, none lost or repeated");
}

/// Reads the one-shard `stream` from its start through a proxy of `config` (without the SDK's
/// retries: throttles are waited out here): the records and first data byte of each page, and
/// the throttled calls. Asserts the proxy cut `cuts` pages.
async fn read_pages(stream: &str, config: RealismConfig, cuts: u64) -> (Vec<(usize, u8)>, usize) {
    let p = proxy(config, Policies::default()).await;
    let c = Local::at(&p.endpoint(), "test").await;
    let k = aws_sdk_kinesis::Client::from_conf(
        c.kinesis.config().to_builder().retry_config(aws_sdk_kinesis::config::retry::RetryConfig::disabled()).build(),
    );
    let it = k
        .get_shard_iterator()
        .stream_name(stream)
        .shard_id("shardId-000000000000")
        .shard_iterator_type(ShardIteratorType::TrimHorizon)
        .send()
        .await
        .unwrap();
    let mut it = it.shard_iterator().unwrap().to_owned();
    let (mut pages, mut throttled) = (Vec::new(), 0);
    while pages.iter().map(|(n, _)| n).sum::<usize>() < 12 {
        match k.get_records().shard_iterator(&it).send().await {
            Ok(page) => {
                if let Some(first) = page.records().first() {
                    pages.push((page.records().len(), first.data().as_ref()[0]));
                }
                it = page.next_shard_iterator().unwrap().to_owned();
            }
            Err(e) => {
                assert_eq!(e.code(), Some("ProvisionedThroughputExceededException"), "{e:?}");
                throttled += 1;
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
        assert!(throttled < 60, "the shard's read budget never came back: {pages:?}");
    }
    assert_eq!(p.realism().faults().get("kinesis.get.truncated"), cuts, "{}", p.realism().faults());
    (pages, throttled)
}
