"""The join rules without Kafka: JoinCore fed the traffic generator's messages directly."""

from __future__ import annotations

import math
import random
import time
import uuid
from collections import Counter

import pytest

from boltstream.schemas.codec import codec
from boltstream.schemas.token_arrays import encode_training_sample
from boltstream.stream_processors.join_core import (
    JoinCore,
    JoinRules,
    PartitionClock,
    RolloutState,
    dumps_state,
    loads_state,
    sample_id,
    trajectory_id,
)
from tests.records import make_span
from tests.traffic import generate, verify

TIMEOUT = 2.0
FAR_FUTURE = 2**62


def feed(core: JoinCore, messages, partition: int = 0) -> None:
    offsets = {"spans": -1, "rewards": -1}
    now = int(time.time() * 1e6)
    for message in messages:
        offsets[message.topic] += 1
        handler = core.on_span_batch if message.topic == "spans" else core.on_reward
        handler(partition, offsets[message.topic], message.key, message.value, now)


def run(policy: str = "final", **rules) -> tuple:
    """The traffic, the core and what it drained, with samples as a consumer of the samples topic reads them."""
    traffic = generate(7, 200, TIMEOUT)
    core = JoinCore(JoinRules(reward_timeout_us=int(TIMEOUT * 1e6), credit_policy=policy, **rules), {})
    feed(core, traffic.messages)
    core.expire({0: FAR_FUTURE})
    trajectories, samples, dead_letters, dirty = core.drain()
    samples = [codec("TrainingSample").decode(encode_training_sample(sample)) for sample in samples]
    return traffic, core, trajectories, samples, dead_letters, dirty


@pytest.mark.parametrize("policy", ["final", "discounted", "per_step"])
def test_every_rollout_closes_once_with_the_right_contents_and_samples(policy: str) -> None:
    traffic, core, trajectories, samples, dead_letters, _ = run(policy, discount=0.8)
    verify(traffic, trajectories, samples, policy, 0.8)
    assert Counter(d["error_type"] for _, d in dead_letters) == traffic.dead_letters
    assert core.counts["late_rewards"] == traffic.dead_letters["late_reward"]
    duplicated = [t for t in trajectories if traffic.expected[t["rollout_id"]].scenario == "duplicated"]
    assert duplicated and all(t["duplicate_count"] >= 5 for t in duplicated)


def test_agent_selector_and_sampling_keep_everything_archived_but_limit_samples() -> None:
    traffic, _, trajectories, samples, _, _ = run(agent_selector=("math-*",), sampling_rate=0.5)
    assert len(trajectories) == len(traffic.expected)  # everything is still a trajectory
    kept = {t["trajectory_id"] for t in trajectories if t["sampled"] and t["selected"] and t["status"] == "complete"}
    assert {s["trajectory_id"] for s in samples} == kept
    assert {s["agent_name"] for s in samples} == {"math-agent"}
    sampled = [t["sampled"] for t in trajectories]
    assert 0 < sum(sampled) < len(sampled)


def test_redelivered_inputs_change_nothing() -> None:
    traffic = generate(3, 60, TIMEOUT, bad_inputs=False)
    core = JoinCore(JoinRules(reward_timeout_us=int(TIMEOUT * 1e6)), {})
    half = len(traffic.messages) // 2
    feed(core, traffic.messages[:half])
    first, *_ = core.drain()
    # A restart re-delivers from the last commit: the same messages at the same offsets, again.
    feed(core, traffic.messages)
    core.expire({0: FAR_FUTURE})
    second, *_ = core.drain()
    assert core.counts["redelivered"] == half
    assert len({t["trajectory_id"] for t in first + second}) == len(first) + len(second) == len(traffic.expected)


