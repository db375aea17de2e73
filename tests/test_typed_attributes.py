"""Typed attribute values (SpanBatch v3): numbers stay numbers from the agent's emit call to a ClickHouse
column that sums without a cast; nested values are flattened into dotted keys; older versions still read."""

from __future__ import annotations

import collections
import io
import math
import uuid

import fastavro
import pytest
from confluent_kafka import Producer

from boltstream import agl
from boltstream.infra.common.config import Settings
from boltstream.producers import redaction
from boltstream.producers.redaction import (
    MAX_FLATTEN_DEPTH,
    MAX_FLATTENED_KEYS,
    REDACTED,
    Redactor,
    flat_attribute_items,
)
from boltstream.schemas.codec import codec, latest, shipped_schemas
from tests.producer_helpers import at_least, consume
from tests.records import make_span
from tests.test_archive import wait_for
from tests.test_span_encoder import c_attributes


def pairs(key: str, value: object) -> list[tuple[str, object]]:
    flat = flat_attribute_items(key, value)
    return list(zip(flat[::2], flat[1::2], strict=True))


def test_nested_values_flatten_into_dotted_keys_with_typed_leaves() -> None:
    usage = {"usage": {"prompt_tokens": 7, "completion_tokens": 5}, "tags": ["a", "b"], "ok": True}
    assert pairs("response", usage) == [
        ("response.usage.prompt_tokens", 7),
        ("response.usage.completion_tokens", 5),
        ("response.tags.0", "a"),
        ("response.tags.1", "b"),
        ("response.ok", True),
    ]
    assert pairs("x", {}) == [("x", "{}")]  # an empty value keeps its key
    assert pairs("x", {"a": None, "b": b"raw"}) == [("x.a", "null"), ("x.b", "\"b'raw'\"")]
    assert pairs("big", 2**64) == [("big", str(2**64))]  # beyond a long: its digits
    assert pairs("n", -(2**63)) == [("n", -(2**63))]
    assert pairs("t", (1.5, ("u", False))) == [("t.0", 1.5), ("t.1.0", "u"), ("t.1.1", False)]


def test_values_too_deep_or_too_large_to_flatten_are_kept_whole_as_json() -> None:
    deep: dict = {"leaf": 1}
    for _ in range(MAX_FLATTEN_DEPTH):
        deep = {"d": deep}
    ((key, text),) = pairs("deep", deep)
    assert key == "deep" and text.startswith('{"d":{"d":') and text.endswith('"leaf":1' + "}" * (MAX_FLATTEN_DEPTH + 1))
    many = list(range(MAX_FLATTENED_KEYS + 1))
    assert pairs("many", many) == [("many", "[" + ",".join(map(str, many)) + "]")]
    assert len(pairs("just", many[:-1])) == MAX_FLATTENED_KEYS
    cycle: list = []
    cycle.append(cycle)
    ((key, text),) = pairs("cycle", cycle)  # no recursion error: the depth bound stops it
    assert key == "cycle" and isinstance(text, str)


def test_the_redactor_keeps_numbers_and_hides_secret_named_keys_whatever_their_type() -> None:
    redactor = Redactor(max_bytes=64)
    cleaned = redactor.typed_attributes(
        {
            "temperature": 0.7,
            "tokens": 12,
            "stream": False,
            "api_key": 1234567,
            "headers": {"Authorization": "Bearer abc", "x-count": 2},
            "note": "key sk-proj-abcdefghijklmnopqrstuvwxyz0123",
            "long": "y" * 100,
            "nan": math.nan,
        }
    )
    assert (cleaned["temperature"], cleaned["tokens"], cleaned["stream"]) == (0.7, 12, False)
    assert cleaned["api_key"] == cleaned["headers.Authorization"] == REDACTED
    assert cleaned["headers.x-count"] == 2
    assert "sk-proj" not in cleaned["note"] and REDACTED in cleaned["note"]
    assert cleaned["long"].startswith("y" * 64) and "truncated" in cleaned["long"]
    assert math.isnan(cleaned["nan"])


def test_v3_round_trips_every_type_and_older_versions_decode_as_strings() -> None:
    assert latest("SpanBatch").version == latest("Span").version == 3
    typed = {"s": "text", "i": 2**40, "f": 0.25, "b": True, "neg": -3}
    span = make_span("r-typed", attributes=typed)
    decoded = codec("Span").decode(codec("Span").encode(span))["attributes"]
    assert decoded == typed and [type(v) for v in decoded.values()] == [str, int, float, bool, int]
    for old in shipped_schemas()["SpanBatch"][:-1]:
        old_span = make_span("r-old", attributes={"tokens": "12"})
        if old.version == 1:
            old_span.pop("server_id")
        body = io.BytesIO()
        fastavro.schemaless_writer(body, old.parsed, {"rollout_id": "r-old", "spans": [old_span]})
        (read,) = codec("SpanBatch").decode(b"\xc3\x01" + old.fingerprint + body.getvalue())["spans"]
        assert read["attributes"] == {"tokens": "12"}, f"SpanBatch v{old.version}"


