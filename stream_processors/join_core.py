"""The reward ⋈ trajectory join as pure logic: per-rollout state, the closing rules, and what a close emits.

Nothing here talks to Kafka. :class:`JoinCore` is fed raw input messages (``on_span_batch``,
``on_reward``) and clock ticks (``expire``), keeps one :class:`RolloutState` per rollout in a mapping
it is given (the Faust table's store in :mod:`boltstream.stream_processors.join`), and collects what to do:
trajectories and samples to publish, dead letters, and the states to write to the changelog.

Time (all in microseconds of *event time*, carried by the records, so replays decide the same way):

* a span's time is its ``end_time_us``; a reward's is its ``timestamp_us``;
* a rollout *ends* at the ``end_time_us`` of its ``rollout`` span (the SDK emits it when the rollout
  context exits, or when an implicit rollout ends: idle, ``flush()``, process exit). Rewards with a time up
  to ``end + reward_timeout`` (the rollout's *reward window*) are in time; later ones are late;
* rewards (see :meth:`RolloutState.final_reward`): the final reward is the last ``Reward`` record sent with
  ``is_final=true`` if there is one, else the last ``reward`` span (whatever its name); every other reward
  is a step reward, which credit assignment places among the LLM calls. A ``Reward`` record with
  ``is_final=false`` is never the final reward;
* an ended rollout is *settled*, and closes ``complete`` at once, when its outcome is known (see
  :meth:`JoinCore._settled_at`): at its end if it is an explicit rollout (not ``implicit=true``) that
  recorded a reward span named ``final`` (``emit_reward(value)`` in a ``with rollout`` block), else at the
  first ``is_final`` Reward record. Rewards timed after that moment are late. Otherwise it stays open for
  its whole reward window, so every reward timed in it is joined;
* deadlines: an ended rollout that is not settled closes at ``end + reward_timeout``: ``complete`` if it
  has a final reward (its last reward span), else ``timed_out``; a rollout that never
  ended, or rewards with no spans, wait until ``last activity + reward_timeout`` (then ``no_reward`` /
  ``orphaned``);
* an input of a rollout whose event time is past that rollout's deadline proves the deadline has
  passed: the rollout closes (as the timer would have) before the input is looked at, and the input
  is late. A reward proves it only for an ended rollout or one with no spans; for a rollout still
  running, spans may wait unread in the other topic, so such a reward is held and judged when the
  rollout ends;
* a record dated more than ``max_event_time_skew`` after its broker timestamp (its Kafka record
  timestamp) carries a clock the join does not believe: its time becomes the broker timestamp (a span's
  end, and its start if later), counted in ``event_times_clamped_*``. One agent's wrong clock therefore
  moves stream time, and deadlines, no further than an honest record sent at the same moment would;
* otherwise the per-partition *stream time* drives closing: :meth:`JoinCore.expire` closes what is
  due once stream time passes ``deadline + grace``. The worker keeps, per partition, the largest
  event time read from each input topic (a watermark, persisted). While either topic has a backlog
  on the partition, stream time is the smallest watermark of the topics with a backlog (like a
  watermark over two inputs: nothing is closed while its reward may still wait unread in the other
  topic); once both are read to the end, it is the largest watermark advanced by the wall time
  spent idle. A lagging, restarted or rebalanced worker therefore decides as an undisturbed one,
  and replays at any speed decide as the original run.

A closed rollout leaves a small marker (its status and the event ids it saw) for
``closed_retention`` of stream time, so duplicates and late inputs after the close are recognised.
Tombstones (messages without a value) are counted and ignored: the input topics are not compacted, so
a delete marker has nothing to say to the join. Inputs re-delivered after a crash (offset not above
the one already applied to the rollout's state) are skipped without a trace: effects are exactly once
even though delivery is at least once.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import heapq
import json
import math
import sys
import uuid
from array import array
from collections import Counter
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from boltstream.infra.common.config import resolved_policies
from boltstream.infra.common.contract import RETOKENIZATION_ATTRIBUTES, TOOL_CALLS_ATTRIBUTE, keep_rollout
from boltstream.schemas.codec import CodecError, codec
from boltstream.schemas.dead_letters import dead_letter
from boltstream.schemas.token_arrays import AvroArray, read_span_batch
from boltstream.stream_processors.credit import CallPosition, assign_credit, check_policy

SPANS, REWARDS = 0, 1  # which input topic a message came from
#: One write to the changelog: (table key, partition, state), the state None for a tombstone.
ChangelogWrite = tuple[str, int, "RolloutState | PartitionClock | None"]
TRAJECTORY_NAMESPACE = uuid.UUID("4b0c5f5e-5d0a-4e43-9a8e-6f2b1c3d7a10")
CLOCK_PREFIX = "\x00clock:"
STATUSES = ("complete", "timed_out", "no_reward", "orphaned")

_span_batches = codec("SpanBatch")
_rewards = codec("Reward")
_LITTLE_ENDIAN = sys.byteorder == "little"


def _uuid5(namespace: bytes, name: str) -> str:
    """``str(uuid.uuid5(UUID(bytes=namespace), name))`` without the two UUID objects (a third of its cost)."""
    digest = bytearray(hashlib.sha1(namespace + name.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    text = digest.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def trajectory_id(rollout_id: str) -> str:
    """Deterministic trajectory id: UUIDv5 of the rollout id."""
    return _uuid5(TRAJECTORY_NAMESPACE.bytes, rollout_id)


def sample_id(trajectory: str, span_event_id: str) -> str:
    """Deterministic sample id: UUIDv5 of the span's event id in the trajectory id's namespace."""
    # The namespace's bytes straight from the canonical text (uuid.UUID() costs 5x as much).
    return _uuid5(bytes.fromhex(trajectory.replace("-", "")), span_event_id)


def clock_key(partition: int) -> str:
    return f"{CLOCK_PREFIX}{partition}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unpack_legacy(text: str, typecode: str) -> list[Any]:
    """Token ids ("i") or logprobs ("f") as changelogs before the "calls" key kept them: base64 of
    little-endian packed arrays."""
    packed = array(typecode)
    packed.frombytes(base64.b64decode(text))
    if not _LITTLE_ENDIAN:
        packed.byteswap()
    return packed.tolist()


def retokenization_text(span: dict[str, Any]) -> str:
    """TrainingSample ``call_text`` of an llm_call span that came without token ids: its endpoint (the span's
    name), prompt, completion, finish reason and the template's other inputs, as JSON."""
    llm, attributes = span["llm"], span["attributes"]
    call = {
        "endpoint": span["name"],
        "prompt": llm["prompt_text"],
        "completion": llm["completion_text"],
        "finish_reason": llm["finish_reason"],
    }
    call.update((key, attributes[name]) for name, key in RETOKENIZATION_ATTRIBUTES.items() if name in attributes)
    return json.dumps(call, separators=(",", ":"), ensure_ascii=False)


