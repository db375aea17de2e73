"""The distribution's shape: one import root in site-packages, and an agent repository whose own packages
have our folders' generic names (schemas, infra, trainer, producers) runs a traced agent from its root."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from boltstream.infra.common.config import Settings
from boltstream.infra.common.topics import ensure_topics
from tests.producer_helpers import consume

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_installs_one_import_root(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "*.so", ".*cache"),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("boltstream-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    # One import root, and the auto-tracing start-up hook beside it (producers/startup.py)
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"boltstream", "boltstream-autotrace.pth"}
    assert (
        zipfile.ZipFile(wheel).read("boltstream-autotrace.pth").decode()
        == (ROOT / "boltstream-autotrace.pth").read_text()
    )
    assert "boltstream/producers/_bootstrap/sitecustomize.py" in names  # what `boltstream run` puts first
    assert "boltstream/schemas/avro/SpanBatch.v2.avsc" in names  # the package data came along
    assert "boltstream/agl/tracer/agentops.py" in names  # Agent Lightning's submodule paths
    assert "boltstream/agl/algorithm/apo.py" in names
    assert any(name.startswith("boltstream/schemas/clickhouse/") for name in names)
    assert any(re.match(r"boltstream/producers/_secret_scan\..*\.so$", name) for name in names)  # the built pre-scan
    assert any(re.match(r"boltstream/producers/_attributes\..*\.so$", name) for name in names)  # attribute values in C
    assert not any(name.startswith("boltstream/tests") for name in names)


AGENT = """\
import infra.config, producers, schemas, trainer  # the agent's own packages, not boltstream's

from boltstream import agl

assert infra.config.OWNER == producers.OWNER == schemas.OWNER == trainer.OWNER == "agent"
with agl.rollout(task_id="shadow-task", agent_name="shadow-agent") as rollout:
    agl.emit_decision("use the calculator")
    agl.emit_tool_call("calculator", {"expr": "2+2"}, "4")
    agl.emit_reward(1.0)
assert agl.flush(), agl.stats()
print(rollout.rollout_id)
"""


def test_an_agent_repository_with_generic_package_names_runs_from_its_root(settings: Settings, tmp_path: Path) -> None:
    ensure_topics(settings)
    agent = tmp_path / "agent-repo"
    for package in ("schemas", "infra", "trainer", "producers"):
        (agent / package).mkdir(parents=True)
        (agent / package / "__init__.py").write_text('OWNER = "agent"\n')
    (agent / "infra" / "config.py").write_text('OWNER = "agent"\n')
    (agent / "agent.py").write_text(AGENT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOLTSTREAM_")}
    env |= {
        "BOLTSTREAM_HOME": str(tmp_path / "home"),
        "BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "BOLTSTREAM_TOPICS__SPANS": settings.topics.spans,
        "BOLTSTREAM_TOPICS__REWARDS": settings.topics.rewards,
    }
    done = subprocess.run([sys.executable, "agent.py"], cwd=agent, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rollout_id = done.stdout.strip()
    spans = consume(
        settings.kafka.bootstrap_servers,
        settings.topics.spans,
        lambda found: {s["kind"] for s in found if s["rollout_id"] == rollout_id} >= {"decision", "tool_call"},
    )
    assert {s["agent_name"] for s in spans if s["rollout_id"] == rollout_id} == {"shadow-agent"}


@pytest.mark.parametrize("module", ["schemas", "producers", "infra", "trainer", "stream_processors"])
def test_no_generic_name_is_importable_outside_the_checkout(module: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = f"import importlib.util, boltstream; assert importlib.util.find_spec({module!r}) is None"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
