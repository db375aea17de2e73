"""Single-digit addition (and multiplication), answered with a number: verifiable-reward tasks the tiny
model learns on CPU.

A problem is ``a+b=`` (or ``a*b=``, the second task of ``demo --policies 2``) for digits a and b, sent as a
chat message; the reward is 1.0 when the completion (up to the end-of-turn token) is exactly the decimal
result, else 0.0. Rollouts are sampled from the policy
itself at temperature 1 token by token, so each completion token's behaviour logprob is exact, and are
emitted as TrainingSample records (one per attempt, a single-call trajectory).

Random weights never answer, so :func:`warm_start` runs a brief supervised pass on a few problems to teach
the answer format; from there, reinforcement learning has a non-zero reward to improve.
"""

from __future__ import annotations

import operator
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch


def problems(largest_digit: int = 9) -> list[tuple[int, int]]:
    """Every ``a+b`` with both digits at most ``largest_digit``."""
    return [(a, b) for a in range(largest_digit + 1) for b in range(largest_digit + 1)]


PROBLEMS = problems()
NAMESPACE = uuid.UUID("6c1f3f0e-2d7a-4b7e-9a55-0b5a1d2c3e4f")
#: The tasks' operations by the symbol a problem is written with, and the word its task ids start with.
OPERATIONS: dict[str, tuple[Callable[[int, int], int], str]] = {"+": (operator.add, "add"), "*": (operator.mul, "mul")}


def answer(problem: tuple[int, int], op: str = "+") -> int:
    """The correct result of ``a<op>b``."""
    return OPERATIONS[op][0](*problem)


def prompt_ids(tokenizer, problem: tuple[int, int], op: str = "+") -> list[int]:
    messages = [{"role": "user", "content": f"{problem[0]}{op}{problem[1]}="}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def reward(tokenizer, problem: tuple[int, int], completion_ids: list[int], op: str = "+") -> float:
    text = tokenizer.decode([t for t in completion_ids if t != tokenizer.eos_token_id], skip_special_tokens=False)
    return 1.0 if text == str(answer(problem, op)) else 0.0


@torch.no_grad()
def sample_completions(
    model, prompts: list[list[int]], *, eos_id: int, max_new_tokens: int = 4, generator: torch.Generator | None = None
) -> list[tuple[list[int], list[float]]]:
    """(completion ids, behaviour logprobs) per prompt, sampled at temperature 1 (prompts of equal length)."""
    sequences = torch.tensor(prompts)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    completions: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        logits = model(input_ids=sequences).logits[:, -1, :].float()
        distribution = torch.log_softmax(logits, dim=-1)
        tokens = torch.multinomial(distribution.exp(), 1, generator=generator).squeeze(-1)
        for row in range(len(prompts)):
            if not done[row]:
                completions[row].append(int(tokens[row]))
                logprobs[row].append(float(distribution[row, tokens[row]]))
        done |= tokens == eos_id
        if bool(done.all()):
            break
        sequences = torch.cat([sequences, tokens.unsqueeze(-1)], dim=1)
    return list(zip(completions, logprobs, strict=True))


def rollouts(
    model,
    tokenizer,
    problems: list[tuple[int, int]],
    attempts: int,
    *,
    model_version: int,
    seed: int,
    model_name: str = "tiny",
    op: str = "+",
    agent_name: str = "arithmetic",
) -> list[dict[str, Any]]:
    """``attempts`` sampled answers per problem, as TrainingSample records (task_id = the problem)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    prompts = [prompt_ids(tokenizer, p, op) for p in problems for _ in range(attempts)]
    answers = sample_completions(model, prompts, eos_id=tokenizer.eos_token_id, generator=generator)
    model.train(was_training)
    samples = []
    now = time.time_ns() // 1000
    for index, (prompt, (completion, logprobs)) in enumerate(zip(prompts, answers, strict=True)):
        problem = problems[index // attempts]
        trajectory_id = str(uuid.uuid5(NAMESPACE, f"{seed}/{index}"))
        value = reward(tokenizer, problem, completion, op)
        samples.append(
            {
                "sample_id": str(uuid.uuid5(NAMESPACE, f"{trajectory_id}/0")),
                "trajectory_id": trajectory_id,
                "rollout_id": trajectory_id,
                "task_id": f"{OPERATIONS[op][1]}-{problem[0]}-{problem[1]}-{seed}",
                "agent_name": agent_name,
                "span_event_id": trajectory_id,
                "step_index": 0,
                "step_count": 1,
                "model": model_name,
                "model_version": str(model_version),
                "prompt_token_ids": prompt,
                "completion_token_ids": completion,
                "completion_logprobs": logprobs,
                "return_value": value,
                "final_reward": value,
                "credit_policy": "final",
                "created_at_us": now,
            }
        )
    return samples


def mean_reward(model, tokenizer, problems: list[tuple[int, int]], attempts: int, seed: int, op: str = "+") -> float:
    """Mean reward of sampled answers (temperature 1) over ``problems`` x ``attempts``."""
    samples = rollouts(model, tokenizer, problems, attempts, model_version=0, seed=seed, op=op)
    return sum(s["return_value"] for s in samples) / len(samples)


def warm_start(
    model,
    tokenizer,
    problems: list[tuple[int, int]],
    *,
    steps: int,
    lr: float = 3e-3,
    seed: int = 0,
    ops: tuple[str, ...] = ("+",),
) -> None:
    """A brief supervised pass (plain torch Adam) on the correct answers of ``problems`` under each of ``ops``."""
    rng = random.Random(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        # One operation draws nothing more from rng: the addition-only warm start stays what it was.
        batch = [(rng.choice(problems), rng.choice(ops) if len(ops) > 1 else ops[0]) for _ in range(32)]
        rows = [
            prompt_ids(tokenizer, p, op) + tokenizer.encode(str(answer(p, op)), add_special_tokens=False)
            for p, op in batch
        ]
        rows = [[*r, tokenizer.eos_token_id] for r in rows]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        prompt_length = len(prompt_ids(tokenizer, *batch[0]))
        logits = model(input_ids=ids).logits[:, prompt_length - 1 : -1]
        targets = ids[:, prompt_length:]
        mask = (targets != tokenizer.pad_token_id).float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        loss = (nll * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
