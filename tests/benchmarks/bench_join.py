"""Benchmark: spans/s joined by one join worker and reward-to-sample latency, beside baselines from the same run.

Traffic: the generator of tests/traffic.py (every scenario: complete, late, orphaned, duplicated...),
SpanBatch messages of 5 to 20 spans, about a third of them llm_call spans with 20-200 prompt and
5-80 completion token ids and logprobs. All of it is produced first, then measured on:

* ``join worker``: one ``boltstream join`` process (decode, state, changelog, trajectories, samples,
  dead letters, commits), from its first span to its last, read off its own ``/metrics``;
* ``bare Faust take``: a Faust app whose agent only counts, over the same spans topic, ``take(5000)``;
* ``raw aiokafka getmany``: an AIOKafkaConsumer draining the same spans topic and dropping the records.

Then latency: with the worker caught up, rollouts are produced live (spans, then the end marker, then
the reward) and each complete trajectory's latency is the time from handing its reward to the
producer to the first of its samples arriving at a consumer of the samples topic (p50/p99).

Run: ``python -m pytest tests/benchmarks/bench_join.py -m benchmark -s``.
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from boltstream.infra.common.config import load_settings
from boltstream.schemas.codec import codec
from boltstream.stream_processors.join import join_status
from tests.join_harness import PROJECT_ROOT, Collector, JoinProcess, join_settings, prepare
from tests.traffic import generate

ROLLOUTS = 6000
LIVE_ROLLOUTS = 400
TARGET_SPANS_PER_SECOND = 20_000
TARGET_P99_SECONDS = 1.0

_FAUST_BASELINE = """
import os, sys, time, faust
servers, topic, expected, group = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
app = faust.App(group, broker=f"kafka://{servers}", store="memory://", web_enabled=False,
                broker_session_timeout=2.0, broker_heartbeat_interval=0.5, consumer_auto_offset_reset="earliest",
                broker_max_poll_records=5000, stream_buffer_maxsize=5000, datadir=sys.argv[5])
source = app.topic(topic, key_serializer="raw", value_serializer="raw")
seen, started = 0, None

@app.agent(source)
async def count(stream):
    global seen, started
    async for values in stream.take(5000, within=0.2):
        started = started or time.perf_counter()
        seen += len(values)
        if seen >= expected:
            print(f"RESULT {seen} {time.perf_counter() - started}", flush=True)
            os._exit(0)

