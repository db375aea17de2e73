"""Retention: acknowledged span and reward messages kept on disk, sent again to a broker that lost them.

A broker acknowledgement is only as durable as the broker. The embedded broker keeps its logs in memory:
``boltstream down`` snapshots them, but not what is acknowledged between the snapshot and the broker's
stop, and a crashed broker (SIGKILL) loses everything the archive and the join had not made durable yet.
So the SDK keeps every message the broker acknowledged for ``producer.retention`` seconds after the last
acknowledged message of the same rollout (a rollout is released whole, never in part, so a rollout sent
again is complete), and watches the broker's *incarnation*: every ``producer.broker_check_interval``
seconds it reads the cluster id from the broker's metadata (the local stack gives each broker start a new
one). When it changes, the broker may have lost what it acknowledged: the producer gets a new Kafka
client (the old one's idempotence state means nothing to the new broker) and everything retained goes to
the spool, which sends it oldest first. Consumers deduplicate: the archive's views by event id, the join
by event id per rollout (tests/faults/).

A new incarnation whose stack is still restoring its snapshot has no :data:`STACK_READY_TOPIC` yet; once
the SDK has seen that topic it waits for it on the next incarnation, holding new messages in the spool,
so that nothing is appended between the restored records. A broker that never had the topic (a Kafka
cluster of your own) is used as soon as it answers.

Retained messages are released only while the same incarnation is confirmed alive: an outage never ages
them out. The files live in ``<spool>/retained`` (one spool per time bucket); a restarted agent adopts
them and the incarnation last seen, so it replays too if the broker restarted meanwhile.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from boltstream.infra.common.config import Settings
from boltstream.infra.common.topics import STACK_READY_TOPIC
from boltstream.producers.spool import Spool, SpooledMessage

log = logging.getLogger("boltstream.retention")

#: The folder of a spool that holds its retained messages.
RETAINED = "retained"
#: Buckets per retention window: a bucket's files go once every rollout in it is older than the window.
BUCKETS_PER_WINDOW = 4
_INCARNATION_FILE = "incarnation.json"
#: Longest the SDK holds its messages back for a new incarnation's restore; then it sends anyway (a broker
#: that will never be marked ready, e.g. the stack's address now taken by a broker of another kind).
HOLD_LIMIT = 300.0


@dataclass
class _Bucket:
    spool: Spool
    opened: float  # monotonic time its first message was kept
    rollouts: set[bytes] = field(default_factory=set)


@dataclass
class RetentionStats:
    """What retention did: messages kept, replayed to a new broker incarnation, and dropped for room."""

    kept_messages: int = 0
    replayed_messages: int = 0
    new_incarnations: int = 0
    #: Messages dropped because the retained bytes exceeded ``producer.retention_max_bytes``.
    dropped_messages: int = 0


class Retention:
    """The retained messages of one producer and the watcher of its broker's incarnation."""

    def __init__(self, settings: Settings, directory: Path) -> None:
        config = settings.producer
        self.window = config.retention
        self.max_bytes = config.retention_max_bytes
        self.directory = Path(directory)
        self.stats = RetentionStats()
        self._bucket_seconds = max(0.05, self.window / BUCKETS_PER_WINDOW)
        self._buckets: list[_Bucket] = []
        self._last_ack: dict[bytes, float] = {}  # rollout key -> monotonic time of its last acknowledged message
        self._lock = threading.Lock()
        self._cluster_id: str | None = None
        self._ready_seen = False
        self._confirmed_at = 0.0  # monotonic time the known incarnation last answered
        self._expired_at = 0.0  # the confirmation the last expiry went by
        self._replay_due = False
        #: True while the broker is a new incarnation that the stack is still restoring: send nothing.
        self.holding = False
        self._holding_since = 0.0
        self._bootstrap = settings.kafka.bootstrap_servers
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        if not self.window:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._adopt()
        self._admin_config = settings.kafka.client_config(
            **{"log.connection.close": False, "log_level": 2, "allow.auto.create.topics": False}
        )
        self._interval = config.broker_check_interval
        self._watcher = threading.Thread(target=self._watch, name="boltstream-broker-watch", daemon=True)
        self._watcher.start()

    # -- the producer's side ----------------------------------------------------------------
    def keep(self, message: SpooledMessage) -> None:
        """Retain ``message``, which the broker just acknowledged (called on the producer's thread)."""
        if not self.window:
            return
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets[-1] if self._buckets else None
            if bucket is None or now - bucket.opened >= self._bucket_seconds:
                bucket = self._open_bucket(now)
            bucket.spool.put(message)
            bucket.rollouts.add(message.key)
            self._last_ack[message.key] = now
            self.stats.kept_messages += 1
            self._enforce_bound()

    def replay_due(self) -> list[SpooledMessage] | None:
        """Once the broker turned out to be a new incarnation: every retained message, oldest first, now
        forgotten here (send them again; their acknowledgements retain them anew). Otherwise None, after
        releasing what is older than the window."""
        if not self.window:
            return None
        if not self._replay_due:
            self._expire()
            return None
        with self._lock:
            self._replay_due = False
            buckets, self._buckets, self._last_ack = self._buckets, [], {}
        messages = []
        for bucket in buckets:
            while (taken := bucket.spool.take_oldest()) is not None:
                messages += taken[1]
            self._drop_bucket(bucket)
        self.stats.replayed_messages += len(messages)
        if messages:
            log.warning("the broker is a new incarnation; sending it the %d retained messages again", len(messages))
        return messages

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5.0)
        with self._lock:
            for bucket in self._buckets:
                bucket.spool.close()

    # -- buckets ----------------------------------------------------------------------------
    def _open_bucket(self, now: float) -> _Bucket:
        bucket = _Bucket(Spool(self._next_bucket_directory(), self.max_bytes), now)
        self._buckets.append(bucket)
        return bucket

    def _next_bucket_directory(self) -> Path:
        sequence = max((int(b.spool.directory.name) for b in self._buckets), default=-1) + 1
        return self.directory / f"{sequence:012d}"

    def adopt_from(self, retained: Path) -> int:
        """Take over what an ended sibling process retained in ``retained`` (its ``<spool>/retained``, whose
        spool this process just adopted), as if acknowledged just now, and remove that folder; the number
        of messages taken over."""
        taken = 0
        with self._lock:
            if self.window:
                now = time.monotonic()
                for path in sorted(p for p in retained.iterdir() if p.is_dir() and p.name.isdigit()):
                    target = self._next_bucket_directory()
                    path.rename(target)
                    bucket = _Bucket(Spool(target, self.max_bytes), now)
                    adopted = f"adopted:{target.name}".encode()
                    bucket.rollouts.add(adopted)
                    self._last_ack[adopted] = now
                    self._buckets.append(bucket)
                    taken += len(bucket.spool)
        shutil.rmtree(retained, ignore_errors=True)
        return taken

    def _adopt(self) -> None:
        """Take over what an earlier process of this spool retained, as if acknowledged just now."""
        try:
            known = json.loads((self.directory / _INCARNATION_FILE).read_text())
            if known["bootstrap_servers"] == self._bootstrap:  # what was learnt of another broker does not count
                self._cluster_id, self._ready_seen = known["cluster_id"], bool(known["ready_seen"])
        except (OSError, ValueError, KeyError):
            pass
        now = time.monotonic()
        for path in sorted(p for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit()):
            bucket = _Bucket(Spool(path, self.max_bytes), now)
            if len(bucket.spool):
                # Its rollouts are unknown until read: it stands for one, acknowledged now.
                adopted = f"adopted:{path.name}".encode()
                bucket.rollouts.add(adopted)
                self._last_ack[adopted] = now
                self._buckets.append(bucket)
            else:
                self._drop_bucket(bucket)

    def _expire(self) -> None:
        """Release buckets whose rollouts all had their last acknowledgement ``window`` before the known
        incarnation last answered (an outage stops the clock)."""
        if self._confirmed_at == self._expired_at:
            return  # nothing new learnt since the last look
        self._expired_at = self._confirmed_at
        horizon = self._confirmed_at - self.window
        with self._lock:
            while self._buckets:
                oldest = self._buckets[0]
                if any(self._last_ack.get(key, 0.0) > horizon for key in oldest.rollouts):
                    return
                self._buckets.pop(0)
                newer = {key for bucket in self._buckets for key in bucket.rollouts}
                for key in oldest.rollouts - newer:
                    self._last_ack.pop(key, None)
                self._drop_bucket(oldest)

    def _enforce_bound(self) -> None:
        while len(self._buckets) > 1 and sum(b.spool.stats.bytes for b in self._buckets) > self.max_bytes:
            oldest = self._buckets.pop(0)
            dropped = len(oldest.spool)
            self.stats.dropped_messages += dropped
            log.warning(
                "retention full (producer.retention_max_bytes=%d): released %d acknowledged messages early; a "
                "broker crash now could lose them",
                self.max_bytes,
                dropped,
            )
            self._drop_bucket(oldest)

    def _drop_bucket(self, bucket: _Bucket) -> None:
        bucket.spool.close()
        shutil.rmtree(bucket.spool.directory, ignore_errors=True)

    # -- the watcher ------------------------------------------------------------------------
    def _watch(self) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient(self._admin_config)
        while not self._stop.wait(self._interval):
            try:
                metadata = admin.list_topics(STACK_READY_TOPIC, timeout=max(1.0, self._interval))
            except Exception:  # the broker is down or slow: nothing learnt, nothing released
                continue
            ready = (meta := metadata.topics.get(STACK_READY_TOPIC)) is not None and meta.error is None
            self.observe(metadata.cluster_id or "", ready)

    def observe(self, cluster_id: str, ready: bool) -> None:
        """What the broker's metadata said: its cluster id, and whether the stack marked it ready."""
        if not self.window:
            return
        if self._cluster_id is None or cluster_id == self._cluster_id:
            changed = self._cluster_id is None or (ready and not self._ready_seen)
            self._cluster_id, self._ready_seen = cluster_id, self._ready_seen or ready
            self._confirmed_at, self.holding = time.monotonic(), False
        elif ready or not self._ready_seen or (self.holding and time.monotonic() - self._holding_since > HOLD_LIMIT):
            log.warning("broker incarnation %s replaced %s", cluster_id, self._cluster_id)
            self._cluster_id, self._ready_seen = cluster_id, ready
            self._confirmed_at, self.holding = time.monotonic(), False
            self.stats.new_incarnations += 1
            self._replay_due = changed = True
        else:  # a new incarnation still restoring: hold everything back until it is marked ready
            if not self.holding:
                self.holding, self._holding_since = True, time.monotonic()
            return
        if changed:
            record = {"cluster_id": self._cluster_id, "ready_seen": self._ready_seen}
            record["bootstrap_servers"] = self._bootstrap
            (self.directory / _INCARNATION_FILE).write_text(json.dumps(record))
