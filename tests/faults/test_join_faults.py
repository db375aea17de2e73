"""Fault scenarios of the join, each over the same seeded traffic sent live to the real broker and real
join worker processes, compared with one undisturbed worker that read the same traffic as a backlog:

* ``join SIGKILL``: the only worker is killed mid-traffic and started again;
* ``join workers 1 -> 2 -> 3 -> 1``: workers join and leave the group while the traffic flows;
* ``a span and a reward 1 hour in the future``: one agent's wrong clock (its own rollouts only);
* ``NaN and infinite rewards``: dead-lettered, the rollout's real reward still counts;
* ``tombstones``: messages without a value on both input topics, ignored.

Traffic is sent at its own pace (each message stamped with its event time as its broker timestamp,
as the SDK's are) so the join is caught up most of the time and its stream time follows the
traffic: the state where one bad clock used to close everybody's rollouts. No archive runs here: the
table's "archived" column counts the spans the join accounted for (in the trajectories it emitted).
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from boltstream.infra.common.config import Settings, load_settings
from boltstream.infra.stack.status import join_workers_status
from boltstream.schemas.codec import codec
from boltstream.stream_processors.join import join_status
from tests.faults.table import FaultRow, record_fault
from tests.join_harness import Collector, JoinProcess, copy_topics, join_settings, prepare, produce_live
from tests.records import make_span
from tests.traffic import Message, Traffic, generate, verify

TIMEOUT = 2.0
ROLLOUTS = 900  # 18 s of traffic at its own pace
#: Input partitions: enough for three workers to share (Faust's sticky assignor gives a third worker none of
#: four partitions that two workers hold two each of: ceil(4 / 3) = 2 is what each may keep).
PARTITIONS = 6
HOUR_US = 3_600_000_000
UNIT = "spans"
ACCOUNTED = "no archive in this scenario: 'archived' = spans in the join's trajectories"


@dataclass
class Run:
    """What one run of the join emitted, every version of every record kept (a conflict is a duplicate)."""

    trajectories: dict[str, list[dict[str, Any]]]
    samples: dict[str, list[dict[str, Any]]]
    dead_letters: list[dict[str, Any]]
    acknowledged_spans: set[str]
    statuses: list[dict[str, Any]] = field(default_factory=list)

    def latest(self, exclude: set[str] = frozenset()) -> dict[str, dict[str, Any]]:
        return {k: v[-1] for k, v in self.trajectories.items() if v[-1]["rollout_id"] not in exclude}

    def comparable(self, exclude: set[str] = frozenset()) -> tuple[dict, dict]:
        """Trajectories and samples by id, without the rollouts in ``exclude``; ``duplicate_count`` left out
        (how many duplicates arrive before a close depends on how the two topics interleave in one run)."""
        trajectories = {k: {**t, "duplicate_count": None} for k, t in self.latest(exclude).items()}
        samples = {k: v[-1] for k, v in self.samples.items() if v[-1]["trajectory_id"] in trajectories}
        return trajectories, samples

    def conflicts(self) -> int:
        """Ids emitted more than once with different contents, and spans counted in two trajectories."""
        differing = sum(
            len({repr({**r, "duplicate_count": None}) for r in versions}) > 1
            for versions in (*self.trajectories.values(), *self.samples.values())
        )
        spans = Counter(s for t in self.latest().values() for s in t["span_event_ids"])
        return differing + sum(n > 1 for n in spans.values())

    def accounted_spans(self) -> set[str]:
        return {s for t in self.latest().values() for s in t["span_event_ids"]}


class Workers:
    """The join worker processes of one run; each one's status is read before it stops."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.running: list[JoinProcess] = []
        self.statuses: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def start(self) -> JoinProcess:
        process = JoinProcess(self.settings, name=f"join{len(self.running) + len(self.statuses)}")
        with self.lock:
            self.running.append(process)
        return process

    def wait_ready(self, process: JoinProcess, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert process.process.poll() is None, process.log()
            try:
                join_status(process.metrics_url)
                return
            except Exception:
                time.sleep(0.2)
        raise AssertionError(f"join worker not ready: {process.log()}")

    def wait_assigned(self, process: JoinProcess, timeout: float = 90.0) -> None:
        """Until the group gave ``process`` partitions (it reports lag per partition it was assigned)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if join_status(process.metrics_url)["lag"]:
                    return
            except Exception:
                assert process.process.poll() is None, process.log()  # not answering yet, or gone
            time.sleep(0.2)
        raise AssertionError(f"join worker got no partitions in {timeout} s: {process.log()}")

    def stop(self, process: JoinProcess) -> None:
        status = join_status(process.metrics_url)
        process.stop()
        with self.lock:
            self.running.remove(process)
            self.statuses.append(status)

    def kill(self, process: JoinProcess) -> None:
        status = join_status(process.metrics_url)  # the counters up to the kill
        process.kill()
        with self.lock:
            self.running.remove(process)
            self.statuses.append(status)

    def stop_all(self) -> None:
        for process in list(self.running):
            try:
                self.stop(process)
            except Exception:
                process.kill()


def run(
    settings: Settings,
    traffic: Traffic,
    messages: list[Message] | None = None,
    *,
    live: bool = True,
    actions: Callable[[Workers, int], dict[int, Callable[[], None]]] | None = None,
    dead_letters: int = 0,
) -> Run:
    """One run: the first worker starts, the traffic is sent (live, or all before as a backlog), the
    ``actions`` change the workers during it, and the outputs are read until every rollout closed."""
    messages = traffic.messages if messages is None else messages
    prepare(settings)
    workers = Workers(settings)
    trajectories = Collector(settings, settings.topics.trajectories, "Trajectory", "trajectory_id")
    samples = Collector(settings, settings.topics.samples, "TrainingSample", "sample_id")
    dead = Collector(settings, settings.topics.dlq, "DeadLetter", "event_id")
    try:
        if live:
            workers.wait_ready(workers.start())
            acknowledged = produce_live(settings, messages, actions(workers, len(messages)) if actions else {})
        else:
            acknowledged = produce_live(settings, messages, {}, slowdown=0)
            workers.start()
        expected = len({m.key for m in messages if m.value is not None})
        trajectories.until(expected, 120)
        closed = sum(1 for e in traffic.expected.values() if e.status == "complete" for _ in e.calls)
        samples.until(closed, 30)
        dead.until(sum(traffic.dead_letters.values()) + dead_letters, 30)
        for collector in (trajectories, samples):
            collector.poll(1.0)  # anything emitted twice shows as a second version
        if len(trajectories.records) != expected:
            missing = {m.key.decode() for m in messages if m.value is not None} - {
                t["rollout_id"] for t in trajectories.records.values()
            }
            statuses = {p.metrics_url: join_status(p.metrics_url) for p in workers.running}
            raise AssertionError(f"{len(missing)} rollouts never closed: {sorted(missing)[:10]}; running {statuses}")
        status_of_running = join_workers_status(settings, 5.0)
        # Every worker that announced itself is one of ours (one still starting has not announced yet).
        assert status_of_running and set(status_of_running) <= {p.metrics_url for p in workers.running}
    finally:
        workers.stop_all()
        for collector in (trajectories, samples, dead):
            collector.close()
    return Run(trajectories.versions, samples.versions, list(dead.records.values()), acknowledged, workers.statuses)


# -- the undisturbed run and the comparison ---------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline(broker, tmp_path_factory) -> Iterator[tuple[Settings, Traffic, Run]]:
    """The module's traffic, read by one undisturbed worker as a backlog."""
    settings = load_settings(
        environ={"BOLTSTREAM_HOME": str(tmp_path_factory.mktemp("join-faults"))},
        kafka={"bootstrap_servers": broker.bootstrap_servers},
        topics={
            **{n: f"f{uuid.uuid4().hex[:8]}.{n}" for n in ("spans", "rewards", "trajectories", "samples", "dlq")},
            "partitions": PARTITIONS,
        },
    )
    settings = join_settings(settings, TIMEOUT)
    traffic = generate(23, ROLLOUTS, TIMEOUT, bad_inputs=False)
    undisturbed = run(settings, traffic, live=False)
    latest = list(undisturbed.latest().values())
    verify(traffic, latest, [v[-1] for v in undisturbed.samples.values()], "final", settings.stream.discount)
    assert undisturbed.conflicts() == 0
    yield settings, traffic, undisturbed


def check_and_record(
    scenario: str,
    result: Run,
    undisturbed: Run,
    *,
    exclude: set[str] = frozenset(),
    note: str = "",
) -> None:
    """The scenario's row from measured numbers; fails on a loss, a duplicate, a difference, an internal error,
    or any input read again (the join's safety net for records Faust dropped; faust_workarounds, 4. and 6.)."""
    identical = result.comparable(exclude) == undisturbed.comparable(exclude)
    accounted = result.acknowledged_spans & result.accounted_spans()
    read_again = sum(status["inputs_read_again"] for status in result.statuses)
    errors = sum(status["internal_errors"] for status in result.statuses)
    notes = [f"{len(result.statuses)} worker processes, inputs read again {read_again}", ACCOUNTED]
    row = FaultRow(
        scenario,
        acknowledged=len(result.acknowledged_spans),
        archived=len(accounted),
        duplicated=result.conflicts(),
        trajectories_identical=identical,
        unit=UNIT,
        note="; ".join(filter(None, [note, *notes])),
    )
    record_fault(row)
    assert read_again == 0 and errors == 0, result.statuses


def inject(traffic: Traffic, extra: list[Message]) -> list[Message]:
    """The traffic with ``extra`` sent in its middle (their event times set to that moment by the caller)."""
    middle = len(traffic.messages) // 2
    return [*traffic.messages[:middle], *extra, *traffic.messages[middle:]]


def middle_time(traffic: Traffic) -> int:
    return traffic.messages[len(traffic.messages) // 2].event_time_us


def a_complete_rollout(traffic: Traffic) -> str:
    """A rollout that completes in the middle of the traffic (its reward still to come there)."""
    middle = len(traffic.messages) // 2
    later = {m.key.decode() for m in traffic.messages[middle:] if m.topic == "rewards"}
    earlier = {m.key.decode() for m in traffic.messages[:middle] if m.topic == "spans"}
    return next(r for r, e in traffic.expected.items() if e.scenario == "complete" and r in later & earlier)


# -- the scenarios ---------------------------------------------------------------------------------------


def test_join_sigkill_during_traffic(baseline) -> None:
    settings, traffic, undisturbed = baseline

    def actions(workers: Workers, count: int) -> dict[int, Callable[[], None]]:
        def kill_and_restart() -> None:
            workers.kill(workers.running[0])
            workers.start()

        return {count * 2 // 5: kill_and_restart}

    result = run(copy_topics(settings), traffic, actions=actions)
    check_and_record("join SIGKILL during traffic", result, undisturbed, note="SIGKILL at 40% of the traffic")


def test_join_workers_1_2_3_1_during_traffic(baseline) -> None:
    settings, traffic, undisturbed = baseline

    def actions(workers: Workers, count: int) -> dict[int, Callable[[], None]]:
        second_in, third_in = threading.Event(), threading.Event()

        def add(after: threading.Event | None, done: threading.Event) -> Callable[[], None]:
            def start() -> None:
                if after is not None:
                    after.wait(120)
                try:
                    process = workers.start()
                    workers.wait_ready(process)
                    workers.wait_assigned(process)  # a member sharing the load, however slow the machine
                finally:
                    done.set()  # the next step goes on either way; the output comparison is the verdict

            return start

        def back_to_one() -> None:
            third_in.wait(120)
            with workers.lock:
                leaving = workers.running[:-1]  # the first two leave, the newest stays
            for process in leaving:
                workers.stop(process)

        return {count // 4: add(None, second_in), count // 2: add(second_in, third_in), count * 3 // 4: back_to_one}

    result = run(copy_topics(settings), traffic, actions=actions)
    sharing = sum(status["spans"] > 0 for status in result.statuses)
    assert len(result.statuses) == 3 and sharing >= 2, result.statuses  # the load was shared at some point
    check_and_record(
        "join workers 1 -> 2 -> 3 -> 1 during traffic",
        result,
        undisturbed,
        note=f"joined at 25% and 50%, two left (SIGTERM) at 75%; {sharing} of 3 processed spans",
    )


def test_a_span_and_a_reward_one_hour_ahead_change_no_other_rollout(baseline) -> None:
    settings, traffic, undisturbed = baseline
    now = middle_time(traffic)
    span_rollout, reward_rollout = f"future-span-{uuid.uuid4()}", f"future-reward-{uuid.uuid4()}"
    span = make_span(span_rollout, kind="tool_call", event_id=str(uuid.uuid4()), llm=None)
    span |= {"start_time_us": now + HOUR_US, "end_time_us": now + HOUR_US}
    batch = {"rollout_id": span_rollout, "producer_id": "bad-clock:1", "sent_at_us": 0, "spans": [span]}
    reward = {
        "event_id": str(uuid.uuid4()),
        "rollout_id": reward_rollout,
        "value": 1.0,
        "timestamp_us": now + HOUR_US,
        "attributes": {},
    }
    extra = [
        Message("spans", span_rollout.encode(), codec("SpanBatch").encode(batch), now),
        Message("rewards", reward_rollout.encode(), codec("Reward").encode(reward), now),
    ]
    result = run(copy_topics(settings), traffic, inject(traffic, extra))
    poisoned = {
        t["rollout_id"]: t for t in result.latest().values() if t["rollout_id"] in (span_rollout, reward_rollout)
    }
    broker_time = now // 1000 * 1000  # Kafka timestamps are milliseconds
    assert (poisoned[span_rollout]["status"], poisoned[span_rollout]["end_time_us"]) == ("no_reward", broker_time)
    assert poisoned[reward_rollout]["status"] == "orphaned"
    clamped = Counter()
    for status in result.statuses:
        clamped.update(spans=status["event_times_clamped_spans"], rewards=status["event_times_clamped_rewards"])
    assert clamped == Counter(spans=1, rewards=1)
    check_and_record(
        "a span and a reward 1 hour in the future",
        result,
        undisturbed,
        exclude={span_rollout, reward_rollout},
        note="both dated at their broker timestamp (counted); the other rollouts compared",
    )


def test_non_finite_rewards_are_dead_lettered_and_the_real_one_counts(baseline) -> None:
    settings, traffic, undisturbed = baseline
    now, rollout = middle_time(traffic), a_complete_rollout(traffic)
    expected = traffic.expected[rollout]
    extra = []
    for value in (math.nan, math.inf, -math.inf):
        reward = {
            "event_id": str(uuid.uuid4()),
            "rollout_id": rollout,
            "value": value,
            "timestamp_us": now,
            "task_id": expected.task_id,
            "agent_name": expected.agent_name,
            "attributes": {},
        }
        extra.append(Message("rewards", rollout.encode(), codec("Reward").encode(reward), now))
    result = run(copy_topics(settings), traffic, inject(traffic, extra), dead_letters=3)
    non_finite = [d for d in result.dead_letters if "non-finite reward" in d["reason"]]
    assert sorted(d["reason"] for d in non_finite) == [
        "non-finite reward -inf",
        "non-finite reward inf",
        "non-finite reward nan",
    ]
    assert {d["error_type"] for d in non_finite} == {"invariant_violation"}
    check_and_record(
        "NaN, +inf and -inf rewards",
        result,
        undisturbed,
        note="3 dead-lettered (invariant_violation); all rollouts compared",
    )


def test_tombstones_are_ignored(baseline) -> None:
    settings, traffic, undisturbed = baseline
    now, rollout = middle_time(traffic), a_complete_rollout(traffic)
    extra = [Message(topic, rollout.encode(), None, now) for topic in ("spans", "rewards")]
    result = run(copy_topics(settings), traffic, inject(traffic, extra))
    assert sum(status["tombstones"] for status in result.statuses) == 2
    check_and_record(
        "tombstones on spans and rewards", result, undisturbed, note="2 ignored (counted); all rollouts compared"
    )
