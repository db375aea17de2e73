"""A weather agent on LiteLLM's ``completion``, against an OpenAI-compatible server (``openai/<model>``).

Run it traced, with no change to this file:

    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=... AGENT_MODEL=tiny \\
        AGENT_LIGHTNING_TRACER=1 python examples/frameworks/litellm_agent.py

LiteLLM's ``openai/`` provider calls through the ``openai`` client, which is what the tracer patches.
The first turn names the tool in ``tool_choice`` (vLLM then guarantees the call by guided decoding,
so even an untrained model makes it); later turns let the model choose, for at most ``MAX_TURNS``.
"""

import json
import os

import litellm

from boltstream import agl

MODEL = "openai/" + os.environ.get("AGENT_MODEL", "tiny")
MAX_TURNS = 3
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}},
                "required": ["city"],
            },
        },
    }
]


def get_weather(city: str) -> str:
    return f"18 degrees and sunny in {city}"


def agent(question: str) -> str:
    messages = [{"role": "user", "content": question}]
    for turn in range(MAX_TURNS):
        response = litellm.completion(
            model=MODEL,
            api_base=os.environ["OPENAI_BASE_URL"],
            api_key=os.environ["OPENAI_API_KEY"],
            messages=messages,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}} if turn == 0 else "auto",
            max_tokens=24,
        )
        message = response.choices[0].message
        if not message.tool_calls:
            return message.content or ""
        messages.append(message.model_dump())
        for call in message.tool_calls:
            try:
                result = get_weather(**json.loads(call.function.arguments))
            except (ValueError, TypeError) as exc:
                result = f"bad arguments: {exc}"
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return ""


if __name__ == "__main__":
    answer = agent("What is the weather in Paris?")
    reward = 1.0 if "18" in answer else 0.0
    agl.emit_reward(reward)
    print(f"answer={answer!r}")
    print(f"reward={reward}")
