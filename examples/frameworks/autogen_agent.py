"""A weather agent on AutoGen: autogen-core's tool loop with autogen-ext's OpenAIChatCompletionClient.

Run it traced, with no change to this file:

    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=... AGENT_MODEL=tiny \\
        AGENT_LIGHTNING_TRACER=1 python examples/frameworks/autogen_agent.py

The first call passes the tool as ``tool_choice`` (vLLM then guarantees the call by guided decoding,
so even an untrained model makes it); later calls let the model choose, for at most ``MAX_TURNS``.
AgentChat's ``AssistantAgent`` would make the same calls through the same client, but always with
``tool_choice="auto"``, which an untrained model answers with text and no tool call.
"""

import asyncio
import json
import os
from typing import Literal

from autogen_core import CancellationToken, FunctionCall
from autogen_core.models import (
    AssistantMessage,
    FunctionExecutionResult,
    FunctionExecutionResultMessage,
    ModelFamily,
    UserMessage,
)
from autogen_core.tools import FunctionTool
from autogen_ext.models.openai import OpenAIChatCompletionClient

from boltstream import agl

MAX_TURNS = 3


async def get_weather(city: Literal["Paris", "London"]) -> str:
    """The weather in a city."""
    return f"18 degrees and sunny in {city}"


weather_tool = FunctionTool(get_weather, description="The weather in a city.")


async def run_tool(call: FunctionCall) -> FunctionExecutionResult:
    try:
        result = await weather_tool.run_json(json.loads(call.arguments), CancellationToken())
        return FunctionExecutionResult(call_id=call.id, content=str(result), name=call.name, is_error=False)
    except Exception as exc:  # a bad call is the model's mistake: tell it, as AutoGen's agents do
        return FunctionExecutionResult(call_id=call.id, content=f"error: {exc}", name=call.name, is_error=True)


async def agent(question: str) -> str:
    client = OpenAIChatCompletionClient(
        model=os.environ.get("AGENT_MODEL", "tiny"),
        base_url=os.environ["OPENAI_BASE_URL"],
        api_key=os.environ["OPENAI_API_KEY"],
        max_tokens=24,
        model_info={
            "vision": False,
            "function_calling": True,
            "json_output": False,
            "structured_output": False,
            "family": ModelFamily.UNKNOWN,
        },
    )
    messages = [UserMessage(content=question, source="user")]
    try:
        for turn in range(MAX_TURNS):
            result = await client.create(
                messages, tools=[weather_tool], tool_choice=weather_tool if turn == 0 else "auto"
            )
            if isinstance(result.content, str):
                return result.content
            messages.append(AssistantMessage(content=result.content, source="assistant"))
            messages.append(FunctionExecutionResultMessage(content=[await run_tool(c) for c in result.content]))
        return ""
    finally:
        await client.close()


if __name__ == "__main__":
    answer = asyncio.run(agent("What is the weather in Paris?"))
    reward = 1.0 if "18" in answer else 0.0
    agl.emit_reward(reward)
    print(f"answer={answer!r}")
    print(f"reward={reward}")
