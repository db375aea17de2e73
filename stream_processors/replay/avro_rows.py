"""Archived rows re-encoded by ClickHouse: a query's ``FORMAT Avro`` output cut into framed Kafka messages.

Why ClickHouse encodes. Re-building each SpanBatch as Python dicts and encoding it with fastavro costs
~25 µs per llm_call span, ten times the cost of producing it. ClickHouse writes Avro itself (the
archive reads it the same way), at C++ speed, so the replay asks for the batches already shaped as the
newest ``SpanBatch``/``Reward`` schemas and only cuts the output into messages.

How rows are cut. An Avro container file groups rows into blocks of ~16 KB without marking where a
row ends, and the read endpoint is read-only (no setting such as ``output_format_avro_sync_interval``
may change). So each row starts with a 16-byte ``fixed`` marker drawn at random per query: splitting a
block's bytes on it is one C call. A block whose pieces do not match its row count (the marker also
occurs in the data: a 2^-128 chance per position) is decoded by fastavro instead, row by row, and
re-encoded: slower, never wrong.

The row layout (:func:`row_type`): ``marker, time_us, events, rollout_id, batch, reward``, where exactly
one of ``batch`` (a SpanBatch) and ``reward`` (a Reward) is not null. In Avro a nullable value is a
union whose index comes first: ``batch`` present is ``02 <SpanBatch body> 00`` (the ``00``: reward
null); a reward is ``00 02 <Reward body>``.
"""

from __future__ import annotations

import io
import json
import secrets
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import cramjam
import fastavro

from boltstream.schemas.codec import SINGLE_OBJECT_MAGIC, SchemaVersion, shipped_schemas

MARKER_BYTES = 16
_AVRO_MAGIC = b"Obj\x01"
_READ_SIZE = 1 << 20


def clickhouse_type(avro: Any) -> str:
    """The ClickHouse type whose Avro output has the shape of the Avro type ``avro`` (a parsed .avsc)."""
    if isinstance(avro, list):
        branches = [branch for branch in avro if branch != "null"]
        if len(branches) != 1 or len(avro) != 2 or avro[0] != "null":
            raise ValueError(f"only ['null', T] unions have a ClickHouse type, not {avro}")
        return f"Nullable({clickhouse_type(branches[0])})"
    if isinstance(avro, str):
        primitives = {
            "string": "String",
            "long": "Int64",
            "int": "Int32",
            "double": "Float64",
            "float": "Float32",
            "boolean": "Bool",
        }
        return primitives[avro]
    kind = avro["type"]
    if kind == "array":
        return f"Array({clickhouse_type(avro['items'])})"
    if kind == "map":
        return f"Map(String, {clickhouse_type(avro['values'])})"
    if kind == "enum":
        symbols = ", ".join(f"'{symbol}' = {index}" for index, symbol in enumerate(avro["symbols"]))
        return f"Enum8({symbols})"
    if kind == "record":
        fields = ", ".join(f"{field['name']} {clickhouse_type(field['type'])}" for field in avro["fields"])
        return f"Tuple({fields})"
    return clickhouse_type(kind)  # {"type": "long"} and the like


def record_type(record: str) -> str:
    """The ClickHouse tuple type of the newest schema of ``record`` that ClickHouse can write."""
    return clickhouse_type(replay_schema(record).schema)


@cache
def replay_schema(record: str) -> SchemaVersion:
    """The newest shipped version of ``record`` whose Avro ClickHouse can write. Span v3's attribute values
    are a union of string, long, double and boolean, which ClickHouse's Avro output cannot write: replays
    send span batches as SpanBatch v2 (attribute values as text), which every consumer reads."""
    for version in reversed(shipped_schemas()[record]):
        try:
            clickhouse_type(version.schema)
        except ValueError:
            continue
        return version
    raise ValueError(f"no shipped version of {record} has a ClickHouse type")


def encode_body(version: SchemaVersion, record: dict[str, Any]) -> bytes:
    """The Avro body of ``record`` under ``version`` (no framing)."""
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, version.parsed, record)
    return buffer.getvalue()


def new_marker() -> bytes:
    return secrets.token_bytes(MARKER_BYTES)


def avro_long(data: bytes, position: int) -> tuple[int, int]:
    """A zig-zag varint (Avro int/long) at ``position``: its value and the position after it."""
    shift = result = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (result >> 1) ^ -(result & 1), position
        shift += 7


@dataclass(frozen=True)
class EncodedRow:
    """One row of the replay query: a framed ``SpanBatch`` (``topic`` spans) or ``Reward`` message."""

    time_us: int
    topic: str
    key: bytes
    value: bytes
    events: int