class AgentSelector:
    """``agent_selector``: names or glob patterns; ``all`` (or ``*``) matches every agent."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self.everything = any(p in ("all", "*") for p in self.patterns)

    def __call__(self, agent_name: str) -> bool:
        return self.everything or any(fnmatch.fnmatchcase(agent_name, p) for p in self.patterns)


@dataclass(frozen=True)
class JoinRules:
    """The join's parameters, in microseconds where they are durations."""

    reward_timeout_us: int
    grace_us: int = 1_000_000
    closed_retention_us: int = 3_600_000_000
    max_event_time_skew_us: int = 500_000
    credit_policy: str = "final"
    discount: float = 0.9
    sampling_rate: float = 1.0
    agent_selector: tuple[str, ...] = ("all",)
    #: (name, agent_selector) of each policy: a sample is tagged with every policy whose selector matches its
    #: agent, and made only when one does. None configured = ``agent_selector`` decides, and tags nothing.
    policies: tuple[tuple[str, tuple[str, ...]], ...] = ()
    spans_topic: str = "spans"
    rewards_topic: str = "rewards"
    worker: str = "boltstream-join"

    def __post_init__(self) -> None:
        check_policy(self.credit_policy)
        if self.reward_timeout_us <= 0:
            raise ValueError("reward_timeout must be positive")

    @classmethod
    def from_settings(cls, settings: Any) -> JoinRules:
        stream = settings.stream
        return cls(
            reward_timeout_us=int(stream.reward_timeout * 1e6),
            grace_us=int(stream.join_grace * 1e6),
            closed_retention_us=int(stream.closed_retention * 1e6),
            max_event_time_skew_us=int(stream.max_event_time_skew * 1e6),
            credit_policy=stream.credit_assignment,
            discount=stream.discount,
            sampling_rate=settings.producer.span_sampling_rate,
            agent_selector=stream.agent_selector,
            policies=tuple((policy.name, policy.agent_selector) for policy in resolved_policies(settings)),
            spans_topic=settings.topics.spans,
            rewards_topic=settings.topics.rewards,
            worker=stream.join_group,
        )


@dataclass
class PartitionClock:
    """The largest event time seen per input topic (spans, rewards) on one partition; persisted with the states."""

    partition: int
    event_time_us: list[int] = field(default_factory=lambda: [0, 0])

    def to_json(self) -> dict[str, Any]:
        return {"clock": self.partition, "t": self.event_time_us}


