"""The shared secrets of the local processes, each kept in a file only its owner can read (mode 0600).

* the **vLLM API key** (``serve.api_key_file``, default ``<home>/serving/vllm-api-key``): vLLM refuses every
  request without it but ``/health``; ``boltstream serve``'s weight_sync sidecar and router hold it (the
  router adds it to the calls it forwards, so agents never need it), and so does a capture proxy pointed
  straight at vLLM with ``--upstream-key-file``;
* the **rewards token** (``proxy.rewards_token_file``, default ``<home>/proxy/rewards-token``): the capture
  proxy takes ``POST /boltstream/rewards`` only with ``Authorization: Bearer <token>``.

A secret in its default place is created (random) by the first process that needs it and kept afterwards,
so every replica and proxy of one home shares it and restarts do not change it. A file named in the
configuration must exist: a missing one is a mistake to report, not a secret to invent.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from boltstream.infra.common.config import ConfigError, Settings


def vllm_api_key_file(settings: Settings) -> Path:
    return Path(settings.serve.api_key_file or settings.home / "serving" / "vllm-api-key").expanduser()


def rewards_token_file(settings: Settings) -> Path:
    return Path(settings.proxy.rewards_token_file or settings.home / "proxy" / "rewards-token").expanduser()


def vllm_api_key(settings: Settings) -> str:
    """The key vLLM requires (see the module docstring)."""
    return _secret(vllm_api_key_file(settings), "serve.api_key_file", configured=bool(settings.serve.api_key_file))


def rewards_token(settings: Settings) -> str:
    """The token ``POST /boltstream/rewards`` of the capture proxy requires (see the module docstring)."""
    configured = bool(settings.proxy.rewards_token_file)
    return _secret(rewards_token_file(settings), "proxy.rewards_token_file", configured=configured)


def read_secret(path: Path, setting: str) -> str:
    """The secret in ``path`` (surrounding whitespace removed); ConfigError naming ``setting`` if there is none."""
    try:
        secret = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from None
    if not secret:
        raise ConfigError(f"{setting}: {path} is empty")
    return secret


def _secret(path: Path, setting: str, *, configured: bool) -> str:
    if not configured and not path.exists():
        create_secret_file(path, secrets.token_urlsafe(32))
    return read_secret(path, setting)


def create_secret_file(path: Path, secret: str) -> None:
    """Write ``secret`` to ``path``, readable by its owner only, unless another process got there first:
    never a partial file, never one replacing a secret that is already in use."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}-{secrets.token_hex(4)}")
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secret + "\n")
        with contextlib.suppress(FileExistsError):  # unlike a rename, a link keeps the first writer's secret
            os.link(staging, path)
    finally:
        staging.unlink(missing_ok=True)
