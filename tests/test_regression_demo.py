"""``boltstream demo --inject-regression``: the regressed adapter, its number beside the trainer's, and the real
demo in LoRA mode catching it: held at the canary share, worse rewarded, rolled back automatically."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from boltstream.infra.common.config import Settings
from boltstream.infra.common.topics import ensure_topics
from boltstream.infra.demo.regression import RegressionError, publish_regression, regressed_adapter
from boltstream.trainer.artifacts import ArtifactStore
from boltstream.trainer.publish import Publisher
from tests.serving_support import lora_artifact, publish_update, reference


def test_the_regressed_adapter_is_the_same_adapter_with_noisy_lora_b(tiny_model_dir: Path, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    lora_artifact(store, tiny_model_dir, tmp_path, "good", seed=5, scale=0.1)
    adapter = tmp_path / "good"  # where lora_artifact wrote it before the upload
    bad = regressed_adapter(adapter, tmp_path / "bad", noise=1.0)
    before, after = load_file(adapter / "adapter_model.safetensors"), load_file(bad / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == ("lora_B" in name), name
    # Worse, and visibly so: the greedy answer of the tiny model changes.
    prompt = [6, 40, 50, 60, 70, 80]
    assert reference(adapter, prompt, 8, base=tiny_model_dir)[0] != reference(bad, prompt, 8, base=tiny_model_dir)[0]
    with pytest.raises(RegressionError, match="not a LoRA adapter"):
        regressed_adapter(tiny_model_dir, tmp_path / "not-an-adapter")


def test_an_injected_version_takes_the_next_number_and_the_trainer_numbers_past_it(
    settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    ensure_topics(settings)
    settings = replace(settings, trainer=replace(settings.trainer, model_path=str(tiny_model_dir), lora_rank=4))
    with pytest.raises(RegressionError, match="no LoRA version"):
        publish_regression(settings, tmp_path / "early")
    store = ArtifactStore(settings.artifact_store_url)
    publish_update(settings, lora_artifact(store, tiny_model_dir, tmp_path, "v1", seed=7, scale=0.1), version=1)
    publisher = Publisher(settings, base_model=tiny_model_dir, fmt="lora", work_dir=tmp_path / "trainer")
    assert publisher.version == 1 and publisher.next_version() == 2
    injected = publish_regression(settings, tmp_path / "regression")
    assert (injected["version"], injected["parent_version"], injected["format"]) == (2, 1, "lora")
    deadline = time.monotonic() + 20
    while publisher.next_version() != 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert publisher.next_version() == 3 and publisher.version == 1  # its own last version is still 1


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_demo_rolls_back_the_injected_regression(settings: Settings, tmp_path: Path) -> None:
    from boltstream.infra.demo.run import run_demo

    summary = run_demo(settings, tmp_path, duration=150, agents=6, seed=0, inject_regression=True)
    print(summary["headline"])
    print("\n".join(summary["regression_lines"]))
    outcome = summary["regression"]
    assert outcome["end"]["action"] == "rollback", outcome
    assert "superseded" not in outcome["end"]["reason"], "rolled back for a newer version, not for its evidence"
    assert outcome["end"]["candidate_reward"] < outcome["end"]["stable_reward"]
    assert 0 < outcome["share"] <= outcome["share_bound"], outcome
    assert "injected regression" in (tmp_path / "report.html").read_text()
