"""The SDK with no stack and with a bad configuration (issue 12 part 5): nothing lost silently, nothing raised
into the agent. Spans wait in the spool until a broker is configured, then reach the real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from boltstream import agl
from boltstream.infra.common.config import Settings
from boltstream.infra.common.topics import ensure_topics
from tests.producer_helpers import consume, with_producer

REPO = Path(__file__).resolve().parents[1]

#: An agent that knows nothing of brokers: a rollout of two spans and a reward, then flush() and the stats.
AGENT = textwrap.dedent(
    """
    import json, sys, time
    from boltstream import agl
    with agl.rollout(task_id=sys.argv[1], rollout_id=sys.argv[1]):
        agl.emit_tool_call("search", {"query": "weather", "top_k": 3, "filters": {"recent": True}}, "sunny")
        agl.emit_reward(1.0)
    print(json.dumps({"flushed": agl.flush(30), "stats": agl.stats()}), flush=True)  # prompt without a broker
    if sys.argv[2] == "wait-for-stack":  # stay until the stack's broker took everything
        deadline = time.monotonic() + 120
        while agl.stats()["awaiting_broker"] and time.monotonic() < deadline:
            time.sleep(0.2)
        print(json.dumps({"flushed": agl.flush(60), "stats": agl.stats()}), flush=True)
    """
)


@pytest.fixture
def sdk_settings(settings: Settings) -> Iterator[Settings]:
    """The process-wide SDK producer on this test's topics; shut down afterwards."""
    ensure_topics(settings)
    agl.configure(settings)
    yield settings
    agl.shutdown(5)


