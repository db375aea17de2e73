"""``agentlightning.trainer`` under boltstream: ``Trainer``, loaded on first use as ``agl.Trainer`` is."""


def __getattr__(name: str) -> object:
    if name == "Trainer":
        from boltstream import agl

        return agl.Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
