"""The ``boltstream up``, ``status`` and ``down`` commands: their options, and what they print."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from boltstream.infra.common.config import Settings
from boltstream.infra.stack.broker import BrokerError
from boltstream.infra.stack.errors import StackError, StackRunningError
from boltstream.infra.stack.lifecycle import force_stop, start_stack, stop_stack
from boltstream.infra.stack.snapshot import restored_snapshot_dir, snapshot_dir
from boltstream.infra.stack.state import read_state
from boltstream.infra.stack.status import print_status, redacted, stack_status


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def up_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=_port, default=0, help="broker port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--read-port", type=_port, help="port of the archive's read endpoint (default: a free one)")
    parser.add_argument("--partitions", type=_positive_int, help="partitions of the event topics (default: config)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the workers to be ready")


def up_command(args: argparse.Namespace, settings: Settings) -> int:
    if args.partitions:
        settings = replace(settings, topics=replace(settings.topics, partitions=args.partitions))
    if args.read_port is not None:
        settings = replace(settings, clickhouse=replace(settings.clickhouse, read_port=args.read_port))
    try:
        state = start_stack(settings, port=args.port, timeout=args.timeout)
    except StackRunningError as running:
        print(f"boltstream is already running under {settings.home}: {running.state.describe()}")
        if not all(running.state.alive().values()):
            supervised = running.state.supervisor is not None and running.state.supervisor.alive()
            print(
                "part of it has exited: the supervisor restarts it (`boltstream status` shows it)"
                if supervised
                else "part of it has exited: `boltstream down` then `boltstream up` restarts it"
            )
        return 0
    except (BrokerError, StackError) as exc:
        print(f"boltstream up: {exc}", file=sys.stderr)
        return 1
    print(f"boltstream is up under {state.home}")
    print(f"  broker   {state.bootstrap_servers} (pid {state.broker.pid}), log {state.broker.log}")
    print(f"  topics   {', '.join(f'{name} ({n})' for name, n in state.topics.items())}")
    print(f"           with what the last `boltstream down` kept ({restored_snapshot_dir(settings)}), if anything")
    for name, record in state.workers.items():
        print(f"  {name:<8} pid {record.pid}, log {record.log}")
    print(f"  data     {state.data_dir or redacted(settings.archive_url)} (the archive)")
    print(f"  signing  model updates are signed and verified with the key in {settings.signing_key_path}")
    if state.clickhouse_read_url:
        print(f"  reads    {redacted(state.clickhouse_read_url)} (token in {settings.state_file})")
    print("see it with `boltstream status`, query it with `boltstream sql`, stop it with `boltstream down`")
    return 0


def status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the status as JSON")


def status_command(args: argparse.Namespace, settings: Settings) -> int:
    try:
        report = stack_status(settings)
    except StackError as exc:
        print(f"boltstream status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_status(report)
    return 0 if report["healthy"] else 1


def down_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait after SIGTERM before SIGKILL")
    parser.add_argument(
        "--force",
        action="store_true",
        help="stop every process this home's stack started even if its state file is damaged, and remove it",
    )


def down_command(args: argparse.Namespace, settings: Settings) -> int:
    if args.force:
        try:
            stopped = force_stop(settings, timeout=args.timeout)
        except StackError as exc:
            print(f"boltstream down: {exc}", file=sys.stderr)
            return 1
        pids = ", ".join(str(record.pid) for record in stopped) or "none was running"
        print(f"stopped every process of the stack under {settings.home} (pids: {pids}); its state files are removed")
        return 0
    try:
        previous = read_state(settings)
        was_running = previous is not None and previous.running()
        stopped = stop_stack(settings, timeout=args.timeout)
    except StackError as exc:
        print(f"boltstream down: {exc}", file=sys.stderr)
        return 1
    if stopped is None:
        print("nothing running")
    elif not was_running:
        print(f"nothing running (removed the stale state file {settings.state_file})")
    else:
        print(f"stopped {stopped.describe(show_dead=False)}")
        kept = f"the archive in {stopped.data_dir}, " if stopped.data_dir else ""
        print(
            f"the broker's topics and consumer offsets are in {snapshot_dir(settings)} for the next `boltstream up`; "
            f"{kept}the logs in {settings.home / 'logs'} stay"
        )
    return 0
