"""Agents in Agent Lightning 0.3's shapes: ``LitAgent`` subclasses, ``@rollout`` functions, and running one rollout.

An agent is a :class:`LitAgent` whose ``rollout(task, resources, rollout)`` (or ``rollout_async``)
runs one task. ``@rollout`` turns a function ``(task, llm[, rollout])`` or
``(task, prompt_template[, rollout])``, sync or async, into one (:class:`FunctionalLitAgent`).

:func:`execute_rollout` / :func:`execute_rollout_async` run an agent on a task as one boltstream
rollout: everything it emits goes to that rollout, a returned number is recorded as its final reward
(a ``reward`` span named ``final``), and leaving emits the rollout's root span, so the stream
processors see the trajectory complete. An agent that raises ends its rollout with status
``error``; the exception is recorded and, unless ``raise_on_error``, does not stop the caller.
Runners (``LitAgentRunner.step``, ``Trainer.fit``) and a direct call of a ``@rollout`` function
outside any open rollout go through them.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from boltstream.producers import context
from boltstream.producers.emit import emit_exception, emit_reward
from boltstream.producers.resources import LLM, NamedResources, PromptTemplate, ProxyLLM
from boltstream.producers.resources import resources_to_dict as _resources_to_dict

log = logging.getLogger("boltstream.litagent")

T = TypeVar("T")
RolloutMode = Literal["train", "val", "test"]
RolloutStatus = Literal["queuing", "preparing", "running", "failed", "succeeded", "cancelled", "requeuing"]

#: Root-span attributes of a rollout run by a runner (Agent Lightning's key prefix, so its readers find them).
TASK_INPUT_ATTRIBUTE = "agentlightning.rollout.input"
MODE_ATTRIBUTE = "agentlightning.rollout.mode"
RESOURCES_ID_ATTRIBUTE = "agentlightning.rollout.resources_id"
RESOURCES_ATTRIBUTE = "agentlightning.rollout.resources"


@dataclass
class Attempt:
    """One try at a rollout."""

    rollout_id: str
    attempt_id: str
    sequence_id: int = 1
    start_time: float = field(default_factory=time.time)
    end_time: float | None = None
    status: str = "running"
    worker_id: str | None = None
    last_heartbeat_time: float | None = None
    metadata: dict[str, Any] | None = None


@dataclass
class Rollout:
    """A rollout as an agent and an algorithm see it: the task input, its mode, status and outcome."""

    rollout_id: str
    input: Any
    start_time: float = field(default_factory=time.time)
    end_time: float | None = None
    mode: RolloutMode | None = None
    resources_id: str | None = None
    status: RolloutStatus = "queuing"
    metadata: dict[str, Any] | None = None
    #: boltstream: the final reward the rollout recorded (None if it recorded none).
    final_reward: float | None = None
    #: boltstream: ``Type: message`` of the exception that failed it.
    error: str | None = None


@dataclass
class AttemptedRollout(Rollout):
    """A rollout with the attempt running it (what a runner hands the agent)."""

    attempt: Attempt | None = None


@dataclass
class Task:
    """Agent Lightning's queued-task record: a rollout's id and input (kept for code that builds them)."""

    rollout_id: str
    input: Any
    mode: RolloutMode | None = None
    resources_id: str | None = None
    create_time: float | None = None
    last_claim_time: float | None = None
    num_claims: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class LitAgent(Generic[T]):
    """Base class of an agent: override ``rollout`` (or ``rollout_async``), or the training/validation variants.

    The return value of a rollout method: ``None`` (rewards were emitted with ``emit_reward``) or a
    number, the final reward.
    """

    def __init__(self, *, trained_agents: str | None = None) -> None:
        self.trained_agents = trained_agents
        self._trainer: Any = None
        self._runner: Any = None

    @property
    def name(self) -> str:
        """The agent_name its rollouts carry."""
        return type(self).__name__

    def is_async(self) -> bool:
        """True when the class overrides one of the async rollout methods."""
        cls = type(self)
        return any(
            getattr(cls, method) is not getattr(LitAgent, method)
            for method in ("rollout_async", "training_rollout_async", "validation_rollout_async")
        )

    # -- what runs it ------------------------------------------------------------------------------
    def set_trainer(self, trainer: Any) -> None:
        self._trainer = trainer

    def get_trainer(self) -> Any:
        if self._trainer is None:
            raise ValueError("Trainer has not been set for this agent.")
        return self._trainer

    @property
    def trainer(self) -> Any:
        return self.get_trainer()

    def set_runner(self, runner: Any) -> None:
        self._runner = runner

    def get_runner(self) -> Any:
        if self._runner is None:
            raise ValueError("Runner has not been set for this agent.")
        return self._runner

    @property
    def runner(self) -> Any:
        return self.get_runner()

    def get_tracer(self) -> Any:
        runner = self._runner if self._runner is not None else self._trainer
        if runner is None or getattr(runner, "tracer", None) is None:
            raise ValueError("Neither a runner nor a trainer with a tracer is set for this agent.")
        return runner.tracer

    @property
    def tracer(self) -> Any:
        return self.get_tracer()

    # -- hooks (deprecated in Agent Lightning, still called) ---------------------------------------
    def on_rollout_start(self, task: Any, runner: Any, tracer: Any) -> None:
        """Called before each rollout; no-op by default."""

    def on_rollout_end(self, task: Any, rollout: Rollout, runner: Any, tracer: Any) -> None:
        """Called after each rollout; no-op by default."""

    # -- the rollout methods ------------------------------------------------------------------------
    def rollout(self, task: T, resources: NamedResources, rollout: Rollout) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement rollout (or rollout_async)")

    async def rollout_async(self, task: T, resources: NamedResources, rollout: Rollout) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement rollout_async (or rollout)")

    def training_rollout(self, task: T, resources: NamedResources, rollout: Rollout) -> Any:
        return self.rollout(task, resources, rollout)

    def validation_rollout(self, task: T, resources: NamedResources, rollout: Rollout) -> Any:
        return self.rollout(task, resources, rollout)

    async def training_rollout_async(self, task: T, resources: NamedResources, rollout: Rollout) -> Any:
        return await self.rollout_async(task, resources, rollout)

    async def validation_rollout_async(self, task: T, resources: NamedResources, rollout: Rollout) -> Any:
        return await self.rollout_async(task, resources, rollout)


class FunctionalLitAgent(LitAgent[T]):
    """A LitAgent around a rollout function; it is also callable like the function.

    The function's parameters after ``task`` say what it gets: ``llm`` (the first ``LLM`` among the
    resources), ``prompt_template`` (the first ``PromptTemplate``), ``resources`` (all of them),
    ``rollout`` (the :class:`Rollout`).
    """

    def __init__(self, rollout_func: Callable[..., Any], *, strip_proxy: bool = True) -> None:
        super().__init__()
        self._rollout_func = rollout_func
        self._is_async = inspect.iscoroutinefunction(rollout_func)
        self._parameters = inspect.signature(rollout_func).parameters
        self.strip_proxy = strip_proxy
        functools.update_wrapper(self, rollout_func)

    @property
    def name(self) -> str:
        return self._rollout_func.__name__

    def is_async(self) -> bool:
        return self._is_async

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function. Outside any open rollout the call is one rollout of its own (a returned
        number is its final reward); inside one (a runner's, a ``with rollout(...)``) it is a plain call."""
        if context.current_rollout() is not None:
            return self._rollout_func(*args, **kwargs)
        task = args[0] if args else kwargs.get("task")
        if self._is_async:
            return _direct_call_async(self, task, args, kwargs)
        with context.rollout(task_id=task_id_of(task), agent_name=self.name):
            return _record_result(self._rollout_func(*args, **kwargs))

    def _arguments(self, resources: NamedResources, rollout: Rollout) -> dict[str, Any]:
        arguments: dict[str, Any] = {}
        if "rollout" in self._parameters:
            arguments["rollout"] = rollout
        if "resources" in self._parameters:
            arguments["resources"] = resources
        if "llm" in self._parameters:
            llm = _first(resources, LLM, "llm")
            if self.strip_proxy and isinstance(llm, ProxyLLM):
                llm = llm.with_attempted_rollout(rollout)
            arguments["llm"] = llm
        if "prompt_template" in self._parameters:
            arguments["prompt_template"] = _first(resources, PromptTemplate, "prompt_template")
        return arguments

    def rollout(self, task: T, resources: NamedResources, rollout: Rollout) -> Any:
        if self._is_async:
            raise RuntimeError(f"{self.name} is asynchronous: use rollout_async")
        return self._rollout_func(task, **self._arguments(resources, rollout))

    async def rollout_async(self, task: T, resources: NamedResources, rollout: Rollout) -> Any:
        if not self._is_async:
            raise RuntimeError(f"{self.name} is synchronous: use rollout")
        return await self._rollout_func(task, **self._arguments(resources, rollout))