faust.Worker(app, loglevel="warning", quiet=True).execute_from_commandline()
"""


async def _aiokafka_drain(servers: str, topic: str, expected: int) -> tuple[int, float]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=servers, auto_offset_reset="earliest", group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    seen, started = 0, None
    try:
        while seen < expected:
            batches = await consumer.getmany(timeout_ms=200, max_records=5000)
            if batches and started is None:
                started = time.perf_counter()
            seen += sum(len(records) for records in batches.values())
    finally:
        await consumer.stop()
    return seen, time.perf_counter() - started


def _faust_take(settings, expected: int, home) -> tuple[int, float]:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _FAUST_BASELINE,
            settings.kafka.bootstrap_servers,
            settings.topics.spans,
            str(expected),
            f"bench-faust-{uuid.uuid4().hex[:6]}",
            str(home / "faust-baseline"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PROJECT_ROOT,
    )
    # Faust sends the worker's stdout through its logging, so the line may come prefixed, on either stream.
    found = re.search(r"RESULT (\d+) ([\d.]+)", result.stdout + result.stderr)
    assert found, result.stdout[-2000:] + result.stderr[-2000:]
    return int(found[1]), float(found[2])


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux procfs)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _join_throughput(worker: JoinProcess, total_spans: int, timeout: float = 300) -> tuple[float, float]:
    """Spans/s from the worker's first applied span to its last (sampled from its metrics), and spans per
    CPU-second of the worker over the same stretch (less sensitive to other load on the machine)."""
    first = last = None
    deadline = time.monotonic() + timeout
    previous = 0
    while time.monotonic() < deadline:
        try:
            spans = join_status(worker.metrics_url)["spans"]
        except Exception:
            spans = 0
        now, cpu = time.perf_counter(), _cpu_seconds(worker.process.pid)
        if spans and first is None:
            first = (now, spans, cpu)
        if spans > previous:
            last, previous = (now, spans, cpu), spans
        if spans >= total_spans:
            break
        time.sleep(0.05)
    assert first and last and previous >= total_spans, f"worker applied {previous} of {total_spans} spans"
    joined = last[1] - first[1]
    return joined / (last[0] - first[0]), joined / (last[2] - first[2])


def _live_latency(settings, rollouts: int) -> list[float]:
    """Produce rollouts live with the worker caught up; seconds from reward hand-off to the first sample."""
    from confluent_kafka import Producer

    traffic = generate(99, rollouts, settings.stream.reward_timeout, bad_inputs=False)
    # Rollouts whose Reward record comes after their spans: the join closes them when the reward arrives.
    complete = {r for r, e in traffic.expected.items() if e.scenario in ("complete", "duplicated") and e.calls}
    producer = Producer(settings.kafka.client_config(**{"linger.ms": 1, "compression.type": "lz4"}))
    samples = Collector(settings, settings.topics.samples, "TrainingSample", "sample_id", from_end=True)
    samples.poll(1.0)  # joins the partitions at their end, past what the throughput run left
    rewards = codec("Reward")
    sent_at: dict[str, float] = {}
    first_sample: dict[str, float] = {}
    topics = {"spans": settings.topics.spans, "rewards": settings.topics.rewards}
    # Replay at the traffic's own pace (event time), so the worker sees it as live traffic.
    origin_event, origin_wall = traffic.messages[0].event_time_us, time.perf_counter()
    for message in traffic.messages:
        delay = (message.event_time_us - origin_event) / 1e6 - (time.perf_counter() - origin_wall)
        if delay > 0:
            producer.flush(delay)
            for record in samples.consumer.consume(10_000, 0):
                if not record.error():
                    rollout = samples.codec.decode(record.value())["rollout_id"]
                    first_sample.setdefault(rollout, time.perf_counter())
        producer.produce(topics[message.topic], message.value, message.key)
        producer.poll(0)
        if message.topic == "rewards":
            rollout = rewards.decode(message.value)["rollout_id"]
            if rollout in complete:
                sent_at[rollout] = time.perf_counter()
    producer.flush(30)
    deadline = time.monotonic() + 30
    while not complete <= set(first_sample) and time.monotonic() < deadline:
        for record in samples.consumer.consume(10_000, 0.05):
            if not record.error():
                rollout = samples.codec.decode(record.value())["rollout_id"]
                first_sample.setdefault(rollout, time.perf_counter())
    samples.close()
    assert set(first_sample) >= complete, f"{len(complete - set(first_sample))} complete rollouts without samples"
    return sorted(first_sample[r] - sent_at[r] for r in complete)


@pytest.mark.benchmark
def test_join_throughput_and_latency(broker, tmp_path) -> None:
    suffix = uuid.uuid4().hex[:8]
    settings = load_settings(
        environ={"BOLTSTREAM_HOME": str(tmp_path)},
        kafka={"bootstrap_servers": broker.bootstrap_servers},
        topics={n: f"b{suffix}.{n}" for n in ("spans", "rewards", "trajectories", "samples", "dlq")},
    )
    settings = join_settings(settings, reward_timeout=2.0)
    prepare(settings)
    # The bulk traffic lies in the past (as a backlog does), so the live rollouts after it are in order.
    past = int(time.time() * 1e6) - ROLLOUTS * 20_000 - 60_000_000
    traffic = generate(5, ROLLOUTS, 2.0, start_us=past, bad_inputs=False)
    traffic.produce(settings)
    span_messages = sum(1 for m in traffic.messages if m.topic == "spans")
    # Duplicated batches included: the worker decodes and dedupes them too.
    batches = codec("SpanBatch")
    spans_in_messages = sum(len(batches.decode(m.value)["spans"]) for m in traffic.messages if m.topic == "spans")
    spans_per_message = spans_in_messages / span_messages

    worker = JoinProcess(settings)
    try:
        joined, per_cpu_second = _join_throughput(worker, spans_in_messages)
        seen, seconds = asyncio.run(
            _aiokafka_drain(settings.kafka.bootstrap_servers, settings.topics.spans, span_messages)
        )
        raw = seen * spans_per_message / seconds
        seen, seconds = _faust_take(settings, span_messages, tmp_path)
        bare = seen * spans_per_message / seconds
        latencies = _live_latency(settings, LIVE_ROLLOUTS)
    finally:
        worker.stop()
    p50, p99 = statistics.median(latencies), latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(
        f"\njoin benchmark: {spans_in_messages} spans in {span_messages} SpanBatch messages "
        f"({spans_per_message:.1f} spans/message), {ROLLOUTS} rollouts"
        f"\n  join worker            {joined:>10,.0f} spans/s  ({joined / spans_per_message:>8,.0f} msgs/s)"
        f"   {per_cpu_second:,.0f} spans per CPU-second of the worker ({1e6 / per_cpu_second:.1f} CPU us/span)"
        f"\n  bare Faust take(5000)  {bare:>10,.0f} spans/s  ({bare / spans_per_message:>8,.0f} msgs/s)"
        f"   join/bare = {joined / bare:.2f}"
        f"\n  raw aiokafka getmany   {raw:>10,.0f} spans/s  ({raw / spans_per_message:>8,.0f} msgs/s)"
        f"   join/raw  = {joined / raw:.3f}"
        f"\n  reward-to-sample latency over {len(latencies)} complete live rollouts: "
        f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms"
    )
    assert joined >= TARGET_SPANS_PER_SECOND, f"{joined:,.0f} spans/s < {TARGET_SPANS_PER_SECOND:,}"
    assert p99 <= TARGET_P99_SECONDS, f"p99 reward-to-sample {p99:.3f}s > {TARGET_P99_SECONDS}s"
