"""Agent Lightning 0.3's algorithms (``agentlightning.algorithm``), as boltstream runs them.

An :class:`Algorithm` drives agents through the store: it queues rollouts with resources, waits for them
and reads their rewards and spans (:class:`~boltstream.agl.store.LightningStore`). ``agl.Trainer(algorithm=...)``
gives it the store of its stack, the initial resources and an adapter, then calls :meth:`Algorithm.run` with
the datasets while runner processes serve the queue. A subclass, an ``@algo`` function and :class:`Baseline`
run that way, as in Agent Lightning.

Two of Agent Lightning's algorithms are settings of boltstream's own pipeline instead:

* :class:`VERL` (its PPO/GRPO trainer on VERL) holds a VERL config; ``Trainer`` maps the keys that mean the
  same thing to boltstream's continuous GRPO trainer (:func:`verl_trainer_settings`);
* :class:`APO` (prompt optimisation) holds its settings; ``Trainer`` runs it on the store: with an OpenAI
  client, a beam search whose new templates an LLM writes from critiques of their rollouts (as Agent
  Lightning's); with candidate templates only, boltstream's ranker (UCB over their rewards).

Neither runs on its own: their :meth:`run` says to pass them to ``Trainer``. Submodules ``apo`` and ``verl``
are Agent Lightning's import paths of the two.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

log = logging.getLogger("boltstream.agl.algorithm")

T = TypeVar("T")


class Algorithm:
    """What tunes the agent: ``run(train_dataset, val_dataset)`` (sync or async) on the store it is given."""

    _trainer_ref: weakref.ReferenceType[Any] | None = None
    _store: Any = None
    _initial_resources: Mapping[str, Any] | None = None
    _adapter: Any = None

    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.run)

    def set_trainer(self, trainer: Any) -> None:
        self._trainer_ref = weakref.ref(trainer)

    def get_trainer(self) -> Any:
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        if trainer is None:
            raise ValueError("no trainer: the algorithm runs inside agl.Trainer(algorithm=...).fit")
        return trainer

    def set_store(self, store: Any) -> None:
        self._store = store

    def get_store(self) -> Any:
        if self._store is None:
            raise ValueError("no store: the algorithm runs inside agl.Trainer(algorithm=...).fit, or call set_store")
        return self._store

    def set_initial_resources(self, resources: Mapping[str, Any]) -> None:
        self._initial_resources = resources

    def get_initial_resources(self) -> Mapping[str, Any] | None:
        return self._initial_resources

    def set_adapter(self, adapter: Any) -> None:
        self._adapter = adapter

    def get_adapter(self) -> Any:
        if self._adapter is None:
            raise ValueError("no adapter was set for this algorithm")
        return self._adapter

    def set_llm_proxy(self, llm_proxy: Any) -> None:
        """Agent Lightning's LLM proxy: boltstream's router serves the runners, so there is none to set."""
        if llm_proxy is not None:
            raise ValueError("boltstream has no LLM proxy to give an algorithm: the runners call the router")

    def get_llm_proxy(self) -> None:
        return None

    def run(self, train_dataset: Sequence[Any] | None = None, val_dataset: Sequence[Any] | None = None) -> Any:
        raise NotImplementedError("an Algorithm subclass implements run(train_dataset, val_dataset)")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(*args, **kwargs)


class FastAlgorithm(Algorithm):
    """An algorithm quick enough for ``Trainer.dev`` (a marker class, as in Agent Lightning)."""


class FunctionalAlgorithm(Algorithm):
    """An ``@algo`` function as an algorithm: it gets the keyword arguments it names among ``store``,
    ``train_dataset``, ``val_dataset``, ``initial_resources``, ``adapter`` and ``llm_proxy`` (always None)."""

    _GIVEN = ("store", "train_dataset", "val_dataset", "initial_resources", "adapter", "llm_proxy")

    def __init__(self, function: Callable[..., Any]) -> None:
        self._function = function
        parameters = inspect.signature(function).parameters
        unknown = [name for name in parameters if name not in self._GIVEN]
        if unknown:
            raise TypeError(
                f"@algo {function.__name__}: parameters {unknown} would get no value; it may take {self._GIVEN}"
            )
        self._wanted = tuple(parameters)
        functools.update_wrapper(self, function)

    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self._function)

    def run(self, train_dataset: Sequence[Any] | None = None, val_dataset: Sequence[Any] | None = None) -> Any:
        available = {
            "store": self._store,
            "train_dataset": train_dataset,
            "val_dataset": val_dataset,
            "initial_resources": self._initial_resources,
            "adapter": self._adapter,
            "llm_proxy": None,
        }
        return self._function(**{name: available[name] for name in self._wanted})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function(*args, **kwargs)


def algo(function: Callable[..., Any]) -> FunctionalAlgorithm:
    """``@algo`` makes a function (sync or async) an algorithm; see :class:`FunctionalAlgorithm`."""
    return FunctionalAlgorithm(function)


class Baseline(FastAlgorithm):
    """Runs every task through the runners with the initial resources and logs how each rollout ended:
    the train dataset in mode ``train``, then the val dataset in mode ``val``, ``n_epochs`` times, at most
    ``max_queue_length`` rollouts queued at once. ``span_verbosity`` ``keys`` / ``key_values`` also logs
    each rollout's spans. (Agent Lightning's ``train_split`` re-splits the two datasets; here they stay as given.)
    """

    def __init__(
        self,
        *,
        n_epochs: int = 1,
        train_split: float = 0.5,
        polling_interval: float = 5.0,
        max_queue_length: int = 4,
        span_verbosity: str = "keys",
    ) -> None:
        if not 0.0 < train_split < 1.0:
            raise ValueError("train_split must be between 0 and 1")
        if span_verbosity not in ("keys", "key_values", "none"):
            raise ValueError(f"span_verbosity must be keys, key_values or none, not {span_verbosity!r}")
        if n_epochs < 1 or max_queue_length < 1:
            raise ValueError("n_epochs and max_queue_length must be at least 1")
        self.n_epochs, self.train_split, self.polling_interval = n_epochs, train_split, polling_interval
        self.max_queue_length, self.span_verbosity = max_queue_length, span_verbosity
        #: Every rollout that finished, in the order they were queued.
        self.finished: list[Any] = []

    async def run(self, train_dataset: Sequence[Any] | None = None, val_dataset: Sequence[Any] | None = None) -> None:
        store = self.get_store()
        resources = self.get_initial_resources()
        resources_id = (await store.add_resources(dict(resources))).resources_id if resources else None
        work = [(task, "train") for task in train_dataset or []] + [(task, "val") for task in val_dataset or []]
        for _ in range(self.n_epochs):
            for start in range(0, len(work), self.max_queue_length):
                batch = work[start : start + self.max_queue_length]
                queued = await store.enqueue_many_rollouts(
                    [{"input": task, "mode": mode, "resources_id": resources_id} for task, mode in batch]
                )
                ids = [rollout.rollout_id for rollout in queued]
                while True:
                    done = await store.wait_for_rollouts(rollout_ids=ids, timeout=self.polling_interval)
                    if len(done) == len(ids):
                        break
                for rollout in sorted(done, key=lambda r: ids.index(r.rollout_id)):
                    await self._log(store, rollout)
                    self.finished.append(rollout)

    async def _log(self, store: Any, rollout: Any) -> None:
        log.info(
            "rollout %s (%s) %s, final reward %s",
            rollout.rollout_id,
            rollout.mode,
            rollout.status,
            rollout.final_reward,
        )
        if self.span_verbosity == "none":
            return
        for span in await store.query_spans(rollout.rollout_id):
            shown = span.attributes if self.span_verbosity == "key_values" else sorted(span.attributes)
            log.info(
                "  #%d %s (%s) %.3f s: %s",
                span.sequence_id,
                span.name,
                span.kind,
                span.end_time - span.start_time,
                shown,
            )


class _PipelineAlgorithm(Algorithm):
    """An algorithm that is a setting of boltstream's pipeline: ``Trainer`` runs it, not :meth:`run`."""

    def run(self, train_dataset: Sequence[Any] | None = None, val_dataset: Sequence[Any] | None = None) -> Any:
        raise RuntimeError(
            f"{type(self).__name__} is run by boltstream's pipeline: pass it to agl.Trainer(algorithm=...).fit"
        )


