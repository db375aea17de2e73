"""docs/architecture.md and the README agree with the code: parameters, topics, records, ClickHouse views,
environment variables, links."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Literal

import pytest

from boltstream.infra.common.config import TRACER_ENV, Range, Seconds, TopicConfig, ZeroToOne
from boltstream.schemas.codec import shipped_schemas

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"
README = ROOT / "README.md"


def generator():
    """docs/gen_parameters.py, loaded from its file (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gen_parameters", ROOT / "docs" / "gen_parameters.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def section(text: str, title: str) -> str:
    """The body of the Markdown section ``## title``, up to the next heading of level 2."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no section '## {title}'"
    return match.group(1)


def first_cells(text: str) -> list[str]:
    """The first cell of every row of every Markdown table in ``text``, code quotes removed."""
    cells = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells.append(line.split("|")[1].strip().strip("`"))
    return cells


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_parameter_tables_are_generated_from_config_py():
    gen = generator()
    text = ARCHITECTURE.read_text()
    assert gen.current(text), "the markers of the generated parameter tables are missing"
    assert gen.current(text) == gen.render(), "docs/architecture.md is stale: run python docs/gen_parameters.py"


def test_every_parameter_has_a_doc_comment():
    assert generator().undocumented() == [], "write a `#:` comment above each of these fields in config.py"


def test_the_generator_words_kinds_choices_ranges_and_defaults():
    gen = generator()
    assert gen.allowed(Annotated[Seconds, Range(above=0)]) == "seconds, above 0"
    assert gen.allowed(ZeroToOne) == "number, in [0, 1]"
    assert gen.allowed(Annotated[int, Range(at_least=0), Range(at_most=9)]) == "integer, in [0, 9]"
    assert gen.allowed(Literal["grpo", "sft"]) == "one of `grpo`, `sft`"
    assert gen.allowed(tuple[str, ...]) == "list of strings"

    @dataclass
    class Example:
        name: str = "x"
        names: tuple[str, ...] = ("all",)
        table: dict[str, str] = field(default_factory=dict)
        flag: bool = False

    assert [gen.default(f) for f in fields(Example)] == ['`"x"`', '`["all"]`', "`{}`", "`false`"]
    assert gen._markdown("a|b, ``<home>/x`` or <home>") == "a\\|b, `<home>/x` or &lt;home>"


def test_topics_table_names_every_topic_with_its_compaction():
    rows = {}
    for line in section(ARCHITECTURE.read_text(), "Topics").splitlines():
        cells = [cell.strip().strip("`") for cell in line.split("|")[1:-1]]
        if len(cells) == 7 and cells[0].startswith("topics."):
            rows[cells[1]] = cells
    topics = TopicConfig()
    assert set(rows) == set(topics.all())
    for name, cells in rows.items():
        assert getattr(topics, cells[0].removeprefix("topics.")) == name
        assert (cells[4] == "yes") == (name in topics.compacted()), name


def test_records_table_names_every_record():
    cells = first_cells(section(ARCHITECTURE.read_text(), "Records"))
    assert set(cells) - {"record"} == set(shipped_schemas())


def ddl_views() -> set[str]:
    names = set()
    for path in (ROOT / "schemas" / "clickhouse").glob("*.sql"):
        names |= set(re.findall(r"CREATE (?:OR REPLACE )?VIEW (?:IF NOT EXISTS )?(\w+)", path.read_text()))
    return names


def test_every_view_users_query_is_described():
    views = ddl_views()
    cells = set(first_cells(section(ARCHITECTURE.read_text(), "ClickHouse tables and views")))
    plain = {name for name in views if not name.startswith("report_")}
    reports = {name.removeprefix("report_") for name in views if name.startswith("report_")}
    assert plain and reports
    assert plain | reports == cells - {"view", "report"}


def test_readme_names_every_environment_variable_the_code_reads():
    where = section(README.read_text(), "Where things live")
    for variable in ("BOLTSTREAM_HOME", "BOLTSTREAM_CONFIG", "BOLTSTREAM_<SECTION>__<FIELD>", TRACER_ENV):
        assert f"`{variable}`" in where, variable
    installer = (ROOT / "infra" / "install.sh").read_text()
    for variable in ("VIRTUAL_ENV", "PYTHON"):
        assert f"${{{variable}" in installer and f"`{variable}`" in where, variable


@pytest.mark.parametrize(("path", "prefix"), [(README, "docs/architecture.md"), (ARCHITECTURE, "")])
def test_links_to_docs_land_on_a_heading(path: Path, prefix: str):
    headings = {anchor(h) for h in re.findall(r"^#+ (.+)$", ARCHITECTURE.read_text(), re.MULTILINE)}
    links = re.findall(rf"\]\({re.escape(prefix)}#([\w-]+)\)", path.read_text())
    assert links
    assert [link for link in links if link not in headings] == []


def test_readme_says_whether_the_sdk_needs_a_c_compiler_as_pyproject_does():
    """pyproject's ext-modules say whether the secret pre-scan must compile; the install section must agree."""
    modules = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["ext-modules"]
    optional = all(module.get("optional", False) for module in modules)
    install = section(README.read_text(), "Installing the SDK into your agent's environment")
    says_required = "that needs a C compiler" in " ".join(install.split())
    assert says_required != optional, "README's install section and pyproject's ext-modules `optional` disagree"
