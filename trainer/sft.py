"""Rejection-sampling fine-tuning: plain next-token likelihood on the samples whose return passes a bar.

The trainer drops (and counts) every sample whose ``return_value`` is below ``sft_min_return``; the
rest are imitated: the loss is the negative log-likelihood of the completion tokens, averaged per sample
then over samples (the same normalisation as GRPO, so batches split over ranks give the same update).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from boltstream.trainer.grpo import masked_sample_mean
from boltstream.trainer.policy import TokenBatch


@dataclass(frozen=True)
class SFT:
    """Rejection-sampling fine-tuning."""

    min_return: float = 1.0
    name: str = "sft"

    def admit(self, sample: dict[str, Any]) -> str | None:
        if sample["return_value"] >= self.min_return:
            return None
        return f"return {sample['return_value']:g} below sft_min_return {self.min_return:g}"

    def advantages(self, samples: list[dict[str, Any]]) -> list[float]:
        return [1.0] * len(samples)

    def loss(
        self,
        logprobs: torch.Tensor,
        proximal_logprobs: torch.Tensor,
        batch: TokenBatch,
        reference_logprobs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return masked_sample_mean(-logprobs, batch.completion_mask), {}
