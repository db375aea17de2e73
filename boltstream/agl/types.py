"""``agentlightning.types`` under boltstream: the records and resources agents and algorithms pass around."""

from typing import Any, Literal, Protocol, SupportsIndex, TypeVar

from boltstream.agl.runner import Hook
from boltstream.producers.emit import EmittedSpan
from boltstream.producers.litagent import (
    Attempt,
    AttemptedRollout,
    Rollout,
    RolloutMode,
    RolloutStatus,
    Task,
)
from boltstream.producers.resources import (
    LLM,
    NamedResources,
    PromptTemplate,
    ProxyLLM,
    Resource,
    ResourcesUpdate,
)
from boltstream.producers.span_views import Span

_Item = TypeVar("_Item", covariant=True)

#: What a task's input may be: anything JSON-serialisable.
TaskInput = Any
#: A single attribute value and an attribute map (strings once archived).
AttributeValue = str | bool | int | float
Attributes = dict[str, AttributeValue]
#: Any resource (Agent Lightning's discriminated union).
ResourceUnion = Resource
#: What the reward helpers accept: a Span, an EmittedSpan, a row dict of the spans table.
SpanLike = Any
#: What Agent Lightning's emitters return; here the EmittedSpan (the event_id, with the span's fields).
SpanCoreFields = EmittedSpan
AttemptStatus = Literal["preparing", "running", "failed", "succeeded", "cancelled", "timeout", "unresponsive"]
#: What a rollout method may return: None (rewards were emitted) or a number, the final reward.
RolloutRawResult = None | float


class Dataset(Protocol[_Item]):
    """A dataset of tasks: anything indexable with a length (a list will do)."""

    def __getitem__(self, index: SupportsIndex, /) -> _Item: ...

    def __len__(self) -> int: ...


__all__ = [
    "LLM",
    "Attempt",
    "AttemptStatus",
    "AttemptedRollout",
    "AttributeValue",
    "Attributes",
    "Dataset",
    "Hook",
    "NamedResources",
    "PromptTemplate",
    "ProxyLLM",
    "Resource",
    "ResourceUnion",
    "ResourcesUpdate",
    "Rollout",
    "RolloutMode",
    "RolloutRawResult",
    "RolloutStatus",
    "Span",
    "SpanCoreFields",
    "SpanLike",
    "Task",
    "TaskInput",
]
