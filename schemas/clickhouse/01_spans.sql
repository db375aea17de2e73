-- Spans: one row per Span of every SpanBatch on the spans topic.
--
-- Ingestion: the archive worker strips the single-object header of each Kafka message and sends the
-- Avro bodies as an Avro Object Container File (`INSERT INTO spans_ingest FORMAT Avro`), so ClickHouse
-- decodes the Avro itself. `spans_ingest` (Null engine) has the exact shape of the newest SpanBatch
-- schema; `spans_ingest_mv` explodes the spans array and flattens the nested `llm` record into
-- `llm_<field>` columns (defaults when the span has no llm record) into `spans_store`.
--
-- Typed attributes (SpanBatch v3): an attribute value is a string, a long, a double or a boolean, read by
-- ClickHouse into a Variant. `attributes` keeps every value as text (as every older row has it, so text
-- queries read old and new rows alike); `attributes_number` holds the longs and doubles as Float64, so
-- `sum(attributes_number['usage.total_tokens'])` needs no cast (exact for integers up to 2^53).
--
-- Idempotency: ReplacingMergeTree keyed on the sorting key, which ends with event_id; a message
-- redelivered after a crash inserts the same rows again and FINAL (in the `spans` view) keeps one.
-- Duplicates always land in the same partition and the same hour because both come from start_time_us.
--
-- Ordering: (hour of start, rollout_id, sequence, event_id). The hour first keeps the parts of
-- different hours from overlapping, so FINAL merges only the ranges a redelivered batch touched (the
-- recent hours) and reads the rest as it is: the deduplicating view costs about what the table does,
-- at tens of millions of spans. Within the hour, a rollout's spans are one key range in order (a
-- rollout crossing the hour is two), what the trainer, replay and trace viewers read; time-range
-- queries (reports, replay --since/--until) use the key directly. The day partitions bound merges.
--
-- Storage (tests/benchmarks/bench_scale.py measures it against a zstd-compressed Avro file of the same
-- spans): ZSTD on the large columns (token ids, logprobs, texts, ids, attributes): a rollout's prompts
-- repeat each other and lie side by side in key order; Delta before ZSTD on the times, which grow
-- along a rollout. Small columns keep LZ4, the fastest to read.
CREATE TABLE IF NOT EXISTS spans_store
(
    event_id String CODEC(ZSTD(3)),
    rollout_id String CODEC(ZSTD(3)),
    attempt_id String CODEC(ZSTD(3)),
    task_id String CODEC(ZSTD(3)),
    agent_name LowCardinality(String),
    kind Enum8('rollout' = 0, 'llm_call' = 1, 'tool_call' = 2, 'decision' = 3, 'reward' = 4, 'message' = 5,
               'exception' = 6, 'object' = 7, 'annotation' = 8, 'custom' = 9)
        COMMENT 'the span type: rollout (the root span, its arrival ends the trajectory), llm_call, tool_call, reward ...',
    name String,
    parent_id Nullable(String) CODEC(ZSTD(3)),
    sequence Int64,
    start_time_us Int64 CODEC(Delta, ZSTD(1)),
    end_time_us Int64 CODEC(Delta, ZSTD(1)),
    status LowCardinality(String),
    error Nullable(String) CODEC(ZSTD(3)),
    reward Nullable(Float64),
    attributes Map(String, String) CODEC(ZSTD(3)),
    attributes_number Map(String, Float64) CODEC(ZSTD(3))
        COMMENT 'the numeric attribute values (ints and floats) as Float64, summable without a cast: sum(attributes_number[''usage.total_tokens''])',
    llm_model LowCardinality(String),
    llm_model_version LowCardinality(String),
    llm_prompt_token_ids Array(UInt32) CODEC(ZSTD(3)),
    llm_completion_token_ids Array(UInt32) CODEC(ZSTD(3)),
    llm_completion_logprobs Array(Float32) CODEC(ZSTD(3)),
    llm_prompt_text String CODEC(ZSTD(3)),
    llm_completion_text String CODEC(ZSTD(3)),
    llm_prompt_tokens Int32,
    llm_completion_tokens Int32,
    llm_latency_ms Float64,
    llm_finish_reason LowCardinality(String),
    server_id LowCardinality(String),
    -- From the enclosing SpanBatch.
    producer_id String CODEC(ZSTD(3)),
    sent_at_us Int64 CODEC(Delta, ZSTD(1)),
    -- Version column of the ReplacingMergeTree: the latest archive of an event wins.
    archived_at DateTime64(6) DEFAULT now64(6) COMMENT 'when the archive worker stored the row; the newest copy of a redelivered span wins',
    INDEX agent_name_set agent_name TYPE set(256) GRANULARITY 4,
    INDEX start_time_minmax start_time_us TYPE minmax GRANULARITY 1,
    -- Invariants: a span without ids cannot be deduplicated or joined; time runs forward.
    CONSTRAINT event_id_present CHECK event_id != '',
    CONSTRAINT rollout_id_present CHECK rollout_id != '',
    CONSTRAINT ends_after_start CHECK end_time_us >= start_time_us
)
ENGINE = ReplacingMergeTree(archived_at)
PARTITION BY toDate(fromUnixTimestamp64Micro(start_time_us))
ORDER BY (toStartOfHour(fromUnixTimestamp64Micro(start_time_us)), rollout_id, sequence, event_id)
COMMENT 'the store behind the spans view: may hold a redelivered span twice until a merge; query spans';

