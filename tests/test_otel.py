"""The OpenTelemetry bridge: GenAI semantic-convention spans from any OTel-traced framework become boltstream spans."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Status, StatusCode

from boltstream import agl
from boltstream.infra.common.config import Settings
from boltstream.infra.common.topics import ensure_topics
from boltstream.producers import otel
from tests.producer_helpers import at_least, consume


@pytest.fixture
def sdk(settings: Settings) -> Iterator[Settings]:
    ensure_topics(settings)
    agl.configure(settings)
    yield settings
    agl.shutdown(5)


def test_genai_spans_become_boltstream_spans_in_the_active_rollout(sdk: Settings) -> None:
    provider = TracerProvider()
    otel.install(provider)
    tracer = provider.get_tracer("some.agent.framework")
    messages = [{"role": "user", "parts": [{"type": "text", "content": "What is 17 * 23?"}]}]
    with agl.rollout(task_id="math", agent_name="otel-agent") as run:
        with tracer.start_as_current_span("invoke_agent calculator") as agent_span:
            agent_span.set_attribute("gen_ai.operation.name", "invoke_agent")
            agent_span.set_attribute("gen_ai.agent.name", "calculator")
            with tracer.start_as_current_span("chat tiny") as chat:
                chat.set_attributes(
                    {
                        "gen_ai.operation.name": "chat",
                        "gen_ai.provider.name": "openai",
                        "gen_ai.request.model": "tiny",
                        "gen_ai.response.model": "tiny-v2",
                        "gen_ai.usage.input_tokens": 21,
                        "gen_ai.usage.output_tokens": 5,
                        "gen_ai.response.finish_reasons": ("stop",),
                        "gen_ai.input.messages": json.dumps(messages),
                        "gen_ai.output.messages": json.dumps([{"role": "assistant", "parts": ["391"]}]),
                    }
                )
            with tracer.start_as_current_span("execute_tool multiply") as tool:
                tool.set_attributes({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "multiply"})
                tool.set_status(Status(StatusCode.ERROR, "overflow"))
            with tracer.start_as_current_span("GET /health"):
                pass  # not a GenAI span: ignored
        with tracer.start_as_current_span("openllmetry style") as legacy:
            legacy.set_attributes(
                {
                    "gen_ai.request.model": "tiny",
                    "gen_ai.prompt.0.role": "user",
                    "gen_ai.prompt.0.content": "hi sk-abc123def456ghi789jkl012mno",
                    "gen_ai.completion.0.content": "hello",
                    "gen_ai.usage.prompt_tokens": 3,
                }
            )
    assert agl.flush(10)
    spans = consume(sdk.kafka.bootstrap_servers, sdk.topics.spans, at_least(5))
    assert len(spans) == 5 and {s["rollout_id"] for s in spans} == {run.rollout_id}
    by_name = {s["name"]: s for s in spans}
    chat_span = by_name["chat"]
    assert chat_span["kind"] == "llm_call" and chat_span["parent_id"] == run.root_id
    llm = chat_span["llm"]
    assert (llm["model"], llm["prompt_tokens"], llm["completion_tokens"], llm["finish_reason"]) == (
        "tiny-v2",
        21,
        5,
        "stop",
    )
    assert json.loads(llm["prompt_text"]) == messages and "391" in llm["completion_text"]
    assert llm["latency_ms"] >= 0 and chat_span["end_time_us"] >= chat_span["start_time_us"]
    assert (
        chat_span["attributes"]["otel.parent_span_id"]
        == by_name["invoke_agent calculator"]["attributes"]["otel.span_id"]
    )
    assert "gen_ai.input.messages" not in chat_span["attributes"]  # the messages live in llm.prompt_text
    tool_span = by_name["multiply"]
    assert (tool_span["kind"], tool_span["status"], tool_span["error"]) == ("tool_call", "error", "overflow")
    assert by_name["invoke_agent calculator"]["kind"] == "custom"
    legacy_llm = by_name["openllmetry style"]
    assert json.loads(legacy_llm["llm"]["prompt_text"]) == [{"role": "user", "content": "hi [REDACTED]"}]
    assert legacy_llm["llm"]["completion_text"] == '[{"content":"hello"}]' and legacy_llm["llm"]["prompt_tokens"] == 3
