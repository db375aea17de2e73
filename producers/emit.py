"""The emit helpers agents call: ``emit_reward``, ``emit_decision``, ``emit_tool_call``, ``emit(kind, ...)``,
``traced`` / ``operation`` blocks and ``send_reward`` for rewards that come later from elsewhere.

Names and signatures follow Agent Lightning 0.3 (``emit_reward``, ``emit_message``, ``emit_object``,
``emit_exception``, ``emit_annotation``, ``operation``, ``@reward``) so ``from boltstream import agl`` runs code
written for it, and so do the attribute keys its readers look for (``agentlightning.message.body``,
``agentlightning.object.*``, ``agentlightning.reward.<i>.name/value``, OTel's ``exception.*``).
Every helper returns the new span's event_id (those of Agent Lightning as an :class:`EmittedSpan`, a
``str`` that also carries the span's name, attributes and times) and costs the agent a few microseconds:
nested values are flattened into dotted keys and other values that are not plain scalars snapshotted
to JSON here (the agent may mutate them later); everything else (redaction, truncation, encoding, I/O)
happens on the producer's thread.
Helpers never raise into the agent: a failure is logged and counted instead.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import time
import traceback
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar, overload

from boltstream.producers import runtime
from boltstream.producers.context import (
    active_rollout,
    current_parent,
    new_id,
    now_us,
    reset_parent,
    set_parent,
)
from boltstream.producers.redaction import append_flat_attribute, to_text

log = logging.getLogger("boltstream.emit")

KINDS = frozenset(
    ("rollout", "llm_call", "tool_call", "decision", "reward", "message", "exception", "object", "annotation", "custom")
)
_SCALARS = (str, int, float, bool, type(None))
_Fn = TypeVar("_Fn", bound=Callable[..., Any])
_failures = 0


#: Attribute keys of Agent Lightning's semantic conventions (its ``semconv`` module), which its helpers read.
MESSAGE_BODY = "agentlightning.message.body"
OBJECT_TYPE = "agentlightning.object.type"
OBJECT_JSON = "agentlightning.object.json"
OBJECT_LITERAL = "agentlightning.object.literal"
REWARD_PREFIX = "agentlightning.reward"


class EmittedSpan(str):
    """What Agent Lightning's emitters return: the span's event_id (a ``str``, as boltstream's callers use
    it) with the fields of the span it recorded, like Agent Lightning's ``SpanCoreFields``."""

    name: str
    kind: str
    attributes: dict[str, Any]
    reward: float | None
    start_time: float | None
    end_time: float | None
    status: str

    @property
    def event_id(self) -> str:
        return str(self)

    span_id = event_id

    def __repr__(self) -> str:
        return f"EmittedSpan({str(self)!r}, kind={self.kind!r}, name={self.name!r})"


def _emitted(
    event_id: str,
    kind: str,
    name: str,
    attributes: dict[str, Any],
    reward: float | None = None,
    status: str = "ok",
) -> EmittedSpan:
    span = EmittedSpan(event_id)
    now = time.time()  # the emitted span's own times are within microseconds of this
    span.__dict__.update(  # one update: this runs on the agent's thread for every emit
        kind=kind, name=name, attributes=attributes, reward=reward, status=status, start_time=now, end_time=now
    )
    return span


def emit_failures() -> int:
    """How many emit calls failed (each logged); they never raise into the agent."""
    return _failures


def _snapshot(attributes: Mapping[str, Any] | None) -> list[Any]:
    """The attributes as the key, value, ... tail of a pending span; values that are not plain scalars
    are snapshotted now (nested ones flattened into dotted keys with typed leaves, others as JSON), since
    the agent may change them once the call returns."""
    flat: list[Any] = []
    if attributes:
        for key, value in attributes.items():
            if type(value) in _SCALARS:
                flat.append(key)
                flat.append(value)
            else:
                append_flat_attribute(flat, key, value)
    return flat


def emit_span(
    kind: str = "custom",
    name: str = "",
    *,
    attributes: Mapping[str, Any] | None = None,
    reward: float | None = None,
    status: str = "ok",
    error: str | None = None,
    llm: dict[str, Any] | None = None,
    start_time_us: int | None = None,
    end_time_us: int | None = None,
    parent_id: str | None = None,
    event_id: str | None = None,
    server_id: str = "",
) -> str:
    """Record one span in the current rollout and return its event_id (the building block of every helper)."""
    global _failures
    try:
        current = active_rollout()
        event_id = event_id or new_id()
        if not current.sampled:
            return event_id
        now = now_us()
        current.last_span_us = now
        if kind not in KINDS:
            attributes = {**(attributes or {}), "kind": kind}
            kind = "custom"
        runtime.record(
            (  # a PendingSpan, fields in the order of boltstream.producers.pending_span
                event_id,
                *current.ids,
                kind,
                name,
                parent_id or current_parent() or current.root_id,
                current.next_sequence(),
                start_time_us or now,
                end_time_us or now,
                status,
                error,
                reward,
                llm,
                server_id,
                *_snapshot(attributes),
            )
        )
        return event_id
    except Exception:
        _failures += 1
        runtime.count_lost_span()
        log.exception("emit_span(%r, %r) failed; the span is lost", kind, name)
        return ""


