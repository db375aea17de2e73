-- Trajectories: one row per closed rollout. trajectory_id is deterministic (UUIDv5 of rollout_id), so a
-- join restart that re-emits a trajectory replaces it instead of adding one. Ordered by rollout,
-- partitioned by the day of its first span (orphaned trajectories, start 0, share 1970-01-01).
CREATE TABLE IF NOT EXISTS trajectories_store
(
    trajectory_id String,
    rollout_id String,
    attempt_id String,
    task_id String,
    agent_name LowCardinality(String),
    status Enum8('complete' = 0, 'timed_out' = 1, 'no_reward' = 2, 'orphaned' = 3),
    final_reward Nullable(Float64),
    rewards Array(Float64),
    span_count Int32,
    llm_call_count Int32,
    span_event_ids Array(String) CODEC(ZSTD(3)),
    model_versions Array(String),
    start_time_us Int64,
    end_time_us Int64,
    closed_at_us Int64,
    sampled Bool,
    selected Bool,
    duplicate_count Int32,
    archived_at DateTime64(6) DEFAULT now64(6),
    INDEX agent_name_set agent_name TYPE set(256) GRANULARITY 4,
    CONSTRAINT trajectory_id_present CHECK trajectory_id != '',
    CONSTRAINT rollout_id_present CHECK rollout_id != ''
)
ENGINE = ReplacingMergeTree(archived_at)
PARTITION BY toDate(fromUnixTimestamp64Micro(start_time_us))
ORDER BY (rollout_id, trajectory_id)
COMMENT 'the store behind the trajectories view; query trajectories';

CREATE TABLE IF NOT EXISTS trajectories_ingest
(
    trajectory_id String,
    rollout_id String,
    attempt_id String,
    task_id String,
    agent_name String,
    status Enum8('complete' = 0, 'timed_out' = 1, 'no_reward' = 2, 'orphaned' = 3),
    final_reward Nullable(Float64),
    rewards Array(Float64),
    span_count Int32,
    llm_call_count Int32,
    span_event_ids Array(String),
    model_versions Array(String),
    start_time_us Int64,
    end_time_us Int64,
    closed_at_us Int64,
    sampled Bool,
    selected Bool,
    duplicate_count Int32
)
ENGINE = Null;

CREATE MATERIALIZED VIEW IF NOT EXISTS trajectories_ingest_mv TO trajectories_store AS
SELECT * FROM trajectories_ingest;

-- Every trajectory exactly once.
CREATE OR REPLACE VIEW trajectories AS SELECT * FROM trajectories_store FINAL
COMMENT 'every closed rollout once: its status (complete, timed_out, no_reward, orphaned), reward and size';