@dataclass
class HeldReward:
    event_id: str
    value: float
    # A Reward record's flag. A reward span's name is "final" (emit_reward's default): inside an explicit
    # rollout it settles the rollout at its end (any reward span may still turn out the last one).
    is_final: bool
    timestamp_us: int
    offset: int  # of the Reward record; -1 for a reward span
    raw: str  # base64 of the Reward record, dead-lettered as is if it turns out late; "" for a reward span
    sequence: int = -1  # a reward span's place in its rollout; -1 for a Reward record (placed by time)


@dataclass
class LlmStep:
    sequence: int
    event_id: str
    end_time_us: int
    model: str
    model_version: str
    # As read from the SpanBatch (Avro bytes, never lists) and written as they are into the TrainingSample.
    prompt_token_ids: AvroArray
    completion_token_ids: AvroArray
    completion_logprobs: AvroArray
    # A call the server returned no token ids for: what the trainer builds them from (TrainingSample.call_text).
    call_text: str = ""

    def to_json(self) -> list[Any]:
        arrays = (self.prompt_token_ids, self.completion_token_ids, self.completion_logprobs)
        encoded = [self.sequence, self.event_id, self.end_time_us, self.model, self.model_version] + [
            _b64(array.encoded) for array in arrays
        ]
        return [*encoded, self.call_text] if self.call_text else encoded

    @classmethod
    def from_json(cls, data: list[Any]) -> LlmStep:
        # Eight items, or nine with the call text (states written before it have eight).
        *fields, prompt, completion, logprobs = data[:8]
        arrays = (AvroArray.from_encoded(base64.b64decode(text)) for text in (prompt, completion, logprobs))
        return cls(*fields, *arrays, *data[8:])

    @property
    def token_source(self) -> str:
        return "retokenized" if self.call_text else "server"

    @classmethod
    def from_legacy_json(cls, data: list[Any]) -> LlmStep:
        *fields, prompt, completion, logprobs = data
        return cls(
            *fields,
            AvroArray.of_ints(_unpack_legacy(prompt, "i")),
            AvroArray.of_ints(_unpack_legacy(completion, "i")),
            AvroArray.of_floats(_unpack_legacy(logprobs, "f")),
        )


