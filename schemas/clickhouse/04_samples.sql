-- Training samples: one row per transition (an llm_call of a complete trajectory). sample_id is
-- deterministic, the idempotency key. Ordered by rollout then step (a trajectory's transitions in
-- order); partitioned by the day the sample was emitted.
CREATE TABLE IF NOT EXISTS samples_store
(
    sample_id String,
    trajectory_id String,
    rollout_id String,
    task_id String,
    agent_name LowCardinality(String),
    span_event_id String,
    step_index Int32,
    step_count Int32,
    model LowCardinality(String),
    model_version LowCardinality(String),
    prompt_token_ids Array(UInt32) CODEC(ZSTD(3)),
    completion_token_ids Array(UInt32) CODEC(ZSTD(3)),
    completion_logprobs Array(Float32) CODEC(ZSTD(3)),
    return_value Float64,
    final_reward Float64,
    credit_policy LowCardinality(String),
    created_at_us Int64,
    token_source LowCardinality(String) DEFAULT 'server',
    call_text String CODEC(ZSTD(3)),
    policies Array(LowCardinality(String)),
    archived_at DateTime64(6) DEFAULT now64(6),
    INDEX task_id_bloom task_id TYPE bloom_filter GRANULARITY 4,
    CONSTRAINT sample_id_present CHECK sample_id != ''
)
ENGINE = ReplacingMergeTree(archived_at)
PARTITION BY toDate(fromUnixTimestamp64Micro(created_at_us))
ORDER BY (rollout_id, step_index, sample_id)
COMMENT 'the store behind the samples view; query samples';

CREATE TABLE IF NOT EXISTS samples_ingest
(
    sample_id String,
    trajectory_id String,
    rollout_id String,
    task_id String,
    agent_name String,
    span_event_id String,
    step_index Int32,
    step_count Int32,
    model String,
    model_version String,
    prompt_token_ids Array(Int32),
    completion_token_ids Array(Int32),
    completion_logprobs Array(Float32),
    return_value Float64,
    final_reward Float64,
    credit_policy String,
    created_at_us Int64,
    token_source String,
    call_text String,
    policies Array(String)
)
ENGINE = Null;

-- An archive created before TrainingSample v2 gains its columns (no-ops on a new one); the materialized
-- view's SELECT * passes them on: ClickHouse reads the ingest table's columns at insert time.
ALTER TABLE samples_store ADD COLUMN IF NOT EXISTS token_source LowCardinality(String) DEFAULT 'server' AFTER created_at_us;
ALTER TABLE samples_store ADD COLUMN IF NOT EXISTS call_text String CODEC(ZSTD(3)) AFTER token_source;
ALTER TABLE samples_store ADD COLUMN IF NOT EXISTS policies Array(LowCardinality(String)) AFTER call_text;
ALTER TABLE samples_ingest ADD COLUMN IF NOT EXISTS token_source String;
ALTER TABLE samples_ingest ADD COLUMN IF NOT EXISTS call_text String;
ALTER TABLE samples_ingest ADD COLUMN IF NOT EXISTS policies Array(String);

CREATE MATERIALIZED VIEW IF NOT EXISTS samples_ingest_mv TO samples_store AS
SELECT * FROM samples_ingest;

-- Every sample exactly once.
CREATE OR REPLACE VIEW samples AS SELECT * FROM samples_store FINAL
COMMENT 'every training sample once: one LLM call of a complete trajectory with its token ids and credit';
