"""The join's path through Avro that never turns token arrays into Python lists.

An llm_call span carries hundreds of prompt and completion token ids and completion logprobs.
Decoding them into Python ints and floats, and encoding them again into a TrainingSample, was about
half of the join's CPU, yet the join only moves them: their Avro encoding is the same in both records
(an array of zig-zag varints, an array of 4-byte little-endian floats). So the join keeps them as bytes:

* :func:`read_span_batch` decodes a SpanBatch as ``codec("SpanBatch").decode`` does, except that the
  three arrays of each ``llm`` come out as :class:`AvroArray` (count + canonical encoding). An int array
  is located by its terminator bytes (every varint ends at its first byte below 0x80) with C-speed
  ``bytes`` methods, not a Python loop per item. Bytes of an older SpanBatch writer schema go through
  the general codec, and their arrays are encoded once;
* :func:`encode_training_sample` writes a TrainingSample whose arrays are AvroArray by concatenation:
  byte for byte what ``codec("TrainingSample").encode`` writes for the same values as lists.

Stricter than fastavro on bytes the Avro spec calls invalid, which fastavro reads by wrapping around:
a varint beyond 64 bits, a negative enum or union index, and an ``int`` array item beyond 32 bits (no
tokenizer or trainer could use it) are each a :class:`~boltstream.schemas.codec.CodecError`.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from typing import Any, NamedTuple

import fastavro
from fastavro.schema import parse_schema

from boltstream.schemas.codec import SINGLE_OBJECT_MAGIC, CodecError, codec, latest, shipped_schemas, zigzag_varint

SPAN_BATCH_VERSION = 3  # the writer version read here without the general codec
TRAINING_SAMPLE_VERSION = 2  # the version encode_training_sample writes


def _span_kinds() -> tuple[str, ...]:
    """The SpanKind symbols of the SpanBatch version read here, in index order."""
    version = next(v for v in shipped_schemas()["SpanBatch"] if v.version == SPAN_BATCH_VERSION)
    span_fields = version.schema["fields"][3]["type"]["items"]["fields"]
    return tuple(next(f for f in span_fields if f["name"] == "kind")["type"]["symbols"])


_KINDS = _span_kinds()
_KIND_BY_BYTE = {index << 1: kind for index, kind in enumerate(_KINDS)}  # canonical one-byte enum indexes
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1
_double = struct.Struct("<d")
_SMALL = [zigzag_varint(n) for n in range(1 << 14)]
# bytes.translate tables. Every varint ends at its first byte below 0x80 (a terminator): _TERMINATORS maps
# terminators to 0 and continuation bytes to 1, so that counting and finding zeros walks varints in C.
_TERMINATORS = bytes(0 if b < 0x80 else 1 for b in range(256))
# A float32's exponent is all ones (NaN or infinity) only if its high byte is 0x7F or 0xFF.
_NOT_MAX_EXPONENT = bytes(b for b in range(256) if b & 0x7F != 0x7F)


class AvroArray(NamedTuple):
    """An Avro array of int or float, kept as its canonical encoding: one block of ``count`` items, then 0
    (just 0 when empty), which is how fastavro writes it."""

    count: int
    encoded: bytes

    @classmethod
    def of_ints(cls, values: Iterable[int]) -> AvroArray:
        values = list(values)
        for value in values:
            if not _INT_MIN <= value <= _INT_MAX:
                raise CodecError(f"{value} is out of the Avro int range")
        if not values:
            return _EMPTY
        return cls(len(values), _long(len(values)) + b"".join(map(_long, values)) + b"\x00")

    @classmethod
    def of_floats(cls, values: Iterable[float]) -> AvroArray:
        values = list(values)
        if not values:
            return _EMPTY
        try:
            items = struct.pack(f"<{len(values)}f", *values)
        except (struct.error, OverflowError) as exc:
            raise CodecError(f"cannot encode float array: {exc}") from exc
        return cls(len(values), _long(len(values)) + items + b"\x00")

    @classmethod
    def from_encoded(cls, encoded: bytes) -> AvroArray:
        """Wrap a canonical encoding (as written by this module), reading its count."""
        count, _ = _read_long(encoded, 0) if encoded else (0, 0)
        return cls(count, encoded)

    def ints(self) -> list[int]:
        return fastavro.schemaless_reader(io.BytesIO(self.encoded), _array_schema("int"), None)

    def floats(self) -> list[float]:
        return fastavro.schemaless_reader(io.BytesIO(self.encoded), _array_schema("float"), None)

    def floats_finite(self) -> bool:
        """True unless a float item is NaN or infinite (for float arrays)."""
        items = self.encoded[len(self.encoded) - 1 - 4 * self.count : -1]
        if not items[3::4].translate(None, _NOT_MAX_EXPONENT):  # the common case, decided in C
            return True
        return all(map(math.isfinite, struct.unpack(f"<{self.count}f", items)))


_EMPTY = AvroArray(0, b"\x00")


@cache
def _array_schema(items: str) -> Any:
    return parse_schema({"type": "array", "items": items})


def _long(value: int) -> bytes:
    return _SMALL[value] if 0 <= value < 16384 else zigzag_varint(value)


# -- reading -------------------------------------------------------------------------------------------
def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    """The zig-zag varint at ``pos``: (value, position after it). IndexError if the bytes end first."""
    byte = data[pos]
    if byte < 0x80:
        return (byte >> 1) ^ -(byte & 1), pos + 1
    word = int.from_bytes(data[pos : pos + 8], "little")
    if word & 0x8080808080808080 == 0x0080808080808080:
        # Eight bytes, as every timestamp in microseconds takes: their 7-bit groups are joined by three
        # rounds of masks and shifts instead of a turn of the loop below per byte. (Had the data ended
        # inside these bytes, the position returned is past its end, which read_span_batch rejects.)
        word &= 0x7F7F7F7F7F7F7F7F
        word = (word & 0x007F007F007F007F) | ((word & 0x7F007F007F007F00) >> 1)
        word = (word & 0x00003FFF00003FFF) | ((word & 0x3FFF00003FFF0000) >> 2)
        word = (word & 0x000000000FFFFFFF) | ((word & 0x0FFFFFFF00000000) >> 4)
        return (word >> 1) ^ -(word & 1), pos + 8
    value, shift = byte & 0x7F, 7
    while True:
        pos += 1
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >> 64:
                raise CodecError("varint beyond 64 bits")
            return (value >> 1) ^ -(value & 1), pos + 1
        shift += 7
        if shift > 63:
            raise CodecError("varint beyond 64 bits")


def _read_string(data: bytes, pos: int) -> tuple[str, int]:
    """The string at ``pos`` and the position after it; that position is past the end of ``data`` if the
    string is cut short, which read_span_batch rejects (every read after it fails, or the final check)."""
    size = data[pos]
    if size < 0x80 and not size & 1:  # a canonical one-byte length (zig-zag: even bytes are >= 0)
        end = pos + 1 + (size >> 1)
        return data[pos + 1 : end].decode(), end
    size, pos = _read_long(data, pos)
    if size < 0:
        raise CodecError(f"negative string length {size}")
    return data[pos : pos + size].decode(), pos + size


def _varints_end(data: bytes, pos: int, count: int) -> tuple[int, bytes]:
    """Where ``count`` varints starting at ``pos`` end, without a Python loop per varint, and the mask of
    their continuation bytes (1) and terminators (0). The end is -1 if they do not end within 5 bytes each
    (the most an int takes, unless padded) or within the data."""
    mask = data[pos : pos + 5 * count].translate(_TERMINATORS)
    end = min(count, len(mask))  # at least a byte per varint
    found = end - mask.count(1, 0, end)
    if 0 < found < count:  # guess the rest from the bytes per varint so far, then walk the difference
        end = min(len(mask), end + (count - found) * end // found)
        found = end - mask.count(1, 0, end)
    while found < count:
        end = mask.find(0, end) + 1
        if end == 0:
            return -1, mask
        found += 1
    while found > count:
        end = mask.rfind(0, 0, end)
        found -= 1
    return pos + mask.rfind(0, 0, end) + 1, mask


def _read_int_array(data: bytes, pos: int) -> tuple[AvroArray, int]:
    start = pos
    count, pos = _read_long(data, pos)
    if count == 0:
        return _EMPTY, pos
    if abs(count) > len(data) - pos:
        raise CodecError(f"int array of {abs(count)} items is longer than the data")
    end, mask = _varints_end(data, pos, count) if count > 0 else (-1, b"")
    if end > 0:
        items = data[pos:end]
        # The usual shape (one block of canonical varints within the int range) is kept as it is. Only a
        # varint of 5 bytes or more (4 continuation bytes in a row) may be beyond the int range.
        if (
            data[end] == 0
            and data[pos - 1] != 0
            and not (b"\x00" in items and _has_padded_varint(items))
            and mask.find(b"\x01\x01\x01\x01", 0, end - pos) < 0
        ):
            return AvroArray(count, data[start : end + 1]), end + 1
    return _read_array_blocks(data, start, _read_ints)


def _has_padded_varint(items: bytes) -> bool:
    """True if a varint ends with a zero byte after continuation bytes (valid, but not canonical)."""
    at = items.find(0)
    while at > 0:
        if items[at - 1] >= 0x80:
            return True
        at = items.find(0, at + 1)
    return False


def _read_ints(data: bytes, pos: int, count: int) -> tuple[list[int], int]:
    values = []
    for _ in range(count):
        value, pos = _read_long(data, pos)
        values.append(value)
    return values, pos


def _read_floats(data: bytes, pos: int, count: int) -> tuple[list[float], int]:
    end = pos + 4 * count
    if end > len(data):
        raise CodecError(f"float array of {count} items runs past the end of the data")
    return list(struct.unpack_from(f"<{count}f", data, pos)), end


def _read_array_blocks(
    data: bytes, pos: int, read_items: Callable[[bytes, int, int], tuple[list, int]]
) -> tuple[AvroArray, int]:
    """The general array format (several blocks, negative counts followed by a byte size, padded varints):
    decoded item by item and encoded again canonically. Written so by other Avro libraries, rarely."""
    values: list = []
    while True:
        count, pos = _read_long(data, pos)
        if count == 0:
            break
        if count < 0:
            count = -count
            _, pos = _read_long(data, pos)  # the block's byte size
        if count > len(data) - pos:
            raise CodecError(f"array block of {count} items is longer than the data")
        items, pos = read_items(data, pos, count)
        values += items
    encode = AvroArray.of_ints if read_items is _read_ints else AvroArray.of_floats
    return encode(values), pos


def _read_float_array(data: bytes, pos: int) -> tuple[AvroArray, int]:
    start = pos
    count, pos = _read_long(data, pos)
    if count == 0:
        return _EMPTY, pos
    end = pos + 4 * count
    if count > 0 and end < len(data) and data[end] == 0 and data[pos - 1] != 0:
        return AvroArray(count, data[start : end + 1]), end + 1
    return _read_array_blocks(data, start, _read_floats)


def _read_llm(data: bytes, pos: int) -> tuple[dict[str, Any], int]:
    model, pos = _read_string(data, pos)
    model_version, pos = _read_string(data, pos)
    prompt_token_ids, pos = _read_int_array(data, pos)
    completion_token_ids, pos = _read_int_array(data, pos)
    completion_logprobs, pos = _read_float_array(data, pos)
    prompt_text, pos = _read_string(data, pos)
    completion_text, pos = _read_string(data, pos)
    prompt_tokens, pos = _read_long(data, pos)
    completion_tokens, pos = _read_long(data, pos)
    (latency_ms,) = _double.unpack_from(data, pos)
    finish_reason, pos = _read_string(data, pos + 8)
    return {
        "model": model,
        "model_version": model_version,
        "prompt_token_ids": prompt_token_ids,
        "completion_token_ids": completion_token_ids,
        "completion_logprobs": completion_logprobs,
        "prompt_text": prompt_text,
        "completion_text": completion_text,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "latency_ms": latency_ms,
        "finish_reason": finish_reason,
    }, pos


def _read_branch(data: bytes, pos: int, union: str) -> tuple[int, int]:
    """The branch index of a two-branch union at ``pos``: (0 or 1, position after it)."""
    byte = data[pos]
    if byte == 0 or byte == 2:  # how every encoder writes 0 and 1
        return byte >> 1, pos + 1
    index, pos = _read_long(data, pos)
    if index not in (0, 1):
        raise CodecError(f"union branch {index} of {union}")
    return index, pos


def _read_kind(data: bytes, pos: int) -> tuple[str, int]:
    index, pos = _read_long(data, pos)
    if not 0 <= index < len(_KINDS):
        raise CodecError(f"span kind index {index} is not a SpanKind symbol")
    return _KINDS[index], pos


def _read_optional_string(data: bytes, pos: int) -> tuple[str | None, int]:
    if data[pos] == 0:
        return None, pos + 1
    index, pos = _read_branch(data, pos, "[null, string]")
    return _read_string(data, pos) if index else (None, pos)


def _read_attributes(data: bytes, pos: int) -> tuple[dict[str, str | int | float | bool], int]:
    attributes = {}
    while True:
        # Block headers are read inline, as in _read_spans: this runs once per span, and a helper call per
        # header costs ~0.3 us a span (bench_token_arrays).
        count, pos = _read_long(data, pos)
        if count == 0:
            return attributes, pos
        if count < 0:
            count = -count
            _, pos = _read_long(data, pos)  # the block's byte size
        for _ in range(count):
            key, pos = _read_string(data, pos)
            branch = data[pos]  # the value's union branch, 0 string, 1 long, 2 double, 3 boolean: one byte
            if branch == 0:
                attributes[key], pos = _read_string(data, pos + 1)
                continue
            index, pos = (branch >> 1, pos + 1) if branch in (2, 4, 6) else _read_long(data, pos)
            if index == 1:
                attributes[key], pos = _read_long(data, pos)
            elif index == 2:
                (attributes[key],) = _double.unpack_from(data, pos)
                pos += 8
            elif index == 3:
                attributes[key], pos = data[pos] != 0, pos + 1  # any byte but 0 is true, as fastavro reads it
            elif index == 0:
                attributes[key], pos = _read_string(data, pos)
            else:
                raise CodecError(f"union branch {index} of attribute {key!r}: not string, long, double, boolean")


def _read_spans(data: bytes, pos: int) -> tuple[list[dict[str, Any]], int]:
    spans = []
    # The four ids after event_id are the same in every span of a batch (the SDK writes them so): when
    # their bytes repeat, their strings are reused instead of decoded again.
    ids_bytes, ids = b"\xff", ()
    read_string, read_long = _read_string, _read_long
    while True:
        count, pos = read_long(data, pos)
        if count == 0:
            return spans, pos
        if count < 0:
            count = -count
            _, pos = read_long(data, pos)  # the block's byte size
        for _ in range(count):
            event_id, pos = read_string(data, pos)
            if data.startswith(ids_bytes, pos):
                pos += len(ids_bytes)
            else:
                start = pos
                rollout_id, pos = read_string(data, pos)
                attempt_id, pos = read_string(data, pos)
                task_id, pos = read_string(data, pos)
                agent_name, pos = read_string(data, pos)
                ids_bytes, ids = data[start:pos], (rollout_id, attempt_id, task_id, agent_name)
            # The common one-byte cases are taken inline: a call per field would cost more than the field.
            kind = _KIND_BY_BYTE.get(data[pos])
            if kind is None:
                kind, pos = _read_kind(data, pos)
            else:
                pos += 1
            name, pos = read_string(data, pos)
            if data[pos] == 0:
                parent_id, pos = None, pos + 1
            else:
                parent_id, pos = _read_optional_string(data, pos)
            sequence = data[pos]
            if sequence < 0x80:
                sequence, pos = (sequence >> 1) ^ -(sequence & 1), pos + 1
            else:
                sequence, pos = read_long(data, pos)
            start_time_us, pos = read_long(data, pos)
            end_time_us, pos = read_long(data, pos)
            if data.startswith(b"\x04ok", pos):
                status, pos = "ok", pos + 3
            else:
                status, pos = read_string(data, pos)
            if data[pos] == 0:
                error, pos = None, pos + 1
            else:
                error, pos = _read_optional_string(data, pos)
            reward = llm = None
            if data[pos] == 0:
                pos += 1
            else:
                branch, pos = _read_branch(data, pos, "[null, double]")
                if branch:
                    (reward,) = _double.unpack_from(data, pos)
                    pos += 8
            attributes, pos = _read_attributes(data, pos)
            if data[pos] == 0:
                pos += 1
            else:
                branch, pos = _read_branch(data, pos, "[null, LlmCall]")
                if branch:
                    llm, pos = _read_llm(data, pos)
            server_id, pos = read_string(data, pos)
            spans.append(
                {
                    "event_id": event_id,
                    "rollout_id": ids[0],
                    "attempt_id": ids[1],
                    "task_id": ids[2],
                    "agent_name": ids[3],
                    "kind": kind,
                    "name": name,
                    "parent_id": parent_id,
                    "sequence": sequence,
                    "start_time_us": start_time_us,
                    "end_time_us": end_time_us,
                    "status": status,
                    "error": error,
                    "reward": reward,
                    "attributes": attributes,
                    "llm": llm,
                    "server_id": server_id,
                }
            )


@cache
def _fast_header() -> bytes | None:
    """The framing read here, or None once a newer SpanBatch ships (its fields' defaults are not known here)."""
    newest = latest("SpanBatch")
    return SINGLE_OBJECT_MAGIC + newest.fingerprint if newest.version == SPAN_BATCH_VERSION else None


def read_span_batch(data: bytes) -> dict[str, Any]:
    """Decode framed SpanBatch bytes like ``codec("SpanBatch").decode``, with each span's ``llm`` arrays
    (``prompt_token_ids``, ``completion_token_ids``, ``completion_logprobs``) as :class:`AvroArray`.

    Raises :class:`CodecError` for anything the general codec rejects, and for int items beyond 32 bits.
    """
    data = bytes(data)
    header = _fast_header()
    if header is None or not data.startswith(header):
        return _read_with_codec(data)
    try:
        rollout_id, pos = _read_string(data, len(header))
        producer_id, pos = _read_string(data, pos)
        sent_at_us, pos = _read_long(data, pos)
        spans, pos = _read_spans(data, pos)
    except CodecError:
        raise
    except IndexError:
        raise CodecError("truncated SpanBatch body: ran out of bytes") from None
    except (ValueError, struct.error) as exc:  # UnicodeDecodeError included
        raise CodecError(f"corrupt SpanBatch body: {type(exc).__name__}: {exc}") from exc
    if pos != len(data):
        raise CodecError(f"{len(data) - pos} trailing bytes after the SpanBatch body")
    return {"rollout_id": rollout_id, "producer_id": producer_id, "sent_at_us": sent_at_us, "spans": spans}


def _read_with_codec(data: bytes) -> dict[str, Any]:
    """Older writer versions (and framings) through the general codec; their arrays are encoded here."""
    return with_raw_arrays(codec("SpanBatch").decode(data))


def with_raw_arrays(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` as the general codec decodes it, its token arrays turned into :class:`AvroArray` in place:
    what :func:`read_span_batch` returns for the same bytes."""
    for span in batch["spans"]:
        llm = span["llm"]
        if llm is not None:
            llm["prompt_token_ids"] = AvroArray.of_ints(llm["prompt_token_ids"])
            llm["completion_token_ids"] = AvroArray.of_ints(llm["completion_token_ids"])
            llm["completion_logprobs"] = AvroArray.of_floats(llm["completion_logprobs"])
    return batch


# -- writing -------------------------------------------------------------------------------------------
@cache
def _training_sample_header() -> bytes:
    version = next(v for v in shipped_schemas()["TrainingSample"] if v.version == TRAINING_SAMPLE_VERSION)
    return SINGLE_OBJECT_MAGIC + version.fingerprint


def _string(text: str) -> bytes:
    raw = text.encode()
    return _long(len(raw)) + raw


def _strings(items: Sequence[str]) -> bytes:
    """An Avro array of strings: one block of all the items, then the empty block that ends it."""
    return (_long(len(items)) + b"".join(_string(item) for item in items) if items else b"") + b"\x00"


def encode_training_sample(sample: dict[str, Any]) -> bytes:
    """A framed TrainingSample (v2) from a dict whose three arrays are :class:`AvroArray`; ``token_source``,
    ``call_text`` and ``policies`` left out are the schema's defaults (server ids, no text, no policy).

    Byte for byte ``codec("TrainingSample").encode`` of the same dict with the arrays as lists. Raises
    :class:`CodecError` if a field is missing or of the wrong type.
    """
    try:
        return b"".join(
            (
                _training_sample_header(),
                _string(sample["sample_id"]),
                _string(sample["trajectory_id"]),
                _string(sample["rollout_id"]),
                _string(sample["task_id"]),
                _string(sample["agent_name"]),
                _string(sample["span_event_id"]),
                _long(sample["step_index"]),
                _long(sample["step_count"]),
                _string(sample["model"]),
                _string(sample["model_version"]),
                sample["prompt_token_ids"].encoded,
                sample["completion_token_ids"].encoded,
                sample["completion_logprobs"].encoded,
                _double.pack(sample["return_value"]),
                _double.pack(sample["final_reward"]),
                _string(sample["credit_policy"]),
                _long(sample["created_at_us"]),
                _string(sample.get("token_source", "server")),
                _string(sample.get("call_text", "")),
                _strings(sample.get("policies", ())),
            )
        )
    except (KeyError, TypeError, AttributeError, struct.error) as exc:
        raise CodecError(f"cannot encode TrainingSample: {type(exc).__name__}: {exc}") from exc
