"""The body of the Lightning integration, shared by ``lightning.pytorch`` and ``pytorch_lightning``.

The two packages have distinct ``Callback`` and ``CheckpointIO`` classes, so each public module
(:mod:`~ckpt_callbacks.integrations.lightning`, :mod:`~ckpt_callbacks.integrations.pytorch_lightning`)
builds its classes from the mixins here and in :mod:`~ckpt_callbacks.integrations._lightning_io` and
its own package's base classes.

**Saving.** :class:`LightningSaverMixin` maps Lightning's hooks to our events: train batch end (once
the optimizer stepped) to ``BATCH_END`` + ``BATCH_CHECKPOINT``, train epoch end to ``EPOCH_END`` +
``EPOCH_CHECKPOINT``, validation end to ``EVAL_END``, train start to ``FIT_START``, train end to
``FIT_END``. The timestamp counts Lightning's epochs and optimizer steps (``global_step``) as
``batch``, the samples of every rank (``num_samples_fn``, default the batch's first dimension), tokens
(``num_tokens_fn``) and wall-clock time. A due checkpoint is taken with ``trainer.save_checkpoint``
on every rank, so the strategy gathers the state as it does for its own checkpoints (FSDP, ...);
our ``CheckpointIO`` plugin captures the dict the strategy hands to its ``CheckpointIO``
on rank 0, and the core manager commits it under our name, compressed by the extension, with our
metadata under one reserved key. A strategy that writes a folder instead (sharded FSDP) has its
folder committed. ``trainer.fit(ckpt_path=<our file>)`` therefore resumes natively.

**Loading** is the plugin's job (:mod:`ckpt_callbacks.integrations._lightning_io`): it reads every
format we write, local or remote, and resolves ``ckpt_path=AUTORESUME``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Callable

import torch

from ckpt_callbacks.capture import FolderCheckpoint, NativeCheckpoint, Payload
from ckpt_callbacks.errors import CheckpointError, ConfigurationError, bad_value
from ckpt_callbacks.events import Event
from ckpt_callbacks.integrations._adapter import (
    SaverDriver, TrainerView, check_count_fn, check_run_name, resumed_timestamp, run_name_for,
)
from ckpt_callbacks.integrations._lightning_io import AUTORESUME, LightningIOMixin
from ckpt_callbacks.locations import is_uri
from ckpt_callbacks.saver import CheckpointSaver
from ckpt_callbacks.storage import remove_checkpoint
from ckpt_callbacks.temp_files import temp_path_for
from ckpt_callbacks.time import Time, Timestamp, TimeUnit

__all__ = ["LightningSaverMixin"]

log = logging.getLogger(__name__)

class LightningSaverMixin:
    """The body of the Lightning ``CheckpointSaver`` (see the public modules for its documentation).

    Example:
        >>> class CheckpointSaver(LightningSaverMixin, lightning.pytorch.callbacks.Checkpoint):  # doctest: +SKIP
        ...     _checkpoint_io_class = CheckpointIO
    """

    _checkpoint_io_class: type[LightningIOMixin]

    def __init__(
        self,
        folder: str | os.PathLike = "{run_name}/checkpoints",
        filename: str | os.PathLike = "ep{epoch}-ba{batch}-rank{rank}.pt",
        remote_file_name: str | os.PathLike | None = None,
        latest_filename: str | os.PathLike | None = "latest-rank{rank}.pt",
        latest_remote_file_name: str | os.PathLike | None = None,
        save_interval: Any = "1ep",
        *,
        run_name: str | None = None,
        num_samples_fn: Callable[[Any], int] | None = None,
        num_tokens_fn: Callable[[Any], int] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        saver = CheckpointSaver(
            folder, filename, remote_file_name, latest_filename, latest_remote_file_name, save_interval, **options
        )
        if saver.ranks != "rank0":
            accepted = "'rank0' in Lightning: its strategy gathers the state (sharded strategies write their folder)"
            raise ConfigurationError(bad_value("ranks", accepted, saver.ranks))
        self.driver = SaverDriver(saver)
        self.run_name = check_run_name(run_name)
        self.num_samples_fn = check_count_fn("num_samples_fn", num_samples_fn)
        self.num_tokens_fn = check_count_fn("num_tokens_fn", num_tokens_fn)
        self.view: TrainerView | None = None
        self._restored: Timestamp | None = None
        self._io: LightningIOMixin | None = None
        self._pending = [0, 0]
        self._open = False

    # ------------------------------------------------------------------ what users read

    @property
    def saver(self) -> CheckpointSaver:
        """The core saver this callback drives (its manager, record, ``saved_checkpoints``, ...)."""
        return self.driver.saver

    @property
    def saved_checkpoints(self) -> list[str]:
        """Paths of the checkpoints this run saved that are still on disk, oldest first."""
        return self.driver.saver.saved_checkpoints

    @property
    def state_key(self) -> str:
        """The key of this saver's state in checkpoints: unique per folder and filename."""
        return self.driver.saver.state_key

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Install our ``CheckpointIO`` around the strategy's and bind the saver to the run."""
        if stage != "fit":
            return
        io = trainer.strategy.checkpoint_io
        if not isinstance(io, LightningIOMixin):
            io = self._checkpoint_io_class(io)
            trainer.strategy.checkpoint_io = io
        io.register(self)
        io.resumed_from = None
        self._io = io
        self._open = True
        name = trainer.strategy.broadcast(run_name_for(self.run_name, None))
        self.view = TrainerView(run_name=name, max_duration=_max_duration(trainer))
        self.driver.bind(self.view)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """``FIT_START``, once Lightning has restored the checkpoint it resumes from (if any)."""
        view = self._view
        view.timestamp, view.previous_timestamp = self._start_timestamp(trainer), None
        view.dataloader_len = _steps_per_epoch(trainer)
        view.callbacks = [cb.driver.saver for cb in trainer.callbacks if isinstance(cb, LightningSaverMixin)]
        view.resumed_from = (self._io.resumed_from if self._io else None) or _local_path(trainer.ckpt_path)
        self._pending = [0, 0]
        self.driver.start(view)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """``BATCH_END`` and ``BATCH_CHECKPOINT`` after each optimizer step (not each accumulated micro-batch)."""
        view = self._view
        self._pending[0] += int(self.num_samples_fn(batch)) if self.num_samples_fn else _first_dimension(batch)
        self._pending[1] += int(self.num_tokens_fn(batch)) if self.num_tokens_fn else 0
        steps = trainer.global_step - view.timestamp.batch
        if steps <= 0:
            return
        samples, tokens = _sum_over_ranks(trainer, self._pending)
        self._pending = [0, 0]
        view.advance_batch(samples, tokens, self.driver.batch_seconds())
        if steps > 1:  # several optimizers stepped (manual optimization): batch follows global_step
            view.timestamp = dataclasses.replace(
                view.timestamp, batch=trainer.global_step, batch_in_epoch=view.timestamp.batch_in_epoch + steps - 1
            )
        self.driver.saver.batch_end(view)  # type: ignore[arg-type]
        self._maybe_save(trainer, Event.BATCH_CHECKPOINT)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """``EPOCH_END`` and ``EPOCH_CHECKPOINT``."""
        view = self._view.advance_epoch()
        self.driver.saver.epoch_end(view)  # type: ignore[arg-type]
        self._maybe_save(trainer, Event.EPOCH_CHECKPOINT)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """``EVAL_END``: the logged metrics score checkpoints of this step (``KeepBest``)."""
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.view is None:
            return
        self.view.metrics = dict(trainer.callback_metrics)
        self.view.metrics_timestamp = self.view.timestamp
        self.driver.saver.eval_end(self.view)  # type: ignore[arg-type]

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """``FIT_END``: every checkpoint durable, locally and in the store; failures raised."""
        self.driver.saver.fit_end(self._view)  # type: ignore[arg-type]

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Finish the save in flight, drain uploads (bounded by ``shutdown_timeout``), stop threads."""
        if stage == "fit":
            self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Drain what can be drained when training fails (Lightning skips ``teardown`` hooks then)."""
        try:
            self._close()
        except Exception as error:  # noqa: BLE001 -- the training error is the one to propagate
            log.error("closing %s after %r failed: %s", self.state_key, exception, error)

    def state_dict(self) -> dict[str, Any]:
        """The saver's record and our counters (samples, tokens, wall clock), stored in Lightning's checkpoints."""
        timestamp = self.view.timestamp if self.view is not None else Timestamp()
        return {"saver": self.driver.saver.state_dict(), "timestamp": timestamp.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the record and counters of the checkpoint Lightning resumes from."""
        self.driver.saver.load_state_dict(state_dict.get("saver", {}))
        if "timestamp" in state_dict:
            self._restored = Timestamp.from_state_dict(state_dict["timestamp"])

    # ------------------------------------------------------------------ helpers

    def _close(self) -> None:
        """Close the saver once per fit (an error may bring ``on_exception`` and ``teardown`` both)."""
        if self._open:
            self._open = False
            self.driver.saver.close()

    @property
    def _view(self) -> TrainerView:
        if self.view is None:
            raise RuntimeError("the CheckpointSaver was not set up: Lightning calls setup(stage='fit') first")
        return self.view

    def _start_timestamp(self, trainer: Any) -> Timestamp:
        """The restored counters, with epoch and step taken from Lightning's own (they are the truth
        when resuming from a checkpoint another callback wrote a step earlier or later)."""
        epoch, step, per_epoch = trainer.current_epoch, trainer.global_step, _steps_per_epoch(trainer)
        if per_epoch:
            in_epoch = step - epoch * per_epoch
        else:  # an iterable dataset: Lightning's own count (of batches, not steps) is the best there is
            in_epoch = trainer.fit_loop.epoch_loop.batch_progress.current.completed // max(trainer.accumulate_grad_batches, 1)
        return resumed_timestamp(self._restored or Timestamp(), epoch=epoch, batch=step, batch_in_epoch=in_epoch)

    def _maybe_save(self, trainer: Any, event: Event) -> None:
        if not self.driver.due(self._view, event):
            return
        payload = self._payload(trainer)
        try:
            self.driver.save(self._view, payload)
        finally:
            if isinstance(payload, FolderCheckpoint):
                remove_checkpoint(payload.path)  # capture took its snapshot

    def _payload(self, trainer: Any) -> Payload:
        """Take Lightning's checkpoint through the strategy, on every rank, as the strategy saves its own."""
        manager = self.driver.saver.manager
        assert manager is not None and self._io is not None
        staging = temp_path_for(manager.folder / manager.layout.name(self._view.timestamp))
        with self._io.capture() as sink:
            trainer.save_checkpoint(staging, weights_only=self.driver.saver.weights_only)
        if not manager.writes or sink.checkpoint is not None:
            if self.driver.saver.format.tensors_only:
                return {"model": sink.checkpoint["state_dict"]} if sink.checkpoint is not None else {}
            return NativeCheckpoint(sink.checkpoint)
        if staging.is_dir():
            return FolderCheckpoint(staging)
        raise CheckpointError(
            f"{type(trainer.strategy).__name__} wrote its checkpoint neither through its CheckpointIO nor as a "
            f"folder at {staging}: ckpt_callbacks cannot save with this strategy"
        )


