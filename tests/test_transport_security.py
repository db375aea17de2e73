"""Authenticated, encrypted transport from the one configuration: every component reaches a Kafka cluster
that requires TLS and SASL, and readers reach ClickHouse over TLS with a login kept out of the URL.

The embedded broker speaks plain TCP, so a TLS terminator (:mod:`tests.tls_terminator`) stands in front
of it and the broker advertises the terminator's address: clients that trust only the test CA produce,
join and read through it. The embedded broker has no usable SASL: it refuses every mechanism. That a
component's clients log in with the configured SASL settings shows in the SaslHandshake each of them
sends through the terminator, naming the configured (non-default) mechanism, before the broker refuses it.
"""

from __future__ import annotations

import ast
import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from confluent_kafka import KafkaError
from confluent_kafka.admin import AdminClient

from boltstream import agl
from boltstream.infra.common.config import Settings
from boltstream.infra.common.ports import free_port
from boltstream.infra.common.topics import ensure_topics
from boltstream.infra.stack.broker import EmbeddedBroker
from tests.join_harness import Collector, JoinProcess, join_settings
from tests.test_layers import modules
from tests.tls_terminator import SASL_HANDSHAKE, Certificates, KafkaRequest, TlsTerminator, make_certificates

#: Not the default mechanism, so a handshake naming it shows the setting travelled.
MECHANISM = "SCRAM-SHA-256"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


@pytest.fixture(scope="module")
def tls_terminator(tmp_path_factory: pytest.TempPathFactory, certificates: Certificates) -> Iterator[TlsTerminator]:
    """An embedded broker reachable only through a TLS terminator, which it advertises as its address."""
    port = free_port()
    log = tmp_path_factory.mktemp("tls-broker") / "broker.log"
    broker = EmbeddedBroker(advertised=f"127.0.0.1:{port}", log_path=log).start()
    terminator = TlsTerminator(("127.0.0.1", broker.port), certificates, port=port).start()
    yield terminator
    terminator.stop()
    broker.stop()


def over_tls(settings: Settings, terminator: TlsTerminator, certificates: Certificates) -> Settings:
    kafka = replace(
        settings.kafka,
        bootstrap_servers=terminator.address,
        security_protocol="SSL",
        ssl_ca_location=str(certificates.ca),
    )
    return replace(settings, kafka=kafka)


def test_the_sdk_produces_and_the_join_consumes_over_tls(settings, tls_terminator, certificates) -> None:
    settings = join_settings(over_tls(settings, tls_terminator, certificates), reward_timeout=2.0)
    ensure_topics(settings)
    join = JoinProcess(settings)  # a subprocess: the TLS settings reach it through its settings file
    trajectories = Collector(settings, settings.topics.trajectories, "Trajectory", "trajectory_id")
    rollout_id = f"tls-{uuid.uuid4().hex[:8]}"
    agl.configure(settings)
    try:
        with agl.rollout(task_id="t-tls", agent_name="tls-agent", rollout_id=rollout_id):
            agl.emit_decision("encrypt everything")
            agl.emit_reward(1.0)
        assert agl.flush(10)
        trajectories.until(1, 90)
    finally:
        agl.shutdown(5)
        trajectories.close()
        join.stop()
    assert [(t["rollout_id"], t["status"], t["final_reward"]) for t in trajectories.records.values()] == [
        (rollout_id, "complete", 1.0)
    ], join.log()
    # Everything went through the terminator: the broker listens on another port, which it never advertised.
    assert {request.client_id for request in tls_terminator.requests} >= {"boltstream-sdk", "rdkafka"}
    assert any(request.client_id.startswith("faust") for request in tls_terminator.requests)


def test_a_client_that_does_not_trust_the_ca_gets_no_connection(settings, tls_terminator, certificates) -> None:
    errors: list[KafkaError] = []
    untrusting = replace(over_tls(settings, tls_terminator, certificates).kafka, ssl_ca_location="")
    admin = AdminClient(untrusting.client_config(error_cb=errors.append, log_level=0))
    deadline = time.monotonic() + 10
    while not errors and time.monotonic() < deadline:
        admin.poll(0.2)  # serves error_cb
    assert any("certificate verify failed" in error.str() for error in errors), errors


# -- every client is built from the configuration -------------------------------------------------------

