"""Agent Lightning 0.3's tracer classes, as switches for boltstream's own tracing.

Agent Lightning's runners hand a tracer to each worker; here a tracer turns on what records an
agent's LLM calls in boltstream: :class:`AgentOpsTracer` patches the ``openai`` client (like
``producers.instrument()``), :class:`OtelTracer` installs the OpenTelemetry bridge
(:mod:`boltstream.producers.otel`, the ``[otel]`` extra), :class:`DummyTracer` records LLM calls not at
all. Spans go to the broker as they are recorded; a tracer also keeps, in this process, the spans of its
last trace (its last ``trace_context``, or the last rollout a runner ran with it), at most
``max_trace_spans`` of them (the newest), for :meth:`Tracer.get_last_trace`. What happened earlier is read
back from the archive with the store's ``query_spans``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from boltstream.producers import autotrace, context, pending_span, runtime
from boltstream.producers.context import new_id
from boltstream.producers.emit import EmittedSpan, _emitted, emit_span
from boltstream.producers.pending_span import PendingSpan
from boltstream.producers.span_views import Span

log = logging.getLogger("boltstream.tracers")


def span_of(pending: PendingSpan) -> Span:
    """A recorded span as Agent Lightning's ``Span`` shape (times in seconds, attributes typed)."""
    attributes = pending[pending_span.ATTRIBUTES :]
    llm = pending[pending_span.LLM]
    return Span(
        rollout_id=pending[pending_span.ROLLOUT_ID],
        attempt_id=pending[pending_span.ATTEMPT_ID],
        sequence_id=pending[pending_span.SEQUENCE],
        span_id=pending[pending_span.EVENT_ID],
        parent_id=pending[pending_span.PARENT_ID],
        name=pending[pending_span.NAME],
        kind=pending[pending_span.KIND],
        status=pending[pending_span.STATUS],
        attributes=dict(zip(attributes[::2], attributes[1::2], strict=True)),
        start_time=pending[pending_span.START_TIME_US] / 1e6,
        end_time=pending[pending_span.END_TIME_US] / 1e6,
        reward=pending[pending_span.REWARD],
        error=pending[pending_span.ERROR],
        task_id=pending[pending_span.TASK_ID],
        agent_name=pending[pending_span.AGENT_NAME],
        llm=dict(llm) if isinstance(llm, dict) else {},
    )


class _Capture:
    """The spans of one rollout recorded in this process while it is observed; the newest ``limit`` kept."""

    def __init__(self, rollout_id: str, limit: int) -> None:
        self.rollout_id = rollout_id
        self.spans: deque[PendingSpan] = deque(maxlen=limit)
        self.seen = 0

    def __call__(self, span: PendingSpan) -> None:
        if span[pending_span.ROLLOUT_ID] == self.rollout_id:
            self.spans.append(span)
            self.seen += 1


class _TraceContext:
    """What :meth:`Tracer.trace_context` returns: a ``with`` and an ``async with`` block (Agent Lightning's
    is async) that runs inside one rollout, makes the tracer the active one, and captures the trace."""

    def __init__(
        self, tracer: Tracer, name: str | None, rollout_id: str | None, attempt_id: str | None, store: Any
    ) -> None:
        self.tracer, self.name, self.rollout_id, self.attempt_id = tracer, name, rollout_id, attempt_id
        self.store = store
        self._block: Any = None
        self._previous: Tracer | None = None

    def __enter__(self) -> Tracer:
        enclosing = context.current_rollout()
        running = getattr(self.store, "running_rollout", None)
        started = running(self.rollout_id) if running is not None and self.rollout_id else None
        if enclosing is not None:
            rollout_id = enclosing.rollout_id
        elif started is not None:  # a rollout its store started: its spans join it, the store ends it
            self._block, rollout_id = context.attached(started), started.rollout_id
        else:
            self._block = context.rollout(
                agent_name=self.name or "", rollout_id=self.rollout_id, attempt=self.attempt_id or 0
            )
            rollout_id = self._block.rollout_id
        self.tracer._begin_capture(rollout_id)
        self._previous = get_active_tracer()
        set_active_tracer(self.tracer)
        if self._block is not None:
            self._block.__enter__()
        return self.tracer

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self._block is not None:
                self._block.__exit__(exc_type, exc, tb)  # a rollout of its own records its root span here
        finally:
            self.tracer._end_capture()
            if self._previous is None:
                clear_active_tracer()
            else:
                set_active_tracer(self._previous)

    async def __aenter__(self) -> Tracer:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)


