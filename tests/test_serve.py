"""``boltstream serve`` pieces that need no vLLM engine: the ports it binds, where a replica starts from, and
what ``status`` shows (served version per replica and the canary state, read back from the real broker)."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer
from rich.console import Console

from boltstream.infra.common.config import ServeConfig, Settings, load_settings
from boltstream.infra.common.ports import port_in_use
from boltstream.infra.common.topics import ensure_topics
from boltstream.infra.serving.serve import PortInUse, serving_port, serving_status, starting_point
from boltstream.infra.stack.status import print_serving
from boltstream.schemas.codec import codec
from tests.test_canary import decision, served


@contextlib.contextmanager
def listening_on(port: int = 0) -> Iterator[int]:
    """Something listening on loopback ``port`` (0: a free one) while the block runs; yields the port."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
            port = sock.getsockname()[1]
        except OSError:  # a fixed port someone else listens on is just as taken
            assert port != 0 and port_in_use(port)
        yield port


def test_taken_default_ports_give_way_to_free_ones(tmp_path: Path) -> None:
    settings = load_settings(environ={"BOLTSTREAM_HOME": str(tmp_path)})
    defaults = ServeConfig()
    with listening_on(defaults.vllm_port), listening_on(defaults.router_port):
        vllm = serving_port(settings, "vllm_port", None)
        router = serving_port(settings, "router_port", None, avoid=vllm)
    assert len({vllm, router, defaults.vllm_port, defaults.router_port}) == 4
    assert not port_in_use(vllm) and not port_in_use(router)
    # --port at the router's default: the router's default gives way even though nothing listens there yet.
    assert serving_port(settings, "router_port", None, avoid=defaults.router_port) != defaults.router_port


def test_ports_the_user_chose_are_kept_or_refused(tmp_path: Path) -> None:
    with listening_on() as taken:
        configured = load_settings(environ={"BOLTSTREAM_HOME": str(tmp_path)}, serve={"vllm_port": taken})
        with pytest.raises(PortInUse, match=f"port {taken} \\(serve.vllm_port in the configuration\\)"):
            serving_port(configured, "vllm_port", None)
        with pytest.raises(PortInUse, match=f"port {taken} \\(--router-port\\) on 127.0.0.1 is already in use"):
            serving_port(configured, "router_port", taken)
        with pytest.raises(PortInUse, match="--router-port"):  # the port just picked for vLLM
            serving_port(configured, "router_port", 9999, avoid=9999)
    with listening_on() as free:
        pass
    assert serving_port(configured, "vllm_port", free) == free
    assert serving_port(configured, "vllm_port", 0) not in (0, taken)


def test_a_router_on_every_interface_is_reached_on_loopback(settings: Settings) -> None:
    """``serve.router_host`` 0.0.0.0 (a container's published port, a pod's Service): the router listens on
    every interface, and its own process (the canary analyzer) reaches it on loopback."""
    import httpx

    from boltstream.infra.serving.router import RouterProcess

    ensure_topics(settings)
    router = RouterProcess(
        settings, {"replica-a": "http://127.0.0.1:9"}, upstream_key="a-replica-key", host="0.0.0.0"
    ).start()
    try:
        assert router.url == f"http://127.0.0.1:{router.port}"
        assert httpx.get(f"{router.url}/health", timeout=5).text == "ok"
        # 127.0.0.2 is this machine too, but a socket bound to 127.0.0.1 alone does not answer there.
        assert httpx.get(f"http://127.0.0.2:{router.port}/health", timeout=5).text == "ok"
    finally:
        router.stop()


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
