"""APO: templates ranked from rewards (spans say which template, trajectories say how it did), the winner
published to prompt-updates, and producers.current_prompt following it — on the real broker."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid

from confluent_kafka import Producer

from boltstream.infra.common.contract import TEMPLATE_ATTRIBUTE
from boltstream.producers.prompts import PromptFollower
from boltstream.schemas.codec import codec
from boltstream.trainer.apo import ApoWorker, TemplateRanker, load_candidates, template_id
from tests.records import make_span
from tests.trainer_support import create_topics, read_all

SHORT, STEPWISE = "Answer: {question}", "Think step by step, then answer: {question}"


def test_ucb_tries_every_template_then_prefers_the_best_mean():
    ranker = TemplateRanker(exploration=0.0)
    ranker.add_candidates("a", [SHORT, STEPWISE])
    first, _ = ranker.winner("a")
    ranker.record("a", first, 0.1)
    second, _ = ranker.winner("a")
    assert second != first  # the untried one comes next
    ranker.record("a", second, 0.9)
    assert ranker.winner("a")[0] == second
    assert not ranker.record("a", "unknown-template", 1.0)


def test_candidates_file_is_validated(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"a": "not a list"}))
    try:
        load_candidates(bad)
    except ValueError as exc:
        assert "non-empty lists of strings" in str(exc)
    else:
        raise AssertionError("a malformed candidates file was accepted")


def trajectory(rollout_id: str, reward: float | None, status: str = "complete") -> dict:
    return {
        "trajectory_id": rollout_id, "rollout_id": rollout_id, "attempt_id": "a0", "task_id": "t",
        "agent_name": "math-agent", "status": status, "final_reward": reward, "rewards": [],
        "span_count": 2, "llm_call_count": 1, "span_event_ids": [], "model_versions": [], "start_time_us": 0,
        "end_time_us": 0, "closed_at_us": 0, "sampled": True, "selected": True, "duplicate_count": 0,
    }  # fmt: skip


def test_apo_publishes_the_better_template_and_the_sdk_follows_it(settings, tmp_path):
    create_topics(settings)
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps({"math-agent": [SHORT, STEPWISE]}))
    trainer = {"apo_templates": str(templates), "template_update_interval": 1_000_000, "apo_exploration": 0.0}
    settings = dataclasses.replace(settings, trainer=dataclasses.replace(settings.trainer, **trainer))
    worker = ApoWorker(settings, load_candidates(templates))
    (first,) = worker.rerank()  # nothing tried yet: an untried template is published to start with

    producer = Producer(settings.kafka.client_config())
    rewards = {template_id(SHORT): 0.2, template_id(STEPWISE): 0.9}
    for index in range(20):
        rollout = str(uuid.uuid4())
        chosen = template_id(SHORT) if index % 2 else template_id(STEPWISE)
        spans = [make_span(rollout, sequence=i, attributes={TEMPLATE_ATTRIBUTE: chosen}) for i in range(2)]
        batch = {"rollout_id": rollout, "producer_id": "t", "sent_at_us": 0, "spans": spans}
        record = codec("Trajectory").encode(trajectory(rollout, rewards[chosen]))
        # Half of the rewards arrive before their spans (on different topics there is no order).
        if index % 4 == 0:
            producer.produce(settings.topics.trajectories, key=rollout.encode(), value=record)
        producer.produce(settings.topics.spans, key=rollout.encode(), value=codec("SpanBatch").encode(batch))
        if index % 4 != 0:
            producer.produce(settings.topics.trajectories, key=rollout.encode(), value=record)
    timed_out = str(uuid.uuid4())
    producer.produce(
        settings.topics.trajectories, value=codec("Trajectory").encode(trajectory(timed_out, None, "timed_out"))
    )
    producer.produce(settings.topics.spans, value=b"garbage")  # skipped, not fatal
    assert producer.flush(10) == 0

    deadline = time.monotonic() + 30
    stats = worker.ranker.agents["math-agent"]
    while time.monotonic() < deadline and sum(s.evaluations for s in stats.values()) < 20:
        worker.poll(0.5)
    assert stats[template_id(STEPWISE)].evaluations == 10 and stats[template_id(SHORT)].evaluations == 10
    updates = worker.rerank()
    worker.close()

    (update,) = updates
    assert update["template_id"] == template_id(STEPWISE) and update["version"] == first["version"] + 1
    published = read_all(settings, settings.topics.prompt_updates, "PromptUpdate", expect=len(updates) + 1)
    newest = max(published, key=lambda u: u["version"])
    assert newest["template"] == STEPWISE and abs(newest["score"] - 0.9) < 1e-9 and newest["evaluations"] == 10

    follower = PromptFollower(settings)
    try:
        update = follower.get("math-agent")
        assert update["template"] == STEPWISE
        assert follower.get("other-agent") is None
    finally:
        follower.close()
    assert (settings.home / "apo" / "tiny.json").exists()


def test_the_command_says_what_apo_read_published_and_why_it_stopped(settings, tmp_path):
    create_topics(settings)
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps({"math-agent": [SHORT, STEPWISE]}))
    producer = Producer(settings.kafka.client_config())
    for chosen, reward in [(SHORT, 0.2), (STEPWISE, 0.9)] * 2:
        rollout = str(uuid.uuid4())
        spans = [make_span(rollout, sequence=i, attributes={TEMPLATE_ATTRIBUTE: template_id(chosen)}) for i in range(2)]
        batch = {"rollout_id": rollout, "producer_id": "t", "sent_at_us": 0, "spans": spans}
        producer.produce(settings.topics.spans, key=rollout.encode(), value=codec("SpanBatch").encode(batch))
        record = codec("Trajectory").encode(trajectory(rollout, reward))
        producer.produce(settings.topics.trajectories, key=rollout.encode(), value=record)
    assert producer.flush(10) == 0
    topics = settings.topics
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOLTSTREAM_")} | {
        "BOLTSTREAM_HOME": str(settings.home),
        "BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "BOLTSTREAM_TOPICS__SPANS": topics.spans,
        "BOLTSTREAM_TOPICS__TRAJECTORIES": topics.trajectories,
        "BOLTSTREAM_TOPICS__PROMPT_UPDATES": topics.prompt_updates,
        "BOLTSTREAM_TRAINER__ALGORITHM": "apo",
        "BOLTSTREAM_TRAINER__APO_TEMPLATES": str(templates),
        "BOLTSTREAM_TRAINER__APO_EXPLORATION": "0",
    }
    command = [sys.executable, "-m", "boltstream.infra.cli", "train", "--duration", "4"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tiny local model" not in done.stderr  # APO ranks prompts: no model is built for it
    assert done.stdout.splitlines() == [
        "boltstream train: apo, ranking the templates of math-agent; spans and rewards from "
        f"{topics.spans} and {topics.trajectories}, winners to {topics.prompt_updates}",
        f"  state in {settings.home / 'apo' / 'tiny.json'}",
        "  stops at --duration 4 s or Ctrl-C",
        "boltstream train: stopped: --duration over (4 s)",
        "  read 8 spans and 4 rewards, published 2 prompt updates",  # the untried template first, then the best
        f"  math-agent now uses template {template_id(STEPWISE)} (version 2, from 2 rewards)",
    ]
