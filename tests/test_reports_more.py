"""The analytics report views of ``schemas/clickhouse/11_reports_more.sql`` on known data, through the real
archive worker and its read endpoint, and ``boltstream report NAME --plot`` through the CLI."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import Producer

from boltstream.infra.cli import main
from boltstream.infra.common.config import load_settings
from boltstream.infra.common.topics import ensure_topics
from boltstream.schemas.codec import codec
from boltstream.stream_processors.analytics import report_sql
from tests.conftest import ArchiveProcess
from tests.records import make_llm, make_span
from tests.test_archive import wait_for

SECOND_US = 1_000_000
START_US = 1_767_225_600_000_000  # 2026-01-01 00:00:00 UTC

# rollout: (agent, status, final reward, model versions, duration in s)
TRAJECTORIES = {
    "A": ("math-agent", "complete", 1.0, ["v1"], 2),
    "B": ("math-agent", "complete", 0.0, ["v1", "v2"], 5),
    "C": ("web-agent", "complete", 0.5, ["v2"], 1),
    "D": ("web-agent", "timed_out", None, ["v2"], 3),
    "E": ("web-agent", "orphaned", None, [], 0),
    "F": ("math-agent", "no_reward", None, [], 4),
}
# llm calls: (agent, version, prompt tokens, completion tokens); tool calls: (agent, tool, status)
LLM_CALLS = [("math-agent", "v1", 100, 50), ("math-agent", "v1", 200, 30), ("web-agent", "v2", 10, 5)]
TOOL_CALLS = [
    ("math-agent", "search", "ok"),
    ("math-agent", "search", "error"),
    ("math-agent", "calculator", "ok"),
    ("web-agent", "search", "error"),
]
SAMPLE_VERSIONS = ["v1", "v1", "v1", "v2"]
NEWEST_CANDIDATE = 4  # a CanaryDecision for candidate version 4 of model "tiny-policy"


def trajectory(rollout: str, agent: str, status: str, reward: float | None, versions: list[str], seconds: int):
    start = 0 if status == "orphaned" else START_US
    return {
        "trajectory_id": str(uuid.uuid5(uuid.NAMESPACE_URL, rollout)),
        "rollout_id": rollout,
        "attempt_id": "",
        "task_id": "task-1",
        "agent_name": agent,
        "status": status,
        "final_reward": reward,
        "rewards": [] if reward is None else [reward],
        "span_count": 3,
        "llm_call_count": len(versions),
        "span_event_ids": [],
        "model_versions": versions,
        "start_time_us": start,
        "end_time_us": start + seconds * SECOND_US,
        "closed_at_us": START_US + 10 * SECOND_US,
        "sampled": True,
        "selected": True,
        "duplicate_count": 0,
    }


def sample(index: int, version: str) -> dict[str, Any]:
    return {
        "sample_id": f"sample-{index}",
        "trajectory_id": "t",
        "rollout_id": "A",
        "task_id": "task-1",
        "agent_name": "math-agent",
        "span_event_id": f"span-{index}",
        "step_index": index,
        "step_count": len(SAMPLE_VERSIONS),
        "model": "tiny-policy",
        "model_version": version,
        "prompt_token_ids": [1, 2],
        "completion_token_ids": [3],
        "completion_logprobs": [-0.1],
        "return_value": 1.0,
        "final_reward": 1.0,
        "credit_policy": "final",
        "created_at_us": START_US,
    }


def decision() -> dict[str, Any]:
    return {
        "decision_id": "d-1",
        "model": "tiny-policy",
        "action": "start",
        "candidate_version": NEWEST_CANDIDATE,
        "stable_version": 2,
        "reason": "published",
        "candidate_reward": None,
        "stable_reward": None,
        "candidate_trajectories": 0,
        "stable_trajectories": 0,
        "policy_stability_score": None,
        "stability_tokens": 0,
        "promotion_stability": 0.8,
        "reward_margin": 0.05,
        "canary_share": 0.05,
        "timestamp_us": START_US,
    }


@pytest.fixture(scope="module")
def reader(broker, tmp_path_factory) -> Iterator[tuple[Any, str]]:
    """A running archive holding the known data above; yields a read client and the read URL."""
    home = tmp_path_factory.mktemp("reports")
    suffix = uuid.uuid4().hex[:8]
    names = ("spans", "rewards", "trajectories", "samples", "dlq", "canary_decisions")
    settings = load_settings(
        environ={"BOLTSTREAM_HOME": str(home)},
        kafka={"bootstrap_servers": broker.bootstrap_servers},
        topics={n: f"m{suffix}.{n}" for n in names},
    )
    ensure_topics(settings)
    producer = Producer(settings.kafka.client_config())
    topics = settings.topics

    def send(topic: str, record: str, value: dict[str, Any], key: str) -> None:
        producer.produce(topic, codec(record).encode(value), key=key.encode())

    for rollout, row in TRAJECTORIES.items():
        send(topics.trajectories, "Trajectory", trajectory(rollout, *row), rollout)
    spans = []
    for index, (agent, version, prompt, completion) in enumerate(LLM_CALLS):
        llm = make_llm(prompt, completion, model_version=version)
        spans.append(make_span(f"llm-{index}", "llm_call", 0, agent_name=agent, llm=llm))
    for index, (agent, tool, status) in enumerate(TOOL_CALLS):
        spans.append(make_span(f"tool-{index}", "tool_call", 0, agent_name=agent, name=tool, status=status))
    for span in spans:
        batch = {"rollout_id": span["rollout_id"], "producer_id": "test", "sent_at_us": START_US, "spans": [span]}
        send(topics.spans, "SpanBatch", batch, span["rollout_id"])
    for index, version in enumerate(SAMPLE_VERSIONS):
        send(topics.samples, "TrainingSample", sample(index, version), "task-1")
    send(topics.canary_decisions, "CanaryDecision", decision(), "tiny-policy")
    assert producer.flush(10) == 0

    env = {
        **os.environ,
        "BOLTSTREAM_HOME": str(home),
        "BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "BOLTSTREAM_KAFKA__SESSION_TIMEOUT_MS": "2000",
        "BOLTSTREAM_CLICKHOUSE__ARCHIVE_GROUP": f"archive-{suffix}",
        **{f"BOLTSTREAM_TOPICS__{n.upper()}": getattr(topics, n) for n in names},
    }
    archive = ArchiveProcess(settings, env, home / "archive.log").start()
    try:
        client = archive.client()
        wait_for(lambda: client.command("SELECT count() FROM spans") == len(spans), 60, "the spans")
        wait_for(lambda: client.command("SELECT count() FROM trajectories") == len(TRAJECTORIES), 30, "trajectories")
        wait_for(lambda: client.command("SELECT count() FROM samples") == len(SAMPLE_VERSIONS), 30, "samples")
        wait_for(lambda: client.command("SELECT count() FROM canary_decisions") == 1, 30, "the decision")
        yield client, archive.read_url
    finally:
        archive.stop()


def rows(client, name: str, *params: str) -> list[tuple]:
    return [tuple(row) for row in client.query(report_sql(name, list(params))).result_rows]


def test_reward_by_version_and_agent(reader) -> None:
    client, _ = reader
    assert rows(client, "reward_by_version_and_agent") == [
        ("v1", "math-agent", 2, 0.5, 0.0, 1.0),
        ("v2", "math-agent", 1, 0.0, 0.0, 0.0),
        ("v2", "web-agent", 1, 0.5, 0.5, 0.5),
    ]


def test_outcome_rates(reader) -> None:
    client, _ = reader
    assert rows(client, "outcome_rates") == [
        ("math-agent", 3, 2, 0, 1, 0, 0.0, 0.0),
        ("web-agent", 3, 1, 1, 0, 1, 0.3333, 0.3333),
    ]


def test_token_usage_and_cost(reader) -> None:
    client, _ = reader
    assert rows(client, "token_usage") == [
        ("math-agent", "tiny-policy", "v1", 2, 300, 80, 380, 190.0),
        ("web-agent", "tiny-policy", "v2", 1, 10, 5, 15, 15.0),
    ]
    # 1 USD per million prompt tokens, 2 per million completion tokens.
    cost = rows(client, "token_cost", "prompt_usd_per_mtok=1", "completion_usd_per_mtok=2")
    assert cost == [
        ("math-agent", "tiny-policy", 300, 80, 0.0003, 0.00016, 0.00046),
        ("web-agent", "tiny-policy", 10, 5, 0.00001, 0.00001, 0.00002),
    ]


def test_tool_errors_by_agent(reader) -> None:
    client, _ = reader
    assert rows(client, "tool_errors_by_agent") == [
        ("web-agent", "search", 1, 1, 1.0),
        ("math-agent", "search", 2, 1, 0.5),
        ("math-agent", "calculator", 1, 0, 0.0),
    ]


def test_slowest_rollouts(reader) -> None:
    client, _ = reader
    got = rows(client, "slowest_rollouts")
    assert [(r[0], r[2], r[3]) for r in got] == [
        ("B", "complete", 5000.0),
        ("F", "no_reward", 4000.0),
        ("D", "timed_out", 3000.0),
        ("A", "complete", 2000.0),
        ("C", "complete", 1000.0),
    ]  # E (orphaned: no spans, no duration) is not a rollout that ran


def test_sample_staleness(reader) -> None:
    client, _ = reader
    assert rows(client, "sample_staleness") == [
        ("tiny-policy", "v1", 1, NEWEST_CANDIDATE, NEWEST_CANDIDATE - 1, 3),
        ("tiny-policy", "v2", 2, NEWEST_CANDIDATE, NEWEST_CANDIDATE - 2, 1),
    ]


def test_report_cli_lists_plots_and_takes_parameters(reader, capsys, monkeypatch, tmp_path) -> None:
    _, read_url = reader
    monkeypatch.setenv("BOLTSTREAM_CLICKHOUSE__READ_URL", read_url)
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("reward_by_version_and_agent", "outcome_rates", "token_usage", "token_cost", "sample_staleness"):
        assert name in listed
    assert "prompt_usd_per_mtok" in listed  # the parameter is documented where the report is listed

    assert main(["report", "outcome_rates", "--format", "csv", "--plot", "--output", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert '"web-agent",3,1,1,0,1,0.3333,0.3333' in captured.out
    png, page = tmp_path / "out" / "report_outcome_rates.png", tmp_path / "out" / "report_outcome_rates.html"
    assert f"plot: {png}" in captured.err and f"page: {page}" in captured.err
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 5000
    html = page.read_text()
    assert "data:image/png;base64," in html and "<td>web-agent</td>" in html and "<td>0.3333</td>" in html

    code = main(
        [
            "report",
            "token_cost",
            "--format",
            "csv",
            "--param",
            "prompt_usd_per_mtok=1",
            "--param",
            "completion_usd_per_mtok=2",
        ]
    )
    assert code == 0 and "0.00046" in capsys.readouterr().out
    assert main(["report", "token_cost", "--param", "prompt_usd_per_mtok=1"]) == 2  # both are required
    assert "needs --param completion_usd_per_mtok=..." in capsys.readouterr().err
    assert main(["report", "token_cost", "--param", "oops"]) == 2
