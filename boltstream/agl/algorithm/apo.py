"""``agentlightning.algorithm.apo`` under boltstream."""

from boltstream.agl.algorithm import APO

__all__ = ["APO"]
