"""Reading the archive: ``boltstream sql`` and ``boltstream report``.

Readers always go through clickhouse-connect's HTTP client to ``clickhouse.read_url``: the embedded
store's read endpoint (served by the archive worker) or a ClickHouse server, alike. The named reports
are views created with the tables (``schemas/clickhouse/1*_reports*.sql``): ``report NAME`` selects
from ``report_NAME`` (``--param k=v`` passes the parameters of a parameterized view), and ``report --list``
reads their names and comments from ``system.tables``. ``report NAME --plot`` also draws the result
(matplotlib, the ``[report]`` extra) into a PNG and an HTML page holding it and the rows. A report with
no rows yet says so in one line and succeeds; ``sql`` prints an empty result as its header alone.

``sql --schema [TABLE]`` lists the tables and views, or a table's columns, with what they mean
(:mod:`boltstream.stream_processors.archive_schema`); it and ``report --list`` read the shipped DDL from a
temporary embedded store when no archive is configured. A query naming an unknown column is answered
with the closest columns of the tables it reads.

Binary-safe output: a string column holding bytes that are not UTF-8 (``dead_letters.value``, the raw
record) is printed as base64 in every format, and its header says so (``value (base64)``).
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime
import html
import io
import json
import math
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boltstream.infra.common.config import ConfigError, Settings, redacted
from boltstream.stream_processors import archive_schema

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
            "or set BOLTSTREAM_CLICKHOUSE__READ_URL (e.g. https://host:8443, its login in clickhouse.read_user and "
            "BOLTSTREAM_CLICKHOUSE__READ_PASSWORD or clickhouse.read_password_file)"
        )
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"clickhouse.read_url must be an http(s):// URL, not {redacted(url)!r}")
    arguments = settings.clickhouse.client_arguments(url, reading=True)
    return clickhouse_connect.get_client(**arguments, database=settings.clickhouse.database)


@contextmanager
def schema_client(settings: Settings) -> Iterator[Any]:
    """A client on the archive's read URL, or, with none configured (no stack running), on a temporary
    embedded store holding the shipped DDL, removed afterwards: what the archive's tables are needs no
    running archive."""
    if settings.clickhouse.read_url:
        client = read_client(settings)
        try:
            yield client
        finally:
            client.close()
        return
    from boltstream.stream_processors.archive import connect

    directory = tempfile.mkdtemp(prefix="boltstream-schema-")
    client = connect(settings.clickhouse, f"chdb://{directory}")
    try:
        yield client
    finally:
        client.close()
        shutil.rmtree(directory, ignore_errors=True)


BASE64_HEADER = "{} (base64)"
_STRING_TYPE = re.compile(r"^(Nullable\(|LowCardinality\()*(String|FixedString\(\d+\))\)*$")


def _inner(sql: str) -> str:
    return sql.strip().rstrip(";").strip()


def binary_columns(client: Any, sql: str) -> list[str]:
    """The string columns of ``sql``'s result that hold a value which is not UTF-8 text."""
    described = client.query(f"DESCRIBE ({_inner(sql)})").result_rows
    strings = [row[0] for row in described if _STRING_TYPE.match(row[1])]
    if not strings:
        return []
    checks = ", ".join(f"countIf(NOT isValidUTF8(toString(ifNull(`{name}`, ''))))" for name in strings)
    counts = client.query(f"SELECT {checks} FROM ({_inner(sql)})").result_rows[0]
    return [name for name, count in zip(strings, counts, strict=True) if count]


def base64_sql(client: Any, sql: str, binary: list[str]) -> str:
    """``sql`` with its ``binary`` columns base64-encoded under a header that says so."""
    names = [row[0] for row in client.query(f"DESCRIBE ({_inner(sql)})").result_rows]
    selected = [
        f"base64Encode(toString(`{name}`)) AS `{BASE64_HEADER.format(name)}`" if name in binary else f"`{name}`"
        for name in names
    ]
    return f"SELECT {', '.join(selected)} FROM ({_inner(sql)})"


def print_result(client: Any, sql: str, output_format: str) -> None:
    """Run ``sql`` and print its rows as a rich table, CSV (with a header) or JSON lines; a query that
    names its own ``FORMAT`` is written as the server formats it, byte for byte. Columns holding bytes
    that are not UTF-8 text come out as base64, said in their header."""
    if _OWN_FORMAT.search(sql) is not None:
        sys.stdout.flush()
        sys.stdout.buffer.write(client.raw_query(sql))
        sys.stdout.buffer.flush()
        return
    if output_format in _RAW_FORMATS:
        data = client.raw_query(sql, fmt=_RAW_FORMATS[output_format])
        try:
            text = data.decode()
        except UnicodeDecodeError:  # raw bytes in a column: run it again with them encoded
            encoded = base64_sql(client, sql, binary_columns(client, sql))
            text = client.raw_query(encoded, fmt=_RAW_FORMATS[output_format]).decode()
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    print_table(readable(client.query(sql, query_formats={"String": "bytes", "FixedString": "bytes"})))


def _as_text(value: Any) -> Any:
    """``value`` with every bytes in it decoded; raises UnicodeDecodeError on bytes that are not text."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list | tuple):
        return type(value)(_as_text(v) for v in value)
    if isinstance(value, dict):
        return {_as_text(k): _as_text(v) for k, v in value.items()}
    return value


def _as_base64(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, list | tuple):
        return type(value)(_as_base64(v) for v in value)
    if isinstance(value, dict):
        return {_as_base64(k): _as_base64(v) for k, v in value.items()}
    return value


@dataclass
class Rows:
    """A result as printed: its column names and rows."""

    column_names: list[str]
    result_rows: list[tuple]


def readable(result: Any) -> Rows:
    """A result read with strings as bytes, with each column as text, or as base64 (and its header saying
    so) when one of its values is not UTF-8."""
    columns = list(zip(*result.result_rows, strict=True)) if result.result_rows else [() for _ in result.column_names]
    names = []
    for index, name in enumerate(result.column_names):
        try:
            columns[index] = tuple(_as_text(v) for v in columns[index])
            names.append(name)
        except UnicodeDecodeError:
            columns[index] = tuple(_as_base64(v) for v in columns[index])
            names.append(BASE64_HEADER.format(name))
    return Rows(names, list(zip(*columns, strict=True)))


def print_table(result: Any) -> None:
    """Print a result (its ``column_names`` and ``result_rows``) as a rich table, its header even when it
    has no rows, and its row count."""
    from rich.console import Console
    from rich.table import Table

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
        except ClickHouseError as exc:
            print(f"boltstream {command}: {exc}", file=sys.stderr)
            hint = archive_schema.column_hint(client, sql, exc)
            if hint:
                print(f"boltstream {command}: {hint}", file=sys.stderr)
            return 1
        finally:
            client.close()
    except ClickHouseError as exc:
        print(f"boltstream {command}: {exc}", file=sys.stderr)
        return 1
    return 0


def sql_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "query", nargs="?", help='a read-only query, e.g. "SELECT agent_name, count() FROM spans GROUP BY 1"'
    )
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    parser.add_argument(
        "--schema",
        nargs="?",
        const="",
        metavar="TABLE",
        help="list the tables and views with what they hold, or TABLE's columns with what they mean",
    )


def print_schema(client: Any, table: str, output_format: str) -> int:
    """The tables and views (``table`` empty) or one table's columns, with their meanings."""
    known = archive_schema.tables(client)
    if not table:
        shown = [t for t in known if not t.internal]
        rows = [(t.name, t.kind, t.comment) for t in shown]
        print_rows(Rows(["name", "kind", "meaning"], rows), output_format)
        if output_format == "table":
            internal = ", ".join(t.name for t in known if t.internal)
            print(f"ingestion plumbing, not for queries: {internal}")
            print("`boltstream sql --schema NAME` shows a table's columns; query the views, they hold each event once")
        return 0
    by_name = {t.name: t for t in known}
    if table not in by_name:
        near = archive_schema.closest(table, list(by_name))
        also = f"; did you mean {' or '.join(map(repr, near))}?" if near else ""
        print(
            f"boltstream sql: no table or view {table!r}{also} (`boltstream sql --schema` lists them)", file=sys.stderr
        )
        return 2
    if output_format == "table":
        print(f"{table} ({by_name[table].kind}): {by_name[table].comment}")
    columns = archive_schema.columns(client, table)
    print_rows(Rows(["column", "type", "meaning"], [(c.name, c.type, c.meaning) for c in columns]), output_format)
    return 0


