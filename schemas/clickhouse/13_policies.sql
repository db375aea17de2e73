-- Reports of several policies trained side by side: what each policy trained on, per weight version.

CREATE OR REPLACE VIEW report_reward_by_policy_version AS
SELECT
    policy,
    model_version,
    count() AS rollouts,
    round(avg(final_reward), 4) AS mean_reward,
    min(final_reward) AS min_reward,
    max(final_reward) AS max_reward
FROM
(
    SELECT DISTINCT arrayJoin(policies) AS policy, rollout_id, model_version, final_reward FROM samples
)
GROUP BY policy, model_version
ORDER BY policy, toInt64OrZero(extract(model_version, '(\\d+)$'))
COMMENT 'final reward per policy and model version of the rollouts each policy was selected to train on (a rollout counts for every version its samples used)';
