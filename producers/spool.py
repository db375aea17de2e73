"""The on-disk spool: Kafka messages the broker could not take, kept in bounded segment files until it can.

Messages are appended to segment files in ``spool_dir``, one stream for messages of kept rollouts
(``*.kept.seg``) and one for sampled-out data (``*.out.seg``), so that when the spool exceeds
``spool_max_bytes`` the oldest sampled-out segment goes first, then the oldest kept one. What is
dropped is counted (messages, spans, bytes) and logged, never silent.

A segment is written by one process; a crash leaves at most a truncated last entry, which is
detected, counted as dropped and skipped. Entry layout (big endian)::

    u32 entry length | u16 topic length | topic | u16 key length | key | u32 spans | value
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("boltstream.spool")

_HEADER = struct.Struct(">I")
_SHORT = struct.Struct(">H")
_SEGMENT = re.compile(r"^(?P<seq>\d{12})\.(?P<kind>kept|out)\.seg(?P<open>\.open)?$")


class SpoolLocked(RuntimeError):
    """Another live process owns this spool directory."""


@dataclass(frozen=True)
class SpooledMessage:
    """One Kafka message waiting in the spool."""

    topic: str
    key: bytes
    value: bytes
    spans: int  # spans inside (0 for a reward); what a drop of this message loses
    kept: bool = True  # False for sampled-out data, which is dropped first when the spool is full

    def encode(self) -> bytes:
        topic = self.topic.encode("utf-8")
        body = b"".join(
            (_SHORT.pack(len(topic)), topic, _SHORT.pack(len(self.key)), self.key, _HEADER.pack(self.spans), self.value)
        )
        return _HEADER.pack(len(body)) + body


@dataclass
class SpoolStats:
    """What the spool holds and what it had to drop."""

    bytes: int = 0
    messages: int = 0
    dropped_messages: int = 0
    dropped_spans: int = 0
    dropped_bytes: int = 0


@dataclass
class Segment:
    path: Path
    seq: int
    kept: bool
    size: int
    messages: int
    spans: int


@dataclass
class Spool:
    """A bounded, append-only spool of Kafka messages in ``directory``, owned by one process; thread-safe."""

    directory: Path
    max_bytes: int
    segment_bytes: int = 4 * 1024 * 1024
    stats: SpoolStats = field(default_factory=SpoolStats)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # One process per directory: the lock is held until this process exits.
        self._lock_file = (self.directory / ".lock").open("a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise SpoolLocked(f"spool directory {self.directory} is in use by another process") from None
        # A segment is small next to the bound, so evicting one never throws away most of the spool.
        self.segment_bytes = max(1024, min(self.segment_bytes, self.max_bytes // 8))
        self._lock = threading.Lock()
        self._closed: list[Segment] = []  # oldest first
        self._open: dict[bool, tuple[Segment, object]] = {}  # kept? -> (segment, file handle)
        self._next_seq = 0
        self._recover()

    # -- writing ----------------------------------------------------------------------------
    def put(self, message: SpooledMessage) -> None:
        """Append ``message``; drop the oldest data first if the bound would be exceeded."""
        data = message.encode()
        with self._lock:
            if len(data) > self.max_bytes:
                self._count_drop(1, message.spans, len(data), "a single message larger than spool_max_bytes")
                return
            segment, handle = self._open_segment(message.kept)
            handle.write(data)
            handle.flush()
            segment.size += len(data)
            segment.messages += 1
            segment.spans += message.spans
            self.stats.bytes += len(data)
            self.stats.messages += 1
            if segment.size >= self.segment_bytes:
                self._seal(message.kept)
            self._enforce_bound()

    def _open_segment(self, kept: bool) -> tuple[Segment, object]:
        if kept not in self._open:
            seq = self._next_seq
            self._next_seq += 1
            path = self.directory / f"{seq:012d}.{'kept' if kept else 'out'}.seg.open"
            handle = path.open("ab")
            self._open[kept] = (Segment(path, seq, kept, 0, 0, 0), handle)
        return self._open[kept]

    def _seal(self, kept: bool) -> None:
        segment, handle = self._open.pop(kept)
        handle.close()
        sealed = segment.path.with_name(segment.path.name.removesuffix(".open"))
        os.replace(segment.path, sealed)
        segment.path = sealed
        self._closed.append(segment)
        self._closed.sort(key=lambda s: s.seq)

    def _enforce_bound(self) -> None:
        while self.stats.bytes > self.max_bytes:
            victim = next((s for s in self._closed if not s.kept), None)
            if victim is None and False in self._open:  # sampled-out data still being written goes first
                self._seal(False)
                continue
            if victim is None:
                if not self._closed:  # everything is in the open segment: seal it so it can go
                    self._seal(True)
                victim = self._closed[0]
            self._closed.remove(victim)
            victim.path.unlink(missing_ok=True)
            self.stats.bytes -= victim.size
            self.stats.messages -= victim.messages
            reason = "sampled-out data" if not victim.kept else "kept data"
            self._count_drop(victim.messages, victim.spans, victim.size, f"spool full: dropped the oldest {reason}")

    def _count_drop(self, messages: int, spans: int, size: int, reason: str) -> None:
        self.stats.dropped_messages += messages
        self.stats.dropped_spans += spans
        self.stats.dropped_bytes += size
        log.warning(
            "%s (%d messages, %d spans, %d bytes); dropped so far: %d messages, %d spans",
            reason,
            messages,
            spans,
            size,
            self.stats.dropped_messages,
            self.stats.dropped_spans,
        )

    # -- reading ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.stats.messages

    def take_oldest(self) -> tuple[Segment, list[SpooledMessage]] | None:
        """Remove the oldest segment from the spool's accounting and return its messages.

        The file stays on disk until :meth:`release` (call it once every message was delivered or
        spooled again), so a crash in between loses nothing.
        """
        with self._lock:
            if not self._closed:
                if not self._open:
                    return None
                for kept in list(self._open):
                    self._seal(kept)
            segment = self._closed.pop(0)
            self.stats.bytes -= segment.size
            self.stats.messages -= segment.messages
        messages = list(self._read(segment))
        return segment, messages

    def release(self, segment: Segment) -> None:
        """Forget a segment taken with :meth:`take_oldest`: its messages are safe elsewhere."""
        segment.path.unlink(missing_ok=True)

    def _read(self, segment: Segment) -> Iterator[SpooledMessage]:
        data = segment.path.read_bytes()
        offset = 0
        while offset < len(data):
            try:
                (length,) = _HEADER.unpack_from(data, offset)
                body = data[offset + 4 : offset + 4 + length]
                if len(body) != length:
                    raise ValueError("truncated entry")
                (topic_len,) = _SHORT.unpack_from(body, 0)
                topic = body[2 : 2 + topic_len].decode("utf-8")
                at = 2 + topic_len
                (key_len,) = _SHORT.unpack_from(body, at)
                key = body[at + 2 : at + 2 + key_len]
                at += 2 + key_len
                (spans,) = _HEADER.unpack_from(body, at)
                yield SpooledMessage(topic, bytes(key), bytes(body[at + 4 :]), spans, segment.kept)
            except (struct.error, ValueError, UnicodeDecodeError) as exc:
                with self._lock:
                    self._count_drop(1, 0, len(data) - offset, f"corrupt spool entry in {segment.path.name} ({exc})")
                return
            offset += 4 + length

    def _recover(self) -> None:
        """Adopt segments left by an earlier process using the same directory."""
        for path in sorted(self.directory.iterdir()):
            match = _SEGMENT.match(path.name)
            if not match:
                continue
            if match["open"]:
                sealed = path.with_name(path.name.removesuffix(".open"))
                os.replace(path, sealed)
                path = sealed
            segment = Segment(path, int(match["seq"]), match["kind"] == "kept", path.stat().st_size, 0, 0)
            messages = list(self._read(segment))
            segment.messages, segment.spans = len(messages), sum(m.spans for m in messages)
            self._closed.append(segment)
            self.stats.bytes += segment.size
            self.stats.messages += segment.messages
            self._next_seq = max(self._next_seq, segment.seq + 1)
        self._closed.sort(key=lambda s: s.seq)
        if self._closed:
            log.info("spool %s: recovered %d messages from an earlier run", self.directory, self.stats.messages)

    def close(self) -> None:
        """Seal open segments and unlock the directory, so the next process using it picks them up."""
        with self._lock:
            for kept in list(self._open):
                self._seal(kept)
        self._lock_file.close()
