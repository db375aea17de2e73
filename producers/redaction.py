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

# Each builtin pattern keeps its first group (the part that says what the secret is) and hides the rest.
_BUILTIN_PATTERNS = (
    r"()\bsk-[A-Za-z0-9_\-]{16,}",
    r"(\bBearer\s+)[A-Za-z0-9._~+/=\-]{8,}",
    r"(\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?(?:(?:Basic|Token|Bearer)\s+)?)[^\"'\s,;}]+",
    r"(\b(?:api[_-]?key|apikey|secret|password|passwd|access[_-]?token|client[_-]?secret)[\"']?\s*[:=]\s*[\"']?)"
    r"[^\"'\s,;&}]+",
    r"()\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    r"()\bgh[pousr]_[A-Za-z0-9]{30,}",
    r"()\bxox[abprs]-[A-Za-z0-9\-]{10,}",
)
_SECRET_KEYS = re.compile(
    r"(?i)^(?:.*[._-])?(?:authorization|proxy-authorization|api[_-]?key|apikey|x-api-key|password|passwd|secret|"
    r"client[_-]?secret|access[_-]?token|refresh[_-]?token|cookie|set-cookie)$"
)


def to_text(value: Any) -> str:
    """A string for any attribute value: strings as they are, everything else as JSON (``str`` as a last resort)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):  # e.g. circular references
        return str(value)


class Redactor:
    """Redacts and truncates strings and attribute maps according to the producer settings."""

    def __init__(self, extra_patterns: Iterable[str] = (), max_bytes: int = 16 * 1024) -> None:
        self.max_bytes = max_bytes
        self._builtin = re.compile("|".join(f"(?:{p})" for p in _BUILTIN_PATTERNS), re.IGNORECASE)
        try:
            self._extra = [re.compile(p) for p in extra_patterns]
        except re.error as exc:
            raise ValueError(f"producer.redact_patterns: invalid regular expression: {exc}") from exc

    def redact(self, text: str) -> str:
        """``text`` with every secret replaced by ``[REDACTED]``."""
        text = self._builtin.sub(_keep_label, text)
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
        """A string map fit to leave the process; values of secret-named keys are hidden whole."""
        if not attributes:
            return {}
        cleaned = {}
        for key, value in attributes.items():
            key = str(key)
            cleaned[key] = REDACTED if _SECRET_KEYS.match(key) else self.clean(value)
        return cleaned


def _keep_label(match: re.Match[str]) -> str:
    label = next((g for g in match.groups() if g is not None), "")
    return label + REDACTED
