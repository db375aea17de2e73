"""Fault scenarios of the local stack's broker: ``down``/``up`` during traffic, and a broker SIGKILL.

Each runs the real stack (embedded broker, archive worker with chDB, join worker) under SDK agents in
processes of their own that produce the whole time, applies the fault, lets the agents go on, stops
them, waits until the archive holds what they were acknowledged, and records a row of the fault table:
acknowledged spans, of them archived, duplicates in the views, and whether every trajectory is what the
same rollouts give undisturbed (``complete``, exactly the rollout's spans, its reward, one sample-less
row per rollout: the agent's spans are messages, not LLM calls).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from boltstream.infra.common.config import Settings, load_settings
from boltstream.infra.common.signing import load_signing_key
from boltstream.infra.stack.lifecycle import start_stack, stop_stack
from boltstream.infra.stack.state import StackState, read_state
from boltstream.trainer.publish import latest_update
from tests.faults.agent import SPANS_PER_ROLLOUT
from tests.faults.table import FaultRow, record_fault
from tests.serving_support import produce_update, unsigned_update

PROJECT_ROOT = Path(__file__).resolve().parents[2]
AGENTS = 2
#: Rollouts of the burst scenario: 10,000 rollouts of SPANS_PER_ROLLOUT + 2 spans, 100,000 spans.
BURST_ROLLOUTS = 10_000
#: Settings of the stack and the agents: quick group joins, a quick broker check by the SDK.
STACK_ENV = {
    "BOLTSTREAM_KAFKA__SESSION_TIMEOUT_MS": "3000",
    "BOLTSTREAM_TOPICS__PARTITIONS": "4",
    "BOLTSTREAM_PRODUCER__BROKER_CHECK_INTERVAL": "0.5",
    "BOLTSTREAM_PRODUCER__DELIVERY_TIMEOUT": "3s",
}


def stack_settings(home: Path) -> Settings:
    return load_settings(environ={"BOLTSTREAM_HOME": str(home), **STACK_ENV})


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "home"
    for key in list(os.environ):
        if key.startswith("BOLTSTREAM_"):
            monkeypatch.delenv(key)
    yield home
    stop_stack(stack_settings(home), timeout=5.0)


class Agents:
    """SDK agent processes (tests/faults/agent.py) producing until :meth:`stop`."""

    def __init__(self, home: Path, count: int, burst: int = 0) -> None:
        self.stop_file = home / "agents.stop"
        self.manifests = [home / f"agent-{n}.json" for n in range(count)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BOLTSTREAM_")}
        env.update(STACK_ENV, BOLTSTREAM_HOME=str(home), PYTHONUNBUFFERED="1")
        self.logs = [home / f"agent-{n}.log" for n in range(count)]
        self.processes = []
        for manifest, log in zip(self.manifests, self.logs, strict=True):
            with log.open("ab") as handle:
                self.processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "tests.faults.agent", str(manifest), str(self.stop_file)]
                        + ([str(burst)] if burst else []),
                        cwd=PROJECT_ROOT,
                        env=env,
                        stdout=handle,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

    def stop(self, timeout: float = 180.0) -> dict:
        """Stop them, wait for their manifests, return the rollouts and acknowledged span ids of all."""
        self.stop_file.touch()
        rollouts: dict[str, dict] = {}
        acknowledged: set[str] = set()
        for process, manifest, log in zip(self.processes, self.manifests, self.logs, strict=True):
            assert process.wait(timeout) == 0, log.read_text()[-3000:]
            data = json.loads(manifest.read_text())
            assert data["settled"], f"agent did not deliver everything: {data['stats']}\n{log.read_text()[-3000:]}"
            rollouts.update(data["rollouts"])
            acknowledged.update(data["acknowledged"])
        return {"rollouts": rollouts, "acknowledged": acknowledged}

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def archive_client(state: StackState, settings: Settings):
    import clickhouse_connect

    return clickhouse_connect.get_client(dsn=state.clickhouse_read_url, database=settings.clickhouse.database)


def wait_archived(state: StackState, settings: Settings, acknowledged: set[str], timeout: float = 150.0) -> int:
    """How many of ``acknowledged`` the archive's spans view holds, once all or ``timeout`` passed."""
    client = archive_client(state, settings)
    deadline = time.monotonic() + timeout
    held = 0
    while time.monotonic() < deadline:
        ids = {row[0] for row in client.query("SELECT event_id FROM spans").result_rows}
        held = len(acknowledged & ids)
        if held == len(acknowledged):
            break
        time.sleep(1.0)
    return held


def wait_trajectories(state: StackState, settings: Settings, rollouts: dict[str, dict], timeout: float = 150.0):
    """The archive's trajectories (rollout_id -> row) once every rollout has one, or ``timeout`` passed."""
    client = archive_client(state, settings)
    deadline = time.monotonic() + timeout
    while True:
        rows = client.query("SELECT rollout_id, status, final_reward, span_event_ids FROM trajectories").named_results()
        found = {row["rollout_id"]: row for row in rows}
        if set(rollouts) <= set(found) or time.monotonic() > deadline:
            return found
        time.sleep(1.0)


def duplicated(state: StackState, settings: Settings) -> int:
    """Rows the deduplicated views hold more than once (spans by event id, trajectories by their id)."""
    client = archive_client(state, settings)
    spans = client.query("SELECT count() - uniqExact(event_id) FROM spans").result_rows[0][0]
    trajectories = client.query("SELECT count() - uniqExact(trajectory_id) FROM trajectories").result_rows[0][0]
    return int(spans) + int(trajectories)


