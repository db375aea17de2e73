"""Benchmark: trainer tokens/s against a plain torch loop on the same model and data, and the latency from
the end of a step to its ModelUpdate on the topic.

Same model (the tiny Llama, float32), same 8 batches of 64 GRPO samples (arithmetic prompts of 23 tokens,
sampled completions), same loss code, Adam (torch) with clipping at 1.0, one process on this CPU:

* ``plain torch``: pack -> forward -> GRPO loss -> backward -> clip -> Adam step, no DeepSpeed;
* ``deepspeed step``: ``Trainer.train_batch`` (DeepSpeed ZeRO stage 0 engine, same work);
* ``trainer loop``: ``Trainer.run`` reading the same batches from the samples topic on the real broker
  (decode, validate, group, train, ledger) — the trainer as deployed.

Each is timed over all batches, 5 rounds; plain and DeepSpeed steps interleave (the machine is shared), and
the overhead is the median time ratio of back-to-back step pairs. Tokens = prompt + completion
tokens through forward and backward. Target: DeepSpeed's overhead at stage 0 is at most 10%.

Then ``publish latency``: wall time from the end of a step to its ModelUpdate arriving at a consumer of
model-updates (export safetensors, score against the serving policy, upload, verify, produce), median of 3.

Run: ``python -m pytest tests/benchmarks/bench_trainer.py -m benchmark -s``.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import threading
import time

import pytest

BATCHES = 8
ROUNDS = 5
TARGET_OVERHEAD = 0.10
ADAM = {"optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}}, "gradient_clipping": 1.0}


def _batches(model, tokenizer) -> list[list[dict]]:
    from boltstream.infra.demo import arithmetic

    rng = random.Random(0)
    return [
        arithmetic.rollouts(model, tokenizer, rng.sample(arithmetic.PROBLEMS, 8), 8, model_version=0, seed=i)
        for i in range(BATCHES)
    ]


def _tokens(batches) -> int:
    return sum(len(s["prompt_token_ids"]) + len(s["completion_token_ids"]) for b in batches for s in b)


def _plain_step(model, optimizer, tokenizer, samples, grpo) -> None:
    import torch

    from boltstream.trainer.policy import pack, token_logprobs

    batch = pack(samples, grpo.advantages(samples), tokenizer.pad_token_id)
    logprobs = token_logprobs(model, batch)
    loss, _ = grpo.loss(logprobs, logprobs.detach(), batch)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


@pytest.mark.benchmark
def test_trainer_throughput_and_publish_latency(settings, tmp_path):
    from boltstream.infra.demo.model import build_tiny_model
    from boltstream.schemas.codec import codec
    from boltstream.trainer.loop import Trainer
    from boltstream.trainer.policy import load_policy
    from tests.trainer_support import create_topics, produce_samples

    create_topics(settings)
    model_path = build_tiny_model(tmp_path / "tiny", seed=0)
    model, tokenizer = load_policy(model_path)
    batches = _batches(model, tokenizer)
    tokens = _tokens(batches)
    config = dataclasses.replace(
        settings.trainer,
        model_path=str(model_path),
        group_size=8,
        groups_per_step=8,
        publish_interval=10**9,
        checkpoint_interval=10**9,
        max_staleness=10**6,
        weight_sync_threshold=0.0,
    )
    settings = dataclasses.replace(settings, trainer=config)
    trainer = Trainer(settings, deepspeed_config=ADAM)

    import torch

    plain_model, _ = load_policy(model_path)
    plain_optimizer = torch.optim.Adam(plain_model.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8)
    plain, deepspeed, loop, pair_ratios = [], [], [], []
    for _ in range(ROUNDS):
        # Steps interleave (alternating which goes first) so the shared machine's load hits both alike.
        times = {"plain": 0.0, "deepspeed": 0.0}
        for index, samples in enumerate(batches):
            steps = {
                "plain": lambda s=samples: _plain_step(plain_model, plain_optimizer, tokenizer, s, trainer.algorithm),
                "deepspeed": lambda s=samples: trainer.train_batch(s),
            }
            pair = {}
            for name in sorted(steps, reverse=index % 2 == 1):
                started = time.perf_counter()
                steps[name]()
                pair[name] = time.perf_counter() - started
                times[name] += pair[name]
            pair_ratios.append(pair["deepspeed"] / pair["plain"])
        plain.append(times["plain"])
        deepspeed.append(times["deepspeed"])
        produce_samples(settings, [s for b in batches for s in b])
        started = time.perf_counter()
        assert trainer.run(max_steps=BATCHES).steps == BATCHES
        loop.append(time.perf_counter() - started)

    # Latency from the end of a step to the ModelUpdate at a consumer.
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(settings.kafka.client_config(**{"group.id": "bench-latency"}))
    consumer.assign([TopicPartition(settings.topics.model_updates, 0, 0)])
    arrivals: dict[int, float] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            message = consumer.poll(0.01)
            if message is not None and message.error() is None:
                arrivals[codec("ModelUpdate").decode(message.value())["version"]] = time.perf_counter()

    watcher = threading.Thread(target=watch)
    watcher.start()
    latencies, breakdown = [], []
    for samples in batches[:3]:
        metrics = trainer.train_batch(samples)
        trainer.step += 1
        step_end = time.perf_counter()
        decision = trainer.publish(metrics)
        assert decision.published, decision.reason
        deadline = time.monotonic() + 10
        while decision.update["version"] not in arrivals and time.monotonic() < deadline:
            time.sleep(0.001)
        latencies.append(arrivals[decision.update["version"]] - step_end)
        breakdown.append(decision.timings)
    stop.set()
    watcher.join()
    consumer.close()
    trainer.close()

    best = {"plain torch": min(plain), "deepspeed step": min(deepspeed), "trainer loop": min(loop)}
    print(f"\ntrainer throughput, {BATCHES} GRPO steps of 64 samples, {tokens} tokens, best of {ROUNDS} rounds:")
    for name, seconds in best.items():
        ratio = seconds / best["plain torch"]
        print(f"  {name:15s} {tokens / seconds:10,.0f} tokens/s   time x{ratio:.3f} of plain torch")
    # The median ratio of back-to-back step pairs: robust to load spikes that spoil a step or a round.
    overhead = statistics.median(pair_ratios) - 1
    print(
        f"  DeepSpeed stage-0 overhead (median of step-pair ratios): {overhead:+.1%} (target <= {TARGET_OVERHEAD:.0%})"
    )
    median = statistics.median(latencies)
    score = statistics.median(t.get("score_s", 0) for t in breakdown)
    upload = statistics.median(t.get("upload_s", 0) for t in breakdown)
    print(
        f"  step end -> ModelUpdate on the topic: median {median * 1000:.0f} ms "
        f"(score {score * 1000:.0f} ms, upload+verify {upload * 1000:.0f} ms) over {len(latencies)} publishes"
    )
    assert overhead <= TARGET_OVERHEAD, f"DeepSpeed overhead {overhead:.1%} above {TARGET_OVERHEAD:.0%}"
