"""Auto-tracing from the first line of any Python program, with no import in it: the start-up hook and
``boltstream run``.

**The start-up hook.** Installing boltstream puts ``boltstream-autotrace.pth`` into site-packages; Python's
``site`` module runs its one line at every interpreter start. Unless ``AGENT_LIGHTNING_TRACER`` or
``BOLTSTREAM_AUTO_TRACE`` is set on (``1``, ``true``, ``yes``, ``on``), or the configuration file
(``$BOLTSTREAM_CONFIG``, else ``./boltstream.toml``) says ``auto_trace = true``, that line only looks
(``tests/benchmarks/bench_startup.py`` measures it) and imports nothing; otherwise it calls :func:`activate`,
where the configuration decides as everywhere else (``AGENT_LIGHTNING_TRACER`` over the rest).

**The launcher.** ``boltstream run -- python agent.py`` runs the program with ``AGENT_LIGHTNING_TRACER=1``
and :data:`BOOTSTRAP` first on ``PYTHONPATH``, whose ``sitecustomize`` calls :func:`activate` (then runs
the program's own ``sitecustomize``, if it has one), so it traces even where the ``.pth`` file was not
installed.

Activation never imports ``openai``: it patches the client when the program imports it. It never raises
into the program: a configuration value that cannot be used is a warning naming it, and its default counts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from boltstream.infra.common.config import ENV_PREFIX, TRACER_ENV, Settings
from boltstream.producers.autotrace import instrument_when_imported

#: The folder whose ``sitecustomize.py`` activates tracing in programs started by ``boltstream run``.
BOOTSTRAP = Path(__file__).with_name("_bootstrap")

#: The configuration's switch (``auto_trace``) as an environment variable.
AUTO_TRACE_ENV = f"{ENV_PREFIX}AUTO_TRACE"

_decided: bool | None = None  # whether activate() turned tracing on, once it has decided


def activate() -> bool:
    """Turn on auto-tracing in this process if the environment or the configuration asks for it.

    Returns whether it did. Called by the start-up hook and by ``boltstream run``'s ``sitecustomize``;
    idempotent, and never raises.
    """
    global _decided
    if _decided is not None:  # Python may run a .pth file twice (a venv's site-packages is added twice)
        return _decided
    _decided = False
    try:
        if not _wanted():
            return False
        instrument_when_imported()
        _decided = True
        return True
    except Exception as exc:  # the program runs untraced rather than not at all
        print(f"boltstream: auto-tracing is off: {exc}", file=sys.stderr)
        return False


def _wanted() -> bool:
    if os.environ.get(TRACER_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    from boltstream.producers import runtime

    return runtime.settings().auto_trace  # a value that cannot be used is a warning, its default counts


# -- boltstream run ------------------------------------------------------------------------------------


def run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("program", nargs=argparse.REMAINDER, help="the program and its arguments, after --")


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        print("boltstream run: give the program to run, e.g. `boltstream run -- python agent.py`", file=sys.stderr)
        return 2
    executable = shutil.which(program[0])
    if executable is None:
        print(f"boltstream run: {program[0]}: command not found", file=sys.stderr)
        return 127
    os.execve(executable, program, traced_environment(os.environ))


def traced_environment(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    """``environ`` for a program that ``boltstream run`` starts: tracing on, :data:`BOOTSTRAP` first on the path."""
    path = [str(BOOTSTRAP), *(p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
    environment = {k: v for k, v in environ.items() if k != AUTO_TRACE_ENV}  # the switch below decides
    return {**environment, TRACER_ENV: "1", "PYTHONPATH": os.pathsep.join(path)}
