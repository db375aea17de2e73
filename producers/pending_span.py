"""A span waiting in memory for the SpanProducer, and the names of its fields.

It is built on the agent's thread (cheap: no conversion, no encoding) as a flat tuple: the Span record's
fields in schema order, attributes last and flat,
(event_id, rollout_id, attempt_id, task_id, agent_name, kind, name, parent_id, sequence, start_time_us,
end_time_us, status, error, reward, llm, server_id, key, value, key, value, ...).
Flat and made of strings, numbers and None (an llm_call's ``llm`` dict aside), it stops being tracked by
the garbage collector at the first collection it meets, so spans waiting for the producer's thread are not
promoted to the old generation, where they would trigger full collections of the agent's whole heap
(end-to-end benchmark: 2 full collections per 100,000 spans, ~2 µs a span, when spans held a dict and the
rollout). For the same reason it is a plain tuple, not a NamedTuple: its length varies with the attributes,
and the producer's thread reads a few fields of every span, where an index constant costs nothing.

Readers index it with the constants below (``span[ERROR]``, ``span[ATTRIBUTES::2]`` for the keys).
"""

from __future__ import annotations

PendingSpan = tuple

EVENT_ID = 0
ROLLOUT_ID = 1
ATTEMPT_ID = 2
TASK_ID = 3
AGENT_NAME = 4
KIND = 5
NAME = 6
PARENT_ID = 7
SEQUENCE = 8
START_TIME_US = 9
END_TIME_US = 10
STATUS = 11
ERROR = 12
REWARD = 13
LLM = 14
SERVER_ID = 15
#: The first attribute key; its value follows it, then the next key, to the end of the tuple.
ATTRIBUTES = 16