class _Input:
    """Buffered exact reads from a response body (anything with ``read(n)``)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buffer = b""
        self.position = 0

    def _fill(self, needed: int) -> bool:
        """At least ``needed`` unread bytes buffered; False at the end of the input."""
        while len(self.buffer) - self.position < needed:
            chunk = self.stream.read(_READ_SIZE)
            if not chunk:
                return False
            self.buffer = self.buffer[self.position :] + chunk
            self.position = 0
        return True

    def at_end(self) -> bool:
        return not self._fill(1)

    def take(self, size: int) -> bytes:
        if not self._fill(size):
            raise ValueError(f"Avro output ends inside a block ({size} bytes wanted)")
        chunk = self.buffer[self.position : self.position + size]
        self.position += size
        return chunk

    def varint(self) -> int:
        self._fill(10)  # the longest varint; fewer near the end is fine
        value, self.position = avro_long(self.buffer, self.position)
        return value


def _inflate(codec_name: str, block: bytes) -> bytes:
    """A block's bytes uncompressed (ClickHouse compresses with snappy unless told otherwise)."""
    if codec_name == "null":
        return block
    if codec_name == "snappy":  # raw snappy, then the CRC-32 of the uncompressed bytes
        return bytes(cramjam.snappy.decompress_raw(block[:-4]))
    if codec_name == "deflate":
        return zlib.decompress(block, -15)
    if codec_name == "zstandard":
        return bytes(cramjam.zstd.decompress(block))
    raise ValueError(f"Avro output compressed with {codec_name!r}, which the replay cannot read")


def _header(data: _Input) -> tuple[dict[str, Any], str, bytes]:
    """The writer schema, compression codec and sync marker of an Avro container file's header."""
    if data.take(4) != _AVRO_MAGIC:
        raise ValueError("not an Avro container file (did the query run with FORMAT Avro?)")
    metadata = {}
    while count := data.varint():
        if count < 0:  # a block count followed by its byte size
            count = -count
            data.varint()
        for _ in range(count):
            key = data.take(data.varint())
            metadata[key] = data.take(data.varint())
    codec_name = metadata.get(b"avro.codec", b"null").decode()
    return json.loads(metadata[b"avro.schema"]), codec_name, data.take(16)


class RowReader:
    """The :class:`EncodedRow` of a replay query's Avro output, in the query's order, block by block."""

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self.headers = {
            "spans": SINGLE_OBJECT_MAGIC + replay_schema("SpanBatch").fingerprint,
            "rewards": SINGLE_OBJECT_MAGIC + replay_schema("Reward").fingerprint,
        }
        self.decoded_blocks = 0  # blocks cut by fastavro (the marker occurred in the data)

    def rows(self, stream: Any) -> Iterator[EncodedRow]:
        data = _Input(stream)
        if data.at_end():  # no rows: ClickHouse may send nothing at all
            return
        schema, codec_name, sync = _header(data)
        parsed = None
        while not data.at_end():
            count = data.varint()
            block = _inflate(codec_name, data.take(data.varint()))
            if data.take(16) != sync:
                raise ValueError("Avro output out of step: a block does not end with the file's sync marker")
            pieces = block.split(self.marker)
            if pieces[0] == b"" and len(pieces) == count + 1:
                yield from map(self._cut, pieces[1:])
            else:
                parsed = parsed or fastavro.parse_schema(schema)
                yield from self._decoded(parsed, block, count)

    def _cut(self, piece: bytes) -> EncodedRow:
        time_us, position = avro_long(piece, 0)
        events, position = avro_long(piece, position)
        key_size, position = avro_long(piece, position)
        key = piece[position : position + key_size]
        position += key_size
        if piece[position] == 2:  # batch present; the last byte is the reward's null
            return EncodedRow(time_us, "spans", key, self.headers["spans"] + piece[position + 1 : -1], events)
        return EncodedRow(time_us, "rewards", key, self.headers["rewards"] + piece[position + 2 :], events)

    def _decoded(self, parsed: Any, block: bytes, count: int) -> Iterator[EncodedRow]:
        self.decoded_blocks += 1
        body = io.BytesIO(block)
        for _ in range(count):
            row = fastavro.schemaless_reader(body, parsed, None)
            topic, record = ("spans", "SpanBatch") if row["batch"] is not None else ("rewards", "Reward")
            value = self.headers[topic] + encode_body(
                replay_schema(record), row["batch" if topic == "spans" else "reward"]
            )
            yield EncodedRow(row["time_us"], topic, row["rollout_id"].encode(), value, row["events"])
