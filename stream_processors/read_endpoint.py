"""The read-only ClickHouse HTTP endpoint of the embedded store.

chDB locks its data directory to one process, so the archive worker, which writes it, also serves its
reads: this module is a small threaded HTTP server on loopback that speaks enough of ClickHouse's HTTP
interface for clickhouse-connect's HTTP client (and curl): ``GET /ping``; queries in the POST body
and/or the ``query`` parameter; ``database``, ``default_format`` and ``param_*`` bind parameters; the
result in whatever format the query names, straight from chDB; errors as ClickHouse error text with
the ``X-ClickHouse-Exception-Code`` header and an HTTP error status. Access needs user ``reader`` and
the token, by basic auth, ``X-ClickHouse-User``/``X-ClickHouse-Key`` headers or ``user``/``password``
parameters.

What a reader may do: read the tables of boltstream's database (and a few system tables), nothing
else: no writes, no files, URLs, other servers or programs. :mod:`.read_guard` says how, and why
partly outside the engine. Every query also runs under limits the reader cannot change
(``clickhouse.read_max_*``: time, memory, result rows and bytes): the process that answers it is
the one that writes the archive.

Queries run at once, up to ``clickhouse.read_max_concurrent_queries``, each on its own chDB
connection (chDB runs queries of different connections in parallel, beside the archive's inserts);
a query whose client hangs up is killed at once, so it frees its connection.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import queue
import re
import secrets
import select
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import chdb

from boltstream.infra.common.config import ClickHouseConfig
from boltstream.schemas.codec import unsigned_varint
from boltstream.stream_processors.read_guard import (
    ACCESS_DENIED,
    READ_USER,
    READONLY,
    SYNTAX_ERROR,
    QueryRefused,
    ReadGuard,
)

log = logging.getLogger("boltstream.read_endpoint")

#: Parameters of ClickHouse's HTTP interface that steer the transport, not the query; accepted and
#: ignored (the endpoint neither compresses nor keeps sessions).
TRANSPORT_PARAMETERS = frozenset(
    {
        "query_id",
        "session_id",
        "session_timeout",
        "session_check",
        "compress",
        "decompress",
        "enable_http_compression",
        "wait_end_of_query",
        "client_protocol_version",
        "send_progress_in_http_headers",
        "http_headers_progress_interval_ms",
        "cancel_http_readonly_queries_on_client_close",
        "buffer_size",
        "quota_key",
        "readonly",
    }
)
#: Longest request body read: ClickHouse refuses queries over ``max_query_size`` (256 KiB) anyway, and
#: the body is held in memory of the process that writes the archive.
MAX_REQUEST_BYTES = 1024 * 1024
#: How long a query waits for a free reader connection before it is refused as one too many.
READER_WAIT = 5.0
#: How often a running query's client connection is looked at for a hang-up, milliseconds.
HANG_UP_POLL_MS = 50
_TRAILING_FORMAT = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
_ERROR_CODE = re.compile(r"Code: (\d+)\.")
_CONTENT_TYPES = {
    "TabSeparated": "text/tab-separated-values; charset=UTF-8",
    "TSV": "text/tab-separated-values; charset=UTF-8",
    "CSV": "text/csv; charset=UTF-8; header=absent",
    "CSVWithNames": "text/csv; charset=UTF-8; header=present",
}
TOO_MANY_SIMULTANEOUS_QUERIES, AUTHENTICATION_FAILED = 202, 516
#: HTTP status per ClickHouse error code, as the server maps them; anything else is 500.
_HTTP_STATUS = {
    62: 400,  # SYNTAX_ERROR
    47: 400,  # UNKNOWN_IDENTIFIER
    46: 400,  # UNKNOWN_FUNCTION
    60: 404,  # UNKNOWN_TABLE
    81: 404,  # UNKNOWN_DATABASE
    164: 403,  # READONLY
    202: 503,  # TOO_MANY_SIMULTANEOUS_QUERIES
    446: 403,  # FUNCTION_NOT_ALLOWED
    497: 403,  # ACCESS_DENIED
    516: 401,  # AUTHENTICATION_FAILED
}


class _Reader:
    """One chDB connection of the endpoint, for one query at a time: readonly, under the limits, in the
    endpoint's database. Its queries carry ``log_comment = marker``, which is how they are found to be
    killed."""

    def __init__(self, connection: Any, marker: str) -> None:
        self.connection = connection
        self.marker = marker
        #: Orders "the query ended" against "kill it": a kill never reaches the next query.
        self.lock = threading.Lock()


class ReadEndpoint:
    """The HTTP server. ``start()`` it, read ``port``, ``stop()`` it.

    ``config`` gives the database and the limits of every query; ``token`` is user ``reader``'s.
    """

    def __init__(
        self, data_path: str, config: ClickHouseConfig, *, token: str, port: int = 0, host: str = "127.0.0.1"
    ) -> None:
        if not token:
            raise ValueError("the read endpoint needs a token")
        self.token = token
        self.database = config.database
        self.server = ThreadingHTTPServer((host, port), _Handler)  # binds now: a busy port fails here
        self.server.daemon_threads = True
        self.server.endpoint = self  # type: ignore[attr-defined]
        # Settings of the connection, before its first query: readonly=1 also makes every setting
        # read-only, so no query (or SETTINGS clause) lifts a limit or re-enables a function.
        limits = (
            f"readonly=1&allow_introspection_functions=0&max_execution_time={config.read_max_execution_time:g}"
            f"&max_memory_usage={config.read_max_memory_usage}&max_result_rows={config.read_max_result_rows}"
            f"&max_result_bytes={config.read_max_result_bytes}"
        )
        #: Kills the queries of readers whose client hung up (readonly: a user may kill its own queries).
        self.control = chdb.connect(f"{data_path}?readonly=1")
        self.control_lock = threading.Lock()
        #: Starts the markers of this endpoint's readers (unique: a kill reaches no other endpoint's query).
        self.marker_prefix = f"boltstream-read-endpoint-{secrets.token_hex(4)}-"
        self.reader_count = config.read_max_concurrent_queries
        self.readers: queue.Queue[_Reader] = queue.Queue()
        for number in range(self.reader_count):
            marker = f"{self.marker_prefix}{number}"
            connection = chdb.connect(f"{data_path}?{limits}&log_comment={marker}")
            connection.query("USE {database:Identifier}", "TabSeparated", params={"database": self.database})
            self.readers.put(_Reader(connection, marker))
        self.guard = ReadGuard.of_engine(self.control, self.database)
        self.timezone = self.control.query("SELECT timezone()", "TabSeparated").bytes().decode().strip()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> ReadEndpoint:
        self._thread = threading.Thread(target=self.server.serve_forever, name="read-endpoint", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        with self.control_lock:
            self.control.query(
                "KILL QUERY WHERE startsWith(Settings['log_comment'], {prefix:String}) SYNC",
                "TabSeparated",
                params={"prefix": self.marker_prefix},
            )
        for _ in range(self.reader_count):
            self.readers.get().connection.close()
        self.control.close()

    def authorised(self, user: str | None, key: str | None) -> bool:
        return user == READ_USER and key is not None and hmac.compare_digest(key.encode(), self.token.encode())

    def run(
        self, sql: str, database: str, fmt: str, params: dict[str, str], client: socket.socket
    ) -> tuple[bytes, dict[str, Any]]:
        """Run one query for the client on socket ``client``; its output bytes and summary."""
        if database != self.database:
            raise QueryRefused(
                ACCESS_DENIED,
                "ACCESS_DENIED",
                f"{READ_USER}: Not enough privileges: this endpoint serves database {self.database}, not {database}",
            )
        with self._reader() as reader:
            self.guard.check(reader.connection, sql, params)
            result = self._query_while_client_listens(reader, sql, fmt, params, client)
            summary = {
                "read_rows": str(result.rows_read()),
                "read_bytes": str(result.bytes_read()),
                "elapsed_ns": str(int(result.elapsed() * 1e9)),
            }
            output = result.bytes() or b""
            if not output and fmt == "Native":
                output = self._native_header(reader, sql, params)
            return output, summary

    @contextmanager
    def _reader(self) -> Iterator[_Reader]:
        try:
            reader = self.readers.get(timeout=READER_WAIT)
        except queue.Empty:
            raise QueryRefused(
                TOO_MANY_SIMULTANEOUS_QUERIES,
                "TOO_MANY_SIMULTANEOUS_QUERIES",
                f"all {self.reader_count} read connections stayed busy for {READER_WAIT:g} s; try again later",
            ) from None
        try:
            yield reader
        finally:
            self.readers.put(reader)

    def _query_while_client_listens(
        self, reader: _Reader, sql: str, fmt: str, params: dict[str, str], client: socket.socket
    ) -> Any:
        """``sql`` on ``reader``, killed if the client hangs up before it ends."""
        ended = threading.Event()
        watcher = threading.Thread(
            target=self._kill_on_hang_up, args=(reader, client, ended), name="read-endpoint-watch", daemon=True
        )
        watcher.start()
        try:
            return reader.connection.query(sql, fmt, params=params)
        finally:
            with reader.lock:
                ended.set()

    def _kill_on_hang_up(self, reader: _Reader, client: socket.socket, ended: threading.Event) -> None:
        poller = select.poll()
        # POLLRDHUP: the client closed its end (a client that half-closes after its request counts as
        # gone); POLLHUP and POLLERR are always reported.
        poller.register(client, select.POLLRDHUP)
        while True:
            hung_up = poller.poll(HANG_UP_POLL_MS)
            with reader.lock:
                if ended.is_set():
                    return
                if hung_up:
                    with self.control_lock:
                        killed = self.control.query(
                            "KILL QUERY WHERE Settings['log_comment'] = {marker:String} SYNC",
                            "TabSeparated",
                            params={"marker": reader.marker},
                        ).bytes()
                    if killed:  # else it ended meanwhile (at its time limit, say)
                        log.info("read query killed: its client hung up")
                    return

    def _native_header(self, reader: _Reader, sql: str, params: dict[str, str]) -> bytes:
        """The 0-row Native block a server sends for an empty result (chDB sends nothing), so clients
        still learn the column names and types."""
        select_sql = _TRAILING_FORMAT.sub("", sql).rstrip().rstrip(";")
        if select_sql.split(None, 1)[0].upper() not in ("SELECT", "WITH", "("):
            return b""
        describe = f"DESCRIBE (\n{select_sql}\n)"  # line breaks: a trailing comment cannot swallow the ")"
        self.guard.check(reader.connection, describe, params)
        described = reader.connection.query(describe, "JSONEachRow", params=params).bytes() or b""
        columns = [json.loads(line) for line in described.splitlines()]
        block = unsigned_varint(len(columns)) + unsigned_varint(0)
        for column in columns:
            name, type_name = column["name"].encode(), column["type"].encode()
            block += unsigned_varint(len(name)) + name + unsigned_varint(len(type_name)) + type_name
        return block


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "boltstream-read-endpoint"

    @property
    def endpoint(self) -> ReadEndpoint:
        return self.server.endpoint  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:
        return  # one line per query would drown the archive's log

    def do_GET(self) -> None:
        path, params = self._target()
        if path in ("/ping", "/") and "query" not in params:
            self._reply(200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"})
            return
        self._query(path, params, b"")

    def do_POST(self) -> None:
        path, params = self._target()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_REQUEST_BYTES:
            self.close_connection = True  # its body stays unread
            refused = QueryRefused(
                SYNTAX_ERROR, "SYNTAX_ERROR", f"Max query size exceeded: {length} bytes, over {MAX_REQUEST_BYTES}"
            )
            self._error(_HTTP_STATUS[SYNTAX_ERROR], SYNTAX_ERROR, refused.clickhouse_text(), str(uuid.uuid4()))
            return
        body = self.rfile.read(length) if length else b""
        self._query(path, params, body)

    def _target(self) -> tuple[str, dict[str, str]]:
        split = urlsplit(self.path)
        return split.path, dict(parse_qsl(split.query, keep_blank_values=True))

    def _credentials(self, params: dict[str, str]) -> tuple[str | None, str | None]:
        authorization = self.headers.get("Authorization", "")
        if authorization.lower().startswith("basic "):
            try:
                user, _, key = base64.b64decode(authorization[6:]).decode().partition(":")
            except ValueError:
                return None, None
            return user, key
        if self.headers.get("X-ClickHouse-User"):
            return self.headers.get("X-ClickHouse-User"), self.headers.get("X-ClickHouse-Key", "")
        return params.get("user"), params.get("password")

    def _query(self, path: str, params: dict[str, str], body: bytes) -> None:
        query_id = params.get("query_id") or str(uuid.uuid4())
        try:
            if not self.endpoint.authorised(*self._credentials(params)):
                raise QueryRefused(
                    AUTHENTICATION_FAILED,
                    "AUTHENTICATION_FAILED",
                    f"{READ_USER}: Authentication failed: password is incorrect, or there is no user with such name",
                )
            if path != "/":
                raise QueryRefused(SYNTAX_ERROR, "SYNTAX_ERROR", f"unknown path {path}: POST queries to /")
            if self.headers.get("Content-Encoding", "identity") != "identity":
                raise QueryRefused(SYNTAX_ERROR, "SYNTAX_ERROR", "compressed request bodies are not supported")
            sql = "\n".join(part for part in (params.get("query", ""), body.decode()) if part)
            bind = {name[6:]: value for name, value in params.items() if name.startswith("param_")}
            unsupported = [
                name
                for name in params
                if not name.startswith("param_")
                and name not in TRANSPORT_PARAMETERS | {"query", "database", "default_format", "user", "password"}
            ]
            if unsupported:
                raise QueryRefused(READONLY, "READONLY", f"Cannot modify '{unsupported[0]}' setting in readonly mode")
            match = _TRAILING_FORMAT.search(sql)
            fmt = match.group(1) if match else params.get("default_format") or "TabSeparated"
            database = params.get("database") or self.headers.get("X-ClickHouse-Database") or self.endpoint.database
            output, summary = self.endpoint.run(sql, database, fmt, bind, self.connection)
        except QueryRefused as refused:
            self._error(_HTTP_STATUS.get(refused.code, 500), refused.code, refused.clickhouse_text(), query_id)
            return
        except Exception as exc:  # chDB's errors carry the ClickHouse text and code
            text = str(exc)
            text = text[text.find("Code: ") :] if "Code: " in text else text
            match_code = _ERROR_CODE.search(text)
            code = int(match_code.group(1)) if match_code else 1002  # UNKNOWN_EXCEPTION
            self._error(_HTTP_STATUS.get(code, 500), code, text.rstrip() + "\n", query_id)
            return
        content_type = _CONTENT_TYPES.get(fmt, "application/json; charset=UTF-8" if "JSON" in fmt else None)
        self._reply(
            200,
            output,
            {
                "Content-Type": content_type or "application/octet-stream",
                "X-ClickHouse-Format": fmt,
                "X-ClickHouse-Query-Id": query_id,
                "X-ClickHouse-Timezone": self.endpoint.timezone,
                "X-ClickHouse-Summary": json.dumps(summary),
            },
        )

    def _error(self, status: int, code: int, text: str, query_id: str) -> None:
        headers = {
            "Content-Type": "text/plain; charset=UTF-8",
            "X-ClickHouse-Exception-Code": str(code),
            "X-ClickHouse-Query-Id": query_id,
        }
        self._reply(status, text.encode(), headers)

    def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client hung up (and its query was killed)
            self.close_connection = True
