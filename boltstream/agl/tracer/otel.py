"""``agentlightning.tracer.otel`` under boltstream."""

from boltstream.producers.tracers import OtelTracer

__all__ = ["OtelTracer"]