async def _direct_call_async(agent: FunctionalLitAgent, task: Any, args: tuple, kwargs: dict) -> Any:
    async with context.rollout(task_id=task_id_of(task), agent_name=agent.name):
        return _record_result(await agent._rollout_func(*args, **kwargs))


def _first(resources: Mapping[str, Any], kind: type, parameter: str) -> Any:
    """The first resource of ``kind`` (a rollout function's ``llm`` / ``prompt_template``)."""
    found = [name for name, resource in resources.items() if isinstance(resource, kind)]
    if not found:
        raise ValueError(f"the rollout function takes {parameter!r} but no {kind.__name__} is among the resources")
    if len(found) > 1:
        log.warning("several %s resources %s: %r gets the first, %r", kind.__name__, found, parameter, found[0])
    return resources[found[0]]


def _check_signature(function: Callable[..., Any], resource_parameter: str | None) -> None:
    parameters = list(inspect.signature(function).parameters)
    if not parameters or parameters[0] != "task":
        raise ValueError(f"{function.__qualname__}: a rollout function's first parameter must be named 'task'")
    if resource_parameter is not None and resource_parameter not in parameters:
        raise ValueError(f"{function.__qualname__}: a rollout function here needs a {resource_parameter!r} parameter")


def llm_rollout(func: Callable[..., Any] | None = None, *, strip_proxy: bool = True) -> Any:
    """``@llm_rollout``: a rollout function ``(task, llm[, rollout])``, sync or async."""

    def decorate(function: Callable[..., Any]) -> FunctionalLitAgent:
        _check_signature(function, "llm")
        return FunctionalLitAgent(function, strip_proxy=strip_proxy)

    return decorate if func is None else decorate(func)


