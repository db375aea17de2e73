"""Auto-tracing of the ``openai`` client: each chat completion, completion or Responses API call, sync or
async, streamed or not, becomes one ``llm_call`` span.

The patch wraps the two methods every endpoint goes through (``SyncAPIClient.request`` and
``AsyncAPIClient.request``), so ``client.chat.completions.create``, ``.with_raw_response``,
``.parse`` and every framework built on the client (LangChain, the OpenAI Agents SDK ...) are
covered. The agent gets the very objects the client returns: a stream stays the same ``Stream``
object (only its internal iterator is observed), an error propagates unchanged after the span
records it, and a failure of the tracer itself is logged, never raised.

Token ids and logprobs are recorded whenever the server returns them (vLLM: ``return_token_ids``,
``logprobs``). By default (``producer.request_token_ids``) the tracer asks for token ids itself on chat
and completion calls that did not, and logprobs too with ``producer.request_logprobs``; it strips what it
added from the parsed response before the agent sees it (the raw HTTP body of ``with_raw_response`` still
shows them). A server that rejects what was added (a hosted API that refuses unknown parameters, HTTP 400
naming it) gets the call again as the agent made it, and is never asked again by this process.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from typing import Any

import openai
from openai._base_client import AsyncAPIClient, SyncAPIClient

from boltstream.infra.common.contract import ROLLOUT_ID_HEADER
from boltstream.producers.context import active_rollout
from boltstream.producers.llm_capture import LlmCapture, endpoint_of, token_parameters

log = logging.getLogger("boltstream.autotrace")

_originals: dict[tuple[type, str], Any] = {}
_request_token_ids = False
_request_logprobs = False
#: Base URLs of servers that rejected the parameters the tracer adds: asked as the agent asks, from then on.
_plain_servers: set[str] = set()
# The traced call in flight in this thread / task: _process_response reads the response headers into it
# (a boltstream router tags each answer with the model version and replica that produced it).
_current_call: ContextVar[_Call | None] = ContextVar("boltstream_openai_call", default=None)


def patch(request_token_ids: bool = False, request_logprobs: bool = False) -> None:
    """Trace every call of every ``openai`` client in this process (idempotent); ``request_token_ids``
    (and ``request_logprobs``) ask the server for what a training sample needs when the agent did not."""
    global _request_token_ids, _request_logprobs
    _request_token_ids, _request_logprobs = request_token_ids, request_logprobs
    if _originals:
        return
    for cls, traced in ((SyncAPIClient, _traced_sync), (AsyncAPIClient, _traced_async)):
        _originals[cls, "request"] = cls.request
        cls.request = traced(cls.request)
    _originals[SyncAPIClient, "_process_response"] = SyncAPIClient._process_response
    _originals[AsyncAPIClient, "_process_response"] = AsyncAPIClient._process_response
    SyncAPIClient._process_response = _reading_headers_sync(SyncAPIClient._process_response)
    AsyncAPIClient._process_response = _reading_headers_async(AsyncAPIClient._process_response)


def unpatch() -> None:
    """Restore the client's own methods."""
    for (cls, name), original in _originals.items():
        setattr(cls, name, original)
    _originals.clear()


def is_patched() -> bool:
    return bool(_originals)


