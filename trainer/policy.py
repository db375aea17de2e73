"""The policy as tensors: loading the model (full or LoRA), packing samples into padded token batches,
and the per-token log-probabilities every algorithm's loss starts from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class TokenBatch:
    """Samples as right-padded tensors, aligned on next-token targets (length T-1).

    ``completion_mask[b, t]`` is 1 where target ``t`` (the token at position t+1) is a completion token,
    and ``behaviour_logprobs`` holds the serving policy's logprob of that token there. A sample that came
    without them (its server was not asked for logprobs) has ``behaviour_known[b]`` False until
    :func:`fill_behaviour` puts the trainer's own in.
    """

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    completion_mask: torch.Tensor  # [B, T-1] float
    behaviour_logprobs: torch.Tensor  # [B, T-1]
    advantages: torch.Tensor  # [B] per-sample weight (GRPO advantage; 1 for SFT)
    behaviour_known: torch.Tensor  # [B] bool

    @property
    def completion_tokens(self) -> int:
        return int(self.completion_mask.sum().item())


def pack(samples: list[dict[str, Any]], advantages: list[float], pad_token_id: int) -> TokenBatch:
    """Pad prompt+completion of each TrainingSample into one batch."""
    lengths = [len(s["prompt_token_ids"]) + len(s["completion_token_ids"]) for s in samples]
    width = max(lengths)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(samples), width), dtype=torch.long)
    completion = torch.zeros((len(samples), width - 1), dtype=torch.float32)
    behaviour = torch.zeros((len(samples), width - 1), dtype=torch.float32)
    known = torch.tensor([bool(sample["completion_logprobs"]) for sample in samples], dtype=torch.bool)
    for row, sample in enumerate(samples):
        prompt, answer = sample["prompt_token_ids"], sample["completion_token_ids"]
        input_ids[row, : lengths[row]] = torch.tensor(list(prompt) + list(answer), dtype=torch.long)
        attention[row, : lengths[row]] = 1
        # Target t predicts position t+1: the completion's tokens are targets len(prompt)-1 onwards.
        start = len(prompt) - 1
        completion[row, start : start + len(answer)] = 1.0
        if known[row]:
            behaviour[row, start : start + len(answer)] = torch.tensor(sample["completion_logprobs"])
    advantage = torch.tensor(advantages, dtype=torch.float32)
    return TokenBatch(input_ids, attention, completion, behaviour, advantage, known)


def fill_behaviour(batch: TokenBatch, policy_logprobs: torch.Tensor) -> int:
    """Give the samples of ``batch`` that came without behaviour logprobs ``policy_logprobs`` (the trainer's
    policy before this step) in their place; return how many there were."""
    missing = ~batch.behaviour_known
    if missing.any():
        batch.behaviour_logprobs[missing] = (policy_logprobs.detach() * batch.completion_mask)[missing]
        batch.behaviour_known = torch.ones_like(batch.behaviour_known)
    return int(missing.sum())


def token_logprobs(model, batch: TokenBatch) -> torch.Tensor:
    """log pi(target token) at every target position, [B, T-1] (zero where padded)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1, :]
    targets = batch.input_ids[:, 1:]
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logprobs * batch.attention_mask[:, 1:]


def load_policy(path: str | Path, *, lora_rank: int = 0):
    """(model, tokenizer) from a Hugging Face directory; with ``lora_rank`` > 0 a peft LoRA model on top."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules="all-linear")
        model = get_peft_model(model, config)
    model.train()
    return model, tokenizer


def validate_sample(sample: dict[str, Any], vocab_size: int) -> str | None:
    """Why ``sample`` cannot be trained on, or None when it can."""
    prompt, answer, logprobs = sample["prompt_token_ids"], sample["completion_token_ids"], sample["completion_logprobs"]
    if not prompt:
        return "no prompt_token_ids: the first completion token has no context"
    if not answer:
        return "no completion_token_ids: nothing to train on"
    if logprobs and len(logprobs) != len(answer):  # none at all: the trainer computes them (fill_behaviour)
        return f"{len(logprobs)} completion_logprobs for {len(answer)} completion tokens"
    if any(not 0 <= t < vocab_size for t in (*prompt, *answer)):
        return f"a token id outside the model's vocabulary [0, {vocab_size})"
    if any(not lp <= 0.0 for lp in logprobs):  # also catches NaN
        return "a completion logprob that is positive or NaN"
    return None
