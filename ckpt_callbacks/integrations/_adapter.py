"""What the trainer integrations share: a view of a foreign trainer as our state, and a driver that
runs a core :class:`~ckpt_callbacks.saver.CheckpointSaver` from the foreign trainer's hooks.

An integration maps its trainer's hooks to our events and its counters to a
:class:`~ckpt_callbacks.time.Timestamp` kept in a :class:`TrainerView`. The view carries exactly what
the core saver, its save policies and its manager read from a :class:`~ckpt_callbacks.state.State`
(run name, timestamps, ``max_duration``, metrics, the resume source), so the core saver runs
unchanged: the same argument checks, names, intervals, record, uploads and pruning. Only the payload
differs: a trainer's native checkpoint dict or its checkpoint folder instead of our state dict
(:class:`~ckpt_callbacks.capture.NativeCheckpoint`, :class:`~ckpt_callbacks.capture.FolderCheckpoint`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

from ckpt_callbacks import dist
from ckpt_callbacks.capture import Payload
from ckpt_callbacks.errors import ConfigurationError, bad_value
from ckpt_callbacks.events import Event
from ckpt_callbacks.record import metrics_at_save
from ckpt_callbacks.saver import CheckpointSaver
from ckpt_callbacks.time import Time, Timestamp

__all__ = [
    "SaverDriver", "TrainerView", "check_count_fn", "check_run_name", "missing_package", "resumed_timestamp",
    "run_name_for",
]


@dataclass
class TrainerView:
    """A foreign trainer's state as the core saver reads it (the attributes of a ``State`` it uses).

    Example:
        >>> view = TrainerView(run_name="exp1", max_duration=Time.from_input("10ba"))
        >>> view.advance_batch(samples=8).timestamp.batch
        1
    """

    run_name: str
    max_duration: Time | None = None
    dataloader_len: int | None = None
    timestamp: Timestamp = field(default_factory=Timestamp)
    previous_timestamp: Timestamp | None = None
    callbacks: list[Any] = field(default_factory=list)
    resumed_from: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_timestamp: Timestamp | None = None

    def advance_batch(self, samples: int = 0, tokens: int = 0, seconds: float = 0.0) -> TrainerView:
        """Count one optimizer step (and the samples and tokens it took, over every rank)."""
        self.previous_timestamp = self.timestamp
        self.timestamp = self.timestamp.to_next_batch(samples, tokens, timedelta(seconds=seconds))
        return self

    def advance_epoch(self) -> TrainerView:
        """Count a finished epoch (in-epoch counters go back to 0)."""
        self.previous_timestamp = self.timestamp
        self.timestamp = self.timestamp.to_next_epoch()
        return self


class SaverDriver:
    """Runs one core :class:`~ckpt_callbacks.saver.CheckpointSaver` from a foreign trainer's hooks.

    Args:
        saver: the core saver, built from the integration's arguments (so they are checked at once).

    Example:
        >>> driver = SaverDriver(CheckpointSaver("{run_name}/ckpt", "ba{batch}.pt", save_interval="2ba"))
        >>> driver.bind(TrainerView(run_name="exp1"))  # doctest: +SKIP
    """

    def __init__(self, saver: CheckpointSaver) -> None:
        self.saver = saver
        self._batch_started = time.monotonic()

    @property
    def bound(self) -> bool:
        """Whether :meth:`bind` has run (the saver has its manager)."""
        return self.saver.manager is not None

    def bind(self, view: TrainerView) -> None:
        """Bind the saver to the run (``INIT``): its folder is formatted with the run name and ranks."""
        self.saver.init(view)  # type: ignore[arg-type]

    def start(self, view: TrainerView) -> None:
        """``FIT_START``: refuse colliding savers, sweep, reconcile, check ``overwrite``, begin a lineage."""
        self.saver.fit_start(view)  # type: ignore[arg-type]
        self._batch_started = time.monotonic()

    def batch_seconds(self) -> float:
        """Wall-clock seconds since the previous step ended (or since the start)."""
        now = time.monotonic()
        seconds, self._batch_started = now - self._batch_started, now
        return seconds

    def due(self, view: TrainerView, event: Event) -> bool:
        """Whether a checkpoint is due at ``event``: rank 0 decides for every rank, never twice a batch."""
        batch = view.timestamp.batch
        if batch == self.saver.last_checkpoint_batch:
            return False
        if not dist.decide(lambda: bool(self.saver.save_interval.should_save(view, event))):
            return False
        self.saver.last_checkpoint_batch = batch
        return True

    def save(self, view: TrainerView, payload: Payload) -> None:
        """Save ``payload`` as of the view's timestamp (every rank calls this); wait for it in sync mode."""
        manager = self.saver.manager
        assert manager is not None, "bind() runs before the first save"
        # The payload is the trainer's own checkpoint, which has no metrics: the view's go along.
        metrics = metrics_at_save(view, view.timestamp, None)
        manager.save(view.timestamp, payload, score=metrics or None)
        if self.saver.save_mode == "sync":
            manager.wait()


