"""The agent-side SDK: rollout context, emit helpers, SpanProducer, auto-tracer, OTel bridge, capture proxy."""
