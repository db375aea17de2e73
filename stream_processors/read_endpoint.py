"""The read-only ClickHouse HTTP endpoint of the embedded store.

chDB locks its data directory to one process, so the archive worker, which writes it, also serves its
reads: this module is a small threaded HTTP server on loopback that speaks enough of ClickHouse's HTTP
interface for clickhouse-connect's HTTP client (and curl): ``GET /ping``; queries in the POST body
and/or the ``query`` parameter; ``database``, ``default_format`` and ``param_*`` bind parameters; the
result in whatever format the query names, straight from chDB; errors as ClickHouse error text with
the ``X-ClickHouse-Exception-Code`` header and an HTTP error status.

Two guards keep it read-only: only one SELECT / SHOW / DESCRIBE / EXISTS / WITH / EXPLAIN statement
per request (no ``INTO OUTFILE``), and the chDB connection it reads with is opened with
``readonly=1``, which also makes every setting read-only (clickhouse-connect sees that in
``system.settings`` and stops sending settings). Access needs user ``reader`` and the token, by basic
auth, ``X-ClickHouse-User``/``X-ClickHouse-Key`` headers or ``user``/``password`` parameters.

Queries on the reader connection are serialised (one chDB handle, one lock); they run concurrently
with the archive's inserts, which use their own handle on the same engine.
"""

from __future__ import annotations

import base64
import hmac
import itertools
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import chdb

from boltstream.schemas.codec import unsigned_varint

READ_USER = "reader"
ALLOWED_STATEMENTS = frozenset({"SELECT", "SHOW", "DESCRIBE", "DESC", "EXISTS", "WITH", "EXPLAIN"})
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
_TRAILING_FORMAT = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
_ERROR_CODE = re.compile(r"Code: (\d+)\.")
_CONTENT_TYPES = {
    "TabSeparated": "text/tab-separated-values; charset=UTF-8",
    "TSV": "text/tab-separated-values; charset=UTF-8",
    "CSV": "text/csv; charset=UTF-8; header=absent",
    "CSVWithNames": "text/csv; charset=UTF-8; header=present",
}
#: HTTP status per ClickHouse error code, as the server maps them; anything else is 500.
_HTTP_STATUS = {
    62: 400,  # SYNTAX_ERROR
    47: 400,  # UNKNOWN_IDENTIFIER
    46: 400,  # UNKNOWN_FUNCTION
    60: 404,  # UNKNOWN_TABLE
    81: 404,  # UNKNOWN_DATABASE
    164: 403,  # READONLY
    516: 401,  # AUTHENTICATION_FAILED
}
SYNTAX_ERROR, READONLY, AUTHENTICATION_FAILED = 62, 164, 516


class QueryRefused(Exception):
    """A request the endpoint will not run, with the ClickHouse error code to answer with."""

    def __init__(self, code: int, name: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.name = name

    def clickhouse_text(self) -> str:
        return f"Code: {self.code}. DB::Exception: {self}. ({self.name})\n"


def _code_segments(sql: str) -> list[str]:
    """``sql`` with comments removed and every string literal / quoted identifier replaced by a space."""
    segments, start, i, n = [], 0, 0, len(sql)
    while i < n:
        char = sql[i]
        if sql.startswith("--", i) or char == "#":
            segments.append(sql[start:i])
            end = sql.find("\n", i)
            i = n if end < 0 else end
            start = i
        elif sql.startswith("/*", i):
            segments.append(sql[start:i])
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
            start = i
        elif char in "'\"`":
            segments.append(sql[start:i])
            i += 1
            while i < n and sql[i] != char:
                i += 2 if sql[i] == "\\" else 1
            i += 1
            start = i
            segments.append(" ")
        else:
            i += 1
    segments.append(sql[start:])
    return segments


def check_read_only(sql: str) -> None:
    """Raise :class:`QueryRefused` unless ``sql`` is one read-only statement."""
    code = "".join(_code_segments(sql))
    statements = [s for s in code.split(";") if s.strip()]
    if not statements:
        raise QueryRefused(SYNTAX_ERROR, "SYNTAX_ERROR", "Empty query")
    if len(statements) > 1:
        raise QueryRefused(SYNTAX_ERROR, "SYNTAX_ERROR", "Multi-statements are not allowed on the read endpoint")
    words = re.findall(r"[A-Za-z_]+", statements[0])
    first = words[0].upper() if words else ""
    if first not in ALLOWED_STATEMENTS:
        raise QueryRefused(
            READONLY,
            "READONLY",
            f"the read endpoint runs only {', '.join(sorted(ALLOWED_STATEMENTS))} queries, not {first or sql!r}",
        )
    upper = [w.upper() for w in words]
    if any(a == "INTO" and b == "OUTFILE" for a, b in itertools.pairwise(upper)):
        raise QueryRefused(READONLY, "READONLY", "INTO OUTFILE is not allowed on the read endpoint")


class ReadEndpoint:
    """The HTTP server. ``start()`` it, read ``port``, ``stop()`` it."""

    def __init__(
        self, data_path: str, *, token: str, port: int = 0, database: str = "default", host: str = "127.0.0.1"
    ) -> None:
        if not token:
            raise ValueError("the read endpoint needs a token")
        self.token = token
        self.database = database
        self.server = ThreadingHTTPServer((host, port), _Handler)  # binds now: a busy port fails here
        self.server.daemon_threads = True
        self.server.endpoint = self  # type: ignore[attr-defined]
        # The reader's own handle on the engine the archive writes through; readonly for every query.
        self.connection = chdb.connect(f"{data_path}?readonly=1")
        self.lock = threading.Lock()
        self.timezone = self.connection.query("SELECT timezone()", "TabSeparated").bytes().decode().strip()
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
        with self.lock:
            self.connection.close()

    def authorised(self, user: str | None, key: str | None) -> bool:
        return user == READ_USER and key is not None and hmac.compare_digest(key.encode(), self.token.encode())

    def run(self, sql: str, database: str, fmt: str, params: dict[str, str]) -> tuple[bytes, dict[str, Any]]:
        """Run one checked query; its output bytes and summary."""
        check_read_only(sql)
        with self.lock:
            self.connection.query(f"USE `{database.replace('`', '')}`", "TabSeparated")
            result = self.connection.query(sql, fmt, params=params)
            summary = {
                "read_rows": str(result.rows_read()),
                "read_bytes": str(result.bytes_read()),
                "elapsed_ns": str(int(result.elapsed() * 1e9)),
            }
            output = result.bytes() or b""
            if not output and fmt == "Native":
                output = self._native_header(sql, params)
            return output, summary

    def _native_header(self, sql: str, params: dict[str, str]) -> bytes:
        """The 0-row Native block a server sends for an empty result (chDB sends nothing), so clients
        still learn the column names and types."""
        select = _TRAILING_FORMAT.sub("", sql).rstrip().rstrip(";")
        if select.split(None, 1)[0].upper() not in ("SELECT", "WITH", "("):
            return b""
        described = self.connection.query(f"DESCRIBE ({select})", "JSONEachRow", params=params).bytes() or b""
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
            output, summary = self.endpoint.run(sql, database, fmt, bind)
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
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
