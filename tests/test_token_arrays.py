"""boltstream.schemas.token_arrays: the SpanBatch reader and TrainingSample writer that keep token arrays as Avro bytes,
checked against the general codec (fastavro) on realistic, random, unusual and corrupt bytes."""

from __future__ import annotations

import base64
import json
import math
import random
import re
import struct
from array import array
from typing import Any

import pytest

from boltstream.schemas.codec import CodecError, codec, latest, shipped_schemas, zigzag_varint
from boltstream.schemas.token_arrays import (
    SPAN_BATCH_VERSION,
    AvroArray,
    encode_training_sample,
    read_span_batch,
    with_raw_arrays,
)
from boltstream.stream_processors.join_core import RolloutState, loads_state
from tests.records import make_llm, make_span
from tests.traffic import generate

ARRAYS = ("prompt_token_ids", "completion_token_ids", "completion_logprobs")
KINDS = ("rollout", "llm_call", "tool_call", "decision", "reward", "message", "exception", "object", "annotation")
# Invalid Avro that fastavro reads by wrapping around, and the reader rejects.
STRICTER = re.compile(r"beyond 64 bits|kind index -\d+ is not|union branch -\d+ of")
TEXTS = ("", "ok", "näive café", "東京で会いましょう", "emoji 🚀🧪", "a\u0301 combining", "x" * 300)

#: Typed attribute values (SpanBatch v3): every branch of the union, longs of every size.
ATTRIBUTE_VALUES = (*TEXTS, 0, -1, 64, 2**40, -(2**63), 2**63 - 1, 0.5, -1e300, math.inf, True, False)


def float32s(rng: random.Random, n: int) -> list[float]:
    special = [0.0, -0.0, 1e-45, -1e-40, 3.4e38, -3.4e38, -1e-3, -17.25]
    values = [rng.choice(special) if rng.random() < 0.2 else -rng.expovariate(0.5) for _ in range(n)]
    return list(struct.unpack(f"<{n}f", struct.pack(f"<{n}f", *values)))  # exactly representable


def token_ids(rng: random.Random, n: int) -> list[int]:
    ranges = [(0, 63), (0, 8191), (0, 200_000), (-(2**31), 2**31 - 1), (-100, -1)]
    return [rng.randint(*rng.choice(ranges)) for _ in range(n)]


def random_llm(rng: random.Random) -> dict[str, Any]:
    completion = rng.choice([0, 1, rng.randint(2, 120)])
    return {
        "model": rng.choice(TEXTS),
        "model_version": rng.choice(("", "v1", "v12-ü")),
        "prompt_token_ids": token_ids(rng, rng.choice([0, 1, rng.randint(2, 400)])),
        "completion_token_ids": token_ids(rng, completion),
        "completion_logprobs": float32s(rng, rng.choice([0, completion])),
        "prompt_text": rng.choice(TEXTS),
        "completion_text": rng.choice(TEXTS),
        "prompt_tokens": rng.randint(-5, 10**6),
        "completion_tokens": rng.randint(0, 2**31 - 1),
        "latency_ms": rng.choice([0.0, 120.5, 1e300, -0.0]),
        "finish_reason": rng.choice(("", "stop", "length")),
    }


def random_batch(rng: random.Random) -> dict[str, Any]:
    rollout_id = rng.choice(("r-1", "rollout-ünïcode", "x" * 100))
    spans = []
    for sequence in range(rng.choice([0, 1, rng.randint(2, 25)])):
        kind = rng.choice((*KINDS, "custom"))
        spans.append(
            make_span(
                rollout_id,
                kind=kind,
                sequence=rng.choice([sequence, 2**40, -1]),
                name=rng.choice(TEXTS),
                parent_id=rng.choice((None, "", "parent-1")),
                status=rng.choice(("ok", "error")),
                error=rng.choice((None, "ValueError: ß")),
                reward=rng.choice((None, 0.5, -1e-9)),
                attributes={rng.choice(TEXTS): rng.choice(ATTRIBUTE_VALUES) for _ in range(rng.randint(0, 4))},
                llm=random_llm(rng) if kind == "llm_call" or rng.random() < 0.1 else None,
                start_time_us=rng.randint(-(2**62), 2**62),
                end_time_us=rng.choice((0, 1_700_000_000_000_000)),
                server_id=rng.choice(("", "vllm-0")),
                attempt_id=rng.choice(("", "a-1")) if rng.random() < 0.2 else "a-0",  # mostly the batch's ids
            )
        )
    return {
        "rollout_id": rollout_id,
        "producer_id": rng.choice(TEXTS),
        "sent_at_us": rng.randint(0, 2**60),
        "spans": spans,
    }


