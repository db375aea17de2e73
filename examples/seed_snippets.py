"""The seed documents' snippets, as written, in a small runnable agent.

    python examples/seed_snippets.py                       # emit helpers only
    AGENT_LIGHTNING_TRACER=1 OPENAI_BASE_URL=http://127.0.0.1:8000/v1 MODEL=tiny \\
        python examples/seed_snippets.py                   # + every LLM call traced, no code change

Spans go to the broker of ``boltstream up`` (or ``BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS``). Spans emitted
outside ``agl.rollout(...)`` form an implicit rollout per thread, which a reward does not end: it ends
after ``producer.implicit_rollout_idle`` seconds without a span, on ``agl.flush()`` or at exit. The three
``solve`` calls below, back to back, are therefore one rollout, ended by the final ``flush``: its last
reward is the final one, the two before it step rewards. An agent that wants one rollout per task wraps
each in ``with agl.rollout(task_id=...)``.
"""

from __future__ import annotations

import os

from boltstream import agl

TASKS = [(17, 23), (12, 12), (7, 6)]


def ask_llm(question: str) -> str:
    """An ordinary openai call; with AGENT_LIGHTNING_TRACER=1 it becomes an llm_call span by itself."""
    import openai

    client = openai.OpenAI(api_key=os.environ.get("OPENAI_API_KEY", "unused"))  # OPENAI_BASE_URL from the env
    answer = client.chat.completions.create(
        model=os.environ.get("MODEL", "tiny"), messages=[{"role": "user", "content": question}], max_tokens=8
    )
    return answer.choices[0].message.content or ""


def solve(a: int, b: int) -> int:
    agl.emit_decision()
    agl.emit("tool_call", tool_name="multiply", args={"a": a, "b": b})
    if os.environ.get("OPENAI_BASE_URL"):
        ask_llm(f"What is {a} * {b}?")
    answer = a * b
    score = 1.0 if answer == a * b else 0.0
    agl.emit_reward(score)
    return answer


if __name__ == "__main__":
    for a, b in TASKS:
        print(f"{a} * {b} = {solve(a, b)}")
    delivered = agl.flush()
    print("delivered" if delivered else "not delivered yet (spooled)", {k: v for k, v in agl.stats().items() if v})
