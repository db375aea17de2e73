"""Credit-assignment policies, checked against hand-computed returns."""

from __future__ import annotations

import pytest

from boltstream.stream_processors.credit import CallPosition, assign_credit

CALLS = [CallPosition(sequence=1, end_time_us=100), CallPosition(sequence=4, end_time_us=400)]
CALLS.append(CallPosition(sequence=7, end_time_us=700))


def test_final_gives_every_call_the_final_reward() -> None:
    assert assign_credit("final", CALLS, 0.8) == [0.8, 0.8, 0.8]


def test_discounted_decays_with_distance_to_the_end() -> None:
    assert assign_credit("discounted", CALLS, 1.0, discount=0.5) == [0.25, 0.5, 1.0]


def test_per_step_credits_intermediate_rewards_to_the_calls_before_them() -> None:
    # A reward span between calls 0 and 1 (sequence 2), one after the last call (sequence 8), and an
    # intermediate Reward record timed between calls 1 and 2.
    returns = assign_credit("per_step", CALLS, 1.0, span_rewards=[(2, 0.1), (8, 0.01)], record_rewards=[(500, 0.2)])
    assert returns == pytest.approx([1.0 + 0.1 + 0.01 + 0.2, 1.0 + 0.01 + 0.2, 1.0 + 0.01])


def test_per_step_record_reward_at_the_call_end_counts_as_after_it() -> None:
    assert assign_credit("per_step", CALLS[:1], 0.0, record_rewards=[(100, 0.5)]) == [0.5]


def test_no_calls_no_returns() -> None:
    assert assign_credit("discounted", [], 1.0) == []


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="per_step"):
        assign_credit("montecarlo", CALLS, 1.0)


def test_discounted_credits_step_rewards_discounted_once_per_call_between() -> None:
    # A step reward span right after call 0 (sequence 2) counts in full for call 0; a step Reward record
    # timed between calls 1 and 2 counts in full for call 1 and once discounted for call 0.
    returns = assign_credit(
        "discounted", CALLS, 1.0, discount=0.5, span_rewards=[(2, 0.4)], record_rewards=[(500, 0.2)]
    )
    assert returns == pytest.approx([0.25 + 0.4 + 0.2 * 0.5, 0.5 + 0.2, 1.0])
