"""The serving router: one OpenAI-compatible endpoint in front of the vLLM replicas and the weight versions of
every policy they serve.

It owns the traffic split of each policy's canary. A request belongs to one policy (a ``model`` of
``model-updates``; ``trainer.model_name`` when there is one), the first that applies of:

1. ``model=<policy>-v<N>``: that policy, version N pinned;
2. the ``X-Boltstream-Agent-Name`` header (the capture proxy forwards the one its clients send): the first
   policy whose ``agent_selector`` matches the agent, so each agent group's calls go to its own policy,
   whatever model name the agent was configured with;
3. ``model=<policy>``, or no ``model`` when there is one policy: that policy.

Anything else is answered 404. For each request it then picks a weight version of that policy — the canary
with probability ``serve.canary_share`` while a canary runs, else the stable version — then a replica
serving that version, rewrites ``model`` to the name that version is served under (``tiny`` for a
replica's full weights, ``tiny-v3`` for a LoRA adapter) and streams the upstream answer back unchanged,
with two headers added:

* ``X-Boltstream-Model-Version``: the version that produced the answer (the auto-tracer and the capture
  proxy put it into the ``llm_call`` span's ``model_version``, so samples carry it);
* ``X-Boltstream-Server-Id``: the replica that answered (the span's ``server_id``).

Requests with ``X-Boltstream-Rollout-Id`` are split by a hash of it, so all calls of one agent rollout
see the same version and its reward is attributable to it; requests without it are split at random.
``X-Boltstream-Pin-Version: N`` (or ``model=tiny-vN``) asks for version N explicitly, e.g. to score tokens
against the stable policy.

The router forwards only the inference paths (:data:`~boltstream.infra.common.contract.INFERENCE_PATHS`
under ``/v1``) and answers 404 to every other path, so vLLM's control paths (``/v1/load_lora_adapter``,
``/pause`` ...) stay out of reach. It calls the replicas with their API key (``serve.api_key_file``) in
place of whatever ``Authorization`` the agent sent: agents never hold that key. ``GET /health`` says it is
up; ``GET /boltstream/canary`` shows the canary (model, stable and canary versions, canary share) and each
replica's URL and versions, nothing of any rollout.

What is served where comes from Kafka and the replicas themselves: ``served-versions`` (what each
replica's weight_sync sidecar loaded) and ``/v1/models`` of each replica (which LoRA adapters are
loaded); which versions are stable and canary comes from ``canary-decisions``. Without any decision for
a policy, its requests go to the newest version a replica serves.

Policies on different base models live on different replicas: a replica serves a policy when its
``/v1/models`` lists the policy's name or one of its versions (the base model answers to the name of each
policy built on it), or when it reported serving it on ``served-versions``; a replica the router knows
nothing of yet is assumed to serve every policy's base.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from boltstream.infra.common.config import Settings, resolved_policies
from boltstream.infra.common.contract import (
    AGENT_HEADER,
    INFERENCE_PATHS,
    MODEL_VERSION_HEADER,
    PIN_VERSION_HEADER,
    ROLLOUT_ID_HEADER,
    SERVER_ID_HEADER,
)
from boltstream.infra.serving.weight_sync import parse_served_name
from boltstream.schemas.codec import CodecError, codec
from boltstream.stream_processors.join_core import AgentSelector

log = logging.getLogger("boltstream.router")

#: Hop-by-hop and length headers the router must not copy between the two connections.
_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host", "upgrade"}
)
#: Request headers the router does not pass on: the hop-by-hop ones, and the agent's credentials (it sends its own).
_NOT_FORWARDED = _HOP_HEADERS | {"authorization"}
#: What the router forwards: the inference paths vLLM serves (it has no root-level ones).
_FORWARDED_PATHS = frozenset(path for path in INFERENCE_PATHS if path.startswith("/v1/"))


def served_policies(settings: Settings) -> list[tuple[str, tuple[str, ...]]]:
    """(name, agent selector) of every policy the router and the canary serve, in configuration order. One
    policy when none is configured: ``trainer.model_name`` for every agent (``stream.agent_selector`` picks
    the agents that train it, not the ones it serves)."""
    if not settings.policies:
        return [(settings.trainer.model_name, ("all",))]
    return [(policy.name, policy.agent_selector) for policy in resolved_policies(settings)]


class NoRoute(LookupError):
    """No replica serves the version a request needs."""


@dataclass(frozen=True)
class Route:
    version: int
    server_id: str
    url: str
    served_name: str


def bucket(rollout_id: str) -> float:
    """A stable number in [0, 1) for a rollout id: the same rollout always lands on the same side."""
    digest = hashlib.blake2b(rollout_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class RoutingTable:
    """Which versions of policy ``model`` each replica serves, and which ones its canary wants. Thread-safe.

    ``agent_selector`` names the agents whose calls belong to the policy (``all``: every agent)."""

    def __init__(
        self,
        model: str,
        replicas: Mapping[str, str],
        canary_share: float,
        agent_selector: tuple[str, ...] = ("all",),
    ) -> None:
        if not replicas:
            raise ValueError("the router needs at least one replica (server_id=url)")
        if not 0.0 <= canary_share <= 1.0:
            raise ValueError(f"canary_share must be in [0, 1], not {canary_share}")
        self.model = model
        self.replicas = {server_id: url.rstrip("/") for server_id, url in replicas.items()}
        self.canary_share = canary_share
        self.agent_selector = tuple(agent_selector)
        self.selects = AgentSelector(agent_selector)
        self.stable: int | None = None  # None: no decision yet, follow the newest version served
        self.canary: int | None = None
        # Per replica: the version of its base weights (from served-versions; 0 until a full load)
        # and the LoRA versions it has loaded (from its /v1/models).
        self._base: dict[str, tuple[int, str]] = {s: (0, model) for s in self.replicas}
        self._adapters: dict[str, dict[int, str]] = {s: {} for s in self.replicas}
        # Per replica: whether it serves this policy at all (None: not known yet, assumed to).
        self._serves: dict[str, bool | None] = dict.fromkeys(self.replicas)
        self._lock = threading.Lock()

    # -- what the replicas serve --------------------------------------------------------------------

    def on_served_version(self, record: dict[str, Any]) -> None:
        if record["model"] != self.model or record["server_id"] not in self.replicas:
            return
        if record["status"] == "serving":
            with self._lock:
                self._serves[record["server_id"]] = True
                if record["format"] == "full":
                    self._base[record["server_id"]] = (record["version"], record["served_name"] or self.model)
                elif record["version"]:  # version 0 of a LoRA replica is its base, already known
                    self._adapters[record["server_id"]][record["version"]] = record["served_name"]

    def on_models(self, server_id: str, names: list[str]) -> None:
        """The names a replica's ``/v1/models`` lists: it serves the policy if one of them is the policy's, and
        its loaded adapters of the policy are exactly these."""
        versions = {name: parse_served_name(name, self.model) for name in names}
        adapters = {version: name for name, version in versions.items() if version}
        with self._lock:
            self._adapters[server_id] = adapters
            self._serves[server_id] = any(version is not None for version in versions.values())

    def on_decision(self, record: dict[str, Any]) -> None:
        if record["model"] != self.model:
            return
        with self._lock:
            if record["action"] == "start":
                self.stable, self.canary = record["stable_version"], record["candidate_version"]
            elif record["action"] == "promote":
                self.stable, self.canary = record["candidate_version"], None
            else:  # rollback
                self.stable, self.canary = record["stable_version"], None

    def served(self) -> dict[int, list[Route]]:
        """Every version something serves, with the routes to it."""
        routes: dict[int, list[Route]] = {}
        with self._lock:
            for server_id, url in self.replicas.items():
                if self._serves[server_id] is False:
                    continue
                version, name = self._base[server_id]
                routes.setdefault(version, []).append(Route(version, server_id, url, name))
                for version, name in self._adapters[server_id].items():
                    routes.setdefault(version, []).append(Route(version, server_id, url, name))
        return routes

    # -- choosing ------------------------------------------------------------------------------------

    def choose(self, rollout_id: str | None = None, pinned: int | None = None) -> Route:
        """The route of one request (see the module docstring for the rule)."""
        served = self.served()
        if not served:
            raise NoRoute(f"no replica serves {self.model}")
        if pinned is not None:
            if pinned not in served:
                raise NoRoute(f"version {pinned} of {self.model} is not served; served: {sorted(served)}")
            return random.choice(served[pinned])
        with self._lock:
            stable, canary = self.stable, self.canary
        draw = bucket(rollout_id) if rollout_id else random.random()
        if canary is not None and canary in served and draw < self.canary_share:
            return random.choice(served[canary])
        if stable is not None and stable in served:
            return random.choice(served[stable])
        # No decision yet, or the stable version is gone from every replica: the newest served one.
        newest = max(v for v in served if v != canary) if set(served) - {canary} else max(served)
        return random.choice(served[newest])

    def state(self) -> dict[str, Any]:
        """The canary and what each replica serves, as JSON-able data (``GET /boltstream/canary``)."""
        with self._lock:
            replicas = {
                s: {"url": url, "base_version": self._base[s][0], "lora_versions": sorted(self._adapters[s])}
                for s, url in self.replicas.items()
                if self._serves[s] is not False
            }
            return {
                "model": self.model,
                "agent_selector": list(self.agent_selector),
                "stable": self.stable,
                "canary": self.canary,
                "canary_share": self.canary_share,
                "replicas": replicas,
            }


class Follower:
    """Feeds RoutingTables (one per policy) from ``served-versions`` and ``canary-decisions`` (read from the
    beginning)."""

    def __init__(self, settings: Settings, tables: list[RoutingTable]) -> None:
        self.tables = tables
        self.topics = {
            settings.topics.served_versions: ("ServedVersion", "on_served_version"),
            settings.topics.canary_decisions: ("CanaryDecision", "on_decision"),
        }
        self.consumer = Consumer(
            settings.kafka.consumer_config(
                # Control topics with a message now and then: ask often rather than wait on the broker.
                **{"group.id": f"router-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False, "fetch.wait.max.ms": 50}
            )
        )
        partitions = []
        for topic in self.topics:
            metadata = self.consumer.list_topics(topic, timeout=10).topics[topic]
            partitions += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(metadata.partitions)]
        self.consumer.assign(partitions)

    def poll(self, timeout: float) -> int:
        """Apply what arrived within ``timeout``; the number of records applied."""
        applied = 0
        first = self.consumer.poll(timeout)  # then drain: consume() would wait for a full batch
        for message in [first, *self.consumer.consume(num_messages=500, timeout=0)] if first else []:
            if message.error() is not None:
                continue
            record_type, handler = self.topics[message.topic()]
            try:
                record = codec(record_type).decode(message.value() or b"")
            except CodecError as exc:  # the archive dead-letters these; the router only skips them
                log.warning("%s offset %s skipped: %s", message.topic(), message.offset(), exc)
                continue
            for table in self.tables:  # each table keeps what is about its own policy
                getattr(table, handler)(record)
            applied += 1
        return applied

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                self.poll(0.5)
        finally:
            self.consumer.close()


class Router:
    """The HTTP side: an aiohttp app forwarding inference calls to the route their policy's table chooses,
    with ``upstream_key`` (the replicas' API key) as their ``Authorization``. ``tables``: one per policy, in
    the order their agent selectors are tried."""

    def __init__(self, tables: list[RoutingTable], *, upstream_key: str, models_interval: float = 2.0) -> None:
        if not tables:
            raise ValueError("the router needs at least one policy")
        self.tables = {table.model: table for table in tables}
        if len(self.tables) != len(tables):
            raise ValueError(f"two policies of one name among {[t.model for t in tables]}")
        self.replicas = {server_id: url for table in tables for server_id, url in table.replicas.items()}
        self._upstream_auth = {"Authorization": f"Bearer {upstream_key}"}
        self.models_interval = models_interval
        self.requests = 0
        self._session: Any = None
        self._models_task: asyncio.Task | None = None

    def app(self):
        from aiohttp import web

        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_get("/boltstream/canary", self._canary)
        app.router.add_get("/health", self._health)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app) -> None:
        import aiohttp

        # One keep-alive pool for every upstream: no TCP handshake per request.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        self._models_task = asyncio.create_task(self._watch_models())

    async def _on_cleanup(self, app) -> None:
        self._models_task.cancel()
        await self._session.close()

    async def _watch_models(self) -> None:
        """Keep each replica's loaded adapters current from its ``/v1/models``."""
        while True:
            for server_id, url in self.replicas.items():
                try:
                    async with self._session.get(f"{url}/v1/models", headers=self._upstream_auth) as response:
                        names = [m["id"] for m in (await response.json())["data"]]
                    for table in self.tables.values():
                        if server_id in table.replicas:
                            table.on_models(server_id, names)
                except Exception as exc:  # a replica that is down or restarting: keep what we knew
                    log.debug("models of %s unavailable: %s", server_id, exc)
            await asyncio.sleep(self.models_interval)

    async def _canary(self, request):
        from aiohttp import web

        states = [table.state() for table in self.tables.values()]
        # One policy: its state as it always was; several: one entry per policy.
        return web.json_response(states[0] if len(states) == 1 else {"policies": states})

    async def _health(self, request):
        from aiohttp import web

        return web.Response(text="ok")

    async def _forward(self, request):
        import json

        from aiohttp import ClientError, web

        if request.rel_url.raw_path not in _FORWARDED_PATHS:
            return _error(404, f"{request.path} is not an inference path the router serves")
        body = await request.read()
        payload = None
        if body and request.content_type == "application/json":
            try:
                payload = json.loads(body)
            except ValueError:
                return _error(400, "request body is not valid JSON")
        try:
            route = self._route(request, payload)
        except NoRoute as exc:
            return _error(404, str(exc))
        except ValueError as exc:
            return _error(400, str(exc))
        if isinstance(payload, dict) and "model" in payload:
            payload["model"] = route.served_name
            body = json.dumps(payload).encode()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
        headers.update(self._upstream_auth)
        self.requests += 1
        try:
            upstream = await self._session.request(
                request.method, f"{route.url}{request.rel_url}", data=body or None, headers=headers
            )
        except ClientError as exc:
            return _error(502, f"replica {route.server_id} ({route.url}) unreachable: {exc}")
        async with upstream:
            response = web.StreamResponse(status=upstream.status)
            for key, value in upstream.headers.items():
                if key.lower() not in _HOP_HEADERS:
                    response.headers[key] = value
            response.headers[MODEL_VERSION_HEADER] = str(route.version)
            response.headers[SERVER_ID_HEADER] = route.server_id
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        return response

    def policy_of(self, requested: str | None, agent: str | None) -> tuple[RoutingTable, int | None]:
        """The policy of a request for ``model=requested`` from ``agent``, and the version its name pins
        (see the module docstring for the rule); raises NoRoute when no policy applies."""
        if requested and requested not in self.tables:
            for table in self.tables.values():
                version = parse_served_name(requested, table.model)
                if version is not None:
                    return table, version
        if agent:
            for table in self.tables.values():
                if table.selects(agent):
                    return table, None
        if requested in self.tables:
            return self.tables[requested], None
        if not requested and len(self.tables) == 1:
            return next(iter(self.tables.values())), None
        names = sorted(self.tables)
        raise NoRoute(
            f"model {requested!r} is not served here and no policy selects agent {agent!r}; use one of {names}"
        )

    def _route(self, request, payload: Any) -> Route:
        requested = payload.get("model") if isinstance(payload, dict) else None
        table, version = self.policy_of(
            requested if isinstance(requested, str) else None, request.headers.get(AGENT_HEADER)
        )
        pinned = request.headers.get(PIN_VERSION_HEADER)
        if pinned is not None:
            if not pinned.strip().isdigit():
                raise ValueError(f"{PIN_VERSION_HEADER} must be a version number, not {pinned!r}")
            version = int(pinned)
        if version is not None:
            return table.choose(pinned=version)
        return table.choose(rollout_id=request.headers.get(ROLLOUT_ID_HEADER))


def _error(status: int, message: str):
    from aiohttp import web

    kind = "not_found" if status == 404 else "bad_gateway" if status == 502 else "invalid_request_error"
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


class RouterProcess:
    """The router and its Kafka follower running in background threads of this process (``serve`` and tests).

    ``upstream_key`` is the API key of the replicas (``VllmServer.api_key``). ``policies``: (name, agent
    selector) of each policy, in the order the selectors are tried; default :func:`served_policies`.
    ``table`` is the first policy's routing table, ``tables`` all of them by name."""

    def __init__(
        self,
        settings: Settings,
        replicas: Mapping[str, str],
        *,
        upstream_key: str,
        host: str = "127.0.0.1",
        port: int = 0,
        policies: list[tuple[str, tuple[str, ...]]] | None = None,
    ):
        self.settings = settings
        share = settings.serve.canary_share
        tables = [
            RoutingTable(name, replicas, share, selector) for name, selector in policies or served_policies(settings)
        ]
        self.router = Router(tables, upstream_key=upstream_key)
        self.tables = self.router.tables
        self.table = tables[0]
        self.follower = Follower(settings, tables)
        self.host, self.port = host, port
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        """Where this process reaches the router: loopback when it listens on every interface."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 10.0) -> RouterProcess:
        from aiohttp import web

        ready = threading.Event()
        runner = web.AppRunner(self.router.app(), access_log=None)

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
            self._loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(runner.cleanup())
            self._loop.close()

        self._threads = [
            threading.Thread(target=serve, name="router-http", daemon=True),
            threading.Thread(target=self.follower.run, args=(self._stop,), name="router-follower", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        if not ready.wait(timeout):
            raise RuntimeError(f"router did not start listening within {timeout}s")
        return self

    def wait_for(self, predicate, timeout: float = 10.0, *, policy: str | None = None) -> None:
        """Block until ``predicate(table)`` holds for ``policy``'s table (default: the first policy's): the
        follower and /v1/models caught up. Raises TimeoutError."""
        table = self.tables[policy] if policy else self.table
        deadline = time.monotonic() + timeout
        while not predicate(table):
            if time.monotonic() > deadline:
                raise TimeoutError(f"routing table did not reach the expected state: {table.state()}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        for thread in self._threads:
            thread.join(10)
