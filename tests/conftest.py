"""Session-scoped real services for the tests: the embedded broker (Tansu) and its topics.

Every test run starts its own broker on a free loopback port and a fresh BOLTSTREAM_HOME in a
temporary directory, and tears both down at the end.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.broker import EmbeddedBroker
from infra.config import Settings, load_settings


@pytest.fixture(scope="session")
def boltstream_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("boltstream-home")
    previous = os.environ.get("BOLTSTREAM_HOME")
    os.environ["BOLTSTREAM_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("BOLTSTREAM_HOME", None)
    else:
        os.environ["BOLTSTREAM_HOME"] = previous


@pytest.fixture(scope="session")
def broker(boltstream_home: Path) -> Iterator[EmbeddedBroker]:
    """A real Tansu broker for the whole session."""
    running = EmbeddedBroker(log_path=boltstream_home / "broker.log").start()
    yield running
    running.stop()


@pytest.fixture
def settings(broker: EmbeddedBroker, tmp_path: Path) -> Settings:
    """Settings pointing at the session broker, with topic names unique to the test (no cross-talk)."""
    suffix = uuid.uuid4().hex[:8]
    names = {
        name: f"t{suffix}.{name}"
        for name in (
            "spans",
            "rewards",
            "trajectories",
            "samples",
            "dlq",
            "model_updates",
            "prompt_updates",
            "served_versions",
        )
    }
    return load_settings(
        environ={"BOLTSTREAM_HOME": str(tmp_path)},
        kafka={"bootstrap_servers": broker.bootstrap_servers},
        topics=names,
    )