def prompt_rollout(func: Callable[..., Any] | None = None) -> Any:
    """``@prompt_rollout``: a rollout function ``(task, prompt_template[, rollout])``, sync or async."""

    def decorate(function: Callable[..., Any]) -> FunctionalLitAgent:
        _check_signature(function, "prompt_template")
        return FunctionalLitAgent(function)

    return decorate if func is None else decorate(func)


def rollout_agent(func: Callable[..., Any]) -> FunctionalLitAgent:
    """What ``@rollout`` on a function makes: a :class:`FunctionalLitAgent` (first parameter ``task``,
    then any of ``llm``, ``prompt_template``, ``resources``, ``rollout``)."""
    if not callable(func):
        raise TypeError(f"@rollout decorates a function, not {type(func).__name__}")
    _check_signature(func, None)
    known = {"task", "llm", "prompt_template", "resources", "rollout"}
    unknown = [
        name
        for name, parameter in inspect.signature(func).parameters.items()
        if name not in known and parameter.default is inspect.Parameter.empty
    ]
    if unknown:
        raise ValueError(
            f"{func.__qualname__}: a rollout function takes task and any of llm, prompt_template, resources, "
            f"rollout; {unknown} would get no value"
        )
    return FunctionalLitAgent(func)


# -- running one rollout ---------------------------------------------------------------------------
def task_id_of(task: Any) -> str:
    """The task's own id (an ``id`` / ``task_id`` key or attribute), else ""."""
    for key in ("task_id", "id"):
        value = task.get(key) if isinstance(task, Mapping) else getattr(task, key, None)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
    return ""


def _record_result(result: Any) -> Any:
    """A number returned by a rollout is its final reward; anything else is left to what the agent emitted."""
    if isinstance(result, (bool, int, float)):
        emit_reward(float(result))
    elif result is not None:
        log.warning(
            "a rollout returned %s: only a number (the final reward) or None is recorded", type(result).__name__
        )
    return result


def rollout_attributes(
    task: Any, mode: RolloutMode | None, resources: NamedResources | None, resources_id: str | None
) -> dict[str, Any]:
    """The attributes of a rollout's root span that say what it ran: its task, mode and resources."""
    from boltstream.producers.redaction import to_text

    # JSON even for a str task (to_text keeps strings as they are), so readers decode every input alike
    attributes: dict[str, Any] = {TASK_INPUT_ATTRIBUTE: json.dumps(task) if isinstance(task, str) else to_text(task)}
    if mode is not None:
        attributes[MODE_ATTRIBUTE] = mode
    if resources:
        attributes[RESOURCES_ATTRIBUTE] = to_text(_resources_to_dict(resources))
    if resources_id is not None:
        attributes[RESOURCES_ID_ATTRIBUTE] = resources_id
    return attributes


