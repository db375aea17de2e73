-- Experiments: one row per Experiment record (`boltstream replay`: its window, filters, configuration
-- overrides and counts), keyed by name; a replay re-published under the same name replaces its row.
CREATE TABLE IF NOT EXISTS experiments_store
(
    name String,
    source LowCardinality(String),
    since_us Nullable(Int64),
    until_us Nullable(Int64),
    agents Array(String),
    model_versions Array(String),
    rollouts Array(String),
    `where` String,
    kafka_offsets Map(String, Int64),
    speed Nullable(Float64),
    overrides Map(String, String),
    original Map(String, String),
    spans Int64,
    rewards Int64,
    messages Int64,
    started_at_us Int64,
    finished_at_us Int64,
    archived_at DateTime64(6) DEFAULT now64(6),
    CONSTRAINT name_present CHECK name != ''
)
ENGINE = ReplacingMergeTree(archived_at)
ORDER BY name;

CREATE TABLE IF NOT EXISTS experiments_ingest
(
    name String,
    source String,
    since_us Nullable(Int64),
    until_us Nullable(Int64),
    agents Array(String),
    model_versions Array(String),
    rollouts Array(String),
    `where` String,
    kafka_offsets Map(String, Int64),
    speed Nullable(Float64),
    overrides Map(String, String),
    original Map(String, String),
    spans Int64,
    rewards Int64,
    messages Int64,
    started_at_us Int64,
    finished_at_us Int64
)
ENGINE = Null;

CREATE MATERIALIZED VIEW IF NOT EXISTS experiments_ingest_mv TO experiments_store AS
SELECT * FROM experiments_ingest;

-- Every experiment once.
CREATE OR REPLACE VIEW experiments AS SELECT * FROM experiments_store FINAL;

-- What an experiment's workers produced: the trajectories and samples of the topics
-- replay.<name>.trajectories and replay.<name>.samples, archived like the production ones with the
-- experiment's name in front (the archive prepends it to each Avro body). Ordered by experiment, then
-- as the production tables, so one experiment is a key range.
CREATE TABLE IF NOT EXISTS experiment_trajectories_store
(
    experiment String,
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
    span_event_ids Array(String),
    model_versions Array(String),
    start_time_us Int64,
    end_time_us Int64,
    closed_at_us Int64,
    sampled Bool,
    selected Bool,
    duplicate_count Int32,
    archived_at DateTime64(6) DEFAULT now64(6),
    CONSTRAINT experiment_present CHECK experiment != '',
    CONSTRAINT trajectory_id_present CHECK trajectory_id != ''
)
ENGINE = ReplacingMergeTree(archived_at)
ORDER BY (experiment, rollout_id, trajectory_id);

CREATE TABLE IF NOT EXISTS experiment_trajectories_ingest
(
    experiment String,
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

CREATE MATERIALIZED VIEW IF NOT EXISTS experiment_trajectories_ingest_mv TO experiment_trajectories_store AS
SELECT * FROM experiment_trajectories_ingest;

-- Every experiment trajectory once.
CREATE OR REPLACE VIEW experiment_trajectories AS SELECT * FROM experiment_trajectories_store FINAL;

CREATE TABLE IF NOT EXISTS experiment_samples_store
(
    experiment String,
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
    prompt_token_ids Array(UInt32),
    completion_token_ids Array(UInt32),
    completion_logprobs Array(Float32),
    return_value Float64,
    final_reward Float64,
    credit_policy LowCardinality(String),
    created_at_us Int64,
    archived_at DateTime64(6) DEFAULT now64(6),
    CONSTRAINT experiment_present CHECK experiment != '',
    CONSTRAINT sample_id_present CHECK sample_id != ''
)
ENGINE = ReplacingMergeTree(archived_at)
ORDER BY (experiment, rollout_id, step_index, sample_id);

CREATE TABLE IF NOT EXISTS experiment_samples_ingest
(
    experiment String,
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
    created_at_us Int64
)
ENGINE = Null;

CREATE MATERIALIZED VIEW IF NOT EXISTS experiment_samples_ingest_mv TO experiment_samples_store AS
SELECT * FROM experiment_samples_ingest;

-- Every experiment sample once.
CREATE OR REPLACE VIEW experiment_samples AS SELECT * FROM experiment_samples_store FINAL;