class VERL(_PipelineAlgorithm):
    """A VERL config (the overrides Agent Lightning's examples pass): ``Trainer`` trains with boltstream's
    GRPO trainer on the keys that map (:func:`verl_trainer_settings`) and warns about the rest."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        if not isinstance(config, Mapping):
            raise TypeError(f"VERL takes its config as a dict, not {type(config).__name__}")
        self.config = dict(config)


#: VERL config keys (dotted) -> (boltstream setting, conversion). ``trainer.X`` is a TrainerConfig field,
#: ``fit.X`` an argument of Trainer.
_VERL_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "data.train_batch_size": ("trainer.groups_per_step", int),
    "actor_rollout_ref.rollout.n": ("trainer.group_size", int),
    "actor_rollout_ref.actor.clip_ratio": ("trainer.clip_epsilon", float),
    "actor_rollout_ref.actor.clip_ratio_low": ("trainer.clip_epsilon", float),
    "actor_rollout_ref.actor.ppo_epochs": ("trainer.updates_per_batch", int),
    "actor_rollout_ref.actor.kl_loss_coef": ("trainer.kl_coef", float),
    "actor_rollout_ref.model.path": ("trainer.model_path", str),
    "actor_rollout_ref.model.lora_rank": ("trainer.lora_rank", int),
    "trainer.total_epochs": ("fit.max_epochs", int),
    "trainer.save_freq": ("trainer.checkpoint_interval", int),
}


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def verl_trainer_settings(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """A VERL config as boltstream settings: (TrainerConfig fields, Trainer arguments, keys with no
    counterpart). ``algorithm.adv_estimator`` other than ``grpo`` is an error (boltstream trains GRPO); the
    KL coefficient counts only with ``use_kl_loss``; the keys not mapped (GPU placement, FSDP, vLLM engine
    options, learning rate, lengths, loggers) have no meaning on boltstream's trainer and are returned."""
    flat = _flatten(config)
    estimator = flat.pop("algorithm.adv_estimator", "grpo")
    if estimator != "grpo":
        raise ValueError(f"VERL algorithm.adv_estimator={estimator!r}: boltstream's trainer trains with grpo only")
    use_kl = bool(flat.pop("actor_rollout_ref.actor.use_kl_loss", False))
    trainer: dict[str, Any] = {}
    fit: dict[str, Any] = {}
    ignored = []
    for key, value in flat.items():
        if key not in _VERL_KEYS:
            ignored.append(key)
            continue
        target, convert = _VERL_KEYS[key]
        if key == "actor_rollout_ref.actor.clip_ratio_low" and "actor_rollout_ref.actor.clip_ratio" in flat:
            continue  # the symmetric clip_ratio wins over its low half
        if key == "actor_rollout_ref.actor.kl_loss_coef" and not use_kl:
            value = 0.0
        section, name = target.split(".", 1)
        (trainer if section == "trainer" else fit)[name] = convert(value)
    return trainer, fit, sorted(ignored)


