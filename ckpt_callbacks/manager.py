"""CheckpointManager: the save pipeline, usable from any training loop.

One save runs these steps, in this order, each a short method below::

    capture -> serialize + encode -> commit -> publish -> upload -> prune

*capture* builds the payload on the caller's thread (the only step that must block training);
the rest run on the manager's executor (inline for ``save_mode='sync'``). *serialize + encode*
streams ``torch.save`` through the codec chosen by the file name into a temp file that *commit*
fsyncs and renames onto the final name (:mod:`ckpt_callbacks.storage`). *publish* moves the
``latest`` link atomically and records the checkpoint in the saver's record. *upload* hands it to
the store (:mod:`ckpt_callbacks.remote.target`), if any. *prune* applies the
retention policy to everything the record holds, earlier runs included (Composer #2087), and never
deletes the checkpoint ``latest`` points at or the one this run resumed from while it has no newer
one. A crash at any point leaves the previous checkpoint and ``latest`` intact.

Example, without our Trainer or events::

    manager = CheckpointManager("runs/exp1", filename="ba{batch}.pt", num_checkpoints_to_keep=2)
    manager.start(Timestamp())
    for step in range(1, 1001):
        train_one_step()
        if step % 100 == 0:
            manager.save(Timestamp(batch=step), {"model": model.state_dict()})
    manager.close()
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


from ckpt_callbacks import dist
from ckpt_callbacks.capture import Captured, Capturer, Payload
from ckpt_callbacks.codecs import checkpoint_format
from ckpt_callbacks.disk_guard import check_free_space, named_failures
from ckpt_callbacks.errors import ConfigurationError, bad_value
from ckpt_callbacks.executors import executor_for
from ckpt_callbacks.folders import commit_folder
from ckpt_callbacks.layout import FOLDER_VARIABLES, Layout
from ckpt_callbacks.manager_store import StoreSide
from ckpt_callbacks.record import (
    CheckpointInfo, CheckpointRecord, folder_files, metric_values, metrics_at_save,
)
from ckpt_callbacks.remote.target import RemoteConfig, RemoteTarget
from ckpt_callbacks.retention import (
    RetentionPolicy, check_best_filename, find_best_policy, keeps_nothing, retention_from_arguments,
)
from ckpt_callbacks.serialization import check_ignore_keys, write_state
from ckpt_callbacks.sharded import write_sharded_checkpoint
from ckpt_callbacks.staging import StagingBuffers
from ckpt_callbacks.state import State
from ckpt_callbacks.storage import atomic_write, makedirs_durable, publish_latest, remove_checkpoint, resolve_latest
from ckpt_callbacks.temp_files import sweep_stale_temp_files
from ckpt_callbacks.time import Timestamp

__all__ = ["FOLDER_VARIABLES", "RANK_MODES", "CheckpointManager"]

log = logging.getLogger(__name__)

RANK_MODES = ("rank0", "per_rank", "sharded")


class CheckpointManager(StoreSide):
    """Writes, publishes, prunes and finds the checkpoints of one saver on one rank.

    Args:
        folder: where checkpoints go; may use ``{run_name}`` and the rank variables.
        filename: name template relative to ``folder`` (every format variable).
        latest_filename: template of the ``latest`` link relative to ``folder``; ``None`` for none.
        run_name: the value of ``{run_name}``.
        num_checkpoints_to_keep: ``-1`` all, ``0`` none, ``n`` the newest n (``KeepLast(n)``).
        retention: a retention policy instead of ``num_checkpoints_to_keep``.
        weights_only: save the model weights only.
        ignore_keys: globs (``'state/model/*'``) or a callable removing parts before saving.
        overwrite: if False, :meth:`start` refuses a folder holding later checkpoints of this template.
        compression_level: level for the codec the file name chooses (``None``: the codec's default).
        key: the identity of this saver (its callback state key); derived from the templates if None.
        latest_mode: ``'auto'`` (symlink, pointer file where symlinks are impossible), ``'symlink'``
            or ``'pointer'``.
        ranks: ``'rank0'`` (rank 0 writes the full state), ``'per_rank'`` (every rank writes its
            own file) or ``'sharded'`` (a DCP folder of every rank's shards).
        save_mode: ``'sync'`` (the steps after capture run on the caller's thread) or ``'async'``
            (on a background thread; only the capture blocks).
        best_filename: template of a ``best`` link (like ``latest``) to the best checkpoint by the
            metric of the :class:`~ckpt_callbacks.retention.KeepBest` in ``retention``; ``None`` for none.
        max_unuploaded: with a remote, how many checkpoints not yet in the store are protected from
            pruning (the newest ones); ``None``: all of them.

    Raises:
        ConfigurationError: any bad argument (see :class:`~ckpt_callbacks.saver.CheckpointSaver`).
    """

    def __init__(
        self,
        folder: str | os.PathLike = "{run_name}/checkpoints",
        filename: str | os.PathLike = "ep{epoch}-ba{batch}-rank{rank}.pt",
        latest_filename: str | os.PathLike | None = "latest-rank{rank}.pt",
        *,
        run_name: str = "",
        num_checkpoints_to_keep: int = -1,
        retention: RetentionPolicy | None = None,
        weights_only: bool = False,
        ignore_keys: Sequence[str] | Callable[[dict], None] | None = None,
        overwrite: bool = False,
        compression_level: int | None = None,
        key: str | None = None,
        latest_mode: str = "auto",
        ranks: str = "rank0",
        save_mode: str = "sync",
        best_filename: str | os.PathLike | None = None,
        remote: RemoteConfig | None = None,
        max_unuploaded: int | None = None,
    ) -> None:
        self.retention = retention_from_arguments(num_checkpoints_to_keep, retention)
        self.rank_info = dist.dist_info()
        self.layout = Layout(
            folder, filename, latest_filename, check_best_filename(best_filename, self.retention),
            run_name=run_name, rank_info=self.rank_info,
        )
        self.folder, self.filename = self.layout.folder, self.layout.filename
        self.format = checkpoint_format(self.filename.template, argument="filename")
        self.weights_only = bool(weights_only)
        self.ignore_keys = check_ignore_keys(ignore_keys)
        self.overwrite = bool(overwrite)
        self.compression_level = compression_level
        self.latest_mode = latest_mode
        if ranks not in RANK_MODES:
            raise ConfigurationError(bad_value("ranks", "'rank0', 'per_rank' or 'sharded'", ranks))
        self.ranks = ranks
        self.run_name = run_name
        self.key = key or "CheckpointManager-" + _digest(self.layout.folder_template.template, self.filename.template)
        # One record per saver and run: runs sharing a folder never see (or prune) each other's files.
        record_name = f".ckpt-record-{_digest(self.key, run_name)}-rank{self.rank_info.rank}.json"
        self.record = CheckpointRecord.load(self.folder / record_name)
        self._executor = executor_for(save_mode)
        self.capturer = Capturer(
            key=self.key, run_name=run_name, rank_info=self.rank_info, ranks=ranks, weights_only=self.weights_only,
            ignore_keys=self.ignore_keys, layout=self.layout, staging=StagingBuffers() if save_mode == "async" else None,
        )
        self._in_flight: Future | None = None
        self._resumed_from: str | None = None
        self._remembered: list[CheckpointInfo] = []
        self._lock = threading.RLock()
        self.remote_config = remote
        self.remote: RemoteTarget | None = None
        self.max_unuploaded = max_unuploaded

    @property
    def writes(self) -> bool:
        """Whether this rank commits checkpoints and keeps a record: every rank in ``'per_rank'``
        mode, rank 0 otherwise (in ``'sharded'`` mode every rank writes shards, rank 0 commits)."""
        return self.ranks == "per_rank" or self.rank_info.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether checkpoints are DCP folders of shards (``ranks='sharded'``)."""
        return self.ranks == "sharded"

    # ------------------------------------------------------------------ lifecycle

    def start(self, timestamp: Timestamp, *, resumed_from: str | os.PathLike | None = None) -> None:
        """Prepare for saving at ``timestamp``: sweep our stale temp files, reconcile the record
        with the folder, check for conflicts (``overwrite=False``) and begin a new lineage.

        Raises:
            CheckpointExistsError: ``overwrite=False`` and the folder holds checkpoints of this
                template with later counters than ``timestamp``.
        """
        if self.remote_config is not None and self.remote is None:
            self.remote = self._open_remote()
            self.remote.probe()
        if not self.writes:
            return
        with named_failures(self.folder, doing="preparing"):  # a read-only folder fails before training
            makedirs_durable(self.folder)
            sweep_stale_temp_files(self.folder)
            self.reconcile()
            if not self.overwrite:
                # A resumed run continues this saver's own lineage: what it recorded is not a conflict
                # (an export saved after a batch checkpoint may carry a later epoch than the resume point).
                ours = {c.name for c in self.record.checkpoints} if resumed_from is not None else set()
                self.layout.check_conflicts(timestamp, ignore=ours)
            self._resumed_from = None if resumed_from is None else self.layout.relative(Path(resumed_from))
            self.record.start_lineage(self._resumed_from)
            self.record.save()
        self._reupload_stranded()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the save in flight is durable and raise its error if it failed (TimeoutError
        after ``timeout`` seconds, the save staying in flight)."""
        in_flight = self._in_flight
        if in_flight is None:
            return
        in_flight.exception(timeout)
        self._in_flight = None
        in_flight.result()

    def raise_if_failed(self) -> None:
        """Raise the error of a background save that has finished with one (async mode); never blocks."""
        if self._in_flight is not None and self._in_flight.done():
            self.wait()

    def close(self) -> None:
        """Wait for the save in flight, drain uploads (bounded by ``shutdown_timeout``), and stop."""
        try:
            self.wait()
        finally:
            self._executor.shutdown()
            if self.remote is not None:
                not_uploaded = self.remote.close()
                if not_uploaded:
                    log.error("these checkpoints were not uploaded (their local files remain): %s", not_uploaded)

    # ------------------------------------------------------------------ queries

    def all(self) -> list[CheckpointInfo]:
        """Every checkpoint of this saver that is on disk, oldest first (by save sequence)."""
        return [c for c in self.record.checkpoints if (self.folder / c.name).exists()]

    def latest(self) -> CheckpointInfo | None:
        """The newest checkpoint: the last committed in the newest lineage."""
        committed = self.all()
        return committed[-1] if committed else None

    def path_of(self, info: CheckpointInfo) -> Path:
        """Where ``info`` lives on disk."""
        return self.folder / info.name

    def load_latest(self, state: State, **load_options: Any) -> CheckpointInfo | None:
        """Load the newest checkpoint into ``state``; None when there is none."""
        from ckpt_callbacks.loader import load_checkpoint

        info = self.latest()
        if info is not None:
            load_checkpoint(self.path_of(info), state, **load_options)
        return info

    def set_aside(self, info: CheckpointInfo, reason: str, *, suffix: str = ".corrupt") -> Path:
        """Rename a checkpoint that cannot be resumed out of the template's way and forget it."""
        path = self.path_of(info)
        aside = path.with_name(path.name + suffix)
        os.replace(path, aside)
        log.warning("set aside %s as %s: %s", path, aside, reason)
        self.record.remove(info.name)
        self.record.save()
        return aside

    def republish(self, info: CheckpointInfo) -> None:
        """Point ``latest`` at ``info`` (repairing it after a crash or a set-aside)."""
        link = self.layout.latest_path(info.timestamp)
        if link is not None:
            publish_latest(link, self.path_of(info), mode=self.latest_mode)

    # ------------------------------------------------------------------ the pipeline

    def save(
        self, timestamp: Timestamp, state: Payload, *, score: float | Mapping[str, float] | None = None
    ) -> Future:
        """Save ``state`` as of ``timestamp``; returns a future of the :class:`CheckpointInfo`.

        The checkpoint is recorded with the state's metrics if they were measured at its batch, plus
        ``score`` (a number is the metric ``'score'``, a dict adds metrics by name), for ``KeepBest``.

        ``state`` is a :class:`State` (full or weights-only checkpoint, as configured), a plain
        dict saved as the checkpoint's ``state``, or a trainer's own checkpoint
        (:class:`~ckpt_callbacks.capture.NativeCheckpoint`, :class:`~ckpt_callbacks.capture.FolderCheckpoint`).
        Every rank calls this; ranks that write nothing
        get ``None``. In sync mode the future is already done. If any rank fails, every rank's
        future raises the same :class:`~ckpt_callbacks.errors.CheckpointError` naming it.
        """
        waited = time.perf_counter()
        self.wait()
        started = time.perf_counter()
        if started - waited > 0.01:
            log.info("waited %.3f s for the previous save to finish (back-pressure)", started - waited)
        metrics = metrics_at_save(state, timestamp, score)
        captured = self.capturer.capture(state, timestamp, self.record, self.callback_state)
        job = functools.partial(self._write_everywhere, captured, timestamp, metrics, started)
        self._in_flight = self._executor.submit(job)
        return self._in_flight

    def _write_everywhere(
        self, captured: Captured, timestamp: Timestamp, metrics: dict[str, float], started: float
    ) -> CheckpointInfo | None:
        """Write this rank's part, then agree with every rank that all parts were written."""
        info, error = None, None
        try:
            info = self._write(captured, timestamp, metrics, started)
        except Exception as failure:  # noqa: BLE001 -- reported to every rank, then raised
            error = failure
        finally:
            if captured.spill is not None:
                captured.spill.cleanup()
            if captured.folder is not None:
                remove_checkpoint(captured.folder)  # gone already once committed
        dist.raise_if_any_failed(error, action=f"saving the checkpoint at {timestamp}")
        return info

    def _write(
        self, captured: Captured, timestamp: Timestamp, metrics: dict[str, float], started: float
    ) -> CheckpointInfo | None:
        checkpoint = captured.checkpoint
        name = self.layout.name(timestamp)
        path = self.folder / name
        previous = self.record.newest() if self.writes else None
        if previous is not None and previous.size:
            check_free_space(path, previous.size, previous.name)  # before any byte is written
        if captured.folder is not None:
            size = commit_folder(captured.folder, path, self.format, self.compression_level)
        elif self.sharded:
            size = write_sharded_checkpoint(path, captured.tensors, checkpoint, self._write_file)
        elif checkpoint is not None:
            size = self._write_file(path, checkpoint)
        if checkpoint is None and captured.folder is None:
            if self.remote is not None and captured.tensors is not None:
                self.remote.upload(None, path, timestamp, {})
            return None
        metadata = captured.metadata
        info = CheckpointInfo(
            seq=metadata.get("save_sequence", self.record.next_seq - 1),
            name=name,
            timestamp=timestamp,
            lineage=self.record.lineage.id if self.record.lineage else "",
            size=size,
            saved_at=time.time(),
            weights_only=self.weights_only,
            files=folder_files(path, self.folder) if path.is_dir() else (name,),
            metrics=metrics,
        )
        stall = time.perf_counter() - started
        with self._lock, named_failures(path, doing="publishing"):  # committed: only latest, record lag
            self._publish(info)
        if self.remote is not None:
            self.remote.upload(info, path, timestamp, self._manifest_metadata(info))
        with self._lock:
            self._prune()
            self._publish_best()
        log.info(
            "saved %s: %d bytes, stall %.3f s, durable after %.3f s",
            path, info.size, stall, time.perf_counter() - started,
        )
        return info

    def _write_file(self, path: Path, checkpoint: dict[str, Any]) -> int:
        """Serialize, encode and commit one checkpoint file; returns its size (a failure is a
        CheckpointError naming the file and the cause, e.g. a full disk, that torch.save reports
        as a RuntimeError)."""
        with named_failures(path):
            makedirs_durable(path.parent)
            with atomic_write(path, payload=True) as target:
                write_state(checkpoint, target.file, self.format, self.compression_level)
        return target.size

    def _publish(self, info: CheckpointInfo) -> None:
        if not keeps_nothing(self.retention):
            self.republish(info)
        self.record.add(info)
        self.record.save()

    def best(self) -> CheckpointInfo | None:
        """The best checkpoint on disk by the retention's ``KeepBest`` metric (None: no KeepBest, no score)."""
        policy = find_best_policy(self.retention)
        return None if policy is None else policy.best(self.all())

    def update_metrics(self, metrics: Mapping[str, float], timestamp: Timestamp | None = None) -> list[CheckpointInfo]:
        """Score checkpoints with metrics that arrived after they were saved (a later evaluation).

        This run's checkpoints saved at ``timestamp``'s batch (default: the newest checkpoint) get the
        metrics they lack; then the record is saved, retention applied again and ``best`` moved.
        Returns the checkpoints that were scored.
        """
        self.wait()
        if not self.writes:
            return []
        scored = self.record.add_metrics(metric_values(metrics), batch=None if timestamp is None else timestamp.batch)
        if scored:
            self.record.save()
            self._prune()
            self._publish_best()
        return scored

    def _publish_best(self) -> None:
        link = self.layout.best_path()
        best = self.best() if link is not None else None
        if best is None:
            return
        if resolve_latest(link) != Path(os.path.normpath(self.path_of(best))):
            publish_latest(link, self.path_of(best), mode=self.latest_mode)

    def _prune(self) -> None:
        checkpoints = self.record.checkpoints
        keep = self.retention.keep(checkpoints) | self._protected()
        for info in [c for c in checkpoints if c.seq not in keep]:
            remove_checkpoint(self.path_of(info))
            self.record.remove(info.name)
            early = self.remote is not None and not info.uploaded  # beyond max_unuploaded_checkpoints
            log.log(logging.WARNING if early else logging.INFO, "pruned %s%s", self.path_of(info),
                    " before the store confirmed it: too many wait for the store" if early else "")
        if len(keep) != len(checkpoints):
            self.record.save()

    # ------------------------------------------------------------------ helpers

    def _protected(self) -> set[int]:
        waiting = [c for c in self.record.checkpoints if self.remote is not None and not c.uploaded]
        if self.max_unuploaded is not None:
            # on_upload_error='warn': a dead store must not fill the disk; older ones fall to retention.
            waiting = waiting[-self.max_unuploaded:]
        protected = {c.seq for c in waiting}
        newest = self.record.newest()
        if newest is not None and not keeps_nothing(self.retention):
            protected.add(newest.seq)
        lineage = self.record.lineage
        if self._resumed_from and lineage and not any(c.lineage == lineage.id for c in self.record.checkpoints):
            resumed = self.record.find(self._resumed_from)
            if resumed is not None:
                protected.add(resumed.seq)
        return protected

    def callback_state(self, pending: CheckpointInfo | None = None) -> dict[str, Any]:
        """The saver's callback state: its record, plus ``pending`` (a checkpoint lists itself, as in Composer)."""
        return self.record.callback_state(self.folder, pending)

    def remember(self, callback_state: Mapping[str, Any]) -> None:
        """Take the record entries stored in a resumed checkpoint's callback state (merged at :meth:`start`)."""
        self._remembered = [CheckpointInfo.from_json(item) for item in callback_state.get("checkpoints", [])]

    def reconcile(self) -> None:
        """Bring the record in line with the disk: forget vanished files, adopt our unrecorded ones."""
        self.record.reconcile(
            self.folder, self.filename, self.layout.fixed, saver=self.key, run_name=self.run_name, remembered=self._remembered
        )

def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:10]
