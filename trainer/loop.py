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

A run ends between steps (``--max-steps``, ``--duration``, ``--idle-timeout`` or Ctrl-C) with a checkpoint,
so a clean stop keeps every step. A crash loses at most the steps since the last checkpoint, and those are
retrained from the same samples (the checkpoint holds them or their offsets); the ledger is cut back to the
checkpoint on resume.
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

from boltstream.infra.common.config import ConfigError, Settings, resolved_policies
from boltstream.trainer.artifacts import export_policy
from boltstream.trainer.checkpoint import Checkpointer, Ledger, restore_rng, rng_state
from boltstream.trainer.engine import build_engine, init_distributed, load_deepspeed_config, with_batch_sizes
from boltstream.trainer.grpo import GRPO
from boltstream.trainer.policy import TokenBatch, fill_behaviour, load_policy, pack, token_logprobs
from boltstream.trainer.publish import Decision, Publisher
from boltstream.trainer.sft import SFT
from boltstream.trainer.source import SampleSource, SourceError
from boltstream.trainer.stopping import stop_on_ctrl_c


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


@dataclass
class Run:
    """What one :meth:`Trainer.run` did, and why it ended."""

    steps: int = 0
    samples: int = 0
    tokens: int = 0
    published: list[int] = field(default_factory=list)  # the versions announced on model-updates
    held: int = 0  # candidates kept off model-updates (each reason is in holds.jsonl)
    read: dict[str, int] = field(default_factory=dict)  # rank 0: the source's counters over the run
    stopped: str = ""  # why it ended, in words

    def add(self, result: StepResult) -> None:
        self.steps += 1
        self.samples += result.samples
        self.tokens += result.tokens
        if result.decision is not None and result.decision.published:
            self.published.append(result.decision.update["version"])
        elif result.decision is not None:
            self.held += 1


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
        self.stop_reason = ""  # set by stop(): the run ends after its current step

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
                tokenizer=self.tokenizer,
            )
            self.source.start(state["source"] if state else None)
        self.policy_version = self._broadcast(self.policy_version)

    # -- the loop ---------------------------------------------------------------------------
    def run(
        self,
        max_steps: int | None = None,
        idle_timeout: float | None = None,
        duration: float | None = None,
        poll: float = 1.0,
    ) -> Run:
        """Train until ``max_steps`` more steps are done, ``duration`` s have passed, no batch completed for
        ``idle_timeout`` s, or :meth:`stop` was called. Rank 0 prints a line per step; the returned
        :class:`Run` says what was done and why it ended."""
        run = Run()
        started = idle_since = time.monotonic()
        read_before = self.source.counters.as_dict() if self.rank == 0 else {}
        while not run.stopped:
            batch, stopped = None, ""
            if self.rank == 0:  # rank 0 decides, every rank follows
                if self.stop_reason:
                    stopped = self.stop_reason
                elif max_steps is not None and run.steps >= max_steps:
                    stopped = f"--max-steps reached ({max_steps} steps)"
                elif duration is not None and time.monotonic() - started >= duration:
                    stopped = f"--duration over ({duration:g} s)"
                elif idle_timeout is not None and time.monotonic() - idle_since >= idle_timeout:
                    stopped = f"idle timeout: no complete batch in {idle_timeout:g} s (--idle-timeout)"
                else:
                    batch = self.source.next_batch(self.policy_version, poll)
                    if batch is not None:
                        idle_since = time.monotonic()
            batch, run.stopped = self._broadcast((batch, stopped))
            if batch is not None:
                result = self.train_step(batch)
                run.add(result)
                if self.rank == 0:
                    print(progress_line(result), flush=True)
        if self.rank == 0:
            read_after = self.source.counters.as_dict()
            run.read = {name: read_after[name] - read_before[name] for name in read_after}
        return run

    def stop(self, reason: str) -> None:
        """End :meth:`run` after the current step, giving ``reason`` (safe to call from a signal handler)."""
        self.stop_reason = reason

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
        unknown = any(not bool(b.behaviour_known.all()) for b in packed)
        if updates > 1 or unknown:  # the step-start policy, fixed while the updates move away from it
            with torch.no_grad():
                proximal = [token_logprobs(self.engine, b) for b in packed]
        # Samples served without logprobs take the step-start policy's as their behaviour logprobs.
        computed = sum(fill_behaviour(b, p) for b, p in zip(packed, proximal or [], strict=False))
        totals: dict[str, float] = {"behaviour_logprobs_computed": float(computed)}
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


