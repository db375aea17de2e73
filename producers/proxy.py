"""The capture proxy: an OpenAI-compatible HTTP proxy that records every LLM call passing through it.

``boltstream proxy --upstream http://vllm:8000 --port 8100`` and point any agent, in any language,
at ``http://127.0.0.1:8100/v1``. Requests are forwarded unchanged (streaming too) except that chat
and completion calls ask the upstream for token ids and logprobs (vLLM's ``return_token_ids``,
``logprobs``) when the client did not; what the proxy added is nulled in the answer again, so the
client sees what it would see without the proxy (``--no-token-ids`` turns this off for upstreams
that reject these parameters). Each call to ``/chat/completions``, ``/completions`` or
``/responses`` becomes an ``llm_call`` span; ``/models`` and ``/embeddings`` are passed through. Only
these inference paths are forwarded (:data:`~boltstream.infra.common.contract.INFERENCE_PATHS`, under ``/v1``
or at the root): any other path is answered 404 without reaching the upstream, so a vLLM's control paths
(``/pause``, ``/collective_rpc``, ``/v1/load_lora_adapter`` ...) cannot be reached through the proxy.

The client's ``Authorization`` goes upstream as it came (e.g. an OpenAI key), unless the proxy holds the
upstream's key itself: ``--upstream-key-file`` for a vLLM started by ``boltstream serve`` (its
``serve.api_key_file``). In front of the router no key is needed: the router adds it.

Credentials in the upstream URL (``http://user:password@vllm:8000``) authenticate the proxy to the
upstream: HTTP Basic, in place of the client's ``Authorization`` header. Neither they nor any request
header is logged or recorded; spans name the upstream without them.

The rollout comes from request headers (removed before forwarding, except the rollout id, which a
boltstream router upstream uses to keep a rollout on one weight version):

=============================  ===========================================================
``X-Boltstream-Rollout-Id``    rollout the call belongs to; without it the call is a rollout
                               of its own, ended at once
``X-Boltstream-Task-Id``       task id of the rollout (first request of the rollout wins)
``X-Boltstream-Agent-Name``    agent name of the rollout
``X-Boltstream-Attempt-Id``    attempt id of the rollout
=============================  ===========================================================

A rollout identified by header ends (its root span is emitted) on ``POST /boltstream/rollouts/<id>/end``,
after ``--rollout-idle`` seconds without a call, or when the proxy stops. Rewards can be sent through
it too: ``POST /boltstream/rewards`` with ``{"rollout_id": ..., "value": ...}`` (and optionally
``name``, ``is_final``, ``source``, ``task_id``, ``agent_name``, ``attributes``) and the header
``Authorization: Bearer <token>``, the token in ``proxy.rewards_token_file`` (default
``<home>/proxy/rewards-token``, created by the first proxy). Whoever can reward a rollout steers training, so
the token is held by the reward senders, not by every agent; values must be finite numbers within
``[proxy.reward_min, proxy.reward_max]``. Anything else is refused (401, 400) and nothing is recorded. Needs
the ``[proxy]`` extra (aiohttp).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import signal
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import aiohttp
import yarl
from aiohttp import web

from boltstream.infra.common.config import Settings
from boltstream.infra.common.contract import (
    AGENT_HEADER,
    ATTEMPT_HEADER,
    INFERENCE_PATHS,
    ROLLOUT_ID_HEADER,
    TASK_HEADER,
)
from boltstream.infra.common.credentials import read_secret, rewards_token, rewards_token_file
from boltstream.producers import runtime
from boltstream.producers.context import attached, rollout
from boltstream.producers.emit import send_reward
from boltstream.producers.llm_capture import LlmCapture, endpoint_of, token_parameters
from boltstream.producers.redaction import url_without_credentials

log = logging.getLogger("boltstream.proxy")

HEADER_PREFIX = "x-boltstream-"
_HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
    )
)
_MAX_OPEN_ROLLOUTS = 100_000


def _forwardable(headers: Any) -> dict[str, str]:
    return {
        k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP and not k.lower().startswith(HEADER_PREFIX)
    }


def _compact(event: Any) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _error(status: int, message: str, kind: str) -> web.Response:
    """An error answer shaped as OpenAI's, so clients report it as they report the upstream's."""
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


class CaptureProxy:
    """The proxy's state: the upstream session and the rollouts named by request headers.

    ``rewards_token`` is what ``POST /boltstream/rewards`` requires, ``reward_range`` the values it takes
    (bounds included). The upstream's credentials replace the client's ``Authorization``: either a
    ``user:password`` in ``upstream`` (sent as HTTP Basic) or ``upstream_key`` (sent as a bearer token).
    Neither is ever shown: logs, messages and spans name the upstream without them.
    """

    def __init__(
        self,
        upstream: str,
        *,
        rewards_token: str,
        reward_range: tuple[float, float],
        upstream_key: str | None = None,
        request_token_ids: bool = True,
        rollout_idle: float = 300.0,
    ) -> None:
        url = yarl.URL(upstream.rstrip("/"))
        self._upstream_basic = aiohttp.BasicAuth.from_url(url)
        if self._upstream_basic is not None and upstream_key:
            raise ValueError("give the upstream's credentials in its URL or as its key, not both")
        self._upstream_key = {"Authorization": f"Bearer {upstream_key}"} if upstream_key else {}
        self.upstream = str(url.with_user(None))  # forwarded to; the credentials go as a header
        self.shown_upstream = url_without_credentials(self.upstream)  # in logs and messages
        self.request_token_ids = request_token_ids
        self.rollout_idle = rollout_idle
        self.reward_range = reward_range
        self._rewards_authorization = f"Bearer {rewards_token}".encode()
        self._rollouts: OrderedDict[str, tuple[rollout, float]] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None
        self._reaper: asyncio.Task | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/boltstream/rewards", self.reward)
        app.router.add_post("/boltstream/rollouts/{rollout_id}/end", self.end_rollout)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, _app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10), auto_decompress=True
        )
        self._reaper = asyncio.create_task(self._end_idle_rollouts())

    async def _cleanup(self, _app: web.Application) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for run, _ in self._rollouts.values():
            run.end()
        self._rollouts.clear()
        if self._session is not None:
            await self._session.close()

    # -- rollouts -----------------------------------------------------------------------------
    def _rollout_for(self, headers: Any) -> tuple[rollout, bool]:
        """The rollout a request belongs to, and whether it is a one-call rollout to end right away."""
        rollout_id = headers.get(ROLLOUT_ID_HEADER)
        task_id, agent_name = headers.get(TASK_HEADER, ""), headers.get(AGENT_HEADER, "")
        attempt = headers.get(ATTEMPT_HEADER, "attempt-0")
        if not rollout_id:
            return rollout(task_id=task_id, agent_name=agent_name, attempt=attempt), True
        known = self._rollouts.pop(rollout_id, None)
        run = known[0] if known else rollout(task_id, agent_name, attempt, rollout_id=rollout_id)
        self._rollouts[rollout_id] = (run, time.monotonic())
        if len(self._rollouts) > _MAX_OPEN_ROLLOUTS:
            _, (oldest, _) = self._rollouts.popitem(last=False)
            oldest.end()
        return run, False

    async def _end_idle_rollouts(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.rollout_idle / 2))
            cutoff = time.monotonic() - self.rollout_idle
            while self._rollouts:
                rollout_id, (run, last_used) = next(iter(self._rollouts.items()))
                if last_used > cutoff:
                    break
                del self._rollouts[rollout_id]
                run.end()

    async def end_rollout(self, request: web.Request) -> web.Response:
        known = self._rollouts.pop(request.match_info["rollout_id"], None)
        if known is None:
            return web.json_response({"ended": False, "reason": "unknown or already ended rollout"}, status=404)
        known[0].end()
        return web.json_response({"ended": True})

    async def reward(self, request: web.Request) -> web.Response:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, self._rewards_authorization):
            return _error(401, "rewards need 'Authorization: Bearer <the proxy's rewards token>'", "unauthorized")
        try:
            body = await request.json()
            value, rollout_id = body["value"], body["rollout_id"]
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f"expected {{'rollout_id': str, 'value': number}}: {exc!r}", "invalid_request_error")
        low, high = self.reward_range
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            # NaN fails every comparison and ±inf the bounds: both end here with the out-of-range values.
            message = (
                f"value must be a finite number in [{low}, {high}] (proxy.reward_min, proxy.reward_max), not {value!r}"
            )
            return _error(400, message, "invalid_request_error")
        if not isinstance(rollout_id, str) or not rollout_id:
            return _error(400, f"rollout_id must be a non-empty string, not {rollout_id!r}", "invalid_request_error")
        options = {
            k: body[k] for k in ("name", "is_final", "source", "task_id", "agent_name", "attributes") if k in body
        }
        event_id = send_reward(rollout_id, value, **options)
        return web.json_response({"event_id": event_id})

    # -- forwarding ---------------------------------------------------------------------------
    def _upstream_headers(self, request: web.Request) -> dict[str, str]:
        """The request's headers to forward: with the upstream's credentials, not the client's."""
        headers = _forwardable(request.headers)
        if self._upstream_basic is None and not self._upstream_key:
            return headers
        return {k: v for k, v in headers.items() if k.lower() != "authorization"} | self._upstream_key

    async def forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        # The path checked is the one sent: rel_url as it came, not a decoded or normalised form of it.
        if request.rel_url.raw_path not in INFERENCE_PATHS:
            return _error(404, f"{request.path} is not an inference path; the proxy forwards only those", "not_found")
        url = self.upstream + str(request.rel_url)
        headers = self._upstream_headers(request)
        body = await request.read()
        endpoint = endpoint_of(request.path) if request.method == "POST" else None
        payload = None
        if endpoint is not None:
            try:
                payload = json.loads(body) if body else None
            except ValueError:
                payload = None  # not JSON: the upstream will say what is wrong
        if not isinstance(payload, dict):
            return await self._pass_through(request, url, headers, body)
        added = token_parameters(endpoint, payload) if self.request_token_ids else {}
        if added:
            body = _compact({**payload, **added})
        run, one_call = self._rollout_for(request.headers)
        capture = LlmCapture(endpoint, payload, self.upstream, frozenset(added))
        error: BaseException | str | None = None
        try:
            # A boltstream router upstream keeps every call of a rollout on one weight version.
            headers[ROLLOUT_ID_HEADER] = run.rollout_id
            async with self._session.request(
                request.method, url, headers=headers, data=body, auth=self._upstream_basic
            ) as upstream:
                capture.add_headers(upstream.headers)
                if upstream.status >= 400:
                    data = await upstream.read()
                    error = f"HTTP {upstream.status}: {data[:500].decode('utf-8', 'replace')}"
                    return web.Response(status=upstream.status, body=data, headers=_forwardable(upstream.headers))
                if upstream.content_type == "text/event-stream":
                    return await self._relay_stream(request, upstream, capture)
                data = await upstream.read()
                if upstream.content_type == "application/json":
                    answer = json.loads(data)
                    capture.add_response(answer)
                    if added:
                        data = _compact(answer)
                return web.Response(status=upstream.status, body=data, headers=_forwardable(upstream.headers))
        except aiohttp.ClientError as exc:
            error = exc
            return _error(502, f"upstream {self.shown_upstream} failed: {exc}", "bad_gateway")
        except (ConnectionResetError, asyncio.CancelledError) as exc:  # the client went away
            error = exc
            raise
        finally:
            with attached(run):
                capture.finish(error)
            if one_call:
                run.end()

    async def _relay_stream(
        self, request: web.Request, upstream: aiohttp.ClientResponse, capture: LlmCapture
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, headers=_forwardable(upstream.headers))
        await response.prepare(request)
        async for line in upstream.content:
            if line.startswith(b"data:"):
                data = line[5:].strip()
                if data and data != b"[DONE]":
                    try:
                        event = json.loads(data)
                    except ValueError:
                        event = None
                    if isinstance(event, dict):
                        capture.add_chunk(event)
                        if capture.added:
                            line = b"data: " + _compact(event) + b"\n"
            await response.write(line)
        await response.write_eof()
        return response

    async def _pass_through(self, request: web.Request, url: str, headers: dict[str, str], body: bytes) -> web.Response:
        assert self._session is not None
        try:
            async with self._session.request(
                request.method, url, headers=headers, data=body or None, auth=self._upstream_basic
            ) as upstream:
                data = await upstream.read()
                return web.Response(status=upstream.status, body=data, headers=_forwardable(upstream.headers))
        except aiohttp.ClientError as exc:
            return _error(502, f"upstream {self.shown_upstream} failed: {exc}", "bad_gateway")