def _fail(what: str) -> str:
    global _failures
    _failures += 1
    runtime.count_lost_span()
    log.exception("%s failed; the span is lost", what)
    return ""


def emit(kind: str, /, **fields: Any) -> str:
    """Generic emit: ``emit('tool_call', tool_name='search', args={...})``.

    ``name`` (or ``tool_name`` / ``tool``), ``reward`` (or ``value`` for rewards), ``status`` and
    ``error`` fill the span's fields; every other keyword becomes an attribute. A kind outside
    the Span schema is kept as a ``custom`` span with attribute ``kind``.
    """
    try:
        name = str(fields.pop("name", None) or fields.pop("tool_name", None) or fields.pop("tool", None) or kind)
        reward = fields.pop("reward", None)
        if kind == "reward" and reward is None:
            reward = fields.pop("value", None)
        if kind == "reward":
            return emit_reward(reward, name=name if name != "reward" else "final", attributes=fields)
        error = fields.pop("error", None)
        status = fields.pop("status", "error" if error is not None else "ok")
        return emit_span(kind, name, attributes=fields, status=status, error=None if error is None else to_text(error))
    except Exception:
        return _fail(f"emit({kind!r})")


def emit_reward(
    reward: float | dict[str, float],
    *,
    primary_key: str | None = None,
    name: str = "final",
    attributes: Mapping[str, Any] | None = None,
    propagate: bool = True,
) -> EmittedSpan | str:
    """Record a reward for the current rollout (a ``reward`` span); it never ends the rollout.

    The rollout's last reward is its final reward, earlier ones are step rewards (credit assignment
    places them among the LLM calls); ``name`` is a label only.

    A dict is a multi-dimensional reward (Agent Lightning 0.3): ``primary_key`` names the value
    used as the reward; every dimension is recorded as ``agentlightning.reward.<i>.name`` /
    ``.value`` attributes, the primary one first (index 0). ``propagate=False`` records nothing
    (Agent Lightning's local-only spans) and returns the span it would have recorded.
    Bad input is logged and counted and returns "" (never raises into the agent).
    """
    try:
        extra = dict(attributes or {})
        if isinstance(reward, Mapping):
            if primary_key is None or primary_key not in reward:
                raise ValueError(f"a dict reward needs primary_key naming one of {sorted(reward)}")
            dimensions = [primary_key, *(k for k in reward if k != primary_key)]
            for index, key in enumerate(dimensions):
                extra[f"{REWARD_PREFIX}.{index}.name"] = str(key)
                extra[f"{REWARD_PREFIX}.{index}.value"] = float(reward[key])
            value = float(reward[primary_key])
        else:
            value = float(reward)
        if not math.isfinite(value):
            extra["reward.raw"] = repr(value)
        if not propagate:
            return _emitted(new_id(), "reward", name, extra, value)
        event_id = emit_span("reward", name, attributes=extra, reward=value)
        return _emitted(event_id, "reward", name, extra, value) if event_id else ""
    except Exception:
        return _fail(f"emit_reward({reward!r})")


def reward(fn: _Fn) -> _Fn:
    """Agent Lightning's ``@reward``: the decorated function's returned number (sync or async) is also
    recorded as a reward span; ``None`` records nothing. The value is returned unchanged."""

    def record(value: Any) -> None:
        if value is not None:
            emit_reward(value, name=fn.__name__)

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            value = await fn(*args, **kwargs)
            record(value)
            return value

        return async_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        value = fn(*args, **kwargs)
        record(value)
        return value

    return wrapper  # type: ignore[return-value]


def emit_decision(
    decision: Any = None, *, name: str = "decision", attributes: Mapping[str, Any] | None = None, **fields: Any
) -> str:
    """Record a decision the agent took (``decision`` span); ``decision`` and keywords become attributes."""
    merged = {**(attributes or {}), **fields}
    if decision is not None:
        merged["decision"] = decision
    return emit_span("decision", name, attributes=merged)


