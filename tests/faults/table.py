"""The fault suite's result table: one row per scenario, printed at the end of the run.

Every scenario test ends with ``record_fault(FaultRow(...))`` from measured numbers; the table is
printed in the terminal summary and written to ``tests/faults/last_run.md`` (the README copies it).
A row whose numbers break the guarantee (anything lost, anything duplicated in the views, or
trajectories that differ from an undisturbed run) also fails its test, through ``FaultRow.check()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RESULTS_FILE = Path(__file__).with_name("last_run.md")


@dataclass(frozen=True)
class FaultRow:
    scenario: str
    #: records the broker acknowledged to their producers (spans, rewards, model versions: say which in ``unit``)
    acknowledged: int
    #: of those, how many the archive holds (deduplicated views)
    archived: int
    #: rows counted twice in the deduplicated views
    duplicated: int
    #: True when the trajectories equal those of the same traffic without the fault; None = no join ran
    trajectories_identical: bool | None
    unit: str = "spans"
    note: str = ""

    @property
    def lost(self) -> int:
        return self.acknowledged - self.archived

    def check(self) -> None:
        assert self.lost == 0, f"{self.scenario}: {self.lost} of {self.acknowledged} acknowledged {self.unit} lost"
        assert self.duplicated == 0, f"{self.scenario}: {self.duplicated} duplicated {self.unit} in the views"
        assert self.trajectories_identical is not False, (
            f"{self.scenario}: trajectories differ from an undisturbed run ({self.note})"
        )


_rows: list[FaultRow] = []


def record_fault(row: FaultRow) -> None:
    """Add ``row`` to the table, then fail the calling test if the row breaks the guarantee."""
    _rows.append(row)
    row.check()


def render() -> str:
    header = "| scenario | acknowledged | archived | lost | duplicated | trajectories identical | note |\n"
    header += "|---|---:|---:|---:|---:|---|---|\n"
    lines = []
    for row in _rows:
        identical = {True: "yes", False: "NO", None: "n/a (no join)"}[row.trajectories_identical]
        lines.append(
            f"| {row.scenario} | {row.acknowledged:,} {row.unit} | {row.archived:,} | {row.lost:,} | "
            f"{row.duplicated:,} | {identical} | {row.note} |"
        )
    return header + "\n".join(lines) + "\n"


def rows() -> list[FaultRow]:
    return list(_rows)
