"""``boltstream sql`` and ``boltstream report`` against a live archive, through the real CLI entry point."""

from __future__ import annotations

import csv
import io
import json
import uuid

import pytest
from confluent_kafka import Producer

from boltstream.infra.cli import main
from boltstream.schemas.codec import codec
from tests.records import make_llm, make_span
from tests.test_archive import wait_for

MINUTE_US = 60_000_000
START_US = 1_767_225_600_000_000  # 2026-01-01 00:00:00 UTC


@pytest.fixture
def archived(settings, archive, monkeypatch, tmp_path):
    """An archive holding a small known history; the CLI pointed at its read endpoint."""
    producer = Producer(settings.kafka.client_config())
    spans, rewards = [], []
    # Two rollouts of "math-agent" on model version v1 (rewards 1.0 and 0.0), one of "web-agent" on v2.
    for index, (agent, version, reward, latency) in enumerate(
        [("math-agent", "v1", 1.0, 100.0), ("math-agent", "v1", 0.0, 300.0), ("web-agent", "v2", 0.5, 200.0)]
    ):
        rollout_id = str(uuid.uuid4())
        llm = make_llm(model_version=version) | {"latency_ms": latency}
        start = START_US + index * MINUTE_US
        batch = [
            make_span(rollout_id, "llm_call", 0, agent_name=agent, llm=llm, start_time_us=start, end_time_us=start),
            make_span(
                rollout_id, "tool_call", 1, agent_name=agent, name="search", start_time_us=start, end_time_us=start
            ),
            make_span(
                rollout_id,
                "tool_call",
                2,
                agent_name=agent,
                name="calculator",
                status="error" if index == 0 else "ok",
                start_time_us=start,
                end_time_us=start,
            ),
        ]
        spans.extend(batch)
        message = {"rollout_id": rollout_id, "producer_id": "test", "sent_at_us": start, "spans": batch}
        producer.produce(settings.topics.spans, codec("SpanBatch").encode(message), key=rollout_id.encode())
        reward_record = {
            "event_id": str(uuid.uuid4()),
            "rollout_id": rollout_id,
            "value": reward,
            "timestamp_us": start,
        }
        rewards.append(reward_record)
        producer.produce(settings.topics.rewards, codec("Reward").encode(reward_record), key=rollout_id.encode())
    assert producer.flush(10) == 0
    archive.start()
    reader = archive.client()
    wait_for(lambda: reader.command("SELECT count() FROM spans") == 9, 60, "9 spans")
    wait_for(lambda: reader.command("SELECT count() FROM rewards") == 3, 30, "3 rewards")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BOLTSTREAM_CLICKHOUSE__READ_URL", archive.read_url)
    return spans


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_sql_prints_csv_json_and_a_table(archived, capsys):
    query = "SELECT agent_name, count() AS spans FROM spans GROUP BY agent_name ORDER BY agent_name"
    code, out, _ = run(capsys, "sql", query, "--format", "csv")
    assert code == 0
    assert list(csv.reader(io.StringIO(out))) == [["agent_name", "spans"], ["math-agent", "6"], ["web-agent", "3"]]
    code, out, _ = run(capsys, "sql", query, "--format", "json")
    assert code == 0
    assert [json.loads(line) for line in out.splitlines()] == [
        {"agent_name": "math-agent", "spans": 6},
        {"agent_name": "web-agent", "spans": 3},
    ]
    code, out, _ = run(capsys, "sql", query)
    assert code == 0
    assert "agent_name" in out and "math-agent" in out and "│ 6" in out and "2 row(s)" in out
    code, out, _ = run(capsys, "sql", "SELECT count() AS n FROM spans FORMAT JSONEachRow")
    assert (code, out) == (0, '{"n":9}\n')


