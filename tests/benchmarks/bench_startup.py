"""Benchmark of the auto-tracing start-up hook (``boltstream-autotrace.pth``): what it adds to every Python
start on a machine where boltstream is installed and nothing asks for tracing (target < 1 ms).

Two measurements, side by side in one run, with no tracing variable set and no ``boltstream.toml`` around:

* in-process: ``site.addpackage`` of a folder holding the hook against a folder holding an empty ``.pth``
  file (the same file system work), many times over: the hook's own cost, precise to the microsecond;
* end to end: ``python -c pass`` that adds a site folder with the hook, against one adding a folder with
  an empty ``.pth``, alternating, median of many starts: what a user would see, within the noise of
  starting a process on a shared machine.

Run: ``python -m pytest tests/benchmarks/bench_startup.py -m benchmark -s``.
"""

from __future__ import annotations

import os
import site
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.benchmarks import summary

pytestmark = pytest.mark.benchmark
HOOK = Path(__file__).resolve().parents[2] / "boltstream-autotrace.pth"
TARGET_US = 1000.0


def site_folders(tmp_path: Path) -> tuple[Path, Path]:
    with_hook, empty = tmp_path / "with-hook", tmp_path / "empty"
    with_hook.mkdir()
    empty.mkdir()
    (with_hook / HOOK.name).write_text(HOOK.read_text())
    (empty / HOOK.name).write_text("")
    return with_hook, empty


def quiet_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("BOLTSTREAM_", "AGENT_LIGHTNING"))}


def test_start_up_hook_cost_when_nothing_asks_for_tracing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with_hook, empty = site_folders(tmp_path)
    for key in os.environ:
        if key.startswith(("BOLTSTREAM_", "AGENT_LIGHTNING")):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no boltstream.toml here

    rounds = 20_000
    timings: dict[str, float] = {}
    for _ in range(3):  # best of three per side, alternating, against the machine's noise
        for label, folder in (("hook", with_hook), ("empty", empty)):
            started = time.perf_counter()
            for _ in range(rounds):
                site.addpackage(str(folder), HOOK.name, set())
            per_call = (time.perf_counter() - started) / rounds * 1e6
            timings[label] = min(timings.get(label, per_call), per_call)
    in_process = timings["hook"] - timings["empty"]
    assert "boltstream.producers.startup" not in sys.modules

    starts = 40
    env = quiet_environment()
    wall: dict[str, list[float]] = {"hook": [], "empty": []}
    for _ in range(starts):
        for label, folder in (("hook", with_hook), ("empty", empty)):
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-c", f"import site; site.addsitedir({str(folder)!r})"],
                cwd=tmp_path,
                env=env,
                check=True,
            )
            wall[label].append((time.perf_counter() - started) * 1e3)
    spread = {label: statistics.quantiles(times, n=4) for label, times in wall.items()}  # quartiles

    print()
    print("start-up hook, nothing asks for tracing (no variable, no boltstream.toml):")
    print(
        f"  in-process: {timings['hook']:.2f} µs with the hook vs {timings['empty']:.2f} µs for an empty .pth "
        f"= +{in_process:.2f} µs per Python start (best of 3 x {rounds:,}); target < {TARGET_US:.0f} µs: "
        f"{'PASS' if in_process < TARGET_US else 'MISS'}"
    )
    print(
        f"  end to end: python start median {spread['hook'][1]:.1f} ms (quartiles {spread['hook'][0]:.1f}-"
        f"{spread['hook'][2]:.1f}) with the hook vs {spread['empty'][1]:.1f} ms ({spread['empty'][0]:.1f}-"
        f"{spread['empty'][2]:.1f}) without, {starts} starts each, alternating"
    )
    summary.record(
        "start-up hook, nothing asks for tracing",
        f"+{in_process:.2f} µs per Python start (target < {TARGET_US:.0f} µs); python start median "
        f"{spread['hook'][1]:.1f} ms with it vs {spread['empty'][1]:.1f} ms without",
    )
    assert in_process < TARGET_US
