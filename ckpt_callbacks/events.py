"""Trainer events and the :class:`Callback` base class.

A trainer fires events in Composer's order; every callback gets each event through
:meth:`Callback.run_event`, which dispatches to the method of the same name::

    INIT -> FIT_START -> { EPOCH_START -> { BATCH_START -> BATCH_END -> [eval] -> BATCH_CHECKPOINT }*
                           -> EPOCH_END -> [eval] -> EPOCH_CHECKPOINT }* -> FIT_END

    [eval] = EVAL_START -> EVAL_END, when an evaluation is due

The timestamp is advanced before ``BATCH_END`` (so ``{batch}`` counts the batch just trained), and the
epoch is rolled before ``EPOCH_END`` (so in-epoch counters read 0 at ``EPOCH_CHECKPOINT``). Evaluation
runs before the checkpoint event of the same step, so a checkpoint saved there is scored with the
metrics of its own weights.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ckpt_callbacks.state import State

__all__ = ["Callback", "Event"]


class Event(str, Enum):
    """The points of a training run at which callbacks run.

    Example:
        >>> Event.BATCH_CHECKPOINT.value
        'batch_checkpoint'
    """

    INIT = "init"
    FIT_START = "fit_start"
    EPOCH_START = "epoch_start"
    BATCH_START = "batch_start"
    BATCH_END = "batch_end"
    EVAL_START = "eval_start"
    EVAL_END = "eval_end"
    BATCH_CHECKPOINT = "batch_checkpoint"
    EPOCH_END = "epoch_end"
    EPOCH_CHECKPOINT = "epoch_checkpoint"
    FIT_END = "fit_end"

    def __str__(self) -> str:
        return self.value


class Callback:
    """Base class of everything a trainer calls back at its events.

    Override the methods named after the events you need; the others do nothing. A callback with
    state to resume overrides :meth:`state_dict` and :meth:`load_state_dict`; its state is stored in
    full checkpoints under :attr:`state_key`.

    Example:
        >>> class PrintEpochs(Callback):
        ...     def epoch_end(self, state):
        ...         print("finished epoch", state.timestamp.epoch)
    """

    def run_event(self, event: Event, state: State) -> None:
        """Run the method named after ``event``."""
        getattr(self, Event(event).value)(state)

    def init(self, state: State) -> None:
        """Called once when the trainer is constructed."""

    def fit_start(self, state: State) -> None:
        """Called at the start of :meth:`Trainer.fit`, after any checkpoint was loaded."""

    def epoch_start(self, state: State) -> None:
        """Called at the start of every epoch."""

    def batch_start(self, state: State) -> None:
        """Called before every batch is trained."""

    def batch_end(self, state: State) -> None:
        """Called after every batch, with the timestamp already advanced."""

    def eval_start(self, state: State) -> None:
        """Called before an evaluation, after ``batch_end`` or ``epoch_end``."""

    def eval_end(self, state: State) -> None:
        """Called after an evaluation, with its results in ``state.metrics``."""

    def batch_checkpoint(self, state: State) -> None:
        """Called after :meth:`batch_end`: the place to save per-batch checkpoints."""

    def epoch_end(self, state: State) -> None:
        """Called after every epoch, with the epoch already counted."""

    def epoch_checkpoint(self, state: State) -> None:
        """Called after :meth:`epoch_end`: the place to save per-epoch checkpoints."""

    def fit_end(self, state: State) -> None:
        """Called once when training has finished."""

    def close(self) -> None:
        """Release resources (threads, temp folders). Called by the trainer after fit, also on error."""

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint; unique among a trainer's callbacks."""
        return type(self).__qualname__

    def state_dict(self) -> dict[str, Any]:
        """Return the state to store in full checkpoints (empty by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