async def serve(proxy: CaptureProxy, host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Run ``proxy`` on ``host:port`` until cancelled."""
    runner = web.AppRunner(proxy.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("capture proxy on http://%s:%d → %s", host, port, proxy.shown_upstream)
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


# -- CLI: boltstream proxy ---------------------------------------------------------------------


def proxy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--upstream", required=True, help="OpenAI-compatible server to forward to, e.g. http://vllm:8000"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8100, help="port to listen on (default 8100)")
    parser.add_argument(
        "--no-token-ids",
        action="store_true",
        help="do not ask the upstream for token ids and logprobs (for upstreams other than vLLM)",
    )
    parser.add_argument(
        "--rollout-idle", type=float, default=300.0, help="seconds without a call after which a rollout ends (300)"
    )
    parser.add_argument(
        "--upstream-key-file",
        type=Path,
        help="send the key in this file upstream as 'Authorization: Bearer' instead of the client's (a vLLM "
        "started by `boltstream serve`: its serve.api_key_file; not needed in front of the router)",
    )


def proxy_command(args: argparse.Namespace, settings: Settings) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    runtime.configure(settings)
    proxy = CaptureProxy(
        args.upstream,
        rewards_token=rewards_token(settings),
        reward_range=(settings.proxy.reward_min, settings.proxy.reward_max),
        upstream_key=read_secret(args.upstream_key_file, "--upstream-key-file") if args.upstream_key_file else None,
        request_token_ids=not args.no_token_ids,
        rollout_idle=args.rollout_idle,
    )
    log.info("rewards need 'Authorization: Bearer <the token in %s>'", rewards_token_file(settings))

    async def main() -> None:
        task = asyncio.create_task(serve(proxy, args.host, args.port))
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    topics = settings.topics
    print(f"boltstream proxy: http://{args.host}:{args.port}/v1 → {proxy.shown_upstream}")
    print(f"  llm_call spans to {topics.spans}, rewards to {topics.rewards} at {settings.kafka.bootstrap_servers}")
    print("  stops on Ctrl-C or SIGTERM, ending the open rollouts first", flush=True)
    asyncio.run(main())
    return 0 if runtime.shutdown() else 1
