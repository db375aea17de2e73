"""APO, automatic prompt optimisation: rank candidate prompt templates per agent by the rewards they earn.

Candidates come from ``trainer.apo_templates``, a JSON file ``{"agent": ["template", ...]}``; a
template's id is the first 12 hex digits of its SHA-256. An agent asks the SDK for its current template
(``producers.current_prompt(agent)``) and tags its rollout with the attribute
``boltstream.template_id`` (``producers.prompt_attributes(agent)``), so the template used reaches Kafka in
the rollout's spans. This worker reads two topics:

* ``spans``: which template each rollout used (the attribute), and a span count;
* ``trajectories``: each complete rollout's final reward, credited to its template.

Every ``template_update_interval`` spans it re-ranks each agent's candidates by UCB1,
``mean + apo_exploration * sqrt(ln N / n)`` (untried templates first), and publishes the winner to
``prompt-updates`` as a PromptUpdate whenever it or its score changes. With exploration > 0 a template that is
behind still gets tried now and then, so a better one can overtake it; 0 is pure exploitation.
Its state (statistics, which rollout used which template, rewards waiting for their spans, versions
and offsets) is saved to ``<home>/apo/<model>.json`` before offsets are committed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from boltstream.infra.common.config import ConfigError, Settings
from boltstream.infra.common.contract import TEMPLATE_ATTRIBUTE
from boltstream.schemas.codec import CodecError, codec
from boltstream.trainer.stopping import stop_on_ctrl_c

MEMORY = 100_000  # rollouts remembered while waiting for their reward (or rewards waiting for spans)
log = logging.getLogger("boltstream.apo")


def template_id(template: str) -> str:
    return hashlib.sha256(template.encode()).hexdigest()[:12]


@dataclass
class TemplateStats:
    template: str
    evaluations: int = 0
    reward_sum: float = 0.0

    @property
    def mean(self) -> float:
        return self.reward_sum / self.evaluations if self.evaluations else 0.0


@dataclass
class TemplateRanker:
    """Candidates and reward statistics per agent; UCB1 ranking."""

    exploration: float = 1.0
    agents: dict[str, dict[str, TemplateStats]] = field(default_factory=dict)

    def add_candidates(self, agent: str, templates: list[str]) -> None:
        known = self.agents.setdefault(agent, {})
        for template in templates:
            known.setdefault(template_id(template), TemplateStats(template))

    def record(self, agent: str, template: str, reward: float) -> bool:
        """Credit ``reward`` to a template; False if it is not one of the agent's candidates."""
        stats = self.agents.get(agent, {}).get(template)
        if stats is None:
            return False
        stats.evaluations += 1
        stats.reward_sum += reward
        return True

    def winner(self, agent: str) -> tuple[str, TemplateStats]:
        candidates = self.agents[agent]
        total = sum(s.evaluations for s in candidates.values())

        def ucb(item: tuple[str, TemplateStats]) -> tuple[float, str]:
            identifier, stats = item
            if stats.evaluations == 0:
                return (math.inf, identifier)
            bonus = self.exploration * math.sqrt(math.log(max(total, 1)) / stats.evaluations)
            return (stats.mean + bonus, identifier)

        return max(candidates.items(), key=ucb)


