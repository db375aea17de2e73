"""Benchmark of redaction: what it finds, what it spares, and what it costs the SDK, measured in one run.

* recall of planted secrets (overall and per kind) and the share of ordinary texts altered, on a corpus of
  tests/secret_corpus.py larger than the tests' and drawn with other seeds (targets: recall ≥ 99%, altered
  ≤ 0.1%);
* the redactor's own cost per text, and the pre-scan's per KB (C and the pure-Python stand-in);
* SDK throughput with the secret search on and off (off: the pre-scan answers no, so no detector runs;
  secret-named attributes and truncation work as ever), interleaved rounds, best of each, for two kinds of
  1 KB tool_call spans: plain prose (what the pre-scan waves through) and texts of the corpus (near-misses
  everywhere, 1% with secrets); end to end (emit → acknowledged, client warmed up) and the producer's work
  alone (clean + encode + produce), with CPU µs per span of all threads.

Run: ``python -m pytest tests/benchmarks/bench_redaction.py -m benchmark -s``. Timings on a shared 2-core
machine are noisy: read the ratios and CPU figures.
"""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from boltstream import agl
from boltstream.infra.common.config import Settings
from boltstream.infra.common.topics import ensure_topics
from boltstream.producers import redaction
from boltstream.producers.redaction import Redactor
from tests import secret_corpus
from tests.producer_helpers import with_producer

pytestmark = pytest.mark.benchmark
ROUNDS = 3
ROLLOUTS, SPANS_PER_ROLLOUT = 2_000, 10  # and the rollout's root span


def test_recall_and_false_positives() -> None:
    redactor = Redactor()
    planted: Counter[str] = Counter()
    missed: Counter[str] = Counter()
    for sample in secret_corpus.secret_samples(20_000, seed=101):
        redacted = redactor.redact(sample.text)
        for secret in sample.planted:
            planted[secret.kind] += 1
            missed[secret.kind] += any(secret_corpus.survives(part, redacted) for part in secret.hidden)
    ordinary = secret_corpus.ordinary_samples(100_000, seed=102)
    altered = sum(redactor.redact(sample.text) != sample.text for sample in ordinary)
    recall = 1 - missed.total() / planted.total()
    per_kind = ", ".join(f"{kind} {1 - missed[kind] / planted[kind]:.1%}" for kind in sorted(planted))
    print(
        f"\nrecall {recall:.3%} of {planted.total():,} planted secrets of {len(planted)} kinds (target 99%); "
        f"{missed.total()} missed\n  per kind: {per_kind}\n"
        f"false positives: {altered} of {len(ordinary):,} ordinary texts altered = {altered / len(ordinary):.3%} "
        f"(target ≤ 0.1%)"
    )
    assert recall >= 0.99 and altered / len(ordinary) <= 0.001


def _per_call_us(function, items: list) -> float:
    started = time.perf_counter()
    for item in items:
        function(item)
    return (time.perf_counter() - started) / len(items) * 1e6


def test_redactor_and_pre_scan_cost() -> None:
    redactor = Redactor()
    rng = random.Random(7)
    prose = [secret_corpus.prose(rng, 160)[:1000] for _ in range(5_000)]
    ordinary = [sample.text for sample in secret_corpus.ordinary_samples(5_000, seed=103)]
    secrets = [sample.text for sample in secret_corpus.secret_samples(5_000, seed=104)]
    passing = sum(map(Redactor.may_hold_secret, ordinary)) / len(ordinary)
    length = sum(map(len, ordinary)) / len(ordinary)
    print(
        f"\nredact() per text: 1 KB prose {_per_call_us(redactor.redact, prose):.2f} µs; corpus ordinary text "
        f"({length:.0f} chars, {passing:.0%} pass the pre-scan) {_per_call_us(redactor.redact, ordinary):.1f} µs; "
        f"texts with secrets {_per_call_us(redactor.redact, secrets):.1f} µs"
    )
    data = [text.encode() for text in prose]
    scans = {"Python": redaction._scan_bytes_in_python}
    try:
        from boltstream.producers._secret_scan import may_hold_secret

        scans["C"] = may_hold_secret
    except ImportError:
        print("  (no C pre-scan built)")
    for name, scan in scans.items():
        print(f"  pre-scan ({name}) of 1 KB prose: {_per_call_us(scan, data):.2f} µs")


