"""Benchmark: replay throughput from the archive at ``--speed max``, beside baselines from the same run.

Traffic: 5,000 rollouts of 20 spans (half llm_call spans with 100 prompt token ids, 50 completion token
ids and 50 logprobs, half tool_call spans) in SpanBatch messages of 20, plus one Reward each: 100,000
spans and 5,000 rewards, archived by the real archive worker (chDB) and read through its read endpoint.
Best of 2 runs each:

* ``replay``: :func:`boltstream.stream_processors.replay.replay` from the archive into a fresh replay topic set
  (query, re-batch, encode, produce, acknowledged);
* ``archive read + encode``: the same selection read and re-encoded, not produced;
* ``raw produce``: confluent-kafka producing the same encoded messages, from memory, with the replay's
  producer settings (the floor of any replay).

Where the time goes (cProfile, 1,000 rollouts): about 45% is fastavro encoding the re-built SpanBatches
(the archive stores rows, not the original bytes), 25% reading the Native result over HTTP, the rest
building the records. A replay from Kafka (``--source kafka``) re-publishes the original bytes.

Run: ``python -m pytest tests/benchmarks/bench_replay.py -m benchmark -s``.
"""

from __future__ import annotations

import time
import uuid

import pytest

from boltstream.schemas.codec import codec
from tests.records import make_llm, make_span
from tests.test_archive import wait_for

ROLLOUTS = 5000
SPANS_PER_ROLLOUT = 20
ROUNDS = 2


def _produce(settings) -> None:
    from confluent_kafka import Producer

    producer = Producer(settings.kafka.client_config(**{"linger.ms": 20, "compression.type": "lz4"}))
    batches, rewards = codec("SpanBatch"), codec("Reward")
    llm = make_llm(prompt_tokens=100, completion_tokens=50)
    start = int(time.time() * 1e6) - 3600 * 1_000_000
    for index in range(ROLLOUTS):
        rollout_id = str(uuid.uuid4())
        at = start + index * 1000
        spans = []
        for i in range(SPANS_PER_ROLLOUT):
            kind = "llm_call" if i % 2 == 0 else "tool_call"
            spans.append(
                make_span(
                    rollout_id,
                    kind=kind,
                    sequence=i,
                    start_time_us=at + i,
                    end_time_us=at + i + 1,
                    llm=llm if kind == "llm_call" else None,
                )
            )
        batch = {"rollout_id": rollout_id, "producer_id": "bench", "sent_at_us": at + SPANS_PER_ROLLOUT, "spans": spans}
        producer.produce(settings.topics.spans, batches.encode(batch), key=rollout_id.encode())
        reward = {
            "event_id": str(uuid.uuid4()),
            "rollout_id": rollout_id,
            "value": 1.0,
            "name": "final",
            "is_final": True,
            "source": "bench",
            "task_id": "task-1",
            "agent_name": "math-agent",
            "timestamp_us": at + 500,
            "attributes": {},
        }
        producer.produce(settings.topics.rewards, rewards.encode(reward), key=rollout_id.encode())
        producer.poll(0)
    assert producer.flush(60) == 0


def _best(measure) -> float:
    return min(measure(round_) for round_ in range(ROUNDS))


@pytest.mark.benchmark
def test_replay_throughput(settings, archive) -> None:
    from confluent_kafka import Producer

    from boltstream.stream_processors.replay import ArchiveSource, Selection, replay

    _produce(settings)
    archive.start()
    reader = archive.client()
    total_spans = ROLLOUTS * SPANS_PER_ROLLOUT
    wait_for(lambda: reader.command("SELECT count() FROM spans") == total_spans, 300, "every span archived")
    wait_for(lambda: reader.command("SELECT count() FROM rewards") == ROLLOUTS, 60, "every reward archived")
    events = total_spans + ROLLOUTS

    def replayed(round_: int) -> float:
        result = replay(
            settings, f"bench{round_}-{uuid.uuid4().hex[:6]}", ArchiveSource(reader, Selection()), progress=False
        )
        assert (result.spans, result.rewards) == (total_spans, ROLLOUTS)
        return result.seconds

    def read_only(_: int) -> float:
        started = time.perf_counter()
        messages = list(ArchiveSource(reader, Selection()).messages())
        assert sum(m.events for m in messages) == events
        return time.perf_counter() - started

    messages = list(ArchiveSource(reader, Selection()).messages())

    def raw_produce(round_: int) -> float:
        from boltstream.infra.common.topics import ensure_topics
        from boltstream.stream_processors.replay import replay_settings

        target = replay_settings(settings, f"raw{round_}-{uuid.uuid4().hex[:6]}")
        ensure_topics(target)
        topics = {"spans": target.topics.spans, "rewards": target.topics.rewards}
        producer = Producer(
            settings.kafka.client_config(
                **{"enable.idempotence": True, "acks": "all", "linger.ms": 5, "compression.type": "lz4"}
            )
        )
        started = time.perf_counter()
        for message in messages:
            while True:
                try:
                    producer.produce(topics[message.topic], message.value, message.key)
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
        assert producer.flush(60) == 0
        return time.perf_counter() - started

    results = {
        "raw produce": _best(raw_produce),
        "archive read + encode": _best(read_only),
        "replay": _best(replayed),
    }
    baseline = results["raw produce"]
    megabytes = sum(len(m.value) for m in messages) / 1e6
    print(
        f"\nreplay benchmark: {total_spans:,} spans + {ROLLOUTS:,} rewards, "
        f"{len(messages):,} messages ({megabytes:.0f} MB)"
    )
    for name, seconds in results.items():
        print(
            f"  {name:<24} {seconds:6.2f} s  {events / seconds:>10,.0f} events/s  "
            f"{seconds / baseline:5.2f}x the time of raw produce"
        )
