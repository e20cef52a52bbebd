"""Our savers inside the Hugging Face ``Trainer``: its checkpoint folders under our names, in S3, pruned.

Add :class:`CheckpointSaverCallback` to the ``callbacks`` you pass to ``transformers.Trainer``. It
takes the arguments of the core :class:`~ckpt_callbacks.saver.CheckpointSaver` plus ``run_name``.

**Saving.** When the Trainer has written a ``checkpoint-N/`` folder (``on_save``), the callback
snapshots it next to our checkpoints before returning (hard links, or a copy across file systems:
the Trainer's ``save_total_limit`` may delete the folder while an async save is still bundling it),
adds ``ckpt_callbacks.json`` (our metadata), and commits it under our name: a tar bundle for a tar
name (``ep{epoch}-ba{batch}.tar.zst`` compressed by the extension) or a folder for a name without an
extension. Then ``latest`` moves, the checkpoint is uploaded and pruned as any other. With
``weights_only=True`` the model's weights are exported under our name instead (``.safetensors``, or
a ``.pt`` weights-only checkpoint).

**When.** With ``save_interval=None`` (the default here) every checkpoint the Trainer writes is taken,
as its ``save_strategy`` / ``save_steps`` decide. With a ``save_interval`` (``'500ba'``, ``'1ep'``,
``'30m'``, ...) our interval decides instead: the callback sets ``control.should_save`` when a
checkpoint is due (set the Trainer's ``save_strategy='no'`` so it saves nothing on its own).

**Counters.** ``{batch}`` is the Trainer's ``global_step`` (optimizer steps), ``{epoch}`` counts
finished epochs, ``{sample}`` adds the effective batch size (per-device batch x accumulation x
processes) per step, ``{token}`` is the Trainer's ``num_input_tokens_seen`` (enable
``include_num_input_tokens_seen``).

**Resuming.** :func:`resume_from_latest` finds our newest full checkpoint (local, or downloaded from
the store), extracts a tar bundle, and returns the folder to pass as
``trainer.train(resume_from_checkpoint=...)``; training continues at the saved step.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

from ckpt_callbacks import dist
from ckpt_callbacks.archive import extract
from ckpt_callbacks.capture import FolderCheckpoint
from ckpt_callbacks.errors import ConfigurationError, CorruptCheckpointError, bad_value
from ckpt_callbacks.events import Event
from ckpt_callbacks.folders import check_folder_format
from ckpt_callbacks.integrations._adapter import (
    SaverDriver, TrainerView, check_run_name, missing_package, resumed_timestamp,
)
from ckpt_callbacks.locations import is_uri, local_checkpoint
from ckpt_callbacks.manager import CheckpointManager
from ckpt_callbacks.saver import CheckpointSaver
from ckpt_callbacks.storage import remove_checkpoint
from ckpt_callbacks.temp_files import temp_path_for
from ckpt_callbacks.time import Time, Timestamp, TimeUnit

try:
    from transformers import TrainerCallback as _TrainerCallback
except ImportError as _error:
    _TrainerCallback = missing_package(  # type: ignore[misc,assignment]
        "transformers", "pip install 'ckpt-callbacks[transformers]'", _error
    )

__all__ = ["CheckpointSaverCallback", "resume_from_latest"]

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint"
"""The Trainer names its folders ``<output_dir>/checkpoint-<global_step>``."""

# The callbacks bound to a Trainer's arguments: FIT_START checks that savers of one Trainer do not
# write the same names (the Trainer does not tell a callback about the others).
_BOUND: weakref.WeakSet[CheckpointSaverCallback] = weakref.WeakSet()


class CheckpointSaverCallback(_TrainerCallback):  # type: ignore[misc,valid-type]
    """Commit the Hugging Face Trainer's checkpoints with our names, formats, uploads and pruning.

    Args:
        folder, filename, remote_file_name, latest_filename, latest_remote_file_name:
            as in :class:`ckpt_callbacks.saver.CheckpointSaver`. For full checkpoints ``filename``
            is a tar name (the folder bundled: ``.tar``, ``.tar.zst``, ``.tgz``, ...) or has no
            extension (the folder copied); ``{batch}`` is the Trainer's ``global_step``.
        save_interval: None to take every checkpoint the Trainer writes (its ``save_strategy``);
            else when to save, as in the core saver, and the callback asks the Trainer to save then.
        run_name: the value of ``{run_name}``; None for the Trainer's ``run_name``, else the name of
            its ``output_dir`` (stable, so a restarted job finds its checkpoints).
        **options: the keyword-only arguments of :class:`ckpt_callbacks.saver.CheckpointSaver`
            (``num_checkpoints_to_keep``, ``weights_only``, ``remote``, ``save_mode``, ...);
            ``ranks`` must be ``'rank0'``.

    Raises:
        ConfigurationError: a bad argument, naming it, its value and what is accepted.
        ImportError: ``transformers`` is not installed (``pip install 'ckpt-callbacks[transformers]'``).

    Example:
        >>> saver = CheckpointSaverCallback(filename="ba{batch}.tar.zst", num_checkpoints_to_keep=2,
        ...                                 remote="s3://bucket/runs")  # doctest: +SKIP
        >>> trainer = Trainer(model, args, train_dataset=data, callbacks=[saver])  # doctest: +SKIP
        >>> trainer.train(resume_from_checkpoint=resume_from_latest(saver))  # doctest: +SKIP
    """

    def __init__(
        self,
        folder: str | os.PathLike = "{run_name}/checkpoints",
        filename: str | os.PathLike = "ep{epoch}-ba{batch}-rank{rank}.tar",
        remote_file_name: str | os.PathLike | None = None,
        latest_filename: str | os.PathLike | None = "latest-rank{rank}.tar",
        latest_remote_file_name: str | os.PathLike | None = None,
        save_interval: Any = None,
        *,
        run_name: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        saver = CheckpointSaver(
            folder, filename, remote_file_name, latest_filename, latest_remote_file_name,
            0 if save_interval is None else save_interval, **options,
        )
        if saver.ranks != "rank0":
            accepted = "'rank0' with the Hugging Face Trainer (rank 0 commits the folder every rank wrote into)"
            raise ConfigurationError(bad_value("ranks", accepted, saver.ranks))
        if not saver.weights_only:
            check_folder_format(saver.format, saver.filename.template)
        self.driver = SaverDriver(saver)
        self.follow_trainer = save_interval is None
        self.run_name = check_run_name(run_name)
        self.view: TrainerView | None = None
        self.resumed_from: str | None = None
        self._args: Any = None
        self._requested: int | None = None
        self._resume_timestamp: Timestamp | None = None
        self._extracted: Path | None = None
        self._stopped = False

    @property
    def saver(self) -> CheckpointSaver:
        """The core saver this callback drives (its manager, record, ``saved_checkpoints``, ...)."""
        return self.driver.saver

    @property
    def saved_checkpoints(self) -> list[str]:
        """Paths of the checkpoints this run saved that are still on disk, oldest first."""
        return self.driver.saver.saved_checkpoints

    # ------------------------------------------------------------------ TrainerCallback events

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Bind the saver to the run, so that :func:`resume_from_latest` can find its checkpoints."""
        self._bind(args)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """``FIT_START``, with the counters of the checkpoint the Trainer resumed from."""
        if self._stopped or not self.driver.bound:
            self._bind(args)
        view = self._view
        per_epoch = _steps_per_epoch(kwargs.get("train_dataloader"), args)
        view.max_duration = Time(state.max_steps, TimeUnit.BATCH) if state.max_steps > 0 else None
        view.dataloader_len = per_epoch
        view.timestamp, view.previous_timestamp = self._start_timestamp(args, state, per_epoch), None
        view.callbacks = [cb.driver.saver for cb in _BOUND if cb._args is args]
        view.resumed_from = self.resumed_from
        self.driver.start(view)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """``BATCH_END`` and ``BATCH_CHECKPOINT``: count the step; with our interval, save when due."""
        view = self._view
        tokens = max(int(state.num_input_tokens_seen or 0) - view.timestamp.token, 0)
        view.advance_batch(_effective_batch(args), tokens, self.driver.batch_seconds())
        if view.timestamp.batch != state.global_step:
            view.timestamp = _with_batch(view.timestamp, state.global_step)
        self.driver.saver.batch_end(view)  # type: ignore[arg-type]
        return self._maybe_request(Event.BATCH_CHECKPOINT, control, kwargs.get("model"))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """``EPOCH_END`` and ``EPOCH_CHECKPOINT``."""
        view = self._view.advance_epoch()
        self.driver.saver.epoch_end(view)  # type: ignore[arg-type]
        return self._maybe_request(Event.EPOCH_CHECKPOINT, control, kwargs.get("model"))

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        """``EVAL_END``: the evaluation's metrics score the checkpoint of this step (``KeepBest``)."""
        if self.view is None or not metrics:
            return
        self.view.metrics, self.view.metrics_timestamp = dict(metrics), self.view.timestamp
        self.driver.saver.eval_end(self.view)  # type: ignore[arg-type]

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Commit the ``checkpoint-N`` folder the Trainer just wrote (or export the weights)."""
        if self.driver.saver.weights_only:
            if self.follow_trainer and self._claim(state.global_step):
                self._export(kwargs["model"])
            return
        if self.follow_trainer:
            if not self._claim(state.global_step):
                return
        elif self._requested != state.global_step:
            return  # the Trainer's own schedule, not ours: its folder stays its own
        self._requested = None
        source = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{state.global_step}"
        dist.barrier()  # every rank has written its part of the folder
        self.driver.save(self._view, FolderCheckpoint(source))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """``FIT_END``: wait until every checkpoint is durable and uploaded, then release resources."""
        try:
            self.driver.saver.fit_end(self._view)  # type: ignore[arg-type]
        finally:
            self.driver.saver.close()
            self._stopped = True
            if self._extracted is not None:
                remove_checkpoint(self._extracted)
                self._extracted = None

    # ------------------------------------------------------------------ helpers

    @property
    def _view(self) -> TrainerView:
        if self.view is None:
            raise RuntimeError("the CheckpointSaverCallback was not bound: pass it in Trainer(callbacks=[...])")
        return self.view

    def _bind(self, args: Any) -> None:
        self._args = args
        _BOUND.add(self)
        name = self.run_name or args.run_name or Path(os.path.abspath(args.output_dir)).name
        self.view = TrainerView(run_name=name)
        self.driver.bind(self.view)
        self._stopped = False

    def _manager(self) -> CheckpointManager:
        manager = self.driver.saver.manager
        if manager is None:
            raise RuntimeError(
                "the CheckpointSaverCallback is not bound yet: pass it in Trainer(callbacks=[...]) and build the "
                "Trainer before resume_from_latest()"
            )
        return manager

    def _start_timestamp(self, args: Any, state: Any, per_epoch: int | None) -> Timestamp:
        """Our counters when training starts: those saved in the checkpoint resumed from, else the
        Trainer's (epoch and step exact, samples estimated from the effective batch size)."""
        step = state.global_step
        # The Trainer's own rule: whole epochs are the steps done over the steps per epoch.
        epoch = step // per_epoch if per_epoch else int(math.floor(state.epoch + 1e-9))
        estimate = Timestamp(sample=step * _effective_batch(args), token=int(state.num_input_tokens_seen or 0))
        return resumed_timestamp(
            self._resume_timestamp or estimate, epoch=epoch, batch=step,
            batch_in_epoch=step - epoch * per_epoch if per_epoch else 0,
        )

    def _claim(self, batch: int) -> bool:
        """Take the checkpoint of ``batch`` unless this saver already took one there."""
        if batch == self.driver.saver.last_checkpoint_batch:
            return False
        self.driver.saver.last_checkpoint_batch = batch
        return True

    def _maybe_request(self, event: Event, control: Any, model: Any) -> Any:
        if self.follow_trainer or not self.driver.due(self._view, event):
            return control
        if self.driver.saver.weights_only:
            self._export(model)
        else:
            self._requested = self._view.timestamp.batch
            control.should_save = True
        return control

    def _export(self, model: Any) -> None:
        """Save the model's weights under our name (weights-only saver)."""
        self.driver.save(self._view, {"model": model.state_dict()})


