"""``boltstream report experiment NAME``: what an experiment found, against the original window.

It reads the ``Experiment`` record (:mod:`.experiment`) and compares, in the archive, the trajectories
and samples of the original window (the production tables, restricted to the rollouts the replay
selected) with the experiment's (``experiment_trajectories`` / ``experiment_samples``): counts by
status, samples, final reward distribution, the model versions of the samples, and how each rollout's
status changed under the overrides. If a trainer ran on the experiment, the versions it published on
``replay.<name>.model-updates`` are listed. Shown as rich tables; ``--plot`` also writes
``experiment_<name>.png`` and ``.html``.

The original window of a replay from Kafka offsets is not a SQL selection: its rollouts are taken to be
those the experiment produced a trajectory for.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boltstream.infra.common.config import Settings
from boltstream.stream_processors import analytics
from boltstream.stream_processors.replay.sources import ReplayError, Selection
from boltstream.stream_processors.replay.topic_set import replay_settings

STATUSES = ("complete", "timed_out", "no_reward", "orphaned")


@dataclass(frozen=True)
class Side:
    """The trajectories and samples of one side of the comparison."""

    trajectories: int
    statuses: dict[str, int]
    sampled: int
    selected: int
    samples: int
    reward_mean: float | None
    reward_quantiles: tuple[float, float, float] | None  # p10, p50, p90 of the final rewards
    rewards: dict[float, int]  # final reward (rounded to 3 digits) → trajectories
    model_versions: tuple[str, ...]  # of the samples


@dataclass(frozen=True)
class ExperimentReport:
    name: str
    record: dict[str, Any]
    original: Side
    experiment: Side
    transitions: dict[tuple[str, str], int]  # (original status, experiment status) → rollouts
    trainer_versions: list[dict[str, Any]] = field(default_factory=list)  # ModelUpdate records


def _window(record: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The original window's rollout ids, as a subquery."""
    if record["source"] == "clickhouse":
        selection = Selection(
            record["since_us"],
            record["until_us"],
            tuple(record["agents"]),
            tuple(record["model_versions"]),
            tuple(record["rollouts"]),
            record["where"],
        )
        return selection.rollouts_sql()
    return "SELECT rollout_id FROM experiment_trajectories WHERE experiment = {name:String}", {}


def _side(client: Any, trajectories: str, samples: str, parameters: dict[str, Any]) -> Side:
    counts = client.query(
        "SELECT count(), countIf(status = 'complete'), countIf(status = 'timed_out'), "
        "countIf(status = 'no_reward'), countIf(status = 'orphaned'), countIf(sampled), countIf(selected), "
        f"avg(final_reward), quantiles(0.1, 0.5, 0.9)(final_reward), count(final_reward) FROM {trajectories}",
        parameters=parameters,
    ).result_rows[0]
    total, *by_status = counts[:5]
    sampled, selected, mean, quantiles, rewarded = counts[5:]
    histogram = client.query(
        f"SELECT round(final_reward, 3) AS reward, count() FROM {trajectories} AND final_reward IS NOT NULL "
        "GROUP BY reward ORDER BY reward",
        parameters=parameters,
    ).result_rows
    sample_count, versions = client.query(
        f"SELECT count(), arraySort(groupUniqArray(model_version)) FROM {samples}", parameters=parameters
    ).result_rows[0]
    return Side(
        trajectories=int(total),
        statuses=dict(zip(STATUSES, map(int, by_status), strict=True)),
        sampled=int(sampled),
        selected=int(selected),
        samples=int(sample_count),
        reward_mean=float(mean) if rewarded else None,
        reward_quantiles=tuple(float(q) for q in quantiles) if rewarded else None,
        rewards={float(reward): int(count) for reward, count in histogram},
        model_versions=tuple(versions),
    )