def progress_line(result: StepResult) -> str:
    """``step 12: 8 samples, 24 tokens, loss 0.0312, reward 0.5, 0.41 s``, and what became of its candidate."""
    metrics = result.metrics
    line = (
        f"step {result.step}: {result.samples} samples, {result.tokens} tokens, loss {metrics['loss']:.4g}, "
        f"reward {metrics['mean_return']:.3g}, {result.seconds:.2f} s"
    )
    decision = result.decision
    if decision is not None and decision.published:
        line += f"; published version {decision.update['version']} (stability {decision.score:.3f})"
    elif decision is not None:
        line += f"; held its candidate: {decision.reason}"
    return line


# -- CLI: boltstream train ---------------------------------------------------------------------
def train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (default: run until stopped)")
    parser.add_argument("--idle-timeout", type=float, help="stop when no batch completed for this many seconds")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--deepspeed-config", help="DeepSpeed JSON config (default: trainer.deepspeed_config)")
    parser.add_argument("--policy", help="the policy ([[policies]] name) to train; needed when several are configured")


def policy_settings(settings: Settings, name: str | None) -> Settings:
    """``settings`` as the policy ``name`` trains with; no name = the only policy, refused when there are several."""
    if name is None:
        policies = [policy.name for policy in resolved_policies(settings)]
        if len(policies) > 1:
            raise ConfigError(
                f"{len(policies)} policies are configured ({', '.join(policies)}): name one with --policy"
            )
        name = policies[0]
    return settings.for_policy(name)


def train_command(args: argparse.Namespace, settings: Settings) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = policy_settings(settings, args.policy)
    if settings.trainer.algorithm == "apo":
        from boltstream.trainer.apo import run_apo

        return run_apo(settings, max_seconds=args.duration)
    try:
        trainer = Trainer(settings, deepspeed_config=args.deepspeed_config)
    except (SourceError, KafkaException) as exc:
        print(f"boltstream train: cannot read the samples or model-updates topic: {exc}", file=sys.stderr)
        return 1
    try:
        stop_on_ctrl_c(lambda: trainer.stop("Ctrl-C"))  # before the start lines, which say Ctrl-C stops it
        if trainer.rank == 0:
            print_start(trainer, args)
        run = trainer.run(max_steps=args.max_steps, idle_timeout=args.idle_timeout, duration=args.duration)
        if trainer.step > trainer.last_checkpoint:  # a clean stop keeps every step it trained
            trainer.checkpoint()
    finally:
        trainer.close()
    if trainer.rank == 0:
        print_summary(trainer, run)
    return 0


def print_start(trainer: Trainer, args: argparse.Namespace) -> None:
    """What ``boltstream train`` started, where it writes, and what stops it."""
    topics = trainer.settings.topics
    if trainer.step:
        where = f"resumed at step {trainer.step} (policy version {trainer.policy_version})"
    else:
        where = "starting at step 0"
    print(
        f"boltstream train: policy {trainer.settings.trainer.model_name}: {trainer.algorithm.name} on "
        f"{trainer.model_path} ({trainer.format} weights), {where}; "
        f"samples from {topics.samples}, versions to {topics.model_updates}"
    )
    print(f"  checkpoints, ledger and holds in {trainer.directory}; artifacts in {trainer.publisher.store.root}")
    limits = [f"--max-steps {args.max_steps}"] if args.max_steps is not None else []
    limits += [f"--duration {args.duration:g} s"] if args.duration is not None else []
    limits += [f"--idle-timeout {args.idle_timeout:g} s"] if args.idle_timeout is not None else []
    print(f"  stops at {' or '.join([*limits, 'Ctrl-C'])}, after its current step, with a checkpoint", flush=True)


#: The source's counters of samples read but not trained on, and how the summary names them.
NOT_TRAINED = {
    "dropped_stale": "too stale",
    "rejected": "not admitted",
    "dead_lettered": "dead-lettered",
    "not_selected": "of other policies",
}


def print_summary(trainer: Trainer, run: Run) -> None:
    """Why the run stopped, and what it did: steps, samples, versions, the checkpoint."""
    skipped = ", ".join(f"{run.read[name]} {words}" for name, words in NOT_TRAINED.items() if run.read[name])
    published = ", ".join(str(version) for version in run.published) or "none"
    checkpoint = f"step {trainer.step} in {trainer.directory}" if trainer.step else "none (no step trained yet)"
    print(f"boltstream train: stopped: {run.stopped}")
    print(
        f"  trained {run.steps} steps on {run.samples} samples ({run.tokens} tokens); "
        f"read {run.read['consumed']} from {trainer.settings.topics.samples}" + (f" ({skipped})" if skipped else "")
    )
    print(f"  versions published: {published}; held: {run.held}; checkpoint: {checkpoint}", flush=True)
