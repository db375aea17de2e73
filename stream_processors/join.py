"""The join worker: a Faust app that turns spans and rewards into trajectories and training samples.

One agent reads the co-partitioned ``spans`` and ``rewards`` topics (both keyed by rollout_id, equal
partition counts) in batches of ``stream.batch_size`` messages, applies them to per-rollout state
(:mod:`boltstream.stream_processors.join_core`), publishes what closed, and only then writes the changed states
to the changelog-backed table ``rollouts``. A timer closes rollouts whose deadline passed in stream
time. Faust commits input offsets only after the producer flushed, so after a crash (SIGKILL
included) inputs are re-delivered at least once; each rollout's state remembers the last input offset
applied, so re-delivered inputs change nothing, and outputs carry deterministic ids (trajectory_id,
sample_id, dead-letter event_id): consumers dedupe by id. Output order per batch: trajectories,
samples and dead letters are delivered (acknowledged by the broker) *before* a closed state is
written, so a trajectory whose close is in the changelog has always been published.

Late rewards (after their trajectory closed, or timed later than ``end + reward_timeout``) are never
applied: they are counted (``boltstream_join_late_rewards_total``) and dead-lettered with
``error_type=late_reward`` and their original bytes; the reward also stays in the rewards topic.

Each input's Kafka timestamp goes to the core with it: a record dated more than
``stream.max_event_time_skew`` after it is timed at it instead (see join_core), so one agent's wrong
clock cannot move stream time.

Scaling: every worker is a member of the consumer group ``stream.join_group``; partitions of the
input topics (``topics.partitions``) bound how many workers share the load; workers may join and leave
while traffic flows (a partition's open rollouts move with it, through the changelog). After every
(re)assignment the worker adopts the restored table and reads each input partition from its committed
offset, strictly in offset order, committing nothing past the next offset to apply (see
:func:`.faust_workarounds.bound_commits`). Metrics for Prometheus
are served on ``http://127.0.0.1:<port>/metrics`` (``stream.join_metrics_port``; 0, the default, picks a
free port); :func:`join_metrics_urls` finds the running workers' URLs and :func:`join_status` reads one.
Faust's own pages on that port show live rollout state (``/table/rollouts`` ...) and the partition
assignment (``/router``, ``/stats``): they are off unless ``stream.debug_web`` is set. Without them the
port answers ``/metrics``, Faust's ``/`` (``{"status": "OK"}``, nothing more) and 404 to the rest.

Where the worker reaches past Faust's public API, and why: :mod:`.faust_workarounds`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import faust
import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from boltstream.infra.common.config import Settings
from boltstream.infra.common.ports import free_port
from boltstream.schemas.codec import codec
from boltstream.schemas.token_arrays import encode_training_sample
from boltstream.stream_processors.faust_workarounds import (
    bound_commits,
    committed_offset,
    keep_inputs_on_resume,
    register_value_codec,
    shorten_fetch_wait,
    table_value,
)
from boltstream.stream_processors.join_core import (
    STATUSES,
    JoinCore,
    JoinRules,
    PartitionClock,
    dumps_state,
    loads_state,
)

log = logging.getLogger(__name__)
STATE_CODEC = "boltstream-join-state"
TICK_SECONDS = 0.2
FETCH_MAX_WAIT_MS = 50
GC_YOUNG_THRESHOLD = 50_000
LOST_INPUT_SECONDS = 10.0  # records fetched this long ago that never reached the agent are read again


register_value_codec(STATE_CODEC, dumps_state, loads_state)


def _json_key(key: str) -> bytes:
    return json.dumps(key).encode()


def _now_us() -> int:
    return int(time.time() * 1e6)


class JoinWorker:
    """The Faust app of one join worker process, with its state, timer and metrics."""

    def __init__(self, settings: Settings, *, metrics_port: int | None = None) -> None:
        self.settings = settings
        stream, topics = settings.stream, settings.topics
        self.rules = JoinRules.from_settings(settings)
        port = stream.join_metrics_port if metrics_port is None else metrics_port
        self.metrics_port = port or free_port()
        servers = [f"kafka://{server.strip()}" for server in settings.kafka.bootstrap_servers.split(",")]
        session_timeout = settings.kafka.session_timeout_ms / 1000
        datadir = Path(settings.home) / "faust" / stream.join_group
        datadir.parent.mkdir(parents=True, exist_ok=True)
        self.app = faust.App(
            stream.join_group,
            broker=servers,
            broker_credentials=settings.kafka.faust_credentials(),
            store="memory://",
            datadir=str(datadir),
            topic_partitions=topics.partitions,
            topic_replication_factor=topics.replication_factor,
            broker_session_timeout=session_timeout,
            broker_heartbeat_interval=min(1.0, session_timeout / 3),
            broker_rebalance_timeout=max(10.0, session_timeout * 2),
            broker_max_poll_records=stream.batch_size,
            consumer_auto_offset_reset="earliest",
            # Faust's check that a changelog partition's high watermark is not below the offset recovery last
            # read crashed workers in rebalances on the embedded broker, which reports a high watermark below
            # the end of the last record batch (faust_workarounds, 5.).
            recovery_consistency_check=False,
            stream_buffer_maxsize=max(4096, stream.batch_size),
            producer_acks=-1,
            producer_linger=0.002,
            producer_max_batch_size=1024 * 1024,
            # The one message size limit of every client (kafka.max_message_bytes).
            producer_max_request_size=settings.kafka.max_message_bytes,
            consumer_max_fetch_size=settings.kafka.max_message_bytes,
            web_enabled=True,
            web_bind="127.0.0.1",
            web_port=self.metrics_port,
            web_in_thread=False,
            # Faust's pages (faust-streaming 0.15 names one setting each) besides the app's own /metrics.
            web_router_enabled=stream.debug_web,
            web_tables_enabled=stream.debug_web,
            web_stats_enabled=stream.debug_web,
            web_graph_enabled=stream.debug_web,
            web_metrics_enabled=stream.debug_web,
        )
        self.table = self.app.Table(
            "rollouts", partitions=topics.partitions, key_type=str, value_type=table_value(STATE_CODEC), default=None
        )
        self.table.on_recover(self._on_recovered)
        self._input_topics = topics.spans, topics.rewards  # in the order of the watermarks (rollouts.SPANS, REWARDS)
        self.inputs = self.app.topic(*self._input_topics, key_serializer="raw", value_serializer="raw")
        self.core = JoinCore(self.rules, self.table.data)
        self._changelog = self.table.changelog_topic.get_topic_name()
        self._codecs = {name: codec(name) for name in ("Trajectory", "DeadLetter")}
        # (topic, partition) -> the next offset to apply: inputs are applied strictly in offset order from the
        # committed offset a (re)assignment starts at, and no offset past it is committed. Only partitions
        # this worker owns (and has adopted the states of, see _on_recovered) have one.
        self._next: dict[tuple[str, int], int] = {}
        # (topic, partition) -> offset it is being read again from (a seek back is under way); records
        # delivered past it meanwhile are ones already fetched, skipped.
        self._reread_from: dict[tuple[str, int], int] = {}
        # (topic, partition) -> offset read again once already that still did not come: the log has a hole
        # there (a transaction marker, a record deleted by retention); the next record at or after it is taken.
        self._holes: dict[tuple[str, int], int] = {}
        self._last_delivery: dict[tuple[str, int], float] = {}  # (topic, partition) -> wall time of its last input
        # (topic, partition) -> (first offset not processed, monotonic time the consumer was first seen past
        # it, None until then)
        self._fetched: dict[tuple[str, int], tuple[int, float | None]] = {}
        self._assigned: set[int] = set()
        self._lag: dict[tuple[str, int], int] = {}
        self._lock = asyncio.Lock()  # the agent and the timer both flush; one at a time
        self.app.agent(self.inputs, name="join")(self._join)
        bound_commits(self.app, self._input_topics, lambda topic, partition: self._next.get((topic, partition)))
        keep_inputs_on_resume(self.app)
        self.app.timer(TICK_SECONDS, name="join-expire")(self._tick)
        self.registry = CollectorRegistry()
        self.registry.register(self)
        registry = self.registry

        async def metrics(web: Any, request: Any) -> Any:
            return web.bytes(generate_latest(registry), content_type="text/plain; version=0.0.4")

        self.app.page("/metrics")(metrics)

    # -- processing -----------------------------------------------------------------------------
    async def _join(self, stream: faust.StreamT) -> None:
        spans_topic = self.settings.topics.spans
        batch_size, within = self.settings.stream.batch_size, self.settings.stream.join_batch_within
        on_spans, on_reward = self.core.on_span_batch, self.core.on_reward
        next_offsets, last_delivery = self._next, self._last_delivery
        async for events in stream.take_events(batch_size, within=within):
            async with self._lock:
                now_us = _now_us()
                for event in events:
                    message = event.message
                    key = message.topic, message.partition
                    if next_offsets.get(key) != message.offset and not await self._in_order(key, message.offset):
                        continue
                    next_offsets[key] = message.offset + 1
                    last_delivery[key] = now_us / 1e6
                    handler = on_spans if message.topic == spans_topic else on_reward
                    # Kafka timestamps are milliseconds (Faust hands them over as float seconds); none is -1.
                    broker_ms = round(message.timestamp * 1000) if message.timestamp else -1
                    # A bad record becomes a dead letter inside the core; anything else escaping here is a
                    # bug, logged with the input's coordinates rather than stopping the worker.
                    try:
                        handler(
                            message.partition,
                            message.offset,
                            message.key,
                            message.value,
                            now_us,
                            broker_ms * 1000 if broker_ms >= 0 else None,
                        )
                    except Exception:
                        log.exception("join failed on %s[%d]@%d", message.topic, message.partition, message.offset)
                        self.core.counts["internal_errors"] += 1
                await self._flush()

    async def _in_order(self, key: tuple[str, int], offset: int) -> bool:
        """Whether the input at ``offset`` is to be applied now, though it is not the next one expected.

        Not if the partition is not this worker's (a delivery from before a rebalance) or the offset was
        applied already (delivered again after a seek back). Past the next offset expected, records were
        skipped: Faust hands on what its fetcher had buffered, also across a rebalance, and acknowledges
        skipped offsets as a gap. Nothing past such a hole is applied (a rollout's later input applied first
        would make its earlier one look like a redelivery); the partition is read again from the hole, once.
        A hole still there after that (see _reread_lost_inputs) is one in the log: the next record is taken.
        Records past the expected offset are no hole when the group has committed up to them since this
        assignment read its committed offsets: Faust seeks to the committed offsets again after the
        assignment (:func:`.faust_workarounds.committed_offset`), and a commit of the last generation may
        land in between. Every input before a committed offset was applied and its state written, so the
        partition goes on from there.
        """
        expected = self._next.get(key)
        if expected is None or offset < expected:
            return False
        committed = committed_offset(self.app, *key)
        if committed is not None and expected < committed <= offset:
            log.info("join: %s[%d] goes on from offset %d, committed since the assignment began", *key, committed)
            self._next[key] = expected = committed
            if offset == expected:
                return True
        hole = self._holes.get(key)
        if hole is not None and hole == expected:
            del self._holes[key]
            log.warning("join: %s[%d] has no records from offset %d to %d; going on", *key, expected, offset)
            return True
        if self._reread_from.get(key) != expected:
            await self._read_again(key, expected)
        return False

    async def _read_again(self, key: tuple[str, int], offset: int) -> None:
        log.warning("join: reading %s[%d] again from offset %d (skipped by the consumer)", *key, offset)
        self._reread_from[key] = offset
        self._fetched.pop(key, None)
        self.core.counts["inputs_read_again"] += 1
        # seek_wait: in the consumer's thread (see _on_recovered)
        await self.app.consumer.seek_wait({faust.types.TP(*key): offset})

    async def _tick(self) -> None:
        if self.app.rebalancing:
            return
        shorten_fetch_wait(self.app, FETCH_MAX_WAIT_MS)
        async with self._lock:
            assigned = self._assigned_partitions()  # first: the checks below ask only about partitions still ours
            # A timer that raises stops the whole Faust app: a failed re-read (e.g. a partition taken away
            # by a rebalance that began meanwhile) is logged and counted, and tried again next tick.
            try:
                await self._reread_lost_inputs(assigned)
            except Exception:
                log.exception("join failed reading lost inputs again")
                self.core.counts["internal_errors"] += 1
            stream_times = {partition: self._stream_time(partition) for partition in assigned}
            # As in the agent: a bug here is logged and counted, not a crashed worker (a timer that raises
            # stops the Faust app).
            try:
                self.core.expire(stream_times)
            except Exception:
                log.exception("join failed closing due rollouts at %s", stream_times)
                self.core.counts["internal_errors"] += 1
            await self._flush()

    async def _reread_lost_inputs(self, assigned: set[int]) -> None:
        """Read again from the next input offset expected if the consumer fetched it but it never came.

        Faust can lose fetched input records: records it skips while flow control is off are acknowledged
        unprocessed (relatives: faust-streaming#216, #221). A hole followed by later records is caught as
        they are delivered (see _in_order); this catches a hole at the end: records the consumer fetched (its
        position is past them) that have not reached the agent ``LOST_INPUT_SECONDS`` after they were
        fetched. A position already read again once that is still missing is a hole in the log: the
        partition is read again from it, and the first record at or after it is taken.

        The wait counts from when the records were fetched, not from the partition's last delivery: a
        partition quiet for a while whose next record was fetched a moment ago is not missing anything
        (counting from the last delivery read such records again about once per quiet partition in a demo).
        """
        now, consumer = time.monotonic(), self.app.consumer
        assignment = consumer.assignment()
        for topic in self._input_topics:
            for partition in assigned:
                key, tp = (topic, partition), faust.types.TP(topic, partition)
                if tp not in assignment:
                    continue  # no longer ours (a rebalance began after this tick did)
                try:
                    start = await self._fetched_not_delivered(tp, now)
                except Exception:
                    if tp in consumer.assignment():
                        raise
                    continue  # taken away by a rebalance while we asked about it
                if start is None:
                    continue
                if self._reread_from.get(key) == start:
                    self._holes[key] = start
                await self._read_again(key, start)

    async def _fetched_not_delivered(self, tp: faust.types.TP, now: float) -> int | None:
        """The next offset of ``tp`` expected, if the consumer fetched it ``LOST_INPUT_SECONDS`` ago or
        longer and it has not reached the agent since; else None."""
        key, consumer = (tp.topic, tp.partition), self.app.consumer
        done, highwater = self._next.get(key), consumer.highwater(tp)
        if done is None or highwater is None or done >= highwater:
            self._fetched.pop(key, None)  # not ours, or read to the end: nothing can be missing
            return None
        seen = self._fetched.get(key)
        if seen is None or seen[0] != done:
            # Processing moved on (or this is the first look): nothing to suspect yet. The consumer's
            # position is asked only of a partition that made no progress for a tick (it is a call into the
            # consumer's thread; a worker reading a backlog would otherwise make it for every partition).
            self._fetched[key] = done, None
            return None
        fetched_at = seen[1]
        if fetched_at is None:
            if (await consumer.position(tp) or 0) > done:
                self._fetched[key] = done, now  # fetched past ``done``: the wait starts now
            return None
        return done if now - fetched_at >= LOST_INPUT_SECONDS else None

    def _assigned_partitions(self) -> set[int]:
        """The input partitions this worker owns and has adopted the restored states of (see _on_recovered)."""
        spans = self.settings.topics.spans
        return self._assigned & {tp.partition for tp in self.app.consumer.assignment() if tp.topic == spans}

    async def _on_recovered(self) -> None:
        """Adopt the table as the changelog recovery of a (re)assignment left it, before the first input of
        the new generation: recovery replaces the state objects of every assigned partition, also of those
        this worker kept, so the core's indexes are rebuilt from the table (indexes that still pointed at the
        replaced objects closed a stale copy of a rollout while its inputs went to the live one), and states
        of partitions now owned by another worker are dropped."""
        consumer = self.app.consumer
        async with self._lock:
            inputs = [tp for tp in consumer.assignment() if tp.topic in self._input_topics]
            assigned = {tp.partition for tp in inputs}
            self.core.adopt(assigned, _now_us())
            self._next.clear()
            self._reread_from.clear()
            self._holes.clear()
            self._fetched.clear()
            if inputs:
                # Every input partition is read from its committed offset, and from nowhere else: Faust resumes
                # the partitions before it seeks them, and hands on what its fetcher buffered meanwhile, from
                # where the last generation left off (past records it dropped at the revocation).
                committed = await consumer.seek_to_committed()
                unset = [tp for tp in inputs if not committed.get(tp)]
                earliest = await consumer.earliest_offsets(*unset) if unset else {}
                starts = {tp: committed.get(tp) or earliest.get(tp) or 0 for tp in inputs}
                # seek_wait, not seek: Faust's seek changes the aiokafka consumer from this thread while the
                # consumer's own thread fetches (a KeyError in aiokafka's fetcher crashed a worker in a scaling
                # run); seek_wait runs in the consumer's thread.
                await consumer.seek_wait(starts)
                for tp, start in starts.items():
                    self._next[tp.topic, tp.partition] = start
            for partition in assigned - self._assigned:
                # Newly ours: idle time counts from now, not from when this worker last owned the partition.
                for topic in self._input_topics:
                    self._last_delivery[topic, partition] = time.time()
            self._assigned = assigned

    def _stream_time(self, partition: int) -> int:
        """Stream time of ``partition`` (see join_core): event time, wall clock only when idle."""
        watermarks = self.core.clock(partition)
        lagging = []
        for index, topic in enumerate(self._input_topics):
            tp = faust.types.TP(topic, partition)
            highwater = self.app.consumer.highwater(tp)
            done = self._next.get((topic, partition), 0)
            if highwater is None or done < highwater:
                lagging.append(watermarks[index])
            self._lag[topic, partition] = max(0, (highwater or 0) - done)
        if lagging:
            return min(lagging)
        now = time.time()
        last_input = max(self._last_delivery.get((topic, partition), now) for topic in self._input_topics)
        idle = now - last_input
        return max(watermarks) + int(max(0.0, idle) * 1e6)

    async def _flush(self) -> None:
        trajectories, samples, dead_letters, writes = self.core.drain()
        producer, topics = self.app.producer, self.settings.topics
        pending = []
        encode = self._codecs["Trajectory"].encode
        for record in trajectories:
            pending.append(
                await producer.send(
                    topics.trajectories, record["rollout_id"].encode(), encode(record), None, None, None
                )
            )
        encode = encode_training_sample  # the token arrays are copied as the SpanBatch carried them
        for record in samples:
            pending.append(
                await producer.send(topics.samples, record["task_id"].encode(), encode(record), None, None, None)
            )
        encode = self._codecs["DeadLetter"].encode
        for key, record in dead_letters:
            pending.append(await producer.send(topics.dlq, key, encode(record), None, None, None))
        if pending:
            await asyncio.gather(*pending)  # published before any close is written to the changelog
        # Changelog writes go straight to the producer, in the core's order (see JoinCore.drain): Faust's
        # send_soon buffer publishes them one await at a time and was the bottleneck. Keys are JSON like
        # Faust's own (recovery decodes them so); values use the table's codec. The producer keeps one
        # request in flight per broker, so they become durable in this order; Faust flushes the producer
        # before it commits input offsets.
        changelog = self._changelog
        states = [write for write in writes if not isinstance(write[2], PartitionClock)]
        clocks = [write for write in writes if isinstance(write[2], PartitionClock)]
        sent = [
            await producer.send(changelog, _json_key(key), dumps_state(state), partition, None, None)
            for key, partition, state in states
        ]
        if clocks:
            # The embedded broker (Tansu) reports a partition's high watermark as the first offset of its last
            # record batch + 1, so Faust's recovery, which reads up to the high watermark, misses the rest of
            # that batch. The clocks go out alone once the states are acknowledged: a last batch of one record
            # hides nothing. A later timer flush (closes only) may still be cut short; a restarted worker
            # derives those closes again, with the same ids and records.
            await asyncio.gather(*sent)
            for key, partition, clock in clocks:
                await producer.send(changelog, _json_key(key), dumps_state(clock), partition, None, None)

    # -- metrics --------------------------------------------------------------------------------
    def collect(self):
        """prometheus_client collector: the core's counters, open trajectories and input lag."""
        counts = self.core.counts
        simple = {
            "spans": "Spans applied (valid, including duplicates)",
            "rewards": "Rewards applied (valid, including duplicates and late ones)",
            "samples": "Training samples emitted",
            "llm_calls_to_retokenize": "LLM calls that came without token ids, kept with their text for the trainer",
            "untrainable_llm_calls": "LLM calls with neither token ids nor an answer (failed): no training sample",
            "duplicates": "Inputs ignored as duplicates (same event_id)",
            "late_rewards": "Rewards that arrived after their trajectory closed; archived, never applied",
            "late_spans": "Spans that arrived after their trajectory closed; dead-lettered",
            "redelivered": "Inputs skipped because they were applied before a restart",
            "internal_errors": "Inputs that raised inside the join (bugs); logged",
            "inputs_read_again": "Input positions read again: Faust fetched them but never delivered them",
            "tombstones": "Input messages without a value (delete markers); ignored",
            "event_times_clamped_spans": "Spans dated more than max_event_time_skew after their broker timestamp",
            "event_times_clamped_rewards": "Rewards dated more than max_event_time_skew after their broker timestamp",
        }
        for name, help_text in simple.items():
            yield CounterMetricFamily(f"boltstream_join_{name}", help_text, value=counts[name])
        by_status = CounterMetricFamily(
            "boltstream_join_trajectories", "Trajectories closed, by status", labels=["status"]
        )
        for status in STATUSES:
            by_status.add_metric([status], counts[f"trajectories_{status}"])
        yield by_status
        dead = CounterMetricFamily("boltstream_join_dead_letters", "Dead letters, by error type", labels=["error_type"])
        for name, value in sorted(counts.items()):
            if name.startswith("dead_letters_"):
                dead.add_metric([name.removeprefix("dead_letters_")], value)
        yield dead
        yield GaugeMetricFamily(
            "boltstream_join_open_trajectories",
            "Rollouts waiting for their end or reward",
            value=self.core.open_count(),
        )
        lag = GaugeMetricFamily(
            "boltstream_join_lag", "Input messages not yet processed", labels=["topic", "partition"]
        )
        for (topic, partition), value in sorted(self._lag.items()):
            lag.add_metric([topic, str(partition)], value)
        yield lag

    def run(self, loglevel: str = "warning") -> None:
        """Run the worker in the foreground until SIGINT/SIGTERM; announce its metrics URL meanwhile."""
        announcement = _announcements(self.settings) / f"{os.getpid()}.json"
        announcement.parent.mkdir(parents=True, exist_ok=True)
        url = metrics_url(self.metrics_port)
        announcement.write_text(json.dumps({"pid": os.getpid(), "group": self.app.conf.id, "metrics_url": url}))
        try:
            self._run(loglevel)
        finally:
            announcement.unlink(missing_ok=True)

    def _run(self, loglevel: str) -> None:
        # Every decoded batch allocates thousands of short-lived dicts; with the default threshold (700) the
        # collector runs every few messages and walks the table's long-lived states each time it reaches the
        # older generations. Rarer young collections cost ~10% less CPU per span; nothing here forms cycles.
        gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 100)
        for name in ("aiokafka", "faust", "mode"):  # their per-message debug calls cost even when not shown
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(loglevel.upper())))
        faust.Worker(self.app, loglevel=loglevel, quiet=True).execute_from_commandline()


