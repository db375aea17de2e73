"""The demo's fleet of agents: threads that solve the arithmetic task through the capture proxy and send rewards.

The agents solve the built-in verifiable task: single-digit addition (or, for the second policy of
``demo --policies 2``, multiplication) checked with a calculator tool (:mod:`boltstream.infra.demo.arithmetic`).
One :class:`Agents` is one agent group: its agents carry one agent name and call one policy. Each rollout
asks the model through the capture proxy with the ``openai`` client, ends its rollout there, and a verifier
sends the reward with :func:`agl.send_reward` (the calculator's result in its attributes). Everything else
flows through Kafka: spans -> join -> samples -> trainer -> model-updates -> sidecar -> vLLM serves the new
version -> the agents' next calls use it.

The agents solve tasks in GRPO groups (``trainer.group_size`` rollouts share a task id) and stay at most
:data:`GROUPS_AHEAD` training steps ahead of the trainer, so what they sample is recent policy, not a
backlog the trainer would drop as stale.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from boltstream.infra.common.config import Settings
from boltstream.infra.common.contract import AGENT_HEADER, ROLLOUT_ID_HEADER, TASK_HEADER
from boltstream.infra.demo.arithmetic import OPERATIONS, answer

#: The problems the demo's agents solve: a+b for digits 0..3 (16 problems, as in the trainer's learning test).
LARGEST_DIGIT = 3
#: How many training steps of work the agents may hand out before the trainer has taken them.
GROUPS_AHEAD = 2
AGENT_NAME = "arithmetic"


@dataclass
class FleetCounters:
    """Counters the agents and the dispatcher share (under ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    rollouts: int = 0
    errors: int = 0
    last_error: str = ""
    groups_issued: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=200))


class Agents:
    """``count`` agent threads named ``agent_name`` solving ``a<op>b`` tasks that a dispatcher hands out in GRPO
    groups, calling the policy ``settings.trainer.model_name`` (the settings of that policy: ``for_policy``)."""

    def __init__(
        self,
        settings: Settings,
        proxy_url: str,
        count: int,
        seed: int,
        trainer_step,
        *,
        agent_name: str = AGENT_NAME,
        op: str = "+",
    ) -> None:
        self.settings = settings
        self.agent_name = agent_name
        self.op = op
        self.proxy_url = proxy_url
        self.count = count
        self.rng = random.Random(seed)
        self.trainer_step = trainer_step
        self.tasks: queue.Queue[tuple[str, int, int] | None] = queue.Queue()
        self.stop = threading.Event()
        self.counters = FleetCounters()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._dispatch, name="dispatcher", daemon=True)]
        self.threads += [
            threading.Thread(target=self._agent, name=f"agent-{i}", daemon=True) for i in range(self.count)
        ]
        for thread in self.threads:
            thread.start()

    def close(self, timeout: float = 30.0) -> None:
        self.stop.set()
        for _ in range(self.count):
            self.tasks.put(None)
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _dispatch(self) -> None:
        config = self.settings.trainer
        problems = [(a, b) for a in range(LARGEST_DIGIT + 1) for b in range(LARGEST_DIGIT + 1)]
        deck: list[tuple[int, int]] = []
        while not self.stop.is_set():
            trained_groups = self.trainer_step() * config.groups_per_step
            if self.counters.groups_issued - trained_groups >= GROUPS_AHEAD * config.groups_per_step:
                self.stop.wait(0.1)
                continue
            if not deck:  # every problem once per round, so any stretch of the run sees a fair mix
                deck = self.rng.sample(problems, len(problems))
            a, b = deck.pop()
            task_id = f"{OPERATIONS[self.op][1]}-{a}-{b}-{self.counters.groups_issued}"
            for _ in range(config.group_size):
                self.tasks.put((task_id, a, b))
            with self.counters.lock:
                self.counters.groups_issued += 1

    def _agent(self) -> None:
        import httpx
        import openai

        from boltstream import agl

        # The capture proxy records each call as an llm_call span, tagged with the weight version the
        # router answered with, and ends the rollout on request: one producer for all of a rollout's
        # spans, so the rollout's end never overtakes its LLM call on the way to the join.
        client = openai.OpenAI(base_url=f"{self.proxy_url}/v1", api_key="demo", max_retries=2, timeout=60.0)
        control = httpx.Client(base_url=self.proxy_url, timeout=30.0)
        while True:
            task = self.tasks.get()
            if task is None or self.stop.is_set():
                return
            task_id, a, b = task
            rollout_id = agl.new_id()
            headers = {ROLLOUT_ID_HEADER: rollout_id, TASK_HEADER: task_id, AGENT_HEADER: self.agent_name}
            try:
                completion = client.chat.completions.create(
                    model=self.settings.trainer.model_name,
                    messages=[{"role": "user", "content": f"{a}{self.op}{b}="}],
                    max_tokens=4,
                    temperature=1.0,
                    extra_headers=headers,
                )
                text = (completion.choices[0].message.content or "").strip()
                control.post(f"/boltstream/rollouts/{rollout_id}/end").raise_for_status()
                expected = calculator(a, b, self.op)
                reward = 1.0 if text == str(expected) else 0.0
                agl.send_reward(
                    rollout_id,
                    reward,
                    source="verifier",
                    task_id=task_id,
                    agent_name=self.agent_name,
                    attributes={"tool": "calculator", "expected": str(expected), "answer": text},
                )
                with self.counters.lock:
                    self.counters.rollouts += 1
                    self.counters.recent.append(reward)
            except Exception as exc:  # an agent survives a failed call: it is counted and shown, not fatal
                with self.counters.lock:
                    self.counters.errors += 1
                    self.counters.last_error = f"{type(exc).__name__}: {exc}"[:200]


def calculator(a: int, b: int, op: str = "+") -> int:
    """The agents' tool: what the verifier checks the model's answer against."""
    return answer((a, b), op)
