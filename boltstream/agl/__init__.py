"""The agent-side SDK under its short name, and Agent Lightning 0.3's API: ``from boltstream import agl``.

The same public names as :mod:`boltstream.producers` (the ``emit_*`` helpers, ``operation``,
``rollout``, ``LitAgent``, the resources and boltstream's own), plus what Agent Lightning's agents
and algorithms use from it: the store API (:mod:`boltstream.agl.store`), ``LitAgentRunner``
(:mod:`boltstream.agl.runner`), the tracer classes, the reward helpers, ``TraceToMessages``.
Code written for Agent Lightning runs with its import changed: ``import agentlightning as agl``
becomes ``from boltstream import agl``, and ``from agentlightning.X import ...`` becomes
``from boltstream.agl.X import ...`` (submodules ``types``, ``litagent``, ``reward``, ``emitter``,
``runner``, ``store``, ``tracer``, ``tracer.agentops``, ``tracer.otel``, ``adapter``, ``semconv``, ``algorithm``,
``algorithm.apo``, ``algorithm.verl``, ``trainer``).
The README's "Agent Lightning compatibility" table lists every name of its 0.3 API.
"""

import logging as _logging

from boltstream.agl.adapter import TraceAdapter, TraceToMessages
from boltstream.agl.algorithm import APO, VERL, Algorithm, Baseline, FastAlgorithm, algo
from boltstream.agl.runner import Hook, LitAgentRunner
from boltstream.agl.store import InMemoryLightningStore, LightningStore, LightningStoreClient
from boltstream.agl.types import (
    AttemptStatus,
    Attributes,
    AttributeValue,
    Dataset,
    ProxyLLM,
    ResourceUnion,
    RolloutMode,
    RolloutRawResult,
    RolloutStatus,
    Span,
    SpanCoreFields,
    SpanLike,
    TaskInput,
)
from boltstream.producers import *  # noqa: F403 (the SDK's public names are this module's)
from boltstream.producers import __all__ as _sdk_names
from boltstream.producers.emit import EmittedSpan, reward
from boltstream.producers.span_views import (
    find_final_reward,
    find_reward_spans,
    get_message_value,
    get_object_value,
    get_reward_value,
    get_rewards_from_span,
    is_reward_span,
)
from boltstream.producers.tracers import (
    AgentOpsTracer,
    DummyTracer,
    OtelTracer,
    Tracer,
    clear_active_tracer,
    get_active_tracer,
    set_active_tracer,
)


def __getattr__(name: str) -> object:
    """``agl.Trainer``, imported on first use: it drives the whole stack (broker, archive, join, trainer,
    serving), layers above this SDK, and agents that never train must not load the stack's code. This is
    the one import of a higher layer in the SDK, listed and tested in tests/test_layers.py."""
    if name == "Trainer":
        from boltstream.infra.demo.fit import Trainer

        return Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def setup_logging(level: int | str = "INFO", **_: object) -> None:
    """Agent Lightning's ``setup_logging``: log boltstream's messages at ``level`` and above to stderr."""
    logger = _logging.getLogger("boltstream")
    logger.setLevel(level)
    if not any(getattr(handler, "_boltstream_setup", False) for handler in logger.handlers):
        handler = _logging.StreamHandler()
        handler.setFormatter(_logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._boltstream_setup = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


__all__ = [
    *_sdk_names,
    "APO",
    "VERL",
    "AgentOpsTracer",
    "Algorithm",
    "AttemptStatus",
    "AttributeValue",
    "Attributes",
    "Baseline",
    "Dataset",
    "DummyTracer",
    "EmittedSpan",
    "FastAlgorithm",
    "Hook",
    "InMemoryLightningStore",
    "LightningStore",
    "LightningStoreClient",
    "LitAgentRunner",
    "OtelTracer",
    "ProxyLLM",
    "ResourceUnion",
    "RolloutMode",
    "RolloutRawResult",
    "RolloutStatus",
    "Span",
    "SpanCoreFields",
    "SpanLike",
    "TaskInput",
    "TraceAdapter",
    "TraceToMessages",
    "Tracer",
    "algo",
    "clear_active_tracer",
    "find_final_reward",
    "find_reward_spans",
    "get_active_tracer",
    "get_message_value",
    "get_object_value",
    "get_reward_value",
    "get_rewards_from_span",
    "is_reward_span",
    "reward",
    "set_active_tracer",
    "setup_logging",
]