def print_rows(rows: Rows, output_format: str) -> None:
    """Rows built here (not a query's result) in one of FORMATS."""
    if output_format == "table":
        print_table(rows)
    elif output_format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(rows.column_names)
        writer.writerows(rows.result_rows)
    else:
        for row in rows.result_rows:
            print(json.dumps(dict(zip(rows.column_names, row, strict=True))))


def sql_command(args: argparse.Namespace, settings: Settings) -> int:
    if args.schema is not None:
        if args.query:
            print("boltstream sql: give a query or --schema, not both", file=sys.stderr)
            return 2
        with schema_client(settings) as client:
            return print_schema(client, args.schema, args.format)
    if not args.query:
        print("boltstream sql: give a query, or --schema to see the tables", file=sys.stderr)
        return 2
    return _run(settings, args.query, args.format, "sql")


def report_names(client: Any) -> list[tuple[str, str]]:
    """The named reports (without the ``report_`` prefix) and their one-line descriptions."""
    rows = client.query(
        "SELECT name, comment FROM system.tables WHERE database = currentDatabase() AND startsWith(name, {p:String})"
        " ORDER BY name",
        parameters={"p": REPORT_PREFIX},
    ).result_rows
    return [(name.removeprefix(REPORT_PREFIX), comment) for name, comment in rows]


def report_parameters(client: Any, name: str) -> list[str]:
    """The parameters a (parameterized) report view takes, in order of first use."""
    query = client.command(
        "SELECT create_table_query FROM system.tables WHERE database = currentDatabase() AND name = {n:String}",
        parameters={"n": REPORT_PREFIX + name},
    )
    return list(dict.fromkeys(re.findall(r"\{(\w+):[^}]+\}", str(query))))


def report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="report name (see --list), or 'experiment'")
    parser.add_argument("experiment", nargs="?", help="with `report experiment`: the experiment (its replay's --name)")
    parser.add_argument("--list", action="store_true", help="list the named reports")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    parser.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="parameter of a parameterized report"
    )
    parser.add_argument("--plot", action="store_true", help="also write the report as PNG and HTML")
    parser.add_argument("--output", help="directory of --plot files (default: <home>/reports)")


