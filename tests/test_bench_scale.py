"""The scale benchmark at a quick size, in the normal suite: its printed figures against what the archive
it filled says when asked directly (an archive process on the same data, SQL through its read endpoint),
and its zstd Avro baseline read back as Avro."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import fastavro
import pytest

from boltstream.schemas.codec import codec
from tests.benchmarks import bench_scale
from tests.conftest import archive_process

SCRIPT = Path(bench_scale.__file__)


# A few minutes on a free machine; generous for a shared one.
@pytest.mark.slow  # two minutes on 2 cores: a 300k-span fleet week through the broker and the archive
@pytest.mark.timeout(3600)
def test_quick_scale_run_prints_what_the_archive_holds(settings, tmp_path):
    home = tmp_path / "scale"
    env = {**os.environ, "BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--spans", str(bench_scale.QUICK_SPANS), "--home", str(home)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    figures = json.loads(lines[-1])
    text = "\n".join(lines[:-1])
    counts = figures["counts"]
    assert figures["spans"] == counts["spans"] >= bench_scale.QUICK_SPANS
    assert f"{figures['spans']:,} spans in chDB" in text

    # The baseline is a real Avro container file holding every span message once.
    with open(home / "spans.avro.zst", "rb") as file:
        batches = list(fastavro.reader(file))
    assert len(batches) == counts["span_messages"]
    assert sum(len(batch["spans"]) for batch in batches) == counts["spans"]
    assert figures["avro_zstd_bytes"] == os.path.getsize(home / "spans.avro.zst")

    # The replayed duplicates: the first messages of chunk 0, as the generator makes them again.
    replayed = bench_scale.FleetTraffic(bench_scale.QUICK_SPANS).chunk(0).messages["spans"]
    decode = codec("SpanBatch").decode
    duplicate_spans = sum(len(decode(value)["spans"]) for _, value in replayed[: bench_scale.DUPLICATE_MESSAGES])
    assert figures["duplicate_spans"] == duplicate_spans > 0

    archive = archive_process(replace(settings, home=home), tmp_path / "archive.log")
    archive.start(timeout=120)
    try:
        reader = archive.client()

        def sql(query: str):
            return reader.command(query)

        assert sql("SELECT count() FROM spans") == figures["spans"] == figures["dedup_count"]
        assert sql("SELECT countIf(kind = 'llm_call') FROM spans") == counts["llm_calls"]
        assert sql("SELECT countIf(kind = 'tool_call') FROM spans") == counts["tool_calls"]
        assert sql("SELECT count() FROM rewards") == counts["rewards"]
        assert sql("SELECT count() FROM trajectories") == counts["trajectories"]
        assert sql("SELECT count() FROM samples") == counts["samples"]
        assert sql("SELECT count() FROM canary_decisions") == counts["canary_decisions"]
        assert sql("SELECT count() FROM dead_letters") == counts["bad_messages"]
        # Merges since may have dropped duplicates, never spans.
        assert figures["spans"] <= sql("SELECT count() FROM spans_store") <= figures["rows_with_duplicates"]
        assert figures["rows_with_duplicates"] == figures["spans"] + duplicate_spans
        on_disk = sql(
            "SELECT total_bytes FROM system.tables WHERE name = 'spans_store' AND database = currentDatabase()"
        )
        assert abs(on_disk - figures["clickhouse_bytes"]) <= 0.25 * figures["clickhouse_bytes"]
        reports = reader.query(
            "SELECT name FROM system.tables WHERE database = currentDatabase() AND startsWith(name, 'report_')"
        ).result_rows
        assert sorted(figures["report_seconds"]) == sorted(name for (name,) in reports)
    finally:
        archive.stop()

    # Every figure is printed beside its target, with the verdict its numbers give.
    per_span = figures["clickhouse_bytes_per_span"] <= figures["avro_zstd_bytes_per_span"]
    assert re.search(rf"target ClickHouse <= zstd Avro: {'PASS' if per_span else 'MISS'}", text)
    assert figures["report_p50_seconds"] == statistics.median(figures["report_seconds"].values())
    p50 = figures["report_p50_seconds"] <= bench_scale.TARGET_REPORT_P50_S
    assert re.search(rf"reports p50 [\d,]+ ms; target <= 1,000 ms: {'PASS' if p50 else 'MISS'}", text)
    worst = figures["report_worst_seconds"] <= bench_scale.TARGET_REPORT_WORST_S
    assert re.search(rf"reports worst run [\d,]+ ms; target <= 3,000 ms: {'PASS' if worst else 'MISS'}", text)
    dedup = figures["dedup_count_seconds"] <= bench_scale.TARGET_DEDUP_COUNT_S
    assert re.search(rf"= {figures['spans']:,} in [\d,]+ ms; target <= 1,000 ms: {'PASS' if dedup else 'MISS'}", text)
    for name in figures["report_seconds"]:
        assert re.search(rf"^\s+{name}\s+[\d,]+ ms$", text, re.MULTILINE), name
