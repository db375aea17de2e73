"""The deployment files (infra/deploy) stay true to the code: they cannot run here (no Docker engine, no
cluster), so they are parsed and every boltstream command and ``BOLTSTREAM_*`` variable is checked
against ``boltstream.infra.cli.COMMANDS`` and ``boltstream.infra.common.config.Settings``."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from boltstream.infra.cli import COMMANDS, build_parser
from boltstream.infra.common.config import ConfigError, TopicConfig, load_settings

DEPLOY = Path(__file__).resolve().parent.parent / "infra" / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))


def check_command(command: list[str]) -> None:
    """A boltstream subcommand whose arguments its own parser accepts, or ``python -m <importable module>``."""
    if command[:2] == ["python", "-m"]:
        assert importlib.util.find_spec(command[2]) is not None, f"no module {command[2]}"
        return
    assert command[0] == "boltstream", f"not a boltstream command: {command}"
    assert command[1] in COMMANDS, f"boltstream has no command {command[1]!r}"
    try:
        build_parser(command[1]).parse_args(command[1:])
    except SystemExit as exc:
        raise AssertionError(f"boltstream rejects the arguments of {command}") from exc


def check_environment(env: dict[str, str]) -> None:
    """Every BOLTSTREAM_* variable names a real Settings field, with a value the field accepts."""
    boltstream = {k: str(v) for k, v in env.items() if k.startswith("BOLTSTREAM_")}
    assert "BOLTSTREAM_CONFIG" not in boltstream, "the deployments configure by environment only"
    load_settings(environ=boltstream)  # raises ConfigError naming an unknown field or a bad value


def compose_services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def manifests() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def kinds(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in manifests() if doc["kind"] == kind}


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (name, doc["spec"]["template"]["spec"]) for kind in ("Deployment", "Job") for name, doc in kinds(kind).items()
    ]


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as Kubernetes builds it: envFrom sources first, then env."""
    config_maps, secrets = kinds("ConfigMap"), kinds("Secret")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            assert name in config_maps, f"no ConfigMap {name}"
            env.update(config_maps[name]["data"])
        else:
            name = source["secretRef"]["name"]
            assert name in secrets, f"no Secret {name}"
            env.update(secrets[name]["stringData"])
    for item in container.get("env", []):
        # A value resolved at run time (fieldRef: the pod name) is a string the field must accept.
        env[item["name"]] = item.get("value", "pod-name-at-run-time")
    return env


def test_every_compose_service_runs_a_real_command_with_real_settings() -> None:
    services = compose_services()
    assert {"kafka", "clickhouse", "archive", "join", "trainer", "serve"} <= set(services)
    checked = 0
    for service in services.values():
        if "boltstream" not in service.get("image", ""):
            continue
        check_command(service["command"])
        check_environment(service["environment"])
        checked += 1
    assert checked >= 5
    assert services["archive"]["command"][:2] == ["boltstream", "archive"]
    assert (
        "KRaft" in COMPOSE.read_text()
        and services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    )


def test_compose_archive_writes_to_the_server_and_readers_read_it() -> None:
    env = compose_services()["archive"]["environment"]
    settings = load_settings(environ={k: v for k, v in env.items() if k.startswith("BOLTSTREAM_")})
    assert settings.archive_url.startswith("http://") and "@clickhouse:8123" in settings.archive_url
    assert settings.clickhouse.read_url.startswith("http://")


def test_every_kubernetes_container_runs_a_real_command_with_real_settings() -> None:
    checked = 0
    for _, spec in pod_specs():
        for container in spec["containers"]:
            env = container_env(container)
            check_environment(env)
            if "boltstream" in container["image"]:
                check_command(container["command"] + container.get("args", []))
                checked += 1
    assert checked >= 5


def test_kubernetes_objects_fit_together() -> None:
    claims = kinds("PersistentVolumeClaim")
    deployments = kinds("Deployment")
    for name, spec in pod_specs():
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, name
        mounted = {v["name"] for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            assert {m["name"] for m in container.get("volumeMounts", [])} <= mounted, name
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
    for name, service in kinds("Service").items():
        selector = service["spec"]["selector"].items()
        assert any(selector <= d["spec"]["template"]["metadata"]["labels"].items() for d in deployments.values()), name
    # One canary analyzer per model: every serving Deployment but one runs with --no-canary.
    commands = {name: d["spec"]["template"]["spec"]["containers"][0]["command"] for name, d in deployments.items()}
    serving = [name for name, command in commands.items() if command[1] == "serve"]
    analyzers = [name for name in serving if "--no-canary" not in commands[name]]
    assert len(analyzers) == 1 and deployments[analyzers[0]]["spec"]["replicas"] == 1


@pytest.mark.parametrize("script", ["compose", "kubernetes"])
def test_topic_scripts_create_the_configured_topics(script: str) -> None:
    text = COMPOSE.read_text() if script == "compose" else (DEPLOY / "k8s" / "02-topics.yaml").read_text()
    topics = TopicConfig()
    created = set(re.findall(r"boltstream\.[a-z-]+\.v1", text))
    assert created == set(topics.all())
    compacted_line = next(line for line in text.splitlines() if "model-updates" in line and "for topic" in line)
    assert set(re.findall(r"boltstream\.[a-z-]+\.v1", compacted_line)) == set(topics.compacted())


def test_the_checks_fail_on_what_they_guard_against() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        check_environment({"BOLTSTREAM_STREAM__REWARD_TIMEOUTS": "30s"})
    with pytest.raises(ConfigError):
        check_environment({"BOLTSTREAM_STREAM__REWARD_TIMEOUT": "soon"})
    with pytest.raises(AssertionError, match="no command"):
        check_command(["boltstream", "archiver"])
    with pytest.raises(AssertionError, match="rejects"):
        check_command(["boltstream", "join", "--metrics-port", "not-a-port"])
    with pytest.raises(AssertionError, match="no module"):
        check_command(["python", "-m", "stream_processors.nothing_here"])
