"""Token ids for LLM calls whose server returned none: the policy's tokenizer and chat template applied to
the call as recorded, the way a vLLM-compatible server tokenizes that request.

The join emits such a call as a TrainingSample with ``token_source`` ``"retokenized"``, empty token arrays
and ``call_text`` (JSON: endpoint, prompt, completion, finish_reason, and when the call had them tools,
tool_choice, chat_template_kwargs, tool_calls). :func:`retokenize` fills in the arrays:

* prompt, chat completions: the chat template rendered over the request's messages (with its tools and
  chat_template_kwargs) with the generation prompt, and that text encoded without adding special tokens
  (what vLLM does: the template places them). Messages are normalized as vLLM normalizes them: a content
  given as a list of text parts is the parts joined by newlines; tool call arguments are parsed from JSON.
* prompt, completions: the prompt text encoded with the tokenizer's special tokens (BOS ...), as vLLM's
  completions endpoint does; a prompt given as token ids is those ids.
* prompt, Responses API: ``instructions`` becomes a system message and ``input`` messages (a string is
  one user message; ``function_call`` / ``function_call_output`` items are an assistant tool call and its
  tool message); function tools are given to the template in chat form. Then as chat completions.
* completion, chat: the assistant turn as the template renders it after the prompt. A generation that
  stopped (finish reason ``stop`` or ``tool_calls``) ended with the end-of-sequence token, which servers
  return among the token ids: the rendering is cut just after it. One that hit the length limit has no
  end token: the content alone. A call that forced a named tool (``tool_choice`` naming a function) made
  vLLM generate the arguments as bare JSON: those are the completion.
* completion, completions: the text encoded without special tokens, plus the end token if it stopped.

The completion is the canonical tokenization of the text the server returned. A model may sample tokens
that text does not show (special tokens the server's detokenizer skipped) or a split of it its tokenizer
would not make (likelier the less trained it is): its rebuilt ids then differ from the sampled ones,
usually fewer.

No behaviour logprobs come with such a call: the trainer computes them (``behaviour_logprobs_computed``).
What cannot be rebuilt raises :class:`RetokenizeError` with the reason (the trainer dead-letters the
sample): a prompt the producer cut at ``producer.max_attribute_bytes`` (no longer JSON), a forced
``required`` tool choice (vLLM re-serializes what the model generated), an unknown endpoint.
"""

from __future__ import annotations

import json
from typing import Any

RETOKENIZED = "retokenized"


class RetokenizeError(ValueError):
    """A call whose token ids cannot be rebuilt, with the reason."""


