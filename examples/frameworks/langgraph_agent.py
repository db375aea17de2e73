"""A weather agent as a LangGraph loop on LangChain's ChatOpenAI: model -> tools -> model -> answer.

Run it traced, with no change to this file:

    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=... AGENT_MODEL=tiny \\
        AGENT_LIGHTNING_TRACER=1 python examples/frameworks/langgraph_agent.py

The first model step names the tool in ``tool_choice`` (vLLM then guarantees the call by guided
decoding, so even an untrained model makes it); later steps let the model choose. The graph's
recursion limit bounds the loop.
"""

import os
from typing import Literal

from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from boltstream import agl


@tool
def get_weather(city: Literal["Paris", "London"]) -> str:
    """The weather in a city."""
    return f"18 degrees and sunny in {city}"


TOOLS = [get_weather]
llm = ChatOpenAI(model=os.environ.get("AGENT_MODEL", "tiny"), max_tokens=24)
forced = llm.bind_tools(TOOLS, tool_choice="get_weather")
free = llm.bind_tools(TOOLS)


def call_model(state: MessagesState) -> dict:
    used_a_tool = any(message.type == "tool" for message in state["messages"])
    return {"messages": [(free if used_a_tool else forced).invoke(state["messages"])]}


graph = StateGraph(MessagesState)
graph.add_node("model", call_model)
graph.add_node("tools", ToolNode(TOOLS))
graph.add_edge(START, "model")
graph.add_conditional_edges("model", tools_condition)
graph.add_edge("tools", "model")
agent = graph.compile()

if __name__ == "__main__":
    state = agent.invoke({"messages": [("user", "What is the weather in Paris?")]}, {"recursion_limit": 6})
    answer = state["messages"][-1].content
    reward = 1.0 if "18" in answer else 0.0
    agl.emit_reward(reward)
    print(f"answer={answer!r}")
    print(f"reward={reward}")
