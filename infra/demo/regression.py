"""``boltstream demo --inject-regression``: one deliberately worse version published mid-run, and what the canary
made of it.

It owns the injected version. :func:`regression_settings` puts the demo in LoRA mode with a canary that
decides within seconds: every version the trainer publishes is an adapter that runs as a canary beside the
stable adapter on the one vLLM engine (the router's split between them is real) and is promoted once its
window is full. :func:`publish_regression` takes the newest version the trainer published, adds noise to its
adapter weights until it answers badly, uploads it to the artifact store and announces it on
``model-updates`` as the next version, signed with the model signing key like the trainer's (the trainer
numbers its own next version past it). :func:`canary_outcome` reads back from ClickHouse what share of the
traffic it got while its canary ran, its reward against the stable version's, and the decision.
"""

from __future__ import annotations

import math
import shutil
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from boltstream.infra.common.config import Settings
from boltstream.infra.common.signing import load_signing_key
from boltstream.schemas.codec import codec
from boltstream.trainer.artifacts import Artifact, ArtifactStore, verify
from boltstream.trainer.publish import latest_update

#: LoRA rank of the demo's policy when a regression is injected (the candidate must be an adapter).
LORA_RANK = 8
#: Standard deviation of the noise added to every ``lora_B`` weight of the injected version: large enough
#: that the tiny model's answers fall apart, so the canary has a clear regression to catch.
NOISE = 1.0


class RegressionError(RuntimeError):
    """The regression could not be injected; the message says why."""


def regression_settings(settings: Settings) -> Settings:
    """The demo's ``settings`` in LoRA mode, with a canary quick enough to keep up with the trainer: a quarter
    of the traffic to each candidate, a decision after 16 rewarded trajectories per side and 64 scored tokens,
    and a version every 6 trainer steps instead of 3 (a newer version waits for the running canary's
    decision, so fewer versions wait and fewer are skipped).
    Promotion needs a policy_stability_score above 0.3 against the stable version (a trainer version may move
    the policy by up to ~0.5 nats/token, see ``weight_sync_threshold`` in the demo) and a mean reward at most
    0.1 below the stable one's."""
    return replace(
        settings,
        trainer=replace(settings.trainer, lora_rank=LORA_RANK, publish_interval=6),
        serve=replace(
            settings.serve,
            canary_share=0.25,
            canary_window=16,
            stability_tokens=64,
            promotion_stability=0.3,
            reward_margin=0.1,
        ),
    )


def regressed_adapter(source: Path, target: Path, *, noise: float = NOISE, seed: int = 0) -> Path:
    """A copy of the peft adapter ``source`` in ``target`` with Gaussian noise of standard deviation ``noise``
    added to every ``lora_B`` weight."""
    import torch
    from safetensors.torch import load_file, save_file

    if not (source / "adapter_model.safetensors").is_file():
        raise RegressionError(f"{source} holds no adapter_model.safetensors: not a LoRA adapter")
    shutil.copytree(source, target)
    weights_file = target / "adapter_model.safetensors"
    weights = load_file(weights_file)
    generator = torch.Generator().manual_seed(seed)
    noisy = 0
    for name, tensor in weights.items():
        if "lora_B" in name:
            weights[name] = tensor + noise * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
            noisy += 1
    if not noisy:
        raise RegressionError(f"{source} holds no lora_B weights: not a LoRA adapter")
    save_file(weights, weights_file, metadata={"format": "pt"})
    return target


