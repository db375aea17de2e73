"""``agentlightning.semconv`` under boltstream: the attribute keys its emitters write and its readers look for.

Span *names* differ: boltstream tells span types apart by the ``kind`` column (``reward``,
``message``, ``object``, ``exception``, ``annotation``, ``custom`` for operations), so the
``AGL_*`` names below are what Agent Lightning calls them, for code that compares against them.
"""

from enum import Enum

from boltstream.producers.emit import MESSAGE_BODY, OBJECT_JSON, OBJECT_LITERAL, OBJECT_TYPE, REWARD_PREFIX

AGL_ANNOTATION = "agentlightning.annotation"
AGL_MESSAGE = "agentlightning.message"
AGL_OBJECT = "agentlightning.object"
AGL_EXCEPTION = "agentlightning.exception"
AGL_OPERATION = "agentlightning.operation"
AGL_REWARD = "agentlightning.reward"
AGL_VIRTUAL = "agentlightning.virtual"


class LightningSpanAttributes(Enum):
    REWARD = REWARD_PREFIX
    LINK = "agentlightning.link"
    TAG = "agentlightning.tag"
    MESSAGE_BODY = MESSAGE_BODY
    OBJECT_TYPE = OBJECT_TYPE
    OBJECT_LITERAL = OBJECT_LITERAL
    OBJECT_JSON = OBJECT_JSON
    OPERATION_NAME = "agentlightning.operation.name"
    OPERATION_INPUT = "agentlightning.operation.input"
    OPERATION_OUTPUT = "agentlightning.operation.output"


class LightningResourceAttributes(Enum):
    ROLLOUT_ID = "agentlightning.rollout_id"
    ATTEMPT_ID = "agentlightning.attempt_id"
    SPAN_SEQUENCE_ID = "agentlightning.span_sequence_id"
    TRACER_NAME = "agentlightning.tracer.name"


class RewardAttributes(Enum):
    REWARD_NAME = "name"
    REWARD_VALUE = "value"
