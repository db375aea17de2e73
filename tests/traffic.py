"""A generator of realistic join traffic with the outcome every rollout must have.

Many concurrent rollouts of several agents, their spans travelling as SpanBatch messages of 5 to 20
spans, interleaved across rollouts in event-time order; rewards after the spans, before the first
span, after the timeout, duplicated or missing; rewards with no spans; rollouts that never end;
the SDK's in-rollout final reward span; intermediate reward spans; and bad input (undecodable bytes,
negative durations, NaN rewards). Seeded: the same seed gives the same bytes.

``Traffic.expected`` says how each rollout must close and ``expected_samples`` what its samples must
hold under a credit policy, computed here independently of the join's code.
"""

from __future__ import annotations

import math
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from boltstream.schemas.codec import codec
from tests.records import make_llm, make_span

SCENARIOS = {
    # name: (weight, status)
    "complete": (30, "complete"),
    "sdk_reward": (10, "complete"),  # final reward as the SDK's in-rollout reward span
    "reward_first": (10, "complete"),  # the Reward record is produced before any span
    "duplicated": (10, "complete"),  # a span batch and the reward are sent twice
    # The reward comes after end + reward_timeout / never: timed_out, unless the rollout recorded reward
    # spans (its last one is then the final reward, and it closes at its end).
    "late": (10, "timed_out"),
    "missing": (10, "timed_out"),
    "orphan": (10, "orphaned"),
    "no_end": (10, "no_reward"),
}
AGENTS = ("math-agent", "code-agent", "search-agent")


@dataclass
class Expected:
    rollout_id: str
    scenario: str
    status: str
    task_id: str
    agent_name: str
    final_reward: float | None = None
    rewards: list[float] = field(default_factory=list)
    span_event_ids: list[str] = field(default_factory=list)  # in sequence order
    calls: list[dict[str, Any]] = field(default_factory=list)  # llm_call spans: event_id, sequence, end, llm
    step_rewards: list[tuple[int, float]] = field(default_factory=list)  # reward spans but the final one
    late_rewards: int = 0


@dataclass
class Message:
    topic: str  # "spans" or "rewards"
    key: bytes
    value: bytes | None  # None: a tombstone
    event_time_us: int


@dataclass
class Traffic:
    messages: list[Message]
    expected: dict[str, Expected]
    dead_letters: dict[str, int]  # error_type -> how many the join must dead-letter

    @property
    def span_count(self) -> int:
        return sum(len(e.span_event_ids) for e in self.expected.values())

    def produce(self, settings: Any) -> None:
        """Send every message, in order, to the settings' spans / rewards topics (librdkafka's partitioner),
        stamped with its event time, as the SDK's records are when it sends them as they happen."""
        from confluent_kafka import Producer

        producer = Producer(settings.kafka.client_config(**{"linger.ms": 5, "compression.type": "lz4"}))
        topics = {"spans": settings.topics.spans, "rewards": settings.topics.rewards}
        for message in self.messages:
            while True:
                try:
                    producer.produce(
                        topics[message.topic], message.value, message.key, timestamp=message.event_time_us // 1000
                    )
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
        assert producer.flush(30) == 0, "traffic not fully delivered"


def expected_returns(policy: str, expected: Expected, discount: float) -> list[float]:
    """The return of each LLM call by ``policy``, written out from the definitions (not the join's code)."""
    final, calls = expected.final_reward, expected.calls
    if policy == "final":
        return [final] * len(calls)
    gamma = 1.0 if policy == "per_step" else discount
    returns = []
    for i, call in enumerate(calls):
        later = 0.0
        for sequence, value in expected.step_rewards:
            if sequence > call["sequence"]:  # after call i: discounted once per call between them
                calls_between = sum(1 for other in calls[i + 1 :] if other["sequence"] < sequence)
                later += value * gamma**calls_between
        returns.append(final * gamma ** (len(calls) - 1 - i) + later)
    return returns


