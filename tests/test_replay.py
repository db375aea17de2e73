"""Streaming replay end to end: traffic → real join + real archive → replay → a real join on the replay set.

The recorded run is the join of :mod:`tests.traffic` on production-like topics, archived by the real
archive worker. A replay from the archive into a fresh topic set, joined by a fresh worker with the
same parameters, must give the same trajectories and samples (by id and content; the one field left
out is ``Trajectory.duplicate_count``, since the archive keeps each event once). With another
``reward_timeout``, each rollout's status is predicted here from the traffic itself.
"""

from __future__ import annotations

import io
import os
import time
import tracemalloc
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from boltstream.infra.cli import main
from boltstream.infra.common.config import ConfigError, load_settings
from boltstream.infra.common.contract import REPLAY_HEADER, SOURCE_TIME_HEADER
from boltstream.infra.common.topics import ensure_topics
from boltstream.schemas.codec import codec
from boltstream.stream_processors.replay import (
    ArchiveSource,
    KafkaSource,
    Pacer,
    ReplayError,
    Selection,
    replay,
    replay_settings,
)
from boltstream.stream_processors.replay.avro_rows import RowReader, new_marker
from boltstream.stream_processors.replay.report import experiment_report
from tests.conftest import ArchiveProcess
from tests.join_harness import Collector, JoinProcess, join_settings
from tests.test_archive import wait_for
from tests.traffic import Traffic, generate

TIMEOUT = 2.0
ROLLOUTS = 300


def join_outputs(settings, rollouts: int, samples: int) -> dict[str, dict[str, Any]]:
    """Run one join worker on ``settings`` until ``rollouts`` trajectories and ``samples`` samples are out."""
    worker = JoinProcess(settings)
    trajectories = Collector(settings, settings.topics.trajectories, "Trajectory", "trajectory_id")
    emitted = Collector(settings, settings.topics.samples, "TrainingSample", "sample_id")
    try:
        trajectories.until(rollouts, 120)
        assert len(trajectories.records) == rollouts, worker.log()
        emitted.until(samples, 30)
        time.sleep(1.0)  # anything beyond the expected would show up now
        trajectories.poll()
        emitted.poll()
    finally:
        worker.stop()
        trajectories.close()
        emitted.close()
    return {"trajectories": trajectories.records, "samples": emitted.records}


def high_watermarks(settings, topics: list[str]) -> dict[tuple[str, int], int]:
    consumer = Consumer(settings.kafka.client_config(**{"group.id": f"hw-{uuid.uuid4().hex[:8]}"}))
    try:
        return {
            (topic, p): consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for topic in topics
            for p in range(settings.topics.partitions)
        }
    finally:
        consumer.close()


def predicted_statuses(traffic: Traffic, timeout_s: float) -> dict[str, str]:
    """Each rollout's status under ``reward_timeout`` = ``timeout_s``, from the traffic's own records:
    no spans → orphaned; no rollout span → no_reward; a reward span (the last one is final, whatever its
    name) or an ``is_final`` Reward record timed no later than end + timeout → complete; else timed_out."""
    batches, rewards = codec("SpanBatch"), codec("Reward")
    ends: dict[str, int] = {}
    finals: dict[str, list[int]] = defaultdict(list)
    with_spans: set[str] = set()
    for message in traffic.messages:
        if message.topic == "spans":
            for span in batches.decode(message.value)["spans"]:
                with_spans.add(span["rollout_id"])
                if span["kind"] == "rollout":
                    ends[span["rollout_id"]] = span["end_time_us"]
                elif span["kind"] == "reward":
                    finals[span["rollout_id"]].append(span["end_time_us"])
        else:
            reward = rewards.decode(message.value)
            if reward["is_final"]:
                finals[reward["rollout_id"]].append(reward["timestamp_us"])
    statuses = {}
    for rollout_id in traffic.expected:
        if rollout_id not in with_spans:
            statuses[rollout_id] = "orphaned"
        elif rollout_id not in ends:
            statuses[rollout_id] = "no_reward"
        elif any(t <= ends[rollout_id] + int(timeout_s * 1e6) for t in finals[rollout_id]):
            statuses[rollout_id] = "complete"
        else:
            statuses[rollout_id] = "timed_out"
    return statuses


