"""Agent Lightning 0.3's ``LitAgentRunner``: runs an agent's rollouts in this process, one at a time.

``with runner.run_context(agent=agent, store=store):`` attaches the agent, switches the tracer on
and off; inside it ``await runner.step(task, resources=...)`` runs one rollout of a task at once
(no queue), and ``await runner.iter()`` takes the rollouts an algorithm queued in the store
(:meth:`~boltstream.agl.store.LightningStore.dequeue_rollout`) until ``max_rollouts`` ran or ``event``
is set; after each, ``runner.tracer.get_last_trace()`` holds its spans. Every rollout is a boltstream
rollout (see :func:`boltstream.producers.litagent.execute_rollout_async`): its spans reach the broker
and the archive, a returned number is its final reward.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from boltstream.producers import runtime
from boltstream.producers.context import new_id
from boltstream.producers.litagent import AttemptedRollout, LitAgent, Rollout, execute_rollout_async
from boltstream.producers.resources import NamedResources
from boltstream.producers.tracers import AgentOpsTracer, Tracer

log = logging.getLogger("boltstream.agl.runner")

T = TypeVar("T")


class Hook:
    """Agent Lightning's runner hooks: override the ones you need (all async). ``on_rollout_start`` comes
    before the rollout, ``on_trace_start`` inside it just before the agent runs, ``on_trace_end`` just after
    the agent returned (its returned reward and the rollout's root span are not recorded yet),
    ``on_rollout_end`` after it with ``spans``, the tracer's last trace. A hook that raises is logged; the
    rollout goes on."""

    async def on_rollout_start(self, *, agent: LitAgent, runner: Any, rollout: Any) -> None: ...

    async def on_trace_start(self, *, agent: LitAgent, runner: Any, tracer: Tracer, rollout: Any) -> None: ...

    async def on_trace_end(self, *, agent: LitAgent, runner: Any, tracer: Tracer, rollout: Any) -> None: ...

    async def on_rollout_end(self, *, agent: LitAgent, runner: Any, rollout: Any, spans: list[Any]) -> None: ...


class LitAgentRunner(Generic[T]):
    """Runs a LitAgent's rollouts; ``tracer`` says what is recorded besides the agent's own emits
    (default :class:`AgentOpsTracer`: its ``openai`` calls)."""

    def __init__(
        self,
        tracer: Tracer | None = None,
        max_rollouts: int | None = None,
        poll_interval: float = 1.0,
        **_: Any,
    ) -> None:
        self.tracer = tracer if tracer is not None else AgentOpsTracer()
        self.max_rollouts = max_rollouts
        self.poll_interval = poll_interval
        self.worker_id = 0
        self._agent: LitAgent | None = None
        self._store: Any = None
        self._hooks: tuple[Hook, ...] = ()

    def init(self, agent: LitAgent, *, hooks: Sequence[Hook] | None = None, **_: Any) -> None:
        self._agent = agent
        self._hooks = tuple(hooks or ())
        agent.set_runner(self)

    def init_worker(self, worker_id: int, store: Any = None, **_: Any) -> None:
        self.worker_id = worker_id
        self._store = store
        self.tracer.init_worker(worker_id, store)

    def teardown_worker(self, worker_id: int = 0, *args: Any, **kwargs: Any) -> None:
        self.tracer.teardown_worker(worker_id)

    def teardown(self, *args: Any, **kwargs: Any) -> None:
        runtime.flush()
        self._agent = None
        self._hooks = ()

    @contextmanager
    def run_context(
        self, *, agent: LitAgent, store: Any = None, hooks: Sequence[Hook] | None = None, worker_id: int = 0, **_: Any
    ) -> Iterator[LitAgentRunner]:
        """The agent attached (with ``hooks``) and the tracer on, for ``step`` / ``iter`` calls inside."""
        if not isinstance(agent, LitAgent):
            raise TypeError(f"run_context needs a LitAgent (or an @rollout function), not {type(agent).__name__}")
        wrong = [type(hook).__name__ for hook in hooks or () if not isinstance(hook, Hook)]
        if wrong:
            raise TypeError(f"hooks must be agl.Hook instances, not {wrong}")
        self.init(agent, hooks=hooks)
        self.init_worker(worker_id, store)
        try:
            yield self
        finally:
            self.teardown_worker(worker_id)
            self.teardown()

    def get_agent(self) -> LitAgent:
        if self._agent is None:
            raise RuntimeError("no agent: call step / iter inside runner.run_context(agent=..., store=...)")
        return self._agent

    def get_store(self) -> Any:
        if self._store is None:
            raise RuntimeError("no store: pass store= to runner.run_context to take queued rollouts")
        return self._store

    async def step(
        self, input: T, *, resources: NamedResources | None = None, mode: str | None = None, event: Any = None
    ) -> AttemptedRollout:
        """Run one rollout of ``input`` now and return its record (status, final reward)."""
        return await self._run_one(input, resources, mode, new_id(), None)

    async def _run_one(
        self, task: Any, resources: NamedResources | None, mode: Any, rollout_id: str, resources_id: str | None
    ) -> AttemptedRollout:
        """One rollout with the agent's and the hooks' callbacks around it; the tracer keeps its spans."""
        agent = self.get_agent()
        tracer = self.tracer
        queued = Rollout(rollout_id=rollout_id, input=task, mode=mode, resources_id=resources_id)
        await self._call_hooks("on_rollout_start", agent=agent, runner=self, rollout=queued)
        agent.on_rollout_start(task, self, tracer)

        async def trace_started(record: AttemptedRollout) -> None:
            await self._call_hooks("on_trace_start", agent=agent, runner=self, tracer=tracer, rollout=record)

        async def trace_ended(record: AttemptedRollout) -> None:
            await self._call_hooks("on_trace_end", agent=agent, runner=self, tracer=tracer, rollout=record)

        with tracer.capturing(rollout_id):  # the tracer's get_last_trace returns this rollout's spans
            record = await execute_rollout_async(
                agent,
                task,
                resources,
                mode=mode,
                rollout_id=rollout_id,
                resources_id=resources_id,
                on_start=trace_started if self._hooks else None,
                on_end=trace_ended if self._hooks else None,
            )
        agent.on_rollout_end(task, record, self, tracer)
        spans = tracer.get_last_trace() if self._hooks else []
        await self._call_hooks("on_rollout_end", agent=agent, runner=self, rollout=record, spans=spans)
        return record

    async def _call_hooks(self, name: str, **arguments: Any) -> None:
        for hook in self._hooks:
            try:
                await getattr(hook, name)(**arguments)
            except Exception:  # a hook is an observer: its failure must not fail the rollout
                log.exception("runner hook %s.%s raised", type(hook).__name__, name)

    async def iter(self, *, event: threading.Event | Any = None) -> int:
        """Run queued rollouts from the store until ``max_rollouts`` ran or ``event`` is set; returns how many ran."""
        store = self.get_store()
        self.get_agent()
        ran = 0
        while (self.max_rollouts is None or ran < self.max_rollouts) and not (event is not None and event.is_set()):
            queued = await store.dequeue_rollout(worker_id=f"runner-{self.worker_id}", timeout=self.poll_interval)
            if queued is None:
                continue
            resources = (queued.metadata or {}).get("resources", {})
            await self._run_one(queued.input, resources, queued.mode, queued.rollout_id, queued.resources_id)
            runtime.flush()  # the rollout is complete on the broker before its task is acknowledged
            await store.acknowledge(queued.rollout_id)
            ran += 1
        return ran
