"""The join worker end to end: real broker, workers as subprocesses, realistic traffic.

"Identical" below means: the same set of distinct trajectory ids and sample ids, for each id the same
record, and the same dead letters (by source partition, offset, type and reason); the one field
left out is ``Trajectory.duplicate_count`` (duplicates seen before the close; how many arrive before
it depends on how the spans and rewards topics interleave in one run). Outputs are at-least-once, so
records are compared after deduping by id.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import faust
import pytest

from boltstream.infra.common.config import load_settings
from boltstream.infra.common.ports import free_port
from boltstream.schemas.codec import codec
from boltstream.stream_processors.join import JoinWorker, join_metrics_urls, join_status
from boltstream.stream_processors.join_core import trajectory_id
from tests.join_harness import Collector, JoinProcess, copy_topics, join_settings, prepare, produce_live
from tests.records import make_span
from tests.traffic import Message, Traffic, generate, verify

TIMEOUT = 2.0
ROLLOUTS = 600


def run_join(settings, traffic: Traffic, workers: int = 1, kill_after: int = 0) -> dict[str, Any]:
    """Produce ``traffic``, run ``workers`` join workers until every rollout closed, return what came out.

    With ``kill_after``, the first worker is SIGKILLed once that many trajectories are out, and restarted.
    """
    prepare(settings)
    traffic.produce(settings)
    processes = [JoinProcess(settings, name=f"join{i}") for i in range(workers)]
    trajectories = Collector(settings, settings.topics.trajectories, "Trajectory", "trajectory_id")
    samples = Collector(settings, settings.topics.samples, "TrainingSample", "sample_id")
    dead = Collector(settings, settings.topics.dlq, "DeadLetter", "event_id")
    try:
        if kill_after:
            trajectories.until(kill_after, 90)
            assert len(trajectories.records) >= kill_after, processes[0].log()
            processes[0].kill()
            processes[0] = JoinProcess(settings, name="join-restarted")
        trajectories.until(len(traffic.expected), 120)
        assert len(trajectories.records) == len(traffic.expected), processes[0].log()
        samples.until(sum(len(e.calls) for e in traffic.expected.values() if e.status == "complete"), 30)
        dead.until(sum(traffic.dead_letters.values()), 30)
        assert sorted(join_metrics_urls(settings)) == sorted(p.metrics_url for p in processes)
        statuses = [join_status(p.metrics_url) for p in processes]
    finally:
        for process in processes:
            process.stop()
        for collector in (trajectories, samples, dead):
            collector.close()
    return {
        "trajectories": trajectories.records,
        "samples": samples.records,
        "dead_letters": dead.records,
        "deliveries": trajectories.deliveries,
        "statuses": statuses,
        "logs": [process.log_path.read_text() for process in processes],
    }


def comparable(result: dict[str, Any]) -> tuple:
    trajectories = {k: {**v, "duplicate_count": None} for k, v in result["trajectories"].items()}
    # Dead-letter ids include the source topic's name, which differs between runs: compare their coordinates.
    dead = {
        (d["source_partition"], d["source_offset"], d["error_type"], d["reason"])
        for d in result["dead_letters"].values()
    }
    return trajectories, result["samples"], dead


@pytest.fixture(scope="module")
def baseline(broker, tmp_path_factory) -> Iterator[tuple[Any, Traffic, dict[str, Any]]]:
    """One undisturbed single-worker run over the module's traffic."""
    suffix = uuid.uuid4().hex[:8]
    settings = load_settings(
        environ={"BOLTSTREAM_HOME": str(tmp_path_factory.mktemp("join"))},
        kafka={"bootstrap_servers": broker.bootstrap_servers},
        topics={n: f"j{suffix}.{n}" for n in ("spans", "rewards", "trajectories", "samples", "dlq")},
    )
    settings = join_settings(settings, TIMEOUT, credit_assignment="per_step")
    traffic = generate(11, ROLLOUTS, TIMEOUT)
    yield settings, traffic, run_join(settings, traffic)


def test_one_worker_joins_realistic_traffic_exactly(baseline) -> None:
    _, traffic, result = baseline
    verify(traffic, list(result["trajectories"].values()), list(result["samples"].values()), "per_step", 0.9)
    assert Counter(d["error_type"] for d in result["dead_letters"].values()) == traffic.dead_letters
    status = result["statuses"][0]
    expected = Counter(e.status for e in traffic.expected.values())
    assert status["trajectories"] == {s: expected[s] for s in ("complete", "timed_out", "no_reward", "orphaned")}
    assert status["open_trajectories"] == 0 and status["late_rewards"] == traffic.dead_letters["late_reward"]
    assert status["spans"] >= traffic.span_count and status["internal_errors"] == 0
    assert status["inputs_read_again"] == 0
    assert set(status["lag"].values()) == {0}


