"""The join worker end to end: real broker, workers as subprocesses, realistic traffic.

"Identical" below means: the same set of distinct trajectory ids and sample ids, for each id the same
record, and the same dead letters (by source partition, offset, type and reason); the one field
left out is ``Trajectory.duplicate_count`` (duplicates seen before the close; how many arrive before
it depends on how the spans and rewards topics interleave in one run). Outputs are at-least-once, so
records are compared after deduping by id.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from boltstream.infra.common.config import load_settings
from boltstream.stream_processors.join import join_metrics_urls, join_status
from tests.join_harness import Collector, JoinProcess, copy_topics, join_settings, prepare, produce_live
from tests.traffic import Traffic, generate, verify

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
