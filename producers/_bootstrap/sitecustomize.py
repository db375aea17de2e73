"""Run by Python at start-up in a program that ``boltstream run`` started (this folder is first on its
``PYTHONPATH``): turns auto-tracing on, then runs the program's own ``sitecustomize``, if it has one."""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path


def _run_the_programs_own_sitecustomize() -> None:
    here = Path(__file__).resolve().parent
    elsewhere = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", elsewhere)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


try:
    from boltstream.producers.startup import activate
except ImportError as exc:
    print(f"boltstream run: {sys.executable} cannot import boltstream ({exc}); running untraced", file=sys.stderr)
else:
    activate()
_run_the_programs_own_sitecustomize()
