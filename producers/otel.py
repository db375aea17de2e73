"""OpenTelemetry bridge: OTel spans following the GenAI semantic conventions become boltstream spans.

Agents already traced with OpenTelemetry (AutoGen, CrewAI, LlamaIndex, OpenLLMetry or
``opentelemetry-instrumentation-openai`` ...) need one line::

    boltstream.producers.otel.install()          # adds a SpanProcessor to the global TracerProvider

Each ended OTel span carrying ``gen_ai.*`` attributes is mapped by ``gen_ai.operation.name``:
``chat`` / ``text_completion`` / ``generate_content`` (or any span with a request model) →
``llm_call`` with model, messages, output, usage and finish reason; ``execute_tool`` →
``tool_call``; anything else (``invoke_agent``, ``create_agent`` ...) → ``custom``. Other spans
are ignored. The span joins the boltstream rollout active where the OTel span ended (an implicit
one otherwise); its OTel ids are kept as attributes ``otel.trace_id`` / ``otel.span_id`` /
``otel.parent_span_id``. Needs the ``[otel]`` extra (``opentelemetry-sdk``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.trace import StatusCode

from boltstream.producers import runtime
from boltstream.producers.emit import emit_span
from boltstream.producers.redaction import to_text

LLM_OPERATIONS = frozenset(("chat", "text_completion", "generate_content", "completion"))
TOOL_OPERATIONS = frozenset(("execute_tool",))


class BoltstreamSpanProcessor(SpanProcessor):
    """Turns ended GenAI OTel spans into boltstream spans (emitted through the process's SpanProducer)."""

    def on_end(self, span: ReadableSpan) -> None:
        attributes = dict(span.attributes or {})
        if not any(key.startswith("gen_ai.") for key in attributes):
            return
        convert(span, attributes)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return runtime.flush(timeout_millis / 1000)

    def shutdown(self) -> None:
        runtime.flush()


def install(provider: TracerProvider | None = None) -> BoltstreamSpanProcessor:
    """Add the bridge to ``provider``, else to the global TracerProvider (creating an SDK one if none is set)."""
    if provider is None:
        current = trace.get_tracer_provider()
        if isinstance(current, TracerProvider):
            provider = current
        else:
            provider = TracerProvider()
            trace.set_tracer_provider(provider)
    processor = BoltstreamSpanProcessor()
    provider.add_span_processor(processor)
    return processor


def convert(span: ReadableSpan, attributes: Mapping[str, Any]) -> str:
    """Emit the boltstream span for one GenAI OTel span; returns its event_id."""
    operation = str(attributes.get("gen_ai.operation.name", ""))
    failed = span.status.status_code is StatusCode.ERROR
    error = None
    if failed:
        error = span.status.description or str(attributes.get("error.type", "error"))
    context = span.context
    kept = {
        "otel.trace_id": f"{context.trace_id:032x}",
        "otel.span_id": f"{context.span_id:016x}",
        "otel.name": span.name,
    }
    if span.parent is not None:
        kept["otel.parent_span_id"] = f"{span.parent.span_id:016x}"
    start_us = (span.start_time or 0) // 1000 or None
    end_us = (span.end_time or 0) // 1000 or None
    request_model = attributes.get("gen_ai.request.model")
    if operation in LLM_OPERATIONS or (not operation and request_model):
        kept.update({k: v for k, v in attributes.items() if not _is_message_attribute(k)})
        return emit_span(
            "llm_call",
            operation or span.name,
            attributes=kept,
            status="error" if failed else "ok",
            error=error,
            start_time_us=start_us,
            end_time_us=end_us,
            llm=_llm(attributes, span, failed),
        )
    kept.update(attributes)
    if operation in TOOL_OPERATIONS:
        kind, name = "tool_call", str(attributes.get("gen_ai.tool.name", span.name))
    else:
        kind, name = "custom", span.name
    return emit_span(
        kind,
        name,
        attributes=kept,
        status="error" if failed else "ok",
        error=error,
        start_time_us=start_us,
        end_time_us=end_us,
    )


def _llm(attributes: Mapping[str, Any], span: ReadableSpan, failed: bool) -> dict[str, Any]:
    finish = attributes.get("gen_ai.response.finish_reasons") or ()
    if isinstance(finish, str):
        finish = (finish,)
    duration_ms = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
    return {
        "model": str(attributes.get("gen_ai.response.model") or attributes.get("gen_ai.request.model") or ""),
        "model_version": "",
        "prompt_token_ids": [],
        "completion_token_ids": [],
        "completion_logprobs": [],
        "prompt_text": _messages(attributes, ("gen_ai.input.messages", "gen_ai.prompt"), span, "input"),
        "completion_text": _messages(attributes, ("gen_ai.output.messages", "gen_ai.completion"), span, "output"),
        "prompt_tokens": int(
            attributes.get("gen_ai.usage.input_tokens") or attributes.get("gen_ai.usage.prompt_tokens") or 0
        ),
        "completion_tokens": int(
            attributes.get("gen_ai.usage.output_tokens") or attributes.get("gen_ai.usage.completion_tokens") or 0
        ),
        "latency_ms": max(0.0, duration_ms),
        "finish_reason": "error" if failed else ",".join(str(f) for f in finish),
    }


def _is_message_attribute(key: str) -> bool:
    return key.startswith(("gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.prompt", "gen_ai.completion"))


def _messages(attributes: Mapping[str, Any], keys: Sequence[str], span: ReadableSpan, direction: str) -> str:
    """Messages in any of the conventions' shapes: one JSON attribute (current), indexed attributes
    ``gen_ai.prompt.0.content`` (OpenLLMetry), or span events ``gen_ai.user.message`` ... (older)."""
    whole, indexed = keys
    if whole in attributes:
        value = attributes[whole]
        return value if isinstance(value, str) else to_text(list(value))
    prefix = indexed + "."
    grouped: dict[int, dict[str, Any]] = {}
    for key, value in attributes.items():
        if key.startswith(prefix):
            index, _, field = key[len(prefix) :].partition(".")
            if index.isdigit():
                grouped.setdefault(int(index), {})[field] = value
    if grouped:
        return to_text([grouped[i] for i in sorted(grouped)])
    wanted = (
        ("gen_ai.choice",)
        if direction == "output"
        else ("gen_ai.system.message", "gen_ai.user.message", "gen_ai.assistant.message", "gen_ai.tool.message")
    )
    events = [dict(event.attributes or {}, event=event.name) for event in span.events if event.name in wanted]
    return json.dumps(events, default=str) if events else ""
