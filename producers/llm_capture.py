"""Reading LLM responses into an ``llm_call`` span: shared by the openai auto-tracer and the capture proxy.

Works on openai client objects and on plain JSON dicts alike (chat completions, completions and the
Responses API; whole responses and stream chunks). Choice 0 is the trajectory that gets recorded.
When the tracer asked the server for token ids itself, :meth:`LlmCapture.strip` puts the response
back the way the server sends it to a caller who did not ask (vLLM: the same keys, null).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from boltstream.infra.common.contract import (
    MODEL_VERSION_HEADER,
    RETOKENIZATION_ATTRIBUTES,
    SERVER_ID_HEADER,
    TOOL_CALLS_ATTRIBUTE,
)
from boltstream.producers.context import now_us
from boltstream.producers.emit import emit_span
from boltstream.producers.redaction import to_text, url_without_credentials

log = logging.getLogger("boltstream.autotrace")

#: A LoRA version's served name ends with ``-v<version>`` (boltstream.infra.serving.weight_sync.served_name).
_SERVED_VERSION = re.compile(r"-v(\d+)$")

#: URL path suffix → endpoint name (also the span name).
ENDPOINTS = (("/chat/completions", "chat.completions"), ("/completions", "completions"), ("/responses", "responses"))


def endpoint_of(path: str) -> str | None:
    """The traced endpoint a request path goes to, or None."""
    return next((name for suffix, name in ENDPOINTS if path.endswith(suffix)), None)


def token_parameters(endpoint: str, body: dict[str, Any], logprobs: bool = True) -> dict[str, Any]:
    """Request parameters asking a vLLM server for token ids (and with ``logprobs``, the completion's
    logprobs), those the body lacks."""
    if endpoint == "responses":
        return {}
    extra: dict[str, Any] = {}
    if "return_token_ids" not in body:
        extra["return_token_ids"] = True
    if logprobs and body.get("logprobs") in (None, False):
        extra["logprobs"] = True if endpoint == "chat.completions" else 0
    return extra


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """A field of an openai model or a plain dict (stream events may be either); extras included."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    value = getattr(obj, name, default)
    return default if value is None else value


def _set_null(obj: Any, name: str) -> None:
    if isinstance(obj, dict):
        if name in obj:
            obj[name] = None
        return
    extra = getattr(obj, "__pydantic_extra__", None)
    if extra and name in extra:
        extra[name] = None
    elif name in getattr(type(obj), "model_fields", {}):
        setattr(obj, name, None)


