"""A weather agent as a one-agent CrewAI crew with a tool, on an OpenAI-compatible server.

Run it traced, with no change to this file:

    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=... AGENT_MODEL=tiny CREWAI_DISABLE_TELEMETRY=true \\
        AGENT_LIGHTNING_TRACER=1 python examples/frameworks/crewai_agent.py

CrewAI's OpenAI provider always sends ``tool_choice="auto"`` (it cannot name a tool), so whether the
tool is called is the model's choice: an untrained model answers with text, a trained one calls it.
``max_iter`` bounds the agent's loop.

Its model calls run in a worker thread; the reward is emitted in the main thread. Both go to the
process's one implicit rollout, so the crew's calls and the reward form one trajectory, which ends when
the program exits.
"""

import os
from typing import Literal

from crewai import LLM, Agent, Crew, Task
from crewai.tools import tool

from boltstream import agl


@tool("get_weather")
def get_weather(city: Literal["Paris", "London"]) -> str:
    """The weather in a city."""
    return f"18 degrees and sunny in {city}"


llm = LLM(
    model="openai/" + os.environ.get("AGENT_MODEL", "tiny"),
    base_url=os.environ["OPENAI_BASE_URL"],
    api_key=os.environ["OPENAI_API_KEY"],
    max_tokens=24,
)
forecaster = Agent(
    role="Forecaster", goal="Report the weather.", backstory="Brief.", tools=[get_weather], llm=llm, max_iter=2
)
task = Task(description="The weather in Paris?", expected_output="One line.", agent=forecaster)

if __name__ == "__main__":
    answer = str(Crew(agents=[forecaster], tasks=[task]).kickoff())
    reward = 1.0 if "18" in answer else 0.0
    agl.emit_reward(reward)
    print(f"answer={answer!r}")
    print(f"reward={reward}")