def test_the_newest_span_batch_is_the_one_read_without_the_codec() -> None:
    # Bytes of any other version are read by the general codec: right, but without the speed.
    assert latest("SpanBatch").version == SPAN_BATCH_VERSION, (
        "teach boltstream.schemas.token_arrays the new SpanBatch layout"
    )


def test_reader_matches_the_codec_on_realistic_traffic() -> None:
    batches = codec("SpanBatch")
    messages = [m.value for m in generate(11, 60, 2.0, bad_inputs=False).messages if m.topic == "spans"]
    for value in messages:
        assert read_span_batch(value) == with_raw_arrays(batches.decode(value))


def test_reader_matches_the_codec_on_random_batches() -> None:
    rng, batches = random.Random(1), codec("SpanBatch")
    for _ in range(300):
        value = batches.encode(random_batch(rng))
        got = read_span_batch(value)
        assert got == with_raw_arrays(batches.decode(value))
        for span in got["spans"]:
            if span["llm"] is not None:
                # The kept bytes are what fastavro writes for the same values.
                for name in ARRAYS:
                    raw = span["llm"][name]
                    values = raw.ints() if name != "completion_logprobs" else raw.floats()
                    assert raw.count == len(values)


def _llm_batch(prompt: list[int], logprobs: list[float]) -> tuple[dict[str, Any], bytes]:
    llm = make_llm() | {"prompt_token_ids": prompt, "completion_token_ids": [7] * len(logprobs)}
    llm["completion_logprobs"] = logprobs
    batch = {"rollout_id": "r", "producer_id": "p", "sent_at_us": 1, "spans": [make_span("r", llm=llm)]}
    return batch, codec("SpanBatch").encode(batch)


def _encoded_items(values: list[int]) -> list[bytes]:
    return [zigzag_varint(v) for v in values]


@pytest.mark.parametrize(
    "layout",
    ["two blocks", "negative count with byte size", "padded item varint", "padded count varint"],
)
def test_other_avro_array_layouts_read_as_the_codec_reads_them_and_are_kept_canonical(layout: str) -> None:
    prompt = [5, -3, 70_000, 0, 2**31 - 1, -(2**31)]
    _, value = _llm_batch(prompt, [-0.5, -1.25])
    items = _encoded_items(prompt)
    canonical = zigzag_varint(len(prompt)) + b"".join(items) + b"\x00"
    other = {
        "two blocks": zigzag_varint(2) + b"".join(items[:2]) + zigzag_varint(4) + b"".join(items[2:]) + b"\x00",
        "negative count with byte size": zigzag_varint(-6)
        + zigzag_varint(len(b"".join(items)))
        + b"".join(items)
        + b"\x00",
        "padded item varint": zigzag_varint(6) + b"\x8a\x00" + b"".join(items[1:]) + b"\x00",  # 5 in two bytes
        "padded count varint": b"\x8c\x00" + b"".join(items) + b"\x00",  # 6 in two bytes
    }[layout]
    assert value.count(canonical) == 1
    value = value.replace(canonical, other)
    expected = with_raw_arrays(codec("SpanBatch").decode(value))
    got = read_span_batch(value)
    assert got == expected
    assert got["spans"][0]["llm"]["prompt_token_ids"] == AvroArray(len(prompt), canonical)


