"""Fault scenarios of the agent-side SDK against the real broker and the real archive (chDB): a broker that
stops answering for 10 s and 60 s, a spool on a filesystem too small for the outage, and two processes of
one program where one is killed with its spool full of unsent spans.

Each scenario records one row of the fault table (tests/faults/table.py) from measured numbers and fails
if an acknowledged span is missing from the archive or counted twice there, or if the SDK lost a span
without counting it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from boltstream import agl
from boltstream.infra.common.config import Settings
from tests.faults.sdk_agent import Traffic
from tests.faults.sdk_support import Acknowledgements, archived, private_stack, thread_cpu_seconds
from tests.faults.table import FaultRow, record_fault
from tests.producer_helpers import sdk_environment, tmpfs, with_producer

#: The producer thread may use this share of a core while the broker is away and while it catches up
#: (the hot loop this guards against used 98%).
MAX_CPU_SHARE = 0.25


def _stall_scenario(tmp_path: Path, seconds: float) -> None:
    with private_stack(tmp_path) as stack:
        acknowledged = Acknowledgements(stack.settings.topics.spans)
        producer = agl.configure(stack.settings, on_delivery=acknowledged)
        try:
            with Traffic() as traffic:
                time.sleep(3.0)
                cpu_before, started = thread_cpu_seconds(producer._thread.native_id), time.monotonic()
                stack.stall()
                time.sleep(seconds)
                stack.resume()
                time.sleep(3.0)
            assert agl.flush(90), f"not delivered {90} s after the broker came back: {agl.stats()}"
            cpu = thread_cpu_seconds(producer._thread.native_id) - cpu_before
            wall = time.monotonic() - started
            stats = agl.stats()
        finally:
            agl.shutdown(5)
        emitted = set(traffic.emitted)
        assert emitted == acknowledged.ids, f"{len(emitted - acknowledged.ids)} spans never acknowledged; {stats}"
        assert stats["client_replacements"] >= 1 and stats["messages_spooled"] > 0, stats
        assert cpu / wall < MAX_CPU_SHARE, f"the producer thread used {cpu:.1f} s of CPU in {wall:.0f} s"
        found, duplicated = archived(stack.archive, acknowledged.ids)
    record_fault(
        FaultRow(
            f"broker SIGSTOP {seconds:.0f} s during SDK traffic",
            acknowledged=len(acknowledged.ids),
            archived=len(found),
            duplicated=duplicated,
            trajectories_identical=None,
            note=(
                f"{stats['messages_spooled']} messages spooled, {stats['client_replacements']} client "
                f"replacement(s), producer thread {cpu / wall:.0%} of a core from the stall to the end"
            ),
        )
    )


def test_broker_stalled_10s(tmp_path: Path) -> None:
    _stall_scenario(tmp_path, 10.0)


@pytest.mark.slow
def test_broker_stalled_60s(tmp_path: Path) -> None:
    _stall_scenario(tmp_path, 60.0)


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs for the spool."""
    with tmpfs(tmp_path / "tiny", "512k") as mountpoint:
        yield mountpoint


def test_spool_on_a_tiny_filesystem(tmp_path: Path, tiny_filesystem: Path) -> None:
    with private_stack(tmp_path) as stack:
        acknowledged = Acknowledgements(stack.settings.topics.spans)
        settings = with_producer(stack.settings, spool_dir=str(tiny_filesystem / "spool"))
        producer = agl.configure(settings, on_delivery=acknowledged)
        try:
            with Traffic(payload_bytes=1500) as traffic:
                time.sleep(2.0)
                stack.stall()
                time.sleep(15.0)  # ~2 MB of spans for a 512 KiB disk
                stack.resume()
                time.sleep(2.0)
            assert agl.flush(90) is False, "spans were dropped: flush() must say so"
            assert agl.flush(30), f"what was spooled is not delivered: {agl.stats()}"
            stats = agl.stats()
            alive = producer._thread.is_alive()
        finally:
            agl.shutdown(5)
        dropped = stats["spool_dropped_spans"]
        assert alive and dropped > 0 and stats["spool_write_failures"] > 0, stats
        emitted = set(traffic.emitted)
        assert acknowledged.ids <= emitted
        assert len(emitted) == len(acknowledged.ids) + dropped, f"a span lost without being counted: {stats}"
        found, duplicated = archived(stack.archive, acknowledged.ids)
    record_fault(
        FaultRow(
            "spool on a 512 KiB filesystem, broker stalled 15 s",
            acknowledged=len(acknowledged.ids),
            archived=len(found),
            duplicated=duplicated,
            trajectories_identical=None,
            note=f"{dropped:,} spans dropped for the full disk, every one counted; producer thread alive",
        )
    )


AGENT = Path(__file__).with_name("sdk_agent.py")


def _start_agent(settings: Settings, log: Path, *args: str) -> subprocess.Popen:
    env = {**sdk_environment(settings), "BOLTSTREAM_TOPICS__DLQ": settings.topics.dlq}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, str(AGENT), *args], env=env, stdout=subprocess.PIPE, stderr=out, text=True
        )


def test_a_killed_process_spool_is_adopted_by_its_sibling(tmp_path: Path) -> None:
    with private_stack(tmp_path) as stack:
        family = stack.settings.home / "spool" / AGENT.stem
        survivor = _start_agent(stack.settings, tmp_path / "survivor.log", "survivor", str(tmp_path / "stop"))
        assert survivor.stdout.readline().startswith("READY"), (tmp_path / "survivor.log").read_text()[-3000:]
        stack.stall()
        victim = _start_agent(stack.settings, tmp_path / "victim.log", "victim", "300")
        line = victim.stdout.readline()
        assert line.startswith("SPOOLED"), (tmp_path / "victim.log").read_text()[-3000:]
        victim_spans = json.loads(line.split(" ", 1)[1])
        victim_spool = family / str(victim.pid)
        assert any(victim_spool.glob("*.seg*")), "the second process of the program spools in <family>/<pid>"
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        stack.resume()
        deadline = time.monotonic() + 60
        while victim_spool.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not victim_spool.exists(), "the survivor did not adopt the killed process's spool"
        (tmp_path / "stop").touch()
        out, _ = survivor.communicate(timeout=120)
        assert survivor.returncode == 0, (tmp_path / "survivor.log").read_text()[-3000:]
        report = json.loads(out.strip().splitlines()[-1])
        assert report["flushed"], report
        assert report["stats"]["spool_adopted_messages"] > 0, report
        emitted = set(victim_spans) | set(report["emitted"])
        found, duplicated = archived(stack.archive, emitted)
    record_fault(
        FaultRow(
            "two processes of one program, one SIGKILLed with its spool full",
            acknowledged=len(emitted),
            archived=len(found),
            duplicated=duplicated,
            trajectories_identical=None,
            note=(
                f"{len(victim_spans)} spans in the killed process's spool, "
                f"{report['stats']['spool_adopted_messages']} messages adopted and replayed by the survivor"
            ),
        )
    )
