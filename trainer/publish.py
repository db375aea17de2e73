"""Candidate versions: their policy_stability_score, the publish-or-hold decision, and ModelUpdate records.

**policy_stability_score** of a candidate against the serving policy is ``exp(-KL)``, where KL is the
mean per-token KL divergence KL(candidate || serving), computed exactly over the vocabulary, on a probe
set: for each probe prompt, the serving policy's greedy continuation of ``probe_tokens`` tokens, and KL
at every continuation position (the distributions the served model actually samples from). It is 1 for
an identical policy and falls toward 0 as the candidate drifts: 0.85 (the default
``weight_sync_threshold``) allows about 0.16 nats per token. Both policies are loaded from the exported
safetensors, so the score is about exactly the bytes that would be served.

A candidate whose score reaches ``weight_sync_threshold`` is uploaded to the artifact store, verified
there (files present, safetensors complete, sha256 matching) and announced on ``model-updates``, signed
with the model signing key (:mod:`boltstream.infra.common.signing`); otherwise it is held, and the reason
is written to ``holds.jsonl`` and returned. A candidate that fails verification is never announced. The
trainer starts from the newest update on the topic that carries its key's signature; others are ignored.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from confluent_kafka import Consumer, KafkaError, Producer

from boltstream.infra.common.config import Settings
from boltstream.infra.common.signing import SignatureError, SigningKey, load_signing_key
from boltstream.infra.common.topics import TopicError, partitions_of, read_records, reader_config
from boltstream.schemas.codec import CodecError, codec
from boltstream.trainer.artifacts import Artifact, ArtifactError, ArtifactStore, verify

log = logging.getLogger("boltstream.trainer")


@dataclass
class Decision:
    """What happened to a candidate: published (with its ModelUpdate) or held (with the reason)."""

    published: bool
    score: float
    reason: str = ""
    update: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)


def load_for_scoring(directory: str | Path, fmt: str, base_model: str | Path):
    from transformers import AutoModelForCausalLM

    if fmt == "full":
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    return PeftModel.from_pretrained(base, directory).eval()


@torch.no_grad()
def probe_sequences(serving, prompts: list[list[int]], tokens: int) -> list[tuple[list[int], int]]:
    """(prompt + the serving policy's greedy continuation, prompt length) for each probe prompt.

    Prompts of equal length decode together; no stop token, so every probe has ``tokens`` positions.
    """
    by_length: dict[int, list[list[int]]] = {}
    for prompt in prompts:
        by_length.setdefault(len(prompt), []).append(list(prompt))
    sequences = []
    for length, group in by_length.items():
        ids = torch.tensor(group)
        for _ in range(tokens):
            following = serving(input_ids=ids).logits[:, -1, :].argmax(-1, keepdim=True)
            ids = torch.cat([ids, following], dim=1)
        sequences.extend((row, length) for row in ids.tolist())
    return sequences


@torch.no_grad()
def mean_token_kl(candidate, serving, sequences: list[tuple[list[int], int]]) -> float:
    """Mean over continuation positions of KL(candidate || serving), exact over the vocabulary."""
    total, positions = 0.0, 0
    for ids, prompt_length in sequences:
        inputs = torch.tensor([ids])
        # Distribution at position t predicts token t+1: the continuation is predicted from prompt_length-1 on.
        window = slice(prompt_length - 1, len(ids) - 1)
        log_c = torch.log_softmax(candidate(input_ids=inputs).logits[0, window].float(), -1)
        log_s = torch.log_softmax(serving(input_ids=inputs).logits[0, window].float(), -1)
        total += float((log_c.exp() * (log_c - log_s)).sum())
        positions += log_c.shape[0]
    return total / max(positions, 1)


def policy_stability_score(candidate, serving, sequences: list[tuple[list[int], int]]) -> tuple[float, float]:
    """(score in [0, 1], the mean per-token KL it comes from)."""
    kl = max(mean_token_kl(candidate, serving, sequences), 0.0)
    return math.exp(-kl), kl


def latest_update(settings: Settings, key: SigningKey, timeout: float = 10.0) -> dict[str, Any] | None:
    """The newest ModelUpdate of ``trainer.model_name`` on the compacted model-updates topic signed with ``key``."""
    model = settings.trainer.model_name
    try:
        updates = read_records(settings, settings.topics.model_updates, "ModelUpdate", idle_timeout=timeout)
    except TopicError:  # no such topic yet: nothing was published
        return None
    authentic = []
    for update in updates:
        if update["model"] != model:
            continue
        try:
            key.verify(update)
        except SignatureError as exc:
            log.warning("model-updates: version %s of %s ignored: %s", update["version"], model, exc)
            continue
        authentic.append(update)
    return max(authentic, key=lambda u: u["version"], default=None)


class Publisher:
    """Scores candidates against the serving policy and publishes or holds them."""

    def __init__(self, settings: Settings, *, base_model: str | Path, fmt: str, work_dir: str | Path) -> None:
        self.settings = settings
        self.signing_key = load_signing_key(settings)  # first: without it nothing could be published
        self.threshold = settings.trainer.weight_sync_threshold
        self.base_model = Path(base_model)
        self.fmt = fmt
        self.work_dir = Path(work_dir)
        self.store = ArtifactStore(settings.artifact_store_url)
        self.store.remove_partials()
        self.producer = Producer(settings.kafka.client_config(**{"acks": "all", "enable.idempotence": True}))
        self.holds = self.work_dir / "holds.jsonl"
        self.serving = latest_update(settings, self.signing_key)
        self.serving_dir = self._serving_dir()
        # Versions of this model announced by another publisher under the same key while this one runs (a
        # second trainer, the demo's injected regression): the next version is numbered past them, so no
        # two announcements share a number. Read without waiting, from what the client fetched meanwhile.
        self.announced_elsewhere = 0
        self._updates = Consumer(reader_config(settings, "publisher"))
        try:
            self._updates.assign(partitions_of(self._updates, settings.topics.model_updates))
        except TopicError:  # no topic yet: latest_update found nothing either; nobody else announced
            self._updates.close()
            self._updates = None
        self._probe_cache: dict[str, Any] = {}
        self._serving_model_cache: dict[str, Any] = {}

    @property
    def version(self) -> int:
        """The newest published version (0 = the base model, never published)."""
        return self.serving["version"] if self.serving else 0

    def next_version(self) -> int:
        """The number of the next version: past this publisher's own and any other announced since it started."""
        while self._updates is not None:
            messages = self._updates.consume(num_messages=500, timeout=0)
            if not messages:
                break
            for message in messages:
                if message.error() is not None:
                    if message.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("model-updates: %s", message.error())
                    continue
                try:
                    update = codec("ModelUpdate").decode(message.value() or b"")
                    if update["model"] == self.settings.trainer.model_name:
                        self.signing_key.verify(update)
                        self.announced_elsewhere = max(self.announced_elsewhere, update["version"])
                except (CodecError, SignatureError):  # not an announcement a replica would load
                    continue
        return max(self.version, self.announced_elsewhere) + 1

    def _serving_dir(self) -> Path:
        if self.serving is None:
            return self.base_model if self.fmt == "full" else Path()
        local = self.work_dir / "serving" / f"v{self.serving['version']}"
        if not local.exists():
            self.store.fetch(self.serving["uri"], local)
            verify(Artifact(uri=str(local), sha256=self.serving["sha256"], format=self.serving["format"]))
        return local

    def _probes(self, serving, prompts: list[list[int]]) -> list[tuple[list[int], int]]:
        """The probe sequences, decoded once per serving version and probe set."""
        key = (self.version, tuple(map(tuple, prompts)))
        if self._probe_cache.get("key") != key:
            self._probe_cache = {
                "key": key,
                "sequences": probe_sequences(serving, prompts, self.settings.trainer.probe_tokens),
            }
        return self._probe_cache["sequences"]

    def _serving_model(self):
        """The serving policy, loaded once per version."""
        if self._serving_model_cache.get("version") != self.version:
            if self.serving is None and self.fmt == "lora":  # the base model is the adapter-free policy
                model = load_for_scoring(self.base_model, "full", self.base_model)
            else:
                model = load_for_scoring(self.serving_dir, self.fmt, self.base_model)
            self._serving_model_cache = {"version": self.version, "model": model}
        return self._serving_model_cache["model"]

    def consider(
        self, candidate_dir: Path, *, step: int, metrics: dict[str, float], probe_prompts: list[list[int]]
    ) -> Decision:
        """Score the exported candidate; publish it if stable enough, else hold it."""
        if not probe_prompts:
            return self._hold(step, 0.0, "no probe prompts yet: cannot score the candidate", {})
        started = time.perf_counter()
        serving, candidate = self._serving_model(), load_for_scoring(candidate_dir, self.fmt, self.base_model)
        sequences = self._probes(serving, probe_prompts)
        score, kl = policy_stability_score(candidate, serving, sequences)
        timings = {"score_s": time.perf_counter() - started}
        if score < self.threshold:
            reason = (
                f"policy_stability_score {score:.4f} (KL {kl:.4f} nats/token) < weight_sync_threshold {self.threshold}"
            )
            return self._hold(step, score, reason, timings)
        version = self.next_version()
        upload_started = time.perf_counter()
        try:
            artifact = self.store.put(candidate_dir, f"v{version:06d}-{uuid.uuid4().hex[:8]}", self.fmt)
        except (ArtifactError, OSError) as exc:
            return self._hold(step, score, f"artifact upload failed: {exc}", timings)
        timings["upload_s"] = time.perf_counter() - upload_started
        decision = self.announce(
            artifact, version=version, step=step, metrics={**metrics, "kl_serving": kl}, score=score
        )
        decision.timings.update(timings)
        if decision.published:
            self.serving_dir = self.work_dir / "serving" / f"v{version}"
            shutil.copytree(candidate_dir, self.serving_dir, dirs_exist_ok=True)
        return decision

    def announce(
        self, artifact: Artifact, *, version: int, step: int, metrics: dict[str, float], score: float
    ) -> Decision:
        """Verify ``artifact`` in the store and produce its signed ModelUpdate; hold it if verification fails."""
        try:
            self.store.locate(artifact.uri)  # a signed location outside the store would be refused by every replica
            verify(artifact)
        except (ArtifactError, OSError) as exc:
            return self._hold(step, score, f"artifact failed verification, not published: {exc}", {})
        update = self.signing_key.sign(
            {
                "model": self.settings.trainer.model_name,
                "version": version,
                "parent_version": self.version if self.serving else None,
                "uri": artifact.uri,
                "sha256": artifact.sha256,
                "format": artifact.format,
                "base_model": str(self.base_model),
                "step": step,
                "metrics": {k: float(v) for k, v in metrics.items()},
                "stability_score": score,
                "created_at_us": time.time_ns() // 1000,
            }
        )
        errors: list[str] = []
        self.producer.produce(
            self.settings.topics.model_updates,
            key=update["model"].encode(),
            value=codec("ModelUpdate").encode(update),
            on_delivery=lambda err, _msg: errors.append(str(err)) if err else None,
        )
        if self.producer.flush(self.settings.producer.flush_timeout) > 0 or errors:
            return self._hold(step, score, f"ModelUpdate not delivered: {errors or 'flush timed out'}", {})
        self.serving = update
        return Decision(published=True, score=score, update=update)

    def _hold(self, step: int, score: float, reason: str, timings: dict[str, float]) -> Decision:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with self.holds.open("a") as handle:
            handle.write(
                json.dumps({"step": step, "score": score, "reason": reason, "at_us": time.time_ns() // 1000}) + "\n"
            )
        return Decision(published=False, score=score, reason=reason, timings=timings)
