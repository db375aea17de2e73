"""Benchmark: the join's SpanBatch reader and TrainingSample writer (schemas.token_arrays) against the general
codec (fastavro) on the same bytes, in the same run.

Traffic: the join benchmark's (tests/traffic.py, 9.2 spans per message, a third of them llm_call spans with
20-200 prompt and 5-80 completion token ids and logprobs). Best of five rounds each, CPU time.

Run: ``python -m pytest tests/benchmarks/bench_token_arrays.py -m benchmark -s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import pytest

from boltstream.schemas.codec import codec
from boltstream.schemas.token_arrays import encode_training_sample, read_span_batch
from tests.traffic import generate


def _best_cpu_seconds(work: Callable[[], None], rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        work()
        best = min(best, time.process_time() - started)
    return best


def _each(function: Callable, items: Iterable) -> Callable[[], None]:
    items = list(items)

    def work() -> None:
        for item in items:
            function(item)

    return work


@pytest.mark.benchmark
def test_reader_and_writer_against_the_codec() -> None:
    batches, samples = codec("SpanBatch"), codec("TrainingSample")
    values = [m.value for m in generate(5, 2000, 2.0, bad_inputs=False).messages if m.topic == "spans"]
    spans = sum(len(batches.decode(v)["spans"]) for v in values)
    fastavro_read = _best_cpu_seconds(_each(batches.decode, values))
    reader = _best_cpu_seconds(_each(read_span_batch, values))

    # One sample per llm_call span, with its arrays as the join holds them (raw) and as lists (codec).
    raw, listed = [], []
    for value in values:
        for span in read_span_batch(value)["spans"]:
            llm = span["llm"]
            if llm is None or not llm["completion_token_ids"].count:
                continue
            sample = {
                "sample_id": span["event_id"],
                "trajectory_id": span["rollout_id"],
                "rollout_id": span["rollout_id"],
                "task_id": span["task_id"],
                "agent_name": span["agent_name"],
                "span_event_id": span["event_id"],
                "step_index": span["sequence"],
                "step_count": 30,
                "model": llm["model"],
                "model_version": llm["model_version"],
                "prompt_token_ids": llm["prompt_token_ids"],
                "completion_token_ids": llm["completion_token_ids"],
                "completion_logprobs": llm["completion_logprobs"],
                "return_value": 0.5,
                "final_reward": 0.5,
                "credit_policy": "final",
                "created_at_us": span["end_time_us"],
            }
            raw.append(sample)
            listed.append(
                sample
                | {
                    "prompt_token_ids": llm["prompt_token_ids"].ints(),
                    "completion_token_ids": llm["completion_token_ids"].ints(),
                    "completion_logprobs": llm["completion_logprobs"].floats(),
                }
            )
    assert [encode_training_sample(s) for s in raw] == [samples.encode(s) for s in listed]
    fastavro_write = _best_cpu_seconds(_each(samples.encode, listed))
    writer = _best_cpu_seconds(_each(encode_training_sample, raw))
    print(
        f"\ntoken arrays benchmark: {spans} spans in {len(values)} SpanBatch messages, {len(raw)} samples"
        f"\n  read_span_batch          {reader / spans * 1e6:6.2f} us/span    "
        f"codec decode (fastavro) {fastavro_read / spans * 1e6:6.2f} us/span  -> {fastavro_read / reader:.2f}x"
        f"\n  encode_training_sample   {writer / len(raw) * 1e6:6.2f} us/sample  "
        f"codec encode (fastavro) {fastavro_write / len(raw) * 1e6:6.2f} us/sample -> {fastavro_write / writer:.2f}x"
    )
    assert reader < fastavro_read and writer < fastavro_write