def test_numbers_emitted_by_an_agent_sum_in_clickhouse_without_a_cast(settings: Settings, archive) -> None:
    """SDK → broker → archive → chDB: a float and a nested int summed and averaged in SQL as they are."""
    agl.configure(settings)
    temperatures = [0.2, 0.5, 0.9]
    try:
        for index, temperature in enumerate(temperatures):
            with agl.rollout(task_id=f"task-{index}", agent_name="typed"):
                agl.emit_span(
                    "custom",
                    "call",
                    attributes={
                        "temperature": temperature,
                        "usage": {"total_tokens": 10 + index, "cached": index % 2 == 0},
                        "model": "tiny",
                    },
                )
        assert agl.flush(30)
    finally:
        agl.shutdown(10)
    spans = consume(settings.kafka.bootstrap_servers, settings.topics.spans, at_least(6))
    calls = [s for s in spans if s["name"] == "call"]
    assert sorted(s["attributes"]["usage.total_tokens"] for s in calls) == [10, 11, 12]
    assert {type(s["attributes"]["usage.cached"]) for s in calls} == {bool}

    # A v2 writer (an SDK of the previous release) on the same topic: its numbers arrive as text.
    old = next(v for v in shipped_schemas()["SpanBatch"] if v.version == 2)
    old_span = make_span(str(uuid.uuid4()), kind="tool_call", attributes={"temperature": "0.4"})
    body = io.BytesIO()
    fastavro.schemaless_writer(body, old.parsed, {"rollout_id": old_span["rollout_id"], "spans": [old_span]})
    producer = Producer(settings.kafka.client_config())
    producer.produce(settings.topics.spans, b"\xc3\x01" + old.fingerprint + body.getvalue())
    assert producer.flush(10) == 0

    archive.start()
    reader = archive.client()
    wait_for(lambda: reader.command("SELECT count() FROM spans") == 7, 90, "6 SDK spans and the v2 span")
    (row,) = reader.query(
        "SELECT sum(attributes_number['usage.total_tokens']), avg(attributes_number['temperature']),"
        " toTypeName(attributes_number['temperature']), countIf(attributes['usage.cached'] = 'true'),"
        " groupArray(attributes['model'])"
        " FROM spans WHERE name = 'call'"
    ).result_rows
    assert row[0] == 33 and row[1] == pytest.approx(sum(temperatures) / 3)
    assert row[2] == "Float64" and row[3] == 2 and row[4] == ["tiny"] * 3
    # Text of every value stays in `attributes` (what older rows hold); strings are not numbers.
    assert reader.query(
        "SELECT attributes['temperature'], mapContains(attributes_number, 'temperature') FROM spans"
        " WHERE event_id = {e:String}",
        parameters={"e": old_span["event_id"]},
    ).result_rows == [("0.4", False)]
    texts = reader.query("SELECT attributes['temperature'] FROM spans WHERE name = 'call'").result_rows
    assert sorted(text for (text,) in texts) == ["0.2", "0.5", "0.9"]


#: Values of every kind the flattening meets: scalars at the 64-bit edges, empty and non-empty containers, keys
#: of other types (1.0 and True, which a dict finds as 1), Mappings that are not dicts, values only JSON can hold.
SHAPES: list[object] = [
    {"query": "weather", "top_k": 3, "score": 0.25, "filters": {"recent": True, "sources": ["web", "news"]}},
    {"a": 1, "b": [1, 2.5, True, None, "x", {"c": {}}], "d": {"e": {"f": 2**70}}, "g": (), "h": []},
    {"edge": [2**63 - 1, -(2**63), 2**63, -(2**63) - 1, math.nan, -math.inf, "ünïcødé"]},
    collections.OrderedDict(x=1, y=collections.OrderedDict(z=[1])),
    collections.UserDict({"u": [1, {"v": "w"}]}),
    {1.0: "a float key", (1, 2): "a tuple key", None: "a None key", 3: "an int key"},
    {True: "a bool key"},
    [[[[[[[[[[1]]]]]]]]]],  # deeper than MAX_FLATTEN_DEPTH
    list(range(MAX_FLATTENED_KEYS + 1)),  # more leaves than MAX_FLATTENED_KEYS
    list(range(MAX_FLATTENED_KEYS)),
    {"set": {1}, "bytes": b"raw", "counter": collections.Counter("aab"), "object": object()},
    ("a", ("b", ("c",))),
]


@pytest.mark.parametrize("value", SHAPES, ids=range(len(SHAPES)))
def test_the_c_flattening_is_the_python_one(value: object) -> None:
    c = c_attributes()
    for prefix in ("args", "args"):  # the second time from the key cache
        from_c, from_python = ["an earlier key", "its value"], ["an earlier key", "its value"]  # bounds ignore them
        assert c.flatten(prefix, value, from_c) == redaction.flatten_in_python(prefix, value, from_python)
        # Types too (True is not 1); the same NaN object compares equal to itself in a list.
        assert [(type(x), x) for x in from_c] == [(type(x), x) for x in from_python]


def test_the_c_check_of_wire_scalars_is_the_python_one() -> None:
    c = c_attributes()
    for values in (
        [],
        ["a", "b"],
        ["a", 1, 2.5, True, "b"],
        ["a", 2**63],
        ["a", None],
        [1, -(2**63)],
        ["a", b"b"],
        [type("Text", (str,), {})("a subclass")],
    ):
        assert c.strings_if_wire_scalars(values) == redaction.strings_if_wire_scalars_in_python(values), values


def test_a_spans_other_attributes_do_not_count_toward_a_values_flattening_bound() -> None:
    flat = ["earlier", 1]
    redaction.append_flat_attribute(flat, "big", list(range(MAX_FLATTENED_KEYS)))
    last = MAX_FLATTENED_KEYS - 1
    assert len(flat) == 2 + 2 * MAX_FLATTENED_KEYS and flat[-2:] == [f"big.{last}", last]
    redaction.append_flat_attribute(flat, "bigger", list(range(MAX_FLATTENED_KEYS + 1)))  # past it: whole, as JSON
    assert flat[-2] == "bigger" and flat[-1].startswith("[0,1,2") and len(flat) == 4 + 2 * MAX_FLATTENED_KEYS
