"""``agentlightning.adapter`` under boltstream: turning a rollout's spans into chat conversations.

:class:`TraceToMessages` gives, for each chat-completion ``llm_call`` span, the OpenAI messages it
sent followed by the assistant's reply (``{"messages": [...], "tools": None}``; boltstream does not
record the tool definitions of a request). The triplet adapters of Agent Lightning feed its VERL
trainer; boltstream's join builds training samples instead, so they are not provided.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from boltstream.producers.span_views import Span


class TraceAdapter:
    """Base class: ``adapt(spans)`` turns a rollout's spans into something else."""

    def adapt(self, source: Sequence[Span], /) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement adapt")


class TraceToMessages(TraceAdapter):
    def adapt(self, source: Sequence[Span], /) -> list[dict[str, Any]]:
        conversations = []
        for span in source:
            if span.kind != "llm_call" or span.name != "chat.completions":
                continue
            prompt = span.llm.get("prompt_text", "")
            try:
                messages = json.loads(prompt) if prompt else []
            except ValueError:  # truncated by producer.max_attribute_bytes: keep it as one message
                messages = [{"role": "user", "content": prompt}]
            reply = span.llm.get("completion_text", "")
            conversations.append({"messages": [*messages, {"role": "assistant", "content": reply}], "tools": None})
        return conversations


__all__ = ["TraceAdapter", "TraceToMessages"]
