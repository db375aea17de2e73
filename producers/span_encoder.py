"""A specialised Avro encoder for the SpanProducer: SpanBatch v3 straight from pending spans, ~3x fastavro.

fastavro walks the schema for every field of every span; this encoder knows the SpanBatch v2 layout,
writes the rollout's ids once per batch, takes varints from tables and packs logprobs in one call;
only unusual ``llm`` sub-records (a missing field, a value of another type) are left to fastavro.
It writes exactly the bytes ``boltstream.schemas.codec.codec("SpanBatch")`` writes for SpanBatch v3 (a test
compares them), framed with the v3 fingerprint: if a newer SpanBatch version ships, readers still
resolve these bytes as v3. An attribute value is a union (string, long, double, boolean): a string's branch
index and length come from one table lookup, so all-string spans cost what they did in v2.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Sequence

import fastavro
from fastavro.schema import parse_schema

from boltstream.producers.pending_span import ATTRIBUTES, PendingSpan
from boltstream.schemas.codec import SINGLE_OBJECT_MAGIC, CodecError, shipped_schemas, unsigned_varint, zigzag_varint

VERSION = 3
_KINDS = ("rollout", "llm_call", "tool_call", "decision", "reward", "message", "exception", "object", "annotation")
_NULL, _SOME = b"\x00", b"\x02"  # union branch 0 (null) and 1 (the value)
_double = struct.Struct("<d").pack


_SMALL = [zigzag_varint(n) for n in range(1 << 14)]  # lengths, counts, sequence numbers: one lookup
# Timestamps (~2**51 µs) take 8 varint bytes, 8 turns of zigzag_varint's loop. Their zigzag value's low 28 bits
# are 4 bytes, each of 7 bits with the continuation bit set, taken 14 bits at a time from _LOW14; the
# bits above change every ~2 minutes, so their bytes come from a small cache.
_LOW14 = [bytes(((c & 0x7F) | 0x80, (c >> 7) | 0x80)) for c in range(1 << 14)]
_high_bytes: dict[int, bytes] = {}


_LAST = [bytes((c,)) for c in range(128)]


def _long(n: int) -> bytes:
    if 0 <= n < 16384:
        return _SMALL[n]
    if 0 < n < (1 << 20):  # token ids of large vocabularies: 3 bytes
        zigzag = n << 1
        return _LOW14[zigzag & 0x3FFF] + _LAST[zigzag >> 14]
    if n < (1 << 28) or n >= (1 << 62):  # the rare negative, mid-sized or huge value
        return zigzag_varint(n)
    zigzag = n << 1
    high = _high_bytes.get(zigzag >> 28)
    if high is None:
        if len(_high_bytes) > 4096:
            _high_bytes.clear()
        high = _high_bytes[zigzag >> 28] = unsigned_varint(zigzag >> 28)
    return _LOW14[zigzag & 0x3FFF] + _LOW14[(zigzag >> 14) & 0x3FFF] + high


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    size = len(raw)
    return (_SMALL[size] if size < 16384 else zigzag_varint(size)) + raw


def _int_array(values: Sequence[int]) -> bytes:
    """An Avro array of int/long: one block (count, items) and the closing 0, as fastavro writes it."""
    if len(values) == 0:  # len(), not truthiness: None must fail (fastavro then reports it), not pass as []
        return _NULL
    small = _SMALL  # the common case inline: a call per token id would cost more than the lookup
    return _long(len(values)) + b"".join([small[v] if 0 <= v < 16384 else _long(v) for v in values]) + _NULL


def _float_array(values: Sequence[float]) -> bytes:
    """An Avro array of float (4 bytes each), in one struct.pack."""
    if len(values) == 0:
        return _NULL
    return _long(len(values)) + struct.pack(f"<{len(values)}f", *values) + _NULL


_KIND_INDEX = {kind: _SMALL[index] for index, kind in enumerate((*_KINDS, "custom"))}
# An attribute value's union branch (0 string, 1 long, 2 double, 3 boolean) and, for a string, its length.
_STRING_VALUE = [b"\x00" + length for length in _SMALL]
_LONG_VALUE, _DOUBLE_VALUE = b"\x02", b"\x04"
_SMALL_LONG = [_LONG_VALUE + varint for varint in _SMALL]  # a long attribute value below 16384, its branch first
_BOOLEAN_VALUE = {True: b"\x06\x01", False: b"\x06\x00"}


def _typed_value(value: object) -> bytes:
    """An attribute value that is not a string: the producer's cleaning left only longs, floats and booleans."""
    kind = type(value)
    if kind is bool:
        return _BOOLEAN_VALUE[value]
    if kind is int:
        if not -(1 << 63) <= value < (1 << 63):
            raise ValueError(f"attribute value {value} is beyond 64 bits")
        return _LONG_VALUE + _long(value)
    if kind is float:
        return _DOUBLE_VALUE + _double(value)
    raise ValueError(f"attribute value of type {kind.__name__}: not a string, int, float or bool")