def without_duplicate_count(trajectories: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {key: {**record, "duplicate_count": None} for key, record in trajectories.items()}


@pytest.fixture(scope="module")
def recorded(broker, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Traffic joined by a real join worker and archived by the real archive worker (still running)."""
    home = tmp_path_factory.mktemp("replay")
    suffix = uuid.uuid4().hex[:8]
    settings = load_settings(
        environ={"BOLTSTREAM_HOME": str(home)},
        kafka={"bootstrap_servers": broker.bootstrap_servers},
        topics={n: f"r{suffix}.{n}" for n in ("spans", "rewards", "trajectories", "samples", "dlq")},
    )
    settings = join_settings(settings, TIMEOUT, credit_assignment="per_step")
    traffic = generate(23, ROLLOUTS, TIMEOUT, bad_inputs=False)
    ensure_topics(settings)
    traffic.produce(settings)
    samples = sum(len(e.calls) for e in traffic.expected.values() if e.status == "complete")
    outputs = join_outputs(settings, len(traffic.expected), samples)
    assert len(outputs["samples"]) == samples

    topics = settings.topics
    env = {
        **os.environ,
        "BOLTSTREAM_HOME": str(home),
        "BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "BOLTSTREAM_KAFKA__SESSION_TIMEOUT_MS": "2000",
        "BOLTSTREAM_CLICKHOUSE__ARCHIVE_GROUP": f"archive-{suffix}",
        **{f"BOLTSTREAM_TOPICS__{n.upper()}": getattr(topics, n) for n in ("spans", "rewards", "trajectories")},
        **{f"BOLTSTREAM_TOPICS__{n.upper()}": getattr(topics, n) for n in ("samples", "dlq", "canary_decisions")},
    }
    archive = ArchiveProcess(settings, env, home / "archive.log").start()
    try:
        reader = archive.client()
        wait_for(lambda: reader.command("SELECT count() FROM spans") == traffic.span_count, 90, "every span")
        rewards = sum(1 for m in traffic.messages if m.topic == "rewards") - sum(
            1 for e in traffic.expected.values() if e.scenario == "duplicated"
        )
        wait_for(lambda: reader.command("SELECT count() FROM rewards") == rewards, 30, "every reward")
        yield {"settings": settings, "traffic": traffic, "archive": archive, "reader": reader, **outputs}
    finally:
        archive.stop()


def strip_policies(samples: dict[str, dict]) -> dict[str, dict]:
    return {key: {k: v for k, v in sample.items() if k != "policies"} for key, sample in samples.items()}


def test_a_replay_reproduces_the_recorded_trajectories_and_samples(recorded) -> None:
    settings, traffic = recorded["settings"], recorded["traffic"]
    production = [settings.topics.spans, settings.topics.rewards, settings.topics.trajectories, settings.topics.samples]
    before = high_watermarks(settings, production)
    source = ArchiveSource(recorded["reader"], Selection())
    result = replay(settings, "same", source, speed=None, progress=False)
    assert (result.spans, result.rewards) == source.count()
    assert result.spans == traffic.span_count
    assert high_watermarks(settings, production) == before, "the replay wrote to production topics"

    replayed = join_outputs(result.settings, len(traffic.expected), len(recorded["samples"]))
    assert set(replayed["trajectories"]) == set(recorded["trajectories"])
    assert without_duplicate_count(replayed["trajectories"]) == without_duplicate_count(recorded["trajectories"])
    # By sample id: token ids, logprobs, returns, all of it; but the policy tag, which names the replay's
    # own trainer (its model name is the replay's, so that it never shares a consumer group or checkpoints).
    assert {s["policies"] == [result.settings.trainer.model_name] for s in replayed["samples"].values()} == {True}
    assert strip_policies(replayed["samples"]) == strip_policies(recorded["samples"])
    assert Counter(t["status"] for t in replayed["trajectories"].values()) == Counter(
        e.status for e in traffic.expected.values()
    )

    # Every replayed message is marked, with its original time.
    consumer = Consumer(settings.kafka.client_config(**{"group.id": f"check-{uuid.uuid4().hex[:8]}"}))
    consumer.assign([TopicPartition(result.settings.topics.rewards, p, 0) for p in range(settings.topics.partitions)])
    messages = [m for m in consumer.consume(10_000, 5.0) if not m.error()]
    consumer.close()
    assert len(messages) == result.rewards
    for message in messages:
        headers = dict(message.headers())
        assert headers[REPLAY_HEADER] == b"same"
        assert int(headers[SOURCE_TIME_HEADER]) == codec("Reward").decode(message.value())["timestamp_us"]

    # The same name again would double every input: refused.
    with pytest.raises(ReplayError, match="not empty"):
        replay(settings, "same", ArchiveSource(recorded["reader"], Selection()), speed=None, progress=False)


def test_a_shorter_reward_timeout_changes_the_outcomes_as_predicted(recorded) -> None:
    settings, traffic = recorded["settings"], recorded["traffic"]
    shorter = 0.5
    predicted = predicted_statuses(traffic, shorter)
    assert predicted == {r: e.status for r, e in traffic.expected.items()} | {
        r: s for r, s in predicted.items() if s == "timed_out"
    }, "a shorter timeout can only turn complete rollouts into timed-out ones"
    recorded_counts = Counter(t["status"] for t in recorded["trajectories"].values())
    predicted_counts = Counter(predicted.values())
    assert predicted_counts["timed_out"] > recorded_counts["timed_out"] + 20, "the traffic tests nothing"

    result = replay(settings, "short", ArchiveSource(recorded["reader"], Selection()), speed=None, progress=False)
    experiment = replace(result.settings, stream=replace(result.settings.stream, reward_timeout=shorter))
    samples = sum(len(traffic.expected[r].calls) for r, status in predicted.items() if status == "complete")
    replayed = join_outputs(experiment, len(traffic.expected), samples)
    statuses = {t["rollout_id"]: t["status"] for t in replayed["trajectories"].values()}
    assert statuses == predicted
    assert len(replayed["samples"]) == samples


def test_selections_are_deterministic_and_select_whole_rollouts(recorded) -> None:
    reader, traffic = recorded["reader"], recorded["traffic"]
    everything = list(ArchiveSource(reader, Selection()).messages())
    assert everything == list(ArchiveSource(reader, Selection()).messages())
    assert [m.time_us for m in everything] == sorted(m.time_us for m in everything)

    agent = "math-agent"
    chosen = list(ArchiveSource(reader, Selection(agents=(agent,))).messages())
    rollouts = {m.key.decode() for m in chosen}
    assert rollouts == {r for r, e in traffic.expected.items() if e.agent_name == agent}
    spans = sum(m.events for m in chosen if m.topic == "spans")
    assert spans == sum(len(traffic.expected[r].span_event_ids) for r in rollouts)

    versioned = {m.key.decode() for m in ArchiveSource(reader, Selection(model_versions=("v2",))).messages()}
    assert versioned == {
        r for r, e in traffic.expected.items() if any(c["llm"]["model_version"] == "v2" for c in e.calls)
    }
    some = sorted(traffic.expected)[:3]
    assert {m.key.decode() for m in ArchiveSource(reader, Selection(rollouts=tuple(some))).messages()} == set(some)
    where = {m.key.decode() for m in ArchiveSource(reader, Selection(where="kind = 'rollout'")).messages()}
    assert where == {r for r, e in traffic.expected.items() if e.scenario not in ("no_end", "orphan")}
    # Re-batching keeps batches below the cap and every span in sequence order.
    small = [m for m in ArchiveSource(reader, Selection(), batch_spans=3).messages() if m.topic == "spans"]
    assert max(m.events for m in small) == 3 and sum(m.events for m in small) == traffic.span_count
    decoded = [codec("SpanBatch").decode(m.value) for m in small]
    for batch in decoded:
        assert [s["sequence"] for s in batch["spans"]] == sorted(s["sequence"] for s in batch["spans"])


def test_kafka_source_replays_the_topics_byte_for_byte(recorded) -> None:
    settings, traffic = recorded["settings"], recorded["traffic"]
    source = KafkaSource(settings)
    messages = list(source.messages())
    assert len(messages) == len(traffic.messages), (len(messages), Counter(m.topic for m in messages))
    assert sorted(m.value for m in messages) == sorted(m.value for m in traffic.messages)
    # From a later time only what was produced from then on; from explicit offsets only the rest.
    partitions = settings.topics.partitions
    offsets = {(settings.topics.rewards, p): 1 for p in range(partitions)}
    later = Counter(m.topic for m in KafkaSource(settings, offsets=offsets).messages())
    assert later["spans"] == sum(1 for m in traffic.messages if m.topic == "spans")
    assert later["rewards"] == sum(1 for m in traffic.messages if m.topic == "rewards") - partitions
    with pytest.raises(ReplayError, match="no end"):
        list(KafkaSource(settings, offsets={(settings.topics.rewards, 0): 10**9}, idle_timeout=3).messages())
    future = list(KafkaSource(settings, since_us=int(time.time() * 1e6) + 60_000_000).messages())
    assert future == []
    middle = messages[len(messages) // 2].time_us
    window = list(KafkaSource(settings, since_us=middle, until_us=middle + 1000).messages())
    assert window and window == [m for m in messages if middle <= m.time_us < middle + 1000]


def test_pacing_follows_the_original_times_at_the_given_speed() -> None:
    pacer, started = Pacer(4.0), time.monotonic()
    for time_us in (0, 400_000, 800_000, 1_200_000):  # 1.2 s of traffic at 4× speed: 0.3 s
        pacer.wait(time_us)
    assert 0.28 <= time.monotonic() - started < 0.6
    fastest, started = Pacer(None), time.monotonic()
    for time_us in (0, 10**9):
        fastest.wait(time_us)
    assert time.monotonic() - started < 0.05
    with pytest.raises(ConfigError):
        Pacer(0)


def test_replay_settings_rename_every_topic_and_the_shared_groups(settings) -> None:
    target = replay_settings(settings, "exp-1")
    for name, value in vars(settings.topics).items():
        if isinstance(value, str):
            assert getattr(target.topics, name) == f"replay.exp-1.{value}"
    assert target.stream.join_group == f"replay.exp-1.{settings.stream.join_group}"
    assert target.trainer.model_name != settings.trainer.model_name
    assert target.stream.reward_timeout == settings.stream.reward_timeout
    with pytest.raises(ConfigError):
        replay_settings(settings, "../prod")


def test_replay_command_paces_selects_and_writes_the_experiment_config(recorded, monkeypatch, tmp_path, capsys) -> None:
    settings, traffic = recorded["settings"], recorded["traffic"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BOLTSTREAM_HOME", str(tmp_path))
    monkeypatch.setenv("BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS", settings.kafka.bootstrap_servers)
    monkeypatch.setenv("BOLTSTREAM_CLICKHOUSE__READ_URL", recorded["archive"].read_url)
    for name in ("spans", "rewards", "trajectories", "samples", "dlq"):
        monkeypatch.setenv(f"BOLTSTREAM_TOPICS__{name.upper()}", getattr(settings.topics, name))
    agent, speed = "code-agent", 20.0
    selected = list(ArchiveSource(recorded["reader"], Selection(agents=(agent,))).messages())
    started = time.monotonic()
    assert main(["replay", "--name", "cli", "--agent", agent, "--speed", str(speed), "--quiet"]) == 0
    elapsed = time.monotonic() - started
    out = capsys.readouterr().out
    replay_topics = f"replay.cli.{settings.topics.spans} and replay.cli.{settings.topics.rewards}"
    assert f"boltstream replay: spans and rewards from the archive into {replay_topics}, at 20× the original" in out
    spans = sum(m.events for m in selected if m.topic == "spans")
    assert f"replayed {spans} spans and {sum(m.topic == 'rewards' for m in selected)} rewards" in out
    original_seconds = (selected[-1].time_us - selected[0].time_us) / 1e6
    assert original_seconds > 2 and elapsed >= original_seconds / speed * 0.95

    config = tmp_path / "replays" / "cli.toml"
    assert f"BOLTSTREAM_CONFIG={config}" in out
    experiment = load_settings(config, environ={})  # (the test's BOLTSTREAM_TOPICS__* would override it)
    assert experiment.topics.spans == f"replay.cli.{settings.topics.spans}"
    counted = Collector(experiment, experiment.topics.spans, "SpanBatch", "rollout_id")
    counted.until(len({m.key for m in selected if m.topic == "spans"}), 10)
    counted.close()
    assert set(counted.records) == {
        r for r, e in traffic.expected.items() if e.agent_name == agent and e.span_event_ids
    }

    # Bad requests are refused with a message, never a traceback.
    assert main(["replay", "--name", "bad", "--speed", "0"]) == 2
    assert main(["replay", "--name", "bad", "--source", "kafka", "--agent", agent]) == 2
    assert main(["replay", "--name", "bad/name"]) == 2
    assert main(["replay", "--name", "badsql", "--where", "no_such_column = 1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--speed must be positive" in err and "no_such_column" in err


def test_an_experiment_is_recorded_and_its_report_matches_sql(recorded, monkeypatch, tmp_path, capsys) -> None:
    settings, traffic, reader = recorded["settings"], recorded["traffic"], recorded["reader"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BOLTSTREAM_HOME", str(tmp_path))
    monkeypatch.setenv("BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS", settings.kafka.bootstrap_servers)
    monkeypatch.setenv("BOLTSTREAM_CLICKHOUSE__READ_URL", recorded["archive"].read_url)
    for name in ("spans", "rewards", "trajectories", "samples", "dlq"):
        monkeypatch.setenv(f"BOLTSTREAM_TOPICS__{name.upper()}", getattr(settings.topics, name))
    # The configuration the original traffic was joined with.
    monkeypatch.setenv("BOLTSTREAM_STREAM__REWARD_TIMEOUT", str(settings.stream.reward_timeout))
    shorter = 0.5
    command = ["replay", "--name", "exp-short", "--speed", "max", "--quiet"]
    assert main([*command, "--set", f"stream.reward_timeout={shorter}"]) == 0
    out = capsys.readouterr().out
    assert f"stream.reward_timeout = {shorter} (was {settings.stream.reward_timeout})" in out
    assert "boltstream report experiment exp-short" in out
    experiment = load_settings(tmp_path / "replays" / "exp-short.toml", environ={})
    assert experiment.stream.reward_timeout == shorter

    predicted = predicted_statuses(traffic, shorter)
    samples = sum(len(traffic.expected[r].calls) for r, status in predicted.items() if status == "complete")
    join_outputs(experiment, len(traffic.expected), samples)
    # The archive finds the experiment's output topics by pattern and stores them with its name.
    wait_for(
        lambda: (
            reader.command("SELECT count() FROM experiment_trajectories WHERE experiment = 'exp-short'")
            == len(traffic.expected)
        ),
        90,
        "the experiment's trajectories archived",
    )
    wait_for(
        lambda: reader.command("SELECT count() FROM experiment_samples WHERE experiment = 'exp-short'") == samples,
        30,
        "the experiment's samples archived",
    )

    wait_for(lambda: reader.command("SELECT count() FROM trajectories") == len(traffic.expected), 30, "trajectories")
    wait_for(lambda: reader.command("SELECT count() FROM experiments WHERE name = 'exp-short'") == 1, 30, "record")
    report = experiment_report(reader, settings, "exp-short", trainer_wait=3.0)
    assert report.record["overrides"] == {"stream.reward_timeout": str(shorter)}
    assert report.record["spans"] == traffic.span_count
    for side, trajectories, samples_table in (
        (report.original, "trajectories", "samples"),
        (report.experiment, "experiment_trajectories WHERE experiment = 'exp-short'", None),
    ):
        where = " WHERE " if "WHERE" not in trajectories else " AND "
        direct = dict(reader.query(f"SELECT toString(status), count() FROM {trajectories} GROUP BY status").result_rows)
        assert {s: c for s, c in side.statuses.items() if c} == direct
        assert side.trajectories == reader.command(f"SELECT count() FROM {trajectories}")
        rewarded = reader.command(f"SELECT count() FROM {trajectories}{where}final_reward IS NOT NULL")
        assert sum(side.rewards.values()) == rewarded
        if samples_table:
            assert side.samples == reader.command(f"SELECT count() FROM {samples_table}")
    assert report.experiment.samples == samples
    assert report.experiment.statuses == {s: Counter(predicted.values())[s] for s in report.experiment.statuses}
    before = {t["rollout_id"]: t["status"] for t in recorded["trajectories"].values()}
    became = Counter((before[r], status) for r, status in predicted.items() if before[r] != status)
    assert {k: c for k, c in report.transitions.items() if k[0] != k[1]} == dict(became)
    assert became[("complete", "timed_out")] > 20
    assert report.trainer_versions == []  # no trainer ran on it

    assert main(["report", "experiment", "exp-short", "--plot", "--output", str(tmp_path / "plots")]) == 0
    shown = capsys.readouterr()
    assert "reward_timeout" in shown.out and "original window vs experiment" in shown.out
    timed_out = report.experiment.statuses["timed_out"]
    assert f"│ {timed_out}" in shown.out or f" {timed_out} " in shown.out
    assert (tmp_path / "plots" / "experiment_exp-short.png").stat().st_size > 10_000
    assert "rollouts by status" in (tmp_path / "plots" / "experiment_exp-short.html").read_text()
    assert main(["report", "experiment", "never-ran"]) == 1
    assert "no experiment 'never-ran'" in capsys.readouterr().err
    assert main(["replay", "--name", "bad-set", "--set", "topics.spans=x"]) == 2
    assert main(["replay", "--name", "bad-set", "--set", "stream.no_such_field=1"]) == 2
    assert main(["replay", "--name", "bad-set", "--set", "stream.reward_timeout=soon"]) == 2


def test_rows_are_decoded_by_fastavro_when_the_marker_does_not_cut_them(recorded) -> None:
    reader = recorded["reader"]
    source = ArchiveSource(reader, Selection())
    ((start, end),) = source.pages()
    marker = new_marker()
    output = reader.raw_query(source.query(marker, start, end), fmt="Avro")
    fast, slow = RowReader(marker), RowReader(new_marker())  # another marker: no block splits right
    cut, decoded = list(fast.rows(io.BytesIO(output))), list(slow.rows(io.BytesIO(output)))
    assert fast.decoded_blocks == 0 and slow.decoded_blocks > 0
    assert cut == decoded
    assert [(m.time_us, m.value) for m in source.messages()] == [(row.time_us, row.value) for row in cut]


def test_pages_keep_the_order_and_the_pacing(recorded) -> None:
    settings, reader = recorded["settings"], recorded["reader"]
    whole = list(ArchiveSource(reader, Selection()).messages())
    paged = ArchiveSource(reader, Selection(), page_events=100)
    assert len(paged.pages()) > 5
    assert list(paged.messages()) == whole

    selection, speed = Selection(agents=("code-agent",)), 20.0
    chosen = list(ArchiveSource(reader, selection).messages())
    original_seconds = (chosen[-1].time_us - chosen[0].time_us) / 1e6
    assert original_seconds > 2
    result = replay(settings, "paced", ArchiveSource(reader, selection, page_events=100), speed=speed, progress=False)
    assert result.messages == len(chosen)
    assert result.seconds >= original_seconds / speed * 0.95


def _peak_while_reading(messages: Iterator[Any]) -> tuple[int, int]:
    """Messages read and the peak of Python allocations while reading them (none kept)."""
    tracemalloc.start()
    try:
        count = sum(1 for _ in messages)
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_window(recorded) -> None:
    settings, reader = recorded["settings"], recorded["reader"]
    everything = list(ArchiveSource(reader, Selection()).messages())
    first, tenth = everything[0].time_us, everything[len(everything) // 10].time_us
    small_count, small = _peak_while_reading(
        ArchiveSource(reader, Selection(since_us=first, until_us=tenth), page_events=200).messages()
    )
    large_count, large = _peak_while_reading(ArchiveSource(reader, Selection(), page_events=200).messages())
    assert large_count > 3 * small_count, (small_count, large_count)
    assert large < 2 * small, (small, large)

    kafka = list(KafkaSource(settings).messages())
    tenth = kafka[len(kafka) // 10].time_us
    small_count, small = _peak_while_reading(KafkaSource(settings, until_us=tenth, partition_buffer=20).messages())
    large_count, large = _peak_while_reading(KafkaSource(settings, partition_buffer=20).messages())
    assert large_count > 3 * small_count, (small_count, large_count)
    assert large < 2 * small, (small, large)
