"""The algorithm-side store API of Agent Lightning 0.3 (``LightningStore``), over the broker and the archive.

A custom algorithm queues rollouts, waits for them and reads their spans and resources::

    store = agl.LightningStore()                       # settings from load_settings()
    update = await store.add_resources({"main_prompt": agl.PromptTemplate(template="...")})
    queued = await store.enqueue_rollout(input={"question": "..."}, mode="train")
    done = await store.wait_for_rollouts(rollout_ids=[queued.rollout_id], timeout=120)
    spans = await store.query_spans(queued.rollout_id)
    reward = agl.find_final_reward(spans)

Writes go to Kafka: a queued rollout is a ``RolloutTask`` record on ``topics.rollout_tasks`` (carrying
the resources it runs with); runners take them with :meth:`LightningStore.dequeue_rollout`, one
consumer group sharing the partitions. What the runners' agents record travels as spans, like any
agent's. Reads go to ClickHouse through ``clickhouse.read_url`` (the local stack's read endpoint or a
server): a rollout is finished when its root span is archived; its status is that span's
(``succeeded`` / ``failed``), its final reward the last reward span's. The resources a rollout ran
with are attributes of its root span, so the archive answers ``get_resources_by_id`` too; resources
this store added are also known before any rollout used them.

A rollout can also be run outside the queue, as Agent Lightning's tracers and custom runners do:
:meth:`LightningStore.start_rollout` (or ``start_attempt``, a retry) opens it in this store, ``add_span`` /
``add_otel_span`` record its spans (to the broker, with the rollout's ids and sequence numbers), and
``update_rollout`` / ``update_attempt`` with a final status end it by recording its root span. Until then it is
known only to this store (``get_rollout_by_id`` returns it running); a finished rollout is in the archive and
no longer changes.

Agent Lightning's in-memory, SQLite and Mongo stores hold everything in one place; here the archive
is the store, so what a store call returns lags the agents by the archive's batching (seconds).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from boltstream.infra.common.config import ConfigError, Settings, load_settings, redacted
from boltstream.producers import context, runtime
from boltstream.producers.context import new_id, now_us
from boltstream.producers.emit import KINDS, _snapshot
from boltstream.producers.litagent import (
    MODE_ATTRIBUTE,
    RESOURCES_ATTRIBUTE,
    RESOURCES_ID_ATTRIBUTE,
    TASK_INPUT_ATTRIBUTE,
    Attempt,
    AttemptedRollout,
    Rollout,
    rollout_attributes,
    task_id_of,
)
from boltstream.producers.resources import NamedResources, ResourcesUpdate, resources_from_dict, resources_to_dict
from boltstream.producers.span_views import Span
from boltstream.schemas.codec import codec
from boltstream.schemas.dead_letters import dead_letter_of

log = logging.getLogger("boltstream.agl.store")

#: Rollout / attempt statuses that end a rollout, and the root span status each one records.
_ENDING = {"succeeded": "ok", "failed": "error", "cancelled": "error", "timeout": "error", "unresponsive": "error"}
_MODES = (None, "train", "val", "test")


class _Unset:
    """The default of ``update_rollout`` / ``update_attempt`` fields: left as they are."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


class _Open:
    """A rollout this store started (``start_rollout`` / ``start_attempt``) and not yet ended."""

    def __init__(self, run: context.rollout, record: AttemptedRollout, resources: NamedResources) -> None:
        self.run, self.record, self.resources = run, record, resources


def _check_mode(mode: Any) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be train, val or test, not {mode!r}")


#: Consumer group of the runners that take queued rollouts (one group shares the tasks).
RUNNER_GROUP = "boltstream-runners"
_LLM_COLUMNS = (
    "llm_model",
    "llm_model_version",
    "llm_prompt_text",
    "llm_completion_text",
    "llm_prompt_tokens",
    "llm_completion_tokens",
    "llm_latency_ms",
    "llm_finish_reason",
)
_SPAN_COLUMNS = (
    "event_id, rollout_id, attempt_id, task_id, agent_name, toString(kind), name, parent_id, sequence, "
    "start_time_us, end_time_us, status, error, reward, attributes, " + ", ".join(_LLM_COLUMNS)
)


