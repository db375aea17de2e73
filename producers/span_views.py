"""Reading recorded spans the way Agent Lightning's helpers do: rewards, messages, objects.

A span here is anything span-like: a :class:`Span` read back from the archive (the store API), an
:class:`~boltstream.producers.emit.EmittedSpan` an emitter returned, a row dict of the ``spans``
table, or an object with ``attributes`` (an OpenTelemetry span). A reward is found in boltstream's
``reward`` field of a ``reward`` span, else in Agent Lightning's ``agentlightning.reward.<i>.value``
attributes (index 0 is the primary reward).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from boltstream.producers.emit import MESSAGE_BODY, OBJECT_JSON, OBJECT_LITERAL, REWARD_PREFIX


@dataclass
class Span:
    """One archived span, with Agent Lightning's field names (``sequence_id``, ``span_id``, times in seconds)
    and boltstream's own (``kind``, ``reward``, ``task_id``, ``agent_name``, ``llm``)."""

    rollout_id: str
    attempt_id: str
    sequence_id: int
    span_id: str
    parent_id: str | None
    name: str
    kind: str
    status: str
    attributes: dict[str, Any]
    start_time: float
    end_time: float
    reward: float | None = None
    error: str | None = None
    task_id: str = ""
    agent_name: str = ""
    #: The llm_call's model, texts and token counts (``llm_*`` columns without the prefix); empty otherwise.
    llm: dict[str, Any] = field(default_factory=dict)

    @property
    def event_id(self) -> str:
        return self.span_id


def _field(span: Any, key: str) -> Any:
    return span.get(key) if isinstance(span, Mapping) else getattr(span, key, None)


def _attributes(span: Any) -> Mapping[str, Any]:
    return _field(span, "attributes") or {}


def get_rewards_from_span(span: Any) -> list[dict[str, Any]]:
    """Every reward dimension of a span as ``{"name", "value"}`` dicts, the primary first; [] if none."""
    attributes = _attributes(span)
    dimensions: list[dict[str, Any]] = []
    index = 0
    while f"{REWARD_PREFIX}.{index}.value" in attributes:
        value = float(attributes[f"{REWARD_PREFIX}.{index}.value"])
        dimensions.append({"name": str(attributes.get(f"{REWARD_PREFIX}.{index}.name", "")), "value": value})
        index += 1
    if dimensions:
        return dimensions
    value = _field(span, "reward")
    if _field(span, "kind") == "reward" and value is not None:
        return [{"name": str(_field(span, "name") or "primary"), "value": float(value)}]
    return []


def get_reward_value(span: Any) -> float | None:
    """The span's (primary) reward, or None if it is not a reward span."""
    rewards = get_rewards_from_span(span)
    return rewards[0]["value"] if rewards else None


def is_reward_span(span: Any) -> bool:
    return get_reward_value(span) is not None


def find_reward_spans(spans: Sequence[Any]) -> list[Any]:
    """The reward spans among ``spans``, in their order."""
    return [span for span in spans if is_reward_span(span)]


def find_final_reward(spans: Sequence[Any]) -> float | None:
    """The reward of the last reward span (spans in their order; the store returns them by sequence)."""
    for span in reversed(spans):
        value = get_reward_value(span)
        if value is not None:
            return value
    return None


def get_message_value(span: Any) -> str | None:
    """The text of a ``message`` span."""
    value = _attributes(span).get(MESSAGE_BODY)
    return None if value is None else str(value)


def get_object_value(span: Any) -> Any:
    """The object an ``object`` span recorded (its JSON decoded), or None."""
    attributes = _attributes(span)
    if OBJECT_JSON in attributes:
        raw = attributes[OBJECT_JSON]
        return json.loads(raw) if isinstance(raw, str) else raw
    return attributes.get(OBJECT_LITERAL)
