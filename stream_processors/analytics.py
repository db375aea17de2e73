"""Reading the archive: ``boltstream sql`` and ``boltstream report``.

Readers always go through clickhouse-connect's HTTP client to ``clickhouse.read_url``: the embedded
store's read endpoint (served by the archive worker) or a ClickHouse server, alike. The named reports
are views created with the tables (``schemas/clickhouse/10_reports.sql``): ``report NAME`` selects
from ``report_NAME``, and ``report --list`` reads their names and comments from ``system.tables``.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from infra.config import ConfigError, Settings

FORMATS = ("table", "csv", "json")
REPORT_PREFIX = "report_"
_RAW_FORMATS = {"csv": "CSVWithNames", "json": "JSONEachRow"}
_OWN_FORMAT = re.compile(r"\bFORMAT\s+\w+\s*;?\s*$", re.IGNORECASE)


def read_client(settings: Settings) -> Any:
    """A clickhouse-connect HTTP client on the archive's read URL."""
    import clickhouse_connect

    url = settings.clickhouse.read_url
    if not url:
        raise ConfigError(
            "clickhouse.read_url is empty and no local stack is running: start one with `boltstream up` "
            "or set BOLTSTREAM_CLICKHOUSE__READ_URL (e.g. http://user:password@host:8123)"
        )
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"clickhouse.read_url must be an http(s):// URL, not {url!r}")
    return clickhouse_connect.get_client(dsn=url, database=settings.clickhouse.database)


def print_result(client: Any, sql: str, output_format: str) -> None:
    """Run ``sql`` and print its rows as a rich table, CSV (with a header) or JSON lines; a query that
    names its own ``FORMAT`` is printed as the server formats it."""
    own_format = _OWN_FORMAT.search(sql) is not None
    if own_format or output_format in _RAW_FORMATS:
        sys.stdout.write(client.raw_query(sql, fmt=None if own_format else _RAW_FORMATS[output_format]).decode())
        sys.stdout.flush()
        return
    from rich.console import Console
    from rich.table import Table

    result = client.query(sql)
    table = Table(*result.column_names, show_lines=False)
    for row in result.result_rows:
        table.add_row(*("NULL" if value is None else str(value) for value in row))
    console = Console(file=sys.stdout)
    console.print(table)
    console.print(f"{len(result.result_rows)} row(s)", style="dim")


def _run(settings: Settings, sql: str, output_format: str, command: str) -> int:
    from clickhouse_connect.driver.exceptions import ClickHouseError

    try:
        client = read_client(settings)
        try:
            print_result(client, sql, output_format)
        finally:
            client.close()
    except ClickHouseError as exc:
        print(f"boltstream {command}: {exc}", file=sys.stderr)
        return 1
    return 0


def sql_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", help='a read-only query, e.g. "SELECT agent_name, count() FROM spans GROUP BY 1"')
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")


def sql_command(args: argparse.Namespace, settings: Settings) -> int:
    return _run(settings, args.query, args.format, "sql")


def report_names(client: Any) -> list[tuple[str, str]]:
    """The named reports (without the ``report_`` prefix) and their one-line descriptions."""
    rows = client.query(
        "SELECT name, comment FROM system.tables WHERE database = currentDatabase() AND startsWith(name, {p:String})"
        " ORDER BY name",
        parameters={"p": REPORT_PREFIX},
    ).result_rows
    return [(name.removeprefix(REPORT_PREFIX), comment) for name, comment in rows]


def report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="report name (see --list)")
    parser.add_argument("--list", action="store_true", help="list the named reports")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")


def report_command(args: argparse.Namespace, settings: Settings) -> int:
    from clickhouse_connect.driver.exceptions import ClickHouseError

    if not args.list and not args.name:
        print("boltstream report: name a report or use --list", file=sys.stderr)
        return 2
    try:
        client = read_client(settings)
        try:
            reports = dict(report_names(client))
            if args.list:
                width = max((len(name) for name in reports), default=0)
                for name, comment in reports.items():
                    print(f"{name:<{width}}  {comment}")
                return 0
            if args.name not in reports:
                known = ", ".join(reports) or "none (is the schema applied?)"
                print(f"boltstream report: unknown report {args.name!r}; known: {known}", file=sys.stderr)
                return 2
            print_result(client, f"SELECT * FROM {REPORT_PREFIX}{args.name}", args.format)
        finally:
            client.close()
    except ClickHouseError as exc:
        print(f"boltstream report: {exc}", file=sys.stderr)
        return 1
    return 0
