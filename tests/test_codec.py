"""Codec round trips, both framings, schema evolution and bad bytes."""

from __future__ import annotations

import json
import uuid

import fastavro
import pytest

from boltstream.schemas.codec import RECORDS, AvroCodec, CodecError, codec, latest, shipped_schemas
from tests.records import make_span, make_span_batch


def test_every_design_record_is_shipped_with_docs_on_every_field():
    assert set(shipped_schemas()) == set(RECORDS)
    for versions in shipped_schemas().values():
        for version in versions:
            for fld in version.schema["fields"]:
                assert fld.get("doc"), f"{version.record}.v{version.version}.{fld['name']} has no doc"


def test_single_object_round_trip():
    batch = make_span_batch(spans=5)
    data = codec("SpanBatch").encode(batch)
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == latest("SpanBatch").fingerprint
    assert codec("SpanBatch").decode(data) == batch


def test_confluent_framing_through_the_mock_registry():
    url = f"mock://{uuid.uuid4().hex}"
    writer = AvroCodec("Span", registry_url=url, subject="spans-value")
    span = make_span()
    data = writer.encode(span)
    assert data[:1] == b"\x00"
    assert AvroCodec("Span", registry_url=url, subject="spans-value").decode(data) == span
    # a reader without a registry says why it cannot read Confluent framing
    with pytest.raises(CodecError, match="no schema registry"):
        codec("Span").decode(data)


@pytest.mark.parametrize("record", sorted(shipped_schemas()))
def test_every_older_writer_schema_decodes_under_the_newest_reader(record):
    newest = latest(record)
    for old in shipped_schemas()[record]:
        sample = _example(old.schema)
        body = _write(old.parsed, sample)
        decoded = codec(record).decode(b"\xc3\x01" + old.fingerprint + body)
        assert _holds(decoded, sample)
        added = {f["name"] for f in newest.schema["fields"]} - set(sample)
        for fld in newest.schema["fields"]:
            if fld["name"] in added:
                assert decoded[fld["name"]] == fld["default"]


def test_span_v1_bytes_decode_with_the_v2_default():
    v1 = shipped_schemas()["Span"][0]
    assert v1.version == 1 and latest("Span").version >= 2
    span = make_span()
    span.pop("server_id")
    decoded = codec("Span").decode(b"\xc3\x01" + v1.fingerprint + _write(v1.parsed, span))
    assert decoded["server_id"] == ""


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "unknown magic"),
        (b"\x7bjson", "unknown magic bytes 7b6a"),
        (b"\xc3\x01\x00\x01", "truncated single-object header"),
        (b"\xc3\x01" + b"\xff" * 8 + b"\x00", "unknown schema fingerprint ffffffffffffffff"),
    ],
)
def test_bad_bytes_raise_one_clear_error(data, message):
    with pytest.raises(CodecError, match=message):
        codec("Span").decode(data)


def test_truncated_body_and_trailing_bytes():
    data = codec("Span").encode(make_span())
    with pytest.raises(CodecError, match="truncated Span body"):
        codec("Span").decode(data[:-20])
    with pytest.raises(CodecError, match="trailing bytes"):
        codec("Span").decode(data + b"\x00\x00")


def test_wrong_record_type_is_named():
    data = codec("Reward").encode(
        {"event_id": "e", "rollout_id": "r", "value": 1.0, "timestamp_us": 1, "attributes": {}}
    )
    with pytest.raises(CodecError, match="expected a Span but the bytes hold a Reward"):
        codec("Span").decode(data)


def test_unencodable_record_is_a_codec_error():
    with pytest.raises(CodecError, match="cannot encode Span"):
        codec("Span").encode({"event_id": 3})


# -- helpers ---------------------------------------------------------------------------------------


def _holds(decoded, written) -> bool:
    """Everything written is in decoded (which may carry newer fields, at their defaults)."""
    if isinstance(written, dict):
        return all(_holds(decoded[k], v) for k, v in written.items())
    if isinstance(written, list):
        return len(decoded) == len(written) and all(_holds(d, w) for d, w in zip(decoded, written, strict=True))
    return decoded == written


def _write(parsed, record) -> bytes:
    import io

    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, parsed, record)
    return buffer.getvalue()


def _example(schema: dict) -> dict:
    """A record for ``schema`` with a non-default value in every field."""
    return {f["name"]: _value(f["type"]) for f in schema["fields"]}


def _value(avro_type):
    if isinstance(avro_type, list):  # union: take the non-null branch
        return _value(next(t for t in avro_type if t != "null"))
    if isinstance(avro_type, dict):
        kind = avro_type["type"]
        if kind == "record":
            return _example(avro_type)
        if kind == "enum":
            return avro_type["symbols"][-1]
        if kind == "array":
            return [_value(avro_type["items"])] * 2
        if kind == "map":
            return {"k": _value(avro_type["values"])}
        return _value(kind)
    return {
        "string": "text",
        "long": 1234567890123,
        "int": 42,
        "double": 0.25,
        "float": 0.5,
        "boolean": False,
        "bytes": b"\x00\x01",
    }[avro_type]


def test_example_generator_covers_every_field():
    for versions in shipped_schemas().values():
        for version in versions:
            assert json.dumps(sorted(_example(version.schema)), default=str)
