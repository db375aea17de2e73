"""The read endpoint reads boltstream's tables and nothing else, under limits, with queries side by side.

Probed as an attacker on the same machine would: every route to files, URLs, other servers, programs or
tables outside boltstream's database is refused with a ClickHouse error, and the endpoint keeps serving
after each; a runaway query neither stops the others nor outlives its client. One real archive worker
(real chDB, real broker) serves the whole module, with small limits so that exceeding them is cheap.
"""

from __future__ import annotations

import base64
import http.client
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from tests.conftest import ArchiveProcess, archive_process, isolated_settings
from tests.test_archive import produce_span_batches, wait_for

SPANS = 12
LIMITS = {
    "READ_MAX_EXECUTION_TIME": "3s",
    "READ_MAX_MEMORY_USAGE": str(64 * 1024 * 1024),
    "READ_MAX_RESULT_ROWS": "10000",
    "READ_MAX_CONCURRENT_QUERIES": "2",
}
RUNAWAY = "SELECT count() FROM system.numbers"
READONLY, SYNTAX_ERROR, FUNCTION_NOT_ALLOWED, ACCESS_DENIED = 164, 62, 446, 497


@pytest.fixture(scope="module")
def endpoint(broker, tmp_path_factory) -> Iterator[ArchiveProcess]:
    home = tmp_path_factory.mktemp("read-security")
    settings = isolated_settings(broker, home)
    process = archive_process(settings, home / "archive.log")
    process.env.update({f"BOLTSTREAM_CLICKHOUSE__{name}": value for name, value in LIMITS.items()})
    process.start()
    produce_span_batches(settings, rollouts=3, spans_per_rollout=SPANS // 3)
    reader = process.client()
    wait_for(lambda: reader.command("SELECT count() FROM spans") == SPANS, 60, "the spans archived")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def reader(endpoint):
    return endpoint.client()


def post(endpoint: ArchiveProcess, sql: str, **params: str) -> tuple[int, str, bytes]:
    """POST ``sql`` with URL ``params`` as user reader: HTTP status, exception code header, body."""
    credentials = base64.b64encode(f"reader:{endpoint.token}".encode()).decode()
    query = "&".join(f"{name}={value}" for name, value in params.items())
    url = f"http://127.0.0.1:{endpoint.port}/?{query}"
    request = urllib.request.Request(url, data=sql.encode(), headers={"Authorization": f"Basic {credentials}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, "", response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["X-ClickHouse-Exception-Code"], error.read()


def start_runaway(endpoint: ArchiveProcess) -> http.client.HTTPConnection:
    """A client that sent a query running until the time limit and waits for its answer."""
    connection = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=30)
    connection.request("POST", f"/?user=reader&password={endpoint.token}", body=RUNAWAY.encode())
    return connection


def timed_select_one(reader) -> float:
    started = time.perf_counter()
    assert reader.command("SELECT 1") == 1
    return time.perf_counter() - started


ROUTES_OUT = [
    # Scalar functions: a file, the archive's environment and command line.
    ("SELECT file('/etc/passwd')", FUNCTION_NOT_ALLOWED),
    ("SELECT file('/proc/self/environ')", FUNCTION_NOT_ALLOWED),
    ("SELECT `file`('/proc/self/cmdline')", FUNCTION_NOT_ALLOWED),
    ("SELECT FILE('/etc/passwd')", FUNCTION_NOT_ALLOWED),
    ("SELECT arrayMap(p -> file(p), ['/etc/passwd'])", FUNCTION_NOT_ALLOWED),
    ("SELECT length(file('/etc/passwd')) FROM spans", FUNCTION_NOT_ALLOWED),
    ("EXPLAIN PIPELINE SELECT file('/etc/passwd')", FUNCTION_NOT_ALLOWED),
    # Table functions: files, URLs, object stores, other servers, programs, the caller's Python objects.
    ("SELECT * FROM file('/etc/passwd', 'LineAsString')", FUNCTION_NOT_ALLOWED),
    ("DESCRIBE TABLE file('/etc/passwd', 'LineAsString')", FUNCTION_NOT_ALLOWED),
    ("SELECT * FROM url('http://127.0.0.1:1/', 'LineAsString')", FUNCTION_NOT_ALLOWED),
    ("SELECT * FROM s3('http://127.0.0.1:1/bucket/key', 'LineAsString')", FUNCTION_NOT_ALLOWED),
    ("SELECT * FROM hdfs('hdfs://127.0.0.1:1/key', 'LineAsString')", FUNCTION_NOT_ALLOWED),
    ("SELECT * FROM remote('127.0.0.1:1', system.one)", FUNCTION_NOT_ALLOWED),
    ("SELECT * FROM remoteSecure('127.0.0.1:1', system.one)", FUNCTION_NOT_ALLOWED),
    ("SELECT * FROM cluster('default', system.one)", FUNCTION_NOT_ALLOWED),
    ("SELECT * FROM mysql('127.0.0.1:1', 'db', 't', 'user', 'password')", FUNCTION_NOT_ALLOWED),
    ("SELECT * FROM postgresql('127.0.0.1:1', 'db', 't', 'user', 'password')", FUNCTION_NOT_ALLOWED),
    ("SELECT * FROM sqlite('/etc/passwd', 't')", FUNCTION_NOT_ALLOWED),
    ("SELECT * FROM jdbc('jdbc:sqlite:/etc/passwd', 't')", FUNCTION_NOT_ALLOWED),
    ("SELECT * FROM odbc('DSN=any', 't')", FUNCTION_NOT_ALLOWED),
    ("SELECT * FROM executable('cat', 'LineAsString', 'line String')", FUNCTION_NOT_ALLOWED),
    ("SELECT * FROM input('line String')", FUNCTION_NOT_ALLOWED),
    ("SELECT * FROM filesystem('/etc')", FUNCTION_NOT_ALLOWED),
    ("SELECT * FROM Python(token)", FUNCTION_NOT_ALLOWED),
    ("SELECT * FROM merge('system', '^processes$')", FUNCTION_NOT_ALLOWED),
    ("SELECT * FROM dictionary('any')", FUNCTION_NOT_ALLOWED),
    ("SELECT * FROM view(SELECT file('/etc/passwd'))", FUNCTION_NOT_ALLOWED),
    # Dictionaries (their sources), Join tables, AI providers, the binary's memory.
    ("SELECT dictGet('any', 'attribute', 1)", FUNCTION_NOT_ALLOWED),
    ("SELECT joinGet('any', 'attribute', 1)", FUNCTION_NOT_ALLOWED),
    ("SELECT aiGenerate('hello')", FUNCTION_NOT_ALLOWED),
    ("SELECT addressToSymbol(1)", FUNCTION_NOT_ALLOWED),
    # Tables outside boltstream's: other readers' queries, logs, server configuration, paths.
    ("SELECT query FROM system.processes", ACCESS_DENIED),
    ("SELECT * FROM system.query_log", ACCESS_DENIED),
    ("SELECT * FROM system.server_settings", ACCESS_DENIED),
    ("SELECT * FROM system.disks", ACCESS_DENIED),
    ("SELECT * FROM information_schema.tables", ACCESS_DENIED),
    ("SELECT count() FROM spans AS s JOIN `system`.`processes` AS p ON 1", ACCESS_DENIED),
    ("SELECT count() FROM spans WHERE event_id IN (SELECT query FROM system.processes)", ACCESS_DENIED),
    ("SELECT ('x', 1) IN system.processes", ACCESS_DENIED),
    ("EXISTS TABLE system.processes", ACCESS_DENIED),
    # Statements that are not reads.
    ("SHOW PROCESSLIST", READONLY),
    ("KILL QUERY WHERE 1", READONLY),
    ("INSERT INTO spans_store (event_id, rollout_id) VALUES ('x', 'y')", READONLY),
    ("CREATE TABLE evil (a Int8) ENGINE = Memory", READONLY),
    ("DROP TABLE spans_store", READONLY),
    ("/* SELECT */ DROP TABLE spans_store", READONLY),
    ("ALTER TABLE spans_store DELETE WHERE 1", READONLY),
    ("TRUNCATE TABLE spans_store", READONLY),
    ("SET readonly = 0", READONLY),
    # Settings that would lift the limits or re-enable what is off.
    ("SELECT 1 SETTINGS readonly = 0", READONLY),
    ("SELECT count() FROM system.numbers SETTINGS max_execution_time = 0", READONLY),
    ("SELECT 1 SETTINGS allow_introspection_functions = 1", READONLY),
    # More than one statement, or none.
    ("SELECT 1; SELECT file('/etc/passwd')", SYNTAX_ERROR),
    ("SELECT 1; DROP TABLE spans_store", SYNTAX_ERROR),
    ("  ", SYNTAX_ERROR),
]


@pytest.mark.parametrize(("sql", "code"), ROUTES_OUT)
def test_every_route_out_is_refused_and_reads_go_on(reader, sql, code):
    with pytest.raises(DatabaseError) as refused:
        reader.command(sql)
    assert refused.value.code == code, refused.value
    assert f"Code: {code}. DB::Exception:" in str(refused.value)
    assert reader.command("SELECT count() FROM spans") == SPANS


def test_into_outfile_writes_nothing(reader, tmp_path):
    target = tmp_path / "out.csv"
    for sql in (f"SELECT 1 INTO OUTFILE '{target}'", f"EXPLAIN SELECT 1 INTO OUTFILE '{target}' FORMAT CSV"):
        with pytest.raises(DatabaseError) as refused:
            reader.command(sql)
        assert refused.value.code == READONLY and "INTO OUTFILE" in str(refused.value)
    assert not target.exists()


def test_parameters_and_http_settings_are_refused_too(endpoint):
    """A table smuggled in as a query parameter, limits or a database asked for in the URL."""
    status, code, _ = post(endpoint, "SELECT * FROM {table:Identifier}", param_table="system.processes")
    assert (status, code) == (403, str(ACCESS_DENIED))
    for setting in ("max_execution_time", "max_memory_usage", "allow_introspection_functions"):
        status, code, body = post(endpoint, "SELECT 1", **{setting: "0"})
        assert (status, code) == (403, str(READONLY)) and setting.encode() in body
    status, code, _ = post(endpoint, "DROP TABLE spans_store", readonly="0")
    assert (status, code) == (403, str(READONLY))
    status, code, _ = post(endpoint, "SELECT query FROM processes", database="system")
    assert (status, code) == (403, str(ACCESS_DENIED))
    status, _, body = post(endpoint, "SELECT count() FROM spans")
    assert (status, body) == (200, f"{SPANS}\n".encode())


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT agent_name, count() FROM spans GROUP BY agent_name",
        "SELECT count() FROM spans WHERE rollout_id IN (SELECT rollout_id FROM rewards)",
        "WITH recent AS (SELECT * FROM spans ORDER BY start_time_us DESC LIMIT 5) SELECT count() FROM recent",
        "SELECT name FROM system.tables WHERE database = currentDatabase() AND name = 'spans'",
        "SELECT value FROM system.settings WHERE name = 'readonly'",
        "SELECT count() FROM system.columns WHERE database = currentDatabase()",
        "SELECT dummy FROM system.one WHERE system.one.dummy = 0",
        "SELECT format('{} spans', toString(count())) FROM spans",
        "SELECT 'INTO OUTFILE, file(), system.processes' AS text",
        "SELECT sum(number) FROM numbers(10)",
        "SHOW TABLES",
        "DESCRIBE TABLE spans",
        "EXISTS TABLE spans",
        "EXPLAIN SELECT count() FROM spans",
        "SELECT 1;",
    ],
)
def test_reads_of_boltstreams_tables_pass(reader, sql):
    reader.query(sql)


