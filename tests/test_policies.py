"""Several policies at once: the join tags each sample with the policies that select its agent, the archive
keeps the tags, and each policy's trainer reads only its own samples (real broker, join, archive, chDB)."""

from __future__ import annotations

import io
import tempfile
import time
from collections import Counter
from dataclasses import replace

import fastavro
import pytest

from boltstream.infra.common.config import ClickHouseConfig, ConfigError, PolicyConfig, load_settings
from boltstream.schemas.codec import SINGLE_OBJECT_MAGIC, codec, shipped_schemas
from boltstream.schemas.token_arrays import AvroArray, encode_training_sample
from boltstream.stream_processors.archive import Archiver, Table, connect, ddl_statements
from boltstream.stream_processors.join_core import JoinCore, JoinRules
from boltstream.trainer.loop import policy_settings
from boltstream.trainer.source import SampleSource
from tests.join_harness import Collector, JoinProcess, join_settings, prepare
from tests.traffic import generate

TIMEOUT = 2.0
FAR_FUTURE = 2**62
#: The traffic generator's agents (math-agent, code-agent, search-agent) under three policies: one each for
#: math and code, one over both; search-agent is in none.
POLICIES = (
    PolicyConfig("math", ("math-*",)),
    PolicyConfig("code", ("code-agent",)),
    PolicyConfig("both", ("math-agent", "code-*")),
)
EXPECTED_TAGS = {"math-agent": ["math", "both"], "code-agent": ["code", "both"], "search-agent": []}


def tags_by_agent(samples) -> dict[str, set[tuple[str, ...]]]:
    found: dict[str, set[tuple[str, ...]]] = {}
    for sample in samples:
        found.setdefault(sample["agent_name"], set()).add(tuple(sample["policies"]))
    return found


# -- the join's rule ------------------------------------------------------------------------------


def test_the_join_tags_each_sample_with_the_policies_selecting_its_agent():
    traffic = generate(5, 240, TIMEOUT, bad_inputs=False)
    rules = JoinRules(
        reward_timeout_us=int(TIMEOUT * 1e6), policies=tuple((p.name, p.agent_selector) for p in POLICIES)
    )
    core = JoinCore(rules, {})
    for offset, message in enumerate(traffic.messages):
        handler = core.on_span_batch if message.topic == "spans" else core.on_reward
        handler(0, offset, message.key, message.value, 0)
    core.expire({0: FAR_FUTURE})
    trajectories, samples, _, _ = core.drain()
    samples = [codec("TrainingSample").decode(encode_training_sample(sample)) for sample in samples]
    assert tags_by_agent(samples) == {"math-agent": {("math", "both")}, "code-agent": {("code", "both")}}
    selected = Counter((t["agent_name"], t["selected"]) for t in trajectories)
    assert selected[("search-agent", True)] == 0 and selected[("search-agent", False)] > 0
    assert selected[("math-agent", False)] == selected[("code-agent", False)] == 0


def test_join_rules_name_the_configured_policies_or_the_one_of_a_setup_without_any(tmp_path):
    plain = load_settings(environ={"BOLTSTREAM_HOME": str(tmp_path)}, stream={"agent_selector": "a-*"})
    assert JoinRules.from_settings(plain).policies == (("tiny", ("a-*",)),)
    configured = replace(plain, policies=POLICIES)
    assert JoinRules.from_settings(configured).policies == (
        ("math", ("math-*",)),
        ("code", ("code-agent",)),
        ("both", ("math-agent", "code-*")),
    )


# -- the record and the archive ---------------------------------------------------------------------


def sample(**fields) -> dict:
    record = {
        "sample_id": "s-1",
        "trajectory_id": "t-1",
        "rollout_id": "r-1",
        "task_id": "task",
        "agent_name": "math-agent",
        "span_event_id": "e-1",
        "step_index": 0,
        "step_count": 1,
        "model": "tiny",
        "model_version": "v1",
        "prompt_token_ids": [1, 2],
        "completion_token_ids": [3],
        "completion_logprobs": [-0.5],
        "return_value": 1.0,
        "final_reward": 1.0,
        "credit_policy": "final",
        "created_at_us": 1_700_000_000_000_000,
    }
    return record | fields


def written_as_v1(record: dict) -> bytes:
    """``record`` as a writer from before policies framed it (TrainingSample v1)."""
    v1 = next(v for v in shipped_schemas()["TrainingSample"] if v.version == 1)
    body = io.BytesIO()
    fastavro.schemaless_writer(body, v1.parsed, record)
    return SINGLE_OBJECT_MAGIC + v1.fingerprint + body.getvalue()


def test_a_sample_written_before_policies_reads_as_tagged_with_none():
    assert codec("TrainingSample").decode(written_as_v1(sample()))["policies"] == []
    tagged = sample(policies=["math", "both"])
    raw = tagged | {
        "prompt_token_ids": AvroArray.of_ints(tagged["prompt_token_ids"]),
        "completion_token_ids": AvroArray.of_ints(tagged["completion_token_ids"]),
        "completion_logprobs": AvroArray.of_floats(tagged["completion_logprobs"]),
    }
    assert encode_training_sample(raw) == codec("TrainingSample").encode(tagged)


def without_policies(statement: str) -> str | None:
    """A statement of the DDL as it was before policies: without the column, and without the migration."""
    if ("ALTER TABLE" in statement and "policies" in statement) or "report_reward_by_policy_version" in statement:
        return None
    return "\n".join(line for line in statement.splitlines() if not line.strip().startswith("policies "))


