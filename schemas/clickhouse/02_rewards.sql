-- Rewards: one row per Reward. Same ingestion path as spans (Avro bodies into a Null table, a
-- materialized view into the store), idempotent on event_id through ReplacingMergeTree + FINAL.
-- Ordered by rollout for the join with spans (reward by model version); partitioned by day.
CREATE TABLE IF NOT EXISTS rewards_store
(
    event_id String,
    rollout_id String,
    value Float64,
    name LowCardinality(String),
    is_final Bool,
    source LowCardinality(String),
    task_id String,
    agent_name LowCardinality(String),
    timestamp_us Int64,
    attributes Map(String, String),
    archived_at DateTime64(6) DEFAULT now64(6),
    INDEX agent_name_set agent_name TYPE set(256) GRANULARITY 4,
    CONSTRAINT event_id_present CHECK event_id != '',
    CONSTRAINT rollout_id_present CHECK rollout_id != ''
)
ENGINE = ReplacingMergeTree(archived_at)
PARTITION BY toDate(fromUnixTimestamp64Micro(timestamp_us))
ORDER BY (rollout_id, event_id)
COMMENT 'the store behind the rewards view: may hold a redelivered reward twice until a merge; query rewards';

CREATE TABLE IF NOT EXISTS rewards_ingest
(
    event_id String,
    rollout_id String,
    value Float64,
    name String,
    is_final Bool,
    source String,
    task_id String,
    agent_name String,
    timestamp_us Int64,
    attributes Map(String, String)
)
ENGINE = Null;

CREATE MATERIALIZED VIEW IF NOT EXISTS rewards_ingest_mv TO rewards_store AS
SELECT event_id, rollout_id, value, name, is_final, source, task_id, agent_name, timestamp_us, attributes
FROM rewards_ingest;

-- Every reward exactly once.
CREATE OR REPLACE VIEW rewards AS SELECT * FROM rewards_store FINAL
COMMENT 'every reward exactly once: verifier, reward model, human or agent scores of a rollout';
