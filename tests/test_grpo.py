"""GRPO and SFT against hand-computed references, and through a real DeepSpeed engine on CPU."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from boltstream.infra.demo.model import build_tiny_model
from boltstream.trainer.engine import build_engine, init_distributed, with_batch_sizes
from boltstream.trainer.grpo import GRPO, group_advantages
from boltstream.trainer.policy import TokenBatch, fill_behaviour, load_policy, pack, token_logprobs, validate_sample
from boltstream.trainer.sft import SFT

log = math.log


def one_sample_batch(behaviour: list[float], advantage: float) -> TokenBatch:
    n = len(behaviour)
    return TokenBatch(
        input_ids=torch.zeros((1, n + 1), dtype=torch.long),
        attention_mask=torch.ones((1, n + 1), dtype=torch.long),
        completion_mask=torch.ones((1, n)),
        behaviour_logprobs=torch.tensor([behaviour]),
        advantages=torch.tensor([advantage]),
        behaviour_known=torch.tensor([True]),
    )


def test_group_advantages_match_hand_computed_values():
    returns = [1.0, 0.0, 2.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0]
    groups = ["a", "a", "b", "a", "a", "b", "c", "c", "c"]
    # a: mean 0.5, std 0.5 -> +-1; b: all equal -> 0; c: mean 1, std sqrt(2) -> 2/sqrt2, -1/sqrt2, -1/sqrt2
    expected = [1.0, -1.0, 0.0, -1.0, 1.0, 0.0, math.sqrt(2), -1 / math.sqrt(2), -1 / math.sqrt(2)]
    assert group_advantages(returns, groups) == pytest.approx(expected, abs=1e-5)


def test_decoupled_ppo_loss_clips_and_truncates_as_specified():
    grpo = GRPO(clip_epsilon=0.2, importance_weight_cap=2.0)
    # token 1: w = min(0.4/0.1, 2) = 2, r = 0.5/0.4 = 1.25 -> clipped to 1.2 -> -2 * 1.2 = -2.4 (no gradient)
    # token 2: w = 0.3/0.6 = 0.5, r = 1 -> -0.5
    logprobs = torch.tensor([[log(0.5), log(0.3)]], requires_grad=True)
    proximal = torch.tensor([[log(0.4), log(0.3)]])
    batch = one_sample_batch([log(0.1), log(0.6)], advantage=1.0)
    loss, metrics = grpo.loss(logprobs, proximal, batch)
    assert loss.item() == pytest.approx((-2.4 - 0.5) / 2)
    assert metrics["clip_fraction"] == pytest.approx(0.5)
    assert metrics["truncated_fraction"] == pytest.approx(0.5)
    loss.backward()
    # d/dlogp of -w * r * A with r = exp(logp - prox): -w * r * A; averaged over the 2 tokens.
    assert logprobs.grad.tolist()[0] == pytest.approx([0.0, -0.5 * 1.0 / 2])


def test_negative_advantage_is_clipped_below_one_minus_epsilon():
    grpo = GRPO(clip_epsilon=0.2, importance_weight_cap=2.0)
    logprobs = torch.tensor([[log(0.2), log(0.45)]], requires_grad=True)
    proximal = torch.tensor([[log(0.4), log(0.5)]])
    batch = one_sample_batch([log(0.4), log(0.5)], advantage=-1.0)
    loss, _ = grpo.loss(logprobs, proximal, batch)
    # token 1: r = 0.5 < 0.8 -> pessimistic term is the clipped -0.8 -> loss 0.8, no gradient
    # token 2: r = 0.9 inside the range -> loss 0.9, gradient -w * r * A = 0.9
    assert loss.item() == pytest.approx((0.8 + 0.9) / 2)
    loss.backward()
    assert logprobs.grad.tolist()[0] == pytest.approx([0.0, 0.9 / 2])


def test_kl_penalty_uses_the_k3_estimator():
    grpo = GRPO(kl_coef=0.5)
    logprobs = torch.tensor([[log(0.5)]])
    batch = one_sample_batch([log(0.5)], advantage=0.0)
    loss, metrics = grpo.loss(logprobs, logprobs, batch, reference_logprobs=torch.tensor([[log(0.25)]]))
    k3 = 0.5 - log(0.5) - 1  # exp(ref - logp) - (ref - logp) - 1 with ref - logp = log(0.5)
    assert metrics["kl_ref"] == pytest.approx(k3)
    assert loss.item() == pytest.approx(0.5 * k3)


def test_sft_admits_only_returns_at_the_threshold_and_imitates():
    sft = SFT(min_return=0.5)
    assert sft.admit({"return_value": 0.5}) is None
    assert "below sft_min_return" in sft.admit({"return_value": 0.49})
    logprobs = torch.tensor([[log(0.5), log(0.25)]])
    loss, _ = sft.loss(logprobs, logprobs, one_sample_batch([0.0, 0.0], 1.0))
    assert loss.item() == pytest.approx(-(log(0.5) + log(0.25)) / 2)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=3)


def fixed_samples() -> list[dict]:
    """Two tasks, three attempts each, prompts and completions of different lengths."""
    rows = []
    for index, (task, prompt, completion, ret) in enumerate(
        [
            ("t1", [4, 20, 21], [30, 2], 1.0),
            ("t1", [4, 20, 21], [31, 32, 2], 0.0),
            ("t1", [4, 20, 21], [33], 0.0),
            ("t2", [4, 40], [50, 51, 52, 2], 0.5),
            ("t2", [4, 40], [50, 2], 1.5),
            ("t2", [4, 40], [60, 61], 0.5),
        ]
    ):
        behaviour = [-1.0 - 0.1 * (index + position) for position in range(len(completion))]
        rows.append(
            {
                "task_id": task,
                "prompt_token_ids": prompt,
                "completion_token_ids": completion,
                "completion_logprobs": behaviour,
                "return_value": ret,
            }
        )
    return rows


def reference_loss(model, samples: list[dict], grpo: GRPO) -> torch.Tensor:
    """The GRPO loss written out token by token, with hand-computed advantages."""
    # t1: returns 1, 0, 0 -> mean 1/3, std sqrt(2)/3; t2: 0.5, 1.5, 0.5 -> mean 5/6, std sqrt(2)/3
    s = math.sqrt(2) / 3
    advantages = [(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s, (-1 / 3) / s, (2 / 3) / s, (-1 / 3) / s]
    per_sample = []
    for sample, advantage in zip(samples, advantages, strict=True):
        ids = sample["prompt_token_ids"] + sample["completion_token_ids"]
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        terms = []
        for k, token in enumerate(sample["completion_token_ids"]):
            position = len(sample["prompt_token_ids"]) - 1 + k
            logp = logits[position, token] - torch.logsumexp(logits[position], dim=-1)
            weight = min(math.exp(float(logp) - sample["completion_logprobs"][k]), grpo.importance_weight_cap)
            ratio = torch.exp(logp - logp.detach())
            terms.append(-weight * torch.minimum(ratio * advantage, ratio.clamp(0.8, 1.2) * advantage))
        per_sample.append(sum(terms) / len(terms))
    return sum(per_sample) / len(per_sample)


def test_grpo_step_through_deepspeed_equals_the_hand_written_reference(tiny_path):
    init_distributed()
    grpo = GRPO(clip_epsilon=0.2, importance_weight_cap=2.0)
    samples = fixed_samples()
    model, _ = load_policy(tiny_path)
    reference_model = copy.deepcopy(model)
    config = with_batch_sizes(
        {"optimizer": {"type": "SGD", "params": {"lr": 0.5}}, "zero_optimization": {"stage": 0}}, len(samples), 1
    )
    engine = build_engine(model, config)

    batch = pack(samples, grpo.advantages(samples), pad_token_id=0)
    logprobs = token_logprobs(engine, batch)
    loss, _ = grpo.loss(logprobs, logprobs.detach(), batch)
    engine.backward(loss)
    engine.step()

    expected = reference_loss(reference_model, samples, grpo)
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
    # The optimizer step DeepSpeed took equals plain SGD on the reference loss.
    expected.backward()
    with torch.no_grad():
        for p in reference_model.parameters():
            p -= 0.5 * p.grad
    for (name, p), q in zip(engine.module.named_parameters(), reference_model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name


def test_samples_without_behaviour_logprobs_take_the_policys_own() -> None:
    served = {"prompt_token_ids": [5, 6], "completion_token_ids": [7, 8], "completion_logprobs": [-0.5, -0.25]}
    unserved = {"prompt_token_ids": [5], "completion_token_ids": [9, 9, 9], "completion_logprobs": []}
    assert validate_sample(unserved, vocab_size=16) is None  # the trainer computes them
    assert validate_sample({**unserved, "completion_logprobs": [-1.0]}, vocab_size=16) is not None
    batch = pack([served, unserved], [1.0, -1.0], pad_token_id=0)
    assert batch.behaviour_known.tolist() == [True, False]
    policy = -torch.arange(1, 7, dtype=torch.float32).reshape(2, 3) / 10  # log pi of every target, [B, T-1]
    assert fill_behaviour(batch, policy) == 1
    assert batch.behaviour_logprobs[0].tolist() == [0.0, -0.5, -0.25]  # the served ones stay
    assert batch.behaviour_logprobs[1].tolist() == pytest.approx([-0.4, -0.5, -0.6])  # the policy's, on completion
    assert fill_behaviour(batch, policy) == 0 and bool(batch.behaviour_known.all())
