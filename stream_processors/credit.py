"""Credit assignment (LightningRL): the return each LLM call of a complete trajectory is trained on.

A trajectory's LLM calls, in trajectory order (span ``sequence``), become one transition each. The
policies decide the ``return_value`` of call ``i`` of ``n``:

``final`` (default)
    every call gets the trajectory's final reward ``R``; step rewards are not used.
``discounted``
    the discounted return-to-go: ``R * discount ** (n - 1 - i)`` (the last call gets ``R``, each call
    before it one factor less), plus each step reward that comes after call ``i``, discounted once per
    call between call ``i`` and that reward (a step reward right after call ``i`` counts in full).
``per_step``
    the undiscounted return-to-go: ``R`` plus every step reward that comes *after* call ``i`` (the
    ``discounted`` rule with a discount of 1).

A step reward is credited to the calls before it and to none after it. The join decides which reward
is final (:meth:`boltstream.stream_processors.join_core.RolloutState.final_reward`: the last ``is_final``
Reward record, else the rollout's last ``reward`` span); every other reward of the trajectory is a step
reward. Reward spans are placed by their ``sequence`` (after call ``i`` when their sequence is greater),
Reward records by time (after call ``i`` when their ``timestamp_us`` is at or after the call's
``end_time_us``).

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

    ``span_rewards`` are ``(sequence, value)`` of step reward spans; ``record_rewards`` are
    ``(timestamp_us, value)`` of step Reward records. ``final`` ignores them.
    """
    check_policy(policy)
    count = len(calls)
    if policy == "final":
        return [final_reward] * count
    gamma = 1.0 if policy == "per_step" else discount
    # For each step reward, which calls it comes after.
    after = [[sequence > call.sequence for call in calls] for sequence, _ in span_rewards]
    after += [[timestamp >= call.end_time_us for call in calls] for timestamp, _ in record_rewards]
    values = [value for _, value in span_rewards] + [value for _, value in record_rewards]
    between = [sum(flags) for flags in after]  # calls after call i and before the reward, once i is passed
    returns = []
    for index in range(count):
        total = final_reward * gamma ** (count - 1 - index)
        for reward, (flags, value) in enumerate(zip(after, values, strict=True)):
            if flags[index]:
                between[reward] -= 1
                total += value * gamma ** between[reward]
        returns.append(total)
    return returns