def _traced_sync(original: Any) -> Any:
    @functools.wraps(original)
    def request(self: Any, cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
        call = _Call.start(options, self)
        if call is None:
            return original(self, cast_to, options, *args, **kwargs)
        token = _current_call.set(call)
        try:
            try:
                result = original(self, cast_to, call.options, *args, **kwargs)
            except openai.BadRequestError as exc:
                if not call.rejected_what_was_added(exc):
                    raise
                _current_call.set(call := call.as_the_agent_asked())
                result = original(self, cast_to, call.options, *args, **kwargs)
        except BaseException as exc:
            call.finish(exc)
            raise
        finally:
            _current_call.reset(token)
        return call.observe(result)

    return request


def _traced_async(original: Any) -> Any:
    @functools.wraps(original)
    async def request(self: Any, cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
        call = _Call.start(options, self)
        if call is None:
            return await original(self, cast_to, options, *args, **kwargs)
        token = _current_call.set(call)
        try:
            try:
                result = await original(self, cast_to, call.options, *args, **kwargs)
            except openai.BadRequestError as exc:
                if not call.rejected_what_was_added(exc):
                    raise
                _current_call.set(call := call.as_the_agent_asked())
                result = await original(self, cast_to, call.options, *args, **kwargs)
        except BaseException as exc:
            call.finish(exc)
            raise
        finally:
            _current_call.reset(token)
        return call.observe(result)

    return request


def _read_headers(response: Any) -> None:
    call = _current_call.get()
    if call is not None:
        try:
            call.capture.add_headers(response.headers)
        except Exception:
            log.exception("auto-tracing could not read the response headers; the agent is unaffected")


def _reading_headers_sync(original: Any) -> Any:
    @functools.wraps(original)
    def process_response(self: Any, *args: Any, **kwargs: Any) -> Any:
        _read_headers(kwargs.get("response"))
        return original(self, *args, **kwargs)

    return process_response


def _reading_headers_async(original: Any) -> Any:
    @functools.wraps(original)
    async def process_response(self: Any, *args: Any, **kwargs: Any) -> Any:
        _read_headers(kwargs.get("response"))
        return await original(self, *args, **kwargs)

    return process_response


class _Call:
    """One traced request through the client: rewrites the request if asked to, observes the result."""

    def __init__(self, capture: LlmCapture, options: Any, asked: Any) -> None:
        self.capture = capture
        self.options = options  # what is sent
        self.asked = asked  # what the agent asked, before the tracer added anything

    @classmethod
    def start(cls, options: Any, client: Any) -> _Call | None:
        """A call to trace, or None (not an LLM endpoint, rollout sampled out, or the tracer failed)."""
        try:
            if getattr(options, "method", "").lower() != "post":
                return None
            endpoint = endpoint_of(str(options.url))
            current = active_rollout()
            if endpoint is None or not current.sampled:
                return None
            body = dict(options.json_data) if isinstance(options.json_data, dict) else {}
            if isinstance(options.extra_json, dict):
                body.update(options.extra_json)
            server = str(getattr(client, "base_url", ""))
            ask = _request_token_ids and server not in _plain_servers
            added = token_parameters(endpoint, body, logprobs=_request_logprobs) if ask else {}
            # The rollout id travels with the request: a boltstream router keeps a rollout on one version.
            headers = {**(options.headers if isinstance(options.headers, dict) else {})}
            headers.setdefault(ROLLOUT_ID_HEADER, current.rollout_id)
            asked = options.model_copy(update={"headers": headers})
            sent = asked.model_copy(update={"json_data": {**(options.json_data or {}), **added}}) if added else asked
            return cls(LlmCapture(endpoint, body, server, frozenset(added)), sent, asked)
        except Exception:
            log.exception("auto-tracing could not start; the call runs untraced")
            return None

    def finish(self, error: BaseException | None = None) -> None:
        self.capture.finish(error)

    def rejected_what_was_added(self, error: openai.BadRequestError) -> bool:
        """Whether the server refused this call because of a parameter the tracer added; if so, it is
        remembered as a server to ask as the agent asks."""
        message = str(error).lower()
        if not self.capture.added or not any(name in message for name in self.capture.added):
            return False
        log.warning(
            "%s rejects %s: its calls are traced without token ids from now on (samples are then tokenized "
            "by the trainer)",
            self.capture.server,
            ", ".join(sorted(self.capture.added)),
        )
        _plain_servers.add(self.capture.server)
        return True

    def as_the_agent_asked(self) -> _Call:
        """This call again, without what the tracer added."""
        capture = LlmCapture(self.capture.endpoint, self.capture.body, self.capture.server, frozenset())
        return _Call(capture, self.asked, self.asked)

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
                self.capture.add_response(result)
                self.capture.finish()
        except Exception:
            log.exception("auto-tracing failed to read a %s response; the agent is unaffected", self.capture.endpoint)
        return result

    def _observe_raw(self, raw: Any) -> None:
        original = raw.parse
        call = self

        if inspect.iscoroutinefunction(original):

            async def parse(*args: Any, **kwargs: Any) -> Any:
                parsed = await original(*args, **kwargs)
                return parsed if call.capture.done else call.observe(parsed)

        else:

            def parse(*args: Any, **kwargs: Any) -> Any:
                parsed = original(*args, **kwargs)
                return parsed if call.capture.done else call.observe(parsed)

        raw.parse = parse

    def _add_chunk(self, chunk: Any) -> None:
        try:
            self.capture.add_chunk(chunk)
        except Exception:
            log.exception("auto-tracing failed to read a %s chunk; the agent is unaffected", self.capture.endpoint)

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
