"""The ``boltstream replay`` command: its options, parsing times, speeds, offsets and overrides, choosing the
source, recording the experiment, and printing how to run it on the replay topic set it filled."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from boltstream.infra.common.config import ConfigError, Settings
from boltstream.stream_processors.replay.experiment import (
    apply_overrides,
    current_values,
    experiment_record,
    parse_overrides,
    publish_experiment,
)
from boltstream.stream_processors.replay.publish import replay
from boltstream.stream_processors.replay.sources import ArchiveSource, KafkaSource, ReplayError, Selection
from boltstream.stream_processors.replay.topic_set import replay_settings, write_replay_config


def parse_time_us(text: str) -> int:
    """Microseconds since the epoch from ISO 8601 (``2026-11-25T08:00``, UTC unless it names a zone) or
    epoch seconds."""
    try:
        return int(float(text) * 1e6)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"not a time: {text!r} (use ISO 8601, e.g. 2026-11-25T08:00, or epoch seconds)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # naive means UTC
    return int(moment.timestamp() * 1e6)


def parse_speed(text: str) -> float | None:
    if text == "max":
        return None
    try:
        speed = float(text.removesuffix("x"))
    except ValueError:
        raise ConfigError(f"--speed: {text!r} is neither a number nor 'max'") from None
    if speed <= 0:
        raise ConfigError(f"--speed must be positive, not {text}")
    return speed


def _kafka_offset(text: str) -> tuple[tuple[str, int], int]:
    topic, _, rest = text.rpartition(":")
    topic, _, partition = topic.rpartition(":")
    try:
        return (topic, int(partition)), int(rest)
    except ValueError:
        raise ConfigError(f"--kafka-offset {text!r}: use TOPIC:PARTITION:OFFSET") from None


def replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="", help="replay topic set replay.<name>.* (default: replay-<UTC time>)")
    parser.add_argument(
        "--source", choices=("clickhouse", "kafka"), default="clickhouse", help="archive (SQL) or source topics"
    )
    parser.add_argument("--since", help="start: ISO 8601 time (UTC) or epoch seconds")
    parser.add_argument("--until", help="end (exclusive): ISO 8601 time (UTC) or epoch seconds")
    parser.add_argument("--agent", action="append", default=[], help="agent name (repeatable; archive)")
    parser.add_argument("--model-version", action="append", default=[], help="model version used (repeatable)")
    parser.add_argument("--rollout", action="append", default=[], help="rollout id (repeatable)")
    parser.add_argument("--rollouts-file", help="file of rollout ids, one per line")
    parser.add_argument("--where", default="", help="extra SQL condition on rows of the spans view (archive)")
    parser.add_argument(
        "--kafka-offset", action="append", default=[], help="TOPIC:PARTITION:OFFSET to start from (Kafka; repeatable)"
    )
    parser.add_argument("--speed", default="1", help="1 = original pacing, N = N× faster, max = no pacing")
    parser.add_argument("--batch-spans", type=int, default=500, help="most spans per re-built SpanBatch (archive)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="SECTION.FIELD=VALUE",
        help="configuration of the experiment's workers, e.g. stream.reward_timeout=5 (repeatable; recorded)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def replay_command(args: argparse.Namespace, settings: Settings) -> int:
    name = args.name or datetime.now(UTC).strftime("replay-%Y%m%d-%H%M%S")
    since = parse_time_us(args.since) if args.since else None
    until = parse_time_us(args.until) if args.until else None
    rollouts = list(args.rollout)
    if args.rollouts_file:
        rollouts += [line.strip() for line in Path(args.rollouts_file).read_text().splitlines() if line.strip()]
    speed = parse_speed(args.speed)
    overrides = parse_overrides(args.overrides, settings)
    apply_overrides(settings, overrides)  # refused now, before anything is sent
    client = None
    if args.source == "clickhouse":
        if args.kafka_offset:
            raise ConfigError("--kafka-offset needs --source kafka")
        from boltstream.stream_processors.analytics import read_client

        client = read_client(settings)
        selection = Selection(since, until, tuple(args.agent), tuple(args.model_version), tuple(rollouts), args.where)
        source: ArchiveSource | KafkaSource = ArchiveSource(client, selection, args.batch_spans)
    else:
        if args.agent or args.model_version or args.where:
            raise ConfigError("--agent, --model-version and --where select from the archive (--source clickhouse)")
        offsets = dict(_kafka_offset(text) for text in args.kafka_offset)
        source = KafkaSource(settings, since_us=since, until_us=until, offsets=offsets, rollouts=tuple(rollouts))
    from clickhouse_connect.driver.exceptions import ClickHouseError

    target = replay_settings(settings, name).topics
    origin = "the archive" if args.source == "clickhouse" else f"{settings.topics.spans} and {settings.topics.rewards}"
    pace = "as fast as the broker takes them" if speed is None else f"at {speed:g}× the original pace"
    print(f"boltstream replay: spans and rewards from {origin} into {target.spans} and {target.rewards}, {pace}")
    print("  Ctrl-C stops it: what was sent stays in those topics, and a new replay needs another --name", flush=True)
    started_at_us = int(time.time() * 1e6)
    try:
        result = replay(settings, name, source, speed=speed, progress=not args.quiet)
        counts = {"spans": result.spans, "rewards": result.rewards, "messages": result.messages}
        original = current_values(settings, overrides)
        record = experiment_record(
            name,
            source,
            speed=speed,
            overrides=overrides,
            original=original,
            counts=counts,
            started_at_us=started_at_us,
        )
        publish_experiment(settings, record)
    except (ReplayError, ClickHouseError) as exc:
        print(f"boltstream replay: {exc}", file=sys.stderr)
        return 1
    finally:
        if client is not None:
            client.close()
    config = write_replay_config(apply_overrides(result.settings, overrides), name)
    print(
        f"replayed {result.spans} spans and {result.rewards} rewards in {result.messages} messages "
        f"({result.seconds:.1f} s) into {result.settings.topics.spans}, {result.settings.topics.rewards}"
    )
    print(f"replay settings: {config}")
    for path, value in overrides.items():
        print(f"  {path} = {value} (was {original[path]})")
    print(f"run the experiment on it: BOLTSTREAM_CONFIG={config} boltstream join (and boltstream train)")
    print(f"then compare it with the original traffic: boltstream report experiment {name}")
    return 0