def test_sql_errors_and_writes_are_reported_not_raised(archived, capsys):
    code, _, err = run(capsys, "sql", "SELECT * FROM no_such_table")
    assert code == 1 and "no_such_table" in err
    code, _, err = run(capsys, "sql", "DROP TABLE spans_store")
    assert code == 1 and "READONLY" in err
    code, out, _ = run(capsys, "sql", "SELECT count() FROM spans_store", "--format", "csv")
    assert out.splitlines()[-1] == "9"


def test_report_list_and_each_report(archived, capsys):
    code, out, _ = run(capsys, "report", "--list")
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()]
    assert names == sorted(names)
    assert {"llm_latency", "reward_by_model_version", "spans_per_agent_minute", "tool_error_rate"} <= set(names)
    assert all(len(line.split(maxsplit=1)) == 2 for line in out.splitlines()), "every report has a description"

    def rows(name: str) -> list[list[str]]:
        code, out, _ = run(capsys, "report", name, "--format", "csv")
        assert code == 0
        return list(csv.reader(io.StringIO(out)))

    assert rows("spans_per_agent_minute") == [
        ["minute", "agent_name", "spans"],
        ["2026-01-01 00:00:00", "math-agent", "3"],
        ["2026-01-01 00:01:00", "math-agent", "3"],
        ["2026-01-01 00:02:00", "web-agent", "3"],
    ]
    assert rows("reward_by_model_version") == [
        ["model_version", "rewards", "mean_reward", "min_reward", "max_reward"],
        ["v1", "2", "0.5", "0", "1"],
        ["v2", "1", "0.5", "0.5", "0.5"],
    ]
    latency = rows("llm_latency")
    assert latency[0] == ["model", "model_version", "calls", "p50_ms", "p95_ms", "p99_ms"]
    assert latency[1][:4] == ["tiny-policy", "v1", "2", "200"] and latency[2][:4] == ["tiny-policy", "v2", "1", "200"]
    assert rows("tool_error_rate") == [
        ["tool", "calls", "errors", "error_rate"],
        ["calculator", "3", "1", "0.3333"],
        ["search", "3", "0", "0"],
    ]
    code, out, _ = run(capsys, "report", "tool_error_rate")
    assert code == 0 and "calculator" in out and "0.3333" in out


def test_report_unknown_name_and_no_read_url(archived, capsys, monkeypatch, tmp_path):
    code, _, err = run(capsys, "report", "nope")
    assert code == 2 and "unknown report 'nope'" in err and "tool_error_rate" in err
    monkeypatch.setenv("BOLTSTREAM_CLICKHOUSE__READ_URL", "")
    monkeypatch.setenv("BOLTSTREAM_HOME", str(tmp_path / "no-stack"))
    code, _, err = run(capsys, "sql", "SELECT 1")
    assert code == 2 and "read_url" in err


def test_a_report_without_rows_says_so_and_succeeds(archive, capsys, monkeypatch, tmp_path):
    """A fresh archive: no LLM call archived yet, so llm_latency has nothing to show or plot."""
    archive.start()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BOLTSTREAM_CLICKHOUSE__READ_URL", archive.read_url)
    plots = tmp_path / "plots"
    for options in ([], ["--plot", "--output", str(plots)]):
        code, out, err = run(capsys, "report", "llm_latency", *options)
        assert (code, out) == (0, "")
        assert len(err.splitlines()) == 1
        assert err.startswith("report llm_latency: no rows yet;") and "LLM call latency" in err
    assert not plots.exists()

    code, out, err = run(capsys, "report", "llm_latency", "--format", "csv", "--plot", "--output", str(plots))
    assert code == 0 and "no rows yet" in err
    assert list(csv.reader(io.StringIO(out))) == [["model", "model_version", "calls", "p50_ms", "p95_ms", "p99_ms"]]

    code, out, _ = run(capsys, "sql", "SELECT kind, count() AS spans FROM spans GROUP BY kind")
    assert code == 0 and "kind" in out and "0 row(s)" in out  # sql shows its empty table
