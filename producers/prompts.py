"""The agent's current prompt template, following the ``prompt-updates`` topic that APO publishes to.

``current_prompt("math-agent", default=...)`` returns the newest template text APO chose for the agent
(or ``default`` before there is one). A background thread reads the compacted topic from the
beginning and keeps the newest PromptUpdate per agent; the first call waits, at most
``catch_up_timeout`` seconds, until the thread has read what was on the topic, and never raises for a
missing broker (the agent keeps its default). Tag the rollout with ``prompt_attributes(agent)`` so APO
can credit the reward to the template::

    from boltstream import agl

    template = agl.current_prompt("math-agent", default="Solve: {question}")
    with agl.rollout(task_id=task, agent_name="math-agent", attributes=agl.prompt_attributes("math-agent")):
        ...
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from boltstream.infra.common.contract import TEMPLATE_ATTRIBUTE

log = logging.getLogger("boltstream.prompts")


class PromptFollower:
    """Reads every PromptUpdate on the topic in a daemon thread; the newest per agent wins."""

    def __init__(self, settings=None, catch_up_timeout: float = 5.0) -> None:
        self._latest: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._caught_up = threading.Event()
        self._stop = threading.Event()
        self._settings = settings
        self.catch_up_timeout = catch_up_timeout
        self._thread = threading.Thread(target=self._follow, name="boltstream-prompts", daemon=True)
        self._thread.start()

    def get(self, agent: str) -> dict[str, Any] | None:
        """The newest PromptUpdate of ``agent``, or None."""
        self._caught_up.wait(self.catch_up_timeout)
        with self._lock:
            return self._latest.get(agent)

    def _follow(self) -> None:
        try:
            from confluent_kafka import Consumer

            from boltstream.infra.common.config import load_settings
            from boltstream.infra.common.topics import partitions_of, read_to_end, reader_config

            settings = self._settings or load_settings()
            topic = settings.topics.prompt_updates
            consumer = Consumer(reader_config(settings, "prompts"))
        except Exception as exc:  # no broker configured: the agent keeps its defaults
            log.warning("not following prompt updates: %s", exc)
            self._caught_up.set()
            return
        try:
            partitions = partitions_of(consumer, topic, timeout=self.catch_up_timeout)
            for message in read_to_end(consumer, partitions, idle_timeout=self.catch_up_timeout):
                self._apply(message.value())
            self._caught_up.set()
            while not self._stop.is_set():
                message = consumer.poll(0.2)
                if message is not None and message.error() is None:
                    self._apply(message.value())
        except Exception as exc:
            log.warning("stopped following prompt updates: %s", exc)
        finally:
            self._caught_up.set()
            consumer.close()

    def _apply(self, value: bytes | None) -> None:
        from boltstream.schemas.codec import CodecError, codec

        try:
            update = codec("PromptUpdate").decode(value or b"")
        except CodecError as exc:
            log.warning("skipping an undecodable prompt update: %s", exc)
            return
        with self._lock:
            known = self._latest.get(update["agent_name"])
            if known is None or update["version"] >= known["version"]:
                self._latest[update["agent_name"]] = update

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


_follower: PromptFollower | None = None
_follower_lock = threading.Lock()


def follower(settings=None) -> PromptFollower:
    """The process-wide follower, started on first use (``settings`` only matter the first time)."""
    global _follower
    with _follower_lock:
        if _follower is None:
            _follower = PromptFollower(settings)
        return _follower


def current_prompt(agent: str, default: str | None = None) -> str | None:
    """The template APO currently picks for ``agent``, or ``default``."""
    update = follower().get(agent)
    return update["template"] if update is not None else default


def prompt_attributes(agent: str) -> dict[str, str]:
    """Rollout attributes that tell APO which template the agent used ({} before there is one)."""
    update = follower().get(agent)
    return {TEMPLATE_ATTRIBUTE: update["template_id"]} if update is not None else {}