def test_float_arrays_in_two_blocks_read_as_the_codec_reads_them() -> None:
    logprobs = [-0.5, -1.25, -3.0]
    _, value = _llm_batch([1, 2], logprobs)
    items = struct.pack("<3f", *logprobs)
    canonical = zigzag_varint(3) + items + b"\x00"
    value = value.replace(
        canonical, zigzag_varint(1) + items[:4] + zigzag_varint(-2) + zigzag_varint(8) + items[4:] + b"\x00"
    )
    got = read_span_batch(value)
    assert got == with_raw_arrays(codec("SpanBatch").decode(value))
    assert got["spans"][0]["llm"]["completion_logprobs"].encoded == canonical


def test_token_ids_beyond_the_avro_int_range_are_a_codec_error() -> None:
    _, value = _llm_batch([1, 2, 3], [])
    too_big = value.replace(
        zigzag_varint(3) + b"\x02\x04\x06\x00", zigzag_varint(3) + b"\x02" + zigzag_varint(2**31) + b"\x06\x00"
    )
    assert codec("SpanBatch").decode(too_big)["spans"][0]["llm"]["prompt_token_ids"][1] == 2**31  # fastavro is lax
    with pytest.raises(CodecError, match="int range"):
        read_span_batch(too_big)


def test_an_older_writer_schema_reads_through_the_codec() -> None:
    v1 = next(v for v in shipped_schemas()["SpanBatch"] if v.version == 1)
    import io

    import fastavro

    batch = {"rollout_id": "r", "spans": [make_span("r", llm=make_llm(3, 2))]}
    for span in batch["spans"]:
        span.pop("server_id")
    body = io.BytesIO()
    fastavro.schemaless_writer(body, v1.parsed, batch)
    value = b"\xc3\x01" + v1.fingerprint + body.getvalue()
    got = read_span_batch(value)
    assert got == with_raw_arrays(codec("SpanBatch").decode(value))
    assert got["spans"][0]["llm"]["completion_token_ids"].ints() == [1000, 1001]


def test_truncated_and_corrupted_bytes_are_codec_errors_or_read_as_the_codec_reads_them() -> None:
    rng, batches = random.Random(2), codec("SpanBatch")
    value = batches.encode(random_batch(random.Random(5)) | {"spans": [make_span("r", llm=make_llm(40, 20))] * 3})
    for end in range(len(value)):
        with pytest.raises(CodecError):
            read_span_batch(value[:end])
    with pytest.raises(CodecError, match="trailing"):
        read_span_batch(value + b"\x00")
    for _ in range(3000):
        corrupt = bytearray(value)
        for _ in range(rng.randint(1, 3)):
            corrupt[rng.randrange(10, len(corrupt))] = rng.randrange(256)
        try:
            expected = with_raw_arrays(batches.decode(bytes(corrupt)))
        except CodecError:
            expected = None  # the codec rejects it (or holds an int beyond the Avro int range): so must the reader
        try:
            got = read_span_batch(bytes(corrupt))
        except CodecError as exc:
            got = None
            if expected is not None:  # where the reader is stricter than fastavro, and only there
                assert STRICTER.search(str(exc)), bytes(corrupt).hex()
                continue
        assert quiet_nans(got) == quiet_nans(expected), bytes(corrupt).hex()


def quiet_nans(batch: dict[str, Any] | None) -> dict[str, Any] | None:
    """fastavro widens floats to doubles, which turns a signalling NaN quiet (other bytes); the reader keeps
    the bytes (and the join rejects any NaN logprob): compare logprobs as fastavro would write them."""
    for span in batch["spans"] if batch else ():
        if span["llm"] is not None:
            span["llm"]["completion_logprobs"] = AvroArray.of_floats(span["llm"]["completion_logprobs"].floats())
    return batch


def test_float_finiteness_is_decided_on_the_bytes() -> None:
    assert AvroArray.of_floats([-0.5, 3.4e38, -3.4e38, 0.0]).floats_finite()  # high bytes 0x7f / 0xff, finite
    assert AvroArray.of_floats([]).floats_finite()
    for bad in (math.nan, math.inf, -math.inf):
        assert not AvroArray.of_floats([-0.5, bad, -1.0]).floats_finite()


