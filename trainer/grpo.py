"""GRPO with decoupled PPO: group-relative advantages and the clipped, importance-corrected loss.

For the attempts of one task (a group), each sample's advantage is its return standardised within the
group: ``A_i = (R_i - mean(R)) / (std(R) + 1e-6)`` (population std). A group whose returns are all equal
teaches nothing and gets zero advantages.

Samples come from a fleet serving older versions, so three policies meet in the loss (Hilton et al.,
"Batch size-invariance for policy optimization", the decoupled PPO objective AReaL uses):

* behaviour ``mu``: the version that generated the sample (its logprobs travel in the sample);
* proximal ``pi_prox``: the trainer's policy when this batch's step started (no gradient);
* current ``pi_theta``: the policy being updated.

Per completion token::

    w     = min(pi_prox / mu, importance_weight_cap)          # truncated importance weight (constant)
    r     = pi_theta / pi_prox                                # the PPO ratio
    loss  = -w * min(r * A, clip(r, 1 - eps, 1 + eps) * A)  [+ kl_coef * k3(pi_theta || pi_ref)]

so a stale sample is re-weighted toward the current policy (never by more than the cap), and the
update stays inside the trust region around the step-start policy. The loss is averaged over each
sample's completion tokens, then over samples, which makes it independent of how a batch is split
across ranks and micro-batches of equal size.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from boltstream.trainer.policy import TokenBatch


def group_advantages(returns: list[float], group_ids: list[str]) -> list[float]:
    """Each return standardised within its group (samples sharing a group id)."""
    members: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(group_ids):
        members[group].append(index)
    advantages = [0.0] * len(returns)
    for indices in members.values():
        values = torch.tensor([returns[i] for i in indices], dtype=torch.float64)
        centred = values - values.mean()
        std = values.std(unbiased=False)
        scaled = centred / (std + 1e-6) if std > 0 else torch.zeros_like(centred)
        for i, value in zip(indices, scaled.tolist(), strict=True):
            advantages[i] = value
    return advantages


def masked_sample_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sample's masked tokens, then over samples."""
    per_sample = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return per_sample.mean()


@dataclass(frozen=True)
class GRPO:
    """The GRPO algorithm: which samples it takes, their advantages, and the loss."""

    clip_epsilon: float = 0.2
    importance_weight_cap: float = 2.0
    kl_coef: float = 0.0
    name: str = "grpo"

    def admit(self, sample: dict[str, Any]) -> str | None:
        return None  # every valid sample carries signal relative to its group

    def advantages(self, samples: list[dict[str, Any]]) -> list[float]:
        return group_advantages([s["return_value"] for s in samples], [s["task_id"] for s in samples])

    def loss(
        self,
        logprobs: torch.Tensor,
        proximal_logprobs: torch.Tensor,
        batch: TokenBatch,
        reference_logprobs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch.completion_mask
        advantage = batch.advantages.unsqueeze(-1)
        weight = torch.exp(proximal_logprobs - batch.behaviour_logprobs).clamp(max=self.importance_weight_cap)
        ratio = torch.exp(logprobs - proximal_logprobs)
        unclipped = ratio * advantage
        clipped = ratio.clamp(1.0 - self.clip_epsilon, 1.0 + self.clip_epsilon) * advantage
        per_token = -weight.detach() * torch.minimum(unclipped, clipped)
        metrics = {
            "clip_fraction": float(((unclipped > clipped) * mask).sum() / mask.sum().clamp(min=1.0)),
            "truncated_fraction": float(
                ((torch.exp(proximal_logprobs - batch.behaviour_logprobs) > self.importance_weight_cap) * mask).sum()
                / mask.sum().clamp(min=1.0)
            ),
        }
        if self.kl_coef and reference_logprobs is not None:
            # k3 estimator of KL(pi_theta || pi_ref): unbiased, always >= 0 (Schulman, "Approximating KL").
            log_ratio = reference_logprobs - logprobs
            kl = torch.exp(log_ratio) - log_ratio - 1.0
            per_token = per_token + self.kl_coef * kl
            metrics["kl_ref"] = float(masked_sample_mean(kl.detach(), mask))
        loss = masked_sample_mean(per_token, mask)
        return loss, metrics
