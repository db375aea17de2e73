"""Every place the join worker reaches past Faust's public API (faust-streaming 0.15), what in Faust each
one works around, and the test that shows it. Nothing else in boltstream touches Faust's internals.

1. :class:`TableValue` — a table's ``value_type`` is expected to be a Faust ``Record``; Faust only reads
   its serializer from ``_options`` and passes decoded values to ``from_data``. The join keeps its own
   state objects (compact JSON, see ``join_core.dumps_state``), so this stand-in hands them through.
   Shown by ``tests/test_join.py::test_sigkill_and_restart_leave_the_output_identical`` (states restored
   from the changelog) and ``tests/test_join_core.py::test_state_survives_the_changelog_round_trip``.
2. :func:`shorten_fetch_wait` — Faust builds its aiokafka consumer with a fixed ``fetch_max_wait_ms`` of
   1500 and exposes no setting; the embedded broker answers an empty fetch only when that wait is over,
   even if records arrive meanwhile, so reward → sample latency would average ~0.75 s. Shown by
   ``tests/benchmarks/bench_join.py`` (reward → sample p99 well under 1 s).
3. :func:`bound_commits` — Faust commits what its consumer acknowledged, and acknowledges offsets the
   join never applied: a gap between two records it hands on counts as acknowledged (``_add_gap``), and
   a partition whose first acknowledged offset is the committed one + 1 is committed past the committed
   one (an off-by-one in ``Consumer._new_offset``). After a rebalance, Faust resumes the partitions before
   it seeks them to the committed offsets and hands on records its fetcher buffered from where the last
   generation left off, so records dropped at the revocation were committed unapplied (rollouts lost in
   the live SIGKILL and 1 -> 2 -> 3 -> 1 fault scenarios). The join applies each partition strictly in
   offset order from the committed offset (``JoinWorker._on_recovered``, ``_in_order``) and this bounds
   every commit by the next offset it has to apply. Shown by ``tests/faults/test_join_faults.py``.
4. Reading inputs again (``JoinWorker._read_again``, public ``consumer.seek_wait``, ``seek_to_committed`` and
   ``position``) — from the committed offsets at every (re)assignment, and from a hole in the offsets
   delivered. ``seek_wait``, not ``seek``: Faust's ``seek`` changes the aiokafka consumer from the event
   loop's thread while the consumer's thread fetches (a ``KeyError`` in aiokafka's fetcher crashed a
   worker in a 1 -> 2 -> 3 -> 1 run); ``seek_wait`` runs in the consumer's thread. Counted in
   ``boltstream_join_inputs_read_again`` (not the seeks of an assignment), which stays 0 in a steady run
   (``tests/test_join.py::test_quiet_partitions_are_not_read_again``, the demo's sparse traffic) and in
   every fault scenario (``tests/faults/test_join_faults.py``) now that the two causes of holes below are
   handled. One is handled without reading again: :func:`committed_offset` reads Faust's
   ``Consumer._committed_offset``, because after the join's seek at an assignment Faust seeks to the committed
   offsets again (``perform_seek``) and a commit of the last generation that lands in between moves it past
   the join's start; the join goes on from there
   (``tests/test_join.py::test_inputs_committed_after_an_assignment_read_its_offsets_are_not_read_again``).
   The other is 6.
5. Changelog writes sent straight to the producer, the partition clocks alone and last
   (``JoinWorker._flush``) — Faust's ``send_soon`` buffer publishes one record per await (the worker's
   bottleneck), and its recovery stops at the high watermark, which the embedded broker reports as the
   first offset of the last record batch + 1. Shown by the SIGKILL test and
   ``tests/test_join_crash.py`` (write order), and by ``tests/benchmarks/bench_join.py`` (throughput).
   The same quirk fails Faust's ``recovery_consistency_check`` (the offset recovery last read is above the
   high watermark reported later): it crashed workers in live 1 -> 2 -> 3 -> 1 fault runs, so the join
   turns it off.
6. :func:`keep_inputs_on_resume` — Faust's flow control empties every stream's input queue whenever it is
   resumed, also when it was not suspended. At the end of an assignment's changelog recovery, Faust resumes
   the input partitions and seeks them to the committed offsets (the fetcher keeps running, so records
   arrive meanwhile), and only then resumes the flow control, which was resumed already for the recovery:
   the records queued in between were dropped, though Faust had read past them. The join read them again
   (in 1 to 3 of 5 live 1 -> 2 -> 3 -> 1 runs, up to one hole per input partition). A resume now empties the
   input queues only if the flow was suspended (they then hold records of the last generation); the
   changelog queue is emptied as before. Shown by
   ``tests/test_join.py::test_resuming_a_running_flow_keeps_the_queued_inputs`` and by the fault scenarios,
   which allow no input read again.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from types import SimpleNamespace
from typing import Any

import faust
from faust.serializers import codecs


def register_value_codec(name: str, dumps: Callable[[Any], bytes | None], loads: Callable[[bytes], Any]) -> None:
    """Register a Faust serializer ``name`` that stores table values with ``dumps`` / ``loads``."""

    class _Codec(codecs.Codec):
        def _dumps(self, value: Any) -> bytes | None:
            return dumps(value)

        def _loads(self, data: bytes) -> Any:
            return loads(data)

    codecs.register(name, _Codec())


def table_value(serializer: str) -> type:
    """A ``value_type`` for ``app.Table`` whose values are whatever the ``serializer`` codec decodes to (1.)."""

    class TableValue:
        _options = SimpleNamespace(serializer=serializer)

        @staticmethod
        def from_data(data: Any, preferred_type: Any = None) -> Any:
            return data

    return TableValue


def shorten_fetch_wait(app: faust.App, milliseconds: int) -> None:
    """Set the wait of the app's aiokafka fetcher once it exists (2.); a no-op before and after."""
    consumer = getattr(getattr(app.consumer, "_thread", None), "_consumer", None)
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is not None and getattr(fetcher, "_fetch_max_wait_ms", None) != milliseconds:
        fetcher._fetch_max_wait_ms = milliseconds


def committed_offset(app: faust.App, topic: str, partition: int) -> int | None:
    """The offset of ``topic[partition]`` Faust last committed or sought to as committed, None if it has none
    (4.). Faust keeps it after its own seek to the committed offsets, which follows the join's at every
    assignment."""
    return app.consumer._committed_offset.get(faust.types.TP(topic, partition))


def keep_inputs_on_resume(app: faust.App) -> None:
    """Resume the app's flow control without emptying its input queues unless it was suspended (6.)."""
    flow_control = app.flow_control
    resume = flow_control.resume

    def resume_keeping_inputs() -> None:
        if flow_control.is_active():
            app.tables.changelog_queue.clear()  # what Faust's resume empties of it, as before
            return
        resume()

    flow_control.resume = resume_keeping_inputs


def bound_commits(app: faust.App, topics: Collection[str], bound: Callable[[str, int], int | None]) -> None:
    """Commit no offset of a partition of ``topics`` past ``bound(topic, partition)`` (the first offset not
    processed), nothing where it is None (3.). Other topics are committed as Faust decides."""
    consumer = app.consumer
    new_offset = consumer._new_offset

    def bounded(tp: faust.types.TP) -> int | None:
        offset = new_offset(tp)
        if offset is None or tp.topic not in topics:
            return offset
        limit = bound(tp.topic, tp.partition)
        return None if limit is None else min(offset, limit)

    consumer._new_offset = bounded