def experiment_report(client: Any, settings: Settings, name: str, trainer_wait: float = 5.0) -> ExperimentReport:
    """Compare experiment ``name`` with its original window. Raises ReplayError if it was never recorded."""
    from boltstream.infra.common.topics import read_records

    result = client.query("SELECT * FROM experiments WHERE name = {name:String}", parameters={"name": name})
    if not result.result_rows:
        raise ReplayError(
            f"no experiment {name!r} in the archive: `boltstream replay --name {name}` records it when the replay "
            "ends, and the archive worker stores it"
        )
    record = dict(zip(result.column_names, result.result_rows[0], strict=True))
    window, parameters = _window(record)
    parameters = {**parameters, "name": name}
    original = _side(
        client,
        f"trajectories WHERE rollout_id IN ({window})",
        f"samples WHERE rollout_id IN ({window})",
        parameters,
    )
    replayed = _side(
        client,
        "experiment_trajectories WHERE experiment = {name:String}",
        "experiment_samples WHERE experiment = {name:String}",
        parameters,
    )
    rows = client.query(
        "SELECT toString(o.status) AS before, toString(e.status) AS after, count() FROM trajectories AS o "
        "INNER JOIN (SELECT rollout_id, status FROM experiment_trajectories WHERE experiment = {name:String}) AS e "
        f"ON o.rollout_id = e.rollout_id WHERE o.rollout_id IN ({window}) GROUP BY before, after",
        parameters=parameters,
    ).result_rows
    updates = read_records(
        settings, replay_settings(settings, name).topics.model_updates, "ModelUpdate", idle_timeout=trainer_wait
    )
    return ExperimentReport(
        name=name,
        record=record,
        original=original,
        experiment=replayed,
        transitions={(before, after): int(count) for before, after, count in rows},
        trainer_versions=sorted(updates, key=lambda update: update["version"]),
    )


# -- showing it ----------------------------------------------------------------------------------------


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def comparison_rows(report: ExperimentReport) -> list[tuple[str, str, str, str]]:
    """(measure, original, experiment, change) rows of the report's main table."""
    original, experiment = report.original, report.experiment
    rows = []
    counted = [("trajectories", original.trajectories, experiment.trajectories)]
    counted += [(f"  {status}", original.statuses[status], experiment.statuses[status]) for status in STATUSES]
    counted += [
        ("  sampled", original.sampled, experiment.sampled),
        ("  selected", original.selected, experiment.selected),
        ("samples", original.samples, experiment.samples),
    ]
    for measure, before, after in counted:
        rows.append((measure, str(before), str(after), f"{after - before:+d}" if after != before else ""))
    before_mean, after_mean = original.reward_mean, experiment.reward_mean
    change = "" if before_mean is None or after_mean is None else f"{after_mean - before_mean:+.3f}"
    rows.append(("final reward, mean", _number(before_mean), _number(after_mean), change))
    for index, quantile in enumerate(("p10", "p50", "p90")):
        before_q = original.reward_quantiles[index] if original.reward_quantiles else None
        after_q = experiment.reward_quantiles[index] if experiment.reward_quantiles else None
        rows.append((f"final reward, {quantile}", _number(before_q), _number(after_q), ""))
    rows.append(
        ("model versions (samples)", ", ".join(original.model_versions), ", ".join(experiment.model_versions), "")
    )
    return rows


