"""The ClickHouse DDL against the newest Avro schemas: a schema change without a DDL change fails here.

Two shapes are checked, on the live tables of a real archive (chDB) read through its endpoint:

* ``<table>_ingest`` receives the Avro bodies (``FORMAT Avro`` maps fields to columns by name), so its
  columns must be the record's fields with exactly ClickHouse's Avro types;
* ``<table>_store`` is what people query: nested records flattened to ``<field>_<subfield>`` (the
  SpanBatch's spans exploded to one row each, next to the batch's own fields), every Avro field
  present with a compatible type (LowCardinality strings, unsigned token ids, defaults instead of
  NULL for the fields of an absent nested record). A map of typed values (a union without null, read as
  a Variant) is stored as text (``<field>``) beside its numbers (``<field>_number``, Float64).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from boltstream.infra.common.config import Settings
from boltstream.schemas.codec import latest
from boltstream.stream_processors.archive import topic_tables

#: Every record the archive stores, and its table family.
TABLES = {table.record: table.name for table in topic_tables(Settings()).values()}
#: Store columns that are not Avro fields: the ReplacingMergeTree version.
ARCHIVE_COLUMNS = {"archived_at"}
PRIMITIVES = {
    "string": "String",
    "bytes": "String",
    "int": "Int32",
    "long": "Int64",
    "float": "Float32",
    "double": "Float64",
    "boolean": "Bool",
}


def clickhouse_type(avro: Any) -> str:
    """The ClickHouse type FORMAT Avro reads an Avro type into."""
    if isinstance(avro, str):
        return PRIMITIVES[avro]
    if isinstance(avro, list):
        others = [branch for branch in avro if branch != "null"]
        if "null" not in avro:  # ClickHouse names a Variant's branches in alphabetical order
            return "Variant(" + ", ".join(sorted(clickhouse_type(branch) for branch in avro)) + ")"
        assert len(others) == 1, f"only [null, X] unions and unions without null are archivable: {avro}"
        return f"Nullable({clickhouse_type(others[0])})"
    kind = avro["type"]
    if kind == "enum":
        return "Enum8(" + ", ".join(f"'{symbol}' = {i}" for i, symbol in enumerate(avro["symbols"])) + ")"
    if kind == "array":
        return f"Array({clickhouse_type(avro['items'])})"
    if kind == "map":
        return f"Map(String, {clickhouse_type(avro['values'])})"
    if kind == "record":
        return "Tuple(" + ", ".join(f"{f['name']} {clickhouse_type(f['type'])}" for f in avro["fields"]) + ")"
    return clickhouse_type(kind)


def normalise(type_name: str) -> str:
    return re.sub(r"\s*([(),])\s*", r"\1", re.sub(r"\s+", " ", type_name)).strip()


def compatible(expected: str, actual: str) -> bool:
    """``actual`` stores every value of ``expected``: the same type, or LowCardinality / unsigned ids."""
    actual = re.sub(r"LowCardinality\((\w+)\)", r"\1", normalise(actual))
    return normalise(expected) in (actual, actual.replace("UInt32", "Int32"))


def record_of(avro: Any) -> dict | None:
    """The record inside a record type or a [null, record] union, else None."""
    branches = avro if isinstance(avro, list) else [avro]
    return next((b for b in branches if isinstance(b, dict) and b.get("type") == "record"), None)


def flattened(record: dict) -> dict[str, str]:
    """Store columns of a record: nested records as ``<field>_<subfield>`` (not nullable), others as is."""
    columns = {}
    for field in record["fields"]:
        nested = record_of(field["type"])
        if nested is not None:
            columns.update({f"{field['name']}_{sub['name']}": clickhouse_type(sub["type"]) for sub in nested["fields"]})
        elif clickhouse_type(field["type"]).startswith("Map(String, Variant("):
            columns[field["name"]] = "Map(String, String)"
            columns[f"{field['name']}_number"] = "Map(String, Float64)"
        else:
            columns[field["name"]] = clickhouse_type(field["type"])
    return columns


def store_columns(record_name: str) -> dict[str, str]:
    schema = latest(record_name).schema
    if record_name != "SpanBatch":
        return flattened(schema)
    batch_fields = [f for f in schema["fields"] if f["name"] != "spans"]
    span = next(f for f in schema["fields"] if f["name"] == "spans")["type"]["items"]
    # The batch's rollout_id equals every span's; the span's column holds it.
    return {**flattened({"fields": batch_fields}), **flattened(span)}


_live_columns: dict[str, dict[str, str]] = {}


@pytest.fixture
def columns(request) -> dict[str, dict[str, str]]:
    """Every column of the live archive database, per table (one archive process for the whole module)."""
    if not _live_columns:
        archive = request.getfixturevalue("archive")
        archive.start()
        query = (
            "SELECT table, name, type FROM system.columns WHERE database = currentDatabase() ORDER BY table, position"
        )
        for table, name, type_name in archive.client().query(query).result_rows:
            _live_columns.setdefault(table, {})[name] = type_name
    return _live_columns


@pytest.mark.parametrize("record", sorted(TABLES))
def test_ingest_table_has_the_avro_shape(columns, record):
    schema = latest(record).schema
    ingest = columns[f"{TABLES[record]}_ingest"]
    assert list(ingest) == [field["name"] for field in schema["fields"]]
    for field in schema["fields"]:
        assert normalise(ingest[field["name"]]) == normalise(clickhouse_type(field["type"])), field["name"]


@pytest.mark.parametrize("record", sorted(TABLES))
def test_store_table_has_every_avro_field_flattened(columns, record):
    expected = store_columns(record)
    store = columns[f"{TABLES[record]}_store"]
    assert set(store) - set(expected) == ARCHIVE_COLUMNS
    for name, avro_type in expected.items():
        assert name in store, f"{record}: no column for Avro field {name}"
        assert compatible(avro_type, store[name]), f"{record}.{name}: {store[name]} cannot hold {avro_type}"
    # The views people query show the same columns.
    assert columns[TABLES[record]] == store


def test_the_check_catches_a_missing_column():
    changed = latest("Reward").schema | {
        "fields": [*latest("Reward").schema["fields"], {"name": "new", "type": "long"}]
    }
    assert "new" in flattened(changed)
    assert not compatible("Int64", "String") and compatible("Array(Int32)", "Array(UInt32)")
