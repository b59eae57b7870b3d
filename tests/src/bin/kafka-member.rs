//! A Kafka consumer-group member in a process of its own, for the broker conformance test
//! (`tests/kafka_broker.rs`): `kafka-member <bootstrap> <group> <topic> <session-timeout-ms>` joins
//! the group and prints how many partitions it holds each time that changes, until it is killed
//! (kill -9 stops its heartbeats without a LeaveGroup: the group expires it).
use std::io::Write;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, bootstrap, group, topic, session] = args.as_slice() else {
        eprintln!("usage: kafka-member <bootstrap> <group> <topic> <session-timeout-ms>");
        std::process::exit(2);
    };
    let consumer: BaseConsumer = match ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("broker.address.family", "v4")
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", session)
        .set("heartbeat.interval.ms", "500")
        .create()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kafka-member: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = consumer.subscribe(&[topic]) {
        eprintln!("kafka-member: subscribing to {topic}: {e}");
        std::process::exit(1);
    }
    let mut held = usize::MAX;
    loop {
        let _ = consumer.poll(Duration::from_millis(100));
        let now = consumer.assignment().map_or(0, |a| a.count());
        if now != held {
            held = now;
            println!("{held}");
            let _ = std::io::stdout().flush();
        }
    }
}
