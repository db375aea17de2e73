"""Zero-code auto-tracing: ``producers.instrument()``, or ``AGENT_LIGHTNING_TRACER=1`` (see
:mod:`boltstream.producers.startup`, which switches it on before the program's first line).

Today this traces the ``openai`` client (:mod:`boltstream.producers.openai_patch`), which is what LangChain's
``ChatOpenAI``, the OpenAI Agents SDK and most agent frameworks call underneath. Agents traced with
OpenTelemetry use :mod:`boltstream.producers.otel` instead; agents in other languages use the capture proxy.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

log = logging.getLogger("boltstream.autotrace")

TRACER_ENV = "AGENT_LIGHTNING_TRACER"


def instrument(request_token_ids: bool | None = None, request_logprobs: bool | None = None) -> bool:
    """Patch the ``openai`` client so every LLM call becomes an ``llm_call`` span; False if it is not installed.

    ``request_token_ids`` asks the server for token ids (vLLM's ``return_token_ids``) when the agent did
    not, so every traced call can become a training sample; ``request_logprobs`` asks for the completion's
    logprobs too. Both hide what they added from the agent again. None = the configuration's
    ``producer.request_token_ids`` (on by default) and ``producer.request_logprobs`` (off).
    """
    try:
        from boltstream.producers import openai_patch
    except ImportError:
        log.warning("auto-tracing requested but the openai package is not installed; nothing to trace")
        return False
    from boltstream.producers import runtime

    config = runtime.settings().producer
    openai_patch.patch(
        request_token_ids=config.request_token_ids if request_token_ids is None else request_token_ids,
        request_logprobs=config.request_logprobs if request_logprobs is None else request_logprobs,
    )
    return True


def uninstrument() -> None:
    """Undo :func:`instrument` and :func:`instrument_when_imported`."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _AfterImport)]
    try:
        from boltstream.producers import openai_patch
    except ImportError:
        return
    openai_patch.unpatch()


def instrument_when_imported() -> None:
    """:func:`instrument` now if ``openai`` is imported, else as soon as the program imports it (so a
    program that never uses it does not pay for importing it)."""
    if "openai" in sys.modules:
        instrument()
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport("openai", instrument))


def instrument_from_environment() -> bool:
    """``AGENT_LIGHTNING_TRACER=1`` (or true/yes/on) turns auto-tracing on; called when ``producers`` is imported."""
    if os.environ.get(TRACER_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        instrument_when_imported()
        return True
    return False


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``then()`` once the module ``name`` has been imported, by whoever imports it, whenever."""

    def __init__(self, name: str, then: Callable[[], Any]) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # from now on the module is found as if this finder never was
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute, then = spec.loader.exec_module, self.then

        def exec_module(module: ModuleType) -> None:
            execute(module)
            try:
                then()
            except Exception:  # tracing fails, the program goes on
                log.exception("auto-tracing could not patch %s", fullname)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec
