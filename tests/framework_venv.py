"""The virtual environment for agent frameworks that cannot be installed beside the project's pins.

AutoGen (it needs protobuf 5, the project has 7), LiteLLM (its boto3 needs python-dateutil 2, the
project has 4) and CrewAI (it pins its own openai, pydantic, httpx and about fifty more) each resolve
fine together, but not with the project. Their examples run in one environment of their own that
:func:`framework_python` builds on first use and caches under ``~/.cache/boltstream/test-venvs/``
(``$BOLTSTREAM_TEST_VENVS`` elsewhere), keyed by the pinned requirement set and the Python version: a
new pin builds a new environment, an unchanged one is reused. PyPI (or the configured index) must be
reachable for the first build, which takes a few minutes and prints its progress.

Boltstream itself is not installed there: the SDK's own dependencies are, the checkout comes on
``PYTHONPATH`` (as for every child process the tests start), and the start-up hook
``boltstream-autotrace.pth`` is copied into the environment's site-packages, as ``infra/install.sh``
does for the project's environment.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: The framework versions the examples were tested with (exact, so CI is reproducible).
FRAMEWORK_PINS = (
    "autogen-agentchat==0.7.5",
    "autogen-ext[openai]==0.7.5",
    "crewai==1.15.30",
    "litellm==1.110.2",
)


def requirements() -> list[str]:
    """The framework pins and the light SDK's dependencies (pyproject ``dependencies``)."""
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    return [*FRAMEWORK_PINS, *project["dependencies"]]


def venv_root() -> Path:
    configured = os.environ.get("BOLTSTREAM_TEST_VENVS")
    return Path(configured) if configured else Path.home() / ".cache" / "boltstream" / "test-venvs"


def venv_path() -> Path:
    key = hashlib.sha256("\n".join([sys.version.split()[0], *requirements()]).encode()).hexdigest()[:12]
    return venv_root() / f"frameworks-{key}"


def _progress(message: str) -> None:
    # pytest captures stdout and stderr; the build can take minutes, so say what it does on the terminal.
    print(f"boltstream tests: {message}", file=sys.__stderr__, flush=True)


def _site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def _build(target: Path) -> None:
    staging = target.with_name(target.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    _progress(f"building the agent-framework environment {target} (first run only; a few minutes)")
    subprocess.run([base, "-m", "venv", str(staging)], check=True)
    python = staging / "bin" / "python"
    pins = requirements()
    _progress("installing " + " ".join(pins))
    # pip's own output (one line per package) goes to the terminal as progress.
    subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off", *pins],
        check=True,
        stdout=sys.__stderr__,
        stderr=sys.__stderr__,
    )
    staging.rename(target)  # only a complete environment ever has the final name
    _progress(f"agent-framework environment ready: {target}")


def framework_python() -> Path:
    """The Python of the cached framework environment (built first if absent), with the start-up hook."""
    target = venv_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / (target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs never build the same environment at once
        if not (target / "bin" / "python").exists():
            _build(target)
    python = target / "bin" / "python"
    hook = PROJECT_ROOT / "boltstream-autotrace.pth"
    installed = _site_packages(python) / hook.name
    if not installed.exists() or installed.read_bytes() != hook.read_bytes():
        shutil.copyfile(hook, installed)
    return python
