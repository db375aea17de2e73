"""The agent-side SDK against the real broker: context, exactly-once delivery, sampling, redaction, spool, outages."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from boltstream import agl
from boltstream.infra.common.config import Settings, load_settings
from boltstream.infra.common.contract import keep_rollout, rollout_fraction
from boltstream.infra.common.topics import ensure_topics
from boltstream.infra.stack.broker import EmbeddedBroker
from boltstream.producers.redaction import REDACTED, Redactor
from boltstream.producers.span_producer import SpanProducer
from boltstream.producers.spool import Spool, SpooledMessage, SpoolLocked, lock_directory
from boltstream.schemas.codec import codec
from tests.producer_helpers import at_least, consume, tmpfs, with_producer


@pytest.fixture
def sdk(settings: Settings) -> Iterator[Settings]:
    """The process-wide SDK producer pointed at this test's topics; shut down afterwards."""
    ensure_topics(settings)
    agl.configure(settings)
    yield settings
    agl.shutdown(5)


# -- sampling ------------------------------------------------------------------------------------


def test_keep_rollout_is_the_documented_hash_rule() -> None:
    # SHA-256("abc") starts with ba7816bf8f01cfea (FIPS 180-2 test vector): 0xba7816bf8f01cfea / 2**64.
    assert rollout_fraction("abc") == pytest.approx(0xBA7816BF8F01CFEA / 2**64)
    assert keep_rollout("abc", 0.73) and not keep_rollout("abc", 0.72)
    assert keep_rollout("anything", 1.0) and not keep_rollout("anything", 0.0)
    digest = hashlib.sha256(b"rollout-42").digest()
    assert keep_rollout("rollout-42", 0.5) == (int.from_bytes(digest[:8], "big") < 2**63)


def test_sampling_keeps_whole_rollouts_at_the_configured_rate(settings: Settings) -> None:
    rate, rollouts = 0.3, 10_000
    settings = with_producer(settings, span_sampling_rate=rate)
    ensure_topics(settings)
    agl.configure(settings)
    try:
        ids = []
        for i in range(rollouts):
            with agl.rollout(task_id=f"task-{i % 50}", agent_name="sampler") as run:
                agl.emit_decision(i)
                agl.emit_reward(1.0)
            ids.append(run.rollout_id)
        assert agl.flush(30)
    finally:
        agl.shutdown(5)
    expected = {r for r in ids if keep_rollout(r, rate)}
    spans = consume(settings.kafka.bootstrap_servers, settings.topics.spans, at_least(3 * len(expected)))
    by_rollout = Counter(span["rollout_id"] for span in spans)
    assert set(by_rollout) == expected
    assert all(count == 3 for count in by_rollout.values()), "a kept rollout arrived incomplete"
    assert abs(len(expected) / rollouts - rate) <= 0.02


# -- delivery and context --------------------------------------------------------------------------


