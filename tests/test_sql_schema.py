"""SQL a newcomer can use: ``sql --schema``, binary-safe output, ``report --list`` without a stack, and the
closest column named when a query uses an unknown one. Against a real archive process (chDB) and the
real CLI; the no-stack cases run the CLI as a process with no read URL and no stack state."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import subprocess
import sys
import uuid

import pytest
from confluent_kafka import Producer

from boltstream.schemas.codec import codec, latest
from boltstream.stream_processors.archive import ddl_statements
from tests.records import make_span
from tests.test_analytics import run
from tests.test_archive import wait_for

#: Bytes that are not UTF-8 text (nor a shipped schema's framing): the archive dead-letters them as is.
RAW = bytes([0xC3, 0x28, 0xFF, 0xFE, 0x00, 0x80, 0x9F, 0x0A, 0x2C, 0x22])


def cli_process(tmp_path, *argv: str) -> subprocess.CompletedProcess:
    """The CLI in a process of its own, with a fresh home: no stack runs, no read URL is configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOLTSTREAM_")}
    env["BOLTSTREAM_HOME"] = str(tmp_path / "no-stack-home")
    return subprocess.run(
        [sys.executable, "-m", "boltstream.infra.cli", *argv],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_schema_lists_tables_and_views_with_their_meaning_without_a_stack(tmp_path):
    done = cli_process(tmp_path, "sql", "--schema", "--format", "csv")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    by_name = {row["name"]: row for row in rows}
    for view in ("spans", "rewards", "trajectories", "samples", "dead_letters", "canary_decisions"):
        assert by_name[view]["kind"] == "view" and by_name[view]["meaning"], view
        assert by_name[f"{view}_store"]["kind"] == "table" and by_name[f"{view}_store"]["meaning"]
    assert "report_llm_latency" in by_name
    assert not any(name.endswith(("_ingest", "_ingest_mv")) for name in by_name), "plumbing is not listed"


def test_schema_of_a_table_gives_every_column_a_meaning_from_the_ddl_or_the_avro_doc(tmp_path):
    done = cli_process(tmp_path, "sql", "--schema", "spans", "--format", "json")
    assert done.returncode == 0, done.stderr
    columns = {row["column"]: row for row in map(json.loads, done.stdout.splitlines())}
    assert {"llm_model", "kind", "agent_name", "llm_prompt_token_ids", "archived_at"} <= set(columns)
    assert all(row["meaning"] for row in columns.values()), [n for n, r in columns.items() if not r["meaning"]]
    span = next(f for f in latest("SpanBatch").schema["fields"] if f["name"] == "spans")["type"]["items"]
    llm = next(f for f in span["fields"] if f["name"] == "llm")["type"][1]
    model_doc = next(f["doc"] for f in llm["fields"] if f["name"] == "model")
    assert columns["llm_model"]["meaning"] == model_doc  # the Avro doc, not a copy of it
    assert "span type" in columns["kind"]["meaning"]  # the column's COMMENT in the DDL wins
    assert columns["llm_model"]["type"] == "LowCardinality(String)"

    done = cli_process(tmp_path, "sql", "--schema", "span")
    assert done.returncode == 2 and "did you mean 'spans'" in done.stderr


def test_report_list_works_without_a_stack(tmp_path):
    done = cli_process(tmp_path, "report", "--list")
    assert done.returncode == 0, done.stderr
    listed = [line.split()[0] for line in done.stdout.splitlines()]
    shipped = sorted(
        m.group(1) for s in ddl_statements() if (m := re.search(r"CREATE OR REPLACE VIEW report_(\w+)", s))
    )
    assert listed == shipped
    assert all(len(line.split(maxsplit=1)) == 2 for line in done.stdout.splitlines()), "each has its comment"


@pytest.fixture
def with_dead_letter(settings, archive, monkeypatch, tmp_path):
    """An archive holding one span and one dead letter whose value is RAW; the CLI pointed at it."""
    producer = Producer(settings.kafka.client_config())
    rollout_id = str(uuid.uuid4())
    batch = {"rollout_id": rollout_id, "producer_id": "test", "sent_at_us": 0, "spans": [make_span(rollout_id)]}
    producer.produce(settings.topics.spans, codec("SpanBatch").encode(batch), key=rollout_id.encode())
    producer.produce(settings.topics.spans, RAW, key=b"broken")
    assert producer.flush(10) == 0
    archive.start()
    reader = archive.client()
    wait_for(lambda: reader.command("SELECT count() FROM dead_letters") == 1, 60, "the dead letter")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BOLTSTREAM_CLICKHOUSE__READ_URL", archive.read_url)


def test_binary_columns_print_as_base64_in_every_format(with_dead_letter, capsys):
    query = "SELECT key, value, error_type FROM dead_letters"
    code, out, err = run(capsys, "sql", query, "--format", "csv")
    assert code == 0, err
    header, row = list(csv.reader(io.StringIO(out)))
    assert header == ["key", "value (base64)", "error_type"]
    assert row[0] == "broken" and base64.b64decode(row[1]) == RAW and row[2] == "decode_error"

    code, out, err = run(capsys, "sql", query, "--format", "json")
    assert code == 0, err
    (record,) = map(json.loads, out.splitlines())
    assert record["key"] == "broken" and base64.b64decode(record["value (base64)"]) == RAW

    code, out, err = run(capsys, "sql", query)
    assert code == 0, err
    assert "value (base64)" in out and base64.b64encode(RAW).decode() in out and "broken" in out

    # Text columns stay text; a query without binary values is printed as the server formats it.
    code, out, _ = run(capsys, "sql", "SELECT key, error_type FROM dead_letters", "--format", "csv")
    assert (code, out) == (0, '"key","error_type"\n"broken","decode_error"\n')


def test_an_unknown_column_is_answered_with_the_closest_ones(with_dead_letter, capsys):
    code, _, err = run(capsys, "sql", "SELECT model, count() FROM spans GROUP BY model")
    assert code == 1 and "did you mean 'llm_model'" in err and "--schema spans" in err
    code, _, err = run(capsys, "sql", "SELECT span_type FROM spans")
    assert code == 1 and "'kind'" in err
    code, _, err = run(capsys, "sql", "SELECT agent FROM rewards", "--format", "csv")
    assert code == 1 and "did you mean 'agent_name'" in err
    code, _, err = run(capsys, "sql", "SELECT * FROM no_such_table")
    assert code == 1 and "no_such_table" in err and "did you mean" not in err


def test_schema_reads_the_live_archive_when_one_runs(with_dead_letter, capsys):
    code, out, err = run(capsys, "sql", "--schema", "dead_letters", "--format", "csv")
    assert code == 0, err
    columns = {row["column"]: row for row in csv.DictReader(io.StringIO(out))}
    assert columns["value"]["meaning"] == "Original raw value bytes." and columns["value"]["type"] == "String"
    code, out, err = run(capsys, "sql", "--schema")
    assert code == 0 and "dead_letters" in out and "ingestion plumbing, not for queries: " in out
    code, _, err = run(capsys, "sql", "--schema", "dead_letters", "SELECT 1")
    assert code == 2 and "not both" in err
