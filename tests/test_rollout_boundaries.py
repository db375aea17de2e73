"""Rollout boundaries end to end: agents and a verifier as real processes sending through the SDK to the
test broker, and a real join worker (Faust) turning what they sent into trajectories and samples.

An implicit rollout (spans outside ``agl.rollout``) ends on idle time, ``flush()`` or process exit, never
on a reward; its last reward is the final one and earlier ones are step rewards for credit assignment; a
reward sent from another process within ``reward_timeout`` of a rollout's end is joined, not late.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from boltstream.infra.common.config import Settings
from boltstream.stream_processors.join import join_status
from tests.join_harness import Collector, JoinProcess, join_settings, prepare
from tests.producer_helpers import consume, sdk_environment

# Two LLM calls with token ids, each followed by a reward, then a decision: the seed documents' order
# (emit_reward(score), then emit_decision()) inside one episode. No flush: the process exit ends it.
SEED_ORDER_AGENT = """
from boltstream import agl
from tests.records import make_llm

agl.emit_span("llm_call", "chat", llm=make_llm(8, 4))
agl.emit_reward(0.3)  # a plan's reward: a step reward, since a later one comes
agl.emit_decision("answer")
agl.emit_span("llm_call", "chat", llm=make_llm(8, 4))
agl.emit_reward(1.0)  # the last reward: the final one
agl.emit_decision()
print(agl.current_rollout_id())
"""

# An implicit rollout with a step reward, ended by flush(); an explicit rollout without a reward; an
# explicit rollout whose block gives its final reward. The first two get theirs from a verifier later.
VERIFIED_AGENT = """
from boltstream import agl
from tests.records import make_llm

agl.emit_span("llm_call", "chat", llm=make_llm(8, 4))
agl.emit_reward(0.2)
print(agl.current_rollout_id())
assert agl.flush(30)  # ends the implicit rollout
with agl.rollout(task_id="explicit", agent_name="agent") as run:
    agl.emit_span("llm_call", "chat", llm=make_llm(8, 4))
print(run.rollout_id)
with agl.rollout(task_id="rewarded", agent_name="agent") as run:
    agl.emit_span("llm_call", "chat", llm=make_llm(8, 4))
    agl.emit_reward(0.9)
print(run.rollout_id)
"""

VERIFIER = """
import sys
from boltstream import agl

for rollout_id in sys.argv[1:]:
    agl.send_reward(rollout_id, 1.0, source="verifier")
