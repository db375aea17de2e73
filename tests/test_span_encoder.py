"""The SDK's specialised SpanBatch encoder writes exactly the bytes of the generic codec (SpanBatch v3)."""

from __future__ import annotations

import itertools
import math
import os
import random
import shutil
from types import ModuleType

import pytest

from boltstream.producers import pending_span as layout
from boltstream.producers import span_encoder
from boltstream.producers.span_encoder import VERSION, SpanBatchEncoder
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
    values = ["", "v", text, 0, -1, 16384, 2**62, -(2**63), 0.25, -math.inf, True, False]
    attributes = {f"key-{i}": rng.choice(values) for i in range(rng.randint(0, 4))}
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
    return {
        "event_id": span[layout.EVENT_ID],
        "rollout_id": span[layout.ROLLOUT_ID],
        "attempt_id": span[layout.ATTEMPT_ID],
        "task_id": span[layout.TASK_ID],
        "agent_name": span[layout.AGENT_NAME],
        "kind": span[layout.KIND],
        "name": span[layout.NAME],
        "parent_id": span[layout.PARENT_ID],
        "sequence": span[layout.SEQUENCE],
        "start_time_us": span[layout.START_TIME_US],
        "end_time_us": span[layout.END_TIME_US],
        "status": span[layout.STATUS],
        "error": span[layout.ERROR],
        "reward": span[layout.REWARD],
        "attributes": dict(zip(span[layout.ATTRIBUTES :: 2], span[layout.ATTRIBUTES + 1 :: 2], strict=True)),
        "llm": span[layout.LLM],
        "server_id": span[layout.SERVER_ID],
    }


def test_pending_span_fields_are_the_span_records_in_schema_order() -> None:
    """The index names are the Span record's field names, numbered in its order, attributes moved last."""
    span_batch = next(v for v in shipped_schemas()["SpanBatch"] if v.version == VERSION).schema
    fields = [field["name"] for field in span_batch["fields"][3]["type"]["items"]["fields"]]
    fields.remove("attributes")
    assert [getattr(layout, field.upper()) for field in fields] == list(range(len(fields)))
    assert len(fields) == layout.ATTRIBUTES


def c_attributes() -> ModuleType:
    """The C extension of attribute values. It is optional only where nothing can compile it: with a compiler
    here, a missing build is a broken install and fails the test instead of skipping it."""
    try:
        from boltstream.producers import _attributes
    except ImportError:
        if shutil.which(os.environ.get("CC", "cc")):
            pytest.fail("producers/_attributes.c is not built although this machine has a C compiler: reinstall")
        pytest.skip("no C compiler on this machine, so the optional C extension is not built")
    return _attributes


@pytest.fixture(params=["c", "python"])
def attribute_encoding(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The encoder writing attributes with the C extension, then with its Python loop."""
    encode = c_attributes().encode_attributes if request.param == "c" else None
    monkeypatch.setattr(span_encoder, "encode_attributes", encode)


@pytest.mark.usefixtures("attribute_encoding")
def test_writes_the_generic_codecs_bytes() -> None:
    assert shipped_schemas()["SpanBatch"][-1].version == 3, "a new SpanBatch version: re-check the encoder"
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


@pytest.mark.usefixtures("attribute_encoding")
def test_bad_values_raise_codec_error() -> None:
    span = pending_span(random.Random(1), ("r", "a", "t", "n"), 0)

    def with_field(index: int, value: object) -> tuple:
        return (*span[:index], value, *span[index + 1 :])

    for bad in (
        with_field(layout.NAME, 42),
        with_field(layout.KIND, "no-such-kind"),
        (*span, "a key without its value"),
        (*span, "beyond 64 bits", 2**63),  # the producer's cleaning turns these into strings first
        (*span, "not a wire scalar", None),
        (*span, 7, "a key that is not a string"),
        (*span, "a lone surrogate", "\ud800"),
    ):
        with pytest.raises(CodecError):
            SpanBatchEncoder().encode("r", "p", 0, [bad])


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