def retokenize(sample: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """``sample`` with its prompt and completion token ids built from its ``call_text`` (a sample whose
    token_source is not ``"retokenized"`` is returned as it is)."""
    if sample.get("token_source") != RETOKENIZED:
        return sample
    try:
        call = json.loads(sample["call_text"])
    except (TypeError, ValueError) as exc:
        raise RetokenizeError(f"call_text is not JSON: {exc}") from exc
    endpoint = call.get("endpoint")
    if endpoint == "completions":
        prompt, completion = _completions(call, tokenizer)
    elif endpoint in ("chat.completions", "responses"):
        messages, tools = _chat_request(call) if endpoint == "chat.completions" else _responses_request(call)
        prompt, completion = _chat(call, messages, tools, tokenizer)
    else:
        raise RetokenizeError(f"cannot retokenize a call to endpoint {endpoint!r}")
    if not completion:
        raise RetokenizeError("the completion is empty: nothing to train on")
    return sample | {"prompt_token_ids": prompt, "completion_token_ids": completion}


def _json_field(call: dict[str, Any], key: str, default: Any = None) -> Any:
    """A field of the call that the producer recorded as JSON text."""
    value = call.get(key)
    if value is None:
        return default
    try:
        return json.loads(value)
    except (TypeError, ValueError) as exc:
        raise RetokenizeError(f"{key} was recorded cut or malformed (producer.max_attribute_bytes?): {exc}") from exc


def _eos(tokenizer: Any) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise RetokenizeError("the policy's tokenizer has no end-of-sequence token")
    return [tokenizer.eos_token_id]


def _completions(call: dict[str, Any], tokenizer: Any) -> tuple[list[int], list[int]]:
    prompt = _token_list(call["prompt"])
    if prompt is None:
        prompt = tokenizer.encode(call["prompt"], add_special_tokens=True)
    completion = tokenizer.encode(call["completion"], add_special_tokens=False)
    return prompt, completion + (_eos(tokenizer) if call.get("finish_reason") == "stop" else [])


def _token_list(prompt: str) -> list[int] | None:
    """The token ids of a completions prompt given as ids (recorded as their JSON list), else None. A batch
    of prompts cannot be rebuilt: only the first one's answer was recorded."""
    if not prompt.startswith("["):
        return None
    try:
        value = json.loads(prompt)
    except ValueError:
        return None
    if isinstance(value, list) and value and all(type(item) is int for item in value):
        return value
    if isinstance(value, list) and value and all(isinstance(item, (str, list)) for item in value):
        raise RetokenizeError("a completions call with several prompts: not retokenized")
    return None


def _text_of(content: Any) -> Any:
    """A message content as vLLM gives a string-content template: text parts joined by newlines."""
    if isinstance(content, list):
        parts = [part.get("text", "") for part in content if isinstance(part, dict) and "text" in part]
        if len(parts) != len(content):
            raise RetokenizeError("a message holds non-text content (images, audio ...): not retokenized")
        return "\n".join(parts)
    return content


def _normalized(message: dict[str, Any]) -> dict[str, Any]:
    message = {**message, "content": _text_of(message.get("content"))}
    tool_calls = message.get("tool_calls")
    if message.get("role") == "assistant" and isinstance(tool_calls, list):
        if not tool_calls:
            message.pop("tool_calls")
        else:
            message["tool_calls"] = [_parsed_arguments(item) for item in tool_calls]
    return message


def _parsed_arguments(tool_call: dict[str, Any]) -> dict[str, Any]:
    """A tool call with its arguments as a dict, as tool-use chat templates expect them (and vLLM gives them)."""
    function = dict(tool_call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments else {}
        except ValueError:
            parsed = {}
        function["arguments"] = parsed if isinstance(parsed, dict) else {}
    elif arguments is None:
        function["arguments"] = {}
    return {**tool_call, "function": function}


def _chat_request(call: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    messages = _json_field(call, "prompt")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise RetokenizeError("the prompt of a chat call is not a list of messages")
    return [_normalized(m) for m in messages], _json_field(call, "tools")


def _responses_request(call: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    request = _json_field(call, "prompt", {})
    messages: list[dict[str, Any]] = []
    if request.get("instructions"):
        messages.append({"role": "system", "content": request["instructions"]})
    items = request.get("input") or []
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            if isinstance(content, list):  # input_text / output_text parts
                content = [{"type": "text", "text": part.get("text", "")} for part in content]
            messages.append(_normalized({"role": item.get("role", "user"), "content": content}))
        elif kind == "function_call":
            function = {"name": item.get("name", ""), "arguments": item.get("arguments", "")}
            call_id = item.get("call_id", "")
            tool_call = {"id": call_id, "type": "function", "function": function}
            if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
                messages[-1]["tool_calls"].append(_parsed_arguments(tool_call))
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [_parsed_arguments(tool_call)]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id", ""), "content": item.get("output")})
        else:
            raise RetokenizeError(f"a Responses input item of type {kind!r}: not retokenized")
    tools = _json_field(call, "tools")
    chat_tools = None
    if tools:
        chat_tools = [
            {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}
            for tool in tools
            if tool.get("type") == "function"
        ]
    return messages, chat_tools


def _named_tool(call: dict[str, Any]) -> str | None:
    """The function a forced tool choice names, else None; ``required`` cannot be rebuilt."""
    recorded = call.get("tool_choice") or ""
    choice = _json_field(call, "tool_choice") if recorded.startswith("{") else recorded  # "auto", "none" as they are
    if choice == "required":
        raise RetokenizeError("tool_choice 'required': the server re-serialized what the model generated")
    if isinstance(choice, dict):
        return (choice.get("function") or {}).get("name") or choice.get("name")
    return None


def _chat(
    call: dict[str, Any], messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, tokenizer: Any
) -> tuple[list[int], list[int]]:
    options = {"tools": tools, **(_json_field(call, "chat_template_kwargs") or {})}
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **options)
    prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
    # Chat completions say stop / tool_calls / length; the Responses API completed / max_output_tokens.
    stopped = call.get("finish_reason") in ("stop", "tool_calls", "completed")
    end = _eos(tokenizer) if stopped else []
    tool_calls = _json_field(call, "tool_calls", [])
    content = call.get("completion", "")
    if tool_calls:  # the producer appended the tool calls' JSON to the content
        content = content.removesuffix(call["tool_calls"])
    named = _named_tool(call)
    if named is not None and tool_calls:
        # vLLM decodes a forced named tool call as the arguments JSON alone, with no template markup.
        return prompt, tokenizer.encode(tool_calls[0].get("arguments", ""), add_special_tokens=False) + end
    if not stopped:
        if tool_calls:
            raise RetokenizeError("a tool call cut at the length limit: its text cannot be rebuilt")
        return prompt, tokenizer.encode(content, add_special_tokens=False)
    answer: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        answer["tool_calls"] = [
            _parsed_arguments({"type": "function", "function": {key: c.get(key) for key in ("name", "arguments")}})
            for c in tool_calls
        ]
    whole = tokenizer.apply_chat_template([*messages, answer], tokenize=False, add_generation_prompt=False, **options)
    eos_text = tokenizer.eos_token
    if whole.startswith(prompt_text) and eos_text and eos_text in whole[len(prompt_text) :]:
        turn = whole[len(prompt_text) :]
        turn = turn[: turn.index(eos_text) + len(eos_text)]
        return prompt, tokenizer.encode(turn, add_special_tokens=False)
    # A template whose history differs from its generation prompt (or without an end token): the content.
    return prompt, tokenizer.encode(content, add_special_tokens=False) + end