class LlmCapture:
    """One LLM call: what was asked, what came back so far; becomes one ``llm_call`` span."""

    def __init__(
        self, endpoint: str, body: dict[str, Any], server: str = "", added: frozenset[str] = frozenset()
    ) -> None:
        self.endpoint = endpoint
        self.body = body
        self.server = url_without_credentials(server)  # the server's URL as recorded
        self.added = added  # request parameters the tracer added, hidden from the caller again
        self.start_us = now_us()
        self.started = time.perf_counter()
        self.model = str(body.get("model") or "")
        self.model_version = ""  # from the router's header, else from a versioned served name
        self.server_id = ""
        self.text: list[str] = []
        self.tool_calls: dict[int, dict[str, str]] = {}
        self.prompt_token_ids: list[int] = []
        self.completion_token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason = ""
        self.done = False

    def add_chunk(self, chunk: Any) -> None:
        if self.endpoint == "responses":
            response = _get(chunk, "response")
            if _get(chunk, "type") in ("response.completed", "response.incomplete", "response.failed") and response:
                self.text.clear()
                self.add_response(response)
            elif _get(chunk, "type") == "response.output_text.delta":
                self.text.append(_get(chunk, "delta", ""))
            return
        self._add_completion(chunk, streamed=True)

    def add_response(self, response: Any) -> None:
        if self.endpoint == "responses":
            self.model = _get(response, "model", self.model)
            self.text.append(_get(response, "output_text", ""))
            usage = _get(response, "usage")
            self.prompt_tokens = _get(usage, "input_tokens", 0)
            self.completion_tokens = _get(usage, "output_tokens", 0)
            incomplete = _get(response, "incomplete_details")
            self.finish_reason = _get(incomplete, "reason", "") or _get(response, "status", "")
            for position, item in enumerate(_get(response, "output", []) or []):
                if _get(item, "type") == "function_call":  # a tool call is part of what the model wrote
                    self.tool_calls[position] = {
                        "name": _get(item, "name", ""),
                        "arguments": _get(item, "arguments", ""),
                    }
                for content in _get(item, "content", []) or []:
                    self.logprobs.extend(_get(lp, "logprob", 0.0) for lp in _get(content, "logprobs", []) or [])
            return
        self._add_completion(response, streamed=False)

    def _add_completion(self, response: Any, streamed: bool) -> None:
        """Chat completions and completions, whole responses or stream chunks; choice 0 is the trajectory."""
        self.model = _get(response, "model", self.model)
        self.prompt_token_ids.extend(_get(response, "prompt_token_ids", []) or [])
        usage = _get(response, "usage")
        if usage is not None:
            self.prompt_tokens = _get(usage, "prompt_tokens", 0)
            self.completion_tokens = _get(usage, "completion_tokens", 0)
        for choice in _get(response, "choices", []) or []:
            if _get(choice, "index", 0) == 0:
                self._add_choice(choice, streamed)
            self.strip(choice, ("token_ids", "prompt_token_ids", "logprobs"))
        self.strip(response, ("prompt_token_ids",))

    def _add_choice(self, choice: Any, streamed: bool) -> None:
        self.finish_reason = _get(choice, "finish_reason", self.finish_reason) or self.finish_reason
        self.completion_token_ids.extend(_get(choice, "token_ids", []) or [])
        self.prompt_token_ids.extend(_get(choice, "prompt_token_ids", []) or [])  # completions put them here
        logprobs = _get(choice, "logprobs")
        if logprobs is not None:
            content = _get(logprobs, "content")
            if content is not None:  # chat
                self.logprobs.extend(_get(item, "logprob", 0.0) for item in content)
            else:  # completions
                self.logprobs.extend(lp if lp is not None else 0.0 for lp in _get(logprobs, "token_logprobs", []))
        if self.endpoint == "completions":
            self.text.append(_get(choice, "text", ""))
            return
        message = _get(choice, "delta" if streamed else "message")
        self.text.append(_get(message, "content", "") or "")
        for position, tool_call in enumerate(_get(message, "tool_calls", []) or []):
            slot = self.tool_calls.setdefault(_get(tool_call, "index", position), {"name": "", "arguments": ""})
            function = _get(tool_call, "function")
            slot["name"] += _get(function, "name", "") or ""
            slot["arguments"] += _get(function, "arguments", "") or ""

    def add_headers(self, headers: Any) -> None:
        """Read the version tags a boltstream router adds to its responses."""
        self.model_version = headers.get(MODEL_VERSION_HEADER, self.model_version)
        self.server_id = headers.get(SERVER_ID_HEADER, self.server_id)

    def strip(self, obj: Any, fields: tuple[str, ...]) -> None:
        """Null the ``fields`` of ``obj`` that are there only because the tracer asked for them."""
        for name in fields:
            if name in self.added or (name.endswith("token_ids") and "return_token_ids" in self.added):
                _set_null(obj, name)

    def finish(self, error: BaseException | str | None = None) -> None:
        """Emit the span (once), in the current rollout."""
        if self.done:
            return
        self.done = True
        try:
            latency_ms = (time.perf_counter() - self.started) * 1000
            completion = "".join(self.text)
            attributes: dict[str, Any] = {"stream": bool(self.body.get("stream")), "server.url": self.server}
            if self.tool_calls:
                tool_calls = to_text([self.tool_calls[i] for i in sorted(self.tool_calls)])
                completion += tool_calls
                attributes[TOOL_CALLS_ATTRIBUTE] = tool_calls
            # What the chat template renders beside the messages: a call that comes without token ids is
            # tokenized from them by the trainer.
            for name, key in RETOKENIZATION_ATTRIBUTES.items():
                if name != TOOL_CALLS_ATTRIBUTE and self.body.get(key) is not None:
                    attributes[name] = to_text(self.body[key])
            if self.endpoint == "chat.completions":
                prompt = to_text(self.body.get("messages", []))
            elif self.endpoint == "completions":
                prompt = to_text(self.body.get("prompt", ""))
            else:
                prompt = to_text({"instructions": self.body.get("instructions"), "input": self.body.get("input")})
            emit_span(
                "llm_call",
                self.endpoint,
                attributes=attributes,
                status="ok" if error is None else "error",
                error=error if error is None or isinstance(error, str) else f"{type(error).__name__}: {error}",
                start_time_us=self.start_us,
                end_time_us=now_us(),
                llm={
                    "model": self.model,
                    "model_version": self.model_version or _served_version(self.model),
                    "prompt_token_ids": self.prompt_token_ids,
                    "completion_token_ids": self.completion_token_ids,
                    "completion_logprobs": self.logprobs,
                    "prompt_text": prompt,
                    "completion_text": completion,
                    "prompt_tokens": int(self.prompt_tokens or 0),
                    "completion_tokens": int(self.completion_tokens or 0),
                    "latency_ms": latency_ms,
                    "finish_reason": "error" if error is not None else str(self.finish_reason or ""),
                },
                server_id=self.server_id or self.server,
            )
        except Exception:
            log.exception("failed to record a %s call; the caller is unaffected", self.endpoint)


def _served_version(model: str) -> str:
    """``"3"`` for a served name like ``tiny-v3`` (a LoRA version), else ``""`` (unknown)."""
    match = _SERVED_VERSION.search(model)
    return match[1] if match else ""
