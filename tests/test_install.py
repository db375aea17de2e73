"""The README's install command touches nothing outside the virtual environment it installs into."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ["bash", str(ROOT / "infra" / "install.sh")]


def freeze(python: str) -> str:
    return subprocess.run([python, "-m", "pip", "freeze", "--all"], check=True, capture_output=True, text=True).stdout


def activated(environment: Path) -> dict[str, str]:
    """The environment variables of a shell in which ``environment`` was activated."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return env | {"VIRTUAL_ENV": str(environment), "PATH": f"{environment / 'bin'}{os.pathsep}{os.environ['PATH']}"}


def interpreters() -> set[str]:
    """The interpreters the install could have touched: the one running the tests and the base one."""
    return {sys.executable, getattr(sys, "_base_executable", sys.executable)}


@pytest.mark.slow
def test_an_install_into_a_fresh_environment_changes_nothing_outside_it(tmp_path: Path) -> None:
    before = {python: freeze(python) for python in interpreters()}
    environment = tmp_path / "env"
    venv.create(environment, with_pip=True)
    done = subprocess.run(INSTALL, cwd=tmp_path, env=activated(environment), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"installed in {environment}" in done.stdout.splitlines()[-1]
    assert "ERROR" not in done.stderr  # the known resolver conflict is one plain line, not pip's red ERROR
    python = str(environment / "bin" / "python")
    subprocess.run([python, "-c", "import boltstream.infra.cli, vllm, deepspeed, faust"], check=True)
    assert {python: freeze(python) for python in interpreters()} == before


@pytest.mark.slow
def test_an_install_that_would_downgrade_an_activated_environment_is_refused(tmp_path: Path) -> None:
    environment = tmp_path / "env"
    venv.create(environment, with_pip=True)
    python = str(environment / "bin" / "python")
    # faust-streaming (the [stream] extra) declares click<8.4: installing it here would downgrade click.
    subprocess.run([python, "-m", "pip", "install", "-q", "click==8.5.1"], check=True, capture_output=True)
    before = freeze(python)
    done = subprocess.run(INSTALL, cwd=tmp_path, env=activated(environment), capture_output=True, text=True)
    assert done.returncode != 0
    assert "would downgrade click 8.5.1 ->" in done.stderr, done.stderr[-3000:]
    assert freeze(python) == before
