"""examples/seed_snippets.py runs the seed documents' snippets as written, against the real broker."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from boltstream.infra.common.config import Settings
from boltstream.infra.common.topics import ensure_topics
from tests.producer_helpers import at_least, consume

REPO = Path(__file__).resolve().parents[1]


def run_example(settings: Settings, **env: str) -> str:
    environment = {
        **os.environ,
        "BOLTSTREAM_HOME": str(settings.home),
        "BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "BOLTSTREAM_TOPICS__SPANS": settings.topics.spans,
        "BOLTSTREAM_TOPICS__REWARDS": settings.topics.rewards,
        "PYTHONPATH": str(REPO),
        **env,
    }
    if "OPENAI_BASE_URL" not in env:
        environment.pop("OPENAI_BASE_URL", None)
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "seed_snippets.py")],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


def test_seed_snippets_run_as_written(settings: Settings) -> None:
    ensure_topics(settings)
    output = run_example(settings)
    assert "17 * 23 = 391" in output and "delivered" in output.splitlines()[-1]
    spans = consume(settings.kafka.bootstrap_servers, settings.topics.spans, at_least(10))
    assert len(spans) == 10
    per_rollout = Counter(s["rollout_id"] for s in spans)
    assert len(per_rollout) == 1  # a reward does not end the implicit rollout; the final flush does
    kinds = Counter(s["kind"] for s in spans)
    assert kinds == {"decision": 3, "tool_call": 3, "reward": 3, "rollout": 1}
    tool = min((s for s in spans if s["kind"] == "tool_call"), key=lambda s: s["start_time_us"])  # the first solve
    assert tool["name"] == "multiply" and tool["attributes"]["args.a"] == 17
    assert {s["reward"] for s in spans if s["kind"] == "reward"} == {1.0}


@pytest.mark.slow
def test_seed_snippets_with_the_agent_lightning_tracer(vllm_server, settings: Settings) -> None:
    ensure_topics(settings)
    run_example(
        settings,
        AGENT_LIGHTNING_TRACER="1",
        OPENAI_BASE_URL=vllm_server.openai_base_url,
        OPENAI_API_KEY=vllm_server.api_key,
        MODEL=vllm_server.served_model_name,
    )
    spans = consume(settings.kafka.bootstrap_servers, settings.topics.spans, at_least(13))
    llm_calls = [s for s in spans if s["kind"] == "llm_call"]
    # The example samples (no temperature=0): the tiny random model may end before max_tokens=8.
    assert len(llm_calls) == 3 and all(1 <= s["llm"]["completion_tokens"] <= 8 for s in llm_calls)
    by_rollout = Counter(s["rollout_id"] for s in spans)
    assert by_rollout == {llm_calls[0]["rollout_id"]: 13}  # the LLM calls joined the one implicit rollout
