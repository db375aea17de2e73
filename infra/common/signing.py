"""Signed model updates: the trainer signs every ModelUpdate, and serving replicas load only what they can verify.

A ModelUpdate names an artifact and its sha256 itself, so without a signature whoever can write
``model-updates`` chooses what every replica serves. The trainer therefore adds ``signature``: the hex
HMAC-SHA256, under a secret key shared by the trainer and the replicas, of :func:`signed_bytes` — the
canonical JSON (sorted keys, no spaces, ASCII only) of the scheme name :data:`SCHEME` and the fields that
decide what is served, :data:`SIGNED_FIELDS`. The other fields (metrics, scores, times) inform and are not
signed; a field added to the signed set needs a new scheme name, so records signed before still verify.
Because the sha256 is signed and a replica checks the bytes it is about to load against it, a verified
update pins the exact artifact.

``key_id``, a fingerprint of the key (16 hex digits), is part of the record and of what is signed: it
tells "signed with another key" (a replica and the trainer disagree) apart from a forgery.

The key is the content of the file ``trainer.signing_key_file`` (default ``<home>/model-signing.key``),
whitespace around it ignored, at least :data:`MIN_KEY_BYTES` bytes. ``boltstream up`` and ``boltstream
demo`` create the default file with a random key (mode 0600) when it is missing
(:func:`ensure_signing_key`), so a local stack signs and verifies with no setup; elsewhere the same secret
is provisioned to the trainer and every replica (infra/deploy). An explicitly configured file is never
created. Rotating the key: replace the file everywhere and restart; updates signed with the old key are then
refused, so the replicas keep what they serve until the next version is published.

Without a key the trainer does not start, and a replica starts but refuses every update: nothing
unverified is ever loaded.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boltstream.infra.common.config import ConfigError, Settings
from boltstream.infra.common.credentials import create_secret_file

log = logging.getLogger("boltstream.signing")

SCHEME = "boltstream-model-update-hmac-sha256-v1"
#: The ModelUpdate fields a signature covers: what decides the bytes a replica serves, and under which name.
SIGNED_FIELDS = ("model", "version", "uri", "sha256", "format", "base_model", "key_id")
MIN_KEY_BYTES = 32


class SignatureError(ValueError):
    """A ModelUpdate that is unsigned or not signed with this process's key, or no key to verify it with."""


def signed_bytes(update: dict[str, Any]) -> bytes:
    """What the signature of ``update`` is computed over."""
    signed = {name: update[name] for name in SIGNED_FIELDS}
    return json.dumps({"scheme": SCHEME, **signed}, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class SigningKey:
    """The shared secret; its repr leaves the secret out, so it cannot reach a log by accident."""

    secret: bytes = field(repr=False)

    @property
    def key_id(self) -> str:
        return hashlib.sha256(b"boltstream model signing key id\0" + self.secret).hexdigest()[:16]

    def _signature(self, update: dict[str, Any]) -> str:
        return hmac.new(self.secret, signed_bytes(update), hashlib.sha256).hexdigest()

    def sign(self, update: dict[str, Any]) -> dict[str, Any]:
        """``update`` with its ``key_id`` and ``signature``."""
        stamped = {**update, "key_id": self.key_id}
        return {**stamped, "signature": self._signature(stamped)}

    def verify(self, update: dict[str, Any]) -> None:
        """Raise SignatureError unless ``update`` carries this key's signature over its signed fields."""
        if not update["signature"]:
            raise SignatureError("not signed: the update carries no signature")
        if update["key_id"] != self.key_id:
            raise SignatureError(f"signed with key {update['key_id']!r}, not with this process's key {self.key_id!r}")
        if not hmac.compare_digest(update["signature"], self._signature(update)):
            raise SignatureError("the signature does not match the update: forged, or changed after signing")


def load_signing_key(settings: Settings) -> SigningKey:
    """The key in ``settings.signing_key_path``; ConfigError saying how to get one when there is none."""
    path = settings.signing_key_path
    try:
        secret = path.read_bytes().strip()
    except FileNotFoundError:
        raise ConfigError(
            f"trainer.signing_key_file: no model signing key at {path}. `boltstream up` creates one for the "
            "local stack; elsewhere give the trainer and every serving replica the same secret of at least "
            f"{MIN_KEY_BYTES} random bytes (e.g. `openssl rand -hex 32` into a file) and point "
            "trainer.signing_key_file at it"
        ) from None
    except OSError as exc:
        raise ConfigError(f"trainer.signing_key_file: cannot read {path}: {exc.strerror}") from None
    if len(secret) < MIN_KEY_BYTES:
        raise ConfigError(
            f"trainer.signing_key_file: the key in {path} is {len(secret)} bytes; at least {MIN_KEY_BYTES} are needed"
        )
    if path.stat().st_mode & 0o077:
        log.warning("the model signing key %s is readable by other users: chmod 600 it", path)
    return SigningKey(secret)


def ensure_signing_key(settings: Settings) -> Path:
    """The key file of ``settings``; when it is the default one and missing, it is created with a random key."""
    path = settings.signing_key_path
    if settings.trainer.signing_key_file or path.exists():
        return path
    create_secret_file(path, secrets.token_hex(32))
    return path
