"""Agent Lightning 0.3's tracer classes, as switches for boltstream's own tracing.

Agent Lightning's runners hand a tracer to each worker; here a tracer turns on what records an
agent's LLM calls in boltstream: :class:`AgentOpsTracer` patches the ``openai`` client (like
``producers.instrument()``), :class:`OtelTracer` installs the OpenTelemetry bridge
(:mod:`boltstream.producers.otel`, the ``[otel]`` extra), :class:`DummyTracer` records LLM calls not at
all. Spans go to the broker, not to the tracer: read them back with the store's ``query_spans``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from boltstream.producers import autotrace, context, runtime


class Tracer:
    """Base class: ``init_worker`` switches tracing on, ``teardown_worker`` off (and flushes)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.worker_id: int | None = None

    def init(self, *args: Any, **kwargs: Any) -> None:
        """Process-wide setup (nothing to do: the SDK starts its producer on first use)."""

    def teardown(self, *args: Any, **kwargs: Any) -> None:
        runtime.flush()

    def init_worker(self, worker_id: int = 0, store: Any = None) -> None:
        self.worker_id = worker_id
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
    def trace_context(
        self, name: str | None = None, *, rollout_id: str | None = None, attempt_id: str | None = None, **_: Any
    ) -> Iterator[Tracer]:
        """A block whose spans belong to one rollout: the enclosing one if open, else a new one
        (``rollout_id`` / ``attempt_id`` given are kept)."""
        if context.current_rollout() is not None:
            yield self
            return
        with context.rollout(agent_name=name or "", rollout_id=rollout_id, attempt=attempt_id or 0):
            yield self

    def trace_run(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        with self.trace_context(getattr(func, "__name__", None)):
            return func(*args, **kwargs)

    async def trace_run_async(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        with self.trace_context(getattr(func, "__name__", None)):
            return await func(*args, **kwargs)

    def get_last_trace(self) -> list[Any]:
        raise NotImplementedError(
            "boltstream sends spans to the broker as they happen and keeps none in the tracer: "
            "read a rollout's spans with the store's query_spans(rollout_id)"
        )


class AgentOpsTracer(Tracer):
    """Records every ``openai`` client call as an ``llm_call`` span (no AgentOps involved)."""

    def __init__(self, *, agentops_managed: bool = True, instrument_managed: bool = True, daemon: bool = True) -> None:
        super().__init__()
        self._patched = False

    def _switch_on(self) -> None:
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
