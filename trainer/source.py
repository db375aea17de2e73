"""The trainer's input: TrainingSamples from Kafka, validated, admitted by staleness, grouped into batches.

Samples of one task (the Kafka key) are grouped until a group holds ``group_size`` samples; a batch is
``groups_per_step`` complete groups. Bad records (undecodable bytes, token ids outside the vocabulary,
logprobs that do not match the completion, a call whose token ids cannot be rebuilt) go to the dead-letter
topic with the reason. A sample the server returned no token ids for (``token_source`` ``retokenized``) gets
them from the policy's tokenizer here (:mod:`boltstream.trainer.retokenize`), counted in ``retokenized``. A sample whose
``model_version`` is more than ``max_staleness`` versions behind the trainer's policy is dropped and
counted, both when it arrives and while it waits in a group (the version moves on while it waits).

Policies: every policy's trainer reads the whole samples topic in its own consumer group
(``boltstream-trainer-<policy>``) and keeps only the samples the join tagged with its policy; the others
are counted as ``not_selected``, so a sample never trains a policy it was not selected for. A sample the join
tagged with no policy (written before policies existed) trains only a setup that configures none.

Offsets: the source reads its partitions by assignment (one trainer job owns the whole topic) and
never auto-commits. Its :meth:`SampleSource.state` is the next offset of every partition plus every
sample it holds but has not yet handed out; the trainer stores that state in its checkpoint and commits
the offsets to Kafka only once the checkpoint is on disk. On resume the state is restored exactly, so a
sample is neither lost nor trained twice.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from boltstream.infra.common.config import Settings
from boltstream.schemas.codec import CodecError, codec
from boltstream.schemas.dead_letters import dead_letter_of
from boltstream.trainer.policy import validate_sample
from boltstream.trainer.retokenize import RETOKENIZED, RetokenizeError, retokenize

_VERSION = re.compile(r"(\d+)$")


class SourceError(RuntimeError):
    """The samples topic cannot be read (missing topic, broker error)."""


def sample_version(model_version: str) -> int:
    """The integer weight version in a sample's ``model_version`` ("" = the base model, 0; "v3", "tiny@3" = 3)."""
    if model_version == "":
        return 0
    match = _VERSION.search(model_version)
    if match is None:
        raise ValueError(f"model_version {model_version!r} carries no version number")
    return int(match[1])


@dataclass
class Held:
    """A sample the source holds: where it came from, its bytes (for the checkpoint) and its decoded form."""

    partition: int
    offset: int
    value: bytes
    sample: dict[str, Any]
    version: int


@dataclass
class Counters:
    consumed: int = 0
    dropped_stale: int = 0
    rejected: int = 0
    dead_lettered: int = 0
    retokenized: int = 0
    not_selected: int = 0  # samples of other policies' agents

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class Batcher:
    """Groups held samples by task until complete, and hands out batches of complete groups."""

    group_size: int
    groups_per_step: int
    max_staleness: int
    filling: dict[str, list[Held]] = field(default_factory=dict)
    ready: deque[list[Held]] = field(default_factory=deque)

    def is_stale(self, version: int, policy_version: int) -> bool:
        return policy_version - version > self.max_staleness

    def add(self, held: Held) -> None:
        group = self.filling.setdefault(held.sample["task_id"], [])
        group.append(held)
        if len(group) == self.group_size:
            self.ready.append(self.filling.pop(held.sample["task_id"]))

    def take(self) -> list[Held] | None:
        if len(self.ready) < self.groups_per_step:
            return None
        return [held for _ in range(self.groups_per_step) for held in self.ready.popleft()]

    def drop_stale(self, policy_version: int) -> int:
        """Remove every held sample that became too stale; a ready group that loses one is refilled first."""
        held = self.held()
        self.filling, self.ready = {}, deque()
        dropped = 0
        for item in held:
            if self.is_stale(item.version, policy_version):
                dropped += 1
            else:
                self.add(item)
        return dropped

    def held(self) -> list[Held]:
        items = [h for group in self.ready for h in group] + [h for group in self.filling.values() for h in group]
        return sorted(items, key=lambda h: (h.partition, h.offset))


