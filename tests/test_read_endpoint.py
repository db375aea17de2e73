"""The archive's read-only ClickHouse HTTP endpoint, through clickhouse-connect's own HTTP client.

What it refuses (files, URLs, other servers, tables outside boltstream's) and its limits:
tests/test_security_read_endpoint.py.
"""

from __future__ import annotations

import base64
import threading
import urllib.error
import urllib.request

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from tests.test_archive import produce_span_batches


def test_reads_while_the_archiver_writes(settings, archive):
    archive.env["BOLTSTREAM_STREAM__BATCH_SIZE"] = "20"  # 400 spans per insert: many inserts to read between
    archive.start()
    total = 40_000
    producer = threading.Thread(target=produce_span_batches, args=(settings, 2000, 20), daemon=True)
    counts: list[int] = []
    errors: list[Exception] = []

    def read(client) -> None:
        try:
            while True:
                counts.append(client.command("SELECT count() FROM spans_store"))
                client.query("SELECT agent_name, count() FROM spans GROUP BY agent_name")
                if counts[-1] >= total:
                    return
        except Exception as exc:
            errors.append(exc)

    readers = [threading.Thread(target=read, args=(archive.client(),), daemon=True) for _ in range(2)]
    producer.start()
    for reader in readers:
        reader.start()
    for thread in (producer, *readers):
        thread.join(90)
    assert not errors, errors
    assert counts[-1] == total
    assert any(0 < count < total for count in counts), "no read ran while the archive was writing"
    assert archive.client().command("SELECT count() FROM spans") == total


def test_write_and_ddl_statements_are_refused(archive):
    archive.start()
    client = archive.client()
    for statement in (
        "INSERT INTO spans_store (event_id, rollout_id) VALUES ('x', 'y')",
        "CREATE TABLE evil (a Int8) ENGINE = Memory",
        "DROP TABLE spans_store",
        "ALTER TABLE spans_store DELETE WHERE 1",
        "SELECT 1; DROP TABLE spans_store",
    ):
        with pytest.raises(DatabaseError) as refused:
            client.command(statement)
        assert refused.value.code in (62, 164), statement
    # The second guard: chDB itself runs the reader in readonly mode, so not even a setting changes.
    with pytest.raises(DatabaseError) as refused:
        client.command("SELECT 1 SETTINGS max_threads = 1")
    assert refused.value.code == 164 and "readonly" in str(refused.value)
    assert client.command("EXISTS TABLE spans_store") == 1
    assert client.command("EXISTS TABLE evil") == 0


def test_wrong_token_or_user_is_refused(archive):
    archive.start()
    with pytest.raises(DatabaseError) as refused:
        archive.client(token="not-the-token")
    assert refused.value.code == 516
    request = urllib.request.Request(f"http://127.0.0.1:{archive.port}/?query=SELECT%201")
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(request, timeout=5)
    assert anonymous.value.code == 401
    assert anonymous.value.headers["X-ClickHouse-Exception-Code"] == "516"
    other_user = base64.b64encode(f"default:{archive.token}".encode()).decode()
    request.add_header("Authorization", f"Basic {other_user}")
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(request, timeout=5)


def test_plain_http_formats_and_parameters(archive):
    archive.start()
    with urllib.request.urlopen(f"http://127.0.0.1:{archive.port}/ping", timeout=5) as response:
        assert response.read() == b"Ok.\n"
    credentials = base64.b64encode(f"reader:{archive.token}".encode()).decode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{archive.port}/?database=boltstream&param_n=3",
        data=b"SELECT number, toString(number) AS s FROM numbers({n:UInt8}) FORMAT CSVWithNames",
        headers={"Authorization": f"Basic {credentials}"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["X-ClickHouse-Format"] == "CSVWithNames"
        assert response.read() == b'"number","s"\n0,"0"\n1,"1"\n2,"2"\n'
    client = archive.client()
    assert client.raw_query("SELECT 1 AS one", fmt="JSONEachRow") == b'{"one":1}\n'
    assert client.query("SELECT {x:String} AS x", parameters={"x": "it's"}).result_rows == [("it's",)]
    with pytest.raises(DatabaseError) as missing:
        client.query("SELECT * FROM no_such_table")
    assert missing.value.code == 60
    assert client.ping()
    empty = client.query("SELECT event_id, kind, llm_prompt_token_ids FROM spans WHERE 0")
    assert empty.column_names == ("event_id", "kind", "llm_prompt_token_ids") and empty.result_rows == []


def test_a_busy_read_port_is_reported(archive):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", archive.port))
        taken.listen()
        with pytest.raises(RuntimeError, match="archive exited with 1"):
            archive.start()
    assert "cannot serve reads on 127.0.0.1" in archive.log_path.read_text()