class ApoWorker:
    """Consumes spans and trajectories, re-ranks templates, publishes PromptUpdates."""

    def __init__(self, settings: Settings, candidates: dict[str, list[str]]) -> None:
        self.settings = settings
        self.interval = settings.trainer.template_update_interval
        self.ranker = TemplateRanker(settings.trainer.apo_exploration)
        for agent, templates in candidates.items():
            self.ranker.add_candidates(agent, templates)
        self.state_path = settings.home / "apo" / f"{settings.trainer.model_name}.json"
        self.rollout_template: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.waiting_rewards: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.published: dict[str, tuple[str, int, int]] = {}  # agent -> (template id, version, evaluations)
        self.positions: dict[str, int] = {}  # "topic:partition" -> next offset
        self.spans_since_rank = 0
        #: What this process did: spans read, rewards of complete rollouts read, PromptUpdates published.
        self.counts = {"spans": 0, "rewards": 0, "updates": 0}
        self._load()
        self.consumer = Consumer(
            settings.kafka.consumer_config(
                **{
                    "group.id": f"boltstream-apo-{settings.trainer.model_name}",
                    "enable.auto.commit": False,
                    "session.timeout.ms": settings.kafka.session_timeout_ms,
                }
            )
        )
        self.producer = Producer(settings.kafka.client_config(**{"acks": "all", "enable.idempotence": True}))
        self._assign()

    def _assign(self) -> None:
        assignment = []
        for topic in (self.settings.topics.spans, self.settings.topics.trajectories):
            metadata = self.consumer.list_topics(topic, timeout=10).topics.get(topic)
            if metadata is None or metadata.error is not None:
                raise ConfigError(f"APO needs topic {topic!r}: start the stack")
            for partition in metadata.partitions:
                offset = self.positions.get(f"{topic}:{partition}", OFFSET_BEGINNING)
                assignment.append(TopicPartition(topic, partition, offset))
        self.consumer.assign(assignment)

    # -- processing -------------------------------------------------------------------------
    def poll(self, timeout: float = 0.5) -> None:
        for message in self.consumer.consume(num_messages=500, timeout=timeout):
            if message.error() is not None:
                if message.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("reading %s: %s", message.topic(), message.error())
                continue
            self.positions[f"{message.topic()}:{message.partition()}"] = message.offset() + 1
            try:
                if message.topic() == self.settings.topics.spans:
                    self._spans(codec("SpanBatch").decode(message.value()))
                else:
                    self._trajectory(codec("Trajectory").decode(message.value()))
            except CodecError as exc:  # the stream processors dead-letter bad input; APO only skips it
                log.warning(
                    "skipping an undecodable record at %s[%d]@%d: %s",
                    message.topic(),
                    message.partition(),
                    message.offset(),
                    exc,
                )
            if self.spans_since_rank >= self.interval:
                self.rerank()

    def _spans(self, batch: dict[str, Any]) -> None:
        self.spans_since_rank += len(batch["spans"])
        self.counts["spans"] += len(batch["spans"])
        for span in batch["spans"]:
            chosen = span["attributes"].get(TEMPLATE_ATTRIBUTE)
            if chosen is not None and span["rollout_id"] not in self.rollout_template:
                _remember(self.rollout_template, span["rollout_id"], (span["agent_name"], chosen))
                if span["rollout_id"] in self.waiting_rewards:
                    agent, reward = self.waiting_rewards.pop(span["rollout_id"])
                    self.ranker.record(agent, chosen, reward)

    def _trajectory(self, trajectory: dict[str, Any]) -> None:
        if trajectory["status"] != "complete" or trajectory["final_reward"] is None:
            return
        rollout, reward = trajectory["rollout_id"], trajectory["final_reward"]
        self.counts["rewards"] += 1
        if rollout in self.rollout_template:
            agent, chosen = self.rollout_template.pop(rollout)
            self.ranker.record(agent, chosen, reward)
        else:
            _remember(self.waiting_rewards, rollout, (trajectory["agent_name"], reward))

    def rerank(self) -> list[dict[str, Any]]:
        """Rank every agent's templates; publish the winners that changed; save state, commit."""
        self.spans_since_rank = 0
        updates = []
        for agent in self.ranker.agents:
            identifier, stats = self.ranker.winner(agent)
            current, version, evaluations = self.published.get(agent, ("", 0, -1))
            if identifier == current and stats.evaluations == evaluations:
                continue  # nothing new to say; a changed score of the same winner is republished
            update = {
                "agent_name": agent,
                "template_id": identifier,
                "template": stats.template,
                "score": stats.mean,
                "evaluations": stats.evaluations,
                "version": version + 1,
                "created_at_us": time.time_ns() // 1000,
            }
            self.producer.produce(
                self.settings.topics.prompt_updates, key=agent.encode(), value=codec("PromptUpdate").encode(update)
            )
            self.published[agent] = (identifier, version + 1, stats.evaluations)
            updates.append(update)
        self.counts["updates"] += len(updates)
        if self.producer.flush(self.settings.producer.flush_timeout) > 0:
            raise RuntimeError("PromptUpdates could not be delivered")
        self._save()
        offsets = [TopicPartition(k.rsplit(":", 1)[0], int(k.rsplit(":", 1)[1]), v) for k, v in self.positions.items()]
        if offsets:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        return updates

    # -- state ------------------------------------------------------------------------------
    def _save(self) -> None:
        state = {
            "stats": {a: {i: vars(s) for i, s in c.items()} for a, c in self.ranker.agents.items()},
            "rollout_template": list(self.rollout_template.items()),
            "waiting_rewards": list(self.waiting_rewards.items()),
            "published": self.published,
            "positions": self.positions,
        }
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state))
        os.replace(temporary, self.state_path)

    def _load(self) -> None:
        if not self.state_path.exists():
            return
        state = json.loads(self.state_path.read_text())
        for agent, candidates in state["stats"].items():
            for identifier, stats in candidates.items():
                if identifier in self.ranker.agents.get(agent, {}):
                    self.ranker.agents[agent][identifier] = TemplateStats(**stats)
        self.rollout_template = OrderedDict((k, tuple(v)) for k, v in state["rollout_template"])
        self.waiting_rewards = OrderedDict((k, tuple(v)) for k, v in state["waiting_rewards"])
        self.published = {a: tuple(v) for a, v in state["published"].items()}
        self.positions = state["positions"]

    def close(self) -> None:
        self.consumer.close()


