-- Canary decisions: one row per CanaryDecision (start, promote, rollback of a candidate version).
-- decision_id is deterministic (UUIDv5 of model, candidate version and action), so a decision the
-- analyzer re-publishes after a restart replaces its row. Ordered by model and version, by month.
CREATE TABLE IF NOT EXISTS canary_decisions_store
(
    decision_id String,
    model LowCardinality(String),
    action Enum8('start' = 0, 'promote' = 1, 'rollback' = 2),
    candidate_version Int64,
    stable_version Int64,
    reason String,
    candidate_reward Nullable(Float64),
    stable_reward Nullable(Float64),
    candidate_trajectories Int32,
    stable_trajectories Int32,
    policy_stability_score Nullable(Float64),
    stability_tokens Int32,
    promotion_stability Float64,
    reward_margin Float64,
    canary_share Float64,
    timestamp_us Int64,
    archived_at DateTime64(6) DEFAULT now64(6),
    CONSTRAINT decision_id_present CHECK decision_id != '',
    CONSTRAINT model_present CHECK model != ''
)
ENGINE = ReplacingMergeTree(archived_at)
PARTITION BY toYYYYMM(fromUnixTimestamp64Micro(timestamp_us))
ORDER BY (model, candidate_version, decision_id)
COMMENT 'the store behind the canary_decisions view; query canary_decisions';

CREATE TABLE IF NOT EXISTS canary_decisions_ingest
(
    decision_id String,
    model String,
    action Enum8('start' = 0, 'promote' = 1, 'rollback' = 2),
    candidate_version Int64,
    stable_version Int64,
    reason String,
    candidate_reward Nullable(Float64),
    stable_reward Nullable(Float64),
    candidate_trajectories Int32,
    stable_trajectories Int32,
    policy_stability_score Nullable(Float64),
    stability_tokens Int32,
    promotion_stability Float64,
    reward_margin Float64,
    canary_share Float64,
    timestamp_us Int64
)
ENGINE = Null;

CREATE MATERIALIZED VIEW IF NOT EXISTS canary_decisions_ingest_mv TO canary_decisions_store AS
SELECT * FROM canary_decisions_ingest;

-- Every decision exactly once.
CREATE OR REPLACE VIEW canary_decisions AS SELECT * FROM canary_decisions_store FINAL
COMMENT 'every canary start, promotion and rollback of a model version, with the figures behind it';
