"""The agent-side SDK under its short name: ``from boltstream import agl``.

The same public names as :mod:`boltstream.producers` (Agent Lightning 0.3's ``emit_*`` helpers,
``operation``, ``rollout`` and boltstream's own), so an agent reads ``agl.emit_reward(1.0)``.
"""

from boltstream.producers import *  # noqa: F403 (the SDK's public names are this module's)
from boltstream.producers import __all__  # noqa: F401