def metrics_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/metrics"


def _announcements(settings: Settings) -> Path:
    return Path(settings.home) / "join"


def join_metrics_urls(settings: Settings) -> list[str]:
    """Metrics URLs of the join workers running on this machine for ``settings.home`` (live pids only)."""
    urls = []
    for path in sorted(_announcements(settings).glob("*.json")):
        try:
            announced = json.loads(path.read_text())
            os.kill(announced["pid"], 0)
        except (OSError, ValueError, KeyError):
            continue  # gone, or not ours to ask
        urls.append(announced["metrics_url"])
    return urls


def join_status(url: str, timeout: float = 2.0) -> dict[str, Any]:
    """What a running join worker reports (for ``boltstream status``): counters, open trajectories, lag.

    Returns ``{"trajectories": {status: n}, "open_trajectories": n, "late_rewards": n, "dead_letters":
    {error_type: n}, "lag": {"topic[partition]": n}, "spans": n, "samples": n, ...}`` (every counter of
    :meth:`JoinWorker.collect` by its name: ``inputs_read_again``, ``tombstones`` ...); raises
    ``httpx.HTTPError`` when the worker is not reachable.
    """
    response = httpx.get(url, timeout=timeout)
    response.raise_for_status()
    status: dict[str, Any] = {"trajectories": {}, "dead_letters": {}, "lag": {}}
    for family in text_string_to_metric_families(response.text):
        name = family.name.removeprefix("boltstream_join_")
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            if name == "trajectories":
                status["trajectories"][sample.labels["status"]] = int(sample.value)
            elif name == "dead_letters":
                status["dead_letters"][sample.labels["error_type"]] = int(sample.value)
            elif name == "lag":
                status["lag"][f"{sample.labels['topic']}[{sample.labels['partition']}]"] = int(sample.value)
            elif family.name.startswith("boltstream_join_"):
                status[name] = int(sample.value)
    return status


# -- CLI -----------------------------------------------------------------------------------------
def join_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=int, default=None, help="HTTP port of /metrics (default from config)")
    parser.add_argument("--loglevel", default="warning", help="Faust log level (default: warning)")


def join_command(args: argparse.Namespace, settings: Settings) -> int:
    from boltstream.infra.common.topics import ensure_topics

    ensure_topics(settings)  # the inputs must exist before Faust subscribes; outputs before the first close
    worker = JoinWorker(settings, metrics_port=args.metrics_port)
    topics = settings.topics
    print(
        f"boltstream join: {topics.spans} and {topics.rewards} into {topics.trajectories} and {topics.samples} "
        f"(dead letters to {topics.dlq})"
    )
    print(
        f"  consumer group {settings.stream.join_group}, rollout state in {worker._changelog}, "
        f"metrics {metrics_url(worker.metrics_port)}"
    )
    print("  stops on Ctrl-C or SIGTERM", flush=True)
    worker.run(loglevel=args.loglevel)
    return 0
