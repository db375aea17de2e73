-- Validation reward per model version: what `Trainer.fit` (boltstream.infra.demo.fit) prints at the end.
--
-- A validation rollout is one whose root span says `agentlightning.rollout.mode` = 'val' (Agent
-- Lightning's key, set by the runners); its reward is its last `final` reward span (a LitAgent's returned
-- number); its model version is the one the router answered its LLM calls with (a rollout counts for
-- every version its calls used). A view over `spans`, so it needs nothing written besides the spans.
CREATE OR REPLACE VIEW report_validation_reward_by_model_version AS
SELECT
    calls.model_version AS model_version,
    count() AS rollouts,
    round(avg(finals.final_reward), 4) AS mean_reward,
    min(finals.final_reward) AS min_reward,
    max(finals.final_reward) AS max_reward
FROM
(
    SELECT rollout_id, argMax(reward, sequence) AS final_reward
    FROM spans
    WHERE kind = 'reward' AND name = 'final' AND reward IS NOT NULL
    GROUP BY rollout_id
) AS finals
INNER JOIN
(
    SELECT DISTINCT rollout_id FROM spans WHERE kind = 'rollout' AND attributes['agentlightning.rollout.mode'] = 'val'
) AS validation USING (rollout_id)
INNER JOIN
(
    SELECT DISTINCT rollout_id, llm_model_version AS model_version FROM spans WHERE kind = 'llm_call'
) AS calls USING (rollout_id)
GROUP BY model_version
ORDER BY toUInt64OrZero(extract(model_version, '(\\d+)$')), model_version
COMMENT 'mean final reward of validation rollouts (mode val) per model version their LLM calls used';