def emit_tool_call(
    name: str,
    args: Any = None,
    result: Any = None,
    error: BaseException | str | None = None,
    *,
    start_time_us: int | None = None,
    end_time_us: int | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> str:
    """Record a tool call with its arguments and result, or its error (status ``error``)."""
    merged = dict(attributes or {})
    if args is not None:
        merged["args"] = args
    if result is not None:
        merged["result"] = result
    if isinstance(error, BaseException):
        error = f"{type(error).__name__}: {error}"
    return emit_span(
        "tool_call",
        name,
        attributes=merged,
        status="ok" if error is None else "error",
        error=error,
        start_time_us=start_time_us,
        end_time_us=end_time_us,
    )


def _agl_span(
    kind: str,
    name: str,
    attributes: Mapping[str, Any],
    propagate: bool,
    status: str = "ok",
    error: str | None = None,
) -> EmittedSpan | str:
    """Record (unless ``propagate=False``) one span of an Agent Lightning emitter and return it as an EmittedSpan."""
    if not propagate:
        return _emitted(new_id(), kind, name, attributes, status=status)
    event_id = emit_span(kind, name, attributes=attributes, status=status, error=error)
    return _emitted(event_id, kind, name, attributes, status=status) if event_id else ""


def emit_message(
    message: str, attributes: Mapping[str, Any] | None = None, propagate: bool = True
) -> EmittedSpan | str:
    """Record a log line / message (``message`` span, text in attribute ``agentlightning.message.body``)."""
    try:
        return _agl_span("message", "message", {**(attributes or {}), MESSAGE_BODY: str(message)}, propagate)
    except Exception:
        return _fail("emit_message")


def emit_object(obj: Any, attributes: Mapping[str, Any] | None = None, propagate: bool = True) -> EmittedSpan | str:
    """Record any object (``object`` span): its type in ``agentlightning.object.type``, a str/number/bool
    in ``agentlightning.object.literal``, anything else as JSON in ``agentlightning.object.json``."""
    try:
        value = {OBJECT_LITERAL: obj} if type(obj) in _SCALARS and obj is not None else {OBJECT_JSON: to_text(obj)}
        merged = {**(attributes or {}), OBJECT_TYPE: type(obj).__name__, **value}
        return _agl_span("object", type(obj).__name__, merged, propagate)
    except Exception:
        return _fail("emit_object")


def emit_exception(
    exception: BaseException, attributes: Mapping[str, Any] | None = None, propagate: bool = True
) -> EmittedSpan | str:
    """Record an exception (``exception`` span, status ``error``; OpenTelemetry's ``exception.type``,
    ``exception.message`` and ``exception.stacktrace`` attributes)."""
    try:
        if not isinstance(exception, BaseException):
            raise TypeError(f"emit_exception takes an exception, not {type(exception).__name__}")
        stack = "".join(traceback.format_exception(type(exception), exception, exception.__traceback__))
        kind_name = type(exception).__name__
        merged = {
            **(attributes or {}),
            "exception.type": kind_name,
            "exception.message": str(exception),
            "exception.stacktrace": stack,
        }
        return _agl_span("exception", kind_name, merged, propagate, "error", f"{kind_name}: {exception}")
    except Exception:
        return _fail("emit_exception")


def emit_annotation(annotation: Mapping[str, Any], propagate: bool = True) -> EmittedSpan | str:
    """Record free-form key/values about the rollout (``annotation`` span)."""
    try:
        return _agl_span("annotation", "annotation", dict(annotation), propagate)
    except Exception:
        return _fail("emit_annotation")


def send_reward(
    rollout_id: str,
    value: float,
    *,
    name: str = "final",
    is_final: bool = True,
    source: str = "",
    task_id: str = "",
    agent_name: str = "",
    attributes: Mapping[str, Any] | None = None,
) -> str:
    """Send a reward for a rollout from anywhere (a verifier, a human, another process) to the rewards topic.

    Returns the reward's event_id. The value is sent as given: NaN or infinite values are
    dead-lettered by the stream processors, not here.
    """
    try:
        event_id = new_id()
        # The Reward record's attributes are strings: nested values are snapshotted as JSON, not flattened.
        snapshot = {
            key: value if type(value) in _SCALARS else to_text(value) for key, value in (attributes or {}).items()
        }
        runtime.send_reward_record(
            {
                "event_id": event_id,
                "rollout_id": rollout_id,
                "value": float(value),
                "name": name,
                "is_final": is_final,
                "source": source,
                "task_id": task_id,
                "agent_name": agent_name,
                "timestamp_us": now_us(),
                "attributes": snapshot,
            }
        )
        return event_id
    except Exception:
        return _fail(f"send_reward({rollout_id!r}, {value!r})")


class traced:
    """A span around a block or a function call (sync or async), the parent of spans emitted inside.

    ``@traced``, ``@traced("name", kind="tool_call")`` or ``with traced("step") as span:``;
    ``span.set_attribute(k, v)``, ``span.set_input(...)`` and ``span.set_output(v)`` add attributes.
    As a decorator the function's arguments and result are recorded (``input.<arg>``, ``output``)
    unless ``record_io=False``. An exception marks the span ``error`` and propagates unchanged.
    """

    #: Span name of an unnamed ``with`` block (a decorated function is named after the function).
    block_name = "traced"

    def __init__(
        self,
        name: str | Callable[..., Any] | None = None,
        *,
        kind: str = "custom",
        record_io: bool = True,
        **attributes: Any,
    ) -> None:
        self._function = name if callable(name) else None
        self.name = name if isinstance(name, str) else ""
        self.kind = kind
        self.record_io = record_io
        self.attributes: dict[str, Any] = dict(attributes)
        self.event_id = ""
        self._start_us = 0
        self._token = None
        if self._function is not None:
            self._wrapped = self._wrap(self._function)
            functools.update_wrapper(self, self._function)

    # -- as a context manager --------------------------------------------------------------
    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def set_input(self, *args: Any, **kwargs: Any) -> None:
        for index, value in enumerate(args):
            self.attributes[f"input.args.{index}"] = value
        for key, value in kwargs.items():
            self.attributes[f"input.{key}"] = value

    def set_output(self, output: Any) -> None:
        self.attributes["output"] = output

    def __enter__(self) -> traced:
        self.event_id = new_id()
        self._start_us = now_us()
        self._token = set_parent(self.event_id)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        reset_parent(self._token)
        emit_span(
            self.kind,
            self.name or self.block_name,
            attributes=self.attributes,
            status="ok" if exc is None else "error",
            error=None if exc is None else f"{type(exc).__name__}: {exc}",
            start_time_us=self._start_us,
            end_time_us=now_us(),
            event_id=self.event_id,
        )

    async def __aenter__(self) -> traced:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    # -- as a decorator --------------------------------------------------------------------
    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        """``@traced`` on a method: bind like the function it wraps."""
        if instance is None or self._function is None:
            return self
        return functools.partial(self._wrapped, instance)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._function is not None:  # @traced without arguments: this object is the wrapper
            return self._wrapped(*args, **kwargs)
        (function,) = args  # @traced(...): called once with the function
        return self._wrap(function)

    def _wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        name, kind, record_io, base = self.name or function.__qualname__, self.kind, self.record_io, self.attributes
        signature = inspect.signature(function)

        def start(args: tuple, kwargs: dict) -> traced:
            span = traced(name, kind=kind, record_io=record_io, **base)
            if record_io:
                try:
                    bound = signature.bind(*args, **kwargs)
                    span.attributes.update(
                        {f"input.{k}": v for k, v in bound.arguments.items() if k not in ("self", "cls")}
                    )
                except TypeError:  # the call itself will raise the same error
                    pass
            return span

        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with start(args, kwargs) as span:
                    result = await function(*args, **kwargs)
                    if record_io:
                        span.set_output(result)
                    return result

            return async_wrapper

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with start(args, kwargs) as span:
                result = function(*args, **kwargs)
                if record_io:
                    span.set_output(result)
                return result

        return wrapper


@overload
def operation(fn: _Fn, *, propagate: bool = True, name: str | None = None, **attributes: Any) -> _Fn: ...
@overload
def operation(*, propagate: bool = True, name: str | None = None, **attributes: Any) -> traced: ...
def operation(fn: Any = None, *, propagate: bool = True, name: str | None = None, **attributes: Any) -> Any:
    """Agent Lightning 0.3's ``operation``: ``@operation``, ``@operation(k=v)`` or ``with operation(k=v) as op``.

    A ``traced`` span named after the function (or ``name``, else ``operation``); ``propagate=False``
    runs the function or block without recording anything.
    """
    if not propagate:
        if callable(fn):
            return fn
        return _NoSpan()
    if callable(fn):
        return traced(name or fn.__qualname__, **attributes)(fn)
    block = traced(name, **attributes)  # a decorated function gives its own name
    block.block_name = "operation"
    return block


class _NoSpan:
    """What ``operation(propagate=False)`` returns: the same methods, recording nothing; as a decorator
    (``@operation(propagate=False)``) it returns the function unchanged."""

    def __call__(self, fn: _Fn) -> _Fn:
        return fn

    def set_attribute(self, key: str, value: Any) -> None: ...
    def set_input(self, *args: Any, **kwargs: Any) -> None: ...
    def set_output(self, output: Any) -> None: ...
    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: Any) -> None: ...
    async def __aenter__(self) -> _NoSpan:
        return self

    async def __aexit__(self, *exc: Any) -> None: ...
