-- More named reports (see 10_reports.sql): what operators and researchers ask of the archive. Each is a
-- plain view over the deduplicated views, usable from any ClickHouse client (`SELECT * FROM report_x`);
-- `report_token_cost` takes the per-token prices as view parameters.
--
-- Model versions are compared by the number at the end of their name ("v3", "tiny@3" -> 3; "" -> 0,
-- the base model), as the trainer does (trainer.source.sample_version).

CREATE OR REPLACE VIEW report_reward_by_version_and_agent AS
SELECT
    model_version,
    agent_name,
    count() AS rollouts,
    round(avg(final_reward), 4) AS mean_reward,
    min(final_reward) AS min_reward,
    max(final_reward) AS max_reward
FROM
(
    SELECT agent_name, final_reward, if(empty(model_versions), [''], model_versions) AS versions
    FROM trajectories
    WHERE status = 'complete'
)
ARRAY JOIN versions AS model_version
GROUP BY model_version, agent_name
ORDER BY model_version, agent_name
COMMENT 'final reward of complete trajectories per model version and agent (a rollout counts for every version it used)';

CREATE OR REPLACE VIEW report_outcome_rates AS
SELECT
    agent_name,
    count() AS trajectories,
    countIf(status = 'complete') AS complete,
    countIf(status = 'timed_out') AS timed_out,
    countIf(status = 'no_reward') AS no_reward,
    countIf(status = 'orphaned') AS orphaned,
    round(timed_out / trajectories, 4) AS timeout_rate,
    round(orphaned / trajectories, 4) AS orphan_rate
FROM trajectories
GROUP BY agent_name
ORDER BY agent_name
COMMENT 'closed trajectories per agent by status, with the timeout rate and the orphan rate (rewards without spans)';

CREATE OR REPLACE VIEW report_token_usage AS
SELECT
    agent_name,
    llm_model AS model,
    llm_model_version AS model_version,
    count() AS calls,
    sum(llm_prompt_tokens) AS prompt_tokens,
    sum(llm_completion_tokens) AS completion_tokens,
    prompt_tokens + completion_tokens AS total_tokens,
    round(total_tokens / calls, 1) AS tokens_per_call
FROM spans
WHERE kind = 'llm_call'
GROUP BY agent_name, model, model_version
ORDER BY agent_name, model, model_version
COMMENT 'LLM calls and prompt/completion tokens per agent, model and version';

CREATE OR REPLACE VIEW report_token_cost AS
SELECT
    agent_name,
    llm_model AS model,
    sum(llm_prompt_tokens) AS prompt_tokens,
    sum(llm_completion_tokens) AS completion_tokens,
    round(prompt_tokens * {prompt_usd_per_mtok:Float64} / 1e6, 6) AS prompt_usd,
    round(completion_tokens * {completion_usd_per_mtok:Float64} / 1e6, 6) AS completion_usd,
    round(prompt_usd + completion_usd, 6) AS total_usd
FROM spans
WHERE kind = 'llm_call'
GROUP BY agent_name, model
ORDER BY total_usd DESC, agent_name, model
COMMENT 'token cost in USD per agent and model; params prompt_usd_per_mtok, completion_usd_per_mtok (USD per million tokens)';

CREATE OR REPLACE VIEW report_tool_errors_by_agent AS
SELECT
    agent_name,
    name AS tool,
    count() AS calls,
    countIf(status = 'error') AS errors,
    round(errors / calls, 4) AS error_rate
FROM spans
WHERE kind = 'tool_call'
GROUP BY agent_name, tool
ORDER BY error_rate DESC, agent_name, tool
COMMENT 'tool calls, errors and error rate per agent and tool';

CREATE OR REPLACE VIEW report_slowest_rollouts AS
SELECT
    rollout_id,
    agent_name,
    status,
    round((end_time_us - start_time_us) / 1000, 1) AS duration_ms,
    span_count,
    llm_call_count
FROM trajectories
WHERE start_time_us > 0
ORDER BY duration_ms DESC, rollout_id
LIMIT 20
COMMENT 'the 20 longest rollouts (first span start to end) with their status and size';

CREATE OR REPLACE VIEW report_sample_staleness AS
WITH newest AS
(
    SELECT model, max(version) AS newest_version
    FROM
    (
        SELECT llm_model AS model, toInt64OrZero(extract(llm_model_version, '(\\d+)$')) AS version
        FROM spans WHERE kind = 'llm_call'
        UNION ALL
        SELECT model, candidate_version AS version FROM canary_decisions
    )
    GROUP BY model
)
SELECT
    samples.model AS model,
    samples.model_version AS model_version,
    toInt64OrZero(extract(samples.model_version, '(\\d+)$')) AS version,
    any(newest.newest_version) AS newest_version,
    greatest(newest_version - version, 0) AS versions_behind,
    count() AS samples
FROM samples
LEFT JOIN newest ON samples.model = newest.model
GROUP BY model, model_version, version
ORDER BY model, version
COMMENT 'training samples per model version and how many versions they lag the newest one served or started as a canary';
