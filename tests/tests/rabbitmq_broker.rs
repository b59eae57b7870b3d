//! What the RabbitMQ mapping and sink rely on, pinned on the broker `make test` starts (Debian's
//! rabbitmq-server, `infra/rabbitmq.sh`), so that a broker upgrade that changes it fails here:
//!
//! | behaviour | test |
//! |---|---|
//! | publisher confirms; a mandatory message no queue takes comes back (returned), not dropped | `a_mandatory_message_no_queue_takes_is_returned_not_dropped` |
//! | prefetch bounds the unacknowledged messages a consumer holds (push's brake) | `prefetch_bounds_what_a_consumer_holds_unacknowledged` |
//! | a nacked (requeued) message comes back marked `redelivered` | `a_requeued_message_comes_back_redelivered` |
//! | a quorum queue's `x-delivery-limit` dead-letters a poison message after limit + 1 deliveries | `a_quorum_queue_dead_letters_a_message_past_its_delivery_limit` |
//! | `basic.get` pulls one message at a time and says how many remain | `basic_get_pulls_one_message_at_a_time` |
//! | the connection's virtual host and credentials are the sample's | `the_sample_user_reaches_its_virtual_host_only` |
use std::time::Duration;

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use pushpull_tests::rabbitmq::{confirming, connect, dead_lettering, publish, queue, url};

#[tokio::test]
async fn a_mandatory_message_no_queue_takes_is_returned_not_dropped() {
    let connection = connect().await;
    let channel = confirming(&connection).await;
    let q = queue(&channel, "rmq-confirm", FieldTable::default()).await;
    let routed = channel
        .basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            b"kept",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(routed.is_ack() && routed.take_message().is_none(), "routed: acknowledged, nothing returned");
    let nowhere = pushpull_tests::unique("rmq-no-such-queue");
    let unroutable = channel
        .basic_publish(
            "".into(),
            nowhere.as_str().into(),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            b"lost?",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let returned = unroutable.take_message().expect("an unroutable mandatory message is returned");
    assert_eq!(returned.delivery.data, b"lost?");
    assert_eq!(returned.reply_code, 312, "NO_ROUTE");
}

#[tokio::test]
async fn prefetch_bounds_what_a_consumer_holds_unacknowledged() {
    let connection = connect().await;
    let channel = confirming(&connection).await;
    let q = queue(&channel, "rmq-prefetch", FieldTable::default()).await;
    let bodies: Vec<Vec<u8>> = (0..20).map(|i| format!("m{i}").into_bytes()).collect();
    publish(&channel, &q, &bodies.iter().map(Vec::as_slice).collect::<Vec<_>>()).await;
    let consumer_channel = connection.create_channel().await.unwrap();
    consumer_channel.basic_qos(5, BasicQosOptions::default()).await.unwrap();
    let mut consumer = consumer_channel
        .basic_consume(q.as_str().into(), "prefetch".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let mut held = Vec::new();
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await {
        held.push(d.unwrap());
    }
    assert_eq!(held.len(), 5, "prefetch 5: five unacknowledged, the rest stay in the queue");
    held[4].ack(BasicAckOptions { multiple: true }).await.unwrap();
    let mut next = Vec::new();
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await {
        next.push(d.unwrap());
    }
    assert_eq!(next.len(), 5, "acknowledging five (multiple) lets five more come");
    assert_eq!(next[0].data, b"m5", "in queue order");
}

#[tokio::test]
async fn a_requeued_message_comes_back_redelivered() {
    let connection = connect().await;
    let channel = confirming(&connection).await;
    let q = queue(&channel, "rmq-requeue", FieldTable::default()).await;
    publish(&channel, &q, &[b"once", b"twice"]).await;
    let mut consumer = channel
        .basic_consume(q.as_str().into(), "requeue".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let first = consumer.next().await.unwrap().unwrap();
    let second = consumer.next().await.unwrap().unwrap();
    assert!(!first.redelivered && !second.redelivered);
    // The batch failed: both back in the queue, in their order.
    second.nack(BasicNackOptions { multiple: true, requeue: true }).await.unwrap();
    let again: Vec<_> = [consumer.next().await.unwrap().unwrap(), consumer.next().await.unwrap().unwrap()].into();
    assert_eq!(again.iter().map(|d| d.data.clone()).collect::<Vec<_>>(), [b"once".to_vec(), b"twice".to_vec()]);
    assert!(again.iter().all(|d| d.redelivered), "a requeued message is marked redelivered");
    again[1].ack(BasicAckOptions { multiple: true }).await.unwrap();
}

/// The poison-message bound the sample's queue uses (AWS, services-mq-errors.html: "To redeliver
/// messages upon function error, you can use a dead-letter queue"): a quorum queue with
/// `x-delivery-limit` 2 and a dead-letter exchange takes a message back after two failures and
/// dead-letters it at the third.
#[tokio::test]
async fn a_quorum_queue_dead_letters_a_message_past_its_delivery_limit() {
    let connection = connect().await;
    let channel = confirming(&connection).await;
    let (args, dlq) = dead_lettering(&channel, 2).await;
    let q = queue(&channel, "rmq-quorum", args).await;
    publish(&channel, &q, &[b"poison"]).await;
    let mut deliveries = 0;
    loop {
        match channel.basic_get(q.as_str().into(), BasicGetOptions::default()).await.unwrap() {
            Some(m) => {
                deliveries += 1;
                assert!(deliveries <= 10, "never dead-lettered");
                m.delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await.unwrap();
            }
            None => {
                if let Some(dead) = channel.basic_get(dlq.as_str().into(), BasicGetOptions::default()).await.unwrap() {
                    assert_eq!(dead.delivery.data, b"poison");
                    let death =
                        dead.delivery.properties.headers().as_ref().and_then(|h| h.inner().get("x-death").cloned());
                    assert!(death.is_some(), "the dead-lettered message says why: {:?}", dead.delivery.properties);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert_eq!(deliveries, 3, "delivered the first time and twice more (x-delivery-limit 2)");
}

#[tokio::test]
async fn basic_get_pulls_one_message_at_a_time() {
    let connection = connect().await;
    let channel = confirming(&connection).await;
    let q = queue(&channel, "rmq-get", FieldTable::default()).await;
    assert!(channel.basic_get(q.as_str().into(), BasicGetOptions::default()).await.unwrap().is_none(), "empty");
    publish(&channel, &q, &[b"a", b"b", b"c"]).await;
    let first = channel.basic_get(q.as_str().into(), BasicGetOptions::default()).await.unwrap().unwrap();
    assert_eq!((first.delivery.data.as_slice(), first.message_count), (&b"a"[..], 2));
    first.delivery.ack(BasicAckOptions::default()).await.unwrap();
}

#[tokio::test]
async fn the_sample_user_reaches_its_virtual_host_only() {
    assert!(url().ends_with("/pushpull"), "{}", url());
    let elsewhere = url().rsplit_once('/').map(|(base, _)| format!("{base}/%2f")).unwrap();
    let refused = lapin::Connection::connect(&elsewhere, lapin::ConnectionProperties::default()).await;
    assert!(refused.is_err(), "the default virtual host is not the sample user's");
}
