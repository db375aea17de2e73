"""Signed model updates without a broker or vLLM: what a signature covers, which updates verify, and the key
file (created for the local stack, never logged, refused when missing or short)."""

from __future__ import annotations

import io
import logging
import stat

import fastavro
import pytest

from boltstream.infra.common.config import ConfigError, load_settings
from boltstream.infra.common.signing import (
    MIN_KEY_BYTES,
    SignatureError,
    SigningKey,
    ensure_signing_key,
    load_signing_key,
)
from boltstream.schemas.codec import codec, shipped_schemas

KEY = SigningKey(b"k" * MIN_KEY_BYTES)
UPDATE = {
    "model": "tiny",
    "version": 3,
    "parent_version": 2,
    "uri": "file:///store/v000003-abcd",
    "sha256": "ab" * 32,
    "format": "full",
    "base_model": "/models/tiny",
    "step": 30,
    "metrics": {"loss": 0.5},
    "stability_score": 0.9,
    "created_at_us": 1,
    "key_id": "",
    "signature": "",
}


def test_a_signed_update_verifies_through_the_codec() -> None:
    signed = KEY.sign(UPDATE)
    assert signed["key_id"] == KEY.key_id and len(signed["signature"]) == 64
    KEY.verify(codec("ModelUpdate").decode(codec("ModelUpdate").encode(signed)))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("model", "other"),
        ("version", 4),
        ("uri", "file:///store/v000003-evil"),
        ("sha256", "cd" * 32),
        ("format", "lora"),
        ("base_model", "/models/other"),
    ],
)
def test_changing_a_field_that_decides_what_is_served_breaks_the_signature(name: str, value) -> None:
    with pytest.raises(SignatureError, match="does not match"):
        KEY.verify({**KEY.sign(UPDATE), name: value})


def test_fields_that_only_inform_are_not_signed() -> None:
    KEY.verify({**KEY.sign(UPDATE), "metrics": {}, "stability_score": 0.1, "step": 1, "created_at_us": 2})


def test_unsigned_or_otherwise_signed_updates_are_refused() -> None:
    with pytest.raises(SignatureError, match="not signed"):
        KEY.verify(UPDATE)
    other = SigningKey(b"o" * MIN_KEY_BYTES)
    with pytest.raises(SignatureError, match=f"signed with key '{other.key_id}'"):
        KEY.verify(other.sign(UPDATE))
    # A forger who copies this key's id still cannot compute the signature.
    with pytest.raises(SignatureError, match="does not match"):
        KEY.verify({**other.sign(UPDATE), "key_id": KEY.key_id})


def test_version_1_updates_decode_unsigned_and_are_refused() -> None:
    v1 = shipped_schemas()["ModelUpdate"][0]
    assert v1.version == 1
    body = io.BytesIO()
    fastavro.schemaless_writer(body, v1.parsed, {k: v for k, v in UPDATE.items() if k not in ("key_id", "signature")})
    decoded = codec("ModelUpdate").decode(b"\xc3\x01" + v1.fingerprint + body.getvalue())
    assert (decoded["key_id"], decoded["signature"]) == ("", "")
    with pytest.raises(SignatureError, match="not signed"):
        KEY.verify(decoded)


def test_the_local_stack_key_is_created_once_private_and_never_shown(tmp_path, caplog) -> None:
    settings = load_settings(environ={"BOLTSTREAM_HOME": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"no model signing key at .*model-signing\.key.*boltstream up"):
        load_signing_key(settings)
    path = ensure_signing_key(settings)
    assert path == tmp_path / "model-signing.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_signing_key(settings)
    assert ensure_signing_key(settings) == path and load_signing_key(settings) == key  # kept, not replaced
    assert len(key.secret) >= MIN_KEY_BYTES
    assert key.secret.decode() not in repr(key)
    assert [p.name for p in tmp_path.iterdir()] == ["model-signing.key"]  # no temporary file left behind

    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="boltstream.signing"):
        load_signing_key(settings)
    assert "readable by other users" in caplog.text and key.secret.decode() not in caplog.text


def test_a_configured_key_file_is_never_created_and_a_short_key_is_refused(tmp_path) -> None:
    provisioned = tmp_path / "secrets" / "signing.key"
    settings = load_settings(
        environ={"BOLTSTREAM_HOME": str(tmp_path), "BOLTSTREAM_TRAINER__SIGNING_KEY_FILE": str(provisioned)}
    )
    assert ensure_signing_key(settings) == provisioned and not provisioned.exists()
    with pytest.raises(ConfigError, match=f"no model signing key at {provisioned}"):
        load_signing_key(settings)
    provisioned.parent.mkdir()
    provisioned.write_text("  too-short\n")
    with pytest.raises(ConfigError, match="is 9 bytes; at least 32"):
        load_signing_key(settings)
    provisioned.write_text("s" * MIN_KEY_BYTES + "\n")
    assert load_signing_key(settings) == SigningKey(b"s" * MIN_KEY_BYTES)
