"""The continuous trainer: TrainingSamples in, DeepSpeed steps, checkpoints, candidate weight versions out.

One :class:`Trainer` runs per rank (a plain process is a world of one; ``torchrun`` starts more). Rank 0
reads the samples topic and broadcasts each batch; every rank trains on its share. One iteration:

1. rank 0 takes the next batch (``groups_per_step`` complete groups of ``group_size`` samples);
2. every rank trains on ``batch[rank::world]``: one optimizer step (``updates_per_batch`` of them), with
   DeepSpeed averaging gradients across ranks;
3. rank 0 appends the step's sample ids to the ledger;
4. every ``publish_interval`` steps the policy is exported, scored and published or held;
5. every ``checkpoint_interval`` steps a DeepSpeed checkpoint is written with the source's offsets and
   held samples, and only then are the offsets committed to Kafka.

A crash loses at most the steps since the last checkpoint, and those are retrained from the same samples
(the checkpoint holds them or their offsets); the ledger is cut back to the checkpoint on resume.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from confluent_kafka import KafkaException

from boltstream.infra.common.config import ConfigError, Settings
from boltstream.trainer.artifacts import export_policy
from boltstream.trainer.checkpoint import Checkpointer, Ledger, restore_rng, rng_state
from boltstream.trainer.engine import build_engine, init_distributed, load_deepspeed_config, with_batch_sizes
from boltstream.trainer.grpo import GRPO
from boltstream.trainer.policy import TokenBatch, load_policy, pack, token_logprobs
from boltstream.trainer.publish import Decision, Publisher
from boltstream.trainer.sft import SFT
from boltstream.trainer.source import SampleSource, SourceError

log = logging.getLogger("boltstream.trainer")


def make_algorithm(settings: Settings) -> GRPO | SFT:
    """The weight-training algorithm named by ``trainer.algorithm``."""
    config = settings.trainer
    if config.algorithm == "grpo":
        return GRPO(config.clip_epsilon, config.importance_weight_cap, config.kl_coef)
    if config.algorithm == "sft":
        return SFT(config.sft_min_return)
    # apo, the one choice left: TrainerConfig refuses any other.
    raise ConfigError(
        "trainer.algorithm=apo optimises prompts, not weights: it runs boltstream.trainer.apo, not Trainer"
    )


@dataclass
class StepResult:
    step: int
    samples: int
    tokens: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    decision: Decision | None = None


class Trainer:
    """DeepSpeed training over the samples topic (see the module docstring for one iteration)."""

    def __init__(
        self,
        settings: Settings,
        *,
        deepspeed_config: str | Path | dict[str, Any] | None = None,
        probe_prompts: list[list[int]] | None = None,
    ) -> None:
        config = settings.trainer
        self.settings = settings
        self.rank, self.world = init_distributed(config.deepspeed_shm_comm)
        self.algorithm = make_algorithm(settings)
        if not config.model_path:
            raise ConfigError("trainer.model_path: set it to the Hugging Face model directory to train")
        self.model_path = Path(config.model_path)
        self.format = "lora" if config.lora_rank > 0 else "full"
        model, self.tokenizer = load_policy(self.model_path, lora_rank=config.lora_rank)
        self.vocab_size = model.config.vocab_size
        self.reference = None
        if config.kl_coef and self.format == "full":
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.global_batch = config.group_size * config.groups_per_step
        ds_config = load_deepspeed_config(deepspeed_config if deepspeed_config is not None else config.deepspeed_config)
        self.deepspeed_config = with_batch_sizes(ds_config, self.global_batch, self.world)
        self.engine = build_engine(model, self.deepspeed_config)
        self.directory = Path(config.checkpoint_dir or settings.home / "checkpoints" / config.model_name)
        self.checkpointer = Checkpointer(self.directory)
        self.ledger = Ledger(self.directory / "ledger.jsonl")
        self.fixed_probe = probe_prompts is not None
        self.probe_prompts: list[list[int]] = [list(p) for p in probe_prompts or []]
        self.step, self.policy_version = 0, 0

        state = self.checkpointer.resume(self.engine)
        if state:
            self.step, self.policy_version = state["step"], state["policy_version"]
            if not self.fixed_probe:
                self.probe_prompts = state["probe_prompts"]
            restore_rng(state["rng"])
        self.last_checkpoint = self.step
        self.source: SampleSource | None = None
        self.publisher: Publisher | None = None
        if self.rank == 0:
            self.ledger.truncate_after(self.step)
            self.publisher = Publisher(settings, base_model=self.model_path, fmt=self.format, work_dir=self.directory)
            self.policy_version = max(self.policy_version, self.publisher.version)
            grpo = self.algorithm.name == "grpo"
            self.source = SampleSource(
                settings,
                vocab_size=self.vocab_size,
                admit=self.algorithm.admit,
                group_size=config.group_size if grpo else 1,
                groups_per_step=config.groups_per_step if grpo else self.global_batch,
            )
            self.source.start(state["source"] if state else None)
        self.policy_version = self._broadcast(self.policy_version)
        if state:
            log.info("resumed at step %d (policy version %d) from %s", self.step, self.policy_version, self.directory)

    # -- the loop ---------------------------------------------------------------------------
    def run(self, max_steps: int | None = None, idle_timeout: float | None = None, poll: float = 1.0) -> int:
        """Train until ``max_steps`` more steps are done, or no batch completed for ``idle_timeout`` s."""
        done, idle_since = 0, time.monotonic()
        while max_steps is None or done < max_steps:
            batch, stop = None, False
            if self.rank == 0:
                batch = self.source.next_batch(self.policy_version, poll)
                if batch is not None:
                    idle_since = time.monotonic()
                elif idle_timeout is not None and time.monotonic() - idle_since >= idle_timeout:
                    stop = True
            batch, stop = self._broadcast((batch, stop))
            if stop:
                break
            if batch is not None:
                result = self.train_step(batch)
                done += 1
                if self.rank == 0:
                    log.info("step %d: %s", result.step, _fmt(result.metrics))
        return done

    def train_step(self, batch: list[dict[str, Any]]) -> StepResult:
        """Train on one batch, then ledger, publish and checkpoint as their intervals say."""
        config = self.settings.trainer
        started = time.perf_counter()
        metrics = self.train_batch(batch)
        self.step += 1
        seconds = time.perf_counter() - started
        result = StepResult(self.step, len(batch), int(metrics["tokens"]), seconds, metrics)
        if self.rank == 0:
            self.ledger.record(self.step, [s["sample_id"] for s in batch])
            self._remember_probes(batch)
            metrics.update({k: float(v) for k, v in self.source.counters.as_dict().items()})
        if self.step % config.publish_interval == 0:
            result.decision = self.publish(metrics)
        if self.step % config.checkpoint_interval == 0:
            self.checkpoint()
        return result

    def train_batch(self, samples: list[dict[str, Any]]) -> dict[str, float]:
        """One optimizer step (``updates_per_batch`` of them) on this rank's share of ``samples``."""
        advantages = self.algorithm.advantages(samples)
        mine = list(zip(samples, advantages, strict=True))[self.rank :: self.world]
        accumulation = self.engine.gradient_accumulation_steps()
        size = len(mine) // accumulation
        pad = self.tokenizer.pad_token_id
        micro = [mine[i * size : (i + 1) * size] for i in range(accumulation)]
        packed = [pack([s for s, _ in part], [a for _, a in part], pad) for part in micro]
        references = [self._reference_logprobs(b) for b in packed]
        proximal: list[torch.Tensor] | None = None
        updates = self.settings.trainer.updates_per_batch
        if updates > 1:  # the step-start policy, fixed while the updates move away from it
            with torch.no_grad():
                proximal = [token_logprobs(self.engine, b) for b in packed]
        totals: dict[str, float] = {}
        for _ in range(updates):
            for index, tokens in enumerate(packed):
                logprobs = token_logprobs(self.engine, tokens)
                prox = logprobs.detach() if proximal is None else proximal[index]
                loss, extra = self.algorithm.loss(logprobs, prox, tokens, references[index])
                self.engine.backward(loss)
                self.engine.step()
                for key, value in {"loss": float(loss.detach()), **extra}.items():
                    totals[key] = totals.get(key, 0.0) + value / (updates * accumulation)
        totals["tokens"] = float(sum(b.completion_tokens for b in packed))
        totals["mean_return"] = sum(s["return_value"] for s in samples) / len(samples)
        return totals

    def _reference_logprobs(self, batch: TokenBatch) -> torch.Tensor | None:
        if not self.settings.trainer.kl_coef:
            return None
        with torch.no_grad():
            if self.reference is not None:
                return token_logprobs(self.reference, batch)
            with self.engine.module.disable_adapter():  # LoRA: the base model is the reference
                return token_logprobs(self.engine.module, batch)

    def _remember_probes(self, batch: list[dict[str, Any]]) -> None:
        if self.fixed_probe:
            return
        for sample in batch:
            prompt = list(sample["prompt_token_ids"])
            if len(self.probe_prompts) < self.settings.trainer.probe_size and prompt not in self.probe_prompts:
                self.probe_prompts.append(prompt)

    # -- checkpoints and versions -----------------------------------------------------------
    def checkpoint(self) -> None:
        """Collective: save a checkpoint, then (rank 0) commit the offsets it covers."""
        state: dict[str, Any] = {}
        if self.rank == 0:
            state = {
                "step": self.step,
                "policy_version": self.policy_version,
                "probe_prompts": self.probe_prompts,
                "rng": rng_state(),
                "source": self.source.state(),
            }
        self.checkpointer.save(self.engine, self.step, state)
        if self.rank == 0:
            self.source.commit(state["source"]["positions"])
        self.last_checkpoint = self.step

    def publish(self, metrics: dict[str, float]) -> Decision | None:
        """Collective: export the policy; rank 0 scores it and publishes or holds it."""
        candidate = self.directory / "candidates" / f"step-{self.step:09d}"
        with self._full_parameters():
            if self.rank == 0:
                shutil.rmtree(candidate, ignore_errors=True)
                export_policy(self.engine.module, self.tokenizer, candidate, self.format)
        decision = None
        if self.rank == 0:
            decision = self.publisher.consider(
                candidate, step=self.step, metrics=metrics, probe_prompts=self.probe_prompts
            )
            shutil.rmtree(candidate, ignore_errors=True)
            if decision.published:
                self.policy_version = decision.update["version"]
                log.info("published version %d (score %.4f)", self.policy_version, decision.score)
            else:
                log.info("held the candidate of step %d: %s", self.step, decision.reason)
        self.policy_version = self._broadcast(self.policy_version)
        return decision

    def _full_parameters(self):
        if self.engine.zero_optimization_stage() == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def _broadcast(self, value):
        if self.world == 1:
            return value
        import torch.distributed as dist

        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


# -- CLI: boltstream train ---------------------------------------------------------------------
def train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (default: run forever)")
    parser.add_argument("--idle-timeout", type=float, help="stop when no batch completed for this many seconds")
    parser.add_argument("--deepspeed-config", help="DeepSpeed JSON config (default: trainer.deepspeed_config)")
    parser.add_argument("--duration", type=float, help="APO only: stop after this many seconds")


def train_command(args: argparse.Namespace, settings: Settings) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if settings.trainer.algorithm == "apo":
        from boltstream.trainer.apo import run_apo

        return run_apo(settings, max_seconds=args.duration)
    try:
        trainer = Trainer(settings, deepspeed_config=args.deepspeed_config)
    except (SourceError, KafkaException) as exc:
        print(f"boltstream train: cannot read the samples or model-updates topic: {exc}", file=sys.stderr)
        return 1
    try:
        trainer.run(max_steps=args.max_steps, idle_timeout=args.idle_timeout)
        if trainer.step > trainer.last_checkpoint:  # a clean stop keeps every step it trained
            trainer.checkpoint()
    finally:
        trainer.close()
    return 0
