"""The local stack (`boltstream up` / `status` / `down`) with real broker and worker processes.

Each test runs in its own BOLTSTREAM_HOME and stops whatever it started, even when it fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from boltstream.infra.cli import main
from boltstream.infra.common.config import Settings, load_settings, settings_toml
from boltstream.infra.common.ports import free_port
from boltstream.infra.common.topics import (
    STACK_READY_TOPIC,
    TopicError,
    admin_client,
    ensure_topics,
    partitions_of,
    read_to_end,
    reader_config,
)
from boltstream.infra.stack import lifecycle
from boltstream.infra.stack.errors import StackError, StackRunningError
from boltstream.infra.stack.lifecycle import start_stack, stop_stack
from boltstream.infra.stack.state import read_state
from boltstream.infra.stack.status import TANSU_LAG_NOTE, stack_status
from boltstream.infra.stack.workers import WORKERS, Worker
from boltstream.schemas.codec import codec
from tests.records import make_span_batch
from tests.test_canary import decision, served

#: Real processes in place of the archive worker: one serving HTTP on the read port, one idle.
STAND_INS = {
    "reader": Worker(
        argv=("{python}", "-m", "http.server", "--bind", "127.0.0.1", "{read_port}"),
        ready_url="http://127.0.0.1:{read_port}/",
    ),
    "idle": Worker(argv=("{python}", "-c", "import time; time.sleep(3600)"), settle=0.3),
}


def home_settings(home: Path, **overrides) -> Settings:
    return load_settings(environ={"BOLTSTREAM_HOME": str(home)}, **overrides)


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> dict[str, Worker]:
    monkeypatch.setattr(lifecycle, "WORKERS", STAND_INS)  # where start_stack looks them up
    return STAND_INS


def run_cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    """``boltstream ARGS`` in a child process, as a user would run it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOLTSTREAM_")} | {"BOLTSTREAM_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "boltstream.infra.cli", *args],
        cwd=home.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def command_lines() -> Iterator[tuple[Path, bytes]]:
    """The command line of every process on the machine (as any user can read them)."""
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            yield path, path.read_bytes()
        except OSError:  # the process ended meanwhile
            continue


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_up_twice_says_so_and_starts_one_broker(home, stand_ins, capsys):
    assert main(["up"]) == 0
    first = read_state(home_settings(home))
    assert first is not None and first.running()
    out = capsys.readouterr().out
    assert f"broker   {first.bootstrap_servers} (pid {first.broker.pid}), log {home / 'logs' / 'broker.log'}" in out
    assert f"idle     pid {first.workers['idle'].pid}, log {home / 'logs' / 'idle.log'}" in out
    assert f"data     {home / 'clickhouse'} (the archive)" in out
    assert out.rstrip().endswith("stop it with `boltstream down`")
    # The key the trainer and the serving replicas share: private, named in the output, never shown.
    key_file = home / "model-signing.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert str(key_file) in out and key_file.read_text().strip() not in out

    assert main(["up"]) == 0
    out = capsys.readouterr().out
    assert "already running" in out
    assert first.bootstrap_servers in out and f"pid {first.broker.pid}" in out
    assert read_state(home_settings(home)) == first
    assert (home / "logs" / "broker.log").read_text().count("listening on") == 1


def test_down_with_nothing_running(home, capsys):
    assert main(["down"]) == 0
    assert capsys.readouterr().out.strip() == "nothing running"
    assert main(["status"]) == 1
    assert "nothing running" in capsys.readouterr().out


def test_down_stops_workers_and_broker(home, stand_ins, capsys):
    state = start_stack(home_settings(home))
    records = state.processes().values()
    assert all(record.alive() for record in records)

    assert main(["down"]) == 0
    out = capsys.readouterr().out
    assert f"stopped broker {state.bootstrap_servers} (pid {state.broker.pid}), reader (pid" in out
    assert f"consumer offsets are in {home / 'snapshot'} for the next `boltstream up`" in out
    assert f"the archive in {home / 'clickhouse'}, the logs in {home / 'logs'} stay" in out
    assert not any(record.alive() for record in records)
    assert not listening(state.broker_port)
    assert not (home / "stack.json").exists() and not (home / "stack.toml").exists()