def publish_regression(settings: Settings, work: Path, *, seed: int = 0) -> dict[str, Any]:
    """Announce a regressed copy of the trainer's newest version as the next version; its ModelUpdate."""
    key = load_signing_key(settings)
    newest = latest_update(settings, key, timeout=2.0)
    if newest is None or newest["format"] != "lora":
        raise RegressionError(f"no LoRA version of {settings.trainer.model_name} published yet to regress from")
    store = ArtifactStore(settings.artifact_store_url)
    source = work / f"v{newest['version']}-{uuid.uuid4().hex[:8]}"
    store.fetch(newest["uri"], source)
    verify(Artifact(uri=str(source), sha256=newest["sha256"], format="lora"))
    regressed = regressed_adapter(source, work / f"{source.name}-regressed", seed=seed)
    version = newest["version"] + 1
    artifact = store.put(regressed, f"v{version:06d}-regressed-{uuid.uuid4().hex[:8]}", "lora")
    update = key.sign(
        {
            "model": settings.trainer.model_name,
            "version": version,
            "parent_version": newest["version"],
            "uri": artifact.uri,
            "sha256": artifact.sha256,
            "format": "lora",
            "base_model": newest["base_model"],
            "step": newest["step"],
            "metrics": {"injected_regression_noise": NOISE},
            "stability_score": 0.0,
            "created_at_us": time.time_ns() // 1000,
        }
    )
    errors: list[str] = []
    producer = Producer(settings.kafka.client_config(**{"acks": "all"}))
    producer.produce(
        settings.topics.model_updates,
        key=update["model"].encode(),
        value=codec("ModelUpdate").encode(update),
        on_delivery=lambda err, _msg: errors.append(str(err)) if err else None,
    )
    if producer.flush(settings.producer.flush_timeout) or errors:
        raise RegressionError(f"the regressed version was not announced: {errors or 'flush timed out'}")
    return update


def canary_outcome(client: Any, model: str, version: int) -> dict[str, Any]:
    """What the canary did with ``version`` of ``model``, from ClickHouse: its decisions, the share of the
    rollouts it answered while its canary ran (against the configured share and its 3-standard-error bound),
    and its mean reward against the stable version's."""
    decisions = client.query(
        "SELECT toString(action), timestamp_us, stable_version, candidate_reward, stable_reward,"
        " candidate_trajectories, stable_trajectories, policy_stability_score, canary_share, reason"
        " FROM canary_decisions WHERE model = %(model)s AND candidate_version = %(version)s ORDER BY timestamp_us",
        parameters={"model": model, "version": version},
    ).result_rows
    fields = (
        "action",
        "timestamp_us",
        "stable_version",
        "candidate_reward",
        "stable_reward",
        "candidate_trajectories",
        "stable_trajectories",
        "policy_stability_score",
        "canary_share",
        "reason",
    )
    by_action = {row[0]: dict(zip(fields, row, strict=True)) for row in decisions}
    start, end = by_action.get("start"), by_action.get("rollback") or by_action.get("promote")
    outcome: dict[str, Any] = {"model": model, "version": version, "start": start, "end": end}
    if start is None or end is None:
        return outcome
    rows = client.query(
        "SELECT model_versions FROM trajectories WHERE start_time_us >= %(start)s AND start_time_us < %(end)s"
        " AND length(arrayDistinct(model_versions)) = 1",
        parameters={"start": start["timestamp_us"], "end": end["timestamp_us"]},
    ).result_rows
    answered = sum(set(versions) == {str(version)} for (versions,) in rows)
    share = start["canary_share"]
    outcome.update(
        rollouts=len(rows),
        answered=answered,
        share=answered / len(rows) if rows else None,
        share_bound=share + 3 * math.sqrt(share * (1 - share) / len(rows)) if rows else None,
        seconds=(end["timestamp_us"] - start["timestamp_us"]) / 1e6,
    )
    return outcome


def describe(outcome: dict[str, Any]) -> list[str]:
    """The outcome (with the ``parent_version`` the injected version was copied from) in a few sentences, for
    the console and the report."""
    version, start, end = outcome["version"], outcome["start"], outcome["end"]
    if start is None:
        return [f"injected version {version}: no replica served it, so its canary never started"]
    if end is None:
        return [f"injected version {version}: its canary started but reached no decision before the run ended"]
    lines = [
        f"injected version {version} (a noisy copy of version {outcome['parent_version']}): canary for "
        f"{outcome['seconds']:.1f} s, answered {outcome['answered']} of {outcome['rollouts']} rollouts "
        f"({(outcome['share'] or 0) * 100:.1f} %; canary share {start['canary_share'] * 100:.0f} %, "
        f"bound {(outcome['share_bound'] or 0) * 100:.1f} %)",
        f"{'rolled back' if end['action'] == 'rollback' else 'PROMOTED'} automatically: {end['reason']}",
    ]
    return lines


def add_to_report(html: Path, lines: list[str]) -> None:
    """Add the injected regression's outcome to the demo's HTML report, as its last section."""
    from html import escape

    section = "<h2>injected regression</h2>" + "".join(f"<p>{escape(line)}</p>" for line in lines)
    text = html.read_text()
    html.write_text(text.replace("</body>", section + "\n</body>", 1))
