"""Helpers for the serving tests: weight versions in the trainer's artifact store, ModelUpdates on Kafka,
and what transformers computes on the same weights (the reference vLLM must match)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from confluent_kafka import Producer

from boltstream.infra.common.config import Settings
from boltstream.infra.common.signing import load_signing_key
from boltstream.infra.demo.model import build_tiny_model
from boltstream.schemas.codec import codec
from boltstream.trainer.artifacts import Artifact, ArtifactStore

PROMPT = [6, 40, 50, 60, 70, 80]  # token ids of the tiny character tokenizer


def lora_artifact(
    store: ArtifactStore,
    base: Path,
    work: Path,
    name: str,
    seed: int,
    *,
    rank: int = 4,
    scale: float = 1.0,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
) -> Artifact:
    """A random peft LoRA adapter of ``base`` (``lora_B`` scaled by ``scale``: small = close to the base),
    uploaded to ``store``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False)
    adapter = get_peft_model(model, config)
    with torch.no_grad():
        for parameter_name, parameter in adapter.named_parameters():
            if "lora_B" in parameter_name:
                parameter.mul_(scale)
    adapter.save_pretrained(work / name)
    return store.put(work / name, name, "lora")


def full_artifact(store: ArtifactStore, work: Path, name: str, seed: int) -> Artifact:
    """Full weights of a tiny model initialised with ``seed``, uploaded to ``store``."""
    return store.put(build_tiny_model(work / name, seed=seed), name, "full")


def unsigned_update(settings: Settings, artifact: Artifact, version: int) -> dict:
    """The ModelUpdate announcing ``artifact`` as ``version``, before the trainer signs it."""
    return {
        "model": settings.trainer.model_name,
        "version": version,
        "parent_version": version - 1 if version > 1 else None,
        "uri": artifact.uri,
        "sha256": artifact.sha256,
        "format": artifact.format,
        "base_model": "",
        "step": version,
        "metrics": {},
        "stability_score": 0.9,
        "created_at_us": time.time_ns() // 1000,
        "key_id": "",
        "signature": "",
    }


def publish_update(settings: Settings, artifact: Artifact, version: int) -> dict:
    """Produce the ModelUpdate announcing ``artifact`` as ``version``, signed with the key of ``settings``
    as the trainer signs it."""
    return produce_update(settings, load_signing_key(settings).sign(unsigned_update(settings, artifact, version)))


def produce_update(settings: Settings, update: dict) -> dict:
    """Produce ``update`` on model-updates as it is (signed or not)."""
    producer = Producer(settings.kafka.client_config(**{"acks": "all"}))
    producer.produce(
        settings.topics.model_updates, key=update["model"].encode(), value=codec("ModelUpdate").encode(update)
    )
    assert producer.flush(10) == 0
    return update


@torch.no_grad()
def reference(
    weights: Path, prompt: list[int], tokens: int, *, base: Path | None = None
) -> tuple[list[int], list[float]]:
    """Greedy continuation of ``prompt`` and the logprob of each generated token, computed by transformers
    on full weights ``weights`` (or on the LoRA adapter ``weights`` over ``base``)."""
    from transformers import AutoModelForCausalLM

    if base is None:
        model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), weights)
    model.eval()
    ids, logprobs = list(prompt), []
    for _ in range(tokens):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        log_softmax = torch.log_softmax(logits, -1)
        token = int(torch.argmax(log_softmax))
        ids.append(token)
        logprobs.append(float(log_softmax[token]))
    return ids[len(prompt) :], logprobs


def served_output(server: Any, model: str, prompt: list[int], tokens: int) -> tuple[list[int], list[float]]:
    """Greedy token ids and their logprobs as the vLLM server generates them for ``model``."""
    body = server.complete(prompt, model=model, max_tokens=tokens, logprobs=0, return_token_ids=True, ignore_eos=True)
    choice = body["choices"][0]
    return list(choice["token_ids"]), list(choice["logprobs"]["token_logprobs"])


def matches(served: tuple[list[int], list[float]], expected: tuple[list[int], list[float]], tol: float = 2e-3) -> bool:
    return served[0] == expected[0] and all(abs(a - b) <= tol for a, b in zip(served[1], expected[1], strict=True))
