"""What auto-tracing asks a server for beyond the agent's request, against a server that refuses it.

A hosted API (api.openai.com) rejects parameters it does not know, such as vLLM's ``return_token_ids``,
with HTTP 400. It cannot run here, so httpx's own test double (``httpx.MockTransport``) answers as it does;
the openai client and the tracer above it are the real ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from boltstream import agl
from boltstream.infra.common.config import Settings
from boltstream.infra.common.topics import ensure_topics
from tests.producer_helpers import consume

ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 0,
    "model": "gpt-hosted",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "391"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
}
REJECTION = {
    "error": {
        "message": "Unrecognized request argument supplied: return_token_ids",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
}


@pytest.fixture
def sdk(settings: Settings) -> Iterator[Settings]:
    ensure_topics(settings)
    agl.configure(settings)
    yield settings
    agl.uninstrument()
    agl.shutdown(5)


def hosted_api(received: list[dict]) -> openai.OpenAI:
    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        received.append(body)
        return httpx.Response(
            400 if "return_token_ids" in body else 200, json=REJECTION if body.get("return_token_ids") else ANSWER
        )

    transport = httpx.MockTransport(answer)
    return openai.OpenAI(
        base_url="https://api.hosted.test/v1", api_key="k", max_retries=0, http_client=httpx.Client(transport=transport)
    )


def test_a_server_that_rejects_token_ids_gets_the_agents_request_from_then_on(sdk: Settings) -> None:
    received: list[dict] = []
    client = hosted_api(received)
    assert agl.instrument()
    with agl.rollout(task_id="t", agent_name="hosted"):
        answers = [
            client.chat.completions.create(model="gpt-hosted", messages=[{"role": "user", "content": "17*23?"}])
            for _ in range(2)
        ]
    assert [a.choices[0].message.content for a in answers] == ["391", "391"]  # the agent never saw the 400
    # First call: asked with token ids, refused, asked again as the agent asked; second call: as asked.
    assert ["return_token_ids" in body for body in received] == [True, False, False]
    assert agl.flush(10)
    spans = consume(
        sdk.kafka.bootstrap_servers,
        sdk.topics.spans,
        lambda found: sum(s["kind"] == "llm_call" for s in found) >= 2,
        timeout=20,
    )
    calls = [s for s in spans if s["kind"] == "llm_call"]
    assert [(s["status"], s["llm"]["completion_text"], s["llm"]["completion_token_ids"]) for s in calls] == [
        ("ok", "391", []),
        ("ok", "391", []),
    ]


def test_a_bad_request_of_the_agents_own_is_not_retried(sdk: Settings) -> None:
    received: list[dict] = []
    client = hosted_api(received)
    assert agl.instrument(request_token_ids=False)
    with agl.rollout(task_id="t", agent_name="hosted"), pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="gpt-hosted", messages=[{"role": "user", "content": "?"}], extra_body={"return_token_ids": True}
        )
    assert len(received) == 1  # the agent's own parameter: its error, raised once
