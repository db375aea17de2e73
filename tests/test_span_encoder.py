"""The SDK's specialised SpanBatch encoder writes exactly the bytes of the generic codec (SpanBatch v2)."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from boltstream.producers.span_encoder import SpanBatchEncoder
from boltstream.schemas.codec import CodecError, codec, shipped_schemas
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


#: A rollout's ids as pending spans carry them: rollout_id, attempt_id, task_id, agent_name.
Rollout = tuple[str, str, str, str]


def flat(attributes: dict) -> tuple:
    """Attributes as the key, value, ... tail of a pending span."""
    return tuple(itertools.chain.from_iterable(attributes.items()))


def pending_span(rng: random.Random, rollout: Rollout, sequence: int) -> tuple:
    kind = rng.choice(KINDS)
    text = rng.choice(["", "plain", "ünïcødé ✓ 数学", "x" * 20_000])  # 20 KB: lengths beyond the varint table
    attributes = {f"key-{i}": rng.choice(["", "v", text]) for i in range(rng.randint(0, 4))}
    return (
        f"event-{sequence}",
        *rollout,
        kind,
        rng.choice(["", "search", text]),
        rng.choice([None, "parent-1"]),
        rng.choice([sequence, 20_000 + sequence]),
        1_795_000_000_000_000 + sequence,
        1_795_000_000_000_000 + sequence + rng.randint(0, 10**7),
        rng.choice(["ok", "error"]),
        rng.choice([None, "ValueError: bad", text]),
        rng.choice([None, 1.0, -0.5, 0, math.inf, 1e-300]),
        make_llm(rng.randint(0, 300), rng.randint(0, 80)) if kind == "llm_call" else None,
        rng.choice(["", "vllm-0"]),
        *flat(attributes),
    )


def as_record(span: tuple) -> dict:
    (event_id, rollout_id, attempt_id, task_id, agent_name, kind, name, parent_id, sequence, start, end) = span[:11]
    status, error, reward, llm, server = span[11:16]
    return {
        "event_id": event_id,
        "rollout_id": rollout_id,
        "attempt_id": attempt_id,
        "task_id": task_id,
        "agent_name": agent_name,
        "kind": kind,
        "name": name,
        "parent_id": parent_id,
        "sequence": sequence,
        "start_time_us": start,
        "end_time_us": end,
        "status": status,
        "error": error,
        "reward": reward,
        "attributes": dict(zip(span[16::2], span[17::2], strict=True)),
        "llm": llm,
        "server_id": server,
    }


def test_writes_the_generic_codecs_bytes() -> None:
    assert shipped_schemas()["SpanBatch"][-1].version == 2, "a new SpanBatch version: re-check the encoder"
    rng = random.Random(7)
    encoder, generic = SpanBatchEncoder(), codec("SpanBatch")
    for case in range(300):
        rollouts = [(f"rollout-{case}", f"attempt-{i}", "task-ü", "agent") for i in range(2)]
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
    span = pending_span(random.Random(1), ("r", "a", "t", "n"), 0)
    with pytest.raises(CodecError):
        SpanBatchEncoder().encode("r", "p", 0, [(*span[:6], 42, *span[7:])])  # a name that is not a string
    with pytest.raises(CodecError):
        SpanBatchEncoder().encode("r", "p", 0, [(*span[:5], "no-such-kind", *span[6:])])
    with pytest.raises(CodecError):
        SpanBatchEncoder().encode("r", "p", 0, [(*span, "a key without its value")])


def test_llm_records_with_edge_values_match_the_generic_codec() -> None:
    rollout = ("r", "attempt-0", "t", "agent")
    encoder, generic = SpanBatchEncoder(), codec("SpanBatch")
    ids = [0, 1, 16383, 16384, 2**20 - 1, 2**20, 2**31 - 1, -1, -(2**31)]
    logprobs = [-math.inf, math.nan, 1e-46, -1e10, -0.0, 3.4e38, 0]
    full = make_llm(3, 3)
    missing_defaults = {k: v for k, v in full.items() if k in ("model", "prompt_token_ids", "latency_ms")}
    for llm in (
        {**full, "prompt_token_ids": ids, "completion_token_ids": ids[::-1], "completion_logprobs": logprobs},
        {**full, "prompt_token_ids": [], "completion_token_ids": [], "completion_logprobs": []},
        {**full, "completion_logprobs": [1e39]},  # beyond float32: left to fastavro, as before
        missing_defaults,  # defaults filled in by fastavro
    ):
        span = ("e", *rollout, "llm_call", "chat", None, 0, 1, 2, "ok", None, None, llm, "")
        expected = generic.encode({"rollout_id": "r", "producer_id": "p", "sent_at_us": 0, "spans": [as_record(span)]})
        assert encoder.encode("r", "p", 0, [span]) == expected
    for field in ("prompt_token_ids", "completion_logprobs"):  # None is not an empty array
        span = ("e", *rollout, "llm_call", "chat", None, 0, 1, 2, "ok", None, None, {**full, field: None}, "")
        with pytest.raises(CodecError):
            encoder.encode("r", "p", 0, [span])
