"""What the archive's tables, views and columns mean, for people writing SQL against it.

It owns ``boltstream sql --schema [TABLE]`` and the closest-column hint added to an unknown-identifier
error. The meanings live in one place each: a table's or view's ``COMMENT`` in
``schemas/clickhouse/*.sql``, a column's ``COMMENT`` there when it has one, else the ``doc`` of the Avro
field the column holds (``schemas/avro``; nested records flattened to ``<field>_<subfield>`` as the
archive stores them). A view shows the meanings of its store's columns (``spans`` those of
``spans_store``).

Every function here reads a client's ``system`` tables: the live archive's, or those of the shipped DDL
in a temporary embedded store (:func:`boltstream.stream_processors.analytics.schema_client`).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from boltstream.schemas.codec import latest

#: ClickHouse error codes of a name the query used that no table has.
UNKNOWN_IDENTIFIER_CODES = frozenset({16, 47})  # NO_SUCH_COLUMN_IN_TABLE, UNKNOWN_IDENTIFIER
#: The record each table family holds (its Avro docs describe the columns).
FAMILY_RECORDS = {
    "spans": "SpanBatch",
    "rewards": "Reward",
    "trajectories": "Trajectory",
    "samples": "TrainingSample",
    "dead_letters": "DeadLetter",
    "canary_decisions": "CanaryDecision",
}


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    meaning: str


@dataclass(frozen=True)
class TableInfo:
    name: str
    engine: str
    comment: str

    @property
    def kind(self) -> str:
        return "view" if self.engine in ("View", "MaterializedView") else "table"

    @property
    def internal(self) -> bool:
        """The archive's ingestion plumbing (``*_ingest`` tables and their materialized views)."""
        return self.engine in ("Null", "MaterializedView")


def _flattened_docs(record: dict[str, Any], prefix: str = "") -> dict[str, str]:
    docs = {}
    for field in record["fields"]:
        branches = field["type"] if isinstance(field["type"], list) else [field["type"]]
        nested = next((b for b in branches if isinstance(b, dict) and b.get("type") == "record"), None)
        if nested is not None and not prefix:
            docs.update(_flattened_docs(nested, f"{field['name']}_"))
        else:
            docs[prefix + field["name"]] = field.get("doc", "")
    return docs


def avro_docs(family: str) -> dict[str, str]:
    """Column name -> the doc of the Avro field it holds, for a table family (``spans``, ``rewards`` ...)."""
    record = FAMILY_RECORDS.get(family)
    if record is None:
        return {}
    schema = latest(record).schema
    if record != "SpanBatch":
        return _flattened_docs(schema)
    span = next(f for f in schema["fields"] if f["name"] == "spans")["type"]["items"]
    batch = {"fields": [f for f in schema["fields"] if f["name"] != "spans"]}
    return {**_flattened_docs(batch), **_flattened_docs(span)}


def family_of(table: str) -> str:
    return re.sub(r"_(store|ingest|ingest_mv)$", "", table)


def tables(client: Any) -> list[TableInfo]:
    """Every table and view of the archive database, by name."""
    rows = client.query(
        "SELECT name, engine, comment FROM system.tables WHERE database = currentDatabase() ORDER BY name"
    ).result_rows
    return [TableInfo(*row) for row in rows]


def columns(client: Any, table: str) -> list[Column]:
    """The columns of ``table`` with their meanings (COMMENT, else the store's COMMENT, else the Avro doc)."""
    family = family_of(table)
    rows = client.query(
        "SELECT table, name, type, comment FROM system.columns WHERE database = currentDatabase()"
        " AND table IN ({t:String}, {s:String}) ORDER BY position",
        parameters={"t": table, "s": f"{family}_store"},
    ).result_rows
    store_comments = {name: comment for owner, name, _, comment in rows if owner == f"{family}_store" and comment}
    docs = avro_docs(family)
    return [
        Column(name, type_name, comment or store_comments.get(name) or docs.get(name, ""))
        for owner, name, type_name, comment in rows
        if owner == table
    ]


def closest(name: str, candidates: list[str], meanings: dict[str, str] | None = None, limit: int = 3) -> list[str]:
    """The candidates a mistyped or guessed ``name`` most likely means: one that contains it as a part
    (``model`` -> ``llm_model``), a near spelling, then one whose meaning uses a word of it (``span_type``
    -> ``kind``, 'the span type')."""
    wanted = name.lower()
    parts = [p for p in re.split(r"[_\W]+", wanted) if p]
    found = [c for c in candidates if wanted in c.lower().split("_") or wanted == c.lower()]
    found += difflib.get_close_matches(wanted, candidates, n=limit, cutoff=0.6)
    found += [c for c in candidates if len(parts) > 1 and all(p in c.lower().split("_") for p in parts)]
    for candidate, meaning in (meanings or {}).items():
        words = set(re.findall(r"[a-z0-9]+", meaning.lower()))
        if parts and parts[-1] in words and (len(parts) == 1 or any(p in words for p in parts[:-1])):
            found.append(candidate)
    return list(dict.fromkeys(found))[:limit]


def unknown_identifier(exc: Exception) -> str | None:
    """The name an unknown-identifier error of ClickHouse is about, or None for any other error."""
    if getattr(exc, "code", None) not in UNKNOWN_IDENTIFIER_CODES:
        return None
    match = re.search(r"(?:[Ii]dentifier|[Cc]olumns?:?|column) [`'\"]?([\w.]+)[`'\"]?", str(exc))
    return match.group(1).rsplit(".", 1)[-1] if match else None


def column_hint(client: Any, sql: str, exc: Exception) -> str | None:
    """'did you mean ...' for an unknown column in ``sql``, from the columns of the tables it reads."""
    name = unknown_identifier(exc)
    if name is None:
        return None
    known = {table.name for table in tables(client) if not table.internal}
    used = [t for t in re.findall(r"\b(?:FROM|JOIN)\s+`?(\w+)`?", sql, re.IGNORECASE) if t in known]
    meanings: dict[str, str] = {}
    for table in used or sorted(known - {t for t in known if t.endswith("_store") or t.startswith("report_")}):
        for column in columns(client, table):
            meanings.setdefault(column.name, column.meaning)
    suggestions = closest(name, list(meanings), meanings)
    where = ", ".join(used) if used else "the archive's views"
    listing = f"`boltstream sql --schema {used[0]}`" if len(used) == 1 else "`boltstream sql --schema`"
    if suggestions:
        meant = " or ".join(map(repr, suggestions))
        return f"{where} has no column {name!r}; did you mean {meant}? ({listing} lists them)"
    return f"{where} has no column {name!r}; {listing} lists the columns and what they mean"
