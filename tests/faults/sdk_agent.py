"""An agent for the SDK fault scenarios: rollouts with known event ids, in a thread of a test or as a process
of its own (``python sdk_agent.py survivor STOP_FILE`` or ``python sdk_agent.py victim ROLLOUTS``).

``survivor`` emits rollouts until STOP_FILE exists, then flushes and prints a JSON report (whether the
flush delivered everything, the SDK's counters, the event ids it emitted). ``victim`` emits ROLLOUTS
rollouts, waits until none of them is held in memory any more (delivered or spooled), prints ``SPOOLED``
and their event ids, and waits to be killed.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from boltstream import agl


class Traffic:
    """An agent thread running rollouts (a decision, a tool call, a reward) until stopped; it records the
    event id of every span it emitted."""

    def __init__(self, payload_bytes: int = 0, pause: float = 0.01) -> None:
        self.emitted: list[str] = []
        self.payload = "p" * payload_bytes
        self.pause = pause
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-traffic")

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def rollout(self, step: int) -> None:
        with agl.rollout(task_id=f"task-{step % 7}", agent_name="fault-agent") as run:
            ids = [
                agl.emit_decision("search", payload=self.payload),
                agl.emit_tool_call("search", {"step": step}, result=self.payload),
                agl.emit_reward(float(step % 3)),
            ]
        self.emitted += [*ids, run.root_id]

    def _run(self) -> None:
        step = 0
        while not self._stop.is_set():
            self.rollout(step)
            step += 1
            time.sleep(self.pause)


def survivor(stop_file: Path) -> None:
    agl.configure()  # owns the program's spool directory: it starts first
    print("READY", flush=True)
    with Traffic(pause=0.05) as traffic:
        while not stop_file.exists():
            time.sleep(0.2)
    flushed = agl.flush(90)
    print(json.dumps({"flushed": flushed, "stats": agl.stats(), "emitted": traffic.emitted}), flush=True)
    agl.shutdown(5)


def victim(rollouts: int) -> None:
    agl.configure()
    traffic = Traffic()
    for step in range(rollouts):
        traffic.rollout(step)
    agl.flush(0)  # ends implicit rollouts; the broker does not answer, so nothing more
    deadline = time.monotonic() + 120
    while agl.stats()["in_memory"] and time.monotonic() < deadline:
        time.sleep(0.2)
    stats = agl.stats()
    if stats["in_memory"] or stats["spool_dropped_messages"]:
        raise SystemExit(f"not all spooled: {stats}")
    print("SPOOLED", json.dumps(traffic.emitted), flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    if sys.argv[1] == "survivor":
        survivor(Path(sys.argv[2]))
    else:
        victim(int(sys.argv[2]))
