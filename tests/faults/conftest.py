"""Print the fault table at the end of any run that executed fault scenarios."""

from __future__ import annotations

from tests.faults.table import RESULTS_FILE, render, rows


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not rows():
        return
    table = render()
    terminalreporter.write_sep("=", "fault suite")
    terminalreporter.write(table)
    RESULTS_FILE.write_text(table)