assert agl.flush(30)
"""


def run_python(settings: Settings, code: str, *args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=sdk_environment(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def collect(settings: Settings, rollout_ids: list[str], samples: int, timeout: float) -> tuple[dict, list]:
    """The trajectories of ``rollout_ids`` (by rollout id) and ``samples`` training samples, once all are out."""
    trajectories = Collector(settings, settings.topics.trajectories, "Trajectory", "trajectory_id")
    produced = Collector(settings, settings.topics.samples, "TrainingSample", "sample_id")
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            trajectories.poll()
            produced.poll()
            done = {t["rollout_id"] for t in trajectories.records.values()} >= set(rollout_ids)
            if done and len(produced.records) >= samples:
                break
    finally:
        trajectories.close()
        produced.close()
    return {t["rollout_id"]: t for t in trajectories.records.values()}, list(produced.records.values())


def returns(samples: list[dict[str, Any]], rollout_id: str) -> list[float]:
    ours = sorted((s for s in samples if s["rollout_id"] == rollout_id), key=lambda s: s["step_index"])
    return [round(s["return_value"], 6) for s in ours]


def test_the_seed_order_is_one_episode_whose_last_reward_is_final(broker, settings: Settings) -> None:
    settings = join_settings(settings, 3.0, credit_assignment="per_step")
    prepare(settings)
    worker = JoinProcess(settings)
    try:
        (rollout_id,) = run_python(settings, SEED_ORDER_AGENT)
        spans = consume(
            settings.kafka.bootstrap_servers, settings.topics.spans, lambda found: len(found) >= 7, timeout=30
        )
        trajectories, samples = collect(settings, [rollout_id], 2, timeout=90)
        status = join_status(worker.metrics_url)
    finally:
        worker.stop()
    assert {s["rollout_id"] for s in spans} == {rollout_id}, "the reward split the episode"
    ended = [s for s in spans if s["kind"] == "rollout"]
    assert len(ended) == 1 and ended[0]["attributes"]["implicit"] == "true"  # ended by the process exit
    assert [s["kind"] for s in sorted(spans, key=lambda s: s["sequence"])] == [
        "llm_call",
        "reward",
        "decision",
        "llm_call",
        "reward",
        "decision",
        "rollout",
    ]
    assert list(trajectories) == [rollout_id], worker.log()
    trajectory = trajectories[rollout_id]
    assert (trajectory["status"], trajectory["final_reward"], trajectory["rewards"]) == ("complete", 1.0, [0.3, 1.0])
    assert trajectory["span_count"] == 7
    # An implicit rollout stays open for its whole reward window (3 s here) before it closes.
    assert trajectory["closed_at_us"] == trajectory["end_time_us"] + 3_000_000
    # per_step: the first call gets the final reward plus the step reward after it.
    assert returns(samples, rollout_id) == [1.3, 1.0]
    assert status["late_rewards"] == 0


def test_a_reward_sent_from_another_process_after_the_end_is_joined(broker, settings: Settings) -> None:
    settings = join_settings(settings, 30.0, credit_assignment="per_step")  # the default reward_timeout
    prepare(settings)
    worker = JoinProcess(settings)
    try:
        implicit, explicit, rewarded = run_python(settings, VERIFIED_AGENT)
        time.sleep(2.0)  # the verifier answers 2 s after the rollouts ended
        run_python(settings, VERIFIER, implicit, explicit)
        trajectories, samples = collect(settings, [implicit, explicit, rewarded], 3, timeout=90)
        status = join_status(worker.metrics_url)
    finally:
        worker.stop()
    assert set(trajectories) == {implicit, explicit, rewarded}, worker.log()
    outcome = {
        rollout_id: (t["status"], t["final_reward"], t["rewards"], t["span_count"])
        for rollout_id, t in trajectories.items()
    }
    assert outcome == {
        implicit: ("complete", 1.0, [0.2, 1.0], 3),  # the SDK's reward became a step reward
        explicit: ("complete", 1.0, [1.0], 2),
        rewarded: ("complete", 0.9, [0.9], 3),
    }
    for rollout_id in (implicit, explicit):  # joined although it came 2 s or more after the end
        assert trajectories[rollout_id]["closed_at_us"] >= trajectories[rollout_id]["end_time_us"] + 2_000_000
    # The block that gave its reward closed at its end, without waiting for its 30 s window.
    assert trajectories[rewarded]["closed_at_us"] == trajectories[rewarded]["end_time_us"]
    assert {rollout_id: returns(samples, rollout_id) for rollout_id in trajectories} == {
        implicit: [1.2],  # the step reward came after the call
        explicit: [1.0],
        rewarded: [0.9],
    }
    assert status["late_rewards"] == 0 and status["dead_letters"] == {}


def readme_python_blocks(*containing: str) -> list[str]:
    """The README's Python blocks that contain every one of ``containing``, as written."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    return [block for block in blocks if all(part in block for part in containing)]


def test_the_readme_reward_examples_give_the_trajectories_they_promise(broker, settings: Settings) -> None:
    settings = join_settings(settings, 30.0, credit_assignment="per_step")
    prepare(settings)
    (using_it,) = readme_python_blocks('name="tool_ok"', "agl.send_reward(run.rollout_id")
    (implicit,) = readme_python_blocks("agl.current_rollout_id()", "agl.flush()")
    worker = JoinProcess(settings)
    trajectories = Collector(settings, settings.topics.trajectories, "Trajectory", "trajectory_id")
    try:
        for block in (using_it, implicit):
            run_python(settings, block)
        trajectories.until(2, 90)
        status = join_status(worker.metrics_url)
    finally:
        trajectories.close()
        worker.stop()
    outcome = sorted(
        (t["task_id"], t["status"], t["final_reward"], t["rewards"]) for t in trajectories.records.values()
    )
    assert outcome == [("", "complete", 1.0, [0.3, 1.0]), ("t-17", "complete", 1.0, [0.2, 1.0])], worker.log()
    assert status["late_rewards"] == 0


# A framework that calls the model in worker threads (a pool, asyncio.to_thread) while the main thread
# emits the reward, as CrewAI does: no thread opened a rollout.
THREADED_AGENT = """
import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from boltstream import agl
from tests.records import make_llm

def call_model() -> None:
    agl.emit_span("llm_call", "chat", llm=make_llm(8, 4))

with ThreadPoolExecutor(2) as pool:
    list(pool.map(lambda _: call_model(), range(2)))
thread = threading.Thread(target=call_model)
thread.start()
thread.join()
asyncio.run(asyncio.to_thread(call_model))
agl.emit_reward(1.0)
print(agl.current_rollout_id())
"""


def test_worker_threads_and_the_main_thread_share_the_implicit_rollout(broker, settings: Settings) -> None:
    prepare(settings)
    (rollout_id,) = run_python(settings, THREADED_AGENT)
    spans = consume(settings.kafka.bootstrap_servers, settings.topics.spans, lambda found: len(found) >= 6, timeout=30)
    assert sorted(s["kind"] for s in spans) == ["llm_call"] * 4 + ["reward", "rollout"]
    assert {s["rollout_id"] for s in spans} == {rollout_id}, "a thread's calls went to a rollout of their own"
    assert len({s["sequence"] for s in spans}) == 6