class LightningStore:
    """Agent Lightning's store API for algorithms and runners, over Kafka (writes) and ClickHouse (reads).

    ``read_timeout`` bounds how long :meth:`query_spans` waits for a finished rollout's spans to reach
    the archive; ``poll_interval`` is how often waits look again.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        runner_group: str = RUNNER_GROUP,
        read_timeout: float = 60.0,
        poll_interval: float = 0.5,
    ) -> None:
        self.settings = settings or load_settings()
        self.runner_group = runner_group
        self.read_timeout = read_timeout
        self.poll_interval = poll_interval
        self._resources: dict[str, ResourcesUpdate] = {}
        self._latest_resources_id: str | None = None
        self._producer: Any = None
        self._consumer: Any = None
        self._client: Any = None
        self._unacknowledged: dict[str, Any] = {}
        self._open: dict[str, _Open] = {}

    @property
    def capabilities(self) -> dict[str, bool]:
        """Agent Lightning's capability flags: no OTLP endpoint (spans go to the broker), async-safe."""
        return {"thread_safe": False, "async_safe": True, "zero_copy": False, "otlp_traces": False}

    # -- resources -------------------------------------------------------------------------------
    async def add_resources(self, resources: NamedResources) -> ResourcesUpdate:
        """Make ``resources`` the latest version: rollouts queued from now on run with them."""
        resources_to_dict(resources)  # a resource that cannot be serialised fails here, not in a runner
        now = time.time()
        update = ResourcesUpdate(new_id(), now, now, 1, dict(resources))  # versions count updates of one id
        self._resources[update.resources_id] = update
        self._latest_resources_id = update.resources_id
        return update

    async def update_resources(self, resources_id: str, resources: NamedResources) -> ResourcesUpdate:
        """Replace the resources of ``resources_id`` (it becomes the latest version)."""
        previous = self._resources.get(resources_id)
        now = time.time()
        update = ResourcesUpdate(
            resources_id,
            previous.create_time if previous else now,
            now,
            (previous.version + 1) if previous else 1,
            dict(resources),
        )
        self._resources[resources_id] = update
        self._latest_resources_id = resources_id
        return update

    async def get_resources_by_id(self, resources_id: str) -> ResourcesUpdate | None:
        """Resources this store added, else those a rollout in the archive ran with."""
        if resources_id in self._resources:
            return self._resources[resources_id]
        rows = await self._query(
            "SELECT attributes[{key:String}], min(start_time_us) FROM spans WHERE kind = 'rollout' "
            "AND attributes[{id_key:String}] = {id:String} GROUP BY 1 LIMIT 1",
            {"key": RESOURCES_ATTRIBUTE, "id_key": RESOURCES_ID_ATTRIBUTE, "id": resources_id},
        )
        if not rows:
            return None
        created = rows[0][1] / 1e6
        return ResourcesUpdate(resources_id, created, created, 1, resources_from_dict(json.loads(rows[0][0])))

    async def get_latest_resources(self) -> ResourcesUpdate | None:
        """The latest resources this store added, else those of the newest archived rollout that had some."""
        if self._latest_resources_id is not None:
            return self._resources[self._latest_resources_id]
        rows = await self._query(
            "SELECT attributes[{id_key:String}] FROM spans WHERE kind = 'rollout' "
            "AND attributes[{id_key:String}] != '' ORDER BY start_time_us DESC LIMIT 1",
            {"id_key": RESOURCES_ID_ATTRIBUTE},
        )
        return await self.get_resources_by_id(rows[0][0]) if rows else None

    # -- the queue ---------------------------------------------------------------------------------
    async def enqueue_rollout(
        self,
        input: Any,
        mode: str | None = None,
        resources_id: str | None = None,
        config: Any = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Rollout:
        """Queue a rollout of ``input`` for the runners, with the resources ``resources_id`` (default: the latest)."""
        (rollout,) = await self.enqueue_many_rollouts([{"input": input, "mode": mode, "resources_id": resources_id,
                                                         "metadata": metadata}])  # fmt: skip
        return rollout

    async def enqueue_many_rollouts(self, requests: Sequence[Mapping[str, Any]]) -> list[Rollout]:
        """Queue several rollouts: dicts with ``input`` and optionally ``mode``, ``resources_id``, ``metadata``."""
        queued = []
        records = []
        for request in requests:
            mode = request.get("mode")
            _check_mode(mode)
            resources_id, resources = await self._resources_for(request.get("resources_id"))
            rollout = Rollout(
                rollout_id=new_id(),
                input=request["input"],
                mode=mode,
                resources_id=resources_id,
                metadata=dict(request.get("metadata") or {}),
            )
            records.append(
                {
                    "rollout_id": rollout.rollout_id,
                    "input_json": json.dumps(rollout.input),
                    "mode": mode or "",
                    "resources_id": resources_id or "",
                    "resources_json": json.dumps(resources_to_dict(resources)),
                    "metadata_json": json.dumps(rollout.metadata),
                    "enqueued_at_us": now_us(),
                }
            )
            queued.append(rollout)
        await asyncio.to_thread(self._produce, records)
        return queued

    async def _resources_for(self, resources_id: str | None) -> tuple[str | None, NamedResources]:
        """The resources a new rollout runs with: those of ``resources_id``, by default the latest."""
        resources_id = resources_id or self._latest_resources_id
        if resources_id is None:
            return None, {}
        update = await self.get_resources_by_id(resources_id)
        if update is None:
            raise ValueError(f"no resources with id {resources_id!r}")
        return resources_id, update.resources

    async def query_resources(self, **_: Any) -> list[ResourcesUpdate]:
        """Every version of the resources this store added, oldest first (then those only the archive knows)."""
        known = sorted(self._resources.values(), key=lambda update: update.create_time)
        rows = await self._query(
            "SELECT DISTINCT attributes[{id_key:String}] FROM spans WHERE kind = 'rollout' "
            "AND attributes[{id_key:String}] != ''",
            {"id_key": RESOURCES_ID_ATTRIBUTE},
        )
        for (resources_id,) in rows:
            if resources_id not in self._resources:
                update = await self.get_resources_by_id(resources_id)
                if update is not None:
                    known.append(update)
        return known

    def _producer_client(self) -> Any:
        from confluent_kafka import Producer

        if self._producer is None:
            self._producer = Producer(self.settings.kafka.client_config(**{"enable.idempotence": True}))
        return self._producer

    def _produce(self, records: list[dict[str, Any]]) -> None:
        producer = self._producer_client()
        failures: list[str] = []

        def delivered(error: Any, message: Any) -> None:
            if error is not None:
                failures.append(str(error))

        encoder = codec("RolloutTask")
        for record in records:
            producer.produce(
                self.settings.topics.rollout_tasks,
                key=record["rollout_id"].encode(),
                value=encoder.encode(record),
                on_delivery=delivered,
            )
        remaining = producer.flush(30)
        if remaining or failures:
            raise RuntimeError(f"queueing rollouts failed: {failures or f'{remaining} not delivered in 30 s'}")

    async def dequeue_rollout(self, worker_id: str | None = None, timeout: float = 1.0) -> AttemptedRollout | None:
        """Take the next queued rollout (None if none comes within ``timeout`` s), with its resources in
        ``metadata["resources"]``. Its task is acknowledged by :meth:`acknowledge` once run; one taken and
        never acknowledged is taken again after a restart (at least once)."""
        message = await asyncio.to_thread(self._poll, timeout)
        if message is None:
            return None
        try:
            record = codec("RolloutTask").decode(message.value())
            resources = resources_from_dict(json.loads(record["resources_json"]))
            task = json.loads(record["input_json"])
        except Exception as exc:  # a bad record must not stop the runners: dead-letter it, then go on
            log.error("dead-lettering an unreadable queued rollout at offset %s: %s", message.offset(), exc)
            reason = f"{type(exc).__name__}: {exc}"
            await asyncio.to_thread(self._dead_letter, message, reason)
            return None
        rollout_id = record["rollout_id"]
        self._unacknowledged[rollout_id] = message
        return AttemptedRollout(
            rollout_id=rollout_id,
            input=task,
            mode=record["mode"] or None,
            resources_id=record["resources_id"] or None,
            status="preparing",
            metadata={**json.loads(record["metadata_json"]), "resources": resources},
            attempt=Attempt(rollout_id, "attempt-0", worker_id=worker_id),
        )

    def _poll(self, timeout: float) -> Any:
        from confluent_kafka import Consumer

        if self._consumer is None:
            self._consumer = Consumer(
                self.settings.kafka.client_config(
                    **{
                        "group.id": self.runner_group,
                        "enable.auto.commit": False,
                        "auto.offset.reset": "earliest",
                        # one task at a time: a runner holds none it is not running
                        "max.poll.interval.ms": 3_600_000,
                    }
                )
            )
            self._consumer.subscribe([self.settings.topics.rollout_tasks])
        deadline = time.monotonic() + timeout
        while True:
            message = self._consumer.poll(max(0.0, min(1.0, deadline - time.monotonic())))
            if message is not None and message.error() is None:
                return message
            if message is not None:
                log.warning("rollout task consumer: %s", message.error())
            if time.monotonic() >= deadline:
                return None

    def _dead_letter(self, message: Any, reason: str) -> None:
        """Keep an unreadable task (bytes and reason) on the dead-letter topic, then move past it."""
        record = dead_letter_of(message, worker=f"runner:{self.runner_group}", reason=reason, error_type="decode_error")
        self._producer_client().produce(
            self.settings.topics.dlq, key=message.key(), value=codec("DeadLetter").encode(record)
        )
        if self._producer.flush(30):
            raise RuntimeError(f"could not dead-letter the queued rollout at offset {message.offset()}")
        self._consumer.commit(message=message, asynchronous=False)

    async def dequeue_many_rollouts(
        self, *, limit: int = 1, worker_id: str | None = None, timeout: float = 1.0
    ) -> list[AttemptedRollout]:
        """Up to ``limit`` queued rollouts, each taken as :meth:`dequeue_rollout` does."""
        taken = []
        while len(taken) < limit:
            queued = await self.dequeue_rollout(worker_id=worker_id, timeout=timeout)
            if queued is None:
                break
            taken.append(queued)
        return taken

    async def acknowledge(self, rollout_id: str) -> None:
        """Mark a dequeued rollout done: its task is not handed out again."""
        message = self._unacknowledged.pop(rollout_id, None)
        if message is not None:
            await asyncio.to_thread(self._consumer.commit, message=message, asynchronous=False)

    # -- rollouts run outside the queue: spans written directly -----------------------------------------
    async def start_rollout(
        self,
        input: Any,
        mode: str | None = None,
        resources_id: str | None = None,
        config: Any = None,
        metadata: Mapping[str, Any] | None = None,
        worker_id: str | None = None,
    ) -> AttemptedRollout:
        """Start a rollout now, not through the queue: its spans come from :meth:`add_span` (or an agent run with
        its ids), and it ends when :meth:`update_rollout` / :meth:`update_attempt` give it a final status,
        which records its root span (task, mode and resources as attributes, like a runner's rollouts)."""
        _check_mode(mode)
        resources_id, resources = await self._resources_for(resources_id)
        return self._open_attempt(new_id(), 0, input, mode, resources_id, resources, metadata, worker_id).record

    def _open_attempt(
        self,
        rollout_id: str,
        number: int,
        task: Any,
        mode: Any,
        resources_id: str | None,
        resources: NamedResources,
        metadata: Mapping[str, Any] | None,
        worker_id: str | None,
    ) -> _Open:
        metadata = dict(metadata or {})
        run = context.rollout(
            task_id=task_id_of(task),
            agent_name=str(metadata.get("agent_name", "")),
            attempt=number,
            rollout_id=rollout_id,
            attributes=rollout_attributes(task, mode, resources, resources_id),
        )
        attempt = Attempt(rollout_id, run.attempt_id, sequence_id=number + 1, status="preparing", worker_id=worker_id)
        record = AttemptedRollout(
            rollout_id=rollout_id,
            input=task,
            mode=mode,
            resources_id=resources_id,
            status="preparing",
            metadata=metadata,
            attempt=attempt,
        )
        self._open[rollout_id] = opened = _Open(run, record, resources)
        return opened

    async def start_attempt(self, rollout_id: str, worker_id: str | None = None) -> AttemptedRollout:
        """A new attempt of a rollout this store started or one in the archive (a retry, same task and
        resources); an attempt still running here ends as ``failed`` first."""
        opened = self._open.get(rollout_id)
        if opened is not None:
            record, resources = opened.record, opened.resources
            task, mode, resources_id, metadata = record.input, record.mode, record.resources_id, record.metadata
            number = record.attempt.sequence_id if record.attempt is not None else 1
            self._end(opened, "failed", "superseded by a new attempt")
        else:
            previous = await self.get_rollout_by_id(rollout_id)
            if previous is None:
                raise ValueError(f"no rollout {rollout_id!r}: neither started by this store nor in the archive")
            task, mode, resources_id, metadata = previous.input, previous.mode, previous.resources_id, {}
            resources = (await self._resources_for(resources_id))[1] if resources_id else {}
            number = len(await self.query_attempts(rollout_id))
        return self._open_attempt(rollout_id, number, task, mode, resources_id, resources, metadata, worker_id).record

    def running_rollout(self, rollout_id: str) -> context.rollout | None:
        """The rollout context of ``rollout_id`` if this store started it and it runs (a tracer's
        ``trace_context(rollout_id=...)`` records into it), else None."""
        opened = self._open.get(rollout_id)
        return opened.run if opened is not None else None

    def _started(self, rollout_id: str, attempt_id: str | None = None) -> _Open:
        opened = self._open.get(rollout_id)
        if opened is None:
            raise ValueError(
                f"rollout {rollout_id!r} is not running in this store: only rollouts started here "
                "(start_rollout / start_attempt) change; a finished one is in the archive as it ended"
            )
        if attempt_id not in (None, "latest", opened.run.attempt_id):
            raise ValueError(f"rollout {rollout_id!r} is running attempt {opened.run.attempt_id!r}, not {attempt_id!r}")
        return opened

    async def add_span(self, span: Span) -> Span:
        """Record ``span`` in its rollout, which this store started (its ids, and the next sequence number,
        are the rollout's); it goes to the broker like an agent's spans. Returns the span as recorded."""
        opened = self._started(span.rollout_id, span.attempt_id)
        run = opened.run
        kind = span.kind if span.kind in KINDS and span.kind != "rollout" else "custom"
        attributes = dict(span.attributes)
        if kind != span.kind:  # as emit_span keeps a kind outside the schema
            attributes["kind"] = span.kind
        recorded = Span(
            rollout_id=run.rollout_id,
            attempt_id=run.attempt_id,
            sequence_id=run.next_sequence(),
            span_id=span.span_id or new_id(),
            parent_id=span.parent_id or run.root_id,
            name=span.name,
            kind=kind,
            status="error" if str(span.status).lower() == "error" else "ok",
            attributes=attributes,
            start_time=span.start_time,
            end_time=span.end_time,
            reward=span.reward,
            error=span.error,
            task_id=run.task_id,
            agent_name=run.agent_name,
        )
        if opened.record.status == "preparing":
            opened.record.status = "running"
            if opened.record.attempt is not None:
                opened.record.attempt.status = "running"
        runtime.record(
            (  # a PendingSpan, fields in the order of boltstream.producers.pending_span
                recorded.span_id,
                *run.ids,
                kind,
                recorded.name,
                recorded.parent_id,
                recorded.sequence_id,
                int(recorded.start_time * 1e6),
                int(recorded.end_time * 1e6),
                recorded.status,
                recorded.error,
                recorded.reward,
                None,  # llm: LLM calls are recorded by the tracers, with their token ids
                "",
                *_snapshot(recorded.attributes),
            )
        )
        return recorded

    async def add_many_spans(self, spans: Sequence[Span]) -> list[Span]:
        return [await self.add_span(span) for span in spans]

    async def add_otel_span(
        self, rollout_id: str, attempt_id: str, readable_span: Any, sequence_id: int | None = None
    ) -> Span:
        """Record an OpenTelemetry ``ReadableSpan`` (name, attributes, times, status) as a span of the rollout."""
        status = getattr(getattr(readable_span, "status", None), "status_code", None)
        return await self.add_span(
            Span(
                rollout_id=rollout_id,
                attempt_id=attempt_id,
                sequence_id=sequence_id or 0,
                span_id="",
                parent_id=None,
                name=readable_span.name,
                kind="custom",
                status="error" if getattr(status, "name", "") == "ERROR" else "ok",
                attributes=dict(readable_span.attributes or {}),
                start_time=(readable_span.start_time or time.time_ns()) / 1e9,
                end_time=(readable_span.end_time or readable_span.start_time or time.time_ns()) / 1e9,
            )
        )

    async def get_next_span_sequence_id(self, rollout_id: str, attempt_id: str) -> int:
        """The next sequence number of a rollout started here (it is taken: the next call returns a later one)."""
        return self._started(rollout_id, attempt_id).run.next_sequence()

    def _end(self, opened: _Open, status: str, error: str | None = None) -> None:
        del self._open[opened.record.rollout_id]
        failure = None if _ENDING[status] == "ok" else RuntimeError(error or status)
        opened.run.end(failure)
        opened.record.status = status
        opened.record.end_time = time.time()
        opened.record.error = None if failure is None else f"{type(failure).__name__}: {failure}"
        if opened.record.attempt is not None:
            opened.record.attempt.status = status
            opened.record.attempt.end_time = opened.record.end_time

    async def update_rollout(
        self,
        rollout_id: str,
        input: Any = UNSET,
        mode: Any = UNSET,
        resources_id: Any = UNSET,
        status: Any = UNSET,
        config: Any = UNSET,
        metadata: Any = UNSET,
    ) -> Rollout:
        """Change a rollout started here; a final status (``succeeded``, ``failed``, ``cancelled``) ends it:
        its root span is recorded (status ``ok`` or ``error``) and the archive answers for it from then on."""
        opened = self._started(rollout_id)
        record = opened.record
        if mode is not UNSET:
            _check_mode(mode)
            record.mode = mode
        if input is not UNSET:
            record.input = input
            opened.run.task_id = task_id_of(input)
            opened.run.ids = (opened.run.rollout_id, opened.run.attempt_id, opened.run.task_id, opened.run.agent_name)
        if resources_id is not UNSET:
            record.resources_id, opened.resources = await self._resources_for(resources_id)
        if metadata is not UNSET:
            record.metadata = dict(metadata or {})
        opened.run.attributes = rollout_attributes(record.input, record.mode, opened.resources, record.resources_id)
        if status is not UNSET:
            self._set_status(opened, status)
        return record

    async def update_attempt(
        self,
        rollout_id: str,
        attempt_id: str,
        status: Any = UNSET,
        worker_id: Any = UNSET,
        last_heartbeat_time: Any = UNSET,
        metadata: Any = UNSET,
    ) -> Attempt:
        """Change the running attempt of a rollout started here; a final status ends the rollout with it
        (``timeout`` and ``unresponsive`` as a failure: boltstream does not retry by itself)."""
        opened = self._started(rollout_id, attempt_id)
        attempt = opened.record.attempt
        assert attempt is not None  # every rollout started here has its attempt
        if worker_id is not UNSET:
            attempt.worker_id = worker_id
        if last_heartbeat_time is not UNSET:
            attempt.last_heartbeat_time = last_heartbeat_time
        if metadata is not UNSET:
            attempt.metadata = dict(metadata or {})
        if status is not UNSET:
            self._set_status(opened, status)
        return attempt

    def _set_status(self, opened: _Open, status: str) -> None:
        if status in _ENDING:
            self._end(opened, status)
        elif status in ("preparing", "running"):
            opened.record.status = status
            if opened.record.attempt is not None:
                opened.record.attempt.status = status
        else:
            raise ValueError(
                f"status {status!r} cannot be set: a rollout started here is preparing or running until one of "
                f"{sorted(_ENDING)} ends it (queuing and requeuing are the queue's, which the runners take from)"
            )

    async def query_attempts(self, rollout_id: str, **_: Any) -> list[Attempt]:
        """The attempts of a rollout, oldest first: those in the archive, then one still running here."""
        rows = await self._query(
            "SELECT attempt_id, start_time_us, end_time_us, status FROM spans "
            "WHERE kind = 'rollout' AND rollout_id = {rollout_id:String} ORDER BY start_time_us",
            {"rollout_id": rollout_id},
        )
        attempts = [
            Attempt(
                rollout_id,
                attempt_id,
                sequence_id=number,
                start_time=start / 1e6,
                end_time=end / 1e6,
                status="succeeded" if status == "ok" else "failed",
            )
            for number, (attempt_id, start, end, status) in enumerate(rows, start=1)
        ]
        opened = self._open.get(rollout_id)
        if opened is not None and opened.record.attempt is not None:
            attempts.append(opened.record.attempt)
        return attempts

    async def get_latest_attempt(self, rollout_id: str) -> Attempt | None:
        attempts = await self.query_attempts(rollout_id)
        return attempts[-1] if attempts else None

    # -- reading the archive -------------------------------------------------------------------------
    def _reader(self) -> Any:
        if self._client is None:
            import clickhouse_connect

            url = self.settings.clickhouse.read_url
            if not url.startswith(("http://", "https://")):
                raise ConfigError(
                    "the store reads the archive through clickhouse.read_url (an http(s):// URL), "
                    f"not {redacted(url)!r}: start the local stack (`boltstream up`) "
                    "or set BOLTSTREAM_CLICKHOUSE__READ_URL"
                )
            arguments = self.settings.clickhouse.client_arguments(url, reading=True)
            self._client = clickhouse_connect.get_client(**arguments, database=self.settings.clickhouse.database)
        return self._client

    async def _query(self, sql: str, parameters: Mapping[str, Any]) -> list[tuple]:
        def run() -> list[tuple]:
            return list(self._reader().query(sql, parameters=dict(parameters)).result_rows)

        return await asyncio.to_thread(run)

    async def query_rollouts(
        self, *, status_in: Sequence[str] | None = None, rollout_id_in: Sequence[str] | None = None, **_: Any
    ) -> list[Rollout]:
        """Finished rollouts in the archive (those with ids in ``rollout_id_in``, all by default),
        optionally only those whose status is in ``status_in``, oldest first."""
        where = "r.kind = 'rollout'"
        parameters: dict[str, Any] = {
            "input": TASK_INPUT_ATTRIBUTE,
            "mode": MODE_ATTRIBUTE,
            "resources_id": RESOURCES_ID_ATTRIBUTE,
        }
        if rollout_id_in is not None:
            where += " AND r.rollout_id IN {ids:Array(String)}"
            parameters["ids"] = list(rollout_id_in)
        rows = await self._query(
            f"""
            SELECT r.rollout_id, r.attempt_id, r.start_time_us, r.end_time_us, r.status, r.error,
                   r.attributes[{{input:String}}], r.attributes[{{mode:String}}], r.attributes[{{resources_id:String}}],
                   f.final_reward, f.rewarded
            FROM spans AS r
            LEFT JOIN (
                SELECT rollout_id, argMax(reward, sequence) AS final_reward, 1 AS rewarded
                FROM spans WHERE kind = 'reward' GROUP BY rollout_id
            ) AS f ON f.rollout_id = r.rollout_id
            WHERE {where}
            ORDER BY r.start_time_us
            """,
            parameters,
        )
        rollouts: dict[str, Rollout] = {}  # a retried rollout is its latest attempt (rows come oldest first)
        for rollout_id, attempt_id, start, end, status, error, raw_input, mode, resources_id, reward, rewarded in rows:
            state = "succeeded" if status == "ok" else "failed"
            rollouts[rollout_id] = Rollout(
                rollout_id=rollout_id,
                input=json.loads(raw_input) if raw_input else None,
                start_time=start / 1e6,
                end_time=end / 1e6,
                mode=mode or None,
                resources_id=resources_id or None,
                status=state,
                metadata={"attempt_id": attempt_id},
                final_reward=reward if rewarded else None,
                error=error,
            )
        return [rollout for rollout in rollouts.values() if status_in is None or rollout.status in status_in]

    async def get_rollout_by_id(self, rollout_id: str) -> Rollout | None:
        """The rollout if it is running in this store (started here) or has finished and reached the archive,
        else None."""
        if rollout_id in self._open:
            return self._open[rollout_id].record
        found = await self.query_rollouts(rollout_id_in=[rollout_id])
        return found[0] if found else None

    async def wait_for_rollouts(self, *, rollout_ids: list[str], timeout: float | None = None) -> list[Rollout]:
        """The rollouts among ``rollout_ids`` in the archive, finished, within ``timeout`` s (None: wait for all)."""
        runtime.flush()  # rollouts run in this process are on their way
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            done = await self.query_rollouts(rollout_id_in=rollout_ids)
            if len(done) == len(set(rollout_ids)) or (deadline is not None and time.monotonic() >= deadline):
                return done
            pause = self.poll_interval if deadline is None else min(self.poll_interval, deadline - time.monotonic())
            await asyncio.sleep(max(0.0, pause))

    async def query_spans(self, rollout_id: str, attempt_id: str | None = None, *, wait: bool = True) -> list[Span]:
        """The spans of a rollout in order (of every attempt, of ``attempt_id``, or of the ``"latest"``). With
        ``wait`` (the default) a rollout not yet in the archive is waited for (up to ``read_timeout`` s): its
        spans come whole once its root span is archived."""
        if wait:
            await self.wait_for_rollouts(rollout_ids=[rollout_id], timeout=self.read_timeout)
        where = "rollout_id = {rollout_id:String}"
        parameters: dict[str, Any] = {"rollout_id": rollout_id}
        if attempt_id == "latest":
            latest = await self.get_latest_attempt(rollout_id)
            attempt_id = latest.attempt_id if latest is not None else None
        if attempt_id is not None:
            where += " AND attempt_id = {attempt_id:String}"
            parameters["attempt_id"] = attempt_id
        rows = await self._query(f"SELECT {_SPAN_COLUMNS} FROM spans WHERE {where} ORDER BY sequence", parameters)
        spans = []
        for row in rows:
            (event_id, rollout, attempt, task_id, agent_name, kind, name, parent_id, sequence, start, end) = row[:11]
            status, error, reward, attributes = row[11:15]
            spans.append(
                Span(
                    rollout_id=rollout,
                    attempt_id=attempt,
                    sequence_id=sequence,
                    span_id=event_id,
                    parent_id=parent_id,
                    name=name,
                    kind=kind,
                    status=status,
                    attributes=dict(attributes),
                    start_time=start / 1e6,
                    end_time=end / 1e6,
                    reward=reward,
                    error=error,
                    task_id=task_id,
                    agent_name=agent_name,
                    llm=dict(zip((c.removeprefix("llm_") for c in _LLM_COLUMNS), row[15:], strict=True))
                    if kind == "llm_call"
                    else {},
                )
            )
        return spans

    # -- lifecycle -----------------------------------------------------------------------------------
    async def close(self) -> None:
        """End the rollouts started here and still running (as ``cancelled``), flush what is queued and
        close the clients."""
        for opened in list(self._open.values()):
            self._end(opened, "cancelled", "the store was closed before the rollout ended")
        runtime.flush()
        if self._producer is not None:
            self._producer.flush(30)
            self._producer = None
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        if self._client is not None:
            self._client.close()
            self._client = None


class LightningStoreClient(LightningStore):
    """Agent Lightning's client of a store server (``agl store``). boltstream has no store server: the
    broker and the archive are the store, found from the settings; ``server_address`` is not used."""

    def __init__(self, server_address: str = "", settings: Settings | None = None, **options: Any) -> None:
        super().__init__(settings, **options)
        self.server_address = server_address


#: Agent Lightning's in-process store: here the same broker-and-archive store (nothing is kept in memory).
InMemoryLightningStore = LightningStore

__all__ = ["InMemoryLightningStore", "LightningStore", "LightningStoreClient"]