def test_state_survives_the_changelog_round_trip() -> None:
    traffic = generate(5, 40, TIMEOUT, bad_inputs=False)
    states: dict = {}
    core = JoinCore(JoinRules(reward_timeout_us=int(TIMEOUT * 1e6)), states)
    feed(core, traffic.messages[: len(traffic.messages) // 2])
    core.drain()
    restored = {key: loads_state(dumps_state(state)) for key, state in states.items()}
    assert restored == states
    assert any(isinstance(s, PartitionClock) for s in restored.values())
    assert any(isinstance(s, RolloutState) and s.steps for s in restored.values())


def test_bad_input_is_dead_lettered_with_the_reason_and_the_rest_goes_on() -> None:
    rules = JoinRules(reward_timeout_us=2_000_000, spans_topic="s", rewards_topic="r")
    core = JoinCore(rules, {})
    rollout = "r-1"
    good = make_span(rollout, kind="tool_call")
    backwards = make_span(rollout, kind="tool_call", start_time_us=good["start_time_us"] + 5, end_time_us=0)
    nan_step = make_span(rollout, kind="reward", reward=math.nan)
    batch = {"rollout_id": rollout, "producer_id": "p", "sent_at_us": 0, "spans": [good, backwards, nan_step]}
    core.on_span_batch(0, 0, rollout.encode(), codec("SpanBatch").encode(batch), 1)
    core.on_span_batch(0, 1, b"other-key", codec("SpanBatch").encode(batch), 1)
    core.on_span_batch(0, 2, rollout.encode(), b"", 1)
    _, _, dead_letters, _ = core.drain()
    reasons = [(d["error_type"], d["source_offset"], d["reason"]) for _, d in dead_letters]
    assert [r[:2] for r in reasons] == [
        ("invariant_violation", 0),
        ("invariant_violation", 0),
        ("invariant_violation", 1),
        ("decode_error", 2),
    ]
    assert "negative duration" in reasons[0][2] and "non-finite reward" in reasons[1][2]
    assert "co-partitioning" in reasons[2][2] and "unknown magic" in reasons[3][2]
    one_span = codec("SpanBatch").decode(dead_letters[0][1]["value"])
    assert [s["event_id"] for s in one_span["spans"]] == [backwards["event_id"]]
    assert core.states[rollout].spans == [(0, good["event_id"])]  # the valid span was applied
    assert len({d["event_id"] for _, d in dead_letters}) == 4


def test_reward_after_the_timeout_is_late_and_never_applied() -> None:
    rules = JoinRules(reward_timeout_us=1_000_000, grace_us=0)
    core = JoinCore(rules, {})
    rollout, start = "r-late", 1_000_000_000
    end = make_span(rollout, kind="rollout", start_time_us=start, end_time_us=start + 10, llm=None)
    batch = {"rollout_id": rollout, "producer_id": "p", "sent_at_us": 0, "spans": [end]}
    core.on_span_batch(0, 0, rollout.encode(), codec("SpanBatch").encode(batch), start)
    reward = {
        "event_id": "e-1",
        "rollout_id": rollout,
        "value": 1.0,
        "timestamp_us": start + 10 + 1_000_001,
    }
    core.on_reward(0, 0, rollout.encode(), codec("Reward").encode(reward | {"attributes": {}}), start)
    trajectories, samples, dead_letters, _ = core.drain()
    assert [(t["status"], t["closed_at_us"], t["final_reward"]) for t in trajectories] == [
        ("timed_out", start + 10 + 1_000_000, None)
    ]
    assert samples == [] and [d["error_type"] for _, d in dead_letters] == ["late_reward"]
    assert core.counts["late_rewards"] == 1


def test_trajectory_and_sample_ids_are_the_uuid5_of_the_standard_library() -> None:
    rng = random.Random(6)
    for _ in range(2000):
        name = "".join(rng.choice("ab-é東🚀0") for _ in range(rng.randint(0, 40)))
        trajectory = str(uuid.uuid5(uuid.UUID("4b0c5f5e-5d0a-4e43-9a8e-6f2b1c3d7a10"), name))
        assert trajectory_id(name) == trajectory
        assert sample_id(trajectory, name[::-1]) == str(uuid.uuid5(uuid.UUID(trajectory), name[::-1]))


def test_a_record_dated_past_the_skew_takes_its_broker_timestamp_and_cannot_move_stream_time() -> None:
    rules = JoinRules(reward_timeout_us=1_000_000, grace_us=0, max_event_time_skew_us=500_000)
    core = JoinCore(rules, {})
    broker, hour = 1_000_000_000_000, 3_600_000_000
    honest = make_span("honest", kind="tool_call", start_time_us=broker - 10, end_time_us=broker)
    ahead = make_span("bad-clock", kind="tool_call", start_time_us=broker + hour, end_time_us=broker + hour)
    within = make_span("fast-clock", kind="tool_call", start_time_us=broker, end_time_us=broker + 400_000)
    for offset, span in enumerate((honest, ahead, within)):
        batch = {"rollout_id": span["rollout_id"], "producer_id": "p", "sent_at_us": 0, "spans": [span]}
        core.on_span_batch(0, offset, span["rollout_id"].encode(), codec("SpanBatch").encode(batch), 0, broker)
    reward = {"event_id": "e-1", "rollout_id": "bad-reward", "value": 1.0, "timestamp_us": broker + hour}
    core.on_reward(0, 0, b"bad-reward", codec("Reward").encode(reward | {"attributes": {}}), 0, broker)
    assert core.clock(0) == (broker + 400_000, broker)  # the span within the skew is believed, nothing later
    assert (core.states["bad-clock"].start_time_us, core.states["bad-clock"].end_time_us) == (broker, broker)
    assert core.states["bad-reward"].rewards[0].timestamp_us == broker
    assert (core.counts["event_times_clamped_spans"], core.counts["event_times_clamped_rewards"]) == (1, 1)
    core.expire({0: max(core.clock(0))})
    assert core.drain()[0] == []  # stream time did not jump: nobody's deadline passed


def test_tombstones_are_counted_and_ignored() -> None:
    core = JoinCore(JoinRules(reward_timeout_us=1_000_000), {})
    core.on_span_batch(0, 0, b"r-1", None, 1)
    core.on_reward(0, 0, b"r-1", None, 1)
    trajectories, samples, dead_letters, writes = core.drain()
    assert core.counts["tombstones"] == 2 and (trajectories, samples, dead_letters, writes) == ([], [], [], [])
    assert dict(core.states) == {}


# -- rollout boundaries: the last reward is final, and the reward window stays open ------------------------
START = 1_000_000_000


def spans_message(rollout: str, spans: list[dict]) -> bytes:
    return codec("SpanBatch").encode({"rollout_id": rollout, "producer_id": "p", "sent_at_us": 0, "spans": spans})


def reward_message(rollout: str, value: float, at_us: int, *, is_final: bool = True) -> bytes:
    record = {"event_id": f"{rollout}-{at_us}", "rollout_id": rollout, "value": value, "timestamp_us": at_us}
    return codec("Reward").encode(record | {"is_final": is_final, "source": "verifier", "attributes": {}})


def episode(rollout: str, *, implicit: bool, rewards: list[tuple[str, float]]) -> list[dict]:
    """LLM call, reward, LLM call, reward ... as the SDK sends them, then the rollout span (at START + 100)."""
    spans, clock = [], START
    for name, value in rewards:
        spans.append(make_span(rollout, sequence=len(spans), start_time_us=clock, end_time_us=clock + 10))
        spans.append(
            make_span(
                rollout,
                kind="reward",
                name=name,
                reward=value,
                sequence=len(spans),
                start_time_us=clock + 10,
                end_time_us=clock + 10,
                llm=None,
            )
        )
        clock += 20
    attributes = {"implicit": "true"} if implicit else {}
    end = make_span(
        rollout, kind="rollout", sequence=len(spans), start_time_us=START, end_time_us=START + 100, llm=None
    )
    return [*spans, end | {"attributes": attributes}]


def test_an_implicit_rollout_waits_for_its_reward_window_and_its_last_reward_is_final() -> None:
    core = JoinCore(JoinRules(reward_timeout_us=30_000_000, grace_us=0, credit_policy="per_step"), {})
    core.on_span_batch(
        0, 0, b"r", spans_message("r", episode("r", implicit=True, rewards=[("final", 0.3), ("final", 1.0)])), 0
    )
    core.expire({0: START + 100 + 30_000_000})  # the window's last moment: still open
    assert core.drain()[0] == []
    core.expire({0: START + 100 + 30_000_001})
    trajectories, samples, _, _ = core.drain()
    assert [(t["status"], t["final_reward"], t["rewards"], t["closed_at_us"]) for t in trajectories] == [
        ("complete", 1.0, [0.3, 1.0], START + 100 + 30_000_000)
    ]
    # The first call gets the final reward and the step reward after it; the second only the final one.
    assert [s["return_value"] for s in sorted(samples, key=lambda s: s["step_index"])] == pytest.approx([1.3, 1.0])


def test_a_reward_sent_within_the_window_of_an_implicit_rollout_is_its_final_reward() -> None:
    """Before, emit_reward ended the implicit rollout and closed it: a verifier's reward 2 s later was late."""
    for reward_first in (False, True):  # whichever topic the join reads first
        core = JoinCore(JoinRules(reward_timeout_us=30_000_000, grace_us=0, credit_policy="per_step"), {})
        spans = spans_message("r", episode("r", implicit=True, rewards=[("final", 0.3)]))
        verifier = reward_message("r", 1.0, START + 100 + 2_000_000)
        inputs = [(core.on_span_batch, spans), (core.on_reward, verifier)]
        for handler, value in reversed(inputs) if reward_first else inputs:
            handler(0, 0, b"r", value, 0)
        trajectories, samples, dead_letters, _ = core.drain()
        assert [(t["status"], t["final_reward"], t["rewards"]) for t in trajectories] == [("complete", 1.0, [0.3, 1.0])]
        assert [s["return_value"] for s in samples] == pytest.approx([1.3]) and dead_letters == []


def test_an_explicit_rollout_with_its_final_reward_inside_closes_at_its_end_whatever_is_read_first() -> None:
    outcomes = []
    for reward_first in (False, True):
        core = JoinCore(JoinRules(reward_timeout_us=30_000_000, grace_us=0), {})
        spans = spans_message("r", episode("r", implicit=False, rewards=[("final", 0.3), ("final", 1.0)]))
        after_end = reward_message("r", 0.5, START + 100 + 2_000_000)  # came too late: the rollout settled at its end
        inputs = [(core.on_span_batch, spans), (core.on_reward, after_end)]
        for handler, value in reversed(inputs) if reward_first else inputs:
            handler(0, 0, b"r", value, 0)
        trajectories, _, dead_letters, _ = core.drain()
        outcomes.append(
            [(t["status"], t["final_reward"], t["rewards"], t["closed_at_us"]) for t in trajectories]
            + [d["error_type"] for _, d in dead_letters]
        )
    assert outcomes == [[("complete", 1.0, [0.3, 1.0], START + 100), "late_reward"]] * 2


def test_step_rewards_inside_an_explicit_rollout_leave_the_window_open_for_the_verifier() -> None:
    core = JoinCore(JoinRules(reward_timeout_us=30_000_000, grace_us=0, credit_policy="per_step"), {})
    spans = spans_message("r", episode("r", implicit=False, rewards=[("plan", 0.3)]))
    core.on_span_batch(0, 0, b"r", spans, 0)
    assert core.drain()[0] == []  # no final reward yet: waits
    core.on_reward(0, 0, b"r", reward_message("r", 0.2, START + 1_000_000, is_final=False), 0)  # a step too
    core.on_reward(0, 1, b"r", reward_message("r", 1.0, START + 100 + 2_000_000), 0)
    trajectories, samples, _, _ = core.drain()
    assert [(t["status"], t["final_reward"], t["rewards"]) for t in trajectories] == [
        ("complete", 1.0, [0.3, 0.2, 1.0])
    ]
    assert [s["return_value"] for s in samples] == pytest.approx([1.5])


def test_adopting_restored_states_closes_the_live_copies_and_forgets_other_partitions() -> None:
    """What a rebalance leaves: recovery put new state objects in the table (copies of the ones the core
    indexed) and the worker lost partition 1. After adopt, later inputs and closes act on the objects in
    the table, and nothing of partition 1 stays or is written."""
    rules = JoinRules(reward_timeout_us=int(TIMEOUT * 1e6))
    states: dict = {}
    core = JoinCore(rules, states)
    spans = codec("SpanBatch")
    start = int(time.time() * 1e6)

    def batch(rollout_id: str, sequence: int, at_us: int) -> bytes:
        span = make_span(rollout_id, kind="tool_call", sequence=sequence, start_time_us=at_us, end_time_us=at_us)
        return spans.encode({"rollout_id": rollout_id, "producer_id": "t:1", "sent_at_us": 0, "spans": [span]})

    kept, lost = "rollout-kept", "rollout-lost"
    core.on_span_batch(0, 0, kept.encode(), batch(kept, 0, start), start)
    core.on_span_batch(1, 0, lost.encode(), batch(lost, 0, start), start)
    core.drain()
    states.update({key: loads_state(dumps_state(state)) for key, state in states.items()})  # recovery's copies
    core.on_span_batch(1, 1, lost.encode(), batch(lost, 1, start), start)  # pending when partition 1 goes
    core.adopt({0}, start)
    assert {state.partition for state in states.values()} == {0}
    later = start + 1_000_000
    core.on_span_batch(0, 1, kept.encode(), batch(kept, 1, later), later)
    core.expire({0: later + int(TIMEOUT * 1e6) + rules.grace_us + 1})
    trajectories, _, _, writes = core.drain()
    assert [(t["rollout_id"], t["status"], t["span_count"]) for t in trajectories] == [(kept, "no_reward", 2)]
    assert {partition for _, partition, _ in writes} == {0}
