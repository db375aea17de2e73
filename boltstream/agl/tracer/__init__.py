"""``agentlightning.tracer`` under boltstream: tracer classes that switch boltstream's tracing on."""

from boltstream.producers.tracers import (
    AgentOpsTracer,
    DummyTracer,
    OtelTracer,
    Tracer,
    clear_active_tracer,
    get_active_tracer,
    set_active_tracer,
)

__all__ = [
    "AgentOpsTracer",
    "DummyTracer",
    "OtelTracer",
    "Tracer",
    "clear_active_tracer",
    "get_active_tracer",
    "set_active_tracer",
]
