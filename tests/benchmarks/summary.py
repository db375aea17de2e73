"""Headline figures that benchmarks record as they print them, for a run that shows several side by side
(tests/benchmarks/bench_zero_code.py): ``record(benchmark, figure)`` keeps the line, ``lines()`` gives them in
the order they were recorded."""

from __future__ import annotations

_figures: dict[str, str] = {}


def record(benchmark: str, figure: str) -> None:
    _figures[benchmark] = figure


def lines() -> list[str]:
    width = max((len(name) for name in _figures), default=0)
    return [f"  {name:<{width}}  {figure}" for name, figure in _figures.items()]
