"""Streaming replay: yesterday's spans and rewards re-published into a topic set of their own.

``boltstream replay`` (:mod:`.command`) selects traffic from the archive (ClickHouse, by SQL: time range,
agent, model version, rollout ids, a raw ``--where``) or from the source topics themselves (Kafka offsets or
timestamps) (:mod:`.sources`), and publishes it (:mod:`.publish`) into the *replay topic set*
``replay.<name>.<topic>`` for every topic of the configuration (:mod:`.topic_set`), at the original pacing or
N× faster. An offline experiment then runs the real join and trainer on that set
(``BOLTSTREAM_CONFIG=<home>/replays/<name>.toml boltstream join``, with any parameter changed by
``BOLTSTREAM_<SECTION>__<FIELD>``) and never touches the production topics.

Determinism: the same selection yields the same messages in the same order, hence (the join decides
by event time, see :mod:`boltstream.stream_processors.join_core`) the same trajectories and samples.
"""

from boltstream.stream_processors.replay.publish import Pacer, ReplayResult, replay
from boltstream.stream_processors.replay.sources import ArchiveSource, KafkaSource, ReplayError, Selection
from boltstream.stream_processors.replay.topic_set import replay_settings, write_replay_config

__all__ = [
    "ArchiveSource",
    "KafkaSource",
    "Pacer",
    "ReplayError",
    "ReplayResult",
    "Selection",
    "replay",
    "replay_settings",
    "write_replay_config",
]
