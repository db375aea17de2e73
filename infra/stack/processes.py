"""The stack's processes: starting one detached, telling whether it still runs, and stopping it by pid.

A :class:`ProcessRecord` keeps the kernel's start time next to the pid, so a process is found again
from another command (``boltstream down``) and a pid the kernel has since given to another process is
never taken for it, nor signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from boltstream.infra.stack.errors import StackError

#: Processes this interpreter started, kept so stopping them from here also reaps them (no zombies).
_CHILDREN: dict[int, subprocess.Popen] = {}


_PROCFS = Path("/proc/self/stat").exists()


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3 and on of ``/proc/<pid>/stat`` (state, ppid, ...), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; the fields after the last ")" are plain.
    return stat.rsplit(")", 1)[1].split()


def _start_ticks(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None without procfs."""
    stat = _proc_stat(pid) if _PROCFS else None
    return int(stat[19]) if stat else None


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether ``pid`` runs and, when ``start_ticks`` is known, is still the process that was started."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[pid]
        return False
    if _PROCFS:
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):  # gone, or exited and waiting for its parent to reap it
            return False
        return start_ticks is None or int(stat[19]) == start_ticks
    try:  # no procfs: signal 0 tells existence, not identity
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class ProcessRecord:
    """One process of the stack: enough to find it again and to tell it from a reused pid."""

    pid: int
    argv: tuple[str, ...]
    log: str
    start_ticks: int | None

    def alive(self) -> bool:
        return process_alive(self.pid, self.start_ticks)


def adopt(process: subprocess.Popen, log: Path) -> ProcessRecord:
    """The record of ``process``, started here and logging to ``log``; stopping it from here reaps it."""
    _CHILDREN[process.pid] = process
    return ProcessRecord(process.pid, tuple(str(a) for a in process.args), str(log), _start_ticks(process.pid))


def spawn(argv: list[str], log: Path, env: dict[str, str], cwd: Path) -> ProcessRecord:
    """Start ``argv`` detached from this terminal, in a session of its own, its output appended to ``log``."""
    with log.open("ab") as handle:
        process = subprocess.Popen(
            argv,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,  # no terminal, no Ctrl-C from the shell that ran `up`
        )
    return adopt(process, log)


def _signal(record: ProcessRecord, signum: int) -> None:
    try:
        # Each process leads its own session, so signalling the group also reaches anything it spawned.
        if os.getpgid(record.pid) == record.pid:
            os.killpg(record.pid, signum)
        else:
            os.kill(record.pid, signum)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        raise StackError(f"not allowed to stop pid {record.pid} ({' '.join(record.argv[:4])}): {exc}") from None


def _wait_gone(records: list[ProcessRecord], timeout: float) -> list[ProcessRecord]:
    deadline = time.monotonic() + timeout
    while records and time.monotonic() < deadline:
        time.sleep(0.05)
        records = [r for r in records if r.alive()]
    return records


def stop_processes(records: Iterable[ProcessRecord], timeout: float) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL whatever is left."""
    running = [r for r in records if r.alive()]
    for record in running:
        _signal(record, signal.SIGTERM)
    running = _wait_gone(running, timeout)
    for record in running:
        _signal(record, signal.SIGKILL)
    stuck = _wait_gone(running, 5.0)
    if stuck:
        raise StackError(f"pid(s) {', '.join(str(r.pid) for r in stuck)} survived SIGKILL")
