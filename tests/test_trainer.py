"""The continuous trainer against the real broker and real DeepSpeed on CPU: staleness, dead letters,
publishing (held below the threshold, never a corrupt artifact), SIGKILL + resume, data parallelism."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from boltstream.infra.common.config import ConfigError
from boltstream.infra.common.signing import MIN_KEY_BYTES, SigningKey, load_signing_key
from boltstream.infra.demo.model import build_tiny_model
from boltstream.trainer.artifacts import ArtifactError, ArtifactStore, artifact_sha256, check_safetensors, verify
from boltstream.trainer.loop import Trainer
from boltstream.trainer.publish import Publisher
from boltstream.trainer.source import Batcher, SampleSource, sample_version
from tests.serving_support import produce_update, unsigned_update
from tests.trainer_support import create_topics, produce_samples, read_all

REPO = Path(__file__).resolve().parents[1]
SGD = {
    "optimizer": {"type": "SGD", "params": {"lr": 0.05}},
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 0},
}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=7)


def with_trainer(settings, **changes):
    return dataclasses.replace(settings, trainer=dataclasses.replace(settings.trainer, **changes))


@pytest.fixture
def trainer_settings(settings, tiny_path, tmp_path):
    create_topics(settings)
    return with_trainer(
        settings,
        model_path=str(tiny_path),
        group_size=4,
        groups_per_step=2,
        checkpoint_dir=str(tmp_path / "checkpoints"),
        artifact_store=str(tmp_path / "artifacts"),
        publish_interval=1000,
        checkpoint_interval=1000,
    )


def make_sample(task: str, attempt: int, *, ret: float, version: int | str = 0, **fields) -> dict:
    completion = [30 + attempt % 10, 31, 2]
    sample = {
        "sample_id": str(uuid.uuid4()),
        "trajectory_id": f"{task}/{attempt}",
        "rollout_id": f"{task}/{attempt}",
        "task_id": task,
        "agent_name": "test",
        "span_event_id": str(uuid.uuid4()),
        "step_index": 0,
        "step_count": 1,
        "model": "tiny",
        "model_version": str(version),
        "prompt_token_ids": [4, 20 + len(task) % 10, 21, 22, 5],
        "completion_token_ids": completion,
        "completion_logprobs": [-2.0] * len(completion),
        "return_value": ret,
        "final_reward": ret,
        "credit_policy": "final",
        "created_at_us": 0,
    }
    return sample | fields


def groups(tasks: int, size: int, *, version: int = 0, prefix: str = "task") -> list[dict]:
    return [
        make_sample(f"{prefix}{t}", a, ret=float(a % 2), version=version) for t in range(tasks) for a in range(size)
    ]


# -- the source: staleness and bad input --------------------------------------------------------
def test_sample_version_parses_plain_and_tagged_versions():
    assert [sample_version(v) for v in ("", "3", "v12", "tiny@7")] == [0, 3, 12, 7]
    with pytest.raises(ValueError):
        sample_version("latest")


def test_stale_samples_are_dropped_on_arrival_and_while_waiting(trainer_settings):
    settings = with_trainer(trainer_settings, max_staleness=2)
    fresh = groups(2, 4, version=5, prefix="fresh")
    stale = groups(1, 4, version=2, prefix="stale")  # 6 - 2 = 4 versions behind
    waiting = [make_sample("waiting", a, ret=1.0, version=4) for a in range(3)]  # a group of 3 of 4
    produce_samples(settings, stale + fresh + waiting)
    source = SampleSource(settings, vocab_size=101, admit=lambda s: None, group_size=4, groups_per_step=2)
    source.start()
    batch = source.next_batch(policy_version=6, timeout=10)
    assert sorted(s["sample_id"] for s in batch) == sorted(s["sample_id"] for s in fresh)
    assert source.counters.dropped_stale == 4
    # The version moves on to 7: the waiting group (version 4) is now 3 behind and goes too.
    assert source.next_batch(policy_version=7, timeout=1) is None
    assert source.counters.dropped_stale == 7
    assert source.batcher.held() == []
    source.close()


def test_batcher_groups_by_task_and_hands_out_complete_groups_only():
    batcher = Batcher(group_size=2, groups_per_step=2, max_staleness=1)
    held = [
        type("H", (), {"sample": {"task_id": t}, "partition": 0, "offset": i, "version": 0})()
        for i, t in enumerate("abca")
    ]
    for item in held:
        batcher.add(item)
    assert batcher.take() is None  # only "a" is complete
    batcher.add(type("H", (), {"sample": {"task_id": "b"}, "partition": 0, "offset": 9, "version": 0})())
    assert [h.sample["task_id"] for h in batcher.take()] == ["a", "a", "b", "b"]


def test_bad_samples_are_dead_lettered_with_the_reason(trainer_settings):
    good = groups(2, 4)
    bad = [
        make_sample("bad", 0, ret=1.0, completion_logprobs=[-1.0]),  # 1 logprob for 3 tokens
        make_sample("bad", 1, ret=1.0, prompt_token_ids=[4, 5000]),  # outside the vocabulary
        make_sample("bad", 2, ret=1.0, model_version="latest"),  # no version number
        make_sample("bad", 3, ret=1.0, completion_token_ids=[], completion_logprobs=[]),
    ]
    produce_samples(trainer_settings, bad + good, raw=[(b"k", b"not avro at all"), (b"k", b"\xc3\x01" + b"\x00" * 8)])
    source = SampleSource(trainer_settings, vocab_size=101, admit=lambda s: None, group_size=4, groups_per_step=2)
    source.start()
    batch = source.next_batch(policy_version=0, timeout=10)
    assert sorted(s["sample_id"] for s in batch) == sorted(s["sample_id"] for s in good)
    source.close()
    letters = read_all(trainer_settings, trainer_settings.topics.dlq, "DeadLetter", expect=6)
    reasons = sorted(letter["reason"] for letter in letters)
    assert len(letters) == 6 and source.counters.dead_lettered == 6
    assert any("1 completion_logprobs for 3" in r for r in reasons)
    assert any("outside the model's vocabulary" in r for r in reasons)
    assert any("no version number" in r for r in reasons)
    assert any("no completion_token_ids" in r for r in reasons)
    assert any("unknown magic bytes" in r for r in reasons)
    assert any("unknown schema fingerprint" in r for r in reasons)
    assert {letter["source_topic"] for letter in letters} == {trainer_settings.topics.samples}


# -- publishing ------------------------------------------------------------------------------
def test_stable_candidate_is_published_with_a_verifiable_artifact(trainer_settings):
    settings = with_trainer(trainer_settings, publish_interval=2, weight_sync_threshold=0.0)
    produce_samples(settings, groups(4, 4))
    trainer = Trainer(settings, deepspeed_config=SGD)
    run = trainer.run(max_steps=2)
    trainer.close()
    assert (run.steps, run.samples, run.published, run.held) == (2, 16, [1], 0)
    assert run.stopped == "--max-steps reached (2 steps)"
    (update,) = read_all(settings, settings.topics.model_updates, "ModelUpdate", expect=1)
    assert update["model"] == "tiny" and update["version"] == 1 and update["parent_version"] is None
    load_signing_key(settings).verify(update)  # signed, with the key the replicas verify it with
    assert update["format"] == "full" and update["step"] == 2
    assert 0.0 < update["stability_score"] < 1.0 and update["metrics"]["kl_serving"] > 0
    assert {"loss", "mean_return", "consumed", "dropped_stale"} <= set(update["metrics"])
    import fsspec

    fs, root = fsspec.core.url_to_fs(update["uri"])
    assert artifact_sha256(fs, root) == update["sha256"]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {Path(p).name for p in fs.ls(root)}
    assert trainer.policy_version == 1


def test_candidate_below_the_threshold_is_held_and_the_reason_recorded(trainer_settings):
    settings = with_trainer(trainer_settings, publish_interval=1, weight_sync_threshold=0.999999)
    produce_samples(settings, groups(2, 4))
    trainer = Trainer(settings, deepspeed_config=SGD)
    run = trainer.run(max_steps=1)
    trainer.close()
    assert (run.published, run.held) == ([], 1)
    assert read_all(settings, settings.topics.model_updates, "ModelUpdate", timeout=3) == []
    (hold,) = [json.loads(line) for line in (trainer.directory / "holds.jsonl").read_text().splitlines()]
    assert hold["step"] == 1 and hold["score"] < 0.999999
    assert "< weight_sync_threshold 0.999999" in hold["reason"]
    assert not list(Path(settings.trainer.artifact_store).glob("v*")), "a held candidate is not uploaded"
    assert trainer.policy_version == 0


def test_corrupt_or_partial_artifact_is_never_published(trainer_settings, tiny_path, tmp_path):
    publisher = Publisher(trainer_settings, base_model=tiny_path, fmt="full", work_dir=tmp_path / "work")
    store = publisher.store
    # A crashed upload leaves a temporary directory: it never has a real name and is cleaned up.
    partial = Path(store.root) / ".tmp-v000001-deadbeef"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)
    assert [Path(p).name for p in store.remove_partials()] == [partial.name]

    artifact = store.put(tiny_path, "v000001-corrupt", "full")
    weights = Path(store.root) / "v000001-corrupt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated after upload
    with pytest.raises(ArtifactError, match="tensors need"):
        check_safetensors(store.fs, str(weights))
    decision = publisher.announce(artifact, version=1, step=1, metrics={}, score=1.0)
    assert not decision.published and "failed verification" in decision.reason

    artifact = store.put(tiny_path, "v000001-flipped", "full")
    weights = Path(store.root) / "v000001-flipped" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match"):
        verify(artifact)
    assert not publisher.announce(artifact, version=1, step=1, metrics={}, score=1.0).published

    artifact = store.put(tiny_path, "v000001-missing", "full")
    (Path(store.root) / "v000001-missing" / "config.json").unlink()
    assert "config.json is missing" in publisher.announce(artifact, version=1, step=1, metrics={}, score=1.0).reason
    assert read_all(trainer_settings, trainer_settings.topics.model_updates, "ModelUpdate", timeout=3) == []


def test_the_trainer_continues_only_from_updates_signed_with_its_key(trainer_settings, tiny_path, tmp_path):
    store = ArtifactStore(trainer_settings.artifact_store_url)
    artifact = store.put(tiny_path, "v000001-signed", "full")
    produce_update(
        trainer_settings, load_signing_key(trainer_settings).sign(unsigned_update(trainer_settings, artifact, 1))
    )
    produce_update(trainer_settings, unsigned_update(trainer_settings, artifact, 8))
    forger = SigningKey(b"f" * MIN_KEY_BYTES)
    produce_update(trainer_settings, forger.sign(unsigned_update(trainer_settings, artifact, 9)))
    publisher = Publisher(trainer_settings, base_model=tiny_path, fmt="full", work_dir=tmp_path / "work")
    assert publisher.version == 1 and (publisher.serving_dir / "model.safetensors").is_file()

    keyless = with_trainer(trainer_settings, signing_key_file=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="no model signing key"):
        Publisher(keyless, base_model=tiny_path, fmt="full", work_dir=tmp_path / "keyless")


def test_lora_candidate_is_published_as_an_adapter(trainer_settings):
    settings = with_trainer(trainer_settings, lora_rank=4, publish_interval=1, weight_sync_threshold=0.0)
    produce_samples(settings, groups(2, 4))
    adam = {"optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}}}
    trainer = Trainer(settings, deepspeed_config=adam)
    trainer.run(max_steps=1)
    trainer.close()
    (update,) = read_all(settings, settings.topics.model_updates, "ModelUpdate", expect=1)
    assert update["format"] == "lora" and update["stability_score"] < 1.0
    import fsspec

    fs, root = fsspec.core.url_to_fs(update["uri"])
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {Path(p).name for p in fs.ls(root)}


# -- crash and resume ------------------------------------------------------------------------
def trainer_env(settings) -> dict[str, str]:
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOLTSTREAM_") and k not in launcher}
    env.update(
        {
            "BOLTSTREAM_HOME": str(settings.home),
            "BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
            "PYTHONPATH": str(REPO),
        }
    )
    for name in ("samples", "dlq", "model_updates"):
        env[f"BOLTSTREAM_TOPICS__{name.upper()}"] = getattr(settings.topics, name)
    for name, value in dataclasses.asdict(settings.trainer).items():
        env[f"BOLTSTREAM_TRAINER__{name.upper()}"] = str(value)
    return env


# -- the command: what it says ------------------------------------------------------------------
def test_the_command_says_what_it_trained_and_why_it_stopped(trainer_settings, tmp_path):
    settings = with_trainer(trainer_settings, publish_interval=2, weight_sync_threshold=0.0)
    samples, checkpoints = settings.topics.samples, settings.trainer.checkpoint_dir
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(SGD))
    command = [sys.executable, "-m", "boltstream.infra.cli", "train", "--deepspeed-config", str(config)]

    def train(*args: str) -> str:
        done = subprocess.run(
            [*command, *args], env=trainer_env(settings), cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    # Nothing to train: the summary says why it stopped and that nothing was done.
    out = train("--idle-timeout", "2")
    assert f"starting at step 0; samples from {samples}, versions to {settings.topics.model_updates}" in out
    assert "stops at --idle-timeout 2 s or Ctrl-C" in out
    assert "boltstream train: stopped: idle timeout: no complete batch in 2 s" in out
    assert f"trained 0 steps on 0 samples (0 tokens); read 0 from {samples}\n" in out
    assert "versions published: none; held: 0; checkpoint: none (no step trained yet)" in out

    # Two steps of samples: a line per step, then the counts, the version published and the checkpoint.
    produce_samples(settings, groups(4, 4))
    out = train("--max-steps", "2")
    assert re.search(r"^step 1: 8 samples, \d+ tokens, loss [-\d.e]+, reward 0\.5, [\d.]+ s$", out, re.M), out
    assert re.search(r"^step 2: 8 samples, .*; published version 1 \(stability 0\.\d+\)$", out, re.M), out
    assert "boltstream train: stopped: --max-steps reached (2 steps)" in out
    assert f"trained 2 steps on 16 samples (48 tokens); read 16 from {samples}\n" in out
    assert f"versions published: 1; held: 0; checkpoint: step 2 in {checkpoints}" in out

    # Ctrl-C ends the run after its current step, as a normal stop.
    stderr = (tmp_path / "interrupted.log").open("w")
    interrupted = subprocess.Popen(
        command, env=trainer_env(settings), cwd=tmp_path, stdout=subprocess.PIPE, stderr=stderr, text=True
    )
    started = ""
    while not started.endswith("after its current step, with a checkpoint\n"):
        line = interrupted.stdout.readline()
        assert line, f"train exited before it started: {(tmp_path / 'interrupted.log').read_text()[-3000:]}"
        started += line
    interrupted.send_signal(signal.SIGINT)
    out = started + interrupted.communicate(timeout=60)[0]
    assert interrupted.returncode == 0, out
    assert "resumed at step 2 (policy version 1)" in out and "stops at Ctrl-C" in out
    assert "boltstream train: stopped: Ctrl-C" in out
    assert f"trained 0 steps on 0 samples (0 tokens); read 0 from {samples}\n" in out
    assert f"versions published: none; held: 0; checkpoint: step 2 in {checkpoints}" in out


@pytest.mark.slow
def test_sigkill_then_resume_trains_every_sample_exactly_once(trainer_settings, tmp_path):
    settings = with_trainer(trainer_settings, checkpoint_interval=3, max_staleness=1000)
    samples = groups(40, 4)  # 20 steps of 8 samples
    produce_samples(settings, samples)
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(SGD))
    command = [
        sys.executable,
        "-m",
        "boltstream.infra.cli",
        "train",
        "--deepspeed-config",
        str(config),
        "--idle-timeout",
        "8",
    ]
    ledger = Path(settings.trainer.checkpoint_dir) / "ledger.jsonl"
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(command, env=trainer_env(settings), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    # Kill between checkpoints: after step 7 (checkpoints at 3 and 6), before the one at 9.
    while time.monotonic() < deadline and not (ledger.exists() and len(ledger.read_text().splitlines()) >= 7):
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    trained_before_kill = len(ledger.read_text().splitlines())
    assert 7 <= trained_before_kill < 20, f"the first run did not stop mid-way: {trained_before_kill} steps"

    log = (tmp_path / "second.log").open("w")
    second = subprocess.run(
        command, env=trainer_env(settings), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, timeout=300
    )
    assert second.returncode == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert "resumed at step" in (tmp_path / "second.log").read_text()
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    trained = [sample_id for entry in entries for sample_id in entry["sample_ids"]]
    assert [e["step"] for e in entries] == list(range(1, 21))
    assert len(trained) == len(set(trained)), "a sample was trained twice"
    assert set(trained) == {s["sample_id"] for s in samples}, "a sample was skipped"


# -- data parallel -----------------------------------------------------------------------------
DP_WORKER = """
import json, sys, torch
from boltstream.infra.common.config import load_settings
from boltstream.trainer.loop import Trainer
samples = json.load(open(sys.argv[1]))
trainer = Trainer(load_settings(), deepspeed_config=json.loads(sys.argv[3]))
trainer.train_batch(samples)
if trainer.rank == 0:
    torch.save({k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}, sys.argv[2])