class _OperationRecording:
    """What :meth:`Tracer.operation_context` yields (Agent Lightning's ``SpanRecordingContext``): the span's
    attributes and status, recorded as one boltstream span when the block ends."""

    def __init__(self, name: str, attributes: dict[str, Any] | None, start_time: float) -> None:
        self.name, self.attributes, self.start_time = name, dict(attributes or {}), start_time
        self.event_id = new_id()
        self.status, self.error = "ok", None
        self._recorded: EmittedSpan | None = None

    def record_attributes(self, attributes: dict[str, Any]) -> None:
        self.attributes.update(attributes)

    def record_status(self, status_code: str, description: str | None = None) -> None:
        """``"ERROR"`` makes the span an error (``description`` its message); ``"OK"`` / ``"UNSET"`` do not."""
        failed = str(status_code).upper() == "ERROR"
        self.status, self.error = ("error", description) if failed else ("ok", None)

    def record_exception(self, exception: BaseException) -> None:
        self.record_status("ERROR", f"{type(exception).__name__}: {exception}")
        self.record_attributes({"exception.type": type(exception).__name__, "exception.message": str(exception)})

    def get_recorded_span(self) -> EmittedSpan:
        if self._recorded is None:
            raise ValueError("the operation's span is recorded when its block ends")
        return self._recorded

    def _record(self, end_time: float) -> None:
        emit_span(
            "custom",
            self.name,
            attributes=self.attributes,
            status=self.status,
            error=self.error,
            start_time_us=int(self.start_time * 1e6),
            end_time_us=int(end_time * 1e6),
            event_id=self.event_id,
        )
        self._recorded = _emitted(self.event_id, "custom", self.name, self.attributes, status=self.status)


