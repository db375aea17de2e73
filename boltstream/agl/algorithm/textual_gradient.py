"""APO's prompt writing: a beam search over prompt templates, each new one written by an LLM from a
critique of the rollouts the old one earned (a *textual gradient*).

It owns the rounds and the two LLM steps; running rollouts is the caller's (``evaluate``: a template and a
batch of tasks in, the finished rollouts with their spans out). One search:

1. The beam starts as the seed template (and any ``candidates``); with ``run_initial_validation`` the seed
   is scored on the validation batch first.
2. Each of ``beam_rounds`` rounds takes ``beam_width`` parents from the beam (best first, repeated when
   the beam is smaller) and, ``branch_factor`` times each, runs the parent on the next ``gradient_batch_size``
   train tasks, asks ``gradient_model`` for a critique of the template given those rollouts (each task's
   input, the model calls the agent made and the reward it earned) and asks ``apply_edit_model``, at
   ``diversity_temperature``, to rewrite the template following the critique.
3. Parents and children are scored on the next ``val_batch_size`` validation tasks (the mean final reward;
   a failed or unrewarded rollout counts 0) and the best ``beam_width`` are the next beam. The best
   template ever scored is the result.

A rewrite that is empty, does not parse for the template's engine, or asks for a value the parent did not
(an f-string or jinja placeholder the agent does not fill) is discarded with a warning and counted in
``SearchResult.discarded``, as is a critique or rewrite the LLM failed to give: no rollout runs a template
that cannot render. So is a rewrite that repeats a template the round scores already.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from boltstream.producers.resources import PromptTemplate

if TYPE_CHECKING:
    from boltstream.agl.algorithm import APO

log = logging.getLogger("boltstream.agl.algorithm.apo")

#: The rollouts shown to the critique, at most this many characters in all (each rollout a share of it):
#: the critique must fit the gradient model's context, a small served model's too.
EXPERIENCE_CHARS = 1500

CRITIQUE_INSTRUCTIONS = (
    "You improve prompt templates for an AI agent. Below is a template, then rollouts the agent made with "
    "it: each task, what the model was asked and answered, and the reward (higher is better). Explain in a "
    "few sentences what in the template made rewards low and what to change."
)
EDIT_INSTRUCTIONS = (
    "Rewrite the prompt template below following the critique. Keep every placeholder of the template "
    "exactly as written (such as {name} or {{ name }}), add none, and answer with the new template only, "
    "between <prompt> and </prompt>."
)
_TAGGED = re.compile(r"<prompt>(.*?)(?:</prompt>|$)", re.DOTALL)


@dataclass(frozen=True)
class Rollout:
    """What the critique sees of one rollout: the task, the model calls (prompt, answer) and the reward."""

    task: Any
    calls: tuple[tuple[str, str], ...]
    reward: float


#: Runs a template on tasks in a mode ("train" or "val") and gives back the finished rollouts.
Evaluate = Callable[[PromptTemplate, list[Any], str], Awaitable[list[Rollout]]]


@dataclass
class Scored:
    template: PromptTemplate
    score: float
    parent: int | None  # index in SearchResult.scored of the template it was rewritten from
    round: int


@dataclass
class SearchResult:
    """Every template scored (in order), the best one, and what was thrown away."""

    scored: list[Scored] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)

    @property
    def best(self) -> Scored:
        return max(self.scored, key=lambda s: s.score)


class _Batches:
    """The next ``size`` items of a dataset, wrapping around at its end."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items, self.position = list(items), 0

    def take(self, size: int) -> list[Any]:
        size = min(size, len(self.items))
        batch = [self.items[(self.position + i) % len(self.items)] for i in range(size)]
        self.position = (self.position + size) % len(self.items)
        return batch


def rewrite_problem(parent: PromptTemplate, child: PromptTemplate) -> str | None:
    """Why ``child`` cannot replace ``parent`` in the agent, or None: empty, does not parse or render for its
    engine, or needs a value ``parent`` did not (poml templates: only emptiness is checked)."""
    if not child.template.strip():
        return "the rewrite is empty"
    try:
        extra = _values(child) - _values(parent)
        if child.engine == "f-string":  # a positional field ("{}") shows only when rendering
            child.format(**{name: _AnyValue() for name in _values(child)})
    except (ValueError, IndexError, KeyError, AttributeError) as exc:
        return f"the rewrite does not render as a {child.engine} template: {type(exc).__name__}: {exc}"
    if extra:
        return f"the rewrite asks for values the agent does not give: {sorted(extra)}"
    return None


class _AnyValue:
    """Stands for a value the agent fills in: any attribute, item or format spec of it is fine."""

    def __getattr__(self, name: str) -> _AnyValue:
        return self

    def __getitem__(self, key: Any) -> _AnyValue:
        return self

    def __format__(self, spec: str) -> str:
        return "x"


def _values(template: PromptTemplate) -> set[str]:
    if template.engine == "f-string":
        return set(template.placeholders())
    if template.engine == "jinja":
        from jinja2 import TemplateSyntaxError, meta
        from jinja2.sandbox import SandboxedEnvironment

        try:
            return set(meta.find_undeclared_variables(SandboxedEnvironment().parse(template.template)))
        except TemplateSyntaxError as exc:
            raise ValueError(str(exc)) from exc
    return set()


def rewritten(answer: str) -> str:
    """The template in the edit model's answer: between ``<prompt>`` tags when it used them, else all of it."""
    match = _TAGGED.search(answer)
    return (match[1] if match else answer).strip()