def test_up_after_down_takes_the_same_port_and_gets_the_topics_back(home, stand_ins):
    settings = home_settings(home)
    first = start_stack(settings)
    stack = replace(settings, kafka=replace(settings.kafka, bootstrap_servers=first.bootstrap_servers))
    producer = Producer(stack.kafka.client_config())
    producer.produce(stack.topics.model_updates, b"version 3", b"tiny", headers=[("h", b"1")])
    assert producer.flush(10) == 0
    stop_stack(settings)
    second = start_stack(settings)
    assert second.bootstrap_servers == first.bootstrap_servers and second.cluster_id != first.cluster_id
    consumer = Consumer(reader_config(stack, "test"))
    try:
        messages = list(read_to_end(consumer, partitions_of(consumer, stack.topics.model_updates), idle_timeout=10))
    finally:
        consumer.close()
    assert [(m.key(), m.value(), m.headers()) for m in messages] == [(b"tiny", b"version 3", [("h", b"1")])]
    assert (home / "snapshot.restored").is_dir() and not (home / "snapshot").exists()
    stop_stack(settings)
    with socket.socket() as taken:  # the old port taken: up takes another one
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the old connections' TIME_WAIT
        taken.bind(("127.0.0.1", first.broker_port))
        taken.listen()
        third = start_stack(settings)
    assert third.broker_port != first.broker_port


def test_restart_broker_brings_a_killed_broker_back_on_its_port_with_the_kept_versions(home, stand_ins):
    settings = home_settings(home, stack={"supervise": False})  # restart_broker called here, not by a supervisor
    first = start_stack(settings)
    stack = replace(settings, kafka=replace(settings.kafka, bootstrap_servers=first.bootstrap_servers))
    producer = Producer(stack.kafka.client_config())
    producer.produce(stack.topics.model_updates, b"version 3", b"tiny")
    assert producer.flush(10) == 0
    stop_stack(settings)
    running = start_stack(settings)  # restores the snapshot, keeps it as snapshot.restored
    with pytest.raises(StackError, match="still runs"):
        lifecycle.restart_broker(settings)
    os.kill(running.broker.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while running.broker.alive() and time.monotonic() < deadline:  # the signal is delivered asynchronously
        time.sleep(0.05)
    restarted = lifecycle.restart_broker(settings)
    assert restarted.bootstrap_servers == running.bootstrap_servers and restarted.cluster_id != running.cluster_id
    assert all(record.alive() for record in restarted.processes().values())
    assert {r.pid for r in restarted.workers.values()}.isdisjoint(r.pid for r in running.workers.values())
    assert read_state(settings) == restarted
    consumer = Consumer(reader_config(stack, "test"))
    try:
        topics = consumer.list_topics(timeout=10).topics
        messages = list(read_to_end(consumer, partitions_of(consumer, stack.topics.model_updates), idle_timeout=10))
    finally:
        consumer.close()
    assert STACK_READY_TOPIC in topics
    assert [m.value() for m in messages] == [b"version 3"]


@pytest.mark.parametrize("option", ["--port", "--read-port"])
def test_busy_port_is_one_clear_line(home, option):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(home, "up", option, str(port))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert str(port) in result.stderr and "already in use" in result.stderr
    assert not (home / "stack.json").exists()
    assert not (home / "logs" / "broker.log").exists()  # nothing was started


def test_ensure_topics_creates_configured_partitions_and_compaction(settings):
    settings = replace(settings, topics=replace(settings.topics, partitions=3, control_partitions=2))
    expected = {**dict.fromkeys(settings.topics.all(), 3), **dict.fromkeys(settings.topics.compacted(), 2)}

    assert ensure_topics(settings) == expected
    assert ensure_topics(settings) == expected  # existing topics are fine

    admin = AdminClient(settings.kafka.client_config())
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in expected]
    for resource, future in admin.describe_configs(resources, request_timeout=10).items():
        policy = future.result().get("cleanup.policy")
        if resource.name in settings.topics.compacted():
            assert policy is not None and policy.value == "compact"
        else:
            assert policy is None or policy.value != "compact"


