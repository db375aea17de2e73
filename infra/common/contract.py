"""The contract between components that is not an Avro record: header and attribute names, the inference
paths, and the head-sampling rule.

Head sampling: a rollout is kept when the first 8 bytes of ``sha256(rollout_id)``, read as a big-endian unsigned
integer and divided by 2**64, fall below the sampling rate. The rule needs nothing but SHA-256, so
any process in any language reaches the same decision for the same rollout: a rollout is all-in or
all-out everywhere.
"""

from __future__ import annotations

import hashlib

#: the rollout an LLM request belongs to (auto-tracer, capture proxy, router)
ROLLOUT_ID_HEADER = "X-Boltstream-Rollout-Id"
#: the task of a request through the capture proxy
TASK_HEADER = "X-Boltstream-Task-Id"
#: the agent of a request through the capture proxy
AGENT_HEADER = "X-Boltstream-Agent-Name"
#: the attempt of a request through the capture proxy
ATTEMPT_HEADER = "X-Boltstream-Attempt-Id"
#: response header of the router: the weight version that answered
MODEL_VERSION_HEADER = "X-Boltstream-Model-Version"
#: response header of the router: the replica that answered
SERVER_ID_HEADER = "X-Boltstream-Server-Id"
#: request header to the router: answer with this version (the canary analysis scores with it)
PIN_VERSION_HEADER = "X-Boltstream-Pin-Version"
#: span attribute naming the prompt template (APO) a call used
TEMPLATE_ATTRIBUTE = "boltstream.template_id"
#: Kafka header on replayed messages: the replay's name
REPLAY_HEADER = "boltstream-replay"
#: Kafka header on replayed messages: the original message time
SOURCE_TIME_HEADER = "boltstream-replay-source-time-us"

#: Attributes of an ``llm_call`` span (JSON text, present only when the call had them) that a chat template
#: renders beside the messages: the request's tools, tool_choice and chat_template_kwargs, and the tool calls
#: the model made. With them, a call the server returned no token ids for can be tokenized as the server
#: would have (TrainingSample ``call_text``: these under the names given here).
RETOKENIZATION_ATTRIBUTES = {
    "llm.request.tools": "tools",
    "llm.request.tool_choice": "tool_choice",
    "llm.request.chat_template_kwargs": "chat_template_kwargs",
    "llm.response.tool_calls": "tool_calls",
}
#: The attribute above holding the tool calls of the answer.
TOOL_CALLS_ATTRIBUTE = "llm.response.tool_calls"

#: The OpenAI-compatible paths the capture proxy and the router forward, as OpenAI clients call them (under
#: ``/v1``, or at the root of a base URL without it). Every other path of an inference server is a control
#: path (vLLM's ``/pause``, ``/collective_rpc``, ``/v1/load_lora_adapter`` ...): they refuse it with a 404.
INFERENCE_PATHS = frozenset(
    prefix + endpoint
    for prefix in ("", "/v1")
    for endpoint in ("/chat/completions", "/completions", "/responses", "/models", "/embeddings")
)

_SCALE = 2.0**64


def rollout_fraction(rollout_id: str) -> float:
    """The rollout's stable position in [0, 1): where it falls against any sampling rate."""
    digest = hashlib.sha256(rollout_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def keep_rollout(rollout_id: str, rate: float) -> bool:
    """True when the rollout is kept at sampling ``rate`` (1.0 keeps all, 0.0 none)."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    return rollout_fraction(rollout_id) < rate