def report_sql(name: str, params: list[str]) -> str:
    """``SELECT * FROM report_<name>``, with ``(k=v, ...)`` for a parameterized view; numbers stay numbers."""
    if not params:
        return f"SELECT * FROM {REPORT_PREFIX}{name}"
    bound = []
    for param in params:
        key, sep, value = param.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key):
            raise ConfigError(f"--param {param!r}: use NAME=VALUE")
        try:
            literal = repr(float(value)) if math.isfinite(float(value)) else None
        except ValueError:
            literal = None
        if literal is None:
            literal = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        bound.append(f"{key}={literal}")
    return f"SELECT * FROM {REPORT_PREFIX}{name}({', '.join(bound)})"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def plot_report(name: str, comment: str, columns: list[str], rows: list[tuple], directory: Path) -> tuple[Path, Path]:
    """Draw a report result: one panel per numeric column, against the other columns (a time axis when
    the first column is a time, one line per combination of the others; else horizontal bars, one per
    row). Writes ``report_<name>.png`` and ``report_<name>.html`` (the picture and the rows) into
    ``directory``; returns their paths. Raises ValueError when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [i for i in range(len(columns)) if rows and all(_is_number(r[i]) or r[i] is None for r in rows)]
    timed = bool(rows) and isinstance(rows[0][0], datetime.date)
    numeric = [i for i in numeric if not (timed and i == 0)]
    labels_at = [i for i in range(len(columns)) if i not in numeric and not (timed and i == 0)]
    if not rows or not numeric:
        raise ValueError(f"report {name} has {'no rows' if not rows else 'no numeric column'} to plot")
    panels = numeric[:6]
    figure, axes = plt.subplots(len(panels), 1, figsize=(10, 2.2 + 2.6 * len(panels)), squeeze=False)

    def label(position: int, row: tuple) -> str:
        return " / ".join(str(row[i]) for i in labels_at) or str(position)

    for axis, index in zip(axes[:, 0], panels, strict=False):
        if timed:
            series: dict[str, list[tuple[Any, float]]] = {}
            for row in rows:
                series.setdefault(" / ".join(str(row[i]) for i in labels_at), []).append((row[0], row[index] or 0))
            for key, points in series.items():
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key or columns[index])
            axis.legend(fontsize=8)
        else:
            shown = rows[:40]
            axis.barh([label(n, r) for n, r in enumerate(shown)][::-1], [r[index] or 0 for r in shown][::-1])
            axis.tick_params(axis="y", labelsize=8)
        axis.set_title(columns[index], fontsize=10)
        axis.grid(alpha=0.3)
    figure.suptitle(f"{name}: {comment}", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    directory.mkdir(parents=True, exist_ok=True)
    png, page = directory / f"{REPORT_PREFIX}{name}.png", directory / f"{REPORT_PREFIX}{name}.html"
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    png.write_bytes(buffer.getvalue())
    header = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('NULL' if v is None else str(v))}</td>" for v in row) + "</tr>"
        for row in rows
    )
    image = base64.b64encode(buffer.getvalue()).decode()
    page.write_text(
        f"<!doctype html><meta charset='utf-8'><title>boltstream report {html.escape(name)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px}</style>"
        f"<h1>{html.escape(name)}</h1><p>{html.escape(comment)}</p>"
        f"<img alt='{html.escape(name)}' src='data:image/png;base64,{image}'>"
        f"<table><tr>{header}</tr>{body}</table>\n"
    )
    return png, page


def report_command(args: argparse.Namespace, settings: Settings) -> int:
    from clickhouse_connect.driver.exceptions import ClickHouseError

    if args.experiment:
        print(f"boltstream report: {args.experiment!r} follows only `report experiment`", file=sys.stderr)
        return 2
    if not args.list and not args.name:
        print("boltstream report: name a report or use --list", file=sys.stderr)
        return 2
    if args.list:  # from the live archive, or the shipped DDL when none is running
        with schema_client(settings) as client:
            reports = dict(report_names(client))
        width = max((len(name) for name in reports), default=0)
        for name, comment in reports.items():
            print(f"{name:<{width}}  {comment}")
        return 0
    try:
        client = read_client(settings)
        try:
            reports = dict(report_names(client))
            if args.name not in reports:
                known = ", ".join(reports) or "none (is the schema applied?)"
                print(f"boltstream report: unknown report {args.name!r}; known: {known}", file=sys.stderr)
                return 2
            given = {param.partition("=")[0] for param in args.param}
            missing = [p for p in report_parameters(client, args.name) if p not in given]
            if missing:
                needed = " ".join(f"--param {p}=..." for p in missing)
                print(f"boltstream report: {args.name} needs {needed}", file=sys.stderr)
                return 2
            sql = report_sql(args.name, args.param)
            if args.format != "table":  # CSV and JSON as the server writes them, for scripts (a CSV header if no rows)
                print_result(client, sql, args.format)
                if not args.plot:
                    return 0
            result = client.query(sql)
            if not result.result_rows:  # a fresh archive, or no data of the kind the report counts
                about = f"nothing archived so far goes into it ({reports[args.name]})"
                print(f"report {args.name}: no rows yet; {about}", file=sys.stderr)
                return 0
            if args.format == "table":
                print_table(result)
            if args.plot:
                directory = Path(args.output) if args.output else Path(settings.home) / "reports"
                try:
                    png, page = plot_report(
                        args.name, reports[args.name], list(result.column_names), result.result_rows, directory
                    )
                except ValueError as exc:
                    print(f"boltstream report: {exc}", file=sys.stderr)
                    return 1
                print(f"plot: {png}", file=sys.stderr)
                print(f"page: {page}", file=sys.stderr)
        finally:
            client.close()
    except ClickHouseError as exc:
        print(f"boltstream report: {exc}", file=sys.stderr)
        return 1
    return 0
