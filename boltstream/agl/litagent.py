"""``agentlightning.litagent`` under boltstream: ``LitAgent`` and the ``@rollout`` decorators."""

from boltstream.producers.context import rollout
from boltstream.producers.litagent import FunctionalLitAgent, LitAgent, llm_rollout, prompt_rollout

__all__ = ["FunctionalLitAgent", "LitAgent", "llm_rollout", "prompt_rollout", "rollout"]
