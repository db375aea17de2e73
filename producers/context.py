"""Rollout context: which rollout, attempt and enclosing span a new span belongs to.

``with producers.rollout(task_id=..., agent_name=..., attempt=...)`` (or ``async with``) makes every
span emitted inside, in this thread or asyncio task and those it starts, part of one rollout: it
gets the rollout's ids, a ``sequence`` number, and the enclosing span as ``parent_id`` (the rollout's
root span, or the ``traced`` block around it). Leaving the block emits the root span, of kind
``rollout``: its arrival tells the stream processors the trajectory is complete.

Spans emitted outside any rollout go to the process's *implicit rollout*, shared by all its threads
and asyncio tasks (a framework that calls the model in worker threads, as CrewAI does, gives one
episode, whose reward the main thread emits). It ends (and emits its root span, with attribute
``implicit=true``) after ``producer.implicit_rollout_idle``
seconds without a span, when ``producers.flush()`` runs, or when the interpreter exits; the next span
starts a new one. A reward never ends it: ``emit_reward(score)`` then ``emit_decision()`` is one
episode, and of several rewards the last is the final one (the join decides, see
:mod:`boltstream.stream_processors.join_core`). An agent that runs many tasks back to back without
pausing marks each with ``with agl.rollout(...)`` (or calls ``flush()`` between them).

Head sampling is decided once per rollout from its id (:func:`boltstream.infra.common.contract.keep_rollout`):
spans of a sampled-out rollout are dropped on the spot, at no cost.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from pathlib import Path
from types import TracebackType
from typing import Any

from boltstream.infra.common.contract import keep_rollout
from boltstream.producers import runtime

_current_rollout: ContextVar[rollout | None] = ContextVar("boltstream_rollout", default=None)
_current_parent: ContextVar[str | None] = ContextVar("boltstream_parent", default=None)


# -- ids ---------------------------------------------------------------------------------------
# A UUID-shaped id per span: 80 random bits per process and a 48-bit counter. As unique as uuid4
# in practice, and ~10x cheaper on the agent's thread.
_counter = itertools.count()
_prefix = ""


def _new_prefix() -> None:
    global _prefix, _counter
    raw = os.urandom(10).hex()
    _prefix = f"{raw[:8]}-{raw[8:12]}-4{raw[13:16]}-{'89ab'[int(raw[16], 16) % 4]}{raw[17:20]}-"
    _counter = itertools.count()


_new_prefix()
os.register_at_fork(after_in_child=_new_prefix)


def new_id() -> str:
    """A new unique, UUID-formatted id."""
    return f"{_prefix}{next(_counter):012x}"


def now_us() -> int:
    return time.time_ns() // 1000


# -- rollouts ----------------------------------------------------------------------------------
class rollout:
    """One execution of an agent on a task; a sync and async context manager.

    ``attempt`` numbers retries of the same rollout (pass the same ``rollout_id``); an int ``n``
    becomes attempt id ``attempt-n``, a string is used as is.

    The same name is Agent Lightning's decorator: ``@rollout`` on a function ``(task, llm)`` /
    ``(task, prompt_template)`` (sync or async) makes it an agent
    (:class:`boltstream.producers.litagent.FunctionalLitAgent`), whose returned number is the final reward.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and callable(args[0]):  # @rollout on a function
            from boltstream.producers.litagent import rollout_agent

            return rollout_agent(args[0])
        return super().__new__(cls)

    def __init__(
        self,
        task_id: str = "",
        agent_name: str = "",
        attempt: int | str = 0,
        *,
        rollout_id: str | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> None:
        self.rollout_id = rollout_id or new_id()
        self.attempt_id = attempt if isinstance(attempt, str) else f"attempt-{attempt}"
        self.task_id = task_id
        self.agent_name = agent_name
        #: The ids each span of the rollout carries (see boltstream.producers.pending_span).
        self.ids = (self.rollout_id, self.attempt_id, task_id, agent_name)
        self.attributes = dict(attributes or {})
        self.root_id = new_id()
        self.sampled = keep_rollout(self.rollout_id, runtime.settings().producer.span_sampling_rate)
        self.implicit = False
        self.start_us = now_us()
        self.last_span_us = self.start_us
        self.ended = False
        self._sequence = itertools.count()
        self._tokens: list[tuple[Token, Token]] = []

    def next_sequence(self) -> int:
        return next(self._sequence)

    def end(self, error: BaseException | None = None) -> None:
        """Emit the root span (once): the rollout is complete."""
        if self.ended:
            return
        self.ended = True
        if not self.sampled:
            return
        runtime.record(
            (  # a PendingSpan, fields in the order of boltstream.producers.pending_span
                self.root_id,
                *self.ids,
                "rollout",
                self.agent_name or "rollout",
                None,  # parent_id
                self.next_sequence(),
                self.start_us,
                now_us(),
                "ok" if error is None else "error",
                None if error is None else f"{type(error).__name__}: {error}",
                None,  # reward
                None,  # llm
                "",  # server_id
                *itertools.chain.from_iterable(self.attributes.items()),
            )
        )

    def __enter__(self) -> rollout:
        self.start_us = now_us()
        self._tokens.append((_current_rollout.set(self), _current_parent.set(self.root_id)))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        rollout_token, parent_token = self._tokens.pop()
        _current_parent.reset(parent_token)
        _current_rollout.reset(rollout_token)
        self.end(exc)

    async def __aenter__(self) -> rollout:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        return f"rollout(rollout_id={self.rollout_id!r}, task_id={self.task_id!r}, agent_name={self.agent_name!r})"


def current_rollout() -> rollout | None:
    """The rollout of the enclosing ``with producers.rollout(...)``, if any (implicit ones excluded)."""
    return _current_rollout.get()


def current_parent() -> str | None:
    """event_id of the enclosing span (a traced block or the rollout root), if any."""
    return _current_parent.get()


@contextmanager
def attached(run: rollout) -> Iterator[rollout]:
    """Make ``run`` the current rollout for a block without ending it (e.g. one proxied request of many)."""
    rollout_token, parent_token = _current_rollout.set(run), _current_parent.set(run.root_id)
    try:
        yield run
    finally:
        _current_parent.reset(parent_token)
        _current_rollout.reset(rollout_token)


def set_parent(event_id: str | None) -> Token:
    return _current_parent.set(event_id)


def reset_parent(token: Token) -> None:
    _current_parent.reset(token)


# -- implicit rollouts -------------------------------------------------------------------------
_implicit: rollout | None = None
_implicit_lock = threading.Lock()
_PROGRAM = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "python"


def active_rollout() -> rollout:
    """The rollout a span emitted here belongs to: the enclosing one, else the process's implicit one."""
    global _implicit
    explicit = _current_rollout.get()
    if explicit is not None:
        return explicit
    implicit = _implicit
    if implicit is None or implicit.ended:
        with _implicit_lock:
            if _implicit is None or _implicit.ended:
                _implicit = rollout(agent_name=_PROGRAM, attributes={"implicit": "true"})
                _implicit.implicit = True
            implicit = _implicit
    return implicit


def current_rollout_id() -> str:
    """The id of the rollout a span emitted here joins: the enclosing ``with rollout(...)``'s, else the
    process's implicit rollout's (started now if none is open). Hand it to whoever sends the reward later
    (``send_reward(rollout_id, value)`` from any process)."""
    return active_rollout().rollout_id


def _end_implicit_rollouts(idle_only: bool) -> None:
    """End the implicit rollout (flush, exit), or only when idle for ``implicit_rollout_idle``."""
    global _implicit
    idle_us = runtime.settings().producer.implicit_rollout_idle * 1e6
    with _implicit_lock:
        implicit = _implicit
        if implicit is None:
            return
        if not implicit.ended and (not idle_only or now_us() - implicit.last_span_us > idle_us):
            implicit.end()
        if implicit.ended:
            _implicit = None


def _forget_implicit_rollouts() -> None:
    """A forked child starts its own implicit rollout instead of continuing its parent's."""
    global _implicit, _implicit_lock
    _implicit = None
    _implicit_lock = threading.Lock()  # the parent's may have been held by a thread the child does not have


runtime.on_flush(_end_implicit_rollouts)
os.register_at_fork(after_in_child=_forget_implicit_rollouts)
