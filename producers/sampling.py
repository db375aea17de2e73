"""Head sampling: the one rule deciding whether a rollout is kept, shared by the SDK and the stream processors.

A rollout is kept when the first 8 bytes of ``sha256(rollout_id)``, read as a big-endian unsigned
integer and divided by 2**64, fall below the sampling rate. The rule needs nothing but SHA-256, so
any process in any language reaches the same decision for the same rollout: a rollout is all-in or
all-out everywhere.
"""

from __future__ import annotations

import hashlib

_SCALE = 2.0**64


def rollout_fraction(rollout_id: str) -> float:
    """The rollout's stable position in [0, 1): where it falls against any sampling rate."""
    digest = hashlib.sha256(rollout_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def keep_rollout(rollout_id: str, rate: float) -> bool:
    """True when the rollout is kept at sampling ``rate`` (1.0 keeps all, 0.0 none)."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    return rollout_fraction(rollout_id) < rate