def _attributes_in_python(
    span: PendingSpan, parts: list[bytes], labels: dict[str, bytes], label: Callable[[str], bytes]
) -> None:
    """Append the attributes of ``span`` (key, value, ... from ATTRIBUTES) as the map's count and entries: what
    ``_attributes.encode_attributes`` does in C when it is not built."""
    if (len(span) - ATTRIBUTES) % 2:
        raise ValueError("an attribute key without its value")
    parts.append(_long((len(span) - ATTRIBUTES) // 2))
    attributes = iter(span[ATTRIBUTES:])
    string_value, small_long = _STRING_VALUE, _SMALL_LONG
    for key, value in zip(attributes, attributes, strict=True):  # one iterator twice: (key, value) pairs
        kind = type(value)
        if kind is str:
            raw = value.encode("utf-8")
            size = len(raw)
            head = string_value[size] if size < 16384 else b"\x00" + zigzag_varint(size)
            parts += (labels.get(key) or label(key), head, raw)
        elif kind is int and 0 <= value < 16384:  # counts, sizes, indexes: one lookup
            parts += (labels.get(key) or label(key), small_long[value])
        elif kind is float:
            parts += (labels.get(key) or label(key), _DOUBLE_VALUE, _double(value))
        else:
            parts += (labels.get(key) or label(key), _typed_value(value))


try:  # the same in C (producers/_attributes.c); optional like the other extensions
    from boltstream.producers._attributes import encode_attributes
except ImportError:  # installed without a C compiler
    encode_attributes = None


class SpanBatchEncoder:
    """Encodes one rollout's cleaned pending spans as a framed SpanBatch v3 message."""

    def __init__(self) -> None:
        version = next(v for v in shipped_schemas()["SpanBatch"] if v.version == VERSION)
        self.header = SINGLE_OBJECT_MAGIC + version.fingerprint
        span_fields = version.schema["fields"][3]["type"]["items"]["fields"]
        llm_record = next(f for f in span_fields if f["name"] == "llm")["type"][1]
        self._llm_schema = parse_schema(llm_record, named_schemas={})
        self._labels: dict[str, bytes] = {}

    def encode(self, rollout_id: str, producer_id: str, sent_at_us: int, spans: Sequence[PendingSpan]) -> bytes:
        """``spans`` are pending spans whose error, attributes and llm are already cleaned."""
        try:
            parts = [self.header, _string(rollout_id), _string(producer_id), _long(sent_at_us)]
            if spans:  # an array is blocks of count + items, ended by a count of 0
                parts.append(_long(len(spans)))
                self._spans(spans, parts)
            parts.append(_NULL)
            return b"".join(parts)
        except (TypeError, ValueError, KeyError, AttributeError, UnicodeError, struct.error) as exc:
            raise CodecError(f"cannot encode SpanBatch: {type(exc).__name__}: {exc}") from exc

    def _label(self, text: str) -> bytes:
        """``_string(text)`` for the strings spans repeat (names, statuses, attribute keys, server ids)."""
        encoded = self._labels.get(text)
        if encoded is None:
            encoded = _string(text)
            if len(self._labels) >= 4096:  # bounded: a span name made of ids must not grow it forever
                self._labels.clear()
            self._labels[text] = encoded
        return encoded

    def _spans(self, spans: Sequence[PendingSpan], parts: list[bytes]) -> None:
        """Append each span's fields to ``parts``, in the schema's order.

        One loop, no call per span: the common fields come from lookups (varint tables, the label
        cache, the rollout's ids and the parent encoded once per batch); a string value is appended
        as its length and its UTF-8 bytes, not concatenated.
        """
        labels, label, small = self._labels, self._label, _SMALL
        heads: dict[tuple, bytes] = {}
        parents: dict[str | None, bytes] = {None: _NULL}  # most spans of a batch share a parent
        for span in spans:
            (  # the fields of boltstream.producers.pending_span, in its order: one unpacking, the fastest read
                event_id,
                rollout_id,
                attempt_id,
                task_id,
                agent_name,
                kind,
                name,
                parent,
                sequence,
                start,
                end,
                status,
                error,
                reward,
                llm,
                server,
            ) = span[:ATTRIBUTES]
            ids = (rollout_id, attempt_id, task_id, agent_name)
            head = heads.get(ids)
            if head is None:
                head = heads[ids] = b"".join([_string(text) for text in ids])
            parent_bytes = parents.get(parent)
            if parent_bytes is None:
                parent_bytes = parents[parent] = _SOME + _string(parent)
            start_bytes = _long(start)
            parts += (
                _string(event_id),
                head,
                _KIND_INDEX[kind],
                labels.get(name) or label(name),  # get() is None until the label is cached
                parent_bytes,
                small[sequence] if 0 <= sequence < 16384 else _long(sequence),
                start_bytes,
                start_bytes if end == start else _long(end),
                labels.get(status) or label(status),
                _NULL if error is None else _SOME + _string(error),
                _NULL if reward is None else _SOME + _double(reward),
            )
            if len(span) > ATTRIBUTES:  # the attributes: key, value, key, value, ...
                if encode_attributes is None:
                    _attributes_in_python(span, parts, labels, label)
                else:
                    parts.append(encode_attributes(span, ATTRIBUTES, labels))
            parts.append(_NULL)
            if llm is None:
                parts.append(_NULL)
            else:
                parts.append(_SOME)
                parts.append(self._llm(llm))
            parts.append(labels.get(server) or label(server))

    def _llm(self, llm: dict) -> bytes:
        """The ``llm`` sub-record. Token ids and logprobs dominate an llm_call span: the ids come from the
        varint tables, the logprobs from one struct.pack. Anything unusual (a missing field left to
        its default, a value of another type, a float beyond float32) goes through fastavro instead."""
        try:
            prompt_ids, completion_ids = llm["prompt_token_ids"], llm["completion_token_ids"]
            logprobs = llm["completion_logprobs"]
            return b"".join(
                (
                    _string(llm["model"]),
                    _string(llm["model_version"]),
                    _int_array(prompt_ids),
                    _int_array(completion_ids),
                    _float_array(logprobs),
                    _string(llm["prompt_text"]),
                    _string(llm["completion_text"]),
                    _long(llm["prompt_tokens"]),
                    _long(llm["completion_tokens"]),
                    _double(llm["latency_ms"]),
                    _string(llm["finish_reason"]),
                )
            )
        except (KeyError, TypeError, AttributeError, IndexError, OverflowError, struct.error):
            buffer = io.BytesIO()
            fastavro.schemaless_writer(buffer, self._llm_schema, llm)
            return buffer.getvalue()