def random_sample(rng: random.Random) -> dict[str, Any]:
    completion = rng.choice([0, 1, rng.randint(2, 200)])
    return {
        "sample_id": rng.choice(TEXTS),
        "trajectory_id": "t-1",
        "rollout_id": rng.choice(TEXTS),
        "task_id": rng.choice(TEXTS),
        "agent_name": rng.choice(TEXTS),
        "span_event_id": "e-1",
        "step_index": rng.randint(0, 20_000),
        "step_count": rng.randint(0, 2**31 - 1),
        "model": rng.choice(TEXTS),
        "model_version": rng.choice(("", "v3")),
        "prompt_token_ids": token_ids(rng, rng.choice([0, 1, rng.randint(2, 400)])),
        "completion_token_ids": token_ids(rng, completion),
        "completion_logprobs": float32s(rng, rng.choice([0, completion])),
        "return_value": rng.choice([0.0, -0.0, 1.0, 0.9**7, -1e-300, 1e300]),
        "final_reward": rng.uniform(-1, 1),
        "credit_policy": rng.choice(("final", "discounted", "per_step")),
        "created_at_us": rng.choice([0, 1_700_000_000_000_000, -(2**63), 2**63 - 1]),
        "token_source": rng.choice(("server", "retokenized")),
        "call_text": rng.choice(("", '{"endpoint": "chat.completions", "prompt": "[]"}', "é" * 200)),
    }


def test_training_sample_writer_is_byte_identical_to_the_codec() -> None:
    rng, samples = random.Random(3), codec("TrainingSample")
    for _ in range(500):
        sample = random_sample(rng)
        raw = sample | {
            "prompt_token_ids": AvroArray.of_ints(sample["prompt_token_ids"]),
            "completion_token_ids": AvroArray.of_ints(sample["completion_token_ids"]),
            "completion_logprobs": AvroArray.of_floats(sample["completion_logprobs"]),
        }
        assert encode_training_sample(raw) == samples.encode(sample)


def test_training_sample_writer_rejects_a_bad_record() -> None:
    sample = random_sample(random.Random(4))
    with pytest.raises(CodecError, match="TrainingSample"):
        encode_training_sample(sample)  # arrays as lists, not AvroArray
    with pytest.raises(CodecError, match="TrainingSample"):
        encode_training_sample({"sample_id": "s"})


def test_a_state_written_before_the_token_bytes_loads_and_emits_the_same_arrays() -> None:
    """A worker upgraded in place restores rollouts its predecessor wrote with packed token arrays."""

    def packed(values: list, typecode: str) -> str:
        return base64.b64encode(array(typecode, values).tobytes()).decode()  # little-endian host, as CI

    prompt, completion, logprobs = [0, 5, 70_000, -1], [1000, 1001], [-0.5, -0.25]
    legacy = {
        "r": "r-1", "p": 0, "s": "", "c": 0, "o": [3, -1], "d": 0, "task": "t", "agent": "a", "attempt": "",
        "spans": [[0, "e-1"]], "llm": 1, "span_rewards": [], "rewards": [], "versions": ["v1"],
        "start": 1, "end": 2, "ended": False, "active": 2,
        "steps": [[0, "e-1", 2, "m", "v1", packed(prompt, "i"), packed(completion, "i"), packed(logprobs, "f")]],
    }  # fmt: skip
    state = loads_state(json.dumps(legacy).encode())
    assert isinstance(state, RolloutState)
    (step,) = state.steps
    assert step.prompt_token_ids == AvroArray.of_ints(prompt)
    assert (step.completion_token_ids.ints(), step.completion_logprobs.floats()) == (completion, logprobs)
    assert "steps" not in state.to_json() and loads_state(json.dumps(state.to_json()).encode()) == state


def test_longs_of_every_length_read_back() -> None:
    """Timestamps take eight varint bytes, which have a path of their own: every length, both signs."""
    values = {0, -1, 2**63 - 1, -(2**63)} | {
        sign * (2**k + d) for k in range(63) for d in (-1, 0, 1) for sign in (1, -1)
    }
    batches = codec("SpanBatch")
    for value in sorted(values):
        if -(2**63) <= value < 2**63:
            batch = {"rollout_id": "r", "producer_id": "p", "sent_at_us": value, "spans": []}
            assert read_span_batch(batches.encode(batch))["sent_at_us"] == value
