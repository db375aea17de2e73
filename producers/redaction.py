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

import orjson

REDACTED = "[REDACTED]"
TRUNCATION_MARKER = "…[truncated {} bytes]"

# Each secret shape is (trigger, pattern): the pattern runs only on text whose lower-cased form contains
# the trigger. A pattern keeps its first group (what the secret is, e.g. "Bearer ") and hides the rest.
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
# Before any shape runs, one cheap test says whether any of them can match (``Redactor.may_hold_secret``):
# a single pass in C over the UTF-8 bytes (producers/_secret_scan.c says what it looks for), or the same
# test in a few passes of Python's bytes methods and regular expressions where the C extension was not
# built (it is optional: the SDK installs without a C compiler). Text with non-ASCII characters is folded
# first, in the str domain, and its AWS key ids are searched here.
_AWS_KEY_ID = re.compile("A[KS]IA")
# For non-ASCII text, first in the str domain: the non-ASCII whitespace ``\s`` matches becomes a space,
# and the letters an IGNORECASE regex equates with ASCII ones but ``str.lower()`` leaves alone
# (``re._casefix``: dotless ı, long ſ) become those ASCII letters; so the test stays a superset.
_NON_ASCII_SPACES = (
    "\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_CASE_FIXES = str.maketrans({"\u0131": "i", "\u017f": "s"})
_NON_ASCII_FOLD = str.maketrans({"\u0131": "i", "\u017f": "s", **{space: " " for space in _NON_ASCII_SPACES}})
_SECRET_KEYS = re.compile(
    r"(?i)^(?:.*[._-])?(?:authorization|proxy-authorization|api[_-]?key|apikey|x-api-key|password|passwd|secret|"
    r"client[_-]?secret|access[_-]?token|refresh[_-]?token|cookie|set-cookie)$"
)

# The Python scan reads the bytes folded as the C scan compares them, and backwards: what must stand
# before a ':' or '-' then follows it, which a regular expression can say (a lookbehind cannot: its width
# is fixed), and each search starts at one literal byte, which the re module finds quickly.
_FOLD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ=_", b"abcdefghijklmnopqrstuvwxyz:-")
# The C scan's assignment (a key word, an optional quote, spaces, ':') and dashed token prefix, backwards.
_ASSIGNMENT_BACKWARDS = re.compile(rb":[ \t-\r\x1c-\x1f]*[\"']?(?:yek|noitazirohtua|terces|dwssap|drowssap|nekot)")
_TOKEN_PREFIX_BACKWARDS = re.compile(rb"-(?:ks|[abprs]xox|[pousr]hg)(?![a-z0-9])")


def _scan_bytes_in_python(data: bytes) -> bool:
    """The C pre-scan's ``may_hold_secret(data)`` in Python: the same answer for any bytes, 10-20 times slower
    (3.5 µs for a 1 KB span's texts, against 0.17 µs)."""
    folded = data.translate(_FOLD)
    backwards = folded[::-1]
    return (
        _ASSIGNMENT_BACKWARDS.search(backwards) is not None
        or _TOKEN_PREFIX_BACKWARDS.search(backwards) is not None
        or b"bearer" in folded
        or b"AKIA" in data
        or b"ASIA" in data
    )


try:
    from boltstream.producers._secret_scan import may_hold_secret as _scan_bytes
except ImportError:  # installed without a C compiler
    _scan_bytes = _scan_bytes_in_python


# Attribute values that are not strings are snapshotted on the agent's thread as compact JSON. orjson
# writes a 1 KB tool-argument dict in ~0.2 µs where the json module takes ~1.5 µs (the largest share
# of an emit call). What orjson refuses (ints beyond 64 bits, keys it cannot turn into strings, values
# nested deeper than 254 levels, lone surrogates) goes through the json module in the same format.
# Differences from the json module: NaN and infinities become null; dataclasses, datetimes, UUIDs and
# enums are written as JSON values (ISO dates) instead of their str().
_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS
_json = json.JSONEncoder(ensure_ascii=False, default=str, separators=(",", ":")).encode


def to_text(value: Any) -> str:
    """A string for any attribute value: strings as they are, everything else as JSON (``str`` as a last resort)."""
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value, default=str, option=_ORJSON_OPTIONS).decode()
    except TypeError:  # orjson.JSONEncodeError is one
        pass
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
        self._secret_key: dict[str, bool] = {}

    @staticmethod
    def may_hold_secret(text: str) -> bool:
        """False when no built-in secret shape matches anywhere in ``text``; True means "look closer".

        A superset test, several times cheaper than searching each shape's trigger: text without
        secrets (the usual case) costs a few passes at C speed over its bytes.
        """
        if text.isascii():
            return _scan_bytes(text.encode("ascii"))
        folded = text.lower().translate(_NON_ASCII_FOLD).encode("utf-8", "surrogatepass")
        return _scan_bytes(folded) or _AWS_KEY_ID.search(text) is not None

    def redact(self, text: str) -> str:
        """``text`` with every secret replaced by ``[REDACTED]``."""
        if self.may_hold_secret(text):
            lowered = _fold(text)
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

    def is_secret_key(self, key: str) -> bool:
        """True when an attribute named ``key`` holds a secret as a whole (its value is hidden)."""
        secret = self._secret_key.get(key)
        if secret is None:
            secret = bool(_SECRET_KEYS.match(key))
            if len(self._secret_key) < 10_000:  # attribute keys repeat: remember the verdict
                self._secret_key[key] = secret
        return secret

    def plain_keys(self, keys: Iterable[Any]) -> bool:
        """True when :meth:`attributes` keeps these keys and the values under them (but for redaction inside
        them): strings naming no secret."""
        return all(type(key) is str and not self.is_secret_key(key) for key in keys)

    def fits(self, text: str) -> bool:
        """True when :meth:`truncate` leaves ``text`` as it is; long non-ASCII text is left to it."""
        return len(text) * 4 <= self.max_bytes or (len(text) <= self.max_bytes and text.isascii())

    def finds_nothing_in(self, text: str) -> bool:
        """True when redaction leaves ``text`` as it is (the one search of a batch's joined texts).

        Configured patterns may be anchored (``^...$``), so they are never run on joined texts: with
        any configured, the answer is False and each value is cleaned on its own.
        """
        return not self._extra and not (self.may_hold_secret(text) and self.redact(text) != text)

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
            cleaned[key] = REDACTED if self.is_secret_key(key) else value if type(value) is str else to_text(value)
        joined = "\x00".join(cleaned.values())
        if not self.finds_nothing_in(joined):
            return {key: self.clean(value) for key, value in cleaned.items()}
        if len(joined) * 4 > self.max_bytes:
            return {key: self.truncate(value) for key, value in cleaned.items()}
        return cleaned


def _fold(text: str) -> str:
    """``text`` lower-cased so that a trigger found in it is found whatever case the shape's regex ignores."""
    lowered = text.lower()
    return lowered if text.isascii() else lowered.translate(_CASE_FIXES)


def _keep_label(match: re.Match[str]) -> str:
    return match.group(1) + REDACTED
