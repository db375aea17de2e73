"""The README's "Your first hour" runs as written: every fenced block of the section, in order, against a real
local stack (broker, archive, join) in a fresh BOLTSTREAM_HOME.

Bash blocks run with ``bash -e -c`` and a ``boltstream`` on PATH that runs this checkout's CLI (CI may not have
the console script on PATH); Python blocks run with this interpreter. Every step must exit 0. The steps
that read the archive are retried for a while until they show what the agent sent: the archive and the join
work asynchronously, and a person reading the README is slower than this test. The stack is stopped at the
end whatever happens.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "Your first hour"
#: How long a step that reads the archive is retried until it shows what it should.
SETTLE_SECONDS = 60.0


def section_blocks(readme: str, title: str) -> list[tuple[str, str]]:
    """The fenced blocks of the README section ``## title`` (up to the next ``## ``), as (language, code)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", readme, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no section '## {title}'"
    blocks = []
    for fence in re.finditer(r"^( *)```(\w+)\n(.*?)^\1```$", match.group(1), re.MULTILINE | re.DOTALL):
        indent, language, body = fence.groups()
        code = "\n".join(line.removeprefix(indent) for line in body.splitlines())
        blocks.append((language, code + "\n"))
    return blocks


def shim(directory: Path) -> Path:
    """A ``boltstream`` executable in ``directory`` that runs this interpreter's CLI of this checkout."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "boltstream"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m boltstream.infra.cli "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def expectations(code: str, agent: str, tasks: list[str]) -> list[str]:
    """What a step's output must show once the archive and the join have the agent's data (one entry per
    occurrence); [] for a step that shows none of it."""
    wanted: list[str] = []
    for line in code.splitlines():
        if "FROM spans" in line:
            wanted += [agent, "rollout", "decision", "tool_call", "reward"]
        elif "FROM trajectories" in line:
            wanted += [*tasks, *["complete"] * len(tasks)]
        elif "FROM rewards" in line:
            wanted += ["verifier"]
        elif "report tool_error_rate" in line:
            wanted += ["calculator"]
        elif "report outcome_rates" in line:
            wanted += [agent]
    return wanted


def shows(output: str, wanted: list[str]) -> bool:
    return all(output.count(word) >= wanted.count(word) for word in wanted)


def run_step(language: str, code: str, index: int, work: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    if language == "bash":
        argv = ["bash", "-e", "-c", code]
    elif language == "python":
        script = work / f"step{index}.py"
        script.write_text(code)
        argv = [sys.executable, script.name]
    else:
        raise AssertionError(f"step {index}: a fenced block of language {language!r}; the test runs bash and python")
    return subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=180)


def test_the_readme_first_hour_runs_as_written(tmp_path: Path) -> None:
    blocks = section_blocks((ROOT / "README.md").read_text(), SECTION)
    assert blocks[0] == ("bash", "boltstream up\n") and blocks[-1] == ("bash", "boltstream down\n")
    (agent_code,) = [code for language, code in blocks if language == "python"]
    agent = re.search(r'agent_name="([^"]+)"', agent_code).group(1)
    tasks = sorted(set(re.findall(r'"(t-\d+)"', agent_code)))

    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    bin_dir = shim(tmp_path / "bin").parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOLTSTREAM_") and k != "AGENT_LIGHTNING_TRACER"}
    env.update(
        BOLTSTREAM_HOME=str(home),
        PATH=os.pathsep.join([str(bin_dir), env.get("PATH", "")]),
        COLUMNS="200",  # rich tables wider than the 80 columns of a pipe, so no cell is cut
    )
    try:
        for index, (language, code) in enumerate(blocks, 1):
            wanted = expectations(code, agent, tasks)
            deadline = time.monotonic() + SETTLE_SECONDS
            while True:
                done = run_step(language, code, index, work, env)
                assert done.returncode == 0, (
                    f"step {index} exited {done.returncode}:\n{code}\n{done.stdout}{done.stderr}"
                )
                if shows(done.stdout, wanted) or time.monotonic() > deadline:
                    break
                time.sleep(1.0)
            assert shows(done.stdout, wanted), f"step {index} does not show {wanted}:\n{code}\n{done.stdout}"
            if code.startswith("boltstream down"):
                assert "stopped broker" in done.stdout
        assert not (home / "stack.json").exists()
    finally:
        subprocess.run(
            [sys.executable, "-m", "boltstream.infra.cli", "down"], env=env, cwd=work, capture_output=True, timeout=60
        )
