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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from boltstream.producers import runtime
from boltstream.producers.context import new_id
from boltstream.producers.litagent import AttemptedRollout, LitAgent, execute_rollout_async
from boltstream.producers.resources import NamedResources
from boltstream.producers.tracers import AgentOpsTracer, Tracer

log = logging.getLogger("boltstream.agl.runner")

T = TypeVar("T")


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

    def init(self, agent: LitAgent, **_: Any) -> None:
        self._agent = agent
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

    @contextmanager
    def run_context(
        self, *, agent: LitAgent, store: Any = None, worker_id: int = 0, **_: Any
    ) -> Iterator[LitAgentRunner]:
        """The agent attached and the tracer on, for ``step`` / ``iter`` calls inside."""
        if not isinstance(agent, LitAgent):
            raise TypeError(f"run_context needs a LitAgent (or an @rollout function), not {type(agent).__name__}")
        self.init(agent)
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
        agent = self.get_agent()
        agent.on_rollout_start(input, self, self.tracer)
        rollout_id = new_id()
        with self.tracer.capturing(rollout_id):  # the tracer's get_last_trace returns this rollout's spans
            record = await execute_rollout_async(agent, input, resources, mode=mode, rollout_id=rollout_id)  # type: ignore[arg-type]
        agent.on_rollout_end(input, record, self, self.tracer)
        return record

    async def iter(self, *, event: threading.Event | Any = None) -> int:
        """Run queued rollouts from the store until ``max_rollouts`` ran or ``event`` is set; returns how many ran."""
        agent, store = self.get_agent(), self.get_store()
        ran = 0
        while (self.max_rollouts is None or ran < self.max_rollouts) and not (event is not None and event.is_set()):
            queued = await store.dequeue_rollout(worker_id=f"runner-{self.worker_id}", timeout=self.poll_interval)
            if queued is None:
                continue
            resources = (queued.metadata or {}).get("resources", {})
            agent.on_rollout_start(queued.input, self, self.tracer)
            with self.tracer.capturing(queued.rollout_id):
                record = await execute_rollout_async(
                    agent,
                    queued.input,
                    resources,
                    mode=queued.mode,
                    rollout_id=queued.rollout_id,
                    resources_id=queued.resources_id,
                )
            agent.on_rollout_end(queued.input, record, self, self.tracer)
            runtime.flush()  # the rollout is complete on the broker before its task is acknowledged
            await store.acknowledge(queued.rollout_id)
            ran += 1
        return ran
