"""Credit assignment (LightningRL): the return each LLM call of a complete trajectory is trained on.

A trajectory's LLM calls, in trajectory order (span ``sequence``), become one transition each. The
policies decide the ``return_value`` of call ``i`` of ``n``:

``final`` (default)
    every call gets the trajectory's final reward ``R``.
``discounted``
    ``R * discount ** (n - 1 - i)``: the last call gets ``R``, each call before it one factor less.
``per_step``
    the undiscounted return-to-go: ``R`` plus every intermediate reward that comes *after* call ``i``.
    An intermediate reward is credited to all the calls before it and to none after it. Intermediate
    rewards are ``reward`` spans not named ``final`` (placed by their ``sequence``: after call ``i`` when
    their sequence is greater) and ``Reward`` records with ``is_final=false`` (placed by time: after
    call ``i`` when their ``timestamp_us`` is at or after the call's ``end_time_us``).

The final reward ``R`` is the last final reward received in time: a ``Reward`` record with
``is_final=true`` or a ``reward`` span named ``final`` (what the SDK's ``emit_reward(value)`` sends).

All functions here are pure: same inputs, same floats.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import NamedTuple

from boltstream.infra.common.config import CreditPolicy

POLICIES: tuple[CreditPolicy, ...] = typing.get_args(CreditPolicy)


class CallPosition(NamedTuple):
    """Where an LLM call sits in its trajectory."""

    sequence: int
    end_time_us: int


def check_policy(policy: str) -> str:
    """``policy`` if it names a credit-assignment policy, else ValueError listing them."""
    if policy not in POLICIES:
        raise ValueError(f"unknown credit-assignment policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return policy


def assign_credit(
    policy: str,
    calls: Sequence[CallPosition],
    final_reward: float,
    *,
    discount: float = 0.9,
    span_rewards: Sequence[tuple[int, float]] = (),
    record_rewards: Sequence[tuple[int, float]] = (),
) -> list[float]:
    """The return of each call in ``calls`` (given in trajectory order), by ``policy``.

    ``span_rewards`` are ``(sequence, value)`` of intermediate reward spans; ``record_rewards`` are
    ``(timestamp_us, value)`` of intermediate Reward records. Only ``per_step`` reads them.
    """
    check_policy(policy)
    count = len(calls)
    if policy == "final":
        return [final_reward] * count
    if policy == "discounted":
        return [final_reward * discount ** (count - 1 - index) for index in range(count)]
    returns = []
    for call in calls:
        later = sum(value for sequence, value in span_rewards if sequence > call.sequence)
        later += sum(value for timestamp, value in record_rewards if timestamp >= call.end_time_us)
        returns.append(final_reward + later)
    return returns
