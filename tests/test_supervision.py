"""Supervision of the local stack: exited parts come back with backoff, ``status`` says so and fails while a
part is down, ``down`` stops restarted parts too, and a damaged state file has a way out (``down --force``).

Real processes throughout: the embedded broker, the supervisor, and stand-in workers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from boltstream.infra.cli import main
from boltstream.infra.common.topics import admin_client
from boltstream.infra.stack import lifecycle
from boltstream.infra.stack.lifecycle import start_stack
from boltstream.infra.stack.processes import ProcessRecord
from boltstream.infra.stack.state import StackState, read_state, registered
from boltstream.infra.stack.status import stack_status
from boltstream.infra.stack.workers import Worker
from tests.test_stack import home_settings, listening, run_cli

#: An idle worker, and one that crashes 0.6 s after every start (ready after 0.3 s, so `up` succeeds).
WORKERS = {
    "idle": Worker(argv=("{python}", "-c", "import time; time.sleep(3600)"), settle=0.3),
}
CRASHING = {
    **WORKERS,
    "crasher": Worker(argv=("{python}", "-c", "import sys, time; time.sleep(0.6); sys.exit(3)"), settle=0.3),
}
FAST = {"stack": {"restart_backoff": 0.2, "restart_backoff_max": 5.0}}


def wait_for(condition: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def kill(record: ProcessRecord) -> None:
    os.kill(record.pid, signal.SIGKILL)
    wait_for(lambda: not record.alive(), 10, f"pid {record.pid} to die")


def restarted(home: Path, part: str, old: ProcessRecord) -> Callable[[], StackState | None]:
    def check() -> StackState | None:
        state = read_state(home_settings(home))
        new = state.processes()[part]
        return state if new.pid != old.pid and new.alive() else None

    return check


@pytest.fixture
def workers(monkeypatch: pytest.MonkeyPatch) -> dict[str, Worker]:
    monkeypatch.setattr(lifecycle, "WORKERS", WORKERS)
    return WORKERS


def test_a_killed_worker_is_restarted_and_down_stops_the_new_one(home, workers):
    state = start_stack(home_settings(home, **FAST))
    assert state.supervisor is not None and state.supervisor.alive()

    kill(state.workers["idle"])
    after = wait_for(restarted(home, "idle", state.workers["idle"]), what="the worker's restart")
    assert after.restarts == {"idle": 1}
    report = stack_status(home_settings(home))
    assert report["healthy"] is True and report["workers"]["idle"]["restarts"] == 1
    status = run_cli(home, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert re.search(r"idle\s+│\s+\d+\s+│\s+alive\s+│\s+1", status.stdout), status.stdout
    log = (home / "logs" / "supervisor.log").read_text()
    assert f"idle (pid {state.workers['idle'].pid}) exited" in log and "restarted idle" in log

    assert main(["down"]) == 0
    everything = [state.broker, state.supervisor, *after.processes().values()]
    assert not any(record.alive() for record in everything)
    assert read_state(home_settings(home)) is None and registered(home_settings(home)) == []


def test_a_crash_looping_worker_backs_off_and_status_fails_while_it_is_down(home, monkeypatch):
    monkeypatch.setattr(lifecycle, "WORKERS", CRASHING)
    state = start_stack(home_settings(home, **FAST))
    log = home / "logs" / "supervisor.log"
    wait_for(lambda: log.read_text().count("restarting it in") >= 4, 60, "four exits of the crashing worker")
    delays = [
        float(d)
        for d in re.findall(r"crasher \(pid \d+\) exited \(\d+ in a row\); restarting it in ([\d.]+)s", log.read_text())
    ]
    assert delays[:4] == [0.2, 0.4, 0.8, 1.6]  # doubling from stack.restart_backoff

    # While it waits to be restarted, status says so and fails; the other parts are untouched.
    def failing_status():
        result = run_cli(home, "status")
        return result if result.returncode == 1 and "exited, restarting" in result.stdout else None

    result = wait_for(failing_status, 60, "a status taken while the crasher is down")
    assert "not running: crasher; the supervisor restarts them" in " ".join(result.stdout.split())
    now = read_state(home_settings(home))
    assert now.workers["idle"] == state.workers["idle"] and now.broker == state.broker
    assert now.restarts["crasher"] >= 3


def test_a_killed_broker_comes_back_on_its_port_with_its_topics(home, workers):
    settings = home_settings(home, **FAST)
    state = start_stack(settings)
    kill(state.broker)
    after = wait_for(restarted(home, "broker", state.broker), what="the broker's restart")
    assert after.bootstrap_servers == state.bootstrap_servers and listening(state.broker_port)
    assert after.restarts == {"broker": 1}
    stack_settings = home_settings(home, kafka={"bootstrap_servers": after.bootstrap_servers})
    topics = admin_client(stack_settings).list_topics(timeout=10).topics
    assert set(settings.topics.all()) <= set(topics)
    assert stack_status(home_settings(home))["healthy"] is True


def test_status_fails_when_the_supervisor_is_gone(home, workers):
    state = start_stack(home_settings(home, **FAST))
    kill(state.supervisor)
    report = stack_status(home_settings(home))
    assert report["healthy"] is False
    assert "the supervisor has exited: nothing restarts a part that exits" in report["notes"]
    assert run_cli(home, "status").returncode == 1


def test_a_damaged_state_file_is_named_and_down_force_stops_everything(home, workers):
    state = start_stack(home_settings(home, **FAST))
    kill(state.workers["idle"])  # the supervisor restarts it: one more process to find
    after = wait_for(restarted(home, "idle", state.workers["idle"]), what="the worker's restart")
    state_file = home_settings(home).state_file
    state_file.write_text('{"version": 1, "broker": ')  # cut short, as by a full disk

    for command in (["status"], ["up"], ["down"]):
        result = run_cli(home, *command)
        assert result.returncode == 1, (command, result.stdout)
        assert f"{state_file} is not a readable stack state file" in result.stderr
        assert "`boltstream down --force`" in result.stderr

    forced = run_cli(home, "down", "--force")
    assert forced.returncode == 0, forced.stderr
    everything = [state.broker, state.supervisor, state.workers["idle"], *after.processes().values()]
    assert not any(record.alive() for record in everything)
    assert str(after.workers["idle"].pid) in forced.stdout
    assert not state_file.exists()

    again = start_stack(home_settings(home, **FAST))  # the way out leads back in
    assert again.running() and json.loads(state_file.read_text())["workers"]["idle"]["pid"] == again.workers["idle"].pid
