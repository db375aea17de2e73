"""Crash consistency of the join's state, without Faust or a broker: whatever prefix of its changelog
writes a crash leaves durable, a worker restored from it that re-reads the inputs from the committed
position emits exactly what an undisturbed worker emits.

The model of the worker (boltstream.stream_processors.join): inputs in batches; a tick before the first and after
each batch at the stream time a worker with a backlog on both topics uses (the smaller watermark); the
outputs are published and its changelog writes sent in ``JoinCore.drain`` order. Input offsets are
committed only once a batch's writes are all durable; the latest such batch is the worst case (the
fewest inputs re-read). A crash between two writes of one batch is the case that broke the SIGKILL
test: a partition clock written before the states of its batch let a restarted worker close rollouts
as orphaned before it had re-read their spans.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from boltstream.stream_processors.join_core import JoinCore, JoinRules, dumps_state, loads_state
from tests.traffic import generate

TIMEOUT = 2.0
BATCH = 500  # input messages per batch (~5 s of event time), as a worker reading a backlog takes them
FAR_FUTURE = 1 << 62


def inputs(seed: int, rollouts: int) -> list[tuple[str, int, bytes, bytes]]:
    """The traffic as (topic, offset, key, value) in the order one partition's two topics are read."""
    offsets = {"spans": -1, "rewards": -1}
    read = []
    for message in generate(seed, rollouts, TIMEOUT).messages:
        offsets[message.topic] += 1
        read.append((message.topic, offsets[message.topic], message.key, message.value))
    return read


class Batch:
    def __init__(self, end: int, trajectories: list[dict[str, Any]], writes: list[tuple[str, bytes | None]]):
        self.end = end  # position in the inputs after this batch
        self.trajectories = trajectories
        self.writes = writes


def work(core: JoinCore, read: list[tuple[str, int, bytes, bytes]], start: int, now_us: int) -> list[Batch]:
    """Process ``read[start:]`` batch by batch; a last tick far in the future closes everything. The
    worker's timer ticks whether inputs come or not, so a restored worker ticks before it reads any."""
    core.expire({0: min(core.clock(0))})
    batches = [drained(core, start)]
    for begin in range(start, len(read), BATCH):
        for topic, offset, key, value in read[begin : begin + BATCH]:
            handler = core.on_span_batch if topic == "spans" else core.on_reward
            handler(0, offset, key, value, now_us)
        core.expire({0: min(core.clock(0))})
        batches.append(drained(core, min(begin + BATCH, len(read))))
    core.expire({0: FAR_FUTURE})
    batches.append(drained(core, len(read)))
    return batches


def drained(core: JoinCore, end: int) -> Batch:
    trajectories, _, _, writes = core.drain()
    return Batch(end, trajectories, [(key, dumps_state(state)) for key, _, state in writes])


def restored(rules: JoinRules, durable: list[tuple[str, bytes | None]], now_us: int) -> JoinCore:
    """A worker's core after recovery from the durable changelog prefix (last write per key wins)."""
    states: dict[str, Any] = {}
    for key, value in durable:
        if value is None:
            states.pop(key, None)
        else:
            states[key] = loads_state(value)
    core = JoinCore(rules, states)
    core.reindex(now_us)
    return core


def comparable(trajectory: dict[str, Any]) -> dict[str, Any]:
    return {**trajectory, "duplicate_count": None}  # depends on how far inputs were read before the close


@pytest.mark.parametrize("seed", [3, 17])
def test_any_crash_point_restores_to_the_undisturbed_output(seed: int) -> None:
    read = inputs(seed, 800)
    rules = JoinRules(reward_timeout_us=int(TIMEOUT * 1e6), grace_us=500_000, credit_policy="per_step")
    now_us = int(time.time() * 1e6)
    batches = work(JoinCore(rules, {}), read, 0, now_us)
    undisturbed = {t["trajectory_id"]: comparable(t) for batch in batches for t in batch.trajectories}
    log = [(index, write) for index, batch in enumerate(batches) for write in batch.writes]
    assert len(batches) > 4 and len(undisturbed) == 800

    # In every batch: crashes among its first writes (most of the batch lost), in its middle, before its last.
    starts = [index for index, (batch, _) in enumerate(log) if index == 0 or log[index - 1][0] != batch]
    ends = [*starts[1:], len(log)]
    points = {p for a, b in zip(starts, ends, strict=True) for p in (a + 1, a + 2, a + 3, (a + b) // 2, b - 1)}
    crash_points = sorted(p for p in points if 0 < p < len(log))
    for crash in crash_points:
        crashed_in = log[crash][0]  # the batch whose writes were under way
        committed = batches[crashed_in - 1].end if crashed_in else 0  # batch 0 is the first tick
        published = [t for batch in batches[: crashed_in + 1] for t in batch.trajectories]
        core = restored(rules, [write for _, write in log[:crash]], now_us)
        republished = [t for batch in work(core, read, committed, now_us) for t in batch.trajectories]
        out: dict[str, dict[str, Any]] = {}
        for trajectory in published + republished:
            record = comparable(trajectory)
            assert out.setdefault(record["trajectory_id"], record) == record, (
                f"crash after write {crash} of {len(log)}: trajectory of {record['rollout_id']} emitted twice, "
                f"differently: {out[record['trajectory_id']]['status']} then {record['status']}"
            )
        assert out == undisturbed, f"crash after write {crash} of {len(log)}"
