"""The local stack: the processes ``boltstream up`` starts on one machine, and ``status`` / ``down``.

It owns the embedded broker process (Tansu), the topics of DESIGN.md on it, the worker processes of
:data:`workers.WORKERS` (the archive worker owns the chDB store and serves reads over loopback HTTP), and two
files under ``<home>``: ``stack.json``, what runs where (read back by the configuration loader to point clients
at the stack), and ``stack.toml``, the settings the workers run with. Every process is detached (its
own session, its log in ``<home>/logs``), so the stack outlives the command that started it and is
stopped by pid. ``down`` leaves the broker's topics and offsets in ``<home>/snapshot`` for the next ``up``.

``broker``      the embedded Tansu broker process
``processes``   starting a detached process, whether it still runs, stopping it by pid
``state``       the files under ``<home>``: :class:`StackState` in ``stack.json``, worker settings, the lock
``workers``     how each worker runs (:data:`WORKERS`), its environment, when it is ready
``lifecycle``   :func:`start_stack`, :func:`stop_stack`, :func:`restart_broker` (a broker that died)
``snapshot``    the broker's content on disk between ``down`` and ``up`` (``<home>/snapshot``)
``status``      :func:`stack_status` gathers what runs; :func:`print_status` prints it
``commands``    the ``up`` / ``status`` / ``down`` command lines
``errors``      :class:`StackError` and :class:`StackRunningError`

:func:`boltstream.infra.common.topics.ensure_topics` creates the topics.
"""
