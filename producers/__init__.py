"""The agent-side SDK: rollout context, emit helpers, SpanProducer, auto-tracer, OTel bridge, capture proxy.

``from boltstream import agl`` gives the Agent Lightning 0.3 names (``emit_reward``, ``emit_message``,
``emit_object``, ``emit_exception``, ``emit_annotation``, ``operation``) plus boltstream's own::

    from boltstream import agl

    with agl.rollout(task_id="t-17", agent_name="math-agent") as run:
        agl.emit_decision("use calculator")
        agl.emit("tool_call", tool_name="calculator", args={"expr": "17*23"})
        agl.emit_reward(0.2, name="tool_ok")   # a step reward: the rollout waits for its final one
    agl.send_reward(run.rollout_id, 1.0, source="verifier")   # later (within reward_timeout), from anywhere
    agl.flush()

The broker comes from ``boltstream.infra.common.config.load_settings()`` (``BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS`` or
the running local stack). ``AGENT_LIGHTNING_TRACER=1`` in the environment turns on auto-tracing of
the ``openai`` client at import, like ``producers.instrument()``.
"""

from boltstream.infra.common.contract import keep_rollout
from boltstream.producers.autotrace import instrument, instrument_from_environment, uninstrument
from boltstream.producers.context import current_rollout, current_rollout_id, new_id, rollout
from boltstream.producers.emit import (
    emit,
    emit_annotation,
    emit_decision,
    emit_exception,
    emit_failures,
    emit_message,
    emit_object,
    emit_reward,
    emit_span,
    emit_tool_call,
    operation,
    send_reward,
    traced,
)
from boltstream.producers.litagent import (
    Attempt,
    AttemptedRollout,
    FunctionalLitAgent,
    LitAgent,
    Rollout,
    Task,
    execute_rollout,
    execute_rollout_async,
    llm_rollout,
    prompt_rollout,
)
from boltstream.producers.prompts import current_prompt, prompt_attributes
from boltstream.producers.resources import LLM, NamedResources, PromptTemplate, Resource, ResourcesUpdate
from boltstream.producers.runtime import configure, flush, shutdown, stats

__all__ = [
    "LLM",
    "Attempt",
    "AttemptedRollout",
    "FunctionalLitAgent",
    "LitAgent",
    "NamedResources",
    "PromptTemplate",
    "Resource",
    "ResourcesUpdate",
    "Rollout",
    "Task",
    "configure",
    "current_prompt",
    "current_rollout",
    "current_rollout_id",
    "emit",
    "emit_annotation",
    "emit_decision",
    "emit_exception",
    "emit_failures",
    "emit_message",
    "emit_object",
    "emit_reward",
    "emit_span",
    "emit_tool_call",
    "execute_rollout",
    "execute_rollout_async",
    "flush",
    "instrument",
    "keep_rollout",
    "llm_rollout",
    "new_id",
    "operation",
    "prompt_attributes",
    "prompt_rollout",
    "rollout",
    "send_reward",
    "shutdown",
    "stats",
    "traced",
    "uninstrument",
]

instrument_from_environment()
