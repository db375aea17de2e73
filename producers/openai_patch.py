"""Auto-tracing of the ``openai`` client: each chat completion, completion or Responses API call, sync or
async, streamed or not, becomes one ``llm_call`` span.

The patch wraps the two methods every endpoint goes through (``SyncAPIClient.request`` and
``AsyncAPIClient.request``), so ``client.chat.completions.create``, ``.with_raw_response``,
``.parse`` and every framework built on the client (LangChain, the OpenAI Agents SDK ...) are
covered. The agent gets the very objects the client returns: a stream stays the same ``Stream``
object (only its internal iterator is observed), an error propagates unchanged after the span
records it, and a failure of the tracer itself is logged, never raised.

Token ids and logprobs are recorded whenever the server returns them (vLLM: ``return_token_ids``,
``logprobs``). With ``request_token_ids=True`` the tracer asks for them itself on chat and
completion calls that did not, and strips what it added from the parsed response before the agent
sees it (the raw HTTP body of ``with_raw_response`` still shows them); only use it against servers
that accept these parameters (vLLM does, api.openai.com does not).
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
from openai._base_client import AsyncAPIClient, SyncAPIClient

from producers.context import active_rollout, now_us
from producers.emit import emit_span
from producers.redaction import to_text

log = logging.getLogger("boltstream.autotrace")

_ENDPOINTS = (("/chat/completions", "chat.completions"), ("/completions", "completions"), ("/responses", "responses"))
_originals: dict[type, Any] = {}
_request_token_ids = False


def patch(request_token_ids: bool = False) -> None:
    """Trace every call of every ``openai`` client in this process (idempotent)."""
    global _request_token_ids
    _request_token_ids = request_token_ids
    if _originals:
        return
    _originals[SyncAPIClient] = SyncAPIClient.request
    _originals[AsyncAPIClient] = AsyncAPIClient.request
    SyncAPIClient.request = _traced_sync(SyncAPIClient.request)
    AsyncAPIClient.request = _traced_async(AsyncAPIClient.request)


def unpatch() -> None:
    """Restore the client's own methods."""
    for cls, original in _originals.items():
        cls.request = original
    _originals.clear()


def is_patched() -> bool:
    return bool(_originals)


