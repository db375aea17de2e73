"""What leaves the process: attribute values turned into strings, secrets redacted, oversize values truncated.

Runs on the SpanProducer's background thread, never on the agent's. Secrets are replaced by
``[REDACTED]``: OpenAI-style keys (``sk-...``), bearer tokens, ``Authorization`` headers, ``api_key=``
style assignments, well-known cloud/GitHub/Slack token shapes, whole values of attributes whose key
names a secret, and every match of the configured ``producer.redact_patterns``. Values longer than
``producer.max_attribute_bytes`` (UTF-8) are cut and end with ``…[truncated N bytes]``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "[REDACTED]"
TRUNCATION_MARKER = "…[truncated {} bytes]"

# Each secret shape is (trigger, pattern): the pattern runs only on text whose lower-cased form contains
# the trigger, so text without secrets costs a few substring searches, not a regex scan per shape.
# A pattern keeps its first group (what the secret is, e.g. "Bearer ") and hides the rest.
_ASSIGNMENT = r"[\"']?\s*[:=]\s*[\"']?"
_SHAPES = (
    ("sk-", r"()\bsk-[A-Za-z0-9_\-]{16,}", 0),
    ("bearer", r"(\bBearer\s+)[A-Za-z0-9._~+/=\-]{8,}", re.IGNORECASE),
    (
        "authorization",
        rf"(\b(?:proxy-)?authorization{_ASSIGNMENT}(?:(?:Basic|Token|Bearer)\s+)?)[^\"'\s,;}}]+",
        re.IGNORECASE,
    ),
    ("api", rf"(\b(?:api[_-]?key|apikey){_ASSIGNMENT})[^\"'\s,;&}}]+", re.IGNORECASE),
    ("secret", rf"(\b(?:client[_-]?)?secret{_ASSIGNMENT})[^\"'\s,;&}}]+", re.IGNORECASE),
    ("passw", rf"(\bpassw(?:or)?d{_ASSIGNMENT})[^\"'\s,;&}}]+", re.IGNORECASE),
    ("token", rf"(\b(?:access|refresh)[_-]?token{_ASSIGNMENT})[^\"'\s,;&}}]+", re.IGNORECASE),
    ("akia", r"()\bAKIA[0-9A-Z]{16}\b", 0),
    ("asia", r"()\bASIA[0-9A-Z]{16}\b", 0),
    ("gh", r"()\bgh[pousr]_[A-Za-z0-9]{30,}", 0),
    ("xox", r"()\bxox[abprs]-[A-Za-z0-9\-]{10,}", 0),
)
_SECRET_KEYS = re.compile(
    r"(?i)^(?:.*[._-])?(?:authorization|proxy-authorization|api[_-]?key|apikey|x-api-key|password|passwd|secret|"
    r"client[_-]?secret|access[_-]?token|refresh[_-]?token|cookie|set-cookie)$"
)


# Built once: json.dumps with options builds an encoder per call.
_json = json.JSONEncoder(ensure_ascii=False, default=str).encode


def to_text(value: Any) -> str:
    """A string for any attribute value: strings as they are, everything else as JSON (``str`` as a last resort)."""
    if isinstance(value, str):
        return value
    try:
        return _json(value)
    except (TypeError, ValueError, RecursionError):  # e.g. circular references
        return str(value)


class Redactor:
    """Redacts and truncates strings and attribute maps according to the producer settings."""

    def __init__(self, extra_patterns: Iterable[str] = (), max_bytes: int = 16 * 1024) -> None:
        self.max_bytes = max_bytes
        self._shapes = [(trigger, re.compile(pattern, flags)) for trigger, pattern, flags in _SHAPES]
        try:
            self._extra = [re.compile(p) for p in extra_patterns]
        except re.error as exc:
            raise ValueError(f"producer.redact_patterns: invalid regular expression: {exc}") from exc
        self._secret_key: dict[str, bool] = {}  # attribute keys repeat: remember the verdict

    def redact(self, text: str) -> str:
        """``text`` with every secret replaced by ``[REDACTED]``."""
        lowered = text.lower()
        for trigger, pattern in self._shapes:
            if trigger in lowered:
                text = pattern.sub(_keep_label, text)
        for pattern in self._extra:
            text = pattern.sub(REDACTED, text)
        return text

    def truncate(self, text: str) -> str:
        """``text`` cut to ``max_bytes`` of UTF-8, with a marker saying how much was cut."""
        if len(text) * 4 <= self.max_bytes:  # cannot exceed the bound whatever the characters
            return text
        raw = text.encode("utf-8")
        if len(raw) <= self.max_bytes:
            return text
        kept = raw[: self.max_bytes].decode("utf-8", errors="ignore")
        return kept + TRUNCATION_MARKER.format(len(raw) - len(kept.encode("utf-8")))

    def clean(self, value: Any) -> str:
        """Any value as a redacted, bounded string."""
        return self.truncate(self.redact(to_text(value)))

    def attributes(self, attributes: Mapping[str, Any] | None) -> dict[str, str]:
        """A string map fit to leave the process; values of secret-named keys are hidden whole.

        The secret search runs once over all values together; only when it finds something is each
        value redacted on its own.
        """
        if not attributes:
            return {}
        cleaned = {}
        for key, value in attributes.items():
            key = key if type(key) is str else str(key)
            secret = self._secret_key.get(key)
            if secret is None:
                secret = bool(_SECRET_KEYS.match(key))
                if len(self._secret_key) < 10_000:
                    self._secret_key[key] = secret
            cleaned[key] = REDACTED if secret else value if type(value) is str else to_text(value)
        joined = "\x00".join(cleaned.values())
        if self._extra or self.redact(joined) != joined:
            return {key: self.clean(value) for key, value in cleaned.items()}
        if len(joined) * 4 > self.max_bytes:
            return {key: self.truncate(value) for key, value in cleaned.items()}
        return cleaned


def _keep_label(match: re.Match[str]) -> str:
    return match.group(1) + REDACTED
