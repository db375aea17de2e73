-- Named reports: `boltstream report NAME` runs `SELECT * FROM report_NAME`; `boltstream report --list`
-- lists the views below with their comments. They read the deduplicated views, so redelivered
-- events never count twice.

CREATE OR REPLACE VIEW report_spans_per_agent_minute AS
SELECT
    toStartOfMinute(fromUnixTimestamp64Micro(start_time_us)) AS minute,
    agent_name,
    count() AS spans
FROM spans
GROUP BY minute, agent_name
ORDER BY minute, agent_name
COMMENT 'spans per agent per minute (by span start time)';

CREATE OR REPLACE VIEW report_reward_by_model_version AS
SELECT
    calls.model_version AS model_version,
    count() AS rewards,
    round(avg(rewards.value), 4) AS mean_reward,
    min(rewards.value) AS min_reward,
    max(rewards.value) AS max_reward
FROM rewards
INNER JOIN
(
    SELECT DISTINCT rollout_id, llm_model_version AS model_version FROM spans WHERE kind = 'llm_call'
) AS calls USING (rollout_id)
WHERE rewards.is_final
GROUP BY model_version
ORDER BY model_version
COMMENT 'final reward per model version (a rollout counts for every version its LLM calls used)';

CREATE OR REPLACE VIEW report_llm_latency AS
SELECT
    llm_model AS model,
    llm_model_version AS model_version,
    count() AS calls,
    round(quantile(0.5)(llm_latency_ms), 2) AS p50_ms,
    round(quantile(0.95)(llm_latency_ms), 2) AS p95_ms,
    round(quantile(0.99)(llm_latency_ms), 2) AS p99_ms
FROM spans
WHERE kind = 'llm_call'
GROUP BY model, model_version
ORDER BY model, model_version
COMMENT 'LLM call latency p50/p95/p99 in ms per model and version';

CREATE OR REPLACE VIEW report_tool_error_rate AS
SELECT
    name AS tool,
    count() AS calls,
    countIf(status = 'error') AS errors,
    round(errors / calls, 4) AS error_rate
FROM spans
WHERE kind = 'tool_call'
GROUP BY tool
ORDER BY error_rate DESC, tool
COMMENT 'tool calls, errors and error rate per tool';
