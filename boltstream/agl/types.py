"""``agentlightning.types`` under boltstream: the records and resources agents and algorithms pass around."""

from typing import Any, Protocol, SupportsIndex, TypeVar

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
#: What a rollout method may return: None (rewards were emitted) or a number, the final reward.
RolloutRawResult = None | float


class Dataset(Protocol[_Item]):
    """A dataset of tasks: anything indexable with a length (a list will do)."""

    def __getitem__(self, index: SupportsIndex, /) -> _Item: ...

    def __len__(self) -> int: ...


__all__ = [
    "LLM",
    "Attempt",
    "AttemptedRollout",
    "Dataset",
    "NamedResources",
    "PromptTemplate",
    "ProxyLLM",
    "Resource",
    "ResourcesUpdate",
    "Rollout",
    "RolloutMode",
    "RolloutRawResult",
    "RolloutStatus",
    "Span",
    "Task",
    "TaskInput",
]