def test_an_archive_made_before_policies_gets_the_column_and_keeps_the_tags():
    import clickhouse_connect

    directory = tempfile.mkdtemp(prefix="archive-before-policies-")
    url = f"chdb://{directory}"
    old = clickhouse_connect.get_client(dsn=url)
    old.command("CREATE DATABASE IF NOT EXISTS boltstream")
    old = clickhouse_connect.get_client(dsn=url, database="boltstream")
    for statement in filter(None, map(without_policies, ddl_statements())):
        old.command(statement)
    assert "policies" not in old.query("SELECT * FROM samples_store LIMIT 0").column_names
    old.close()

    client = connect(ClickHouseConfig(), url)  # the archive worker starting on the new version
    tagged, untagged = sample(sample_id="new", policies=["math", "both"]), sample(sample_id="old")
    messages = [(1, codec("TrainingSample").encode(tagged)), (2, written_as_v1(untagged))]
    rejected = Archiver(client).write(Table("TrainingSample", "samples"), messages)
    assert rejected == []
    rows = dict(client.query("SELECT sample_id, policies FROM samples ORDER BY sample_id").result_rows)
    assert rows == {"new": ["math", "both"], "old": []}
    client.close()


# -- the real join, archive and trainers' sources ------------------------------------------------------


def test_each_policy_reads_only_the_samples_of_its_agents_and_the_archive_agrees(settings, archive):
    settings = replace(join_settings(settings, TIMEOUT), policies=POLICIES)
    prepare(settings)
    archive.start()
    traffic = generate(9, 150, TIMEOUT, bad_inputs=False)
    complete = [e for e in traffic.expected.values() if e.status == "complete"]
    expected = sum(len(e.calls) for e in complete if e.agent_name != "search-agent")
    traffic.produce(settings)
    join = JoinProcess(settings)
    samples = Collector(settings, settings.topics.samples, "TrainingSample", "sample_id")
    try:
        samples.until(expected, 120)
    finally:
        join.stop()
        samples.close()
    assert len(samples.records) == expected, join.log()
    on_topic = samples.records.values()
    assert tags_by_agent(on_topic) == {"math-agent": {("math", "both")}, "code-agent": {("code", "both")}}

    client = archive.client()
    rows = []
    for _ in range(120):
        rows = client.query("SELECT sample_id, agent_name, policies FROM samples").result_rows
        if len(rows) >= expected:
            break
        time.sleep(0.5)
    assert {sample_id: (agent, list(tags)) for sample_id, agent, tags in rows} == {
        s["sample_id"]: (s["agent_name"], EXPECTED_TAGS[s["agent_name"]]) for s in on_topic
    }

    report = client.query("SELECT policy, sum(rollouts) FROM report_reward_by_policy_version GROUP BY policy")
    # A rollout counts once for each version its samples used.
    rollouts = {
        agent: len({(s["rollout_id"], s["model_version"]) for s in on_topic if s["agent_name"] == agent})
        for agent in EXPECTED_TAGS
    }
    assert dict(report.result_rows) == {
        "math": rollouts["math-agent"],
        "code": rollouts["code-agent"],
        "both": rollouts["math-agent"] + rollouts["code-agent"],
    }

    for policy in POLICIES:
        own = {s["sample_id"] for s in on_topic if policy.name in s["policies"]}
        source = SampleSource(
            policy_settings(settings, policy.name),
            vocab_size=1 << 20,
            admit=lambda _: None,
            group_size=1,
            groups_per_step=1,
        )
        source.start()
        read: set[str] = set()
        while len(read) < len(own) and (batch := source.next_batch(0, timeout=10)) is not None:
            read.update(s["sample_id"] for s in batch)
        assert read == own, policy.name
        assert source.counters.not_selected == expected - len(own), policy.name
        source.close()


# -- boltstream train --policy, and the demo's trainers ---------------------------------------------------


def test_train_takes_the_only_policy_or_the_one_named(tmp_path):
    plain = load_settings(environ={"BOLTSTREAM_HOME": str(tmp_path)})
    assert policy_settings(plain, None) == plain  # a setup without policies trains as before
    configured = replace(plain, policies=POLICIES)
    assert policy_settings(configured, "code").trainer.model_name == "code"
    with pytest.raises(ConfigError, match=r"3 policies are configured \(math, code, both\): name one with --policy"):
        policy_settings(configured, None)
    with pytest.raises(ConfigError, match="no policy named 'tiny'"):
        policy_settings(configured, "tiny")


def test_the_demo_of_two_policies_trains_two_lora_adapters_each_on_its_agent_group(tmp_path):
    from boltstream.infra.demo.stack import DEMO_POLICIES, LORA_RANK, demo_settings, demo_workers

    base = load_settings(environ={"BOLTSTREAM_HOME": str(tmp_path)})
    for run in ("one", "two"):
        (tmp_path / run).mkdir()
    one = demo_settings(base, tmp_path / "one", tmp_path / "model", DEMO_POLICIES[1])
    assert one.policies == ()
    assert demo_workers(one, 1)["train"].argv[-3:] == ("train", "--policy", "tiny")

    two = demo_settings(base, tmp_path / "two", tmp_path / "model", DEMO_POLICIES[2])
    assert [(p.name, p.agent_selector) for p in two.policies] == [
        ("adder", ("adder",)),
        ("multiplier", ("multiplier",)),
    ]
    assert {two.for_policy(name).trainer.lora_rank for name in ("adder", "multiplier")} == {LORA_RANK}
    workers = demo_workers(two, 1)
    assert "train" not in workers
    assert workers["train-adder"].argv[-3:] == ("train", "--policy", "adder")
    assert workers["train-multiplier"].argv[-3:] == ("train", "--policy", "multiplier")
