"""Zero-code auto-tracing: ``producers.instrument()``, or ``AGENT_LIGHTNING_TRACER=1`` at import.

Today this traces the ``openai`` client (:mod:`boltstream.producers.openai_patch`), which is what LangChain's
``ChatOpenAI``, the OpenAI Agents SDK and most agent frameworks call underneath. Agents traced with
OpenTelemetry use :mod:`boltstream.producers.otel` instead; agents in other languages use the capture proxy.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("boltstream.autotrace")

TRACER_ENV = "AGENT_LIGHTNING_TRACER"


def instrument(request_token_ids: bool = False) -> bool:
    """Patch the ``openai`` client so every LLM call becomes an ``llm_call`` span; False if it is not installed.

    ``request_token_ids=True`` asks the server for token ids and logprobs (vLLM) when the agent did
    not, and hides them from the agent again; leave it off for servers that reject unknown parameters.
    """
    try:
        from boltstream.producers import openai_patch
    except ImportError:
        log.warning("auto-tracing requested but the openai package is not installed; nothing to trace")
        return False
    openai_patch.patch(request_token_ids=request_token_ids)
    return True


def uninstrument() -> None:
    """Undo :func:`instrument`."""
    try:
        from boltstream.producers import openai_patch
    except ImportError:
        return
    openai_patch.unpatch()


def instrument_from_environment() -> bool:
    """``AGENT_LIGHTNING_TRACER=1`` (or true/yes/on) turns auto-tracing on; called when ``producers`` is imported."""
    if os.environ.get(TRACER_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return instrument()
    return False
