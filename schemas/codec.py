"""Avro encoding and decoding of every boltstream record, in both framings.

Two framings, told apart by their first bytes:

* Avro single-object encoding (default): ``C3 01`` + the 8-byte little-endian
  CRC-64-AVRO fingerprint of the writer schema + the Avro binary body. The
  fingerprint is resolved against every schema version shipped in
  ``schemas/avro/``, so no registry server is needed.
* Confluent framing: ``00`` + a 4-byte big-endian schema id + the body, with the
  writer schema fetched through confluent-kafka's ``SchemaRegistryClient``
  (``mock://`` URLs give its in-process test double).

Readers always decode into the newest shipped version of a record, so an older
writer's bytes come out with the newer fields at their defaults.

Every failure to decode raises :class:`CodecError` naming what was wrong.
"""

from __future__ import annotations

import io
import json
import re
import struct
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"
_SINGLE_OBJECT_HEADER = len(SINGLE_OBJECT_MAGIC) + 8
_CONFLUENT_HEADER = len(CONFLUENT_MAGIC) + 4
_FILE_NAME = re.compile(r"^(?P<record>[A-Za-z]+)\.v(?P<version>\d+)\.avsc$")

RECORDS = (
    "Span",
    "SpanBatch",
    "Reward",
    "Trajectory",
    "TrainingSample",
    "DeadLetter",
    "ModelUpdate",
    "PromptUpdate",
    "ServedVersion",
    "CanaryDecision",
    "RolloutTask",
)


def unsigned_varint(value: int) -> bytes:
    """LEB128: 7 bits a byte, low group first (Avro's varint body; also ClickHouse Native's lengths)."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def zigzag_varint(value: int) -> bytes:
    """Avro's encoding of an int or long: zig-zag, then varint."""
    return unsigned_varint((value << 1) ^ (value >> 63))


class CodecError(ValueError):
    """Bytes that cannot be decoded (or a record that cannot be encoded), with the reason."""


@dataclass(frozen=True)
class SchemaVersion:
    """One shipped ``.avsc`` file, parsed."""

    record: str
    version: int
    schema: dict[str, Any]  # as written in the file (JSON)
    parsed: Any  # fastavro's parsed form
    fingerprint: bytes  # CRC-64-AVRO of the parsing canonical form, 8 bytes little-endian

    @property
    def json(self) -> str:
        return json.dumps(self.schema)


def _parse(schema: dict[str, Any]) -> Any:
    # A fresh named-type namespace per file: versions redefine the same names.
    return parse_schema(schema, named_schemas={})


@cache
def shipped_schemas() -> dict[str, list[SchemaVersion]]:
    """Every shipped schema version, per record, oldest first."""
    found: dict[str, list[SchemaVersion]] = {}
    for entry in resources.files("boltstream.schemas").joinpath("avro").iterdir():
        match = _FILE_NAME.match(entry.name)
        if not match:
            continue
        schema = json.loads(entry.read_text())
        parsed = _parse(schema)
        fp_hex = fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")
        version = SchemaVersion(
            record=match["record"],
            version=int(match["version"]),
            schema=schema,
            parsed=parsed,
            # The spec writes the fingerprint little-endian; fastavro returns it big-endian hex.
            fingerprint=bytes.fromhex(fp_hex)[::-1],
        )
        found.setdefault(version.record, []).append(version)
    for versions in found.values():
        versions.sort(key=lambda v: v.version)
    return found


def latest(record: str) -> SchemaVersion:
    """The newest shipped version of ``record``."""
    try:
        return shipped_schemas()[record][-1]
    except KeyError:
        raise CodecError(f"unknown record type {record!r}; shipped: {sorted(shipped_schemas())}") from None


@cache
def _by_fingerprint() -> dict[bytes, SchemaVersion]:
    return {v.fingerprint: v for versions in shipped_schemas().values() for v in versions}


