"""``agentlightning.tracer.agentops`` under boltstream."""

from boltstream.producers.tracers import AgentOpsTracer

__all__ = ["AgentOpsTracer"]
