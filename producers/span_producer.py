"""SpanProducer: moves spans from the agent's threads to Kafka without ever blocking or raising into them.

The agent's thread only appends a tuple to an in-memory deque. A background thread wakes every
``producer.linger`` seconds (or as soon as ``span_buffer_size`` spans wait), groups the pending spans
by rollout, cleans their attributes (:mod:`boltstream.producers.redaction`), encodes one ``SpanBatch`` per
rollout (:mod:`boltstream.producers.span_encoder`, byte-identical to :mod:`boltstream.schemas.codec`) and produces it
keyed by rollout_id (``acks=all``, idempotence on, compression on). Rewards sent with
:meth:`SpanProducer.send_reward` travel the same way to the rewards topic.

When the broker is unreachable or slow, messages whose delivery fails (after
``producer.delivery_timeout``) or that the client cannot queue spill to the on-disk
:class:`~boltstream.producers.spool.Spool`; while the broker is unhealthy new messages go straight to the spool
and the oldest spooled segment is retried as a probe, at most every ``RETRY_BACKOFF_MAX`` seconds (the
wait doubles from ``RETRY_BACKOFF_MIN`` after each failed probe): an outage of any length costs a few
wake-ups a second, not a core. A probe that fails as a whole goes back to the spool untouched. Once a
delivery succeeds the spool drains oldest first. A message retried from the spool may reach Kafka twice
if its first acknowledgement was lost: consumers deduplicate on the span's ``event_id``.

Errors that leave the Kafka client's idempotence state unusable (``PRODUCER_FENCED`` and its kin, e.g.
after a broker stall longer than ``delivery_timeout``: librdkafka then bumps the producer epoch, which a
broker that does not support the bump fences for good) and fatal client errors replace the client; what
it held is spooled and replayed by the new one. Every few seconds the producer also adopts the spools
of ended processes of the same program (see :func:`_open_spool`).

With no broker configured (``kafka.bootstrap_servers`` empty and no local stack's ``<home>/stack.json``) the
producer starts anyway, says so once, and spools every message (bounded by ``producer.spool_max_bytes``,
drops counted); it looks for the state file every ``BROKER_LOOK_INTERVAL`` seconds, and once ``boltstream up``
wrote one it connects and the spool drains. If the agent ends first, the next run of the same program that
has a broker adopts the spool. A message larger than
``kafka.max_message_bytes`` is refused here (counted, logged once, dead-lettered without its value).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import math
import operator
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from boltstream.infra.common.config import ConfigError, Settings, fill_from_stack
from boltstream.infra.common.contract import keep_rollout
from boltstream.producers.pending_span import ATTRIBUTES, ERROR, LLM, REWARD, ROLLOUT_ID, SERVER_ID, PendingSpan
from boltstream.producers.redaction import Redactor, strings_if_wire_scalars
from boltstream.producers.retention import RETAINED, Retention
from boltstream.producers.span_encoder import SpanBatchEncoder
from boltstream.producers.spool import Segment, Spool, SpooledMessage, SpoolLocked
from boltstream.schemas.codec import CodecError, codec
from boltstream.schemas.dead_letters import dead_letter

log = logging.getLogger("boltstream.producer")

#: Seconds the background thread sleeps at most while there is nothing to send.
IDLE_TICK = 1.0
_rollout_id = operator.itemgetter(ROLLOUT_ID)
#: What librdkafka adds to key and value when it checks a message against ``message.max.bytes`` (the
#: largest record framing; measured: ``produce()`` refuses key + value + 36 > message.max.bytes).
RECORD_OVERHEAD = 36
#: Seconds before the first probe of a broker that stopped answering; doubled after every failed probe.
RETRY_BACKOFF_MIN = 0.25
#: Longest wait between two probes (or client replacements) while the broker is away.
RETRY_BACKOFF_MAX = 5.0
#: Seconds between two looks for a local stack's broker while none is configured (see _look_for_broker).
BROKER_LOOK_INTERVAL = 2.0
#: Seconds between two looks for spools left behind by ended processes of the same program.
ADOPT_INTERVAL = 5.0
#: Names of the spools of a program's other processes inside its spool directory (see _open_spool).
_SIBLING_SPOOL = re.compile(r"^\d+(-[0-9a-f]{8})?$")
#: The ``worker`` of the dead letters the SDK writes (refused messages).
SDK_WORKER = "boltstream-sdk"
#: Delivery errors that retrying cannot fix: the message is dropped (counted, logged), not spooled.
_PERMANENT_ERRORS = frozenset((KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG, KafkaError.INVALID_RECORD))
#: Errors after which the client's producer id and epoch are of no use: the client is replaced.
_CLIENT_STATE_ERRORS = frozenset(
    (
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.INVALID_PRODUCER_ID_MAPPING,
    )
)

DeliveryListener = Callable[[str, bytes, "KafkaError | None"], None]


@dataclass
class ProducerStats:
    """Counters of one SpanProducer; ``dropped_*`` say what was lost and why, never silently."""

    spans_appended: int = 0
    spans_delivered: int = 0
    batches_delivered: int = 0
    rewards_delivered: int = 0
    messages_spooled: int = 0
    spans_spooled: int = 0
    #: Spans dropped because more than ``max_pending_spans`` waited in memory.
    dropped_pending_spans: int = 0
    #: Spans that could not be encoded (a bug or a value Avro rejects), logged with the reason.
    dropped_unencodable_spans: int = 0
    #: Spans in messages the broker refuses for good (an invalid record), logged.
    dropped_undeliverable_spans: int = 0
    #: Spans refused because their message exceeds ``kafka.max_message_bytes`` (a single span too big to
    #: send alone); each is dead-lettered without its value, the first is logged.
    dropped_oversized_spans: int = 0
    #: Rewards that could not be encoded or exceed ``kafka.max_message_bytes``, logged.
    dropped_rewards: int = 0
    #: Dead letters of refused messages the broker acknowledged.
    dead_letters_delivered: int = 0
    delivery_failures: int = 0
    #: Kafka clients replaced after a fatal error or a fenced producer id.
    client_replacements: int = 0


@dataclass(slots=True)
class _Outgoing:
    """A message for Kafka; it is its own delivery callback, so a message in flight is one object for the
    garbage collector to scan, not four (a lambda, its closure cell and defaults, the message)."""

    topic: str
    key: bytes
    value: bytes
    spans: int  # spans in the message, 0 for a reward
    kept: bool
    replay: _Replay | None = None  # the replay of the spool segment it was read from, if any
    report: Callable[[_Outgoing, KafkaError | None], None] | None = None  # set when produced

    def __call__(self, error: KafkaError | None, _message: object) -> None:
        self.report(self, error)


@dataclass(slots=True)
class _Replay:
    """A spool segment being sent again: how many of its messages await an outcome, which failed."""

    segment: Segment
    waiting: int
    failed: list[_Outgoing]
    #: One of its messages was delivered or dropped for good: the segment cannot go back as it is.
    changed: bool = False


class SpanProducer:
    """Batches spans per rollout and produces them to the spans topic from a background thread."""

    def __init__(
        self,
        settings: Settings,
        *,
        producer_id: str | None = None,
        on_delivery: DeliveryListener | None = None,
    ) -> None:
        self.settings = settings
        config = settings.producer
        self.producer_id = producer_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stats = ProducerStats()
        self._on_delivery = on_delivery
        self._redactor = Redactor(config.redact_patterns, config.max_attribute_bytes)
        self._encoder = SpanBatchEncoder()
        self._reward_codec = codec("Reward")
        self._dead_letter_codec = codec("DeadLetter")
        self._max_message_bytes = settings.kafka.max_message_bytes
        self._oversize_logged = False
        self._spool, self._spool_family = _open_spool(settings)
        self._kafka: Producer | None = None  # None until a broker is configured (see _look_for_broker)
        self._client_config: dict[str, Any] = {}
        # Until then a stand-in that retains nothing: nothing is acknowledged, nothing needs sending again.
        self._retention = Retention(
            replace(settings, producer=replace(config, retention=0.0)), self._spool.directory / RETAINED
        )
        self._next_broker_look = 0.0
        if settings.kafka.bootstrap_servers:
            try:
                self._connect(settings)
            except ConfigError as exc:  # e.g. SASL without a password: spool for a run whose settings work
                self._next_broker_look = math.inf  # the stack's state file cannot mend these settings
                log.warning(
                    "boltstream: the broker settings cannot be used (%s): spans are kept on disk in %s, up to "
                    "producer.spool_max_bytes, for a later run of this program whose settings work",
                    exc,
                    self._spool.directory,
                )
        else:
            log.warning(
                "boltstream: no broker is configured (kafka.bootstrap_servers is empty and no local stack runs: no "
                "%s): spans are kept on disk in %s, up to producer.spool_max_bytes (%s bytes; beyond, the oldest "
                "are dropped and counted in agl.stats()), and sent once `boltstream up` starts a stack (looked for "
                "every %.0f s) or by a later run of this program that has a broker",
                settings.state_file,
                self._spool.directory,
                f"{config.spool_max_bytes:,}",
                BROKER_LOOK_INTERVAL,
            )
        self._pending: deque[PendingSpan] = deque()
        self._rewards: deque[tuple[dict[str, Any], bool]] = deque()
        self._batch_size = config.span_buffer_size
        self._max_pending = config.max_pending_spans
        self._wakeup = threading.Event()
        self._settled = threading.Condition()
        self._flush_waiters = 0
        self._in_flight = 0
        self._sending = False
        self._replaying: _Replay | None = None
        self._healthy = True
        self._client_broken: KafkaError | None = None  # why the client must be replaced
        self._backoff = RETRY_BACKOFF_MIN
        self._next_probe = 0.0  # monotonic time of the next probe while the broker is unhealthy
        self._next_adoption = 0.0
        self._dropped_at_flush = 0
        self._stopping = False
        self._tick_callbacks: list[Callable[[], None]] = []
        self._report_delivery = self._delivered  # one bound method for every message
        #: Longest idle sleep: implicit rollouts idle for ``implicit_rollout_idle`` are ended at a tick.
        self._idle_tick = min(IDLE_TICK, max(0.01, config.implicit_rollout_idle / 2))
        self._thread = threading.Thread(target=self._run, name="boltstream-span-producer", daemon=True)
        self._thread.start()

    # -- the agent's side: cheap and never raising -------------------------------------------
    def append(self, span: PendingSpan) -> None:
        """Queue one span; O(1), no I/O, no encoding."""
        pending = self._pending
        if len(pending) >= self._max_pending:
            self.stats.dropped_pending_spans += 1
            return
        pending.append(span)
        # The background thread sleeps while nothing is queued: the first span wakes it (to start the
        # ``linger`` clock), a full batch wakes it early; the spans in between do not.
        if (len(pending) == 1 or len(pending) >= self._batch_size) and not self._wakeup.is_set():
            self._wakeup.set()

    def send_reward(self, reward: dict[str, Any]) -> None:
        """Queue a ``Reward`` record (a dict shaped by the Reward schema) for the rewards topic."""
        kept = keep_rollout(reward["rollout_id"], self.settings.producer.span_sampling_rate)
        self._rewards.append((reward, kept))
        self._wakeup.set()

    def on_tick(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the background thread at every cycle (e.g. to end idle implicit rollouts)."""
        self._tick_callbacks.append(callback)

    @property
    def spool(self) -> Spool:
        return self._spool

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is acknowledged by Kafka; False if ``timeout`` ran out first,
        if anything was dropped since the previous flush (``stats`` and ``spool.stats`` say what and why), or,
        with no broker configured, as soon as everything queued is spooled (and the spool is not empty).

        Whatever is not delivered by then stays queued, or spooled on disk when the broker is down.
        """
        timeout = self.settings.producer.flush_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._settled:
            self._flush_waiters += 1
        self._wakeup.set()
        try:
            with self._settled:
                while not self._is_settled():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._thread.is_alive():
                        return False
                    self._settled.wait(min(remaining, 0.05))
            dropped = self._drops()
            nothing_dropped, self._dropped_at_flush = dropped == self._dropped_at_flush, dropped
            return nothing_dropped and (self._kafka is not None or len(self._spool) == 0)
        finally:
            with self._settled:
                self._flush_waiters -= 1

    def close(self, timeout: float | None = None) -> bool:
        """Flush within ``timeout``, stop the background thread, keep the rest in the spool for next time."""
        delivered = self.flush(timeout)
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout=max(1.0, self.settings.producer.delivery_timeout))
        # What the client still holds is undeliverable now: purge it so its failure reports spool it.
        if self._kafka is not None:
            self._kafka.purge()
            self._kafka.poll(0)
        self._retention.close()
        self._spool.close()
        return delivered

    def in_memory(self) -> int:
        """Spans and rewards waiting in memory plus messages in flight: what a crash now would lose (the
        rest is delivered or spooled on disk)."""
        return len(self._pending) + len(self._rewards) + self._in_flight

    def _drops(self) -> int:
        """A count that grows with every drop (of spans, rewards, spooled messages), for flush() to tell."""
        stats = self.stats
        return (
            stats.dropped_pending_spans
            + stats.dropped_unencodable_spans
            + stats.dropped_undeliverable_spans
            + stats.dropped_oversized_spans
            + stats.dropped_rewards
            + self._spool.stats.dropped_messages
        )

    def _is_settled(self) -> bool:
        """Nothing in memory, and nothing spooled unless no broker is configured (then nothing can go)."""
        return (
            not self._pending
            and not self._rewards
            and not self._sending
            and self._in_flight == 0
            and self._replaying is None
            and (len(self._spool) == 0 or self._kafka is None)
        )

    # -- the background thread ---------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            try:
                self._wait_for_work()
                self._cycle()
            except Exception:  # the thread must survive anything; what failed is logged
                log.exception("span producer cycle failed; continuing")
                time.sleep(0.1)
        self._cycle()

    def _wait_for_work(self) -> None:
        """Block until the next cycle is due: a delivery report, a flush, a full batch, ``linger`` after the
        first queued span, the next probe of an unhealthy broker, or the idle tick.

        With nothing queued, in flight or spooled the thread does not wake every ``linger``: it sleeps
        until a span arrives (or the tick for idle implicit rollouts). On a machine shared with a model
        server, any wake-up of another thread can preempt one of its compute threads, and an agent
        waiting for an LLM answer should not pay that 20 times a second. While the broker is away, the
        spool waits for the next probe, also when someone waits in flush().
        """
        linger = self.settings.producer.linger
        if self._in_flight:
            self._poll(0.005 if self._flush_waiters else min(linger, 0.01))
        elif self._pending or self._rewards:
            self._wakeup.wait(0.005 if self._flush_waiters else linger)
        elif len(self._spool) or self._client_broken is not None:
            self._wakeup.wait(self._seconds_to_probe())
        elif self._flush_waiters:
            self._wakeup.wait(0.005)
        else:  # idle until a span, a reward, flush() or close() sets the event, or the tick
            self._wakeup.wait(self._idle_tick)
            self._wakeup.clear()
            if self._pending and not (self._flush_waiters or self._stopping or len(self._pending) >= self._batch_size):
                self._wakeup.wait(linger)  # the first span: let the batch fill for ``linger``, as when busy
        self._wakeup.clear()

    def _seconds_to_probe(self) -> float:
        if self._kafka is None:  # nothing to probe: the next look for a broker
            return max(0.0, min(self._next_broker_look - time.monotonic(), self._idle_tick))
        if self._healthy:
            return 0.0
        return max(0.0, min(self._next_probe - time.monotonic(), self._idle_tick))

    def _cycle(self) -> None:
        if self._kafka is None:
            if time.monotonic() >= self._next_broker_look:
                self._look_for_broker(time.monotonic())
            if self._kafka is None:
                self._cycle_without_broker()
                return
        replay = self._retention.replay_due()
        if replay is not None:  # a new broker incarnation: what the old one acknowledged goes again, oldest first
            for message in replay:
                self._spool.put(message)
            # The old client's idempotence state means nothing to the new broker: replace it now.
            self._client_broken = "the broker is a new incarnation (another cluster id)"
            self._mark_unhealthy()
            self._next_probe = 0.0
        now = time.monotonic()
        if self._client_broken is not None and (now >= self._next_probe or self._stopping):
            self._replace_client()
        if now >= self._next_adoption:
            self._adopt_ended_spools()
        for callback in self._tick_callbacks:
            callback()
        # Spans taken from the queue, and messages taken from the spool, are neither pending, spooled nor
        # in flight until produced: flush() must not see that moment as settled (it runs on another
        # thread and may look at any bytecode boundary).
        self._sending = True
        try:
            self._send_pending_spans()
            self._send_pending_rewards()
            self._poll(0)
            self._replay_spool()
        finally:
            self._sending = False
        if self._flush_waiters:
            with self._settled:
                self._settled.notify_all()

    def _cycle_without_broker(self) -> None:
        """What a cycle does while no broker is configured: end idle implicit rollouts, spool what is queued."""
        for callback in self._tick_callbacks:
            callback()
        self._sending = True  # see _cycle
        try:
            self._send_pending_spans()
            self._send_pending_rewards()
        finally:
            self._sending = False
        if self._flush_waiters:
            with self._settled:
                self._settled.notify_all()

    def _send_pending_spans(self) -> None:
        pending = self._pending
        count = len(pending)
        if not count:
            return
        spans = [pending.popleft() for _ in range(count)]
        self.stats.spans_appended += count
        # Each rollout's spans together and in the order they came (a stable sort), one rollout built,
        # encoded and sent at a time: a cycle may take 50,000 spans, and a list per rollout living through
        # it would be promoted by the garbage collector until a full collection of the agent's heap.
        spans.sort(key=_rollout_id)
        sent_at = time.time_ns() // 1000
        topic = self.settings.topics.spans
        for rollout_id, group in itertools.groupby(spans, key=_rollout_id):
            key = rollout_id.encode("utf-8")
            for value, size in self._encode_batches(rollout_id, key, self._clean_batch(list(group)), sent_at):
                self._send(_Outgoing(topic, key, value, size, kept=True))

    def _encode_batches(
        self, rollout_id: str, key: bytes, spans: list[PendingSpan], sent_at: int
    ) -> list[tuple[bytes, int]]:
        """SpanBatch messages within ``kafka.max_message_bytes`` (split in halves as needed; a single span
        too big for it is left to :meth:`_send` to refuse); a span that cannot be encoded is dropped alone,
        counted and logged, not its whole batch."""
        try:
            value = self._encoder.encode(rollout_id, self.producer_id, sent_at, spans)
        except CodecError as exc:
            if len(spans) == 1:
                self.stats.dropped_unencodable_spans += 1
                log.error("dropped a span of rollout %s that cannot be encoded: %s", rollout_id, exc)
                return []
            value = b""  # find the culprit by halving
        if value and (self._fits(key, value) or len(spans) == 1):
            return [(value, len(spans))]
        middle = len(spans) // 2
        return self._encode_batches(rollout_id, key, spans[:middle], sent_at) + self._encode_batches(
            rollout_id, key, spans[middle:], sent_at
        )

    def _fits(self, key: bytes, value: bytes) -> bool:
        """True if the message is within ``kafka.max_message_bytes``, counted as librdkafka counts it."""
        return len(key) + len(value) + RECORD_OVERHEAD <= self._max_message_bytes

    def _clean_batch(self, spans: list[PendingSpan]) -> list[PendingSpan]:
        """The spans as they may leave the process (see :meth:`_clean`), checked together.

        The usual batch (string or number attributes under ordinary keys, nothing long enough to truncate) needs
        nothing but the secret search, run once over all its texts joined: when it finds nothing the
        spans leave as they came. Anything else, and any batch with a secret, is cleaned span by span.
        The checks run on the batch as a whole, at C speed where they can: the distinct key tuples, one
        join (which fails on a value that is not a string), the longest text.
        """
        redactor = self._redactor
        texts: list[Any] = []  # attribute values, errors and llm texts
        key_sets: set[tuple] = set()
        for span in spans:
            if len(span) > ATTRIBUTES:
                key_sets.add(span[ATTRIBUTES::2])
                texts += span[ATTRIBUTES + 1 :: 2]
            if span[ERROR] is not None:
                texts.append(span[ERROR])
            llm = span[LLM]
            if llm is not None:
                texts.append(llm.get("prompt_text"))
                texts.append(llm.get("completion_text"))
        if not texts:
            return spans
        try:
            joined = "\x00".join(texts)
        except TypeError:  # a value that is not a string: numbers leave as they are, anything else is converted
            strings = strings_if_wire_scalars(texts)
            if strings is None:
                return [self._clean(span) for span in spans]
            texts = strings
            joined = "\x00".join(texts)
        if (
            not all(redactor.plain_keys(keys) for keys in key_sets)
            or not (max(map(len, texts), default=0) * 4 <= redactor.max_bytes or all(map(redactor.fits, texts)))
            or not redactor.finds_nothing_in(joined)
        ):
            return [self._clean(span) for span in spans]
        return spans

    def _clean(self, span: PendingSpan) -> PendingSpan:
        """The span as it may leave the process: attributes typed or as strings, secrets redacted, values bounded."""
        error, llm = span[ERROR], span[LLM]
        clean = self._redactor.clean
        if llm is not None:
            llm = dict(llm)
            llm["prompt_text"] = clean(llm.get("prompt_text", ""))
            llm["completion_text"] = clean(llm.get("completion_text", ""))
        if error is not None:
            error = clean(error)
        attributes = self._redactor.typed_attributes(
            dict(zip(span[ATTRIBUTES::2], span[ATTRIBUTES + 1 :: 2], strict=True))
        )
        return (
            *span[:ERROR],
            error,
            span[REWARD],
            llm,
            span[SERVER_ID],
            *itertools.chain.from_iterable(attributes.items()),
        )

    def _send_pending_rewards(self) -> None:
        topic = self.settings.topics.rewards
        while self._rewards:
            reward, kept = self._rewards.popleft()
            reward = {**reward, "attributes": self._redactor.attributes(reward.get("attributes"))}
            try:
                value = self._reward_codec.encode(reward)
            except CodecError as exc:
                self.stats.dropped_rewards += 1
                log.error("dropped a reward for rollout %s that cannot be encoded: %s", reward.get("rollout_id"), exc)
                continue
            self._send(_Outgoing(topic, reward["rollout_id"].encode("utf-8"), value, 0, kept))

    def _send(self, message: _Outgoing) -> None:
        """Produce ``message``, or spool it when the broker is unhealthy, held (a new broker incarnation not
        ready yet) or the client is full or broken."""
        if not self._fits(message.key, message.value):
            self._refuse_oversized(message)
            self._settle_replayed(message)
            return
        broken = self._kafka is None or self._client_broken is not None or self._retention.holding
        if broken or (not self._healthy and message.replay is None):
            self._retry_later(message)
            self._settle_replayed(message)
            return
        message.report = self._report_delivery
        try:
            self._kafka.produce(
                message.topic,
                message.value,
                message.key,
                on_delivery=message,
            )
        except BufferError:
            self._retry_later(message)
            self._settle_replayed(message)
            return
        except KafkaException as exc:
            self._failed(message, exc.args[0])
            self._settle_replayed(message)
            return
        self._in_flight += 1

    def _delivered(self, message: _Outgoing, error: KafkaError | None) -> None:
        if error is None:
            self._healthy, self._backoff = True, RETRY_BACKOFF_MIN
            if message.replay is not None:
                message.replay.changed = True
            topics = self.settings.topics
            if message.topic == topics.spans:
                self.stats.spans_delivered += message.spans
                self.stats.batches_delivered += 1
            elif message.topic == topics.rewards:
                self.stats.rewards_delivered += 1
            else:
                self.stats.dead_letters_delivered += 1
            self._retention.keep(SpooledMessage(message.topic, message.key, message.value, message.spans, message.kept))
        else:
            self._failed(message, error)
        self._settle_replayed(message)
        # Last: until the message is spooled again (or its replay settled), flush() must see it in flight.
        self._in_flight -= 1
        if self._on_delivery is not None:
            try:
                self._on_delivery(message.topic, message.value, error)
            except Exception:
                log.exception("on_delivery listener raised; ignored")

    def _failed(self, message: _Outgoing, error: KafkaError) -> None:
        """A message Kafka did not take: spooled for later, unless retrying cannot help."""
        self.stats.delivery_failures += 1
        code = error.code()
        if (error.fatal() or code in _CLIENT_STATE_ERRORS) and self._client_broken is None:
            log.warning("the Kafka client is unusable (%s); it will be replaced", error)
            self._client_broken = error
        if code == KafkaError.MSG_SIZE_TOO_LARGE:
            self._refuse_oversized(message, by="Kafka")
            return
        if code in _PERMANENT_ERRORS:
            self.stats.dropped_undeliverable_spans += message.spans
            if message.replay is not None:
                message.replay.changed = True
            log.error(
                "dropped a %d-byte message to %s that Kafka refuses: %s", len(message.value), message.topic, error
            )
            return
        if self._healthy:
            log.warning("delivery to %s failed (%s); spooling until the broker is back", message.topic, error)
        self._mark_unhealthy()
        self._retry_later(message)

    def _refuse_oversized(self, message: _Outgoing, by: str = "the SDK") -> None:
        """Drop a message larger than ``kafka.max_message_bytes``: counted, logged the first time, and
        dead-lettered without its value (which would not fit either), so the loss shows in the archive."""
        if message.replay is not None:
            message.replay.changed = True
        topics = self.settings.topics
        if message.topic == topics.spans:
            self.stats.dropped_oversized_spans += message.spans
        elif message.topic == topics.rewards:
            self.stats.dropped_rewards += 1
        size = len(message.key) + len(message.value)
        reason = (
            f"message of {size:,} bytes to {message.topic} ({self._describe(message)}) is larger than "
            f"kafka.max_message_bytes ({self._max_message_bytes:,}); refused by {by}, value not kept"
        )
        if not self._oversize_logged:
            self._oversize_logged = True
            log.error(
                "%s. Raise kafka.max_message_bytes (the same on the broker, topics and clients) or send smaller "
                "spans; later refusals are only counted (agl.stats(): dropped_oversized_spans)",
                reason,
            )
        if message.topic == topics.dlq:
            return
        record = dead_letter(
            worker=SDK_WORKER,
            source_topic=message.topic,
            source_partition=-1,
            source_offset=-1,
            key=message.key,
            value=b"",
            reason=reason,
            error_type="too_large",
            identity=hashlib.sha256(message.value).hexdigest(),
        )
        self._send(_Outgoing(topics.dlq, message.key, self._dead_letter_codec.encode(record), 0, message.kept))

    def _describe(self, message: _Outgoing) -> str:
        """What a message holds, for a human: its spans' event ids, or the reward's."""
        topics = self.settings.topics
        try:
            if message.topic == topics.spans:
                ids = [span["event_id"] for span in codec("SpanBatch").decode(message.value)["spans"]]
                return f"{len(ids)} span(s) of rollout {message.key.decode(errors='replace')}: {', '.join(ids[:5])}"
            if message.topic == topics.rewards:
                return f"reward {self._reward_codec.decode(message.value)['event_id']}"
        except CodecError:
            pass
        return "undecodable"

    def _retry_later(self, message: _Outgoing) -> None:
        """Spool ``message``; one read from the spool waits for its replay to end (see _settle_replayed)."""
        if message.replay is None:
            self._spill(message)
        else:
            message.replay.failed.append(message)

    def _spill(self, message: _Outgoing) -> None:
        if self._spool.put(SpooledMessage(message.topic, message.key, message.value, message.spans, message.kept)):
            self.stats.messages_spooled += 1
            self.stats.spans_spooled += message.spans

    def _settle_replayed(self, message: _Outgoing) -> None:
        """Once every message of a replayed segment has an outcome: give the segment back untouched if none
        of them got anywhere, else spool again those that failed and delete it."""
        replay = message.replay
        if replay is None:
            return
        replay.waiting -= 1
        if replay.waiting:
            return
        if replay.failed and not replay.changed:
            self._spool.give_back(replay.segment)
            self._backoff = min(self._backoff * 2, RETRY_BACKOFF_MAX)
            self._next_probe = time.monotonic() + self._backoff
        else:
            for failed in replay.failed:
                self._spill(failed)
            self._spool.release(replay.segment)
        self._replaying = None  # last: flush() sees the segment either spooled or being replayed

    def _replay_spool(self) -> None:
        """Send the oldest spooled segment again, one at a time (as a probe while the broker is unhealthy)."""
        busy = self._kafka is None or self._replaying is not None or self._client_broken is not None
        busy = busy or self._retention.holding
        if busy or len(self._spool) == 0:
            return
        if not self._healthy and time.monotonic() < self._next_probe:
            return
        taken = self._spool.take_oldest()
        if taken is None:
            return
        segment, messages = taken
        if not messages:
            self._spool.release(segment)
            return
        self._replaying = replay = _Replay(segment, len(messages), [])
        for spooled in messages:
            self._send(_Outgoing(spooled.topic, spooled.key, spooled.value, spooled.spans, spooled.kept, replay))

    def _adopt_ended_spools(self) -> None:
        """Take in the spools that ended processes of the same program left (see :func:`_open_spool`)."""
        self._next_adoption = time.monotonic() + ADOPT_INTERVAL
        base = self._spool_family
        candidates = [base]
        with contextlib.suppress(OSError):
            candidates += [entry for entry in base.iterdir() if _SIBLING_SPOOL.match(entry.name) and entry.is_dir()]
        for directory in candidates:
            if directory != self._spool.directory:
                self._spool.adopt(directory, remove=directory != base, before_removal=self._adopt_retained)

    def _adopt_retained(self, directory: Path) -> None:
        """What an ended sibling had retained (:mod:`.retention`) is retained here now."""
        if (directory / RETAINED).is_dir():
            self._retention.adopt_from(directory / RETAINED)

    # -- a broker configured late -----------------------------------------------------------
    def _connect(self, settings: Settings) -> None:
        """Start the Kafka client (and the retention watching its broker) for the broker of ``settings``."""
        config = settings.producer
        self._client_config = settings.kafka.client_config(
            **{
                "acks": "all",
                "enable.idempotence": True,
                "compression.type": config.compression,
                "linger.ms": 5,
                "message.timeout.ms": max(1000, int(config.delivery_timeout * 1000)),
                "queue.buffering.max.kbytes": 256 * 1024,
                "reconnect.backoff.max.ms": 1000,
                "topic.metadata.refresh.fast.interval.ms": 100,
                "client.id": "boltstream-sdk",
                # A restarted broker must not get the topics made up by a producer's metadata request.
                "allow.auto.create.topics": False,
                "error_cb": self._on_client_error,
                "logger": _ClientLog(logging.getLogger("boltstream.producer.librdkafka"), {}),
            }
        )
        kafka = Producer(self._client_config)
        self._retention = Retention(settings, self._spool.directory / RETAINED)
        self.settings, self._kafka = settings, kafka

    @property
    def awaiting_broker(self) -> bool:
        """True while no broker is configured: spans wait in the spool (see :meth:`_look_for_broker`)."""
        return self._kafka is None

    def _look_for_broker(self, now: float) -> None:
        """Without a broker, look every ``BROKER_LOOK_INTERVAL`` seconds whether a local stack started (its state
        file, ``<home>/stack.json``, names its broker); once one did, connect: the spool drains into it."""
        self._next_broker_look = now + BROKER_LOOK_INTERVAL
        found = fill_from_stack(self.settings)
        if not found.kafka.bootstrap_servers:
            return
        try:
            self._connect(found)
        except Exception as exc:  # e.g. the stack's broker address is not usable: spooling goes on
            log.error("boltstream: cannot use the broker of %s (%s); spans stay spooled", self.settings.state_file, exc)
            return
        self._healthy, self._backoff, self._next_probe, self._next_adoption = True, RETRY_BACKOFF_MIN, 0.0, 0.0
        log.warning(
            "boltstream: the local stack's broker %s is there now: sending the %d spooled messages",
            found.kafka.bootstrap_servers,
            len(self._spool),
        )

    # -- client errors -----------------------------------------------------------------------
    def _poll(self, timeout: float) -> None:
        """Serve delivery reports; a fatal client error (raised here) gets the client replaced."""
        if self._kafka is None:
            return
        try:
            self._kafka.poll(timeout)
        except KafkaException as exc:
            if not exc.args[0].fatal():
                raise
            self._client_broken = exc.args[0]
            self._mark_unhealthy()

    def _on_client_error(self, error: KafkaError) -> None:
        if error.fatal():
            log.error("Kafka client failed fatally (%s); replacing it", error)
            self._client_broken = error
            self._mark_unhealthy()
        elif error.code() == KafkaError._ALL_BROKERS_DOWN:
            self._mark_unhealthy()

    def _mark_unhealthy(self) -> None:
        if self._healthy:
            self._healthy = False
            self._next_probe = time.monotonic() + self._backoff

    def _replace_client(self) -> None:
        """A new client for one whose producer id is fenced or that failed fatally (e.g. the idempotent
        producer's state lost by a restarted broker): what the old one holds is spooled."""
        old = self._kafka
        self._kafka = Producer(self._client_config)
        self.stats.client_replacements += 1
        log.warning("replaced the Kafka client (%s); spooled messages follow through the new one", self._client_broken)
        old.purge()  # everything it held fails with _PURGE_QUEUE / _PURGE_INFLIGHT and is spooled by _delivered
        # Serve every purged message's delivery report before the old client goes, or _in_flight never
        # drains and flush() waits for reports that will not come.
        deadline = time.monotonic() + self.settings.producer.flush_timeout
        while len(old) and time.monotonic() < deadline:
            try:
                old.poll(0.05)
            except KafkaException as exc:  # its fatal error again: it is why the client goes; keep serving reports
                log.debug("the replaced Kafka client: %s", exc)
        if len(old):
            log.error("%d messages of the failed Kafka client got no delivery report", len(old))
        # Only now: the old client's last reports (more of the same error) must not condemn the new one.
        self._client_broken = None


class _ClientLog(logging.LoggerAdapter):
    """librdkafka's log: connection failures are expected while a broker is down (the producer
    reports the outage itself), so they are demoted to INFO instead of flooding the agent's log."""

    def log(self, level: int, msg: object, *args: object, **kwargs: object) -> None:
        if level >= logging.ERROR and level < logging.CRITICAL and " FAIL " in f" {msg % args if args else msg} ":
            level = logging.INFO
        super().log(level, msg, *args, **kwargs)


def _open_spool(settings: Settings) -> tuple[Spool, Path]:
    """The spool of this process, and the directory of its program's family of spools.

    The family is ``producer.spool_dir``, by default ``<home>/spool/<program>``. The first live process of
    the program owns that directory itself, so a restarted agent takes over what its predecessor left; a
    second live process gets the subdirectory ``<pid>`` of it. Each process adopts, every
    ``ADOPT_INTERVAL`` seconds, the spools of the family whose owner has ended (a free lock), and deletes
    emptied subdirectories.
    """
    config = settings.producer
    program = (Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "") or "python"
    family = Path(config.spool_dir) if config.spool_dir else settings.home / "spool" / program
    pid = os.getpid()
    for directory in (family, family / str(pid)):
        try:
            return Spool(directory, config.spool_max_bytes), family
        except SpoolLocked:
            continue
    # The pid's directory is held too: an adopter is emptying a directory left by an ended process of
    # the same pid, or is about to delete it.
    return Spool(family / f"{pid}-{uuid.uuid4().hex[:8]}", config.spool_max_bytes), family
