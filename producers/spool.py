"""The on-disk spool: Kafka messages the broker could not take, kept in bounded segment files until it can;
and who owns a spool directory, so that the spool of a process that died is replayed by a live one.

Messages are appended to segment files in ``spool_dir``, one stream for messages of kept rollouts
(``*.kept.seg``) and one for sampled-out data (``*.out.seg``), so that when the spool exceeds
``spool_max_bytes`` the oldest sampled-out segment goes first, then the oldest kept one. A full disk is
treated the same way: the oldest segment makes room for the new message, and when there is none to
evict the new message is dropped. What is dropped is counted (messages, spans, bytes) and logged,
never silent, and writing never raises.

A directory belongs to the one process holding an exclusive ``flock`` on its ``.lock`` file; the kernel
releases it when that process ends, however it ends (SIGKILL included). :meth:`Spool.adopt` takes the
lock of another directory and, if it gets it (its owner is gone), moves its segments into this spool:
never do two live processes read one spool.

A segment is written by one process; a crash leaves at most a truncated last entry, which is
detected, counted as dropped and skipped. Entry layout (big endian)::

    u32 entry length | u16 topic length | topic | u16 key length | key | u32 spans | value
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("boltstream.spool")

_HEADER = struct.Struct(">I")
_SHORT = struct.Struct(">H")
_SEGMENT = re.compile(r"^(?P<seq>\d{12})\.(?P<kind>kept|out)\.seg(?P<open>\.open)?$")
LOCK_FILE = ".lock"
#: Write errors that mean "the disk is full": the spool makes room by dropping its oldest data.
_DISK_FULL = frozenset((errno.ENOSPC, errno.EDQUOT))
#: Seconds between two warnings about dropped data of the same cause (the counters say the rest).
DROP_LOG_INTERVAL = 10.0


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
    #: Writes the disk refused (full disk, I/O error); each one dropped a message or evicted a segment.
    write_failures: int = 0
    #: Messages moved in from the spools of processes that ended before they could send them.
    adopted_messages: int = 0


@dataclass
class Segment:
    path: Path
    seq: int
    kept: bool
    size: int
    messages: int
    spans: int


def lock_directory(directory: Path) -> int | None:
    """The descriptor of ``directory/.lock`` locked exclusively by this process, or None if a live process
    holds it (or the directory is going away).

    The lock is checked to still be the directory's lock file after it was taken: an adopter removes the
    lock file of a directory it emptied, and a process that opened that file just before must not
    believe it owns a directory nobody else will look at again.
    """
    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _close_descriptors(lock: int, open_segments: dict[bool, tuple[Segment, int]]) -> None:
    """Close a spool's lock and open segment files (the segments stay on disk for whoever comes next)."""
    for _, fd in open_segments.values():
        os.close(fd)
    open_segments.clear()
    os.close(lock)


