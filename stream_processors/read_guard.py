"""What a query on the read endpoint may do, judged on ClickHouse's own parse of it.

Why a check of our own: chDB cannot enforce this. The engine behind the endpoint is clickhouse-local,
whose one user has every grant (no users, profiles or ``GRANT`` to hold on to) and whose ``file()``
function reads any path: ClickHouse checks ``user_files_path`` only in a server. What the engine does
enforce, the endpoint uses: its reader connections are opened with ``readonly=1`` (no writes, no DDL,
no change of any setting, no table function that needs a temporary table: file, url, s3, remote,
mysql, executable ...), ``allow_introspection_functions=0`` and the query limits. On top of that,
every query passes :meth:`ReadGuard.check` before it runs, on the same connection:

1. ``formatQuerySingleLine`` (ClickHouse's parser, handed the text as a parameter, so nothing of it
   runs) refuses syntax errors and multi-statements, before chDB could run the first statements of one;
2. ``EXPLAIN AST`` of it (a parse: nothing is evaluated; query parameters are substituted as when the
   query runs, so ``{t:Identifier}`` is checked as the table it names) gives the tree the rules read:

   - the statement is a SELECT, DESCRIBE, EXISTS TABLE, SHOW TABLES (or another SHOW that lists
     names), SHOW CREATE TABLE/VIEW, or an EXPLAIN of one of those;
   - it has no INTO OUTFILE, which clickhouse-local writes itself, readonly or not;
   - every table it names is in the endpoint's database or one of :data:`SYSTEM_TABLES`, also through
     ``x IN db.table`` (for the databases there were when the endpoint started);
   - it calls no function that reaches files, URLs, other servers, programs, AI providers,
     dictionaries or other databases' tables, and no table function but :data:`TABLE_FUNCTIONS`
     (and the parameterized views of the database). The deny list is read from the engine's own
     catalogue when the endpoint starts (``system.functions`` by category, ``system.table_functions``),
     so a function a newer chDB adds to a denied category is denied too.

How the tree is read. ``EXPLAIN AST`` prints one node per line, indented by depth, and prints names
raw: a quoted identifier holding a line break prints as more lines, which may look like nodes. So no
rule depends on how lines nest, which such lines could fake: each rule reads single lines (every
``Function`` line, every ``TableIdentifier`` line, a ``Literal`` as shallow as an INTO OUTFILE file)
and a fake line can only add a refusal. The one exception is the statement's kind, read from the first
line(s), which no name can precede.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

READ_USER = "reader"
SYNTAX_ERROR, READONLY, FUNCTION_NOT_ALLOWED, ACCESS_DENIED = 62, 164, 446, 497

#: The system tables a reader may read: what clickhouse-connect and boltstream's readers need
#: (settings, tables, columns) and harmless catalogues and generators. Not processes (other readers'
#: queries), the logs, server_settings, disks or parts (paths), stack traces or symbols.
SYSTEM_TABLES = frozenset(
    {
        "settings",
        "tables",
        "columns",
        "functions",
        "table_functions",
        "data_type_families",
        "formats",
        "time_zones",
        "one",
        "numbers",
        "numbers_mt",
        "zeros",
        "zeros_mt",
    }
)
#: Table functions that only generate rows or wrap a query (whose own parts are checked like any other).
TABLE_FUNCTIONS = frozenset(
    {"numbers", "numbers_mt", "zeros", "zeros_mt", "generate_series", "generateSeries", "primes", "values", "view"}
)
#: Categories of system.functions whose functions reach outside the query: AI providers over the
#: network, the binary's memory and files (introspection), dictionaries (sources: files, URLs,
#: programs, other servers) and the embedded geobase files.
DENIED_CATEGORIES = frozenset({"AI", "Introspection", "Dictionary", "Embedded Dictionary"})
#: Functions outside those categories that do: read a file, load a model library, read Join tables or
#: other databases' catalogue, or the server's configuration (paths).
DENIED_FUNCTIONS = frozenset(
    {
        "file",
        "catboostEvaluate",
        "naiveBayesClassifier",
        "joinGet",
        "joinGetOrNull",
        "hasColumnInTable",
        "getServerSetting",
        "getMacro",
    }
)
#: Statements a reader may run, by their EXPLAIN AST node; EXPLAIN needs its own check of what it
#: explains. ``ShowTables`` stands for every SHOW that lists names (tables, databases, settings ...).
STATEMENTS = frozenset(
    {
        "SelectWithUnionQuery",
        "DescribeQuery",
        "ExistsTableQuery",
        "ShowTables",
        "ShowCreateTableQuery",
        "ShowCreateViewQuery",
    }
)
#: EXPLAIN kinds a reader may run: not ``EXPLAIN TABLE OVERRIDE``, which takes a table function.
EXPLAIN_KINDS = frozenset(
    {
        "EXPLAIN",
        "EXPLAIN AST",
        "EXPLAIN SYNTAX",
        "EXPLAIN PLAN",
        "EXPLAIN PIPELINE",
        "EXPLAIN QUERY TREE",
        "EXPLAIN ESTIMATE",
    }
)
#: Statements that name their table in their first line (``ExistsTableQuery <database> <table>``).
_NAMED_TABLE = re.compile(
    r"(?:ExistsTableQuery|ShowCreateTableQuery|ShowCreateViewQuery) (?P<database>\S*) (?P<table>\S+)"
)
_CHILDREN = re.compile(r" \(children \d+\)$")


class QueryRefused(Exception):
    """A request the endpoint will not run, with the ClickHouse error code to answer with."""

    def __init__(self, code: int, name: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.name = name

    def clickhouse_text(self) -> str:
        return f"Code: {self.code}. DB::Exception: {self}. ({self.name})\n"


@dataclass(frozen=True)
class _Node:
    """One line of an EXPLAIN AST dump: its depth, node kind and the rest (without the child count)."""

    depth: int
    kind: str
    text: str

    @property
    def name(self) -> str:
        """The first word after the kind: the function of a ``Function``, the table of a ``TableIdentifier``."""
        return self.text.split(" ", 1)[0]


def _nodes(dump: str) -> list[_Node]:
    nodes = []
    for line in dump.splitlines():
        stripped = line.lstrip(" ")
        kind, _, text = _CHILDREN.sub("", stripped).partition(" ")
        nodes.append(_Node(len(line) - len(stripped), kind, text))
    return nodes


def _escaped(text: str) -> str:
    """``text`` as a query parameter value, which ClickHouse reads in its escaped (TabSeparated) form."""
    return text.translate({ord("\\"): "\\\\", ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r", 0: "\\0"})


class ReadGuard:
    """The checks of one endpoint: its database, and the functions its engine must not run."""

    def __init__(self, database: str, denied_functions: frozenset[str], other_databases: frozenset[str]) -> None:
        self.database = database
        #: Lower-cased: a case-insensitive function is denied in any spelling (over-refusing a
        #: case-sensitive one spelled otherwise costs nothing: that spelling does not exist).
        self.denied_functions = frozenset(name.lower() for name in denied_functions)
        #: Databases a plain identifier may name a table of (``x IN system.processes``).
        self.other_databases = other_databases - {database}

    @classmethod
    def of_engine(cls, connection: Any, database: str) -> ReadGuard:
        """The guard for ``database`` with the deny list of the engine behind ``connection``."""

        def names(sql: str) -> set[str]:
            return set((connection.query(sql, "TabSeparatedRaw").bytes() or b"").decode().split("\n")) - {""}

        categories = ", ".join(f"'{category}'" for category in sorted(DENIED_CATEGORIES))
        denied = names(f"SELECT name FROM system.functions WHERE categories IN ({categories})") | DENIED_FUNCTIONS
        originals = ", ".join(f"'{name}'" for name in sorted(denied))
        denied |= names(f"SELECT name FROM system.functions WHERE alias_to IN ({originals})")
        # A table function that is also a scalar one (file, format) is judged as the scalar; the
        # others are denied wherever they appear, unless listed as harmless.
        scalars = {name.lower() for name in names("SELECT name FROM system.functions")}
        table_functions = names("SELECT name FROM system.table_functions") - TABLE_FUNCTIONS
        denied |= {name for name in table_functions if name.lower() not in scalars}
        return cls(database, frozenset(denied), frozenset(names("SELECT name FROM system.databases")))

    def check(self, connection: Any, sql: str, params: dict[str, str]) -> None:
        """Raise :class:`QueryRefused` unless ``sql`` with ``params`` may run on the read endpoint;
        ``connection`` is the (readonly) reader connection it would run on."""
        # Raises ClickHouse's own SYNTAX_ERROR for a multi-statement or a query that does not parse,
        # before any of it can run (chDB runs the statements of a multi-statement one by one).
        connection.query("SELECT formatQuerySingleLine({sql:String})", "TabSeparatedRaw", params={"sql": _escaped(sql)})
        dump = connection.query(f"EXPLAIN AST {sql}", "TabSeparatedRaw", params=params).bytes() or b""
        nodes = _nodes(dump.decode())
        statement = self._check_statement(nodes)
        for node in nodes:
            if node.kind == "TableIdentifier":
                self._check_table(node.name)
            elif node.kind == "Identifier":
                parts = node.name.split(".")
                if len(parts) > 1 and parts[0] in self.other_databases:
                    self._check_table(".".join(parts[:2]))
            elif node.kind == "Function":
                self._check_function(node.name)
            elif node.kind == "Literal" and node.depth <= statement.depth + 1:
                # A statement's own Literal children are its INTO OUTFILE file (and compression):
                # clickhouse-local writes that file itself, readonly or not.
                raise QueryRefused(READONLY, "READONLY", "INTO OUTFILE is not allowed on the read endpoint")

    def _check_statement(self, nodes: list[_Node]) -> _Node:
        """The node of the statement that runs (what an EXPLAIN explains), once it is one a reader may run."""
        if not nodes:
            raise QueryRefused(SYNTAX_ERROR, "SYNTAX_ERROR", "Empty query")
        statement = nodes[0]
        if statement.kind == "Explain":
            if statement.text not in EXPLAIN_KINDS:
                raise self._not_a_read(statement.text)
            # What it explains: its first child that is not its settings (``EXPLAIN PLAN actions=1``).
            statement = next((node for node in nodes[1:] if node.kind != "Set"), nodes[0])
        if statement.kind not in STATEMENTS:
            raise self._not_a_read(statement.kind)
        if statement.kind in ("ExistsTableQuery", "ShowCreateTableQuery", "ShowCreateViewQuery"):
            named = _NAMED_TABLE.fullmatch(f"{statement.kind} {statement.text}")
            if named is None:
                raise self._not_a_read(statement.kind)
            database, table = named["database"], named["table"]
            self._check_table(f"{database}.{table}" if database else table)
        return statement

    def _check_table(self, name: str) -> None:
        database, qualified, table = name.partition(".")
        if qualified and database != self.database and not (database == "system" and table in SYSTEM_TABLES):
            raise self._not_allowed_table(name)

    def _check_function(self, name: str) -> None:
        if "." in name:  # a parameterized view, by its qualified name
            self._check_table(name)
        elif name.lower() in self.denied_functions:
            raise QueryRefused(
                FUNCTION_NOT_ALLOWED,
                "FUNCTION_NOT_ALLOWED",
                f"{READ_USER}: function {name} is not allowed on the read endpoint: it reaches files, URLs, "
                f"other servers, programs or tables outside database {self.database}",
            )

    def _not_allowed_table(self, name: str) -> QueryRefused:
        return QueryRefused(
            ACCESS_DENIED,
            "ACCESS_DENIED",
            f"{READ_USER}: Not enough privileges: the read endpoint reads the tables of database {self.database} "
            f"and system.{{{','.join(sorted(SYSTEM_TABLES))}}} only, not {name}",
        )

    @staticmethod
    def _not_a_read(what: str) -> QueryRefused:
        return QueryRefused(
            READONLY,
            "READONLY",
            "the read endpoint runs only SELECT, DESCRIBE, EXISTS TABLE, SHOW TABLES, SHOW CREATE and EXPLAIN "
            f"queries, not {what or 'this'}",
        )
