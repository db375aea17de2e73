"""The SDK's specialised SpanBatch encoder writes exactly the bytes of the generic codec (SpanBatch v2)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest

from producers.span_encoder import SpanBatchEncoder
from schemas.codec import CodecError, codec, shipped_schemas
from tests.records import make_llm

KINDS = (
    "rollout",
    "llm_call",
    "tool_call",
    "decision",
    "reward",
    "message",
    "exception",
    "object",
    "annotation",
    "custom",
)


@dataclass
class Rollout:
    rollout_id: str
    attempt_id: str
    task_id: str
    agent_name: str


def pending_span(rng: random.Random, rollout: Rollout, sequence: int) -> tuple:
    kind = rng.choice(KINDS)
    text = rng.choice(["", "plain", "ünïcødé ✓ 数学", "x" * 20_000])  # 20 KB: lengths beyond the varint table
    attributes = {f"key-{i}": rng.choice(["", "v", text]) for i in range(rng.randint(0, 4))}
    return (
        rollout,
        f"event-{sequence}",
        rng.choice([None, "parent-1"]),
        rng.choice([sequence, 20_000 + sequence]),
        kind,
        rng.choice(["", "search", text]),
        1_795_000_000_000_000 + sequence,
        1_795_000_000_000_000 + sequence + rng.randint(0, 10**7),
        rng.choice(["ok", "error"]),
        rng.choice([None, "ValueError: bad", text]),
        rng.choice([None, 1.0, -0.5, 0, math.inf, 1e-300]),
        attributes,
        make_llm(rng.randint(0, 300), rng.randint(0, 80)) if kind == "llm_call" else None,
        rng.choice(["", "vllm-0"]),
    )


def as_record(span: tuple) -> dict:
    (rollout, event_id, parent_id, sequence, kind, name, start, end, status, error, reward, attrs, llm, server) = span
    return {
        "event_id": event_id,
        "rollout_id": rollout.rollout_id,
        "attempt_id": rollout.attempt_id,
        "task_id": rollout.task_id,
        "agent_name": rollout.agent_name,
        "kind": kind,
        "name": name,
        "parent_id": parent_id,
        "sequence": sequence,
        "start_time_us": start,
        "end_time_us": end,
        "status": status,
        "error": error,
        "reward": reward,
        "attributes": attrs,
        "llm": llm,
        "server_id": server,
    }


def test_writes_the_generic_codecs_bytes() -> None:
    assert shipped_schemas()["SpanBatch"][-1].version == 2, "a new SpanBatch version: re-check the encoder"
    rng = random.Random(7)
    encoder, generic = SpanBatchEncoder(), codec("SpanBatch")
    for case in range(300):
        rollouts = [Rollout(f"rollout-{case}", f"attempt-{i}", "task-ü", "agent") for i in range(2)]
        spans = [pending_span(rng, rng.choice(rollouts), i) for i in range(rng.randint(0, 6))]
        expected = generic.encode(
            {
                "rollout_id": f"rollout-{case}",
                "producer_id": "host:1:abc",
                "sent_at_us": 1_795_000_000_000_000 + case,
                "spans": [as_record(s) for s in spans],
            }
        )
        assert encoder.encode(f"rollout-{case}", "host:1:abc", 1_795_000_000_000_000 + case, spans) == expected


def test_bad_values_raise_codec_error() -> None:
    rollout = Rollout("r", "a", "t", "n")
    span = pending_span(random.Random(1), rollout, 0)
    with pytest.raises(CodecError):
        SpanBatchEncoder().encode("r", "p", 0, [(*span[:5], 42, *span[6:])])  # a name that is not a string
    with pytest.raises(CodecError):
        SpanBatchEncoder().encode("r", "p", 0, [(*span[:4], "no-such-kind", *span[5:])])
