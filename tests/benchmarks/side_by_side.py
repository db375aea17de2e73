"""Run benchmarks on an earlier commit and on this checkout, alternating, and print their figures together.

    python tests/benchmarks/side_by_side.py BASE [--rounds 2] [bench_producer.py ...] [-k EXPR]

BASE is any commit (e.g. the previous landing). Its code runs from a temporary git worktree with the same
installed dependencies. The rounds alternate base, head, head, base ... so neither a load change on the
shared machine nor going first favours one side. Full logs go to ``--logs`` (default: a temporary
directory); the figure lines each benchmark prints are shown per round. Without benchmark names, every
``bench_*.py`` is run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: A printed line is a figure when it has a number with a unit or a ratio, or a number in thousands.
FIGURE = re.compile(r"\d.*(/s|µs|\bus\b|\bms\b|×|%|\bx\b)|\d{1,3}(,\d{3})+")


def worktree_at(commit: str, directory: Path) -> Path:
    subprocess.run(["git", "worktree", "add", "--detach", str(directory), commit], cwd=ROOT, check=True)
    for built in (ROOT / "producers").glob("*.so"):  # the C pre-scan, built by the install, not in git
        shutil.copy(built, directory / "producers" / built.name)
    return directory


def run(checkout: Path, benchmark: str, keyword: str | None, log: Path) -> list[str]:
    command = [sys.executable, "-m", "pytest", f"tests/benchmarks/{benchmark}", "-m", "benchmark", "-s", "-q"]
    command += ["-p", "no:cacheprovider", *(["-k", keyword] if keyword else [])]
    # Child processes the benchmark starts (archive, join workers) must import the same checkout's code.
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    figures = [line.rstrip() for line in done.stdout.splitlines() if FIGURE.search(line) and "passed" not in line]
    return figures if done.returncode == 0 else [*figures, f"FAILED (exit {done.returncode}), see {log}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the commit to compare with")
    parser.add_argument("benchmarks", nargs="*", help="bench_*.py files (default: all)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    parser.add_argument("--logs", type=Path, default=None)
    args = parser.parse_args()
    benchmarks = args.benchmarks or sorted(p.name for p in (ROOT / "tests" / "benchmarks").glob("bench_*.py"))
    logs = args.logs or Path(tempfile.mkdtemp(prefix="side-by-side-"))
    logs.mkdir(parents=True, exist_ok=True)
    base = worktree_at(args.base, Path(tempfile.mkdtemp(prefix="base-")) / "checkout")
    try:
        for benchmark in benchmarks:
            for round_number in range(1, args.rounds + 1):
                sides = [("base", base), ("head", ROOT)]
                for side, checkout in sides if round_number % 2 else reversed(sides):  # who goes first alternates
                    log = logs / f"{benchmark}.{side}.{round_number}.log"
                    print(f"== {benchmark} round {round_number} {side}", flush=True)
                    for line in run(checkout, benchmark, args.keyword, log):
                        print(f"   {line}", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
        shutil.rmtree(base.parent, ignore_errors=True)
    print(f"logs: {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
