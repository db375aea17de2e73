"""boltstream: reinforcement learning for AI agents that keep serving.

This is the one import root of the installed distribution. The repository keeps one folder per job and
the distribution exposes each of them under this name (see ``[tool.setuptools.package-dir]``):

=============================  ===================================================================
``boltstream.schemas``         Avro records (every version kept), their codecs, the ClickHouse DDL
``boltstream.infra.common``    typed configuration, topic administration, ports, contract constants
``boltstream.producers``       the agent-side SDK (``from boltstream import agl``)
``boltstream.stream_processors``  the join, credit assignment, the ClickHouse archive, replay
``boltstream.trainer``         the DeepSpeed trainer, its algorithms, checkpoints, weight publishing
``boltstream.infra.serving``   vLLM launcher, weight_sync sidecar, router, canary analysis
``boltstream.infra.stack``     the local stack (broker, workers, state) behind ``boltstream up``
``boltstream.infra.demo``      the closed-loop demo: its model, task, fleet and report
``boltstream.infra.cli``       the ``boltstream`` command
=============================  ===================================================================

Each package imports only the ones above it in this table (``tests/test_layers.py`` checks it).
"""

import os as _os

#: The source checkout this package runs from, or None for an installed wheel. From a checkout (an editable
#: install, or a worktree on PYTHONPATH) the subpackages are the checkout's top-level folders.
CHECKOUT: str | None = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(CHECKOUT, "pyproject.toml")) and _os.path.isdir(_os.path.join(CHECKOUT, "producers")):
    __path__.append(CHECKOUT)
else:
    CHECKOUT = None