def _max_duration(trainer: Any) -> Time | None:
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return Time(trainer.max_steps, TimeUnit.BATCH)
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        return Time(trainer.max_epochs, TimeUnit.EPOCH)
    return None


def _steps_per_epoch(trainer: Any) -> int | None:
    batches = trainer.num_training_batches
    if batches is None or math.isinf(batches):
        return None
    return math.ceil(batches / max(trainer.accumulate_grad_batches, 1))


def _first_dimension(batch: Any) -> int:
    first = batch
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    if isinstance(first, dict) and first:
        first = next(iter(first.values()))
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def _sum_over_ranks(trainer: Any, counts: list[int]) -> tuple[int, int]:
    """Samples and tokens of every rank (one small collective per optimizer step with several ranks)."""
    if trainer.world_size <= 1:
        return counts[0], counts[1]
    total = trainer.strategy.reduce(
        torch.tensor(counts, dtype=torch.float64, device=trainer.strategy.root_device), reduce_op="sum"
    )
    return int(total[0]), int(total[1])


def _local_path(ckpt_path: Any) -> str | None:
    if ckpt_path is None or str(ckpt_path) == AUTORESUME or is_uri(os.fspath(ckpt_path)):
        return None
    return os.fspath(ckpt_path) if os.path.exists(ckpt_path) else None