def _spans(texts: list[str], count: int) -> list[tuple[dict, str]]:
    """``count`` (args, result) pairs of about 1 KB from ``texts``."""
    rng = random.Random(9)
    return [({"command": rng.choice(texts)[:500], "top_k": i % 10}, rng.choice(texts)[:500]) for i in range(count)]


def _run(settings: Settings, calls: list[tuple[dict, str]], alone: bool) -> tuple[float, float]:
    """Seconds and CPU seconds (all threads) until every span was acknowledged, with a warmed-up client; ``alone``:
    the producer starts on them only at flush (linger 1 h, a buffer larger than the run), and the clock with it."""
    total = ROLLOUTS * SPANS_PER_ROLLOUT
    if alone:
        settings = with_producer(settings, span_buffer_size=2 * total, linger=3600.0)
    else:
        settings = with_producer(settings, span_buffer_size=2048)
    ensure_topics(settings)
    agl.configure(settings)
    try:
        agl.send_reward("warm-up", 0.0)
        assert agl.flush(10)
        started, cpu_started = time.perf_counter(), time.process_time()
        spans = iter(calls)
        for index in range(ROLLOUTS):
            with agl.rollout(task_id=f"task-{index % 100}", agent_name="bench"):
                for _ in range(SPANS_PER_ROLLOUT - 1):
                    args, result = next(spans)
                    agl.emit_tool_call("search", args, result)
        if alone:
            started, cpu_started = time.perf_counter(), time.process_time()
        assert agl.flush(120)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        delivered = agl.stats()["spans_delivered"]
    finally:
        agl.shutdown(5)
    assert delivered == total
    return elapsed, cpu


def test_sdk_throughput_with_redaction_on_and_off(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(5)
    prose = [secret_corpus.prose(rng, 100) for _ in range(2_000)]
    corpus = [sample.text for sample in secret_corpus.ordinary_samples(2_000, seed=105)]
    corpus += [sample.text for sample in secret_corpus.secret_samples(20, seed=106)]
    count = ROLLOUTS * (SPANS_PER_ROLLOUT - 1)
    workloads = {"plain prose": _spans(prose, count), "corpus texts": _spans(corpus, count)}
    scan = redaction._scan_bytes
    results: dict[tuple[str, str, bool], list[tuple[float, float]]] = {}
    for _ in range(ROUNDS):
        for workload, calls in workloads.items():
            for alone in (False, True):
                for mode in ("on", "off"):
                    monkeypatch.setattr(redaction, "_scan_bytes", scan if mode == "on" else lambda data: False)
                    results.setdefault((workload, mode, alone), []).append(_run(settings, calls, alone))
    total = ROLLOUTS * SPANS_PER_ROLLOUT
    lines = []
    for workload in workloads:
        for alone, what in ((False, "end to end"), (True, "producer alone")):
            on_seconds, on_cpu = (min(times) for times in zip(*results[workload, "on", alone], strict=True))
            off_seconds, off_cpu = (min(times) for times in zip(*results[workload, "off", alone], strict=True))
            lines.append(
                f"  {workload:12s} {what:14s}: on {total / on_seconds:8,.0f} spans/s "
                f"({on_cpu / total * 1e6:5.1f} CPU µs/span), off {total / off_seconds:8,.0f} spans/s "
                f"({off_cpu / total * 1e6:5.1f} CPU µs/span) → on/off {off_seconds / on_seconds:.2f}x throughput, "
                f"{on_cpu / off_cpu:.2f}x CPU"
            )
    print(f"\nSDK throughput, 1 KB tool_call spans, {total:,} per run, best of {ROUNDS}:\n" + "\n".join(lines))
