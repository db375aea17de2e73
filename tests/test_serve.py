"""``boltstream serve`` pieces that need no vLLM engine: where a replica starts from, and what ``status`` shows
(served version per replica and the canary state, read back from the real broker)."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

from confluent_kafka import Producer
from rich.console import Console

from boltstream.infra.common.config import Settings
from boltstream.infra.common.topics import ensure_topics
from boltstream.infra.serving.serve import serving_status, starting_point
from boltstream.infra.stack.status import print_serving
from boltstream.schemas.codec import codec
from tests.test_canary import decision, served


def test_replica_starts_from_the_base_then_from_the_last_full_version(tmp_path: Path) -> None:
    base, serving = tmp_path / "base", tmp_path / "serving"
    base.mkdir()
    assert starting_point(serving, base) == 0
    assert (serving / "current").resolve() == base.resolve()
    # What the sidecar leaves after loading full weights version 3.
    version = serving / "versions" / "v000003"
    version.mkdir(parents=True)
    (version / "config.json").write_text("{}")
    os.replace(_link(serving / ".tmp", version), serving / "current")
    assert starting_point(serving, base) == 3
    assert (serving / "current").resolve() == version.resolve()
    # A link anywhere else (e.g. a removed version) goes back to the base model.
    (version / "config.json").unlink()
    assert starting_point(serving, base) == 0
    assert (serving / "current").resolve() == base.resolve()


def _link(path: Path, target: Path) -> Path:
    path.symlink_to(target.resolve(), target_is_directory=True)
    return path


def test_status_shows_each_replica_and_the_canary(settings: Settings) -> None:
    ensure_topics(settings)
    producer = Producer(settings.kafka.client_config(**{"acks": "all"}))
    records = [
        ("ServedVersion", settings.topics.served_versions, "server_id", served("a", 1)),
        ("ServedVersion", settings.topics.served_versions, "server_id", served("b", 1)),
        (
            "ServedVersion",
            settings.topics.served_versions,
            "server_id",
            {**served("b", 1), "attempted_version": 2, "status": "failed", "error": "sha256"},
        ),
        ("CanaryDecision", settings.topics.canary_decisions, "model", decision("start", 1, 0)),
        ("CanaryDecision", settings.topics.canary_decisions, "model", decision("promote", 1, 0)),
        ("CanaryDecision", settings.topics.canary_decisions, "model", decision("start", 2, 1)),
    ]
    for record_type, topic, key, record in records:
        producer.produce(topic, key=record[key].encode(), value=codec(record_type).encode(record))
    assert producer.flush(10) == 0
    time.sleep(0.2)

    status = serving_status(settings)
    replicas = status["replicas"]
    assert {s: (r["version"], r["status"]) for s, r in replicas.items()} == {"a": (1, "serving"), "b": (1, "failed")}
    assert replicas["b"]["attempted_version"] == 2 and replicas["b"]["error"] == "sha256"
    canary = status["canary"]
    assert (canary["stable"], canary["canary"], canary["last_decision"]["action"]) == (1, 2, "start")

    output = io.StringIO()
    print_serving(Console(file=output, width=200), status)
    text = output.getvalue()
    assert "stable version 1, canary version 2" in text and "failed v2" in text