def test_limits_hold_and_cannot_be_lifted(reader):
    with pytest.raises(DatabaseError) as memory:
        reader.command("SELECT groupArray(number) FROM numbers(100000000)")
    assert memory.value.code == 241  # MEMORY_LIMIT_EXCEEDED, at 64 MiB
    with pytest.raises(DatabaseError) as rows:
        reader.query("SELECT number FROM numbers(20000)")
    assert rows.value.code == 396  # TOO_MANY_ROWS_OR_BYTES, at 10,000 rows
    started = time.monotonic()
    with pytest.raises(DatabaseError) as runaway:
        reader.command(RUNAWAY)
    assert runaway.value.code == 159  # TIMEOUT_EXCEEDED, at 3 s
    assert 2.5 < time.monotonic() - started < 10
    assert reader.command("SELECT count() FROM spans") == SPANS


def test_a_runaway_blocks_nobody_and_dies_with_its_client(endpoint, reader):
    log = Path(endpoint.log_path)
    kills_before = log.read_text().count("read query killed: its client hung up")
    runaway = start_runaway(endpoint)
    time.sleep(0.3)  # it runs
    # The median, so that a stall of this busy machine is not taken for one of the endpoint: blocked
    # behind the runaway, every one of them would wait for its 3 s time limit.
    assert statistics.median(timed_select_one(reader) for _ in range(5)) < 0.2
    # Both of the module's reader connections busy with runaways; their clients go away.
    second = start_runaway(endpoint)
    time.sleep(0.3)
    runaway.close()
    second.close()
    # Killed, not ended by their time limit (the log says so only of a query the kill found).
    wait_for(lambda: log.read_text().count("read query killed: its client hung up") == kills_before + 2, 10, "kills")
    assert timed_select_one(reader) < 1.0  # their connections are free again
    assert reader.command("SELECT count() FROM spans") == SPANS


def test_read_token_on_the_command_line_is_refused(tmp_path):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BOLTSTREAM_")}
    run = subprocess.run(
        [sys.executable, "-m", "boltstream.infra.cli", "archive", "--read-token", "visible-in-ps"],
        env=environment | {"BOLTSTREAM_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "--read-token is refused" in run.stderr and "BOLTSTREAM_CLICKHOUSE__READ_TOKEN" in run.stderr