def resume_from_latest(
    source: CheckpointSaverCallback | str | os.PathLike,
    *,
    storage_options: dict[str, Any] | None = None,
    dest: str | os.PathLike | None = None,
) -> str | None:
    """The folder to pass as ``trainer.train(resume_from_checkpoint=...)``: our newest checkpoint, extracted.

    Args:
        source: a :class:`CheckpointSaverCallback` already passed to the Trainer (its newest full
            checkpoint, local, else the one its remote ``latest`` pointer names, downloaded), or the
            location of one checkpoint: a local tar or folder, a ``latest`` link, a URI
            (``s3://bucket/runs/exp1/checkpoints/latest-rank0.tar.symlink``).
        storage_options: credentials and endpoint for a URI ``source``.
        dest: where to extract a tar bundle (or put a downloaded folder); default: a temp folder
            next to the saver's checkpoints, removed when training ends, or a new temp folder that
            the caller removes, for a location.

    Returns:
        The checkpoint folder, or None when the saver has no checkpoint yet (a fresh start).

    Raises:
        ConfigurationError: ``source`` is a weights-only saver (it cannot resume training).
        CheckpointNotFoundError: a location with nothing there.
        CorruptCheckpointError: a location that is not a readable checkpoint.

    Example:
        >>> trainer.train(resume_from_checkpoint=resume_from_latest(saver))  # doctest: +SKIP
    """
    if isinstance(source, CheckpointSaverCallback):
        return _resume_saver(source, None if dest is None else Path(dest))
    with local_checkpoint(source, storage_options=storage_options) as local:
        if local.is_dir() and dest is None and not is_uri(os.fspath(source)):
            return str(local)  # a local folder resumes as it is
        target = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="ckpt-callbacks-resume-"))
        remove_checkpoint(target)
        if local.is_dir():
            shutil.move(local, target)  # a download in a temp folder about to be removed
        else:
            extract(local, target)
    return str(target)