@dataclass
class RolloutState:
    """Everything the join knows about one rollout; after the close only the marker fields remain."""

    rollout_id: str
    partition: int
    status: str = ""  # "" while open, else the closing status
    closed_at_us: int = 0
    applied: list[int] = field(default_factory=lambda: [-1, -1])  # last applied offset per input topic
    seen: set[str] = field(default_factory=set)
    duplicates: int = 0
    task_id: str = ""
    agent_name: str = ""
    attempt_id: str = ""
    spans: list[tuple[int, str]] = field(default_factory=list)  # (sequence, event_id)
    llm_call_count: int = 0
    steps: list[LlmStep] = field(default_factory=list)
    rewards: list[HeldReward] = field(default_factory=list)  # reward spans and Reward records, arrival order
    model_versions: list[str] = field(default_factory=list)
    start_time_us: int = 0
    end_time_us: int = 0  # of the rollout span once ended, else of the last span
    ended: bool = False
    implicit: bool = False  # its rollout span says implicit=true: spans the SDK grouped, no ``with rollout``
    last_activity_us: int = 0

    def deadline_us(self, timeout_us: int) -> int:
        return (self.end_time_us if self.ended else self.last_activity_us) + timeout_us

    def due_status(self) -> str:
        if self.ended:
            return "complete" if self.final_reward() is not None else "timed_out"
        return "no_reward" if self.spans else "orphaned"

    def final_reward(self) -> HeldReward | None:
        """The last Reward record sent with ``is_final``, else the last reward span (in its rollout's
        order); None when there is neither (only ``is_final=false`` records, or no reward)."""
        declared = [r for r in self.rewards if r.raw and r.is_final]
        if declared:
            return max(declared, key=lambda r: (r.timestamp_us, r.event_id))
        spans = [r for r in self.rewards if not r.raw]
        return max(spans, key=lambda r: (r.sequence, r.timestamp_us, r.event_id)) if spans else None

    def close(self, status: str, closed_at_us: int) -> None:
        """Become the closed marker: the payload goes, what recognises later inputs stays."""
        marker = RolloutState(self.rollout_id, self.partition, status, closed_at_us, self.applied, self.seen)
        marker.duplicates = self.duplicates
        self.__dict__.update(vars(marker))

    def to_json(self) -> dict[str, Any]:
        marker = {
            "r": self.rollout_id,
            "p": self.partition,
            "s": self.status,
            "c": self.closed_at_us,
            "o": self.applied,
            "d": self.duplicates,
        }
        if self.status:
            return {**marker, "e": list(self.seen)}
        # An open rollout's seen ids are exactly its spans' and rewards' ids: not written twice.
        return {
            **marker,
            "task": self.task_id,
            "agent": self.agent_name,
            "attempt": self.attempt_id,
            "spans": self.spans,
            "llm": self.llm_call_count,
            # "calls", not "steps" (their token arrays were packed differently): an older worker fails on it
            # loudly rather than misreading it.
            "calls": [step.to_json() for step in self.steps],
            "rewards": [list(vars(reward).values()) for reward in self.rewards],
            "versions": self.model_versions,
            "start": self.start_time_us,
            "end": self.end_time_us,
            "ended": self.ended,
            "implicit": self.implicit,
            "active": self.last_activity_us,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutState:
        state = cls(
            rollout_id=data["r"],
            partition=data["p"],
            status=data["s"],
            closed_at_us=data["c"],
            applied=list(data["o"]),
            seen=set(data.get("e", ())),
            duplicates=data["d"],
        )
        if not state.status:
            state.task_id, state.agent_name, state.attempt_id = data["task"], data["agent"], data["attempt"]
            state.spans = [tuple(s) for s in data["spans"]]
            state.llm_call_count = data["llm"]
            if "calls" in data:
                state.steps = [LlmStep.from_json(step) for step in data["calls"]]
            else:  # written by a worker before the "calls" key: upgraded in place
                state.steps = [LlmStep.from_legacy_json(step) for step in data["steps"]]
            # Written before reward spans kept their sequence: those are placed by time (HeldReward.sequence).
            state.rewards = [HeldReward(*reward) for reward in data["rewards"]]
            state.model_versions = data["versions"]
            state.start_time_us, state.end_time_us = data["start"], data["end"]
            state.ended, state.last_activity_us = data["ended"], data["active"]
            state.implicit = data.get("implicit", False)  # absent before implicit rollouts waited for rewards
            state.seen = {event_id for _, event_id in state.spans} | {r.event_id for r in state.rewards}
        return state


def dumps_state(state: RolloutState | PartitionClock | None) -> bytes | None:
    """Changelog bytes of a state (None stays None: a tombstone)."""
    if state is None:
        return None
    return json.dumps(state.to_json(), separators=(",", ":")).encode()


def loads_state(data: bytes) -> RolloutState | PartitionClock:
    decoded = json.loads(data)
    if "clock" in decoded:
        return PartitionClock(decoded["clock"], list(decoded["t"]))
    return RolloutState.from_json(decoded)


def _span_problem(span: dict[str, Any], rollout_id: str) -> str:
    """Why a span breaks an invariant, or '' when it is fine."""
    if span["rollout_id"] != rollout_id:
        return f"span rollout_id {span['rollout_id']!r} differs from its batch's {rollout_id!r}"
    if span["end_time_us"] < span["start_time_us"]:
        return f"negative duration: end_time_us {span['end_time_us']} < start_time_us {span['start_time_us']}"
    if span["kind"] == "reward" and (span["reward"] is None or not math.isfinite(span["reward"])):
        return f"reward span with a missing or non-finite reward: {span['reward']!r}"
    llm = span["llm"]
    if llm is not None and llm["completion_logprobs"].count:
        logprobs, tokens = llm["completion_logprobs"].count, llm["completion_token_ids"].count
        if logprobs != tokens:
            return f"{logprobs} completion logprobs for {tokens} completion tokens"
        if not llm["completion_logprobs"].floats_finite():
            return "non-finite completion logprob"
    return ""


def _one_span_batch(value: bytes, index: int) -> bytes:
    """The SpanBatch of ``value`` with only its span at ``index``: what a dead letter of that span holds."""
    batch = _span_batches.decode(value)
    return _span_batches.encode({**batch, "spans": [batch["spans"][index]]})


class JoinCore:
    """Applies inputs to rollout states and collects the effects; drained by the worker after each batch."""

    def __init__(self, rules: JoinRules, states: MutableMapping[str, Any]) -> None:
        self.rules = rules
        self.states = states
        self.select = AgentSelector(rules.agent_selector)
        self.policy_selectors = [(name, AgentSelector(patterns)) for name, patterns in rules.policies]
        self.trajectories: list[dict[str, Any]] = []
        self.samples: list[
            dict[str, Any]
        ] = []  # arrays as AvroArray: boltstream.schemas.token_arrays.encode_training_sample
        self.dead_letters: list[tuple[bytes | None, dict[str, Any]]] = []
        self.dirty: dict[str, Any] = {}  # key -> state (RolloutState or PartitionClock) to write
        self.deleted: dict[str, int] = {}  # key -> partition of states dropped from ``states``
        self.counts: Counter[str] = Counter()
        # Indexes over ``states`` so the timer never scans them all: open rollouts, and per partition a
        # heap of (closed_at_us, key) of closed markers. Rebuilt by reindex() when partitions move.
        self.open: dict[str, RolloutState] = {}
        self.closed: dict[int, list[tuple[int, str]]] = {}
        self.reindex()

    # -- inputs ---------------------------------------------------------------------------------
    def on_span_batch(
        self,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        now_us: int,
        broker_time_us: int | None = None,
    ) -> None:
        """Apply one SpanBatch message; ``broker_time_us`` is its Kafka timestamp (None: not known, no bound)."""
        if value is None:
            self.counts["tombstones"] += 1  # a delete marker has nothing to apply; the topics are not compacted
            return
        try:
            batch = read_span_batch(value)
        except CodecError as exc:
            self._dead(SPANS, partition, offset, key, value, f"undecodable SpanBatch: {exc}", "decode_error", now_us)
            return
        rollout_id = batch["rollout_id"]
        if key is not None and key != rollout_id.encode():
            reason = f"message key {key!r} is not the batch's rollout_id {rollout_id!r} (breaks co-partitioning)"
            self._dead(SPANS, partition, offset, key, value, reason, "invariant_violation", now_us)
            return
        state = self._state(rollout_id, partition, SPANS, offset)
        if state is None:
            return
        clock = self._clock(partition)
        timeout = self.rules.reward_timeout_us
        for index, span in enumerate(batch["spans"]):
            problem = _span_problem(span, rollout_id)
            if problem:
                bad = _one_span_batch(value, index)
                self._dead(SPANS, partition, offset, key, bad, problem, "invariant_violation", now_us, index)
                continue
            if self._implausible(span["end_time_us"], broker_time_us):
                start = min(span["start_time_us"], broker_time_us)
                span = {**span, "start_time_us": start, "end_time_us": broker_time_us}
                self.counts["event_times_clamped_spans"] += 1
            event_time = span["end_time_us"]
            self._advance(clock, SPANS, event_time)
            self.counts["spans"] += 1
            event_id = span["event_id"]
            if event_id in state.seen:
                state.duplicates += 1
                self.counts["duplicates"] += 1
                continue
            state.seen.add(event_id)
            if not state.status and state.last_activity_us and event_time > state.deadline_us(timeout):
                self._close(state, state.due_status(), state.deadline_us(timeout))
            if state.status:
                self.counts["late_spans"] += 1
                reason = f"span {event_id} arrived after its trajectory closed as {state.status}"
                bad = _one_span_batch(value, index)
                self._dead(SPANS, partition, offset, key, bad, reason, "late_span", now_us, index)
                continue
            self._add_span(state, span)
        if not state.status and not state.seen:  # nothing valid arrived: leave no empty state behind
            del self.states[rollout_id]
            self.open.pop(rollout_id, None)
            self.dirty.pop(rollout_id, None)
            return
        self._settle(state, now_us)

    def on_reward(
        self,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        now_us: int,
        broker_time_us: int | None = None,
    ) -> None:
        """Apply one Reward message; ``broker_time_us`` as in :meth:`on_span_batch`."""
        if value is None:
            self.counts["tombstones"] += 1
            return
        try:
            reward = _rewards.decode(value)
        except CodecError as exc:
            self._dead(REWARDS, partition, offset, key, value, f"undecodable Reward: {exc}", "decode_error", now_us)
            return
        rollout_id = reward["rollout_id"]
        if key is not None and key != rollout_id.encode():
            reason = f"message key {key!r} is not the reward's rollout_id {rollout_id!r} (breaks co-partitioning)"
            self._dead(REWARDS, partition, offset, key, value, reason, "invariant_violation", now_us)
            return
        if not math.isfinite(reward["value"]):
            self._dead(
                REWARDS,
                partition,
                offset,
                key,
                value,
                f"non-finite reward {reward['value']}",
                "invariant_violation",
                now_us,
            )
            return
        state = self._state(rollout_id, partition, REWARDS, offset)
        if state is None:
            return
        self.counts["rewards"] += 1
        event_time = reward["timestamp_us"]
        if self._implausible(event_time, broker_time_us):
            event_time = reward["timestamp_us"] = broker_time_us
            self.counts["event_times_clamped_rewards"] += 1
        self._advance(self._clock(partition), REWARDS, event_time)
        if reward["event_id"] in state.seen:
            state.duplicates += 1
            self.counts["duplicates"] += 1
            return
        state.seen.add(reward["event_id"])
        timeout = self.rules.reward_timeout_us
        # Only evidence from the reward's own topic closes the rollout here: its end (read before it) or,
        # with no spans at all, earlier rewards. A rollout still running may have spans unread in the
        # other topic, so a reward timed past its inactivity deadline is held; _settle judges it at the end.
        proven = not state.status and (state.ended or not state.spans) and state.last_activity_us
        if proven and event_time > state.deadline_us(timeout):
            self._close(state, state.due_status(), state.deadline_us(timeout))
        held = HeldReward(
            reward["event_id"],
            reward["value"],
            reward["is_final"],
            event_time,
            offset,
            base64.b64encode(value).decode(),
        )
        if state.status:
            self._late_reward(state, held, key, now_us)
            return
        state.rewards.append(held)
        state.last_activity_us = max(state.last_activity_us, event_time)
        state.task_id = state.task_id or reward["task_id"]
        state.agent_name = state.agent_name or reward["agent_name"]
        self._settle(state, now_us)

    # -- time -----------------------------------------------------------------------------------
    def expire(self, partitions: dict[int, int]) -> None:
        """Close what is due on the given partitions at their stream times; drop old closed markers."""
        timeout, grace, retention = self.rules.reward_timeout_us, self.rules.grace_us, self.rules.closed_retention_us
        for state in list(self.open.values()):
            now = partitions.get(state.partition)
            if now is None:
                continue
            deadline = state.deadline_us(timeout)
            if not state.status and now > deadline + grace:
                self._close(state, state.due_status(), deadline)
        for partition, now in partitions.items():
            markers = self.closed.get(partition, [])
            while markers and now > markers[0][0] + retention:
                _, key = heapq.heappop(markers)
                state = self.states.get(key)
                if isinstance(state, RolloutState) and state.status:
                    del self.states[key]
                    self.dirty.pop(key, None)
                    self.deleted[key] = partition

    def adopt(self, partitions: set[int], now_us: int) -> None:
        """Take the states as a (re)assignment left them: after a rebalance, ``states`` holds objects the
        changelog recovery just created for ``partitions`` (replacing the ones the indexes point at, also
        for partitions this worker kept) and whatever this worker created for partitions it no longer owns.
        Those are dropped (their new owner restored them from the changelog; nothing is written for them:
        a write from here would overwrite the owner's), with any writes still pending for them, and the
        indexes are rebuilt from the states that remain."""
        for key, state in list(self.states.items()):
            if state.partition not in partitions:
                del self.states[key]
        self.dirty = {key: state for key, state in self.dirty.items() if state.partition in partitions}
        self.deleted = {key: partition for key, partition in self.deleted.items() if partition in partitions}
        self.reindex(now_us)

    def reindex(self, now_us: int = 0) -> None:
        """Rebuild the open / closed indexes from the states (after recovery or a rebalance), and close
        restored rollouts whose outcome is known (a crash may have come between their last input and the
        changelog write of their close)."""
        self.open.clear()
        self.closed.clear()
        for key, state in self.states.items():
            if isinstance(state, RolloutState):
                self._index(key, state)
        for state in list(self.open.values()):
            self._settle(state, now_us)

    def _index(self, key: str, state: RolloutState) -> None:
        if state.status:
            self.open.pop(key, None)
            heapq.heappush(self.closed.setdefault(state.partition, []), (state.closed_at_us, key))
        else:
            self.open[key] = state

    def clock(self, partition: int) -> tuple[int, int]:
        """Largest event time seen on ``partition`` of the spans and of the rewards topic (0 if none)."""
        clock = self.states.get(clock_key(partition))
        return tuple(clock.event_time_us) if clock is not None else (0, 0)

    def open_count(self) -> int:
        return len(self.open)

    def drain(
        self,
    ) -> tuple[
        list[dict[str, Any]], list[dict[str, Any]], list[tuple[bytes | None, dict[str, Any]]], list[ChangelogWrite]
    ]:
        """Take the collected trajectories, samples, dead letters and changelog writes (and forget them).

        The writes come in the order they must be written: rollout states and tombstones first, the
        partition clocks last. A crash leaves a prefix of them durable (one changelog partition per input
        partition, written in order), so a restored clock never runs ahead of the restored states: a
        restarted worker must not take a stream time from inputs whose effects on the states were lost,
        or it would close rollouts before it has re-read their inputs.
        """
        dirty = self.dirty.items()
        writes = [(key, state.partition, state) for key, state in dirty if isinstance(state, RolloutState)]
        writes += [(key, partition, None) for key, partition in self.deleted.items()]
        writes += [(key, clock.partition, clock) for key, clock in dirty if isinstance(clock, PartitionClock)]
        drained = self.trajectories, self.samples, self.dead_letters, writes
        self.trajectories, self.samples, self.dead_letters, self.dirty, self.deleted = [], [], [], {}, {}
        return drained

    # -- internals ------------------------------------------------------------------------------
    def _state(self, rollout_id: str, partition: int, topic: int, offset: int) -> RolloutState | None:
        state = self.states.get(rollout_id)
        if state is None:
            state = self.states[rollout_id] = self.open[rollout_id] = RolloutState(rollout_id, partition)
        elif offset <= state.applied[topic]:
            self.counts["redelivered"] += 1  # already applied before a restart: skip, no trace
            return None
        state.applied[topic] = offset
        self.dirty[rollout_id] = state
        return state

    def _clock(self, partition: int) -> PartitionClock:
        key = clock_key(partition)
        clock = self.states.get(key)
        if clock is None:
            clock = self.states[key] = PartitionClock(partition)
        self.dirty[key] = clock
        return clock

    def _implausible(self, event_time_us: int, broker_time_us: int | None) -> bool:
        """Whether a record claims a time more than ``max_event_time_skew`` after its broker timestamp. The
        join then uses the broker timestamp instead (the latest moment the record is known to exist), so
        one wrong clock moves stream time, and its rollout's deadlines, no further than an honest record
        sent at the same moment would."""
        return broker_time_us is not None and event_time_us > broker_time_us + self.rules.max_event_time_skew_us

    def _advance(self, clock: PartitionClock, topic: int, event_time: int) -> None:
        if event_time > clock.event_time_us[topic]:
            clock.event_time_us[topic] = event_time

    def _add_span(self, state: RolloutState, span: dict[str, Any]) -> None:
        state.spans.append((span["sequence"], span["event_id"]))
        state.task_id = state.task_id or span["task_id"]
        state.agent_name = state.agent_name or span["agent_name"]
        state.attempt_id = state.attempt_id or span["attempt_id"]
        start, end = span["start_time_us"], span["end_time_us"]
        if not state.start_time_us or start < state.start_time_us:
            state.start_time_us = start
        state.last_activity_us = max(state.last_activity_us, end)
        kind = span["kind"]
        if kind == "rollout":
            state.ended = True
            state.end_time_us = end
            state.implicit = span["attributes"].get("implicit") in ("true", True)
        elif not state.ended:
            state.end_time_us = max(state.end_time_us, end)
        if kind == "reward":
            # Whatever its name, the rollout's last reward span is its final reward (see final_reward); the
            # name "final" (emit_reward's default) also settles an explicit rollout at its end (_settled_at).
            named_final = span["name"] == "final"
            state.rewards.append(
                HeldReward(span["event_id"], span["reward"], named_final, end, -1, "", span["sequence"])
            )
        elif kind == "llm_call":
            state.llm_call_count += 1
            llm = span["llm"]
            if llm is None:
                return
            if llm["model_version"] not in state.model_versions:
                state.model_versions.append(llm["model_version"])
            if llm["completion_token_ids"].count:
                call_text = ""
            elif span["status"] == "ok" and (llm["completion_text"] or span["attributes"].get(TOOL_CALLS_ATTRIBUTE)):
                # No token ids from the server: the trainer builds them from the text with its tokenizer.
                call_text = retokenization_text(span)
                self.counts["llm_calls_to_retokenize"] += 1
            else:
                self.counts["untrainable_llm_calls"] += 1
                return
            state.steps.append(
                LlmStep(
                    span["sequence"],
                    span["event_id"],
                    end,
                    llm["model"],
                    llm["model_version"],
                    llm["prompt_token_ids"],
                    llm["completion_token_ids"],
                    llm["completion_logprobs"],
                    call_text,
                )
            )

    def _settle(self, state: RolloutState, now_us: int) -> None:
        """Close an ended rollout as soon as its outcome is known: settled (see _settled_at), or a reward
        timed past its reward window, which proves the window is over."""
        if state.status or not state.ended:
            return
        deadline = state.deadline_us(self.rules.reward_timeout_us)
        settled = self._settled_at(state, deadline)
        # A settled rollout takes no Reward record timed after it settled; its own reward spans stay (a span
        # past the deadline was refused as a late span before it got here).
        records_until = deadline if settled is None else settled
        late = [r for r in state.rewards if r.timestamp_us > (records_until if r.raw else deadline)]
        if late:
            state.rewards = [r for r in state.rewards if r not in late]
        if settled is not None:
            self._close(state, "complete", settled)
        elif late:
            self._close(state, state.due_status(), deadline)
        for reward in late:
            if reward.raw:  # a late reward *span* was already dead-lettered as a late span
                self._late_reward(state, reward, state.rollout_id.encode(), now_us)

    @staticmethod
    def _settled_at(state: RolloutState, deadline_us: int) -> int | None:
        """When an ended rollout's outcome is known before its reward window is over, or None.

        An explicit rollout that recorded a reward span named ``final`` (``emit_reward(value)``) is settled
        at its end: the agent gave its reward inside the block, and its trajectory goes out at once (reward
        spans with other names are step rewards, and leave the window open for a verifier's reward).
        Otherwise the first ``is_final`` Reward record in the window settles it (at its time, or at the end
        if it came earlier). Either way the moment is decided by event times alone, so the outcome does not
        depend on which topic was read first.
        """
        if not state.implicit and any(not r.raw and r.is_final for r in state.rewards):
            return state.end_time_us
        declared = [r.timestamp_us for r in state.rewards if r.raw and r.is_final and r.timestamp_us <= deadline_us]
        return max(state.end_time_us, min(declared)) if declared else None

    def _late_reward(self, state: RolloutState, reward: HeldReward, key: bytes | None, now_us: int) -> None:
        self.counts["late_rewards"] += 1
        reason = f"reward {reward.event_id} arrived after its trajectory closed as {state.status}; not applied"
        raw = base64.b64decode(reward.raw)
        self._dead(
            REWARDS, state.partition, reward.offset, key, raw, reason, "late_reward", now_us, event_key=reward.event_id
        )

    def _close(self, state: RolloutState, status: str, closed_at_us: int) -> None:
        rules = self.rules
        traj_id = trajectory_id(state.rollout_id)
        # Event-time order, not arrival order: spans and rewards come from two topics whose interleaving
        # differs between runs; ordering by time makes replays and restarts agree.
        in_time = sorted(state.rewards, key=lambda r: (r.timestamp_us, r.event_id))
        final = state.final_reward() if status == "complete" else None
        sampled = keep_rollout(state.rollout_id, rules.sampling_rate)
        policies = self.policies_of(state.agent_name)
        selected = bool(policies) if self.policy_selectors else self.select(state.agent_name)
        ordered = sorted(state.spans)
        self.trajectories.append(
            {
                "trajectory_id": traj_id,
                "rollout_id": state.rollout_id,
                "attempt_id": state.attempt_id,
                "task_id": state.task_id,
                "agent_name": state.agent_name,
                "status": status,
                "final_reward": None if final is None else final.value,
                "rewards": [r.value for r in in_time],
                "span_count": len(ordered),
                "llm_call_count": state.llm_call_count,
                "span_event_ids": [event_id for _, event_id in ordered],
                "model_versions": sorted(state.model_versions),
                "start_time_us": state.start_time_us,
                "end_time_us": state.end_time_us,
                "closed_at_us": closed_at_us,
                "sampled": sampled,
                "selected": selected,
                "duplicate_count": state.duplicates,
            }
        )
        self.counts[f"trajectories_{status}"] += 1
        if final is not None and sampled and selected:
            self._emit_samples(state, traj_id, final, closed_at_us, policies)
        # Keep only the marker: the payload is no longer needed and the changelog stays small.
        state.close(status, closed_at_us)
        self._index(state.rollout_id, state)
        self.dirty[state.rollout_id] = state

    def policies_of(self, agent_name: str) -> list[str]:
        """The policies whose selector matches ``agent_name``, in configuration order."""
        return [name for name, select in self.policy_selectors if select(agent_name)]

    def _emit_samples(
        self, state: RolloutState, traj_id: str, final: HeldReward, created_at_us: int, policies: list[str]
    ) -> None:
        rules = self.rules
        steps = sorted(state.steps, key=lambda s: (s.sequence, s.event_id))
        step_rewards = [r for r in state.rewards if r is not final]
        final_reward = final.value
        returns = assign_credit(
            rules.credit_policy,
            [CallPosition(s.sequence, s.end_time_us) for s in steps],
            final_reward,
            discount=rules.discount,
            span_rewards=[(r.sequence, r.value) for r in step_rewards if r.sequence >= 0],
            record_rewards=[(r.timestamp_us, r.value) for r in step_rewards if r.sequence < 0],
        )
        for index, (step, credit) in enumerate(zip(steps, returns, strict=True)):
            self.samples.append(
                {
                    "sample_id": sample_id(traj_id, step.event_id),
                    "trajectory_id": traj_id,
                    "rollout_id": state.rollout_id,
                    "task_id": state.task_id,
                    "agent_name": state.agent_name,
                    "span_event_id": step.event_id,
                    "step_index": index,
                    "step_count": len(steps),
                    "model": step.model,
                    "model_version": step.model_version,
                    "prompt_token_ids": step.prompt_token_ids,
                    "completion_token_ids": step.completion_token_ids,
                    "completion_logprobs": step.completion_logprobs,
                    "return_value": credit,
                    "final_reward": final_reward,
                    "credit_policy": rules.credit_policy,
                    "created_at_us": created_at_us,
                    "token_source": step.token_source,
                    "call_text": step.call_text,
                    "policies": policies,
                }
            )
        self.counts["samples"] += len(steps)

    def _dead(
        self,
        topic: int,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes,
        reason: str,
        error_type: str,
        now_us: int,
        index: int = 0,
        event_key: str = "",
    ) -> None:
        source = self.rules.spans_topic if topic == SPANS else self.rules.rewards_topic
        self.counts[f"dead_letters_{error_type}"] += 1
        # The identity tells apart several dead letters of one message (the spans of a batch).
        record = dead_letter(
            worker=self.rules.worker,
            source_topic=source,
            source_partition=partition,
            source_offset=offset,
            key=key,
            value=value,
            reason=reason,
            error_type=error_type,
            identity=f"{index}:{error_type}:{event_key}",
            timestamp_us=now_us,
        )
        self.dead_letters.append((key, record))