def identical(found: dict[str, dict], rollouts: dict[str, dict]) -> tuple[bool, str]:
    """Whether each rollout's trajectory is its undisturbed one; the first difference, if any."""
    for rollout_id, expected in rollouts.items():
        row = found.get(rollout_id)
        if row is None:
            return False, f"no trajectory for rollout {rollout_id}"
        got = (row["status"], row["final_reward"], sorted(row["span_event_ids"]))
        want = ("complete", expected["reward"], sorted(expected["span_event_ids"]))
        if got != want:
            return False, f"rollout {rollout_id}: {got} instead of {want}"
    return True, ""


def publish_model_version(settings: Settings, version: int) -> dict:
    artifact = SimpleNamespace(uri=f"file:///models/v{version}", sha256="0" * 64, format="full")
    return produce_update(settings, load_signing_key(settings).sign(unsigned_update(settings, artifact, version)))


def measure(scenario: str, state: StackState, settings: Settings, produced: dict, note: str) -> None:
    acknowledged = produced["acknowledged"]
    archived = wait_archived(state, settings, acknowledged)
    found = wait_trajectories(state, settings, produced["rollouts"])
    same, difference = identical(found, produced["rollouts"])
    row = FaultRow(
        scenario,
        acknowledged=len(acknowledged),
        archived=archived,
        duplicated=duplicated(state, settings),
        trajectories_identical=same,
        note=f"{len(produced['rollouts']):,} rollouts; {note}" + (f"; {difference}" if difference else ""),
    )
    record_fault(row)


def wait_for_traffic(state: StackState, settings: Settings, rows: int, timeout: float = 60.0) -> None:
    """Until the archive holds ``rows`` spans: the agents are producing, the workers consuming."""
    client = archive_client(state, settings)
    deadline = time.monotonic() + timeout
    while client.query("SELECT count() FROM spans").result_rows[0][0] < rows:
        assert time.monotonic() < deadline, "no traffic reached the archive"
        time.sleep(0.5)


def test_down_then_up_during_traffic_loses_nothing(home: Path) -> None:
    settings = stack_settings(home)
    state = start_stack(settings, timeout=120.0)
    settings = load_settings(environ={"BOLTSTREAM_HOME": str(home), **STACK_ENV})  # now pointing at the stack
    published = publish_model_version(settings, version=7)
    agents = Agents(home, AGENTS)
    try:
        wait_for_traffic(state, settings, rows=2000)
        stopped = stop_stack(settings, timeout=30.0)
        time.sleep(2.0)  # the agents go on against no broker: they spool
        state = start_stack(stack_settings(home), timeout=120.0)
        assert state.bootstrap_servers == stopped.bootstrap_servers, "up took another broker port"
        assert state.cluster_id != stopped.cluster_id
        time.sleep(5.0)  # traffic into the restored stack
        produced = agents.stop()
    finally:
        agents.kill()
    kept = latest_update(settings, load_signing_key(settings))
    assert kept is not None and kept["version"] == published["version"], "the published model version is gone"
    measure("`down` then `up` during traffic", state, settings, produced, "same broker port; model version v7 kept")


def test_down_right_after_a_burst_then_up_loses_nothing(home: Path) -> None:
    """The backlog of a burst (unconsumed spans, rollouts open in the join) survives ``down`` and ``up``."""
    settings = stack_settings(home)
    state = start_stack(settings, timeout=120.0)
    settings = load_settings(environ={"BOLTSTREAM_HOME": str(home), **STACK_ENV})
    agents = Agents(home, 1, burst=BURST_ROLLOUTS)
    try:
        produced = agents.stop()  # the burst is acknowledged
        client = archive_client(state, settings)
        archived_before = client.query("SELECT count() FROM spans").result_rows[0][0]
        closed_before = client.query("SELECT count() FROM trajectories").result_rows[0][0]
        stop_stack(settings, timeout=30.0)  # before the archive and the join caught up
        state = start_stack(stack_settings(home), timeout=120.0)
    finally:
        agents.kill()
    spans = BURST_ROLLOUTS * (SPANS_PER_ROLLOUT + 2)
    backlog = f"at `down` {archived_before:,} spans and {closed_before:,} trajectories were archived"
    measure(f"`down` right after a {spans:,}-span burst, then `up`", state, settings, produced, backlog)


def test_broker_sigkill_and_restart_loses_nothing(home: Path) -> None:
    settings = stack_settings(home)
    state = start_stack(settings, timeout=120.0)
    settings = load_settings(environ={"BOLTSTREAM_HOME": str(home), **STACK_ENV})
    agents = Agents(home, AGENTS)
    try:
        wait_for_traffic(state, settings, rows=2000)
        os.kill(state.broker.pid, signal.SIGKILL)  # the agents go on against no broker: they spool
        restarted = wait_for_restart(settings, state)  # the supervisor brings it back (restart_broker)
        assert restarted.bootstrap_servers == state.bootstrap_servers
        assert restarted.restarts["broker"] == 1
        time.sleep(5.0)
        produced = agents.stop()
    finally:
        agents.kill()
    assert read_state(settings) == restarted
    note = "the supervisor restarted it, the join and the archive"
    measure("broker SIGKILL, restarted on its port", restarted, settings, produced, note)


def wait_for_restart(settings: Settings, before: StackState, timeout: float = 180.0) -> StackState:
    """The stack once its supervisor has brought a new broker incarnation and every worker back."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state(settings)
        if state is not None and state.cluster_id != before.cluster_id and all(state.alive().values()):
            return state
        time.sleep(0.5)
    raise AssertionError(f"the supervisor did not restart the broker within {timeout:.0f}s")