class APO(_PipelineAlgorithm, Generic[T]):
    """Automatic prompt optimisation of the one PromptTemplate among ``Trainer``'s initial resources.

    Given ``async_openai_client`` (an ``openai.AsyncOpenAI`` on any OpenAI-compatible endpoint), as Agent
    Lightning's APO: a beam search in which ``gradient_model`` critiques a template from the rollouts it
    earned and ``apply_edit_model`` rewrites it (:mod:`boltstream.agl.algorithm.textual_gradient`, which
    documents the rounds); ``candidates`` join the first beam. Without a client, boltstream's ranker:
    ``Trainer`` ranks the seed template and the ``candidates`` (required then) by the final rewards their
    rollouts earn (UCB1 with ``exploration``, default ``trainer.apo_exploration``), dealing
    ``gradient_batch_size`` train tasks at a time to the template ranked first, then validates the best one
    on up to ``val_batch_size`` val tasks. Either way ``Trainer.fit`` runs it and :meth:`get_best_prompt`
    gives the result.
    """

    def __init__(
        self,
        async_openai_client: Any = None,
        *,
        candidates: Sequence[str] = (),
        gradient_model: str = "gpt-5-mini",
        apply_edit_model: str = "gpt-4.1-mini",
        diversity_temperature: float = 1.0,
        gradient_batch_size: int = 4,
        val_batch_size: int = 16,
        beam_width: int = 4,
        branch_factor: int = 4,
        beam_rounds: int = 3,
        rollout_batch_timeout: float = 3600.0,
        run_initial_validation: bool = True,
        exploration: float | None = None,
        _poml_trace: bool = False,  # Agent Lightning's debugging switch for its POML prompts: none here
    ) -> None:
        counts = (gradient_batch_size, val_batch_size, beam_width, branch_factor, beam_rounds)
        if min(counts) < 1 or rollout_batch_timeout <= 0:
            raise ValueError(
                "gradient_batch_size, val_batch_size, beam_width, branch_factor and beam_rounds must be at least "
                "1, rollout_batch_timeout > 0"
            )
        if isinstance(candidates, str) or not all(isinstance(c, str) for c in candidates):
            raise TypeError("APO candidates are a list of template strings")
        self.async_openai_client = async_openai_client
        self.candidates = list(candidates)
        self.gradient_model, self.apply_edit_model = gradient_model, apply_edit_model
        self.diversity_temperature = diversity_temperature
        self.gradient_batch_size, self.val_batch_size = gradient_batch_size, val_batch_size
        self.beam_width, self.branch_factor, self.beam_rounds = beam_width, branch_factor, beam_rounds
        self.rollout_batch_timeout = rollout_batch_timeout
        self.run_initial_validation = run_initial_validation
        #: UCB exploration weight of the ranker; None: ``trainer.apo_exploration`` of the settings.
        self.exploration = exploration
        #: The best template of the last fit (a PromptTemplate), and every template it scored.
        self.best_prompt: Any = None
        self.search: Any = None

    @property
    def writes_prompts(self) -> bool:
        """Whether this APO writes new templates with an LLM (it has a client) or ranks the candidates."""
        return self.async_openai_client is not None

    def get_best_prompt(self) -> Any:
        """The best PromptTemplate the last ``Trainer.fit`` found."""
        if self.best_prompt is None:
            raise ValueError("APO has no best prompt yet: run it with agl.Trainer(algorithm=apo).fit(...)")
        return self.best_prompt


def run_algorithm(algorithm: Algorithm, train: Sequence[Any] | None, val: Sequence[Any] | None) -> None:
    """Run ``algorithm`` (sync, or async on a new event loop) to the end."""
    if algorithm.is_async():
        asyncio.run(algorithm.run(train, val))
    else:
        algorithm.run(train, val)


__all__ = [
    "APO",
    "VERL",
    "Algorithm",
    "Baseline",
    "FastAlgorithm",
    "FunctionalAlgorithm",
    "algo",
    "run_algorithm",
    "verl_trainer_settings",
]