trainer.close()
"""


@pytest.mark.slow
def test_two_rank_data_parallel_gives_the_same_update_as_one_rank(trainer_settings, tmp_path):
    import torch

    samples = groups(2, 4)
    for i, sample in enumerate(samples):  # different lengths and returns, so ranks see different data
        sample["completion_token_ids"] = sample["completion_token_ids"][: 1 + i % 3]
        sample["completion_logprobs"] = sample["completion_logprobs"][: 1 + i % 3]
        sample["return_value"] = float(i % 3)
    (tmp_path / "samples.json").write_text(json.dumps(samples))
    (tmp_path / "worker.py").write_text(DP_WORKER)
    config = json.dumps({**SGD, "gradient_clipping": 0.0})
    results = {}
    for ranks in (1, 2):
        env = trainer_env(with_trainer(trainer_settings, checkpoint_dir=str(tmp_path / f"ck{ranks}")))
        out = tmp_path / f"rank{ranks}.pt"
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={ranks}",
                str(tmp_path / "worker.py"),
                str(tmp_path / "samples.json"),
                str(out),
                config,
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
        results[ranks] = torch.load(out)
    initial = build_tiny_model(tmp_path / "initial", seed=7)
    from safetensors.torch import load_file

    before = load_file(initial / "model.safetensors")
    moved = 0
    for name, one in results[1].items():
        assert torch.allclose(one, results[2][name], atol=1e-6), name
        moved += int(not torch.equal(one, before[name]))
    assert moved > 0, "the step changed no weight: the comparison would prove nothing"


def test_restart_after_a_checkpoint_continues_with_the_next_batch(trainer_settings):
    first_half, second_half = groups(2, 4, prefix="first"), groups(2, 4, prefix="second")
    extra = [make_sample("waiting", 0, ret=1.0)]  # held (its group is incomplete) across the restart
    produce_samples(trainer_settings, first_half + extra + second_half)
    trainer = Trainer(trainer_settings, deepspeed_config=SGD)
    assert trainer.run(max_steps=1).steps == 1
    trainer.checkpoint()
    weights = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}
    trainer.close()

    resumed = Trainer(trainer_settings, deepspeed_config=SGD)
    assert resumed.step == 1
    for name, value in resumed.engine.module.state_dict().items():
        assert (value == weights[name]).all(), name
    assert resumed.run(max_steps=1).steps == 1
    assert resumed.source.next_batch(policy_version=0, timeout=2) is None
    assert [h.sample["task_id"] for h in resumed.source.batcher.held()] == ["waiting"]
    resumed.close()
    trained = resumed.ledger.trained_ids()
    assert sorted(trained) == sorted(s["sample_id"] for s in first_half + second_half)


@pytest.mark.parametrize(
    ("zero", "bf16"),
    [({"stage": 1}, False), ({"stage": 2}, True), ({"stage": 3, "stage3_param_persistence_threshold": 0}, False)],
    ids=["zero1", "zero2-bf16", "zero3"],
)
def test_zero_stages_train_and_publish_loadable_full_weights(trainer_settings, zero, bf16):
    settings = with_trainer(trainer_settings, publish_interval=1, weight_sync_threshold=0.0)
    produce_samples(settings, groups(2, 4))
    adam = {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}
    config = {"optimizer": adam, "gradient_clipping": 1.0, "zero_optimization": zero, "bf16": {"enabled": bf16}}
    trainer = Trainer(settings, deepspeed_config=config)
    assert trainer.engine.zero_optimization_stage() == zero["stage"]
    trainer.run(max_steps=1)
    trainer.checkpoint()
    trainer.close()
    (update,) = read_all(settings, settings.topics.model_updates, "ModelUpdate", expect=1)
    import fsspec
    from transformers import AutoModelForCausalLM

    _, root = fsspec.core.url_to_fs(update["uri"])
    model = AutoModelForCausalLM.from_pretrained(root)
    assert sum(p.numel() for p in model.parameters()) > 100_000  # gathered, not ZeRO-3 placeholders
    assert 0.0 < update["stability_score"] < 1.0


def test_sft_trains_only_on_samples_whose_return_passes(trainer_settings):
    settings = with_trainer(trainer_settings, algorithm="sft", sft_min_return=1.0)
    samples = groups(4, 4)  # returns alternate 0.0 / 1.0: half pass
    produce_samples(settings, samples)
    trainer = Trainer(settings)
    assert trainer.run(max_steps=1).steps == 1
    assert trainer.source.next_batch(policy_version=0, timeout=1) is None
    trainer.close()
    assert sorted(trainer.ledger.trained_ids()) == sorted(s["sample_id"] for s in samples if s["return_value"] >= 1)
    assert trainer.source.counters.rejected == 8


@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full", "lora"])
def test_kl_to_the_reference_and_several_updates_per_batch(trainer_settings, lora_rank):
    settings = with_trainer(trainer_settings, kl_coef=0.1, updates_per_batch=4, lora_rank=lora_rank)
    produce_samples(settings, groups(2, 4))
    adam = {"optimizer": {"type": "Adam", "params": {"lr": 0.05, "torch_adam": True}}}
    trainer = Trainer(settings, deepspeed_config=adam)
    batch = trainer.source.next_batch(policy_version=0, timeout=10)
    metrics = trainer.train_batch(batch)
    trainer.close()
    # The later updates move away from the step-start policy: the reference KL grows from 0 and the
    # PPO clip engages on some tokens.
    assert metrics["kl_ref"] > 0
    assert metrics["clip_fraction"] > 0
