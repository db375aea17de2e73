"""A fault-suite agent: rollouts through the real SDK until a stop file appears, then a manifest of them.

Run as ``python -m tests.faults.agent MANIFEST STOP_FILE [BURST]`` with BOLTSTREAM_HOME (and any
BOLTSTREAM_* settings) in the environment; with BURST, it runs that many rollouts as fast as it can instead,
then stops by itself. Each rollout emits ``SPANS_PER_ROLLOUT`` message spans and a final reward
inside ``producers.rollout``; the undisturbed outcome of each one is a ``complete`` trajectory of exactly
those spans, the reward span and the rollout span, with that reward. The manifest (JSON) lists every
rollout (its span event ids and reward) and every span event id the broker acknowledged.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from boltstream.producers import runtime
from boltstream.producers.context import rollout
from boltstream.producers.emit import emit_message, emit_reward
from boltstream.schemas.codec import codec

SPANS_PER_ROLLOUT = 8
#: Pause between rollouts: a steady stream a loaded two-core machine keeps up with.
PAUSE = 0.02


def main(manifest: Path, stop_file: Path, burst: int = 0) -> None:
    acknowledged: set[str] = set()
    batches = codec("SpanBatch")
    settings = runtime.settings()

    def delivered(topic: str, value: bytes, error: object) -> None:
        if error is None and topic == settings.topics.spans:
            acknowledged.update(span["event_id"] for span in batches.decode(value)["spans"])

    runtime.configure(settings, on_delivery=delivered)
    rng = random.Random()
    rollouts: dict[str, dict] = {}
    while not (len(rollouts) >= burst if burst else stop_file.exists()):
        reward = round(rng.uniform(-1, 1), 3)
        with rollout(task_id=f"task-{rng.randrange(50)}", agent_name="fault-agent") as run:
            event_ids = [emit_message(f"step {step}") for step in range(SPANS_PER_ROLLOUT)]
            event_ids.append(emit_reward(reward))
        event_ids.append(run.root_id)
        rollouts[run.rollout_id] = {"span_event_ids": event_ids, "reward": reward}
        if not burst:
            time.sleep(PAUSE)
    settled = runtime.flush(timeout=120.0)
    stats = runtime.stats()
    runtime.shutdown(timeout=10.0)
    manifest.write_text(
        json.dumps({"rollouts": rollouts, "acknowledged": sorted(acknowledged), "settled": settled, "stats": stats})
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), *(int(arg) for arg in sys.argv[3:4]))