class AvroCodec:
    """Encoder/decoder for one record type.

    ``AvroCodec("Span")`` writes single-object encoded bytes with the newest
    ``Span`` schema. With ``registry_url`` (and ``subject``), it writes
    Confluent framing, registering the newest schema under ``subject``. It
    reads both framings either way (Confluent framing only if a registry is
    configured) and always returns dicts shaped by the newest schema.
    """

    def __init__(self, record: str, *, registry_url: str | None = None, subject: str | None = None) -> None:
        self.record = record
        self.reader = latest(record)
        self._registry = None
        self._schema_id: int | None = None
        self._writers_by_id: dict[int, Any] = {}
        if registry_url:
            from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

            self._registry = SchemaRegistryClient.new_client({"url": registry_url})  # mock:// → test double
            self._schema_id = self._registry.register_schema(
                subject or f"boltstream-{record}-value", Schema(self.reader.json, "AVRO")
            )
            self._writers_by_id[self._schema_id] = self.reader.parsed
        self._header = (
            CONFLUENT_MAGIC + struct.pack(">I", self._schema_id)
            if self._schema_id is not None
            else SINGLE_OBJECT_MAGIC + self.reader.fingerprint
        )

    # -- encoding -------------------------------------------------------------------------
    def encode(self, record: dict[str, Any]) -> bytes:
        """Frame and encode one record (a dict shaped by the newest schema)."""
        buffer = io.BytesIO()
        buffer.write(self._header)
        try:
            fastavro.schemaless_writer(buffer, self.reader.parsed, record)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise CodecError(f"cannot encode {self.record}: {exc}") from exc
        return buffer.getvalue()

    # -- decoding -------------------------------------------------------------------------
    def writer_schema(self, data: bytes) -> tuple[Any, int]:
        """The parsed writer schema of framed ``data`` and the offset where the body starts."""
        if data[:2] == SINGLE_OBJECT_MAGIC:
            if len(data) < _SINGLE_OBJECT_HEADER:
                raise CodecError(f"truncated single-object header: {len(data)} bytes, need {_SINGLE_OBJECT_HEADER}")
            writer = _by_fingerprint().get(bytes(data[2:_SINGLE_OBJECT_HEADER]))
            if writer is None:
                raise CodecError(
                    f"unknown schema fingerprint {bytes(data[2:10]).hex()}: not one of the shipped schemas"
                )
            if writer.record != self.record:
                raise CodecError(f"expected a {self.record} but the bytes hold a {writer.record} (v{writer.version})")
            return writer.parsed, _SINGLE_OBJECT_HEADER
        if data[:1] == CONFLUENT_MAGIC:
            if self._registry is None:
                raise CodecError("Confluent-framed bytes (magic 00) but no schema registry URL is configured")
            if len(data) < _CONFLUENT_HEADER:
                raise CodecError(f"truncated Confluent header: {len(data)} bytes, need {_CONFLUENT_HEADER}")
            (schema_id,) = struct.unpack(">I", data[1:_CONFLUENT_HEADER])
            return self._confluent_writer(schema_id), _CONFLUENT_HEADER
        raise CodecError(f"unknown magic bytes {bytes(data[:2]).hex() or '(empty)'}: expected c301 or 00")

    def _confluent_writer(self, schema_id: int) -> Any:
        writer = self._writers_by_id.get(schema_id)
        if writer is None:
            try:
                registered = self._registry.get_schema(schema_id)
            except Exception as exc:  # the client raises several types for "not found"
                raise CodecError(f"schema id {schema_id} not found in the registry: {exc}") from exc
            writer = _parse(json.loads(registered.schema_str))
            self._writers_by_id[schema_id] = writer
        return writer

    def decode(self, data: bytes) -> dict[str, Any]:
        """Decode framed bytes into a dict shaped by the newest schema; raise CodecError if impossible."""
        writer, body_start = self.writer_schema(data)
        stream = io.BytesIO(data)
        stream.seek(body_start)
        reader = None if writer is self.reader.parsed else self.reader.parsed
        try:
            record = fastavro.schemaless_reader(stream, writer, reader)
        except EOFError as exc:
            raise CodecError(f"truncated {self.record} body: {exc or 'ran out of bytes'}") from exc
        except Exception as exc:  # fastavro raises assorted types on corrupt bodies
            raise CodecError(f"corrupt {self.record} body: {type(exc).__name__}: {exc}") from exc
        if stream.tell() != len(data):
            raise CodecError(f"{len(data) - stream.tell()} trailing bytes after the {self.record} body")
        return record


@cache
def codec(record: str) -> AvroCodec:
    """The shared single-object codec of ``record`` (no registry)."""
    return AvroCodec(record)
