"""`boltstream status` shows what the archive worker does: archiving, or waiting (since when, for what)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from boltstream.infra.stack import lifecycle
from boltstream.infra.stack.lifecycle import start_stack
from boltstream.infra.stack.workers import Worker
from boltstream.stream_processors.archive import StateFile
from tests.test_stack import home_settings, run_cli

#: A real process in the archive's place: the state file is what status reads of it.
ARCHIVE_STAND_IN = {"archive": Worker(argv=("{python}", "-c", "import time; time.sleep(3600)"), settle=0.3)}


def test_status_shows_what_the_archive_waits_for(home, monkeypatch):
    monkeypatch.setattr(lifecycle, "WORKERS", ARCHIVE_STAND_IN)
    state = start_stack(home_settings(home))
    pid = state.workers["archive"].pid
    archive = StateFile(home, pid=pid)
    archive.update(state="archiving", messages=1200, dead_letters=1)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    StateFile(home, pid=gone.pid).update(state="waiting")  # a SIGKILLed worker's file: not shown
    report = json.loads(run_cli(home, "status", "--json").stdout)
    assert [(a["pid"], a["state"], a["messages"]) for a in report["archive"]] == [(pid, "archiving", 1200)]
    shown = run_cli(home, "status").stdout
    assert f"archive (pid {pid}): archiving (1,200 messages archived, 1 dead-lettered" in " ".join(shown.split())

    problem = "inserting into spans: disk full (code 243 NOT_ENOUGH_SPACE): Cannot reserve 2.98 MiB"
    archive.update(state="waiting", problem=problem, since=time.time() - 42, attempts=5, next_attempt_at=time.time())
    shown = " ".join(run_cli(home, "status").stdout.split())
    assert f"archive (pid {pid}): waiting since " in shown and f"{problem}; 5 failed attempts" in shown

    archive.remove()  # a worker that said nothing (or stopped cleanly): nothing shown
    assert json.loads(run_cli(home, "status", "--json").stdout)["archive"] == []