def generate(
    seed: int, rollouts: int, reward_timeout: float, *, start_us: int | None = None, bad_inputs: bool = True
) -> Traffic:
    rng = random.Random(seed)
    spans_codec, rewards_codec = codec("SpanBatch"), codec("Reward")
    timeout_us = int(reward_timeout * 1e6)
    start_us = start_us if start_us is not None else int(time.time() * 1e6)
    names, weights = zip(*((name, weight) for name, (weight, _) in SCENARIOS.items()), strict=True)
    messages: list[Message] = []
    expected: dict[str, Expected] = {}

    def uid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def reward_message(rollout_id: str, value: float, at_us: int, event_id: str, task: str, agent: str) -> Message:
        record = {
            "event_id": event_id,
            "rollout_id": rollout_id,
            "value": value,
            "name": "final",
            "is_final": True,
            "source": "verifier",
            "task_id": task,
            "agent_name": agent,
            "timestamp_us": at_us,
            "attributes": {},
        }
        return Message("rewards", rollout_id.encode(), rewards_codec.encode(record), at_us)

    for index in range(rollouts):
        scenario = rng.choices(names, weights)[0]
        rollout_id = uid()
        task, agent = f"task-{rng.randrange(rollouts // 4 + 1)}", rng.choice(AGENTS)
        reward = round(rng.uniform(-1, 1), 3)
        # Rollouts start 20 ms apart, so hundreds run concurrently across the traffic.
        clock = start_us + index * 20_000
        began = clock
        exp = Expected(rollout_id, scenario, SCENARIOS[scenario][1], task, agent)
        expected[rollout_id] = exp
        if scenario == "orphan":
            exp.rewards = [reward]
            messages.append(reward_message(rollout_id, reward, clock, uid(), task, agent))
            continue
        spans = []
        for sequence in range(rng.randint(4, 30)):
            kind = rng.choices(["llm_call", "tool_call", "message", "decision", "reward"], [35, 35, 15, 10, 5])[0]
            duration = rng.randint(1_000, 40_000)
            fields = {
                "event_id": uid(),
                "task_id": task,
                "agent_name": agent,
                "start_time_us": clock,
                "end_time_us": clock + duration,
            }
            if kind == "llm_call":
                fields["llm"] = make_llm(
                    rng.randint(20, 200), rng.randint(5, 80), model_version=f"v{rng.randint(1, 3)}"
                )
                fields["llm"]["completion_logprobs"] = [
                    round(-rng.random(), 3) for _ in fields["llm"]["completion_token_ids"]
                ]
            if kind == "reward":
                fields["reward"], fields["name"] = round(rng.uniform(0, 0.2), 3), "step"
            span = make_span(rollout_id, kind=kind, sequence=sequence, **fields)
            spans.append(span)
            clock += duration + rng.randint(0, 5_000)
        if scenario == "sdk_reward":
            spans.append(
                make_span(
                    rollout_id,
                    kind="reward",
                    sequence=len(spans),
                    event_id=uid(),
                    name="final",
                    reward=reward,
                    task_id=task,
                    agent_name=agent,
                    start_time_us=clock,
                    end_time_us=clock,
                    llm=None,
                )
            )
        if scenario != "no_end":
            spans.append(
                make_span(
                    rollout_id,
                    kind="rollout",
                    sequence=len(spans),
                    event_id=uid(),
                    name="rollout",
                    task_id=task,
                    agent_name=agent,
                    start_time_us=began,
                    end_time_us=clock,
                    llm=None,
                )
            )
        end = clock
        exp.span_event_ids = [s["event_id"] for s in spans]
        exp.calls = [
            {"event_id": s["event_id"], "sequence": s["sequence"], "end": s["end_time_us"], "llm": s["llm"]}
            for s in spans
            if s["kind"] == "llm_call"
        ]
        reward_spans = [(s["sequence"], s["reward"]) for s in spans if s["kind"] == "reward"]
        exp.step_rewards = list(reward_spans)
        timed_rewards = [(s["end_time_us"], s["event_id"], s["reward"]) for s in spans if s["kind"] == "reward"]
        position = 0
        while position < len(spans):
            size = rng.randint(5, 20)
            chunk = spans[position : position + size]
            position += size
            batch = {"rollout_id": rollout_id, "producer_id": "traffic:1", "sent_at_us": 0, "spans": chunk}
            value = spans_codec.encode(batch)
            at = max(s["end_time_us"] for s in chunk)
            messages.append(Message("spans", rollout_id.encode(), value, at))
            if scenario == "duplicated" and position - size == 0:  # the first batch again (a retried send)
                messages.append(Message("spans", rollout_id.encode(), value, at))
        reward_id, reward_at = uid(), 0
        if scenario in ("complete", "duplicated"):
            reward_at = end + rng.randint(10_000, timeout_us // 2)
            messages.append(reward_message(rollout_id, reward, reward_at, reward_id, task, agent))
            if scenario == "duplicated":  # the same reward again (a retried send): same event id
                messages.append(reward_message(rollout_id, reward, reward_at, reward_id, task, agent))
        elif scenario == "reward_first":
            reward_at = began - 5_000
            messages.append(reward_message(rollout_id, reward, reward_at, reward_id, task, agent))
        elif scenario == "late":
            messages.append(reward_message(rollout_id, reward, end + timeout_us + 500_000, reward_id, task, agent))
            exp.late_rewards = 1
        if scenario in ("late", "missing") and reward_spans:
            exp.status = "complete"  # an explicit rollout that recorded rewards: its last span's is final
        if exp.status == "complete":
            if scenario in ("sdk_reward", "late", "missing"):
                exp.final_reward = exp.step_rewards.pop()[1]  # the last reward span
            else:  # the Reward record, sent with is_final=true, is the final reward
                exp.final_reward = reward
                timed_rewards.append((reward_at, reward_id, reward))
        # The join lists in-time rewards in event-time order (ties by event id).
        exp.rewards = [value for _, _, value in sorted(timed_rewards)]
    dead_letters = {}
    if bad_inputs:
        rollout_id = uid()
        messages.append(Message("spans", rollout_id.encode(), b"\xc3\x01garbage", start_us))
        messages.append(Message("rewards", rollout_id.encode(), b"not avro at all", start_us))
        backwards = make_span(rollout_id, event_id=uid(), start_time_us=start_us + 10, end_time_us=start_us)
        batch = {"rollout_id": rollout_id, "producer_id": "traffic:1", "sent_at_us": 0, "spans": [backwards]}
        messages.append(Message("spans", rollout_id.encode(), spans_codec.encode(batch), start_us))
        nan = rewards_codec.encode(
            {
                "event_id": uid(),
                "rollout_id": rollout_id,
                "value": float("nan"),
                "timestamp_us": start_us,
            }
            | {"name": "final", "is_final": True, "source": "", "task_id": "", "agent_name": "", "attributes": {}}
        )
        messages.append(Message("rewards", rollout_id.encode(), nan, start_us))
        dead_letters = {"decode_error": 2, "invariant_violation": 2}
    late = sum(e.late_rewards for e in expected.values())
    if late:
        dead_letters["late_reward"] = late
    # Production order follows event time (stable: a rollout's messages keep their order).
    messages.sort(key=lambda m: m.event_time_us)
    return Traffic(messages, expected, dead_letters)


def verify(
    traffic: Traffic, trajectories: list[dict[str, Any]], samples: list[dict[str, Any]], policy: str, discount: float
) -> None:
    """Assert that the join's output is exactly what the traffic must produce (one trajectory per rollout)."""
    from boltstream.stream_processors.join_core import sample_id, trajectory_id

    assert sorted(t["rollout_id"] for t in trajectories) == sorted(traffic.expected)
    by_trajectory: dict[str, list[dict[str, Any]]] = {}
    for sample in samples:
        by_trajectory.setdefault(sample["trajectory_id"], []).append(sample)
    for record in trajectories:
        expected = traffic.expected[record["rollout_id"]]
        where = f"{expected.scenario} rollout {expected.rollout_id}"
        assert record["trajectory_id"] == trajectory_id(expected.rollout_id)
        assert (record["status"], record["final_reward"]) == (expected.status, expected.final_reward), where
        assert record["rewards"] == expected.rewards, where
        assert sorted(record["span_event_ids"]) == sorted(expected.span_event_ids), where
        assert record["llm_call_count"] == len(expected.calls), where
        assert (record["task_id"], record["agent_name"]) == (expected.task_id, expected.agent_name), where
        got = sorted(by_trajectory.pop(record["trajectory_id"], []), key=lambda s: s["step_index"])
        if expected.status != "complete":
            assert got == [], where
            continue
        assert [s["span_event_id"] for s in got] == [c["event_id"] for c in expected.calls], where
        returns = expected_returns(policy, expected, discount)
        assert all(math.isclose(s["return_value"], r, abs_tol=1e-9) for s, r in zip(got, returns, strict=True)), where
        for sample, call in zip(got, expected.calls, strict=True):
            llm = call["llm"]
            assert sample["sample_id"] == sample_id(record["trajectory_id"], call["event_id"])
            assert sample["task_id"] == expected.task_id and sample["final_reward"] == expected.final_reward
            assert sample["model_version"] == llm["model_version"] and sample["credit_policy"] == policy
            assert sample["prompt_token_ids"] == llm["prompt_token_ids"], where
            assert sample["completion_token_ids"] == llm["completion_token_ids"], where
            assert all(
                math.isclose(a, b, abs_tol=1e-6)
                for a, b in zip(sample["completion_logprobs"], llm["completion_logprobs"], strict=True)
            ), where
            assert sample["step_count"] == len(expected.calls)
    assert not by_trajectory, "samples of trajectories that were not emitted"