def resumed_timestamp(restored: Timestamp, *, epoch: int, batch: int, batch_in_epoch: int) -> Timestamp:
    """Our counters when a run resumes: ``restored`` (saved with the checkpoint: samples, tokens,
    wall clock), with the trainer's own epoch and step, which are the truth.

    A checkpoint saved at the last step of an epoch, before the epoch ended, resumes in the next
    epoch (the trainer counts that epoch as done): its counters are rolled to the next epoch.

    Example:
        >>> saved = Timestamp(epoch=0, batch=8, batch_in_epoch=8, sample=64, sample_in_epoch=64)
        >>> resumed = resumed_timestamp(saved, epoch=1, batch=8, batch_in_epoch=0)
        >>> resumed.epoch, resumed.sample, resumed.sample_in_epoch
        (1, 64, 0)
    """
    if (restored.epoch, restored.batch) == (epoch, batch):
        return restored
    if restored.batch == batch and restored.epoch + 1 == epoch and batch_in_epoch == 0:
        return restored.to_next_epoch()
    return dataclasses.replace(restored, epoch=epoch, batch=batch, batch_in_epoch=min(max(batch_in_epoch, 0), batch))


def run_name_for(explicit: str | None, fallback: str | None) -> str:
    """The run name: the one given, else the trainer's, else a generated one (as the core Trainer does).

    Example:
        >>> run_name_for(None, "exp1"), run_name_for("mine", "exp1")
        ('exp1', 'mine')
    """
    return explicit or fallback or f"run-{int(time.time())}-{os.getpid()}"


def check_run_name(run_name: object) -> str | None:
    """Check an integration's ``run_name`` argument.

    Raises:
        ConfigurationError: not None nor a non-empty str.

    Example:
        >>> check_run_name("exp1")
        'exp1'
    """
    if run_name is not None and (not isinstance(run_name, str) or not run_name):
        raise ConfigurationError(bad_value("run_name", "None or a non-empty str", run_name))
    return run_name


def check_count_fn(argument: str, fn: object) -> Callable[[Any], int] | None:
    """Check a ``num_samples_fn`` / ``num_tokens_fn`` argument: None or a callable ``fn(batch) -> int``.

    Raises:
        ConfigurationError: anything else.

    Example:
        >>> check_count_fn("num_tokens_fn", None) is None
        True
    """
    if fn is not None and not callable(fn):
        raise ConfigurationError(bad_value(argument, "None or a callable fn(batch) -> int", fn))
    return fn  # type: ignore[return-value]


def missing_package(package: str, install: str, error: ImportError) -> type:
    """A stand-in base class for a trainer package that is not installed: the module still imports
    (the API and docs list it), and constructing a class built on it raises an ImportError saying
    how to ``install`` the package.

    Example:
        >>> Base = missing_package("lightning", "pip install 'ckpt-callbacks[lightning]'", ImportError("no lightning"))
        >>> Base()
        Traceback (most recent call last):
        ...
        ImportError: this integration needs lightning, which did not import (no lightning): pip install 'ckpt-callbacks[lightning]'
    """
    message = f"this integration needs {package}, which did not import ({error}): {install}"

    class Missing:
        """Stands in for a class of a package that is not installed."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError(message)

    Missing.__qualname__ = Missing.__name__ = f"Missing_{package.replace('.', '_')}"
    return Missing
