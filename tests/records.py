"""Realistic records for tests and benchmarks, shaped by the newest schemas."""

from __future__ import annotations

import time
import uuid
from typing import Any


def make_llm(prompt_tokens: int = 100, completion_tokens: int = 50, model_version: str = "v1") -> dict[str, Any]:
    return {
        "model": "tiny-policy",
        "model_version": model_version,
        "prompt_token_ids": list(range(prompt_tokens)),
        "completion_token_ids": list(range(1000, 1000 + completion_tokens)),
        "completion_logprobs": [-0.5] * completion_tokens,
        "prompt_text": '[{"role": "user", "content": "What is 17 * 23?"}]',
        "completion_text": "17 * 23 = 391",
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "latency_ms": 120.5,
        "finish_reason": "stop",
    }


def make_span(
    rollout_id: str | None = None, kind: str = "llm_call", sequence: int = 0, **fields: Any
) -> dict[str, Any]:
    now = int(time.time() * 1e6)
    span = {
        "event_id": str(uuid.uuid4()),
        "rollout_id": rollout_id or str(uuid.uuid4()),
        "attempt_id": "attempt-0",
        "task_id": "task-1",
        "agent_name": "math-agent",
        "kind": kind,
        "name": "chat.completions" if kind == "llm_call" else kind,
        "parent_id": None,
        "sequence": sequence,
        "start_time_us": now,
        "end_time_us": now + 1500,
        "status": "ok",
        "error": None,
        "reward": None,
        "attributes": {"tool": "calculator"},
        "llm": make_llm() if kind == "llm_call" else None,
        "server_id": "",
    }
    span.update(fields)
    return span


def make_span_batch(rollout_id: str | None = None, spans: int = 3) -> dict[str, Any]:
    rollout_id = rollout_id or str(uuid.uuid4())
    return {
        "rollout_id": rollout_id,
        "producer_id": "test:1",
        "sent_at_us": int(time.time() * 1e6),
        "spans": [make_span(rollout_id, sequence=i) for i in range(spans)],
    }