def print_report(report: ExperimentReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    record = report.record
    window = f"{record['source']}, {record['spans']} spans and {record['rewards']} rewards replayed"
    console.print(f"[bold]experiment {report.name}[/bold]: {window}")
    overrides = Table(title="overrides")
    for column in ("parameter", "original", "experiment"):
        overrides.add_column(column)
    for path, value in sorted(record["overrides"].items()):
        overrides.add_row(path, record["original"].get(path, ""), value)
    if record["overrides"]:
        console.print(overrides)
    else:
        console.print("no overrides: the experiment runs the original configuration")
    comparison = Table(title="original window vs experiment")
    for column in ("measure", "original", "experiment", "change"):
        comparison.add_column(column, justify="left" if column == "measure" else "right")
    for row in comparison_rows(report):
        comparison.add_row(*row)
    console.print(comparison)
    changed = {key: count for key, count in report.transitions.items() if key[0] != key[1]}
    if changed:
        transitions = Table(title="what the overrides changed: rollouts by status")
        for column in ("original", "experiment", "rollouts"):
            transitions.add_column(column)
        for (before, after), count in sorted(changed.items()):
            transitions.add_row(before, after, str(count))
        console.print(transitions)
    else:
        console.print("every rollout kept its status")
    if report.trainer_versions:
        shown = ", ".join(f"v{u['version']} (step {u['step']})" for u in report.trainer_versions)
        console.print(f"trainer versions published on the experiment's samples: {shown}")


def plot_experiment(report: ExperimentReport, directory: Path) -> tuple[Path, Path]:
    """Statuses side by side and the final reward distributions, as ``experiment_<name>.png`` and an HTML
    page holding it and the tables."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (statuses, rewards) = plt.subplots(1, 2, figsize=(12, 4.5))
    positions = range(len(STATUSES))
    for offset, (label, side) in enumerate((("original", report.original), ("experiment", report.experiment))):
        statuses.bar(
            [p + (offset - 0.5) * 0.4 for p in positions], [side.statuses[s] for s in STATUSES], 0.4, label=label
        )
        if side.rewards:
            values = list(side.rewards)
            rewards.hist(values, weights=list(side.rewards.values()), bins=20, alpha=0.6, label=label)
    statuses.set_xticks(list(positions), STATUSES)
    statuses.set_title("trajectories by status")
    rewards.set_title("final reward")
    for axis in (statuses, rewards):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.suptitle(f"experiment {report.name}")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    directory.mkdir(parents=True, exist_ok=True)
    png, page = directory / f"experiment_{report.name}.png", directory / f"experiment_{report.name}.html"
    png.write_bytes(buffer.getvalue())

    def table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    record = report.record
    overrides = [(path, record["original"].get(path, ""), value) for path, value in sorted(record["overrides"].items())]
    transitions = [(before, after, count) for (before, after), count in sorted(report.transitions.items())]
    image = base64.b64encode(buffer.getvalue()).decode()
    page.write_text(
        f"<!doctype html><meta charset='utf-8'><title>boltstream experiment {html.escape(report.name)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px}</style>"
        f"<h1>experiment {html.escape(report.name)}</h1>"
        f"<img alt='experiment {html.escape(report.name)}' src='data:image/png;base64,{image}'>"
        "<h2>overrides</h2>"
        + table(("parameter", "original", "experiment"), overrides)
        + "<h2>original window vs experiment</h2>"
        + table(("measure", "original", "experiment", "change"), comparison_rows(report))
        + "<h2>rollouts by status: original → experiment</h2>"
        + table(("original", "experiment", "rollouts"), transitions)
        + "\n"
    )
    return png, page


def experiment_command(args: argparse.Namespace, settings: Settings) -> int:
    """``boltstream report experiment NAME [--plot] [--output DIR]``."""
    from clickhouse_connect.driver.exceptions import ClickHouseError

    if not args.experiment:
        print("boltstream report experiment: name the experiment (its replay's --name)", file=sys.stderr)
        return 2
    client = analytics.read_client(settings)
    try:
        report = experiment_report(client, settings, args.experiment)
    except (ReplayError, ClickHouseError) as exc:
        print(f"boltstream report experiment: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print_report(report)
    if args.plot:
        directory = Path(args.output) if args.output else Path(settings.home) / "reports"
        png, page = plot_experiment(report, directory)
        print(f"plot: {png}", file=sys.stderr)
        print(f"page: {page}", file=sys.stderr)
    return 0


def report_arguments(parser: argparse.ArgumentParser) -> None:
    analytics.report_arguments(parser)


def report_command(args: argparse.Namespace, settings: Settings) -> int:
    """``boltstream report``: ``report experiment NAME`` compares an experiment here; every named report of
    the archive is :func:`analytics.report_command`'s (the replay package builds on analytics, not back)."""
    if args.name == "experiment":
        return experiment_command(args, settings)
    return analytics.report_command(args, settings)