def test_every_span_arrives_exactly_once_with_its_rollout_context(sdk: Settings) -> None:
    emitted: dict[str, dict] = {}  # event_id -> what the test knows about it
    lock = threading.Lock()

    def agent(worker: int, runs: int) -> None:
        for run_index in range(runs):
            with agl.rollout(task_id=f"task-{run_index}", agent_name=f"agent-{worker}", attempt=1) as run:
                decision = agl.emit_decision("search", options=["search", "answer"])
                with agl.traced("plan", kind="custom") as plan:
                    tool = agl.emit_tool_call("search", {"q": "boltstream"}, result=["a", "b"])
                reward = agl.emit_reward(0.5)
            with lock:
                for event_id, parent in (
                    (decision, run.root_id),
                    (tool, plan.event_id),
                    (plan.event_id, run.root_id),
                    (reward, run.root_id),
                    (run.root_id, None),
                ):
                    emitted[event_id] = {"rollout": run.rollout_id, "parent": parent, "worker": worker}

    async def async_agent(worker: int) -> None:
        async with agl.rollout(task_id="async-task", agent_name=f"agent-{worker}", attempt=1) as run:

            @agl.traced
            async def tool(x: int) -> int:
                await asyncio.sleep(0)
                return x * 2

            await asyncio.gather(tool(1), tool(2))
        with lock:
            emitted[run.root_id] = {"rollout": run.rollout_id, "parent": None, "worker": worker}

    async def async_agents() -> None:
        await asyncio.gather(*(async_agent(100 + i) for i in range(5)))

    threads = [threading.Thread(target=agent, args=(worker, 25)) for worker in range(4)]
    for thread in threads:
        thread.start()
    asyncio.run(async_agents())
    for thread in threads:
        thread.join()
    assert agl.flush(20)
    expected = len(emitted) + 5 * 2  # the async tool spans are not in ``emitted``
    spans = consume(sdk.kafka.bootstrap_servers, sdk.topics.spans, at_least(expected))
    time.sleep(0.5)  # anything extra would show up now
    spans += consume(sdk.kafka.bootstrap_servers, sdk.topics.spans, lambda f: False, timeout=0.5)[len(spans) :]

    counts = Counter(span["event_id"] for span in spans)
    assert len(spans) == expected and max(counts.values()) == 1, "a span arrived twice or went missing"
    by_id = {span["event_id"]: span for span in spans}
    for event_id, known in emitted.items():
        span = by_id[event_id]
        assert span["rollout_id"] == known["rollout"]
        assert span["parent_id"] == known["parent"]
        assert span["attempt_id"] == "attempt-1"
        assert span["agent_name"] == f"agent-{known['worker']}"
    per_rollout: dict[str, list[dict]] = defaultdict(list)
    for span in spans:
        per_rollout[span["rollout_id"]].append(span)
    for rollout_spans in per_rollout.values():
        rollout_spans.sort(key=lambda s: s["sequence"])
        assert [s["sequence"] for s in rollout_spans] == list(range(len(rollout_spans)))
        assert rollout_spans[-1]["kind"] == "rollout", "the root span closes the rollout"
        assert len({(s["task_id"], s["agent_name"]) for s in rollout_spans}) == 1
    async_tools = [s for s in spans if s["name"].endswith("tool")]
    assert {s["attributes"]["output"] for s in async_tools} == {2, 4}  # numbers stay numbers
    assert all(by_id[s["parent_id"]]["kind"] == "rollout" for s in async_tools)


def test_spans_outside_a_rollout_form_implicit_rollouts_that_a_reward_does_not_end(sdk: Settings) -> None:
    first = agl.emit("tool_call", tool_name="search", args={"q": "x"})
    assert agl.current_rollout() is None and agl.current_rollout_id()  # an implicit rollout has an id too
    rollout_id = agl.current_rollout_id()
    agl.emit_reward(1.0)  # the seed documents' order: a reward, then a decision, one episode
    second = agl.emit_decision("retry")
    assert agl.flush(10)  # ends the implicit rollout
    third = agl.emit_message("next episode")
    assert agl.current_rollout_id() != rollout_id
    with agl.rollout(task_id="t") as run:
        assert agl.current_rollout_id() == run.rollout_id  # the enclosing rollout's, when there is one
    assert agl.flush(10)
    spans = consume(sdk.kafka.bootstrap_servers, sdk.topics.spans, at_least(7))
    by_id = {s["event_id"]: s for s in spans}
    assert by_id[first]["rollout_id"] == by_id[second]["rollout_id"] == rollout_id != by_id[third]["rollout_id"]
    roots = [s for s in spans if s["kind"] == "rollout" and s["rollout_id"] != run.rollout_id]
    assert len(roots) == 2 and all(r["attributes"]["implicit"] == "true" for r in roots)
    assert by_id[first]["name"] == "search" and by_id[first]["attributes"]["args.q"] == "x"
    reward = next(s for s in spans if s["kind"] == "reward")
    assert reward["reward"] == 1.0 and reward["rollout_id"] == rollout_id


def test_spans_being_encoded_are_not_settled(settings: Settings) -> None:
    """Spans taken from the queue are neither pending nor in flight until produced: flush(), which looks
    from another thread, must not take that moment for "everything delivered"."""
    ensure_topics(settings)
    producer = SpanProducer(settings)
    settled_while_encoding = []
    encode = producer._encoder.encode

    def watched_encode(*args: object) -> bytes:
        settled_while_encoding.append(producer._is_settled())
        return encode(*args)

    producer._encoder.encode = watched_encode
    try:
        span = ("e-1", "r-1", "attempt-0", "t", "agent", "message", "m", None, 0, 1, 2, "ok", None, None, None, "")
        producer.append((*span, "message", "hello"))
        assert producer.flush(10)
    finally:
        producer.close(5)
    assert settled_while_encoding == [False]
    assert producer.stats.spans_delivered == 1


