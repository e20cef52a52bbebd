"""CheckpointSaver: a callback that decides when to save and hands the save to a CheckpointManager.

The saver adds only the first pipeline step, *decide*: at ``BATCH_CHECKPOINT`` and
``EPOCH_CHECKPOINT`` its save policy (:mod:`ckpt_callbacks.intervals`) says whether a checkpoint is
due; rank 0 decides and broadcasts (:func:`ckpt_callbacks.dist.decide`), and a batch is never saved
twice. Everything after that is :class:`~ckpt_callbacks.manager.CheckpointManager`'s job.

All arguments are checked here, at construction, so a bad one fails before training starts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from typing import Any, Callable, Mapping, Sequence

from ckpt_callbacks import dist
from ckpt_callbacks.codecs import checkpoint_format
from ckpt_callbacks.errors import CheckpointError, ConfigurationError, InvalidTemplateError, bad_value
from ckpt_callbacks.events import Callback, Event
from ckpt_callbacks.intervals import create_save_policy
from ckpt_callbacks.layout import FOLDER_VARIABLES
from ckpt_callbacks.manager import RANK_MODES, CheckpointManager
from ckpt_callbacks.naming import NameTemplate
from ckpt_callbacks.preemption import WATCH, check_signals, checkpoint_and_hand_over
from ckpt_callbacks.remote.target import RemoteConfig
from ckpt_callbacks.retention import RetentionPolicy, check_best_filename, retention_from_arguments
from ckpt_callbacks.saver_args import (
    FAILURE_MODES, check_bool, check_failure_modes, check_level, check_shutdown_timeout, check_uploads, staging_folder,
)
from ckpt_callbacks.serialization import check_ignore_keys
from ckpt_callbacks.state import State
from ckpt_callbacks.time import Time

__all__ = ["CheckpointSaver"]

SAVE_MODES = ("sync", "async")
UPLOAD_ERROR_MODES = FAILURE_MODES


class CheckpointSaver(Callback):
    """Save checkpoints at intervals during training.

    Pass it in a trainer's ``callbacks`` list. Arguments follow Composer's ``CheckpointSaver``
    (the first six, positional) and add keyword-only ones.

    Args:
        folder: local folder of the checkpoints; may use ``{run_name}`` and the rank variables
            (``{rank}``, ``{local_rank}``, ``{world_size}``, ``{local_world_size}``, ``{node_rank}``).
        filename: name template relative to ``folder``, with every format variable:
            ``{run_name}``, the rank variables, ``{epoch}``, ``{batch}``, ``{batch_in_epoch}``,
            ``{sample}``, ``{sample_in_epoch}``, ``{token}``, ``{token_in_epoch}``,
            ``{total_wct}``, ``{epoch_wct}``, ``{batch_wct}``; format specs work (``{epoch:03d}``).
            The extension chooses the format: ``.pt`` plain; ``.pt.zst``, ``.pt.lz4``, ``.pt.gz``,
            ``.pt.bz2``, ``.pt.xz``, ``.pt.lzma`` compressed; ``.tar``, ``.tgz``, ``.tar.gz``, ``.tar.bz2``,
            ``.tar.xz``, ``.tar.lzma``, ``.tar.zst``, ``.tar.lz4`` bundles; ``.safetensors`` (weights only).
        remote_file_name: object key template under ``remote`` (every format variable); default
            ``folder/filename`` for a relative folder (Composer's default key), else ``filename``.
        latest_filename: template of the ``latest`` symlink relative to ``folder``; ``None``
            for none.
        latest_remote_file_name: key of the remote ``latest`` pointer, to which ``.symlink`` is
            appended (Composer's convention); default ``folder/latest_filename`` like ``remote_file_name``.
        save_interval: ``'1ep'``, ``'500ba'``, ``'64sp'``, ``'1000tok'``, ``'0.25dur'``, ``'30m'``,
            an int (epochs), a :class:`~ckpt_callbacks.time.Time`, or a callable
            ``(state, event) -> bool``. Non-callables also save at the end of training; ``0``
            disables saving.
        overwrite: if False, refuse at fit start to run in a folder that holds checkpoints of this
            template with later counters than the current time.
        num_checkpoints_to_keep: ``-1`` keeps all local checkpoints, ``0`` none, ``n`` the newest n
            (also those written by earlier runs of this saver).
        weights_only: save the model weights only.
        ignore_keys: globs (``'state/model/*'``, ``'rng'``) or a callable removing parts before
            saving.
        num_concurrent_uploads: files uploaded at once (each large file also sends parts concurrently).
        upload_timeout_in_seconds: a real deadline per upload, counted from its first attempt and
            covering every retry.
        remote: an fsspec URL prefix to upload to (``s3://bucket/prefix``, ``file:///mnt/ckpt``,
            ``memory://x``); ``None`` for none. A URI ``folder`` is the same, with local staging in a
            temp folder removed at close.
        storage_options: credentials and endpoint of the object store (``endpoint_url``, ``key``,
            ``secret``, ``region_name``, ...); the environment works too (see the remote docs).
        save_mode: ``'sync'`` or ``'async'`` (only the capture blocks training).
        compression_level: level of the codec the extension chooses (``None``: its default).
        ranks: ``'rank0'`` (rank 0 writes the full, replicated state: DDP), ``'per_rank'`` (every
            rank writes its own file; ``{rank}`` is required in the names when several ranks write) or
            ``'sharded'`` (a ``torch.distributed.checkpoint`` folder of every rank's shards: FSDP2 and
            other DTensor models; reshardable on resume).
        retention: a retention policy instead of ``num_checkpoints_to_keep``: ``KeepLast``,
            ``KeepBest``, ``KeepEvery``, ``KeepWithin`` or ``KeepAny`` of them
            (:mod:`ckpt_callbacks.retention`). A checkpoint is deleted only when no policy keeps it.
        remote_retention: a retention policy for checkpoints in the store (``None`` keeps every
            object, as Composer does); never deletes the one a pointer names.
        on_upload_error: ``'raise'`` (the next event raises the :class:`~ckpt_callbacks.errors.UploadError`)
            or ``'warn'``.
        best_filename: template of a ``best`` link relative to ``folder`` (run and rank variables
            only), moved atomically like ``latest`` to the best checkpoint by the metric of the
            ``KeepBest`` in ``retention``; ``None`` (default) for none.
        shutdown_timeout: at close or an abnormal exit, how long to keep draining uploads before
            reporting which checkpoints were not uploaded; also the bound on the save and the drain
            after a watched signal.
        save_on_signals: signals announcing preemption, e.g. ``('SIGTERM', 'SIGUSR1')``: at the end of
            the batch in progress a checkpoint is saved and uploads drained, then the signal is
            handed to its previous handler (:mod:`ckpt_callbacks.preemption`). Empty (default): none.
        on_save_error: ``'raise'`` (a failed save, e.g. a full disk, stops training with its
            :class:`~ckpt_callbacks.errors.CheckpointError`) or ``'warn'`` (training goes on; the
            previous checkpoint and ``latest`` stay as they were).
        max_unuploaded_checkpoints: with ``on_upload_error='warn'``, how many checkpoints not yet in
            the store are kept beyond the retention policy (older ones are pruned with a warning,
            so a dead store cannot fill the disk); ``None``: no cap.

    Raises:
        ConfigurationError: a bad argument, naming it, its value and what is accepted.

    Example:
        >>> saver = CheckpointSaver(folder="{run_name}/checkpoints", filename="ep{epoch}-ba{batch}.pt",
        ...                         save_interval="500ba", num_checkpoints_to_keep=2)
        >>> saver.save_interval
        AnyOf([EveryInterval(Time('500ba')), AtEndOfTraining()])
    """

    def __init__(
        self,
        folder: str | os.PathLike = "{run_name}/checkpoints",
        filename: str | os.PathLike = "ep{epoch}-ba{batch}-rank{rank}.pt",
        remote_file_name: str | os.PathLike | None = None,
        latest_filename: str | os.PathLike | None = "latest-rank{rank}.pt",
        latest_remote_file_name: str | os.PathLike | None = None,
        save_interval: str | int | Time | Callable[[State, Event], bool] = "1ep",
        *,
        overwrite: bool = False,
        num_checkpoints_to_keep: int = -1,
        weights_only: bool = False,
        ignore_keys: Sequence[str] | Callable[[dict], None] | None = None,
        num_concurrent_uploads: int = 1,
        upload_timeout_in_seconds: float = 3600,
        remote: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        save_mode: str = "sync",
        compression_level: int | None = None,
        ranks: str = "rank0",
        retention: RetentionPolicy | None = None,
        remote_retention: RetentionPolicy | None = None,
        on_upload_error: str = "raise",
        best_filename: str | os.PathLike | None = None,
        shutdown_timeout: float = 300,
        save_on_signals: Sequence[str | int] = (),
        on_save_error: str = "raise",
        max_unuploaded_checkpoints: int | None = 8,
    ) -> None:
        folder, remote, self._staging = staging_folder(folder, remote)
        self.folder = NameTemplate(folder, argument="folder", allowed=FOLDER_VARIABLES, relative=False)
        self.filename = NameTemplate(filename, argument="filename")
        self.format = checkpoint_format(self.filename.template, argument="filename")
        self.latest_filename = (
            None if latest_filename is None else NameTemplate(latest_filename, argument="latest_filename")
        )
        self.save_interval = create_save_policy(save_interval)
        self.retention = retention_from_arguments(num_checkpoints_to_keep, retention)
        self.best_filename = check_best_filename(best_filename, self.retention)
        if self.best_filename and self.latest_filename and self.best_filename.template == self.latest_filename.template:
            raise ConfigurationError(bad_value("best_filename", "a name other than latest_filename", best_filename))
        self.ignore_keys = check_ignore_keys(ignore_keys)
        self.weights_only = check_bool("weights_only", weights_only)
        if self.format.tensors_only and not self.weights_only:
            raise ConfigurationError(bad_value(
                "weights_only", f"True for filename={self.filename.template!r}: "
                f"{self.format.extension} holds tensors only, not a training state", weights_only,
            ))  # fmt: skip
        self.overwrite = check_bool("overwrite", overwrite)
        check_uploads(num_concurrent_uploads, upload_timeout_in_seconds, storage_options, on_upload_error)
        shutdown_timeout = check_shutdown_timeout(shutdown_timeout)
        self.remote = self._remote_config(
            remote, remote_file_name, latest_remote_file_name, storage_options, remote_retention,
            num_concurrent_uploads=num_concurrent_uploads, upload_timeout=float(upload_timeout_in_seconds),
            shutdown_timeout=float(shutdown_timeout),
        )
        self.on_upload_error = on_upload_error
        self.shutdown_timeout = float(shutdown_timeout)
        self.save_on_signals = check_signals(save_on_signals)
        check_failure_modes(on_save_error, max_unuploaded_checkpoints)
        self.on_save_error = on_save_error
        self.max_unuploaded_checkpoints = max_unuploaded_checkpoints
        if save_mode not in SAVE_MODES:
            raise ConfigurationError(bad_value("save_mode", "'sync' or 'async'", save_mode))
        if ranks not in RANK_MODES:
            raise ConfigurationError(bad_value("ranks", "'rank0', 'per_rank' or 'sharded'", ranks))
        self.compression_level = check_level(compression_level, self.format.codec)
        if not self.filename.has_counter:
            warnings.warn(
                f"filename={self.filename.template!r} has no counter variable ({{epoch}}, {{batch}}, ...): "
                "every save overwrites the previous checkpoint",
                UserWarning,
                stacklevel=2,
            )
        self.save_mode = save_mode
        self.ranks = ranks
        self.manager: CheckpointManager | None = None
        self.last_checkpoint_batch: int | None = None
        self._resumed_state: Mapping[str, Any] | None = None

    @property
    def state_key(self) -> str:
        """``CheckpointSaver-<digest of folder and filename>``: two savers in one run never collide."""
        digest = hashlib.sha256(f"{self.folder.template}\0{self.filename.template}".encode()).hexdigest()[:10]
        return f"{type(self).__qualname__}-{digest}"

    @property
    def saved_checkpoints(self) -> list[str]:
        """Paths of the checkpoints this run saved that are still on disk, oldest first (empty on
        ranks that write nothing, as in Composer)."""
        if self.manager is None or not self.manager.writes or self.manager.record.lineage is None:
            return []
        lineage = self.manager.record.lineage.id
        return [str(self.manager.path_of(c)) for c in self.manager.all() if c.lineage == lineage]

    # ------------------------------------------------------------------ events

    def init(self, state: State) -> None:
        """Bind the saver to the run: format the folder with the run name and ranks."""
        self.manager = CheckpointManager(
            self.folder.template,
            self.filename.template,
            None if self.latest_filename is None else self.latest_filename.template,
            run_name=state.run_name,
            retention=self.retention,
            weights_only=self.weights_only,
            ignore_keys=self.ignore_keys,
            overwrite=self.overwrite,
            compression_level=self.compression_level,
            key=self.state_key,
            ranks=self.ranks,
            best_filename=None if self.best_filename is None else self.best_filename.template,
            remote=self.remote,
            save_mode=self.save_mode,
            max_unuploaded=self.max_unuploaded_checkpoints if self.on_upload_error == "warn" else None,
        )
        if self._resumed_state is not None:
            self.manager.remember(self._resumed_state)

    def fit_start(self, state: State) -> None:
        """Refuse colliding savers and per-rank names without ``{rank}``, then prepare the folder
        (sweep, reconcile, overwrite check). A failure on any rank is raised on every rank."""
        self._check_no_collision(state)
        self.last_checkpoint_batch = None
        error = None
        try:
            self._check_rank_in_names()
            self._manager.start(state.timestamp, resumed_from=state.resumed_from)
            WATCH.watch(self, self.save_on_signals)
        except Exception as failure:  # noqa: BLE001 -- reported to every rank, then raised
            error = failure
        dist.raise_if_any_failed(error, action=f"preparing {self._manager.folder} for {self.filename.template!r}")

    def batch_checkpoint(self, state: State) -> None:
        """Save if the policy says so at ``BATCH_CHECKPOINT``."""
        self._maybe_save(state, Event.BATCH_CHECKPOINT)

    def epoch_checkpoint(self, state: State) -> None:
        """Save if the policy says so at ``EPOCH_CHECKPOINT``."""
        self._maybe_save(state, Event.EPOCH_CHECKPOINT)

    def eval_end(self, state: State) -> None:
        """Score the checkpoint saved at the evaluated step, if it was saved before the metrics existed."""
        self._manager.update_metrics(state.metrics, state.metrics_timestamp or state.timestamp)

    def batch_end(self, state: State) -> None:
        """Raise the error of a failed background save; report upload failures (``on_upload_error``)."""
        self._report_upload_errors()

    def epoch_end(self, state: State) -> None:
        """Raise the error of a failed background save; report upload failures (``on_upload_error``)."""
        self._report_upload_errors()

    def fit_end(self, state: State) -> None:
        """Wait until every checkpoint is durable, locally and in the store, and report failures."""
        try:
            self._manager.wait()
        except CheckpointError as error:
            self._tolerate(error)
        self._manager.wait_uploads()
        self._report_upload_errors()

    def close(self) -> None:
        """Finish the save in flight, drain uploads (bounded by ``shutdown_timeout``), release resources."""
        try:
            if self.manager is not None:
                self.manager.close()
        finally:
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)
            WATCH.unwatch(self)  # the last watcher hands over a signal that came after the last batch

    def state_dict(self) -> dict[str, Any]:
        """The saver's record, so a resumed run knows (and prunes) what earlier runs saved."""
        return self.manager.callback_state() if self.manager is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the record stored in a resumed checkpoint."""
        self._resumed_state = state
        if self.manager is not None:
            self.manager.remember(state)

    # ------------------------------------------------------------------ helpers

    def _remote_config(
        self, remote: str | None, remote_file_name: Any, latest_remote_file_name: Any,
        storage_options: Mapping[str, Any] | None, remote_retention: RetentionPolicy | None, **options: Any,
    ) -> RemoteConfig | None:
        if remote is None:
            for argument, value in (("remote_file_name", remote_file_name),
                                    ("latest_remote_file_name", latest_remote_file_name),
                                    ("remote_retention", remote_retention)):
                if value is not None:
                    raise ConfigurationError(bad_value(argument, "None unless 'remote' is given", value))
            return None
        retention = None if remote_retention is None else retention_from_arguments(-1, remote_retention)
        return RemoteConfig.from_arguments(
            remote, folder=self.folder, filename=self.filename, latest_filename=self.latest_filename,
            remote_file_name=remote_file_name, latest_remote_file_name=latest_remote_file_name,
            staging=self._staging is not None, storage_options=dict(storage_options or {}), retention=retention,
            **options,
        )

    def _report_upload_errors(self) -> None:
        """Raise a failed background save, then report upload failures (``on_upload_error``)."""
        if self.manager is None:
            return
        try:
            self.manager.raise_if_failed()
        except CheckpointError as error:
            self._tolerate(error)
        for error in self.manager.upload_errors():
            if self.on_upload_error == "raise":
                raise error
            warnings.warn(f"checkpoint upload failed: {error}", UserWarning, stacklevel=3)

    @property
    def _manager(self) -> CheckpointManager:
        if self.manager is None:
            raise RuntimeError("the CheckpointSaver was not initialised: the trainer must fire Event.INIT first")
        return self.manager

    def _maybe_save(self, state: State, event: Event) -> None:
        batch = state.timestamp.batch
        fresh = batch != self.last_checkpoint_batch
        if not fresh and not self.save_on_signals:
            return
        # One broadcast answers both questions: rank 0's interval and the signal rank 0 received.
        signum, due = dist.decide(
            lambda: (WATCH.requested(self), fresh and bool(self.save_interval.should_save(state, event)))
        )
        if fresh and (due or signum is not None):
            self.last_checkpoint_batch = batch
            try:
                self._manager.save(state.timestamp, state)
                if self.save_mode == "sync":
                    self._manager.wait()
            except CheckpointError as error:
                self._tolerate(error)
            if signum is None and self.save_on_signals:  # a signal that came during this save
                signum = dist.decide(lambda: WATCH.requested(self))
        if signum is not None:
            waits = (self._manager.wait, self._manager.wait_uploads)
            checkpoint_and_hand_over(self, signum, waits, self.shutdown_timeout)

    def _tolerate(self, error: CheckpointError) -> None:
        """Raise a failed save's error, unless ``on_save_error='warn'`` (configuration errors always raise)."""
        if self.on_save_error == "raise" or isinstance(error, ConfigurationError):
            raise error
        warnings.warn(f"saving a checkpoint failed; training goes on (on_save_error='warn'): {error}",
                      UserWarning, stacklevel=4)

    def _check_rank_in_names(self) -> None:
        """Several ranks writing under one name would overwrite each other's files."""
        if self.ranks != "per_rank" or dist.dist_info().world_size == 1:
            return
        for template in (self.filename, self.latest_filename):
            if template is not None and "rank" not in template.variables:
                raise InvalidTemplateError(
                    bad_value(
                        template.argument,
                        f"a template with '{{rank}}' when ranks='per_rank' and {dist.dist_info().world_size} ranks write",
                        template.template,
                    )
                )

    def _check_no_collision(self, state: State) -> None:
        for other in state.callbacks:
            if other is self or not isinstance(other, CheckpointSaver) or other.manager is None:
                continue
            mine, theirs = self._manager, other.manager
            if mine.folder.resolve() != theirs.folder.resolve():
                continue
            if self.filename.template == other.filename.template:
                raise ConfigurationError(
                    f"two CheckpointSavers write {self.filename.template!r} in {mine.folder}: "
                    "give them different folders or filenames"
                )
            if self.latest_filename and other.latest_filename and (
                self.latest_filename.template == other.latest_filename.template
            ):
                raise ConfigurationError(
                    f"two CheckpointSavers in {mine.folder} share latest_filename="
                    f"{self.latest_filename.template!r}: give one another latest_filename (or None)"
                )
            if self.best_filename and self.best_filename.template in {
                link.template for link in (other.latest_filename, other.best_filename) if link
            }:
                raise ConfigurationError(
                    f"two CheckpointSavers in {mine.folder} use the link {self.best_filename.template!r}: "
                    "give one another best_filename"
                )