class Tracer:
    """Base class: ``init_worker`` switches tracing on, ``teardown_worker`` off (and flushes).

    ``trace_context`` (``with`` or ``async with``) runs a block as one rollout; ``get_last_trace`` returns
    the spans of the last one, kept in this process (the newest ``max_trace_spans``).
    """

    #: How many spans of the last trace the tracer keeps in memory (the newest; older ones only on the broker).
    max_trace_spans: int = 10_000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.worker_id: int | None = None
        self._store: Any = None
        self._capture: _Capture | None = None
        self._capture_lock = threading.Lock()
        self._last_trace: list[PendingSpan] = []
        #: Spans of the last trace beyond ``max_trace_spans`` (sent to the broker, not kept here).
        self.dropped_spans = 0

    #: Attributes that belong to this process (the capture, the store, what was patched or installed):
    #: a tracer sent to a runner process arrives without them and starts afresh there.
    _process_local: tuple[str, ...] = ("_capture", "_capture_lock", "_store", "_last_trace", "_patched", "_processor")

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key not in self._process_local}

    def __setstate__(self, state: dict[str, Any]) -> None:
        type(self).__init__(self)  # a fresh tracer of its class, then its settings
        self.__dict__.update(state)

    def init(self, *args: Any, **kwargs: Any) -> None:
        """Process-wide setup (nothing to do: the SDK starts its producer on first use)."""

    def teardown(self, *args: Any, **kwargs: Any) -> None:
        runtime.flush()

    def init_worker(self, worker_id: int = 0, store: Any = None) -> None:
        self.worker_id = worker_id
        self._store = store
        self._switch_on()

    def teardown_worker(self, worker_id: int = 0) -> None:
        self._switch_off()
        runtime.flush()
        self.worker_id = None

    def _switch_on(self) -> None:
        """What this tracer records besides the emitters' spans."""

    def _switch_off(self) -> None:
        """Undo :meth:`_switch_on`."""

    @contextmanager
    def lifespan(self, store: Any = None) -> Iterator[None]:
        """``init`` and ``init_worker(0, store)`` for the block, torn down after it."""
        self.init()
        try:
            self.init_worker(0, store)
            try:
                yield
            finally:
                self.teardown_worker(0)
        finally:
            self.teardown()

    def trace_context(
        self,
        name: str | None = None,
        *,
        store: Any = None,
        rollout_id: str | None = None,
        attempt_id: str | None = None,
    ) -> _TraceContext:
        """A block (``with`` or ``async with``) whose spans belong to one rollout: the enclosing one if open,
        else ``rollout_id`` if the store (``store``, else the one ``init_worker`` got) started it and it runs,
        else a new one (``rollout_id`` / ``attempt_id`` given are kept). Its spans are the last trace."""
        return _TraceContext(self, name, rollout_id, attempt_id, store if store is not None else self._store)

    def _trace_context_sync(self, name: str | None = None, **ids: Any) -> _TraceContext:
        """Agent Lightning's synchronous form of :meth:`trace_context` (the same block here)."""
        return self.trace_context(name, **ids)

    @contextmanager
    def capturing(self, rollout_id: str) -> Iterator[None]:
        """Keep the spans of ``rollout_id`` recorded during the block as the last trace (the runners' use)."""
        self._begin_capture(rollout_id)
        try:
            yield
        finally:
            self._end_capture()

    def _begin_capture(self, rollout_id: str) -> None:
        with self._capture_lock:
            if self._capture is not None:
                runtime.unobserve(self._capture)
            self._capture = _Capture(rollout_id, self.max_trace_spans)
            self._last_trace, self.dropped_spans = [], 0
            runtime.observe(self._capture)

    def _end_capture(self) -> None:
        with self._capture_lock:
            capture, self._capture = self._capture, None
            if capture is None:
                return
            runtime.unobserve(capture)
            self._last_trace = list(capture.spans)
            self.dropped_spans = capture.seen - len(capture.spans)
        if self.dropped_spans:
            log.warning(
                "the last trace had %d spans; the tracer keeps the newest %d (all went to the broker)",
                capture.seen,
                self.max_trace_spans,
            )

    def get_last_trace(self) -> list[Span]:
        """The spans of the last trace, in the order they were recorded (a trace still open: those so far)."""
        with self._capture_lock:
            recorded = list(self._capture.spans) if self._capture is not None else self._last_trace
        return [span_of(span) for span in recorded]

    def trace_run(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        with self.trace_context(getattr(func, "__name__", None)):
            return func(*args, **kwargs)

    async def trace_run_async(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        async with self.trace_context(getattr(func, "__name__", None)):
            return await func(*args, **kwargs)

    def create_span(
        self, name: str, attributes: dict[str, Any] | None = None, timestamp: float | None = None, status: Any = None
    ) -> EmittedSpan:
        """Record one instant span named ``name`` in the current rollout (a ``custom`` span); ``status`` is
        ``"ok"`` / ``"error"`` or an object with ``status_code`` (``"ERROR"`` is an error)."""
        code = str(getattr(status, "status_code", status or "ok")).lower()
        state = "error" if code == "error" else "ok"
        at = None if timestamp is None else int(timestamp * 1e6)
        attributes = dict(attributes or {})
        event_id = emit_span("custom", name, attributes=attributes, status=state, start_time_us=at, end_time_us=at)
        return _emitted(event_id, "custom", name, attributes, status=state)

    @contextmanager
    def operation_context(
        self,
        name: str,
        attributes: dict[str, Any] | None = None,
        start_time: float | None = None,
        end_time: float | None = None,
    ) -> Iterator[_OperationRecording]:
        """Record the block as one span named ``name`` (spans inside it are its children); an exception
        leaving it makes the span an error and goes on."""
        recording = _OperationRecording(name, attributes, start_time or time.time())
        token = context.set_parent(recording.event_id)
        try:
            yield recording
        except Exception as exc:
            recording.record_exception(exc)
            raise
        finally:
            context.reset_parent(token)
            recording._record(end_time or time.time())

    def get_langchain_handler(self, *args: Any, **kwargs: Any) -> None:
        """No LangChain callback handler: boltstream traces LangChain through its own integration."""
        log.warning("%s has no LangChain callback handler", type(self).__name__)
        return None


class AgentOpsTracer(Tracer):
    """Records every ``openai`` client call as an ``llm_call`` span (no AgentOps involved)."""

    def __init__(self, *, agentops_managed: bool = True, instrument_managed: bool = True, daemon: bool = True) -> None:
        super().__init__()
        self.agentops_managed, self.instrument_managed, self.daemon = agentops_managed, instrument_managed, daemon
        self._patched = False

    def _switch_on(self) -> None:
        if self.instrument_managed:
            self._patched = autotrace.instrument()

    def _switch_off(self) -> None:
        if self._patched:
            autotrace.uninstrument()
            self._patched = False


class OtelTracer(Tracer):
    """Turns OpenTelemetry GenAI spans of the agent into boltstream spans (needs the ``[otel]`` extra)."""

    def __init__(self) -> None:
        super().__init__()
        self._processor: Any = None

    def _switch_on(self) -> None:
        try:
            from boltstream.producers import otel
        except ImportError as exc:
            raise RuntimeError(
                "OtelTracer needs opentelemetry-sdk: pip install 'boltstream[otel]'; "
                "AgentOpsTracer records openai client calls without it"
            ) from exc
        if self._processor is None:
            self._processor = otel.install()

    def _switch_off(self) -> None:
        if self._processor is not None:
            self._processor.force_flush()


class DummyTracer(Tracer):
    """Records only what the agent emits itself."""


_active: Tracer | None = None


def get_active_tracer() -> Tracer | None:
    return _active


def set_active_tracer(tracer: Tracer) -> None:
    global _active
    _active = tracer


def clear_active_tracer() -> None:
    global _active
    _active = None