def test_an_idle_producer_thread_sleeps(settings: Settings) -> None:
    """With nothing to send, the background thread wakes at the idle tick (1 s), not every ``linger``: on a
    machine shared with a model server, every wake-up of another thread can preempt one of its threads."""
    ensure_topics(settings)
    producer = agl.configure(with_producer(settings, linger=0.01))
    status = Path(f"/proc/self/task/{producer._thread.native_id}/status")

    def context_switches() -> int:
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
        return int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])

    try:
        with agl.rollout(task_id="t", agent_name="a"):
            agl.emit_message("one span")
        assert agl.flush(10)
        before = context_switches()
        time.sleep(2.0)
        woke = context_switches() - before
    finally:
        agl.shutdown(5)
    assert woke <= 6, woke  # two ticks and some slack; waking every linger would be 200


def test_idle_implicit_rollout_ends_by_itself(settings: Settings) -> None:
    settings = with_producer(settings, implicit_rollout_idle=0.3)
    ensure_topics(settings)
    agl.configure(settings)
    try:
        done = threading.Event()

        def agent() -> None:
            agl.emit_message("working")
            done.wait(10)  # the thread stays alive but quiet

        thread = threading.Thread(target=agent)
        thread.start()
        spans = consume(
            settings.kafka.bootstrap_servers,
            settings.topics.spans,
            lambda found: any(s["kind"] == "rollout" for s in found),
            timeout=10,
        )
        done.set()
        thread.join()
    finally:
        agl.shutdown(5)
    assert [s["kind"] for s in sorted(spans, key=lambda s: s["sequence"])] == ["message", "rollout"]