def _prepare(
    agent: LitAgent,
    task: Any,
    resources: NamedResources,
    mode: RolloutMode | None,
    rollout_id: str | None,
    resources_id: str | None,
) -> tuple[context.rollout, AttemptedRollout]:
    attributes = rollout_attributes(task, mode, resources, resources_id)
    run = context.rollout(task_id=task_id_of(task), agent_name=agent.name, rollout_id=rollout_id, attributes=attributes)
    record = AttemptedRollout(
        rollout_id=run.rollout_id,
        input=task,
        mode=mode,
        resources_id=resources_id,
        status="running",
        attempt=Attempt(run.rollout_id, run.attempt_id),
        metadata={"resources": _resources_to_dict(resources)} if resources else None,
    )
    return run, record


def _finish(record: AttemptedRollout, result: Any, error: BaseException | None) -> AttemptedRollout:
    record.end_time = time.time()
    if record.attempt is not None:
        record.attempt.end_time = record.end_time
    if error is not None:
        record.status = "failed"
        record.error = f"{type(error).__name__}: {error}"
    else:
        record.status = "succeeded"
        if isinstance(result, (bool, int, float)) and math.isfinite(float(result)):
            record.final_reward = float(result)
    if record.attempt is not None:
        record.attempt.status = record.status
    return record


def _method(agent: LitAgent, mode: RolloutMode | None, asynchronous: bool) -> Callable[..., Any]:
    prefix = "validation" if mode in ("val", "test") else "training"
    return getattr(agent, f"{prefix}_rollout_async" if asynchronous else f"{prefix}_rollout")


def execute_rollout(
    agent: LitAgent,
    task: Any,
    resources: NamedResources | None = None,
    *,
    mode: RolloutMode | None = None,
    rollout_id: str | None = None,
    resources_id: str | None = None,
    raise_on_error: bool = False,
) -> AttemptedRollout:
    """Run a synchronous agent on ``task`` as one rollout and return its record (status, final reward).

    An async agent is an error here: use :func:`execute_rollout_async`.
    """
    if agent.is_async():
        raise TypeError(f"{agent.name} is asynchronous: run it with execute_rollout_async")
    resources = dict(resources or {})
    run, record = _prepare(agent, task, resources, mode, rollout_id, resources_id)
    result, error = None, None
    with context.attached(run):
        try:
            result = _record_result(_method(agent, mode, False)(task, resources, record))
        except Exception as exc:  # the agent's failure is the rollout's outcome, not the runner's
            error = exc
            emit_exception(exc)
    run.end(error)
    _finish(record, result, error)
    if error is not None and raise_on_error:
        raise error
    return record


async def execute_rollout_async(
    agent: LitAgent,
    task: Any,
    resources: NamedResources | None = None,
    *,
    mode: RolloutMode | None = None,
    rollout_id: str | None = None,
    resources_id: str | None = None,
    raise_on_error: bool = False,
    on_start: Callable[[AttemptedRollout], Awaitable[None]] | None = None,
    on_end: Callable[[AttemptedRollout], Awaitable[None]] | None = None,
) -> AttemptedRollout:
    """Run an agent (async, or sync on this loop's thread) on ``task`` as one rollout, like :func:`execute_rollout`.

    ``on_start`` / ``on_end`` (a runner's hooks) are awaited inside the rollout, just before the agent runs
    and just after it returned (before its returned reward and its root span are recorded)."""
    resources = dict(resources or {})
    run, record = _prepare(agent, task, resources, mode, rollout_id, resources_id)
    result, error = None, None
    with context.attached(run):
        try:
            if on_start is not None:
                await on_start(record)
            if agent.is_async():
                result = await _method(agent, mode, True)(task, resources, record)
            else:
                result = _method(agent, mode, False)(task, resources, record)
            if on_end is not None:
                await on_end(record)
            _record_result(result)
        except Exception as exc:
            error = exc
            emit_exception(exc)
    run.end(error)
    _finish(record, result, error)
    if error is not None and raise_on_error:
        raise error
    return record
