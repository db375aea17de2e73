"""``agentlightning.reward`` under boltstream: emitting rewards and finding them among spans."""

from boltstream.producers.emit import emit_reward, reward
from boltstream.producers.span_views import (
    find_final_reward,
    find_reward_spans,
    get_reward_value,
    get_rewards_from_span,
    is_reward_span,
)

__all__ = [
    "emit_reward",
    "find_final_reward",
    "find_reward_spans",
    "get_reward_value",
    "get_rewards_from_span",
    "is_reward_span",
    "reward",
]
