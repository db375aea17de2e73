"""What the SDK's retention (producers/retention.py) costs an agent: spans/s and CPU per span end to end
(emit → acknowledged) with ``producer.retention`` on (the default) beside off, measured in the same run.

Run: ``python -m pytest tests/benchmarks/bench_retention.py -m benchmark -s``. Interleaved rounds, the
best of each kept; on a shared machine read the CPU ratio.
"""

from __future__ import annotations

import time

import pytest

from boltstream import agl
from boltstream.infra.common.config import Settings
from boltstream.infra.common.topics import ensure_topics
from tests.benchmarks.bench_producer import _tool_calls
from tests.producer_helpers import with_producer

pytestmark = pytest.mark.benchmark
ROLLOUTS, SPANS_PER_ROLLOUT, ROUNDS = 5_000, 10, 3


def _run(settings: Settings, calls: list) -> tuple[float, float]:
    """Wall and CPU seconds (all threads of this process) to emit and deliver the spans of ``calls``."""
    agl.configure(settings)
    try:
        started, cpu_started = time.perf_counter(), time.process_time()
        calls_left = iter(calls)
        for index in range(ROLLOUTS):
            with agl.rollout(task_id=f"task-{index % 100}", agent_name="bench"):
                for _ in range(SPANS_PER_ROLLOUT - 1):
                    args, result = next(calls_left)
                    agl.emit_tool_call("search", args, result)
        assert agl.flush(120)
        return time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        agl.shutdown(5)


def test_retention_cost_end_to_end(settings: Settings, tmp_path) -> None:
    ensure_topics(settings)
    calls = _tool_calls(ROLLOUTS * (SPANS_PER_ROLLOUT - 1))
    total = ROLLOUTS * SPANS_PER_ROLLOUT
    on, off = [], []
    for round_ in range(ROUNDS):
        off.append(_run(with_producer(settings, retention=0, spool_dir=str(tmp_path / f"off-{round_}")), calls))
        on.append(_run(with_producer(settings, spool_dir=str(tmp_path / f"on-{round_}")), calls))
    (on_wall, on_cpu), (off_wall, off_cpu) = min(on), min(off)
    print(
        f"\n{total:,} 1 KB spans per run, best of {ROUNDS}:\n"
        f"  retention off: {total / off_wall:,.0f} spans/s, CPU {off_cpu / total * 1e6:.1f} µs/span\n"
        f"  retention on : {total / on_wall:,.0f} spans/s, CPU {on_cpu / total * 1e6:.1f} µs/span\n"
        f"  → on/off: {off_wall / on_wall:.2f}x the throughput, {on_cpu / off_cpu:.2f}x the CPU per span"
    )
