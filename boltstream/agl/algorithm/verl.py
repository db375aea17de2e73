"""``agentlightning.algorithm.verl`` under boltstream."""

from boltstream.agl.algorithm import VERL

__all__ = ["VERL"]
