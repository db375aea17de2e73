"""Keeps the local stack running: restarts a part (the broker or a worker) that exited, with backoff.

``boltstream up`` starts the supervisor as one more detached process of the stack (``stack.supervise``);
``boltstream down`` stops it first, so nothing is restarted while the stack stops. Each round it reads
``stack.json``; a part that is not alive is restarted after ``stack.restart_backoff`` seconds, doubling
with each exit in a row up to ``stack.restart_backoff_max``, and back to the first wait once the part has
run ``stack.healthy_after`` seconds. A restarted part is written back to ``stack.json`` (new pid, restart
count) and noted in ``<home>/processes/``, so ``status`` shows it and ``down`` stops it. The broker comes back
on its port, with its topics created again.

The supervisor takes the stack's lock only to restart, and never waits for it: while an ``up`` or
``down`` holds it, the restart waits for the next round. What it does goes to ``<home>/logs/supervisor.log``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from boltstream.infra.common.config import Settings, StackConfig, load_settings
from boltstream.infra.stack.broker import BrokerError
from boltstream.infra.stack.errors import StackError
from boltstream.infra.stack.lifecycle import restart_broker
from boltstream.infra.stack.processes import ProcessRecord, spawn
from boltstream.infra.stack.state import locked_if_free, read_state, register, write_state
from boltstream.infra.stack.workers import tail

#: Seconds between two looks at the stack.
ROUND = 0.5


def restart_delay(config: StackConfig, exits_in_a_row: int) -> float:
    """How long to wait before restarting a part after its ``exits_in_a_row``-th exit in a row (1, 2, ...)."""
    return min(config.restart_backoff * 2 ** (exits_in_a_row - 1), config.restart_backoff_max)


@dataclass
class _Part:
    """What the supervisor remembers of one part between rounds."""

    exits_in_a_row: int = 0
    restart_due: float | None = None  # time.monotonic() of the pending restart, None when none is pending
    started: float = 0.0  # time.monotonic() of its last restart


class Supervisor:
    """Restarts the exited parts of the stack recorded under ``settings.home``; :meth:`run` until stopped."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.parts: dict[str, _Part] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        """Look after the stack every :data:`ROUND` seconds until SIGTERM, or until the stack is gone."""
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        self.log(f"supervising the stack under {self.settings.home} (pid {os.getpid()})")
        while not self.stopping.is_set():
            self.look()
            self.stopping.wait(ROUND)
        self.log("stopped")

    def look(self) -> None:
        """One round: note parts that exited, restart those whose wait is over."""
        try:
            state = read_state(self.settings)
        except StackError as exc:
            self.log(f"cannot read the stack's state, waiting: {exc}")
            return
        if state is None or (state.supervisor is not None and state.supervisor.pid != os.getpid()):
            self.log("the stack this supervisor looked after is gone")
            self.stopping.set()
            return
        now = time.monotonic()
        for name, record in state.processes().items():
            part = self.parts.setdefault(name, _Part(started=now))
            if record.alive():
                if part.exits_in_a_row and now - part.started >= self.settings.stack.healthy_after:
                    part.exits_in_a_row = 0
                continue
            if part.restart_due is None:
                part.exits_in_a_row += 1
                delay = restart_delay(self.settings.stack, part.exits_in_a_row)
                part.restart_due = now + delay
                self.log(
                    f"{name} (pid {record.pid}) exited ({part.exits_in_a_row} in a row); restarting it in "
                    f"{delay:.1f}s. End of {record.log}:\n{tail(record.log)}"
                )
            if now >= part.restart_due and self.restart(name):
                part.restart_due, part.started = None, time.monotonic()

    def restart(self, name: str) -> bool:
        """Start ``name`` again and record it; False when it has to wait (lock taken, or it failed)."""
        if name == "broker":
            return self.restart_broker()
        with locked_if_free(self.settings) as free:
            if not free or self.stopping.is_set():
                return False
            state = read_state(self.settings)  # again, under the lock: an `up` may have replaced it
            if state is None or name not in state.processes():
                return False
            if state.processes()[name].alive():
                return True
            try:
                record = self.start_worker(state.workers[name])
            except OSError as exc:
                return self.failed(name, exc)
            register(self.settings, name, record)
            restarts = {**state.restarts, name: state.restarts.get(name, 0) + 1}
            write_state(self.settings, replace(state, workers={**state.workers, name: record}, restarts=restarts))
            self.log(f"restarted {name}: pid {record.pid} (restart {restarts[name]})")
            return True

    def restart_broker(self) -> bool:
        """The broker again on its port, with what it can get back (:func:`restart_broker`: the last
        snapshot's compacted topics; the agents send again what it had acknowledged), and the workers
        started again on it."""
        if self.stopping.is_set():
            return False
        try:
            state = restart_broker(self.settings, count_restart=True)
        except (StackError, BrokerError, OSError) as exc:
            return self.failed("broker", exc)
        self.log(f"restarted the broker: pid {state.broker.pid} (restart {state.restarts['broker']}), and the workers")
        for name in state.workers:  # their restart was part of the broker's, not an exit of theirs
            self.parts[name] = _Part(started=time.monotonic())
        return True

    def failed(self, name: str, error: BaseException) -> bool:
        """A restart that did not work: wait longer, then try again."""
        part = self.parts[name]
        part.exits_in_a_row += 1
        part.restart_due = time.monotonic() + restart_delay(self.settings.stack, part.exits_in_a_row)
        self.log(f"restarting {name} failed, trying again in {part.restart_due - time.monotonic():.1f}s: {error}")
        return False

    def start_worker(self, previous: ProcessRecord) -> ProcessRecord:
        """The worker again, as it was started (its environment is this process's: ``up`` gave both the same)."""
        return spawn(list(previous.argv), Path(previous.log), dict(os.environ), self.settings.home)

    def log(self, message: str) -> None:
        print(f"{datetime.now(UTC).isoformat(timespec='seconds')} {message}", flush=True)


def main() -> None:
    """``python -m boltstream.infra.stack.supervisor``, in the environment of the stack's workers."""
    Supervisor(load_settings()).run()


if __name__ == "__main__":
    main()
