"""What goes wrong with the local stack: :class:`StackError`; :class:`StackRunningError` when one already runs;
:class:`CorruptStateError` when its state file cannot be read."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from boltstream.infra.stack.state import StackState


class StackError(RuntimeError):
    """The local stack could not be started, reached or stopped; the message says why."""


class CorruptStateError(StackError):
    """The stack's state file cannot be read; ``boltstream down --force`` is the way out."""


class StackRunningError(StackError):
    """A stack already runs under this home; ``state`` is what it runs."""

    def __init__(self, state: StackState):
        super().__init__(f"the local stack is already running: {state.describe()}")
        self.state = state
