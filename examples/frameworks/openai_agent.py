"""A weather agent on the bare `openai` client: it calls a tool, reads the result, answers.

Pick the client style with the first argument: ``sync`` (OpenAI, chat completions), ``async``
(AsyncOpenAI), ``stream`` (chat completions streamed, tool-call deltas assembled) or ``responses``
(the Responses API). Run it traced, with no change to this file:

    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=... AGENT_MODEL=tiny \\
        AGENT_LIGHTNING_TRACER=1 python examples/frameworks/openai_agent.py sync

The first turn names the tool in ``tool_choice`` (vLLM then guarantees the call by guided decoding,
so even an untrained model makes it); later turns let the model choose, for at most ``MAX_TURNS``.
"""

import asyncio
import json
import os
import sys

import openai

from boltstream import agl

MODEL = os.environ.get("AGENT_MODEL", "tiny")
MAX_TURNS = 3
MAX_TOKENS = 24
QUESTION = "What is the weather in Paris?"
TOOL_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}},
    "required": ["city"],
    "additionalProperties": False,
}
CHAT_TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather in a city.", "parameters": TOOL_PARAMETERS},
    }
]
FORCE_CHAT_TOOL = {"type": "function", "function": {"name": "get_weather"}}


def get_weather(city: str) -> str:
    return f"18 degrees and sunny in {city}"


def run_tool(name: str, arguments: str) -> str:
    if name != "get_weather":
        return f"unknown tool {name}"
    try:
        return get_weather(**json.loads(arguments))
    except (ValueError, TypeError) as exc:
        return f"bad arguments: {exc}"


def chat_turn_params(turn: int) -> dict:
    return {"tools": CHAT_TOOLS, "tool_choice": FORCE_CHAT_TOOL if turn == 0 else "auto", "max_tokens": MAX_TOKENS}


def answer_with_chat(messages: list, message) -> str | None:
    """Append the assistant turn and its tool results; the answer when there were no tool calls."""
    calls = message.tool_calls or []
    messages.append(
        {
            "role": "assistant",
            "content": message.content or "",
            **({"tool_calls": [c.model_dump() for c in calls]} if calls else {}),
        }
    )
    for call in calls:
        messages.append(
            {"role": "tool", "tool_call_id": call.id, "content": run_tool(call.function.name, call.function.arguments)}
        )
    return None if calls else (message.content or "")


def sync_agent() -> str:
    client = openai.OpenAI()
    messages = [{"role": "user", "content": QUESTION}]
    for turn in range(MAX_TURNS):
        reply = client.chat.completions.create(model=MODEL, messages=messages, **chat_turn_params(turn))
        answer = answer_with_chat(messages, reply.choices[0].message)
        if answer is not None:
            return answer
    return ""


async def async_agent() -> str:
    client = openai.AsyncOpenAI()
    messages = [{"role": "user", "content": QUESTION}]
    for turn in range(MAX_TURNS):
        reply = await client.chat.completions.create(model=MODEL, messages=messages, **chat_turn_params(turn))
        answer = answer_with_chat(messages, reply.choices[0].message)
        if answer is not None:
            return answer
    return ""


def streaming_agent() -> str:
    client = openai.OpenAI()
    messages = [{"role": "user", "content": QUESTION}]
    for turn in range(MAX_TURNS):
        text, calls = "", {}
        for chunk in client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, **chat_turn_params(turn)
        ):
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            text += delta.content or ""
            for part in delta.tool_calls or []:
                call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = part.id or call["id"]
                call["name"] += (part.function and part.function.name) or ""
                call["arguments"] += (part.function and part.function.arguments) or ""
        if not calls:
            return text
        messages.append(
            {
                "role": "assistant",
                "content": text,
                "tool_calls": [
                    {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                    for c in calls.values()
                ],
            }
        )
        for c in calls.values():
            messages.append({"role": "tool", "tool_call_id": c["id"], "content": run_tool(c["name"], c["arguments"])})
    return ""


def responses_agent() -> str:
    client = openai.OpenAI()
    tools = [
        {
            "type": "function",
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": TOOL_PARAMETERS,
        }
    ]
    items: list = [{"role": "user", "content": QUESTION}]
    for turn in range(MAX_TURNS):
        response = client.responses.create(
            model=MODEL,
            input=items,
            tools=tools,
            tool_choice={"type": "function", "name": "get_weather"} if turn == 0 else "auto",
            max_output_tokens=MAX_TOKENS,
        )
        calls = [item for item in response.output if item.type == "function_call"]
        if not calls:
            return response.output_text
        for call in calls:
            items.append(
                {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments}
            )
            items.append(
                {"type": "function_call_output", "call_id": call.call_id, "output": run_tool(call.name, call.arguments)}
            )
    return ""


AGENTS = {
    "sync": sync_agent,
    "async": lambda: asyncio.run(async_agent()),
    "stream": streaming_agent,
    "responses": responses_agent,
}

if __name__ == "__main__":
    style = sys.argv[1] if len(sys.argv) > 1 else "sync"
    if style not in AGENTS:
        sys.exit(f"usage: {sys.argv[0]} [{'|'.join(AGENTS)}]")
    answer = AGENTS[style]()
    reward = 1.0 if "18" in answer else 0.0
    agl.emit_reward(reward)
    print(f"answer={answer!r}")
    print(f"reward={reward}")