def test_sigkill_and_restart_leave_the_output_identical(baseline) -> None:
    settings, traffic, undisturbed = baseline
    disturbed = run_join(copy_topics(settings), traffic, kill_after=ROLLOUTS // 5)
    assert comparable(disturbed) == comparable(undisturbed)


def test_two_workers_sharing_the_load_produce_what_one_does(baseline) -> None:
    settings, traffic, single = baseline
    shared = run_join(copy_topics(settings), traffic, workers=2)
    assert comparable(shared) == comparable(single)
    assert all(status["spans"] > 0 for status in shared["statuses"]), "one worker got no partitions"
    assert [status["inputs_read_again"] for status in shared["statuses"]] == [0, 0]


def test_worker_survives_bad_input_only(broker, settings) -> None:
    settings = join_settings(settings, TIMEOUT)
    traffic = generate(1, 0, TIMEOUT)
    result = run_join(settings, traffic)  # join_status answering at the end shows the worker stayed up
    assert result["trajectories"] == {}
    assert Counter(d["error_type"] for d in result["dead_letters"].values()) == traffic.dead_letters
    reasons = sorted(d["reason"] for d in result["dead_letters"].values())
    assert any("negative duration" in r for r in reasons) and any("non-finite reward" in r for r in reasons)
    assert result["statuses"][0]["dead_letters"]["decode_error"] == 2
    topics, group = settings.topics, re.escape(settings.stream.join_group)
    started = f"boltstream join: {topics.spans} and {topics.rewards} into {topics.trajectories} and {topics.samples}"
    assert started in result["logs"][0]
    metrics = rf"consumer group {group}, rollout state in {group}-rollouts-changelog, metrics http://127\.0\.0\.1:\d+/"
    assert re.search(metrics, result["logs"][0]), result["logs"][0]
    assert "stops on Ctrl-C or SIGTERM" in result["logs"][0]


def test_quiet_partitions_are_not_read_again(broker, settings) -> None:
    """Traffic as sparse as a demo's: every partition quiet for seconds before its next records. The join's
    safety net for inputs Faust fetched but never delivered must not take such a partition's next record,
    fetched a moment ago, for a lost one (it did, about once per quiet partition, before it counted the
    wait from the fetch)."""
    settings = join_settings(settings, TIMEOUT)
    traffic = generate(4, 40, TIMEOUT, bad_inputs=False)
    prepare(settings)
    worker = JoinProcess(settings)
    trajectories = Collector(settings, settings.topics.trajectories, "Trajectory", "trajectory_id")
    try:
        bursts = 8
        size = -(-len(traffic.messages) // bursts)
        for start in range(0, len(traffic.messages), size):
            produce_live(settings, traffic.messages[start : start + size], slowdown=0)
            time.sleep(4.0)  # longer than the old detector's 3 s of quiet
        trajectories.until(len(traffic.expected), 60)
        assert len(trajectories.records) == len(traffic.expected), worker.log()
        status = join_status(worker.metrics_url)
    finally:
        worker.stop()
        trajectories.close()
    assert status["spans"] >= traffic.span_count
    assert (status["inputs_read_again"], status["internal_errors"]) == (0, 0), worker.log()


def _wait_assigned(worker: JoinProcess, timeout: float = 90.0) -> dict[str, Any]:
    """The worker's status once the group gave it partitions (it reports lag per partition it owns)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert worker.process.poll() is None, worker.log()
        try:
            status = join_status(worker.metrics_url)
            if status["lag"]:
                return status
        except Exception:
            pass  # not answering yet
        time.sleep(0.2)
    raise AssertionError(f"join worker got no partitions in {timeout} s: {worker.log()}")


def _wait_for(worker: JoinProcess, counter: str, value: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while join_status(worker.metrics_url)[counter] < value:
        assert time.monotonic() < deadline, worker.log()
        time.sleep(0.2)


def test_rollouts_open_across_a_rebalance_keep_every_span(broker, settings) -> None:
    """A worker keeps some of its partitions when a second one joins; the changelog recovery of that
    rebalance replaces the state objects of the kept partitions too. Rollouts open across it get more spans
    afterwards and must close once, with all of them. (Before the worker re-indexed its states after every
    recovery, its timer closed the stale pre-rebalance copy of each such rollout, without the later spans,
    and the live copy never closed.)

    Event times, not wall time, decide the closes here: the later spans are dated 1 s after the first ones,
    and a burst of other rollouts dated past every deadline moves each partition's stream time there."""
    timeout_s = 60.0  # far longer than the rebalance takes: nothing closes before the burst
    settings = join_settings(settings, timeout_s)
    spans_codec = codec("SpanBatch")
    first_time = int(time.time() * 1e6)
    rollouts = [str(uuid.uuid4()) for _ in range(24)]

    def batch(rollout_id: str, event_time_us: int, sequences: range) -> Message:
        spans = [
            make_span(rollout_id, kind="tool_call", sequence=s, start_time_us=event_time_us, end_time_us=event_time_us)
            for s in sequences
        ]
        value = spans_codec.encode({"rollout_id": rollout_id, "producer_id": "test:1", "sent_at_us": 0, "spans": spans})
        return Message("spans", rollout_id.encode(), value, event_time_us)

    before = [batch(r, first_time, range(0, 3)) for r in rollouts]
    after = [batch(r, first_time + 1_000_000, range(3, 5)) for r in rollouts]
    past_deadlines = first_time + int((1 + timeout_s + settings.stream.join_grace + 1) * 1e6)
    # Enough rollouts that every partition gets one (keys land on partitions by hash).
    burst = [batch(str(uuid.uuid4()), past_deadlines, range(1)) for _ in range(16 * settings.topics.partitions)]
    prepare(settings)
    first = JoinProcess(settings, name="join-first")
    second = None
    trajectories = Collector(settings, settings.topics.trajectories, "Trajectory", "trajectory_id")
    try:
        _wait_assigned(first)
        produce_live(settings, before, slowdown=0)
        _wait_for(first, "spans", 3 * len(rollouts))
        second = JoinProcess(settings, name="join-second")
        _wait_assigned(second)
        produce_live(settings, after, slowdown=0)
        produce_live(settings, burst, slowdown=0)
        wanted = {trajectory_id(r) for r in rollouts}
        deadline = time.monotonic() + 60
        while not wanted <= set(trajectories.records) and time.monotonic() < deadline:
            trajectories.poll()
        trajectories.poll(1.0)  # a second version of any of them would show now
        statuses = [join_status(first.metrics_url), join_status(second.metrics_url)]
    finally:
        for worker in filter(None, (first, second)):
            worker.stop()
        trajectories.close()
    # The first worker kept partitions holding some of these rollouts (applied later spans of theirs).
    assert statuses[0]["spans"] > 3 * len(rollouts), statuses
    for rollout_id in rollouts:
        versions = trajectories.versions.get(trajectory_id(rollout_id), [])
        assert len(versions) == 1, (rollout_id, versions)
        assert (versions[0]["status"], versions[0]["span_count"]) == ("no_reward", 5), versions[0]
    assert all(status["internal_errors"] == 0 for status in statuses), statuses


def test_resuming_a_running_flow_keeps_the_queued_inputs(settings) -> None:
    """At the end of an assignment's recovery Faust resumes its flow control a second time, while records the
    fetcher handed on since the input partitions were resumed wait in the stream's queue; Faust's resume
    emptied that queue, and the join had to read those records again (in 1 to 3 of 5 live 1 -> 2 -> 3 -> 1
    fault runs). Only a resume after a suspension (a revocation) empties it: it then holds records of the last
    generation. The changelog queue is emptied at every resume, as Faust does."""
    worker = JoinWorker(settings, metrics_port=free_port())
    flow_control = worker.app.flow_control
    inputs = worker.inputs.clone(is_iterator=True).queue  # made as Faust makes the queue of the agent's stream
    changelog = worker.app.tables.changelog_queue
    flow_control.resume()  # the recovery of an assignment begins (the flow is created suspended)
    inputs.put_nowait("an input of this generation")
    changelog.put_nowait("a changelog record past the recovery")

    flow_control.resume()  # the recovery is complete

    assert (inputs.qsize(), changelog.qsize()) == (1, 0)
    flow_control.suspend()  # a revocation
    flow_control.resume()  # the next assignment's recovery begins
    assert inputs.qsize() == 0


def test_inputs_committed_after_an_assignment_read_its_offsets_are_not_read_again(settings) -> None:
    """An assignment starts each partition at the committed offset it reads; Faust then seeks to the committed
    offsets once more, and a commit of the last generation can land in between (in about 1 of 8 live
    1 -> 2 -> 3 -> 1 fault runs: the worker read 78, Faust sought 80 and handed on 80 after 78). Every input
    before a committed offset was applied and its state written, so the partition goes on from there."""
    worker = JoinWorker(settings, metrics_port=free_port())
    where = (settings.topics.spans, 0)
    worker._next[where] = 79  # the assignment read 78 as committed, and 78 was applied
    worker.app.consumer._committed_offset[faust.types.TP(*where)] = 80  # found by Faust's own seek

    applied = asyncio.run(worker._in_order(where, 80))

    assert applied and worker.core.counts["inputs_read_again"] == 0