@dataclass
class Spool:
    """A bounded, append-only spool of Kafka messages in ``directory``, owned by one process; thread-safe."""

    directory: Path
    max_bytes: int
    segment_bytes: int = 4 * 1024 * 1024
    stats: SpoolStats = field(default_factory=SpoolStats)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # a file, not a directory
            raise SpoolLocked(f"spool directory {self.directory} is not a directory") from None
        # One process per directory: the lock is held until this process exits.
        lock = lock_directory(self.directory)
        if lock is None:
            raise SpoolLocked(f"spool directory {self.directory} is in use by another process")
        # A segment is small next to the bound, so evicting one never throws away most of the spool.
        self.segment_bytes = max(1024, min(self.segment_bytes, self.max_bytes // 8))
        self._lock = threading.RLock()  # reading an adopted segment counts its corrupt entries
        self._closed: list[Segment] = []  # oldest first
        self._open: dict[bool, tuple[Segment, int]] = {}  # kept? -> (segment, file descriptor)
        self._next_seq = 0
        self._drop_logged_at: dict[str, float] = {}
        # A spool dropped without close() (a test, an abandoned producer) must not keep its directory
        # locked, nor its files open, for the rest of the process: the descriptors go with the object.
        self._release = weakref.finalize(self, _close_descriptors, lock, self._open)
        recovered = self._take_in(self.directory)
        if recovered:
            log.info("spool %s: recovered %d messages from an earlier run", self.directory, recovered)

    # -- writing ----------------------------------------------------------------------------
    def put(self, message: SpooledMessage) -> bool:
        """Append ``message``; drop the oldest data first if the bound would be exceeded or the disk is
        full. False if ``message`` itself was dropped (counted and logged); never raises."""
        data = message.encode()
        with self._lock:
            if len(data) > self.max_bytes:
                self._count_drop(1, message.spans, len(data), "a single message larger than spool_max_bytes")
                return False
            if not self._write(message.kept, data):
                self._count_drop(1, message.spans, len(data), "the spool's disk refused the write")
                return False
            segment, _ = self._open[message.kept]
            segment.messages += 1
            segment.spans += message.spans
            self.stats.messages += 1
            if segment.size >= self.segment_bytes:
                self._seal(message.kept)
            self._enforce_bound()
            return True

    def _write(self, kept: bool, data: bytes) -> bool:
        """Append ``data`` to the open segment; on a full disk, evict the oldest segment and try again."""
        while True:
            try:
                segment, fd = self._open_segment(kept)
                written = 0
                try:
                    while written < len(data):
                        written += os.write(fd, data[written:])
                except OSError:
                    if written:  # a partial entry would corrupt every entry after it
                        os.ftruncate(fd, segment.size)
                    raise
            except OSError as exc:
                self.stats.write_failures += 1
                if exc.errno in _DISK_FULL:
                    # The disk, not max_bytes, is the bound now: segments small next to what it holds, so
                    # the next eviction does not throw away most of the spool.
                    self.segment_bytes = max(1024, min(self.segment_bytes, self.stats.bytes // 8))
                    if self._evict_oldest(f"disk full ({exc.strerror})"):
                        continue
                self._log_drop_cause(f"cannot write the spool in {self.directory}: {exc}")
                return False
            segment.size += len(data)
            self.stats.bytes += len(data)
            return True

    def _open_segment(self, kept: bool) -> tuple[Segment, int]:
        if kept not in self._open:
            seq = self._next_seq
            path = self.directory / f"{seq:012d}.{'kept' if kept else 'out'}.seg.open"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            self._next_seq += 1
            self._open[kept] = (Segment(path, seq, kept, 0, 0, 0), fd)
        return self._open[kept]

    def _seal(self, kept: bool) -> None:
        segment, fd = self._open.pop(kept)
        os.close(fd)
        sealed = segment.path.with_name(segment.path.name.removesuffix(".open"))
        try:
            os.replace(segment.path, sealed)
            segment.path = sealed
        except OSError as exc:  # it is read under either name
            log.warning("spool segment %s keeps its name: %s", segment.path, exc)
        self._closed.append(segment)
        self._closed.sort(key=lambda s: s.seq)

    def _enforce_bound(self) -> None:
        while self.stats.bytes > self.max_bytes and self._evict_oldest("spool full"):
            pass

    def _evict_oldest(self, cause: str) -> bool:
        """Delete the oldest segment, sampled-out data first; False if there is nothing left to delete."""
        for kept in (False, True):
            open_segment = self._open.get(kept)
            if open_segment and open_segment[0].size and not any(s.kept == kept for s in self._closed):
                self._seal(kept)  # the data of its kind still being written is its oldest
            victim = next((s for s in self._closed if s.kept == kept), None)
            if victim is not None:
                break
        else:
            return False
        self._closed.remove(victim)
        victim.path.unlink(missing_ok=True)
        self.stats.bytes -= victim.size
        self.stats.messages -= victim.messages
        reason = "sampled-out data" if not victim.kept else "kept data"
        self._count_drop(victim.messages, victim.spans, victim.size, f"{cause}: dropped the oldest {reason}")
        return True

    def _count_drop(self, messages: int, spans: int, size: int, reason: str) -> None:
        self.stats.dropped_messages += messages
        self.stats.dropped_spans += spans
        self.stats.dropped_bytes += size
        if self._due_to_log(reason):
            log.warning(
                "%s (%d messages, %d spans, %d bytes); dropped so far: %d messages, %d spans",
                reason,
                messages,
                spans,
                size,
                self.stats.dropped_messages,
                self.stats.dropped_spans,
            )

    def _log_drop_cause(self, cause: str) -> None:
        if self._due_to_log(cause):
            log.error("%s", cause)

    def _due_to_log(self, reason: str) -> bool:
        """A full disk drops thousands of messages a second: say so once per cause and interval."""
        now = time.monotonic()
        if now - self._drop_logged_at.get(reason, -DROP_LOG_INTERVAL) < DROP_LOG_INTERVAL:
            return False
        self._drop_logged_at[reason] = now
        return True

    # -- reading ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.stats.messages

    def take_oldest(self) -> tuple[Segment, list[SpooledMessage]] | None:
        """Remove the oldest segment from the spool's accounting and return its messages.

        The file stays on disk until :meth:`release` (call it once every message was delivered or
        spooled again) or :meth:`give_back`, so a crash in between loses nothing.
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
        try:
            messages = list(self._read(segment))
        except OSError as exc:
            with self._lock:
                self._count_drop(segment.messages, segment.spans, segment.size, f"cannot read {segment.path}: {exc}")
            segment.path.unlink(missing_ok=True)
            return segment, []
        return segment, messages

    def release(self, segment: Segment) -> None:
        """Forget a segment taken with :meth:`take_oldest`: its messages are safe elsewhere."""
        segment.path.unlink(missing_ok=True)

    def give_back(self, segment: Segment) -> None:
        """Return a segment taken with :meth:`take_oldest`, untouched, to the head of the spool: none of its
        messages could be sent, and rewriting them would only wear the disk while the broker is away."""
        with self._lock:
            self._closed.insert(0, segment)
            self.stats.bytes += segment.size
            self.stats.messages += segment.messages
            self._enforce_bound()

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

    # -- taking over the spool of a process that is gone ------------------------------------
    def adopt(self, directory: Path, *, remove: bool, before_removal: Callable[[Path], None] | None = None) -> int:
        """Move the segments of the spool ``directory`` into this spool if no live process owns it, then
        delete the emptied directory if ``remove`` (after ``before_removal(directory)`` took what else it
        holds); the number of messages adopted (0 when its owner lives or it holds nothing)."""
        directory = Path(directory)
        lock = lock_directory(directory)
        if lock is None:
            return 0
        try:
            with self._lock:
                adopted = self._take_in(directory)
                self.stats.adopted_messages += adopted
                self._enforce_bound()
            if adopted:
                log.warning(
                    "spool %s: adopted %d messages left by an ended process in %s", self.directory, adopted, directory
                )
            if remove:  # its lock file goes first, while locked: see lock_directory
                if before_removal is not None:
                    before_removal(directory)
                (directory / LOCK_FILE).unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # something else lives there: leave it
                    directory.rmdir()
            return adopted
        finally:
            os.close(lock)

    def _take_in(self, directory: Path) -> int:
        """Account for the segments in ``directory`` (this spool's own, left by an earlier run, or another
        one's, moved here); the number of messages they hold."""
        taken = 0
        try:
            names = sorted(entry.name for entry in os.scandir(directory) if entry.is_file())
        except OSError:
            return 0
        for name in names:
            match = _SEGMENT.match(name)
            if not match:
                continue
            path = directory / name
            seq = int(match["seq"])
            if directory != self.directory:
                seq = self._next_seq
            target = self.directory / f"{seq:012d}.{match['kind']}.seg"
            try:
                os.replace(path, target)
                size = target.stat().st_size
            except OSError as exc:
                log.error("spool %s: cannot take over %s: %s", self.directory, path, exc)
                continue
            segment = Segment(target, seq, match["kind"] == "kept", size, 0, 0)
            messages = list(self._read(segment))
            segment.messages, segment.spans = len(messages), sum(m.spans for m in messages)
            self._closed.append(segment)
            self.stats.bytes += segment.size
            self.stats.messages += segment.messages
            self._next_seq = max(self._next_seq, seq + 1)
            taken += segment.messages
        self._closed.sort(key=lambda s: s.seq)
        return taken

    # -- ending -------------------------------------------------------------------------------
    def close(self) -> None:
        """Seal open segments and unlock the directory, so the next process using it picks them up."""
        with self._lock:
            for kept in list(self._open):
                self._seal(kept)
        self._release()

    def forget_after_fork(self) -> None:
        """In a forked child: close the descriptors inherited from the parent without unlocking anything,
        so the directory is the parent's alone (a child holding it would keep it from being adopted after
        the parent dies)."""
        self._release()