CREATE TABLE IF NOT EXISTS spans_ingest
(
    rollout_id String,
    producer_id String,
    sent_at_us Int64,
    spans Array(Tuple(
        event_id String,
        rollout_id String,
        attempt_id String,
        task_id String,
        agent_name String,
        kind Enum8('rollout' = 0, 'llm_call' = 1, 'tool_call' = 2, 'decision' = 3, 'reward' = 4, 'message' = 5,
                   'exception' = 6, 'object' = 7, 'annotation' = 8, 'custom' = 9),
        name String,
        parent_id Nullable(String),
        sequence Int64,
        start_time_us Int64,
        end_time_us Int64,
        status String,
        error Nullable(String),
        reward Nullable(Float64),
        attributes Map(String, Variant(String, Int64, Float64, Bool)),
        llm Nullable(Tuple(
            model String,
            model_version String,
            prompt_token_ids Array(Int32),
            completion_token_ids Array(Int32),
            completion_logprobs Array(Float32),
            prompt_text String,
            completion_text String,
            prompt_tokens Int32,
            completion_tokens Int32,
            latency_ms Float64,
            finish_reason String)),
        server_id String))
)
ENGINE = Null;

CREATE MATERIALIZED VIEW IF NOT EXISTS spans_ingest_mv TO spans_store AS
SELECT
    span.event_id AS event_id,
    span.rollout_id AS rollout_id,
    span.attempt_id AS attempt_id,
    span.task_id AS task_id,
    span.agent_name AS agent_name,
    span.kind AS kind,
    span.name AS name,
    span.parent_id AS parent_id,
    span.sequence AS sequence,
    span.start_time_us AS start_time_us,
    span.end_time_us AS end_time_us,
    span.status AS status,
    span.error AS error,
    span.reward AS reward,
    mapApply((key, value) -> (key, toString(value)), span.attributes) AS attributes,
    mapApply(
        (key, value) -> (key, ifNull(variantElement(value, 'Float64'), toFloat64(variantElement(value, 'Int64')))),
        mapFilter((key, value) -> variantType(value) IN ('Int64', 'Float64'), span.attributes)) AS attributes_number,
    ifNull(span.llm.model, '') AS llm_model,
    ifNull(span.llm.model_version, '') AS llm_model_version,
    span.llm.prompt_token_ids AS llm_prompt_token_ids,
    span.llm.completion_token_ids AS llm_completion_token_ids,
    span.llm.completion_logprobs AS llm_completion_logprobs,
    ifNull(span.llm.prompt_text, '') AS llm_prompt_text,
    ifNull(span.llm.completion_text, '') AS llm_completion_text,
    ifNull(span.llm.prompt_tokens, 0) AS llm_prompt_tokens,
    ifNull(span.llm.completion_tokens, 0) AS llm_completion_tokens,
    ifNull(span.llm.latency_ms, 0) AS llm_latency_ms,
    ifNull(span.llm.finish_reason, '') AS llm_finish_reason,
    span.server_id AS server_id,
    producer_id,
    sent_at_us
FROM spans_ingest
ARRAY JOIN spans AS span;

-- Every span exactly once, however often it was delivered. Duplicates share a partition, so FINAL
-- need not merge across partitions (which lets it run one partition per thread).
CREATE OR REPLACE VIEW spans AS
SELECT * FROM spans_store FINAL
SETTINGS do_not_merge_across_partitions_select_final = 1
COMMENT 'every span of every agent exactly once: one row per span, LLM calls with their token ids';