def test_ensure_topics_on_an_unreachable_broker_is_a_clear_error(tmp_path):
    port = free_port()
    settings = home_settings(tmp_path, kafka={"bootstrap_servers": f"127.0.0.1:{port}"})
    with pytest.raises(TopicError, match=f"127.0.0.1:{port}"):
        ensure_topics(settings, timeout=2.0)


def test_status_json_reports_topics_workers_and_lag(home, stand_ins, capsys):
    state = start_stack(home_settings(home, topics={"partitions": 2}))
    spans = home_settings(home).topics.spans
    producer = Producer({"bootstrap.servers": state.bootstrap_servers})
    for partition, count in ((0, 5), (1, 2)):
        for i in range(count):  # one batch per message: Tansu's end offsets are exact then
            producer.produce(spans, value=b"x%d" % i, partition=partition)
            producer.flush(10)
    consumer = Consumer({"bootstrap.servers": state.bootstrap_servers, "group.id": "lagging"})
    consumer.commit(offsets=[TopicPartition(spans, 0, 2)], asynchronous=False)
    consumer.close()

    result = run_cli(home, "status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["running"] is True
    assert report["bootstrap_servers"] == state.bootstrap_servers
    broker = {"pid": state.broker.pid, "alive": True, "reachable": True, "log": state.broker.log, "restarts": 0}
    assert report["broker"] == broker
    assert report["supervisor"] == {"pid": state.supervisor.pid, "alive": True} and report["healthy"] is True
    assert {name: w["alive"] for name, w in report["workers"].items()} == {"reader": True, "idle": True}
    settings = home_settings(home)
    assert {name: t["partitions"] for name, t in report["topics"].items()} == {
        **dict.fromkeys(settings.topics.all(), 2),
        **dict.fromkeys(settings.topics.compacted(), 1),
        STACK_READY_TOPIC: 1,  # the marker `up` creates once the broker holds what it must
    }
    assert {name for name, t in report["topics"].items() if t["compacted"]} == set(settings.topics.compacted())
    assert report["missing_topics"] == []
    # partition 0: 5 - 2 committed; partition 1, never committed: 2 from its start
    assert report["consumer_groups"] == {"lagging": {"lag": 5, "topics": {spans: 5}}}
    assert TANSU_LAG_NOTE in report["notes"]

    assert main(["status"]) == 0  # the rich rendering of the same report
    out = capsys.readouterr().out
    assert "reachable" in out and spans in out and "lagging" in out


def test_status_leaves_no_consumer_group_behind(home, stand_ins, capsys):
    """status reads lag through the admin API and the serving topics by assignment: no group of its own."""
    state = start_stack(home_settings(home))
    settings = home_settings(home, kafka={"bootstrap_servers": state.bootstrap_servers})
    producer = Producer(settings.kafka.client_config())
    producer.produce(settings.topics.served_versions, codec("ServedVersion").encode(served("replica-a", 1)))
    producer.produce(settings.topics.canary_decisions, codec("CanaryDecision").encode(decision("promote", 1, 0)))
    assert producer.flush(10) == 0
    consumer = Consumer(settings.kafka.client_config(**{"group.id": "lagging"}))
    consumer.commit(offsets=[TopicPartition(settings.topics.spans, 0, 0)], asynchronous=False)
    consumer.close()
    admin = AdminClient(settings.kafka.client_config())

    def groups() -> set[str]:
        return {group.group_id for group in admin.list_consumer_groups(request_timeout=10).result().valid}

    assert groups() == {"lagging"}
    for _ in range(2):
        result = run_cli(home, "status", "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert list(report["serving"]["replicas"]) == ["replica-a"]  # the served versions were read
        assert report["serving"]["canary"]["stable"] == 1  # and the decisions
        assert list(report["consumer_groups"]) == ["lagging"]
    assert main(["status"]) == 0
    assert "lagging" in capsys.readouterr().out
    assert groups() == {"lagging"}


def test_stale_state_file_is_noticed_and_replaced(home, stand_ins, capsys):
    stale = start_stack(home_settings(home))
    for record in stale.all_processes():  # the supervisor first, or it restarts the others
        os.kill(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while stale.running() and time.monotonic() < deadline:
        time.sleep(0.05)

    assert main(["status"]) == 1
    assert "stale state file" in capsys.readouterr().out

    assert main(["up"]) == 0
    fresh = read_state(home_settings(home))
    assert fresh is not None and fresh.running()
    assert fresh.broker.pid != stale.broker.pid
    assert stat.S_IMODE((home / "stack.json").stat().st_mode) == 0o600


def test_a_worker_failing_at_start_leaves_nothing_running(home):
    broken = {"broken": Worker(argv=("{python}", "-c", "import sys; print('no chDB here'); sys.exit(3)"))}
    with pytest.raises(StackError, match=r"(?s)worker broken exited while starting.*no chDB here"):
        start_stack(home_settings(home), workers=broken)
    port = int(re.search(r"tcp://127\.0\.0\.1:(\d+)", (home / "logs" / "broker.log").read_text())[1])
    assert not listening(port)
    assert read_state(home_settings(home)) is None


def test_second_start_from_python_raises_with_the_running_state(home):
    state = start_stack(home_settings(home), workers={})
    with pytest.raises(StackRunningError) as raised:
        start_stack(home_settings(home), workers={})
    assert raised.value.state == state
    assert state.clickhouse_read_url == ""  # no worker serves reads


def test_unreadable_state_file_is_reported(home, capsys):
    home.mkdir()
    (home / "stack.json").write_text("{not json")
    assert main(["up"]) == 1
    err = capsys.readouterr().err
    assert "stack.json is not a readable stack state file" in err and "Traceback" not in err
    (home / "stack.json").unlink()  # nothing was started


def test_worker_settings_snapshot_round_trips(tmp_path):
    settings = home_settings(
        tmp_path,
        kafka={"bootstrap_servers": "127.0.0.1:1", "client_overrides": {"security.protocol": "SASL_SSL"}},
        topics={"spans": "t.spans ✓", "partitions": 7},
        producer={"redact_patterns": [r"\d{3,4}", 'say "hi"\\'], "span_sampling_rate": 0.25},
        stream={"reward_timeout": "45s", "agent_selector": ["math-*", "sql"]},
    )
    path = tmp_path / "snapshot.toml"
    path.write_text(settings_toml(settings))
    assert load_settings(path, environ={"BOLTSTREAM_HOME": str(tmp_path)}) == settings


def test_with_a_clickhouse_server_archive_readers_use_the_server(home):
    """No read endpoint is served when the archive writes to a server: readers use the server directly."""
    server = "http://writer:secret@127.0.0.1:8123/boltstream"
    archive = Worker(
        argv=("{python}", "-c", "import time; time.sleep(3600)"),
        read_args=("--read-port", "{read_port}"),
        ready_url="http://127.0.0.1:{read_port}/ping",  # would never answer: it must not be waited for
        settle=0.3,
    )
    state = start_stack(home_settings(home, clickhouse={"url": server}), workers={"archive": archive}, timeout=20)
    try:
        assert state.clickhouse_read_url == server
        assert "--read-port" not in state.workers["archive"].argv
        reader = "http://reader:r@127.0.0.1:8123/boltstream"
        configured = home_settings(home / "other", clickhouse={"url": server, "read_url": reader})
        other = start_stack(configured, workers={"archive": archive}, timeout=20)
        try:
            assert other.clickhouse_read_url == reader
        finally:
            stop_stack(configured)
    finally:
        stop_stack(home_settings(home, clickhouse={"url": server}))


def test_up_runs_the_archive_and_status_counts_its_rows(home):
    """The real stack: `up` starts broker and archive worker; archived spans show up in `status`."""
    up = run_cli(home, "up")
    assert up.returncode == 0, up.stdout + up.stderr
    settings = home_settings(home)  # broker and read endpoint come from the state file
    state = read_state(settings)
    assert set(state.workers) == set(WORKERS)
    # The read token reaches the archive worker in its private settings file, on no command line.
    token = urlsplit(state.clickhouse_read_url).password
    assert token and b"archive" in Path(f"/proc/{state.workers['archive'].pid}/cmdline").read_bytes()
    assert not [path for path, command in command_lines() if token.encode() in command]

    span_batch = codec("SpanBatch")
    producer = Producer(settings.kafka.client_config())
    for _ in range(50):
        batch = make_span_batch(spans=4)
        producer.produce(settings.topics.spans, key=batch["rollout_id"], value=span_batch.encode(batch))
    assert producer.flush(10) == 0

    archive_group = settings.clickhouse.archive_group
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        report = stack_status(settings)
        rows = (report["tables"] or {}).get("spans_store", {}).get("rows")
        lag = (report["consumer_groups"] or {}).get(archive_group, {}).get("lag")
        if rows == 200 and lag == 0:
            break
        time.sleep(0.5)
    assert (rows, lag) == (200, 0), report["notes"]

    status = run_cli(home, "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["workers"]["archive"]["alive"] is True
    assert report["tables"]["spans_store"] == {"engine": "ReplacingMergeTree", "rows": 200}
    assert report["tables"]["rewards_store"]["rows"] == 0
    assert report["clickhouse_read_url"].startswith("http://reader:***@127.0.0.1:")

    again = run_cli(home, "up")
    assert again.returncode == 0 and "already running" in again.stdout

    down = run_cli(home, "down")
    assert down.returncode == 0 and "stopped" in down.stdout, down.stderr
    assert not read_state(settings)


def test_an_unsupervised_stack_with_a_dead_broker_is_reported_not_restarted(home, stand_ins, capsys, monkeypatch):
    monkeypatch.setenv("BOLTSTREAM_STACK__SUPERVISE", "false")  # for main(["up"]) below
    state = start_stack(home_settings(home, stack={"supervise": False}))
    assert state.supervisor is None
    os.kill(state.broker.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while state.broker.alive() and time.monotonic() < deadline:
        time.sleep(0.05)

    report = stack_status(home_settings(home))
    assert report["running"] is True and report["healthy"] is False
    assert report["broker"]["alive"] is False and report["broker"]["reachable"] is False
    assert f"broker at {state.bootstrap_servers} is not reachable" in report["notes"]
    assert all(worker["alive"] for worker in report["workers"].values())

    assert main(["up"]) == 0
    out = capsys.readouterr().out
    assert "already running" in out and f"pid {state.broker.pid}, dead" in out and "boltstream down" in out
    assert read_state(home_settings(home)) == state

    assert main(["down"]) == 0
    assert not any(record.alive() for record in state.processes().values())


def routable_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_the_broker_listens_on_the_configured_address_only(home):
    address = routable_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback")
    state = start_stack(home_settings(home, stack={"broker_host": address, "supervise": False}), workers={})
    assert state.bootstrap_servers == f"{address}:{state.broker_port}"
    clients = home_settings(home, kafka={"bootstrap_servers": state.bootstrap_servers})
    brokers = admin_client(clients).list_topics(timeout=10).brokers.values()
    assert [(b.host, b.port) for b in brokers] == [(address, state.broker_port)]  # what clients are told
    assert not listening(state.broker_port)  # and not on loopback