def test_a_broken_configuration_never_fails_the_agent(tmp_path: Path) -> None:
    agent = (
        "from boltstream import agl\n"
        "with agl.rollout(task_id='t'):\n"
        "    agl.emit_reward(1.0)\n"
        "assert agl.flush(5) is False  # spooled, not delivered: no broker\n"
        "stats = agl.stats()\n"
        "assert stats['discarded_spans'] == 0 and stats['spans_spooled'] == 2 and stats['awaiting_broker'], stats\n"
    )
    env = {**os.environ, "BOLTSTREAM_HOME": str(tmp_path), "BOLTSTREAM_PRODUCER__SPAN_BUFFER_SIZE": "lots"}
    done = subprocess.run(
        [sys.executable, "-c", agent], env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("producer.span_buffer_size: 'lots' is not an integer") == 1, done.stderr


def test_traced_and_operation_record_inputs_outputs_errors_and_nesting(sdk: Settings) -> None:
    class Calculator:
        @agl.traced
        def multiply(self, a: int, b: int) -> int:
            return a * b

    @agl.operation(category="math")
    def add(a: int, b: int) -> int:
        return a + b

    @agl.traced("divide", kind="tool_call")
    def divide(a: int, b: int) -> float:
        return a / b

    with agl.rollout(task_id="calc", agent_name="calculator") as run:
        with agl.operation(step="plan") as op:
            op.set_input(17, b=23)
            assert Calculator().multiply(17, 23) == 391
            op.set_output("391")
        assert add(1, 2) == 3
        with pytest.raises(ZeroDivisionError):
            divide(1, 0)
        with agl.operation(propagate=False) as silent:
            silent.set_output("not recorded")
    assert agl.flush(10)
    spans = consume(sdk.kafka.bootstrap_servers, sdk.topics.spans, at_least(5))
    assert len(spans) == 5
    by_name = {s["name"].rpartition("<locals>.")[2]: s for s in spans}
    plan, multiply = by_name["operation"], by_name["Calculator.multiply"]
    assert plan["attributes"] == {"step": "plan", "input.args.0": 17, "input.b": 23, "output": "391"}
    assert multiply["parent_id"] == plan["event_id"] and plan["parent_id"] == run.root_id
    assert multiply["attributes"] == {"input.a": 17, "input.b": 23, "output": 391}
    assert by_name["add"]["attributes"]["category"] == "math" and by_name["add"]["attributes"]["output"] == 3
    failed = by_name["divide"]
    assert (failed["kind"], failed["status"]) == ("tool_call", "error")
    assert failed["error"].startswith("ZeroDivisionError") and "output" not in failed["attributes"]


def test_a_forked_child_gets_its_own_producer(sdk: Settings) -> None:
    parent = agl.emit_message("before fork")
    pid = os.fork()
    if pid == 0:  # the child: emit, deliver, report through the exit code
        try:
            agl.emit_message("from the child")
            os._exit(0 if agl.flush(10) else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert agl.flush(10)
    spans = consume(sdk.kafka.bootstrap_servers, sdk.topics.spans, at_least(4))
    messages = {s["attributes"].get("agentlightning.message.body"): s for s in spans if s["kind"] == "message"}
    assert set(messages) == {"before fork", "from the child"} and messages["before fork"]["event_id"] == parent
    assert messages["before fork"]["rollout_id"] != messages["from the child"]["rollout_id"]


def test_send_reward_reaches_the_rewards_topic(sdk: Settings) -> None:
    event_id = agl.send_reward("rollout-from-elsewhere", 0.75, source="verifier", attributes={"checks": [1, 2]})
    assert agl.flush(10)
    rewards = consume(sdk.kafka.bootstrap_servers, sdk.topics.rewards, at_least(1), record="Reward")
    assert len(rewards) == 1
    reward = rewards[0]
    assert (reward["event_id"], reward["rollout_id"], reward["value"]) == (event_id, "rollout-from-elsewhere", 0.75)
    assert reward["source"] == "verifier" and reward["attributes"] == {"checks": "[1,2]"}


def test_bad_input_never_raises_into_the_agent(sdk: Settings) -> None:
    class Unserialisable:
        def __repr__(self) -> str:
            return "<unserialisable>"

    loop: list = []
    loop.append(loop)
    before, failed_before = agl.emit_failures(), agl.stats()["failed_emits"]
    assert agl.emit_reward("not a number") == ""  # type: ignore[arg-type]
    assert agl.emit_reward({"a": 1.0}) == ""  # a dict reward needs primary_key
    ok = agl.emit("my_custom_kind", payload=Unserialisable(), cycle=loop)
    nan = agl.emit_reward(math.nan)
    assert ok and nan
    assert agl.flush(10) is False  # delivered, but the two bad rewards were lost: flush() says so
    assert agl.stats()["failed_emits"] == failed_before + 2
    spans = consume(sdk.kafka.bootstrap_servers, sdk.topics.spans, at_least(3))
    by_id = {s["event_id"]: s for s in spans}
    assert by_id[ok]["kind"] == "custom" and by_id[ok]["attributes"]["kind"] == "my_custom_kind"
    assert by_id[ok]["attributes"]["payload"] == '"<unserialisable>"'
    assert math.isnan(by_id[nan]["reward"]) and by_id[nan]["attributes"]["reward.raw"] == "nan"
    assert agl.emit_failures() == before + 2  # the two bad rewards, logged and counted


# -- redaction -----------------------------------------------------------------------------------


def test_secrets_are_redacted_and_long_values_truncated_before_leaving(settings: Settings) -> None:
    settings = with_producer(settings, redact_patterns=(r"acct-\d{6}",), max_attribute_bytes=256)
    ensure_topics(settings)
    agl.configure(settings)
    try:
        event_id = agl.emit_tool_call(
            "http",
            args={"headers": {"Authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig"}},
            result="used key sk-proj-abcdefghijklmnopqrstuvwxyz0123 for acct-123456",
            attributes={
                "api_key": "plain-secret",
                "body": "x" * 1000,
                "count": 3,
                "ratio": 0.5,
                "ok": True,
                **dict.fromkeys(("token", "auth", "private_key", "bearer"), "named-secret"),
                "db": "postgres://app:pg-pass-123@db:5432/orders",
                "key_file": "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBk"
                + "Qz9/" * 12
                + "\n-----END EC PRIVATE KEY-----",
            },
            error="HTTP 401 with Authorization: Basic dXNlcjpwYXNzd29yZA==",
        )
        assert agl.flush(10)
    finally:
        agl.shutdown(5)
    (span,) = consume(settings.kafka.bootstrap_servers, settings.topics.spans, at_least(2))[:1]
    assert span["event_id"] == event_id
    attributes = span["attributes"]
    everything = repr(span)
    secrets = ("eyJhbGciOiJIUzI1NiJ9", "sk-proj-abc", "acct-123456", "plain-secret", "dXNlcjpwYXNzd29yZA")
    for secret in (*secrets, "named-secret", "pg-pass-123", "Qz9/"):
        assert secret not in everything
    assert attributes["args.headers.Authorization"] == REDACTED  # nested values are flattened: a secret-named key
    assert attributes["api_key"] == attributes["token"] == attributes["auth"] == attributes["bearer"] == REDACTED
    assert attributes["db"] == f"postgres://app:{REDACTED}@db:5432/orders"
    assert attributes["body"].startswith("x" * 256) and attributes["body"].endswith("…[truncated 744 bytes]")
    assert (attributes["count"], attributes["ratio"], attributes["ok"]) == (3, 0.5, True)  # typed (SpanBatch v3)
    assert span["error"] == "HTTP 401 with Authorization: Basic [REDACTED]"


def test_redactor_rejects_invalid_patterns_clearly() -> None:
    with pytest.raises(ValueError, match="redact_patterns"):
        Redactor(["(unclosed"])
    assert Redactor().clean("no secrets here, sk-short") == "no secrets here, sk-short"


# -- spool ---------------------------------------------------------------------------------------


def test_spool_drops_oldest_sampled_out_data_first_and_counts_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=64 * 1024, segment_bytes=8 * 1024)
    value = b"v" * 1000
    for i in range(20):
        spool.put(SpooledMessage("spans", f"out-{i}".encode(), value, spans=2, kept=False))
    for i in range(80):
        spool.put(SpooledMessage("spans", f"kept-{i}".encode(), value, spans=3, kept=True))
    assert spool.stats.bytes <= 64 * 1024
    assert spool.stats.dropped_messages > 0
    survivors = []
    while (taken := spool.take_oldest()) is not None:
        segment, messages = taken
        survivors += messages
        spool.release(segment)
    kept = [m for m in survivors if m.kept]
    dropped_kept = 80 - len(kept)
    dropped_out = 20 - (len(survivors) - len(kept))
    # Sampled-out data went first: a kept message was dropped only once no sampled-out one was left.
    assert dropped_out == 20 or dropped_kept == 0
    assert spool.stats.dropped_messages == dropped_kept + dropped_out
    assert spool.stats.dropped_spans == 3 * dropped_kept + 2 * dropped_out
    # What survives is the newest kept data, in order.
    assert [m.key for m in kept] == [f"kept-{i}".encode() for i in range(80 - len(kept), 80)]


def test_spool_survives_a_crash_and_is_locked_to_one_process(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = Spool(directory, max_bytes=1 << 20)
    for i in range(3):
        spool.put(SpooledMessage("rewards", f"k{i}".encode(), b"value", spans=0))
    with pytest.raises(SpoolLocked):
        Spool(directory, max_bytes=1 << 20)
    spool.close()
    # A crash mid-write leaves a truncated entry at the end of a segment.
    (directory / "000000000099.kept.seg.open").write_bytes(b"\x00\x00\x00\x50partial")
    recovered = Spool(directory, max_bytes=1 << 20)
    messages = []
    while (taken := recovered.take_oldest()) is not None:
        messages += taken[1]
        recovered.release(taken[0])
    assert [m.key for m in messages] == [b"k0", b"k1", b"k2"]
    assert recovered.stats.dropped_messages >= 1  # the truncated entry, counted and logged


def test_undeliverable_spans_wait_in_the_spool_for_the_next_process(settings: Settings, tmp_path: Path) -> None:
    dead = load_settings(
        environ={"BOLTSTREAM_HOME": str(tmp_path)},
        kafka={"bootstrap_servers": "127.0.0.1:9"},  # nothing listens on the discard port
        topics={"spans": settings.topics.spans, "rewards": settings.topics.rewards},
        producer={"delivery_timeout": 1.0, "spool_dir": str(tmp_path / "spool")},
    )
    ensure_topics(settings)
    agl.configure(dead)
    with agl.rollout(task_id="offline", agent_name="agent") as run:
        agl.emit_reward(1.0)
    started = time.monotonic()
    assert agl.flush(2.5) is False  # nothing can be delivered, and flush says so
    assert time.monotonic() - started < 4
    agl.shutdown(0.5)
    assert any((tmp_path / "spool").glob("*.seg"))
    # The next process with the same spool and a reachable broker delivers what was left.
    agl.configure(with_producer(settings, spool_dir=str(tmp_path / "spool")))
    try:
        assert agl.flush(15)
    finally:
        agl.shutdown(5)
    spans = consume(settings.kafka.bootstrap_servers, settings.topics.spans, at_least(2))
    assert {s["rollout_id"] for s in spans} == {run.rollout_id}
    assert sorted(s["kind"] for s in spans) == ["reward", "rollout"]


def test_nothing_is_lost_across_a_10s_broker_outage(tmp_path: Path) -> None:
    """Stop the broker process during continuous emission, start a new one on the same port after 10 s.

    Tansu keeps data in memory: what the old broker acknowledged dies with it, and the topics must be
    created again. "Nothing lost" for the SDK means: every span is either consumed from the old
    broker, or was acknowledged by it (lost by the broker, not the SDK), or reaches the new broker.
    Every span emitted while the broker was down travels through the spool and must arrive.
    """
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log").start()
    suffix = uuid.uuid4().hex[:8]
    settings = load_settings(
        environ={"BOLTSTREAM_HOME": str(tmp_path)},
        kafka={"bootstrap_servers": broker.bootstrap_servers},
        topics={"spans": f"o{suffix}.spans", "rewards": f"o{suffix}.rewards"},
        producer={"delivery_timeout": 2.0, "linger": 0.02},
    )
    ensure_topics(settings)
    generation = {"value": 1}
    acked_by_old: set[str] = set()
    batch_codec = codec("SpanBatch")

    def on_delivery(topic: str, value: bytes, error: object) -> None:
        if error is None and generation["value"] == 1 and topic == settings.topics.spans:
            acked_by_old.update(s["event_id"] for s in batch_codec.decode(value)["spans"])

    agl.configure(settings, on_delivery=on_delivery)
    emitted: list[tuple[float, str]] = []
    stop = threading.Event()

    def emitter() -> None:
        while not stop.is_set():
            with agl.rollout(task_id="outage", agent_name="agent") as run:
                emitted.append((time.monotonic(), agl.emit_decision("step")))
                emitted.append((time.monotonic(), agl.emit_tool_call("tool", {"i": len(emitted)})))
            emitted.append((time.monotonic(), run.root_id))
            time.sleep(0.005)

    consumed_old: list[dict] = []
    old_consumer_stop = threading.Event()
    old_consumer = threading.Thread(
        target=lambda: consumed_old.extend(
            consume(broker.bootstrap_servers, settings.topics.spans, lambda _: old_consumer_stop.is_set(), 60)
        )
    )
    old_consumer.start()
    thread = threading.Thread(target=emitter)
    thread.start()
    try:
        time.sleep(2.0)
        port = broker.port
        broker.stop(timeout=0.5)  # Tansu may linger on SIGTERM; the outage starts now either way
        down_at = time.monotonic()
        old_consumer_stop.set()
        old_consumer.join()
        time.sleep(10.0)
        generation["value"] = 2
        broker = EmbeddedBroker(port=port, log_path=tmp_path / "broker2.log").start()
        up_at = time.monotonic()
        ensure_topics(settings)
        time.sleep(3.0)
    finally:
        stop.set()
        thread.join()
    try:
        assert agl.flush(30), f"not delivered after the outage: {agl.stats()}"
        stats = agl.stats()
    finally:
        agl.shutdown(5)
    emitted_ids = {event_id for _, event_id in emitted}
    still_expected = emitted_ids - acked_by_old - {s["event_id"] for s in consumed_old}
    consumed_new = consume(
        broker.bootstrap_servers,
        settings.topics.spans,
        lambda found: still_expected <= {s["event_id"] for s in found},
        30,
    )
    broker.stop(timeout=0.5)
    seen = {s["event_id"] for s in consumed_old} | {s["event_id"] for s in consumed_new}
    missing = emitted_ids - seen
    lost_by_old_broker = missing & acked_by_old
    assert missing == lost_by_old_broker, f"{len(missing - acked_by_old)} spans lost by the SDK; {stats}"
    during_outage = {event_id for at, event_id in emitted if down_at <= at <= up_at}
    assert len(during_outage) > 100
    assert during_outage <= {s["event_id"] for s in consumed_new}
    assert stats["messages_spooled"] > 0 and stats["spool_dropped_messages"] == 0
    assert len(lost_by_old_broker) < len(emitted_ids) * 0.05


# -- riding out outages: full disks, probes, ended processes, oversized spans --------------------------


def _drain(spool: Spool) -> list[SpooledMessage]:
    messages = []
    while (taken := spool.take_oldest()) is not None:
        messages += taken[1]
        spool.release(taken[0])
    return messages


def test_a_full_disk_drops_the_oldest_counts_every_message_and_never_raises(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "tiny", "64k") as disk:
        spool = Spool(disk / "spool", max_bytes=1 << 30)
        for i in range(20):
            spool.put(SpooledMessage("spans", f"out-{i}".encode(), b"o" * 500, spans=1, kept=False))
        stored = [spool.put(SpooledMessage("spans", f"k-{i}".encode(), b"v" * 1000, spans=2)) for i in range(600)]
        assert spool.stats.write_failures > 0
        survivors = _drain(spool)
        spool.close()
    kept = [int(m.key.split(b"-")[1]) for m in survivors if m.kept]
    # Sampled-out data went first, then the oldest kept; what survives is the newest kept data, in order.
    assert kept and len(survivors) == len(kept) and kept == list(range(600 - len(kept), 600))
    assert stored[-1] and len(survivors) + spool.stats.dropped_messages == 20 + 600
    assert spool.stats.dropped_spans == 20 + 2 * (600 - len(kept))


def test_a_segment_nothing_of_which_was_sent_goes_back_untouched(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    for i in range(5):
        spool.put(SpooledMessage("spans", f"k{i}".encode(), b"value", spans=1))
    segment, messages = spool.take_oldest()
    before = segment.path.stat()
    assert len(spool) == 0
    spool.give_back(segment)
    assert (len(spool), spool.stats.bytes) == (5, before.st_size)
    again, messages_again = spool.take_oldest()
    after = again.path.stat()
    assert messages_again == messages and (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


_HOLDER = """
import sys, time
from boltstream.producers.spool import Spool, SpooledMessage
spool = Spool(sys.argv[1], max_bytes=1 << 20)
for i in range(7):
    spool.put(SpooledMessage("spans", b"k%d" % i, b"value", spans=2))
print("READY", flush=True)
time.sleep(600)
"""


def test_the_spool_of_an_ended_process_is_adopted_and_a_live_one_is_not(tmp_path: Path) -> None:
    other = tmp_path / "family" / "4242"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(other)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "READY\n"
        mine = Spool(tmp_path / "family", max_bytes=1 << 20)
        assert mine.adopt(other, remove=True) == 0 and len(mine) == 0  # its owner lives
        holder.kill()
        holder.wait(10)
        assert mine.adopt(other, remove=True) == 7
    finally:
        holder.kill()
        holder.wait(10)
    assert not other.exists(), "an emptied subdirectory is deleted"
    assert mine.stats.adopted_messages == 7
    assert [m.key for m in _drain(mine)] == [f"k{i}".encode() for i in range(7)]


def test_a_process_adopts_the_spool_its_sibling_left_and_delivers_it(settings: Settings, tmp_path: Path) -> None:
    """Two producers of one program (one spool family): the first spools while its broker is unreachable
    and ends; the second, which had to take the subdirectory ``<pid>``, adopts and delivers its spans."""
    ensure_topics(settings)
    family = tmp_path / "spool"
    unreachable = with_producer(
        replace(settings, kafka=replace(settings.kafka, bootstrap_servers="127.0.0.1:9")),
        delivery_timeout=1.0,
        spool_dir=str(family),
    )
    not_a_spool = family / "retained" / "000000000000.kept.seg"  # what else lives there is not adopted
    not_a_spool.parent.mkdir(parents=True)
    not_a_spool.write_bytes(b"not a sibling's spool")
    first = SpanProducer(unreachable)
    second = SpanProducer(with_producer(settings, spool_dir=str(family)))
    try:
        assert (first.spool.directory, second.spool.directory) == (family, family / str(os.getpid()))
        span = ("e-{}", "r-{}", "attempt-0", "t", "agent", "message", "m", None, 0, 1, 2, "ok", None, None, None, "")
        for i in range(30):
            first.append(tuple(field.format(i) if isinstance(field, str) else field for field in span))
        assert first.flush(3) is False
        first.close(0.5)
        deadline = time.monotonic() + 30
        while second.spool.stats.adopted_messages == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert second.flush(20), second.stats
    finally:
        second.close(5)
    spans = consume(settings.kafka.bootstrap_servers, settings.topics.spans, at_least(30))
    assert sorted(s["event_id"] for s in spans) == sorted(f"e-{i}" for i in range(30))
    assert second.spool.stats.adopted_messages == 30 and not any(family.glob("*.seg"))
    assert not_a_spool.exists() and second.spool.stats.dropped_messages == 0


def test_a_forked_child_lets_go_of_the_parent_spool(settings: Settings, tmp_path: Path) -> None:
    """A forked child (a multiprocessing worker) must not keep its parent's spool locked: once the parent's
    producer is gone, the spool is free for the next process, even while the child lives."""
    agl.configure(with_producer(settings, spool_dir=str(tmp_path / "spool")))
    read, write = os.pipe()
    started_read, started_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the fork handlers ran before fork() returned here
        os.close(write)
        os.write(started_write, b"s")
        os.read(read, 1)  # until the parent is done
        os._exit(0)
    os.close(read)
    try:
        assert os.read(started_read, 1) == b"s"
        agl.shutdown(5)
        lock = lock_directory(tmp_path / "spool")
        assert lock is not None, "the child still holds the spool's lock"
        os.close(lock)
    finally:
        for descriptor in (write, started_read, started_write):
            os.close(descriptor)
        os.waitpid(pid, 0)


def test_a_span_over_max_message_bytes_is_refused_counted_logged_once_and_dead_lettered(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = replace(settings, kafka=replace(settings.kafka, max_message_bytes=20_000))
    ensure_topics(settings)
    agl.configure(settings)
    try:
        with agl.rollout(task_id="big", agent_name="agent") as run:
            small = [agl.emit_message(f"step {i} " + "s" * 150) for i in range(200)]  # ~40 KB: split, not refused
            big = [agl.emit("tool_call", **{f"field{k}": "x" * 4000 for k in range(8)}) for _ in range(2)]
        with caplog.at_level(logging.ERROR, logger="boltstream.producer"):
            assert agl.flush(20) is False, "a span was refused: flush() says so"
        assert agl.flush(10), "nothing dropped since the last flush"
        stats = agl.stats()
    finally:
        agl.shutdown(5)
    assert stats["dropped_oversized_spans"] == 2 and stats["dead_letters_delivered"] == 2
    refusals = [r for r in caplog.records if "larger than kafka.max_message_bytes (20,000)" in r.getMessage()]
    assert len(refusals) == 1 and big[0] in refusals[0].getMessage()
    spans = consume(settings.kafka.bootstrap_servers, settings.topics.spans, at_least(201))
    assert {s["event_id"] for s in spans} == {*small, run.root_id}
    letters = consume(settings.kafka.bootstrap_servers, settings.topics.dlq, at_least(2), record="DeadLetter")
    assert len(letters) == 2 and {letter["error_type"] for letter in letters} == {"too_large"}
    assert {letter["key"] for letter in letters} == {run.rollout_id.encode()}
    assert {letter["value"] for letter in letters} == {b""}
    assert sorted(b in letter["reason"] for letter in letters for b in big) == [False, False, True, True]