def _resume_saver(callback: CheckpointSaverCallback, dest: Path | None) -> str | None:
    if callback.driver.saver.weights_only:
        raise ConfigurationError(bad_value("source", "a full-state saver (weights_only=False)", callback))
    manager = callback._manager()
    found: tuple[str, str] | None = None
    if manager.writes:
        manager.reconcile()
        manager.fetch_from_store()
        found = _prepare_newest(manager, dest)
    # Rank 0 chose and extracted; the other ranks read the same folder (a shared disk, as the
    # Trainer's own output_dir is).
    found = dist.broadcast_object(found)
    if found is None:
        return None
    checkpoint, folder = found
    info = next((c for c in manager.all() if str(manager.path_of(c)) == checkpoint), None)
    callback.resumed_from = checkpoint
    callback._resume_timestamp = info.timestamp if info is not None else None
    if folder != checkpoint and dest is None and manager.writes:
        callback._extracted = Path(folder)
    return folder


def _prepare_newest(manager: CheckpointManager, dest: Path | None) -> tuple[str, str] | None:
    """(checkpoint, folder to resume from) of the newest full checkpoint that reads: a folder as it
    is, a tar extracted. A damaged one is set aside, as autoresume does, and the next one tried."""
    for info in reversed([c for c in manager.all() if not c.weights_only]):
        path = manager.path_of(info)
        if path.is_dir():
            return str(path), str(path)
        target = dest or temp_path_for(manager.folder / f"resume-{path.name}")
        remove_checkpoint(target)
        try:
            extract(path, target)
        except CorruptCheckpointError as error:
            remove_checkpoint(target)
            log.warning("resume: skipping the damaged checkpoint %s: %s", path, error)
            manager.set_aside(info, str(error))
            continue
        return str(path), str(target)
    return None


def _steps_per_epoch(train_dataloader: Any, args: Any) -> int | None:
    try:
        batches = len(train_dataloader)
    except TypeError:
        return None
    return math.ceil(batches / max(int(args.gradient_accumulation_steps), 1))


def _effective_batch(args: Any) -> int:
    return int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps) * int(args.world_size)


def _with_batch(timestamp: Timestamp, batch: int) -> Timestamp:
    """``timestamp`` with its step counter set to the Trainer's (they differ after a skipped step)."""
    state = timestamp.state_dict()
    state["batch_in_epoch"] = max(state["batch_in_epoch"] + batch - state["batch"], 0)
    state["batch"] = batch
    return Timestamp.from_state_dict(state)
