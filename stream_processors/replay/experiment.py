"""An experiment: a replay together with the configuration its workers run with, recorded for reports.

``boltstream replay --set stream.reward_timeout=5 ...`` applies each ``section.field=value`` to the
replay's settings (checked and typed like the config file; the file ``<home>/replays/<name>.toml`` the
join and trainer of the experiment start from holds them), and when the replay ends publishes an
``Experiment`` record (window, filters, overrides with their original values, counts) on
``topics.experiments``. The archive stores it in the ``experiments`` table, and the experiment's
trajectories and samples (``replay.<name>.trajectories`` / ``.samples``) in ``experiment_trajectories``
and ``experiment_samples``, where :mod:`.report` compares them with the original window.
"""

from __future__ import annotations

import time
from dataclasses import fields, is_dataclass
from typing import Any

from boltstream.infra.common.config import ConfigError, Settings, with_values
from boltstream.schemas.codec import codec
from boltstream.stream_processors.replay.sources import ArchiveSource, KafkaSource, ReplayError

#: Sections an experiment may not change: the replay topic set names the topics, and the experiment
#: reads and writes through the same broker and archive as the original.
FIXED_SECTIONS = frozenset({"topics", "kafka", "clickhouse"})


def parse_overrides(assignments: list[str], settings: Settings) -> dict[str, str]:
    """``["stream.reward_timeout=5", ...]`` as ``{"stream.reward_timeout": "5"}``, each naming a real field."""
    overrides = {}
    for assignment in assignments:
        path, equals, value = assignment.partition("=")
        section, dot, field = path.strip().partition(".")
        if not (equals and dot and section and field):
            raise ConfigError(f"--set {assignment!r}: use SECTION.FIELD=VALUE, e.g. stream.reward_timeout=5")
        if section in FIXED_SECTIONS:
            raise ConfigError(f"--set {path}: an experiment keeps the {section} settings of the original")
        table = getattr(settings, section, None)
        if not is_dataclass(table) or field not in {f.name for f in fields(table)}:
            raise ConfigError(f"--set {path}: no such parameter")
        overrides[f"{section}.{field}"] = value.strip()
    return overrides


def apply_overrides(settings: Settings, overrides: dict[str, str]) -> Settings:
    """``settings`` with the overrides applied, typed and checked as in the config file."""
    values: dict[str, dict[str, str]] = {}
    for path, value in overrides.items():
        section, _, field = path.partition(".")
        values.setdefault(section, {})[field] = value
    return with_values(settings, values, "--set")


def current_values(settings: Settings, overrides: dict[str, str]) -> dict[str, str]:
    """The values ``settings`` hold for the overridden fields, as text."""
    shown = {}
    for path in overrides:
        section, _, field = path.partition(".")
        shown[path] = str(getattr(getattr(settings, section), field))
    return shown


def experiment_record(
    name: str,
    source: ArchiveSource | KafkaSource,
    *,
    speed: float | None,
    overrides: dict[str, str],
    original: dict[str, str],
    counts: dict[str, int],
    started_at_us: int,
) -> dict[str, Any]:
    """The ``Experiment`` record of a finished replay."""
    record: dict[str, Any] = {
        "name": name,
        "speed": speed,
        "overrides": overrides,
        "original": original,
        "spans": counts["spans"],
        "rewards": counts["rewards"],
        "messages": counts["messages"],
        "started_at_us": started_at_us,
        "finished_at_us": int(time.time() * 1e6),
    }
    if isinstance(source, ArchiveSource):
        selection = source.selection
        record |= {
            "source": "clickhouse",
            "since_us": selection.since_us,
            "until_us": selection.until_us,
            "agents": list(selection.agents),
            "model_versions": list(selection.model_versions),
            "rollouts": list(selection.rollouts),
            "where": selection.where,
            "kafka_offsets": {},
        }
    else:
        record |= {
            "source": "kafka",
            "since_us": source.since_us,
            "until_us": source.until_us,
            "agents": [],
            "model_versions": [],
            "rollouts": sorted(r.decode() for r in source.rollouts),
            "where": "",
            "kafka_offsets": {f"{topic}:{partition}": offset for (topic, partition), offset in source.offsets.items()},
        }
    return record


def publish_experiment(settings: Settings, record: dict[str, Any]) -> None:
    """Publish ``record`` on ``topics.experiments`` of ``settings`` (the original's, not the replay set's)
    and wait for the broker's acknowledgement."""
    from confluent_kafka import Producer

    failures: list[str] = []

    def delivered(error: Any, _message: Any) -> None:
        if error is not None:
            failures.append(str(error))

    producer = Producer(settings.kafka.client_config(**{"enable.idempotence": True, "acks": "all"}))
    value = codec("Experiment").encode(record)
    producer.produce(settings.topics.experiments, value, record["name"].encode(), on_delivery=delivered)
    if producer.flush(settings.producer.flush_timeout) or failures:
        raise ReplayError(f"the experiment record of {record['name']} was not acknowledged: {failures[:1]}")
