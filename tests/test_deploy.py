"""The deployment files (infra/deploy) stay true to the code: they cannot run here (no Docker engine, no
cluster), so they are parsed and every boltstream command and ``BOLTSTREAM_*`` variable is checked
against ``boltstream.infra.cli.COMMANDS`` and ``boltstream.infra.common.config.Settings``.

They also leak nothing and let nobody in: no password or token is written in them (secrets come from
compose secrets and Kubernetes Secrets, as files), and the host publishes ports on loopback only."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from boltstream.infra.cli import COMMANDS, build_parser
from boltstream.infra.common.config import ENV_PREFIX, ConfigError, TopicConfig, load_settings, secret_fields

DEPLOY = Path(__file__).resolve().parent.parent / "infra" / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
#: Variables named like a secret; their ``*_FILE`` siblings hold a path, not the secret.
SECRET_NAME = re.compile(r"(^|_)(PASSWORD|TOKEN|SECRET|API_KEY|HMAC_KEY|SIGNING_KEY)(_|$)", re.IGNORECASE)


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


def check_no_plain_secrets(env: dict[str, str]) -> None:
    """No secret as a plain environment value: neither a variable named like one (or setting a secret field
    of Settings) nor a URL with a password in it. Secrets come as files (``*_FILE``) or Secret references."""
    settings_secrets = {f"{ENV_PREFIX}{section.upper()}__{name.upper()}" for section, name in secret_fields()}
    for name, value in env.items():
        if name in settings_secrets or (SECRET_NAME.search(name) and not name.endswith("_FILE")):
            raise AssertionError(f"{name} is a secret passed as a plain environment value: use a file or a Secret")
        if urlsplit(str(value)).password:
            raise AssertionError(f"{name} holds a URL with a password: give the password as a file")


def check_published_on_loopback(port: str | dict[str, Any]) -> None:
    """A compose port the host publishes on 127.0.0.1 only (``127.0.0.1:8400:8400`` or ``host_ip``)."""
    if isinstance(port, dict):
        host_ip = port.get("host_ip")
    else:
        parts = str(port).rsplit(":", 2)
        host_ip = parts[0] if len(parts) == 3 else None
    assert host_ip == "127.0.0.1", f"port {port!r} is published on every interface: publish it as 127.0.0.1:..."


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


def container_env(container: dict[str, Any], *, literal_only: bool = False) -> dict[str, str]:
    """The container's environment as Kubernetes builds it: envFrom ConfigMaps first, then env. Secrets are
    created outside these files (01-config.yaml), so what they hold is not known here. ``literal_only``
    leaves out values resolved at run time (a Secret's key, the pod name)."""
    config_maps = kinds("ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            assert name in config_maps, f"no ConfigMap {name}"
            env.update(config_maps[name]["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif not literal_only:
            # A value resolved at run time (fieldRef: the pod name) is a string the field must accept.
            env[item["name"]] = "value-at-run-time"
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
    assert settings.archive_url == settings.clickhouse.read_url == "http://clickhouse:8123"
    assert settings.clickhouse.password_file == settings.clickhouse.read_password_file


def test_compose_keeps_secrets_out_of_its_file_and_publishes_on_loopback_only() -> None:
    document = yaml.safe_load(COMPOSE.read_text())
    declared = document.get("secrets", {})
    for name, secret in declared.items():
        assert set(secret) <= {"file", "environment", "external"}, f"secret {name} must come from a file or outside"
    for service_name, service in document["services"].items():
        check_no_plain_secrets(service.get("environment", {}))
        for port in service.get("ports", []):
            check_published_on_loopback(port)
        mounted = set(service.get("secrets", []))
        for name, value in service.get("environment", {}).items():
            if name.endswith("_FILE") and str(value).startswith("/run/secrets/"):
                secret = str(value).removeprefix("/run/secrets/")
                assert secret in declared, f"{service_name}: {name} names an undeclared secret {secret}"
        # Whoever talks to ClickHouse mounts its password, whoever signs or verifies model updates the
        # signing key; the others do without.
        if service_name in ("archive", "tools", "clickhouse"):
            assert "clickhouse_password" in mounted, service_name
        elif service_name in ("trainer", "serve"):
            assert mounted == {"model-signing-key"}, service_name
        elif "boltstream" in service.get("image", ""):
            assert not mounted, f"{service_name} needs no secret"


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


def test_kubernetes_manifests_hold_no_secret_and_open_no_host_port() -> None:
    assert not kinds("Secret"), "Secrets are created outside the manifests (01-config.yaml says how)"
    for config_map in kinds("ConfigMap").values():
        check_no_plain_secrets(config_map["data"])
    for name, spec in pod_specs():
        assert not spec.get("hostNetwork"), name
        for container in spec["containers"]:
            check_no_plain_secrets(container_env(container, literal_only=True))
            assert not [port for port in container.get("ports", []) if "hostPort" in port], name
    for name, service in kinds("Service").items():
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", f"Service {name} is reachable from outside"


def test_every_kubernetes_pod_mounts_the_secret_files_its_settings_name() -> None:
    for name, spec in pod_specs():
        secrets = {v["name"]: v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        for container in spec["containers"]:
            env = container_env(container)
            mounted = {
                mount["mountPath"]: secrets[mount["name"]]
                for mount in container.get("volumeMounts", [])
                if mount["name"] in secrets
            }
            # Every pod talks to Kafka: its password and CA are files of the Kafka Secret.
            wanted = ["BOLTSTREAM_KAFKA__SASL_PASSWORD_FILE", "BOLTSTREAM_KAFKA__SSL_CA_LOCATION"]
            if container.get("command", [])[:2] == ["boltstream", "archive"]:
                wanted += ["BOLTSTREAM_CLICKHOUSE__PASSWORD_FILE", "BOLTSTREAM_CLICKHOUSE__CA_CERT"]
            for variable in wanted:
                assert variable in env, f"{name}: {variable} is not set"
                directory = str(Path(env[variable]).parent)
                assert directory in mounted, f"{name}: {variable} ({env[variable]}) is not in a mounted Secret"


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
    with pytest.raises(AssertionError, match="CLICKHOUSE_PASSWORD is a secret"):
        check_no_plain_secrets({"CLICKHOUSE_PASSWORD": "boltstream"})
    with pytest.raises(AssertionError, match="BOLTSTREAM_KAFKA__SASL_PASSWORD is a secret"):
        check_no_plain_secrets({"BOLTSTREAM_KAFKA__SASL_PASSWORD": "hunter2"})
    with pytest.raises(AssertionError, match="URL with a password"):
        check_no_plain_secrets({"BOLTSTREAM_CLICKHOUSE__URL": "http://boltstream:boltstream@clickhouse:8123"})
    check_no_plain_secrets({"BOLTSTREAM_CLICKHOUSE__PASSWORD_FILE": "/run/secrets/clickhouse_password"})
    for port in ("8123:8123", "0.0.0.0:8123:8123", "8123", {"target": 8123, "published": 8123}):
        with pytest.raises(AssertionError, match="every interface"):
            check_published_on_loopback(port)
    check_published_on_loopback({"target": 8123, "published": 8123, "host_ip": "127.0.0.1"})