#: Constructors of Kafka and ClickHouse clients, and the functions of the configuration that make their settings.
CLIENTS = {"Producer", "Consumer", "AdminClient", "App", "get_client"}
CONFIGURATION = {"client_config", "consumer_config", "reader_config", "faust_credentials", "client_arguments"}
#: Clients built from something else, with the reason.
ELSEWHERE = {
    "boltstream.infra.stack.status": "reads the local stack's own read endpoint, from its state file",
}


def unconfigured_clients(source: str) -> list[str]:
    """Each client constructor call in ``source`` whose arguments do not come from the configuration: neither
    a call of one of :data:`CONFIGURATION` nor a name assigned from one."""

    def name_of(call: ast.Call) -> str:
        return call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")

    def configured(node: ast.AST) -> bool:
        return any(isinstance(n, ast.Call) and name_of(n) in CONFIGURATION for n in ast.walk(node))

    tree = ast.parse(source)
    assigned = {
        ast.unparse(target)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and configured(node.value)
        for target in node.targets
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and name_of(node) in CLIENTS:
            arguments = [*node.args, *(keyword.value for keyword in node.keywords)]
            if not any(configured(argument) or ast.unparse(argument) in assigned for argument in arguments):
                found.append(f"line {node.lineno}: {ast.unparse(node)[:100]}")
    return found


def test_every_client_in_the_code_takes_its_settings_from_the_configuration() -> None:
    """What the tests above show for each component holds for every client the code builds, and for the
    next one: a client with settings of its own would not see the security settings."""
    offenders = {
        module: found
        for module, path in modules().items()
        if module not in ELSEWHERE and (found := unconfigured_clients(path.read_text()))
    }
    assert offenders == {}
    assert unconfigured_clients("Producer({'bootstrap.servers': servers})") == [
        "line 1: Producer({'bootstrap.servers': servers})"
    ]
    assert (
        unconfigured_clients(
            "c = kafka.client_config()\nProducer(c)\nfaust.App('j', broker_credentials=k.faust_credentials())"
        )
        == []
    )


# -- SASL: every component's clients log in with the configured mechanism ----------------------------


@pytest.fixture
def sasl_terminator(broker: EmbeddedBroker, certificates: Certificates) -> Iterator[TlsTerminator]:
    """A terminator of this test's own, so every handshake it sees comes from the component under test."""
    terminator = TlsTerminator(("127.0.0.1", broker.port), certificates).start()
    yield terminator
    terminator.stop()


@pytest.fixture
def sasl_settings(settings: Settings, sasl_terminator: TlsTerminator, certificates: Certificates, tmp_path) -> Settings:
    password = tmp_path / "kafka-password"
    password.write_text("not-the-password\n")
    kafka = replace(
        over_tls(settings, sasl_terminator, certificates).kafka,
        security_protocol="SASL_SSL",
        sasl_mechanism=MECHANISM,
        sasl_username="boltstream",
        sasl_password_file=str(password),
        client_overrides={"log_level": "0"},  # the refused logins would flood the test's output
    )
    return replace(settings, kafka=kafka)


def sdk_producer(settings: Settings, _tmp: Path) -> Callable[[], object]:
    from boltstream.producers.span_producer import SpanProducer

    producer = SpanProducer(settings)
    return lambda: producer.close(1)


def archive_worker(settings: Settings, _tmp: Path) -> Callable[[], object]:
    from boltstream.stream_processors.archive import ArchiveWorker

    worker = ArchiveWorker(settings, client=None)  # the ClickHouse side is not under test here
    return worker.consumer.close


def trainer_source(settings: Settings, _tmp: Path) -> Callable[[], object]:
    from boltstream.trainer.source import SampleSource

    source = SampleSource(settings, vocab_size=2, admit=lambda _sample: None, group_size=1, groups_per_step=1)
    return source.consumer.close


def weight_sync_sidecar(settings: Settings, tmp: Path) -> Callable[[], object]:
    from boltstream.infra.serving.vllm_server import VllmServer
    from boltstream.infra.serving.weight_sync import WeightSync

    server = VllmServer(tmp / "model", port=free_port())  # never started: only the Kafka side is under test
    sync = WeightSync(settings, server, server_id="sasl-test", serving_dir=tmp / "serving")
    return sync.consumer.close


def canary_analyzer(settings: Settings, _tmp: Path) -> Callable[[], object]:
    from boltstream.infra.serving.canary import CanaryWorker

    worker = CanaryWorker(settings, router_url="http://127.0.0.1:9")  # reads its decisions first: blocks
    return worker.close


def replay_reader(settings: Settings, _tmp: Path) -> Callable[[], object]:
    from boltstream.stream_processors.replay.sources import KafkaSource

    next(iter(KafkaSource(settings, idle_timeout=1).messages()), None)  # blocks until its reader gives up
    return lambda: None


def topic_admin(settings: Settings, _tmp: Path) -> Callable[[], object]:
    ensure_topics(settings, timeout=1)  # what `up`, `serve` and `replay` create topics with
    return lambda: None


def handshakes(requests: list[KafkaRequest]) -> list[KafkaRequest]:
    return [request for request in requests if request.api_key == SASL_HANDSHAKE]


@pytest.mark.parametrize(
    "component",
    [
        sdk_producer,
        archive_worker,
        trainer_source,
        weight_sync_sidecar,
        canary_analyzer,
        replay_reader,
        topic_admin,
    ],
    ids=lambda component: component.__name__,
)
def test_every_librdkafka_component_logs_in_with_the_configured_sasl(
    component, sasl_settings, sasl_terminator, tmp_path
) -> None:
    """The component runs in a thread: some block on a first read that cannot succeed without a login."""
    closers, failures = [], []

    def open_component() -> None:
        try:
            closers.append(component(sasl_settings, tmp_path))
        except Exception as exc:  # the refused login, once the component gives up; reported if nothing was seen
            failures.append(exc)

    thread = threading.Thread(target=open_component, daemon=True)
    thread.start()
    try:
        seen = sasl_terminator.wait_for(lambda requests: bool(handshakes(requests)) or bool(failures), 20)
    finally:
        thread.join(30)
        for close in closers:
            close()
    assert handshakes(seen), f"{component.__name__} sent no SASL handshake; it failed with {failures}"
    assert {request.sasl_mechanism for request in handshakes(seen)} == {MECHANISM}


def test_the_faust_join_worker_logs_in_with_the_configured_sasl(sasl_settings, sasl_terminator) -> None:
    """Faust turns its app's ``broker_credentials`` into aiokafka settings with its driver's
    ``credentials_to_aiokafka_auth``, for its consumer, producer and topic creation alike; an aiokafka
    client built that way from the join worker's app logs in. (``boltstream join`` itself would stop
    earlier: it creates its topics with librdkafka first, as the ``topic_admin`` case above shows.)"""
    import aiokafka
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from boltstream.stream_processors.join import JoinWorker

    conf = JoinWorker(sasl_settings).app.conf
    credentials = conf.broker_credentials
    assert (credentials.username, credentials.mechanism.value, credentials.protocol.value) == (
        "boltstream",
        MECHANISM,
        "SASL_SSL",
    )
    assert credentials.password == "not-the-password"  # read from the password file, its newline dropped

    async def connect() -> None:
        producer = aiokafka.AIOKafkaProducer(
            bootstrap_servers=sasl_settings.kafka.bootstrap_servers,
            client_id=conf.broker_client_id,
            **credentials_to_aiokafka_auth(credentials, conf.ssl_context),
        )
        try:
            await producer.start()
        finally:
            await producer.stop()

    with pytest.raises(aiokafka.errors.KafkaError):  # the broker refuses the login
        asyncio.run(connect())
    assert {request.sasl_mechanism for request in handshakes(sasl_terminator.requests)} == {MECHANISM}


# -- ClickHouse: readers over TLS, their login from fields ----------------------------------------------


def test_readers_reach_clickhouse_over_tls_with_the_password_from_a_file(settings, archive, certificates, tmp_path):
    from clickhouse_connect.driver.exceptions import OperationalError

    from boltstream.stream_processors.analytics import read_client

    archive.start()
    terminator = TlsTerminator(("127.0.0.1", archive.port), certificates, kafka=False).start()
    password = tmp_path / "reader-password"
    password.write_text(archive.token + "\n")
    clickhouse = replace(
        settings.clickhouse,
        read_url=f"https://127.0.0.1:{terminator.port}",  # no login in the URL: URLs get printed
        read_user="reader",
        read_password_file=str(password),
        ca_cert=str(certificates.ca),
    )
    try:
        client = read_client(replace(settings, clickhouse=clickhouse))
        assert client.command("SELECT 1") == 1
        client.close()
        untrusting = replace(clickhouse, ca_cert="")
        with pytest.raises(OperationalError, match="certificate verify failed"):
            read_client(replace(settings, clickhouse=untrusting))
    finally:
        terminator.stop()