def _traced_sync(original: Any) -> Any:
    @functools.wraps(original)
    def request(self: Any, cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
        call = _Call.start(options, self)
        if call is None:
            return original(self, cast_to, options, *args, **kwargs)
        try:
            result = original(self, cast_to, call.options, *args, **kwargs)
        except BaseException as exc:
            call.finish(exc)
            raise
        return call.observe(result)

    return request


def _traced_async(original: Any) -> Any:
    @functools.wraps(original)
    async def request(self: Any, cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
        call = _Call.start(options, self)
        if call is None:
            return await original(self, cast_to, options, *args, **kwargs)
        try:
            result = await original(self, cast_to, call.options, *args, **kwargs)
        except BaseException as exc:
            call.finish(exc)
            raise
        return call.observe(result)

    return request


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """A field of an openai model or a plain dict (stream events may be either); extras included."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    value = getattr(obj, name, default)
    return default if value is None else value


class _Call:
    """One traced request: what was asked, what came back so far; becomes a span exactly once."""

    def __init__(self, endpoint: str, options: Any, body: dict[str, Any], server: str) -> None:
        self.endpoint = endpoint
        self.server = server
        self.options = options
        self.body = body
        self.start_us = now_us()
        self.started = time.perf_counter()
        self.added: set[str] = set()  # request parameters the tracer added (stripped from the response)
        self.model = str(body.get("model") or "")
        self.text: list[str] = []
        self.tool_calls: dict[int, dict[str, str]] = {}
        self.prompt_token_ids: list[int] = []
        self.completion_token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason = ""
        self.done = False

    @classmethod
    def start(cls, options: Any, client: Any) -> _Call | None:
        """A call to trace, or None (not an LLM endpoint, rollout sampled out, or the tracer failed)."""
        try:
            if getattr(options, "method", "").lower() != "post":
                return None
            url = str(options.url)
            endpoint = next((name for suffix, name in _ENDPOINTS if url.endswith(suffix)), None)
            if endpoint is None or not active_rollout().sampled:
                return None
            body = dict(options.json_data) if isinstance(options.json_data, dict) else {}
            if isinstance(options.extra_json, dict):
                body.update(options.extra_json)
            call = cls(endpoint, options, body, str(getattr(client, "base_url", "")))
            if _request_token_ids and endpoint != "responses":
                call._ask_for_tokens()
            return call
        except Exception:
            log.exception("auto-tracing could not start; the call runs untraced")
            return None

    def _ask_for_tokens(self) -> None:
        extra: dict[str, Any] = {}
        if "return_token_ids" not in self.body:
            extra["return_token_ids"] = True
        if self.body.get("logprobs") in (None, False):
            extra["logprobs"] = True if self.endpoint == "chat.completions" else 0
        if extra:
            self.added = set(extra)
            json_data = {**(self.options.json_data or {}), **extra}
            self.options = self.options.model_copy(update={"json_data": json_data})

    # -- results ------------------------------------------------------------------------------
    def observe(self, result: Any) -> Any:
        """Hand ``result`` back to the agent, observing it; never raises because of the tracer."""
        try:
            if isinstance(result, openai.Stream):
                result._iterator = self._observe_stream(result._iterator)
            elif isinstance(result, openai.AsyncStream):
                result._iterator = self._observe_async_stream(result._iterator)
            elif hasattr(result, "parse") and hasattr(result, "http_response"):  # with_raw_response
                self._observe_raw(result)
            else:
                self._add_response(result)
                self.finish()
        except Exception:
            log.exception("auto-tracing failed to read a %s response; the agent is unaffected", self.endpoint)
        return result

    def _observe_raw(self, raw: Any) -> None:
        original = raw.parse
        call = self

        if inspect.iscoroutinefunction(original):

            async def parse(*args: Any, **kwargs: Any) -> Any:
                parsed = await original(*args, **kwargs)
                return parsed if call.done else call.observe(parsed)

        else:

            def parse(*args: Any, **kwargs: Any) -> Any:
                parsed = original(*args, **kwargs)
                return parsed if call.done else call.observe(parsed)

        raw.parse = parse

    def _observe_stream(self, iterator: Iterator[Any]) -> Iterator[Any]:
        error: BaseException | None = None
        try:
            for chunk in iterator:
                self._add_chunk(chunk)
                yield chunk
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.finish(error if not isinstance(error, GeneratorExit) else None)

    async def _observe_async_stream(self, iterator: AsyncIterator[Any]) -> AsyncIterator[Any]:
        error: BaseException | None = None
        try:
            async for chunk in iterator:
                self._add_chunk(chunk)
                yield chunk
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.finish(error if not isinstance(error, GeneratorExit) else None)

    def _add_chunk(self, chunk: Any) -> None:
        try:
            if self.endpoint == "responses":
                response = _get(chunk, "response")
                if _get(chunk, "type") in ("response.completed", "response.incomplete", "response.failed") and response:
                    self.text.clear()
                    self._add_response(response)
                elif _get(chunk, "type") == "response.output_text.delta":
                    self.text.append(_get(chunk, "delta", ""))
                return
            self._add_completion(chunk, streamed=True)
        except Exception:
            log.exception("auto-tracing failed to read a %s chunk; the agent is unaffected", self.endpoint)

    def _add_response(self, response: Any) -> None:
        if self.endpoint == "responses":
            self.model = _get(response, "model", self.model)
            self.text.append(_get(response, "output_text", ""))
            usage = _get(response, "usage")
            self.prompt_tokens = _get(usage, "input_tokens", 0)
            self.completion_tokens = _get(usage, "output_tokens", 0)
            incomplete = _get(response, "incomplete_details")
            self.finish_reason = _get(incomplete, "reason", "") or _get(response, "status", "")
            for item in _get(response, "output", []) or []:
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
            self._strip(choice, ("token_ids", "prompt_token_ids"))
            if "logprobs" in self.added:
                choice.logprobs = None
        self._strip(response, ("prompt_token_ids",))

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

    def _strip(self, obj: Any, fields: tuple[str, ...]) -> None:
        """Put back what the server sends when nobody asks for token ids (vLLM: the same keys, null)."""
        if "return_token_ids" not in self.added:
            return
        extra = getattr(obj, "__pydantic_extra__", None)
        if extra:
            for name in fields:
                if name in extra:
                    extra[name] = None

    # -- the span -----------------------------------------------------------------------------
    def finish(self, error: BaseException | None = None) -> None:
        if self.done:
            return
        self.done = True
        try:
            latency_ms = (time.perf_counter() - self.started) * 1000
            completion = "".join(self.text)
            if self.tool_calls:
                completion += to_text([self.tool_calls[i] for i in sorted(self.tool_calls)])
            if self.endpoint == "chat.completions":
                prompt = to_text(self.body.get("messages", []))
            elif self.endpoint == "completions":
                prompt = to_text(self.body.get("prompt", ""))
            else:
                prompt = to_text({"instructions": self.body.get("instructions"), "input": self.body.get("input")})
            emit_span(
                "llm_call",
                self.endpoint,
                attributes={"stream": bool(self.body.get("stream")), "server.url": self.server},
                status="ok" if error is None else "error",
                error=None if error is None else f"{type(error).__name__}: {error}",
                start_time_us=self.start_us,
                end_time_us=now_us(),
                llm={
                    "model": self.model,
                    "model_version": "",
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
            )
        except Exception:
            log.exception("auto-tracing failed to record a %s call", self.endpoint)

