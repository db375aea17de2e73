"""The trainer learns: GRPO through the samples topic on the real broker raises the arithmetic reward.

Rollouts are sampled from the trainer's own current policy (transformers, temperature 1), emitted as
TrainingSamples to the samples topic, and consumed by the Trainer (DeepSpeed, ZeRO 0, CPU). The task is
``a+b`` with digits 0-3 (16 problems) after a 20-step supervised warm start that teaches the format.
Measured on this 2-core machine: the mean reward goes from about 0.59 to 0.85-0.89 in 30 steps; the test
asks for a rise of at least 0.15 (the evaluation's standard error is about 0.04).
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from boltstream.infra.demo import arithmetic
from boltstream.infra.demo.model import build_tiny_model
from boltstream.trainer.loop import Trainer
from boltstream.trainer.policy import load_policy
from tests.trainer_support import create_topics, produce_samples

MARGIN = 0.15
STEPS = 30


@pytest.mark.slow
def test_grpo_through_the_samples_topic_raises_the_mean_reward(settings, tmp_path):
    create_topics(settings)
    tasks = arithmetic.problems(largest_digit=3)
    model, tokenizer = load_policy(build_tiny_model(tmp_path / "tiny", seed=0))
    arithmetic.warm_start(model, tokenizer, tasks, steps=20)
    model.save_pretrained(tmp_path / "warm")
    tokenizer.save_pretrained(tmp_path / "warm")
    trainer_config = dataclasses.replace(
        settings.trainer,
        model_path=str(tmp_path / "warm"),
        group_size=8,
        groups_per_step=8,
        publish_interval=10,
        checkpoint_interval=10,
        checkpoint_dir=str(tmp_path / "checkpoints"),
    )
    settings = dataclasses.replace(settings, trainer=trainer_config)
    adam = {"optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}, "gradient_clipping": 1.0}
    trainer = Trainer(settings, deepspeed_config=adam)
    policy = trainer.engine.module

    before = arithmetic.mean_reward(policy, tokenizer, tasks, attempts=8, seed=999)
    rng = random.Random(0)
    for round_ in range(STEPS):
        batch = arithmetic.rollouts(
            policy, tokenizer, rng.sample(tasks, 8), 8, model_version=trainer.policy_version, seed=round_
        )
        produce_samples(settings, batch)
        assert trainer.run(max_steps=1, idle_timeout=30).steps == 1
    after = arithmetic.mean_reward(policy, tokenizer, tasks, attempts=8, seed=999)
    trainer.close()
    print(f"arithmetic mean reward {before:.3f} -> {after:.3f} after {STEPS} GRPO steps")

    assert trainer.step == STEPS and trainer.ledger.entries()[-1]["step"] == STEPS
    assert after - before >= MARGIN, f"mean reward {before:.3f} -> {after:.3f}, wanted a rise of {MARGIN}"
