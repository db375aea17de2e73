"""Ctrl-C in ``boltstream train``: the first one asks the loop to stop after its current step, so the run ends
cleanly (a checkpoint, committed offsets, a summary); a second one interrupts at once."""

from __future__ import annotations

import signal
from collections.abc import Callable


def stop_on_ctrl_c(stop: Callable[[], None]) -> None:
    """Make the next Ctrl-C call ``stop`` (which must only set a flag) instead of raising KeyboardInterrupt."""

    def first(_signum: int, _frame: object) -> None:
        print("boltstream train: stopping after the current step (Ctrl-C again to quit at once)", flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stop()

    signal.signal(signal.SIGINT, first)