def _rendered(rollout: Rollout, room: int) -> str:
    calls = "\n".join(f"  asked: {prompt}\n  answered: {answer}" for prompt, answer in rollout.calls)
    text = f"task: {rollout.task}\n{calls}\nreward: {rollout.reward:g}"
    return text if len(text) <= room else text[: room - 4] + " ..."


class TextualGradientSearch:
    """One beam search with the settings of ``apo`` (an :class:`~boltstream.agl.algorithm.APO` given an
    ``openai.AsyncOpenAI`` client, any OpenAI-compatible endpoint)."""

    def __init__(self, apo: APO, evaluate: Evaluate, *, report: Callable[[str], None] = log.info) -> None:
        self.apo, self.evaluate, self.report = apo, evaluate, report

    async def run(
        self, seed: PromptTemplate, candidates: Sequence[str], train: Sequence[Any], val: Sequence[Any]
    ) -> SearchResult:
        """The search from ``seed`` and ``candidates``; ``train`` must not be empty: the critiques read it."""
        apo, result = self.apo, SearchResult()
        grad, check = _Batches(train), _Batches(val or train)  # no val set: train tasks score the beam
        texts = dict.fromkeys([seed.template, *candidates])  # in order, each once
        beam = [PromptTemplate(template=text, engine=seed.engine) for text in texts]
        latest: dict[str, int] = {}  # template text -> index in result.scored of its latest score

        def record(template: PromptTemplate, score: float, parent: PromptTemplate | None, number: int) -> None:
            origin = None if parent is None else latest.get(parent.template)
            latest[template.template] = len(result.scored)
            result.scored.append(Scored(template, score, origin, number))

        def standing(template: PromptTemplate) -> float:
            """Sort key: the template's latest score, best first; an unscored one last."""
            index = latest.get(template.template)
            return float("inf") if index is None else -result.scored[index].score

        if apo.run_initial_validation:
            record(seed, await self._score(seed, check.take(apo.val_batch_size)), None, 0)
            self.report(f"APO: seed template scores {result.scored[-1].score:.3f}")
        for number in range(1, apo.beam_rounds + 1):
            ranked = sorted(beam, key=standing)
            parents = [ranked[i % len(ranked)] for i in range(apo.beam_width)]
            children: list[tuple[PromptTemplate, PromptTemplate]] = []
            known = {template.template for template in beam}
            for parent in parents:
                for _ in range(apo.branch_factor):
                    child = await self._rewrite(parent, grad.take(apo.gradient_batch_size), result)
                    if child is not None and child.template in known:
                        self._discard(result, "the rewrite repeats a template this round scores already")
                    elif child is not None:
                        known.add(child.template)
                        children.append((parent, child))
            pool = [(None, template) for template in beam] + children
            batch = check.take(apo.val_batch_size)
            round_scores: list[tuple[float, PromptTemplate]] = []
            for parent, template in pool:
                score = await self._score(template, batch)
                record(template, score, parent, number)
                round_scores.append((score, template))
            round_scores.sort(key=lambda item: -item[0])
            beam = [template for _, template in round_scores][: apo.beam_width]
            self.report(
                f"APO round {number}/{apo.beam_rounds}: {len(children)} new templates; beam scores "
                + ", ".join(f"{score:.3f}" for score, _ in round_scores[: apo.beam_width])
            )
        return result

    # -- steps --------------------------------------------------------------------------------------
    async def _score(self, template: PromptTemplate, tasks: list[Any]) -> float:
        rollouts = await self.evaluate(template, tasks, "val")
        return sum(r.reward for r in rollouts) / len(rollouts) if rollouts else 0.0

    async def _rewrite(self, parent: PromptTemplate, tasks: list[Any], result: SearchResult) -> PromptTemplate | None:
        rollouts = await self.evaluate(parent, tasks, "train")
        room = EXPERIENCE_CHARS // max(1, len(rollouts))
        experiences = "\n\n".join(_rendered(r, room) for r in rollouts)
        try:
            critique = await self._ask(
                self.apo.gradient_model,
                f"{CRITIQUE_INSTRUCTIONS}\n\nTemplate:\n{parent.template}\n\nRollouts:\n{experiences}",
                temperature=None,
            )
            answer = await self._ask(
                self.apo.apply_edit_model,
                f"{EDIT_INSTRUCTIONS}\n\nTemplate:\n{parent.template}\n\nCritique:\n{critique}",
                temperature=self.apo.diversity_temperature,
            )
        except Exception as exc:  # any failure of the endpoint: this branch is lost, the search goes on
            return self._discard(result, f"the LLM gave no critique or rewrite: {type(exc).__name__}: {exc}")
        child = PromptTemplate(template=rewritten(answer), engine=parent.engine)
        problem = rewrite_problem(parent, child)
        return child if problem is None else self._discard(result, problem)

    async def _ask(self, model: str, prompt: str, *, temperature: float | None) -> str:
        options = {} if temperature is None else {"temperature": temperature}
        response = await self.apo.async_openai_client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], **options
        )
        return response.choices[0].message.content or ""

    def _discard(self, result: SearchResult, reason: str) -> None:
        log.warning("APO: a new template was discarded: %s", reason)
        result.discarded.append(reason)
        return None


__all__ = ["Rollout", "Scored", "SearchResult", "TextualGradientSearch", "rewrite_problem", "rewritten"]