def _remember(memory: OrderedDict, key: str, value: Any) -> None:
    memory[key] = value
    while len(memory) > MEMORY:
        memory.popitem(last=False)


def load_candidates(path: str | Path) -> dict[str, list[str]]:
    """``{"agent": ["template", ...]}`` from the JSON file named by ``trainer.apo_templates``."""
    if not path:
        raise ConfigError("trainer.apo_templates: APO needs a JSON file of candidate templates per agent")
    try:
        candidates = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"trainer.apo_templates: cannot read {path}: {exc}") from None
    if not isinstance(candidates, dict) or not all(
        isinstance(t, list) and t and all(isinstance(x, str) for x in t) for t in candidates.values()
    ):
        raise ConfigError(f"trainer.apo_templates: {path} must map agent names to non-empty lists of strings")
    return candidates


def run_apo(settings: Settings, max_seconds: float | None = None) -> int:
    """The APO worker in the foreground (``boltstream train`` with ``trainer.algorithm = "apo"``)."""
    worker = ApoWorker(settings, load_candidates(settings.trainer.apo_templates))
    stopped = ""

    def stop() -> None:
        nonlocal stopped
        stopped = "Ctrl-C"

    stop_on_ctrl_c(stop)  # before the start lines, which say Ctrl-C stops it
    topics = settings.topics
    print(
        f"boltstream train: apo, ranking the templates of {', '.join(worker.ranker.agents)}; spans and rewards from "
        f"{topics.spans} and {topics.trajectories}, winners to {topics.prompt_updates}"
    )
    print(f"  state in {worker.state_path}")
    limit = f"--duration {max_seconds:g} s or " if max_seconds is not None else ""
    print(f"  stops at {limit}Ctrl-C", flush=True)
    worker.rerank()  # publish the starting winners (untried templates first)
    started = time.monotonic()
    try:
        while not stopped:
            if max_seconds is not None and time.monotonic() - started >= max_seconds:
                stopped = f"--duration over ({max_seconds:g} s)"
            else:
                worker.poll()
    finally:
        worker.rerank()
        worker.close()
    spans, rewards, updates = worker.counts["spans"], worker.counts["rewards"], worker.counts["updates"]
    print(f"boltstream train: stopped: {stopped}")
    print(f"  read {spans} spans and {rewards} rewards, published {updates} prompt updates")
    for agent, (identifier, version, evaluations) in sorted(worker.published.items()):
        print(f"  {agent} now uses template {identifier} (version {version}, from {evaluations} rewards)")
    return 0