def agent_environment(settings: Settings, **extra: str) -> dict[str, str]:
    """A child's environment with no broker (unless ``extra`` sets one), in ``settings.home``, on its topics."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("BOLTSTREAM_")}
    return {
        **environment,
        "BOLTSTREAM_HOME": str(settings.home),
        "BOLTSTREAM_TOPICS__SPANS": settings.topics.spans,
        "BOLTSTREAM_TOPICS__REWARDS": settings.topics.rewards,
        **extra,
    }


def start_agent(tmp_path: Path, environment: dict[str, str], rollout_id: str, mode: str) -> subprocess.Popen:
    script = tmp_path / "agent.py"  # one program name: its runs share a family of spools
    script.write_text(AGENT)
    return subprocess.Popen(
        [sys.executable, str(script), rollout_id, mode],
        env=environment,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def report(line: str) -> dict:
    assert line, "the agent printed nothing"
    return json.loads(line)


def spans_of(settings: Settings, rollout_id: str, count: int) -> list[dict]:
    found = consume(
        settings.kafka.bootstrap_servers,
        settings.topics.spans,
        lambda spans: sum(s["rollout_id"] == rollout_id for s in spans) >= count,
        timeout=60,
    )
    return [span for span in found if span["rollout_id"] == rollout_id]


def test_spans_wait_for_a_stack_started_later_and_reach_its_broker(settings: Settings, tmp_path: Path) -> None:
    """No broker configured, no stack: one warning, spans spooled, flush() False. Then the state file of a
    stack appears (as ``boltstream up`` writes it): the running agent finds its broker and delivers."""
    ensure_topics(settings)
    agent = start_agent(tmp_path, agent_environment(settings), "late-stack", "wait-for-stack")
    try:
        first = report(agent.stdout.readline())
        assert first["flushed"] is False and first["stats"]["awaiting_broker"] is True, first
        assert first["stats"]["spans_spooled"] == 3 and first["stats"]["discarded_spans"] == 0, first
        settings.state_file.write_text(json.dumps({"bootstrap_servers": settings.kafka.bootstrap_servers}))
        second = report(agent.stdout.readline())
        _, stderr = agent.communicate(timeout=60)
    finally:
        agent.kill()
    assert agent.returncode == 0, stderr
    assert second["flushed"] is True and second["stats"]["awaiting_broker"] is False, second
    assert second["stats"]["spans_delivered"] == 3, second
    assert stderr.count("no broker is configured") == 1, stderr
    assert f"no {settings.state_file}" in stderr and "sending the 1 spooled messages" in stderr, stderr
    spans = spans_of(settings, "late-stack", 3)
    assert sorted(span["kind"] for span in spans) == ["reward", "rollout", "tool_call"]
    tool_call = next(span for span in spans if span["kind"] == "tool_call")
    assert tool_call["attributes"]["args.top_k"] == 3 and tool_call["attributes"]["args.filters.recent"] is True


def test_a_later_run_with_a_broker_delivers_what_a_run_without_one_spooled(settings: Settings, tmp_path: Path) -> None:
    ensure_topics(settings)
    first = start_agent(tmp_path, agent_environment(settings), "no-broker-run", "exit")
    out, stderr = first.communicate(timeout=60)
    assert first.returncode == 0, stderr
    assert report(out.splitlines()[0])["flushed"] is False
    assert "1 message(s) of spans wait in" in stderr, stderr

    with_broker = agent_environment(settings, BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS=settings.kafka.bootstrap_servers)
    second = start_agent(tmp_path, with_broker, "broker-run", "exit")
    out, stderr = second.communicate(timeout=60)
    assert second.returncode == 0, stderr
    assert report(out.splitlines()[0])["flushed"] is True, stderr
    assert len(spans_of(settings, "no-broker-run", 3)) == 3
    assert len(spans_of(settings, "broker-run", 3)) == 3


def test_a_bad_configuration_warns_naming_the_field_and_the_agent_runs(settings: Settings, tmp_path: Path) -> None:
    """A malformed ``BOLTSTREAM_*`` value (even of a part the SDK does not use), an unknown variable and a
    ``boltstream.toml`` that is not TOML: each a warning naming it; the good values count, spans are sent."""
    ensure_topics(settings)
    (tmp_path / "boltstream.toml").write_text("[producer]\nlinger = 0.01\n[not toml\n")
    environment = agent_environment(
        settings,
        BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS=settings.kafka.bootstrap_servers,
        BOLTSTREAM_PRODUCER__SPAN_BUFFER_SIZE="lots",
        BOLTSTREAM_TRAINER__WEIGHT_SYNC_THRESHOLD="high",
        BOLTSTREAM_PRODUCER__NO_SUCH_FIELD="1",
    )
    agent = start_agent(tmp_path, environment, "bad-config", "exit")
    out, stderr = agent.communicate(timeout=60)
    assert agent.returncode == 0, stderr
    assert report(out.splitlines()[0])["flushed"] is True, stderr
    for named in (
        "producer.span_buffer_size: 'lots' is not an integer",
        "trainer.weight_sync_threshold: 'high' is not a number",
        "unknown parameter(s) ['producer.no_such_field']",
        "boltstream.toml is not valid TOML",
    ):
        assert stderr.count(named) == 1, (named, stderr)
    assert len(spans_of(settings, "bad-config", 3)) == 3


def test_a_bounded_spool_counts_what_it_drops_and_flush_says_so(settings: Settings, tmp_path: Path) -> None:
    """Without a broker the spool keeps at most ``producer.spool_max_bytes``; beyond, the oldest spans go,
    counted, and flush() returns False for them (as it does while nothing could be delivered)."""
    no_broker = replace(settings, kafka=replace(settings.kafka, bootstrap_servers=""), home=tmp_path / "home")
    agl.configure(with_producer(no_broker, spool_max_bytes=64 * 1024))
    try:
        for index in range(40):
            with agl.rollout(task_id=f"t{index}"):
                agl.emit_tool_call("read", {"path": f"/{index}"}, "x" * 8000)
            agl.flush(30)  # one message per rollout; returns as soon as it is spooled
        stats = agl.stats()
        assert stats["awaiting_broker"] is True and stats["discarded_spans"] == 0
        assert stats["spool_dropped_spans"] > 0 and stats["spool_bytes"] <= 64 * 1024, stats
        assert stats["spool_dropped_spans"] + stats["spool_messages"] * 2 == 80, stats
        assert agl.flush(5) is False
    finally:
        agl.shutdown(5)


def test_flush_is_prompt_without_a_broker(settings: Settings, tmp_path: Path) -> None:
    """flush() does not wait out its timeout for a broker that is not configured: it returns False once the
    spans are on disk."""
    no_broker = replace(settings, kafka=replace(settings.kafka, bootstrap_servers=""), home=tmp_path / "home")
    agl.configure(no_broker)
    try:
        with agl.rollout(task_id="prompt"):
            agl.emit_message("hello")
        started = time.monotonic()
        assert agl.flush(60) is False
        assert time.monotonic() - started < 30
        assert agl.stats()["spool_messages"] == 1
    finally:
        agl.shutdown(5)


def test_broker_settings_that_cannot_be_used_spool_instead_of_discarding(settings: Settings, tmp_path: Path) -> None:
    """A broker whose security settings are incomplete (SASL without a password): one warning naming the fields,
    spans spooled for a later run whose settings work (the same program, as above), never discarded."""
    environment = agent_environment(
        settings,
        BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS=settings.kafka.bootstrap_servers,
        BOLTSTREAM_KAFKA__SECURITY_PROTOCOL="SASL_PLAINTEXT",
    )
    agent = start_agent(tmp_path, environment, "sasl-without-password", "exit")
    out, stderr = agent.communicate(timeout=60)
    assert agent.returncode == 0, stderr
    first = report(out.splitlines()[0])
    assert first["flushed"] is False and first["stats"]["awaiting_broker"] is True, first
    assert first["stats"]["spans_spooled"] == 3 and first["stats"]["discarded_spans"] == 0, first
    assert stderr.count("kafka.security_protocol SASL_PLAINTEXT needs kafka.sasl_username and a password") == 1


def test_an_emit_that_fails_is_counted_and_flush_says_so(sdk_settings: Settings) -> None:
    class Unreadable(dict):
        def items(self):  # type: ignore[override]
            raise RuntimeError("cannot be read")

    failed_before = agl.stats()["failed_emits"]  # the count is the process's, since it started
    with agl.rollout(task_id="lost"):
        assert agl.emit_span("custom", "x", attributes=Unreadable(a=1)) == ""  # logged, never raised
    assert agl.stats()["failed_emits"] == failed_before + 1
    assert agl.flush(10) is False
    assert agl.flush(10) is True  # nothing lost since