class SampleSource:
    """Kafka consumer of the samples topic, feeding a :class:`Batcher`."""

    def __init__(
        self,
        settings: Settings,
        *,
        vocab_size: int,
        admit: Callable[[dict[str, Any]], str | None],
        group_size: int,
        groups_per_step: int,
        worker: str = "trainer",
        tokenizer: Any = None,
    ) -> None:
        self.settings = settings
        self.topic = settings.topics.samples
        self.vocab_size = vocab_size
        self.admit = admit
        self.worker = worker
        self.tokenizer = tokenizer  # the policy's: builds the token ids of calls that came without them
        self.batcher = Batcher(group_size, groups_per_step, settings.trainer.max_staleness)
        self.policy = settings.trainer.model_name
        self.policies_configured = bool(settings.policies)
        self.counters = Counters()
        self.positions: dict[int, int] = {}
        self.consumer = Consumer(
            settings.kafka.consumer_config(
                **{
                    "group.id": f"boltstream-trainer-{settings.trainer.model_name}",
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "session.timeout.ms": settings.kafka.session_timeout_ms,
                    "heartbeat.interval.ms": 1000,
                }
            )
        )
        self.dlq = Producer(settings.kafka.client_config(**{"acks": "all", "enable.idempotence": True}))

    # -- position ---------------------------------------------------------------------------
    def start(self, state: dict[str, Any] | None = None) -> None:
        """Assign every partition at the checkpointed state, else at the committed offsets, else the beginning."""
        metadata = self.consumer.list_topics(self.topic, timeout=10)
        topic = metadata.topics.get(self.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise SourceError(
                f"samples topic {self.topic!r} is not available ({topic and topic.error}): start the stack"
            )
        partitions = sorted(topic.partitions)
        saved = {int(p): int(o) for p, o in (state or {}).get("positions", {}).items()}
        committed = self.consumer.committed([TopicPartition(self.topic, p) for p in partitions], timeout=10)
        start = {tp.partition: tp.offset if tp.offset >= 0 else OFFSET_BEGINNING for tp in committed}
        start.update(saved)
        self.positions = {p: o for p, o in start.items() if o >= 0}
        self.consumer.assign([TopicPartition(self.topic, p, start[p]) for p in partitions])
        if state:
            self.counters = Counters(**state.get("counters", {}))
            for partition, offset, value, version in state.get("held", []):
                held = Held(partition, offset, value, self._decode(value), version)
                self.batcher.add(held)

    def state(self) -> dict[str, Any]:
        """What a checkpoint must keep: next offsets, held samples (bytes) and counters."""
        return {
            "positions": dict(self.positions),
            "held": [(h.partition, h.offset, h.value, h.version) for h in self.batcher.held()],
            "counters": self.counters.as_dict(),
        }

    def commit(self, positions: dict[int, int]) -> None:
        """Commit checkpointed positions to Kafka (after the dead letters before them are delivered)."""
        self.flush_dead_letters()
        if positions:
            offsets = [TopicPartition(self.topic, p, o) for p, o in positions.items()]
            self.consumer.commit(offsets=offsets, asynchronous=False)

    # -- reading ----------------------------------------------------------------------------
    def next_batch(self, policy_version: int, timeout: float) -> list[dict[str, Any]] | None:
        """The next batch of samples, or None if none completed within ``timeout`` seconds."""
        self.counters.dropped_stale += self.batcher.drop_stale(policy_version)
        deadline = time.monotonic() + timeout
        while True:
            batch = self.batcher.take()
            if batch is not None:
                return [h.sample for h in batch]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            for message in self.consumer.consume(num_messages=500, timeout=min(remaining, 0.05)):
                self._receive(message, policy_version)

    def _receive(self, message, policy_version: int) -> None:
        if message.error() is not None:
            if message.error().code() == KafkaError._PARTITION_EOF:
                return
            raise SourceError(f"reading {self.topic}: {message.error()}")
        partition, offset, value = message.partition(), message.offset(), message.value() or b""
        self.positions[partition] = offset + 1
        self.counters.consumed += 1
        try:
            sample = codec("TrainingSample").decode(value)
            if not self.selected(sample):  # before retokenizing: another policy's tokenizer may differ
                self.counters.not_selected += 1
                return
            sample = self._with_token_ids(sample)
            reason = validate_sample(sample, self.vocab_size)
            version = sample_version(sample["model_version"])
        except RetokenizeError as exc:
            self._dead_letter(message, f"cannot rebuild the token ids: {exc}", "Untokenizable")
            return
        except (CodecError, ValueError) as exc:
            reason, sample, version = str(exc), None, 0
        if reason is not None:
            self._dead_letter(message, reason, "CodecError" if sample is None else "InvalidSample")
            return
        if sample["token_source"] == RETOKENIZED:
            self.counters.retokenized += 1
        rejection = self.admit(sample)
        if rejection is not None:
            self.counters.rejected += 1
        elif self.batcher.is_stale(version, policy_version):
            self.counters.dropped_stale += 1
        else:
            self.batcher.add(Held(partition, offset, value, sample, version))

    def _decode(self, value: bytes) -> dict[str, Any]:
        """A TrainingSample from its bytes, with token ids built by the policy's tokenizer if it came without."""
        return self._with_token_ids(codec("TrainingSample").decode(value))

    def _with_token_ids(self, sample: dict[str, Any]) -> dict[str, Any]:
        if sample["token_source"] != RETOKENIZED:
            return sample
        if self.tokenizer is None:
            raise RetokenizeError("this sample source was given no tokenizer")
        try:
            return retokenize(sample, self.tokenizer)
        except RetokenizeError:
            raise
        except Exception as exc:  # the tokenizer's chat template raises what its author wrote
            raise RetokenizeError(f"the chat template failed: {type(exc).__name__}: {exc}") from exc

    def selected(self, sample: dict[str, Any]) -> bool:
        """Whether the join selected ``sample`` for this trainer's policy."""
        if sample["policies"]:
            return self.policy in sample["policies"]
        return not self.policies_configured

    def _dead_letter(self, message, reason: str, error_type: str) -> None:
        self.counters.dead_lettered += 1
        record = dead_letter_of(message, worker=self.worker, reason=reason, error_type=error_type)
        self.dlq.produce(self.settings.topics.dlq, key=message.key(), value=codec("DeadLetter").encode(record))
        self.dlq.poll(0)

    def flush_dead_letters(self) -> None:
        if self.dlq.flush(self.settings.producer.flush_timeout) > 0:
            raise SourceError("dead letters could not be delivered; not committing past them")

    def close(self) -> None:
        self.flush_dead_letters()
        self.consumer.close()
