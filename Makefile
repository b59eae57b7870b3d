# Task runner. The two commands README opens with are `make run` and `make test`.
.PHONY: run test check-template lambda localstack-up localstack-down lint fmt bench-push bench-pull bench-esm bench-kafka bench-push-targets bench-consumers bench-runners bench-aggregation bench-tradeoff bench-rabbitmq bench-rabbitmq-mapping bench-sqs bench-redis bench-pushpull bench-batching soak

run:            ## set up what is missing and run the sample pipeline on LocalStack
	infra/run-local.sh $(ARGS)

test:           ## set up what is missing and run every check and test (CI runs this)
	infra/test.sh

soak:           ## the pipeline in a storm on 100,000 lines: through Kinesis (three ways), Kafka, RabbitMQ, SQS (SEED=N another seed, STORM_LINES=N another size)
	cargo build --workspace --bins --features pushpull-tests/integration
	infra/rabbitmq.sh install
	PUSHPULL_STORM_LINES=$${STORM_LINES:-100000} PUSHPULL_SEED=$${SEED:-42} infra/with-kafka.sh infra/with-localstack.sh \
	  cargo nextest run -p pushpull-tests --features integration --test pipeline --no-capture -j 1 \
	  in_a_storm

check-template: ## sam validate --lint, sam validate, cfn-lint, cycle check
	infra/check-template.sh

lambda:         ## deployable arm64 zips under target/lambda/
	infra/build-lambda.sh

localstack-up:
	infra/localstack.sh up

localstack-down:
	infra/localstack.sh down

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

bench-push:     ## push pipeline vs raw GetObject throughput (BENCHMARKS.md)
	infra/with-localstack.sh cargo bench -p pushpull-tests --bench push_stream -- $(ARGS)

bench-pull:     ## pull function vs a floor function under runtime_api.py (BENCHMARKS.md)
	infra/bench-pull.sh

bench-esm:      ## local event source mapping vs raw GetRecords: throughput and delay (BENCHMARKS.md)
	infra/with-localstack.sh cargo bench -p pushpull-tests --bench esm_throughput -- $(ARGS)

bench-kafka:    ## local Kafka mapping vs a raw rdkafka consumer: throughput and delay (BENCHMARKS.md)
	infra/with-kafka.sh cargo bench -p pushpull-tests --features integration --bench kafka_mapping -- $(ARGS)

bench-rabbitmq: ## RabbitMQ both ways: basic.consume at prefetch 1..unlimited against basic.get (BENCHMARKS.md)
	infra/with-rabbitmq.sh cargo bench -p pushpull-tests --features integration --bench rabbitmq_both_ways -- $(ARGS)

bench-rabbitmq-mapping: ## the local Amazon MQ mapping against a raw lapin consumer: throughput and delay (BENCHMARKS.md)
	infra/with-rabbitmq.sh cargo bench -p pushpull-tests --features integration --bench rabbitmq_mapping -- $(ARGS)

bench-sqs:      ## the local SQS mapping against raw ReceiveMessage/DeleteMessageBatch loops, and long polling against short on an idle queue (BENCHMARKS.md)
	cargo build --workspace --bins --features pushpull-tests/integration
	infra/with-localstack.sh cargo bench -p pushpull-tests --features integration --bench sqs_polling -- $(ARGS)

bench-redis:    ## Redis both ways on one workload: pub/sub through the relay (push) against a stream through the Streams mapping (pull): loss, delay, backlog, idle requests (BENCHMARKS.md)
	cargo build --workspace --bins --features pushpull-tests/integration
	infra/redis.sh install
	cargo bench -p pushpull-tests --features integration --bench redis_push_pull -- $(ARGS)

bench-pushpull: ## push against pull on every broker, one workload into a function slower than the producer: loss, duplicates, delay, waiting, memory, idle requests and their cost; docs/push-vs-pull.png (BENCHMARKS.md)
	cargo build --workspace --bins --features pushpull-tests/integration
	infra/redis.sh install
	infra/rabbitmq.sh install
	infra/with-kafka.sh infra/with-rabbitmq.sh infra/with-localstack.sh \
	  cargo bench -p pushpull-tests --features integration --bench push_pull -- $(ARGS)

bench-batching: ## BatchSize x batching window on every mapping (Redis Streams, Amazon MQ, Kafka, Kinesis polling and fan-out, SQS): delay, invocations, throughput (BENCHMARKS.md)
	cargo build --workspace --bins --features pushpull-tests/integration
	infra/redis.sh install
	infra/rabbitmq.sh install
	infra/with-kafka.sh infra/with-rabbitmq.sh infra/with-localstack.sh \
	  cargo bench -p pushpull-tests --features integration --bench push_pull -- --grid $(or $(ARGS),2000 5)

bench-push-targets: ## the push function into Kafka against into Kinesis (aggregation off / on), lines/s (BENCHMARKS.md)
	cargo build --release -p s3-to-kinesis
	infra/with-kafka.sh infra/with-localstack.sh cargo bench -p pushpull-tests --features integration --bench push_targets -- $(ARGS)

bench-consumers: ## 1-6 mappings on one stream under AWS's limits, polling vs enhanced fan-out: delay and throttles (BENCHMARKS.md)
	infra/with-localstack.sh cargo bench -p pushpull-tests --bench consumers -- $(ARGS)

bench-runners:  ## several mapping runners on 8 shards: handover after kill -9 / SIGTERM, throughput of 1-3 (BENCHMARKS.md)
	cargo build --release -p pushpull-local
	infra/with-localstack.sh cargo bench -p pushpull-tests --bench runners -- $(ARGS)

bench-aggregation: ## push throughput on 2 shards under AWS's limits, KPL aggregation off / on; cost table (BENCHMARKS.md)
	cargo build --release -p s3-to-kinesis
	infra/with-localstack.sh cargo bench -p pushpull-tests --bench aggregation -- $(ARGS)

bench-tradeoff: ## the whole pipeline over a grid of batch settings; table + docs/batching-tradeoff.png
	cargo build --release --workspace --bins
	infra/with-localstack.sh cargo bench -p pushpull-tests --bench batching_tradeoff -- $(ARGS)
