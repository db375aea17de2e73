"""A weather agent on the OpenAI Agents SDK (``openai-agents``), served by any OpenAI-compatible server.

Run it traced, with no change to this file:

    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=... AGENT_MODEL=tiny \\
        AGENT_LIGHTNING_TRACER=1 python examples/frameworks/openai_agents_sdk_agent.py

``tool_choice`` names the tool for the first turn (vLLM then guarantees the call by guided decoding,
so even an untrained model makes it); the SDK resets it after the tool ran (``reset_tool_choice``),
so the next turn answers. ``max_turns`` bounds the loop.
"""

import os
from typing import Literal

from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
from openai import AsyncOpenAI

from boltstream import agl


@function_tool
def get_weather(city: Literal["Paris", "London"]) -> str:
    """The weather in a city."""
    return f"18 degrees and sunny in {city}"


# The SDK's own trace export goes to api.openai.com, which a self-hosted setup does not use.
set_tracing_disabled(True)
agent = Agent(
    name="weather",
    instructions="Answer briefly.",
    tools=[get_weather],
    model=OpenAIChatCompletionsModel(model=os.environ.get("AGENT_MODEL", "tiny"), openai_client=AsyncOpenAI()),
    model_settings=ModelSettings(tool_choice="get_weather", max_tokens=24),
)

if __name__ == "__main__":
    answer = str(Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4).final_output)
    reward = 1.0 if "18" in answer else 0.0
    agl.emit_reward(reward)
    print(f"answer={answer!r}")
    print(f"reward={reward}")
