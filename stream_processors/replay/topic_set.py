"""The replay topic set ``replay.<name>.<topic>``: the settings that point a worker at it (every topic renamed,
with a join group and trainer model name of its own), and their file ``<home>/replays/<name>.toml``."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from boltstream.infra.common.config import ConfigError, Settings

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def replay_settings(settings: Settings, name: str) -> Settings:
    """``settings`` with every topic renamed ``replay.<name>.<topic>``, and the consumer groups and trainer
    model name that would otherwise be shared with production made the replay's own."""
    if not _NAME.match(name):
        raise ConfigError(f"replay name {name!r}: use letters, digits, '-' and '_' (at most 64)")
    prefix = f"replay.{name}."
    topics = {key: prefix + value for key, value in vars(settings.topics).items() if isinstance(value, str)}
    return replace(
        settings,
        topics=replace(settings.topics, **topics),
        stream=replace(settings.stream, join_group=prefix + settings.stream.join_group),
        # The trainer's group and checkpoint directory are named after the model.
        trainer=replace(settings.trainer, model_name=f"{settings.trainer.model_name}-replay-{name}"),
    )


def write_replay_config(settings: Settings, name: str) -> Path:
    """Write the replay's settings to ``<home>/replays/<name>.toml`` (for ``BOLTSTREAM_CONFIG``)."""
    from boltstream.infra.common.config import settings_toml

    path = Path(settings.home) / "replays" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(settings_toml(settings))
    return path
