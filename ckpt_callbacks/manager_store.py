"""The object-store side of :class:`~ckpt_callbacks.manager.CheckpointManager`: step 7 of the pipeline.

The manager hands each committed checkpoint to its :class:`~ckpt_callbacks.remote.target.RemoteTarget`
(upload, manifest, pointer); the target calls back here once a checkpoint is confirmed in the store, so
that the record marks it uploaded and local pruning may delete it. At start, checkpoints that a crash
left committed locally but not uploaded are handed over again; before autoresume, the checkpoint the
store's pointer names is fetched when none is on disk. Kept apart from the manager's local pipeline
so each module stays one job of a readable size.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from ckpt_callbacks.record import CheckpointInfo
from ckpt_callbacks.remote.target import RemoteTarget
from ckpt_callbacks.storage import makedirs_durable

if TYPE_CHECKING:
    from ckpt_callbacks.manager import CheckpointManager

__all__ = ["StoreSide"]

log = logging.getLogger(__name__)


class StoreSide:
    """The manager's methods that talk to the object store (mixed into ``CheckpointManager``).

    Example:
        >>> manager.fetch_from_store(); manager.wait_uploads()  # doctest: +SKIP
    """

    def _open_remote(self: CheckpointManager) -> RemoteTarget:
        return RemoteTarget(
            self.remote_config, fixed=self.layout.fixed, rank_info=self.rank_info, ranks=self.ranks,
            overwrite=self.overwrite, saver=self.key, run_name=self.run_name, on_confirmed=self._confirmed,
        )

    def _manifest_metadata(self: CheckpointManager, info: CheckpointInfo) -> dict[str, Any]:
        return {
            "saver": self.key, "run_name": self.run_name, "save_sequence": info.seq,
            "timestamp": info.timestamp.state_dict(), "lineage": info.lineage, "saved_at": info.saved_at,
            "weights_only": info.weights_only, "ranks": self.ranks, "world_size": self.rank_info.world_size,
        }

    def _confirmed(self: CheckpointManager, info: CheckpointInfo) -> None:
        """Called by the publisher once ``info`` is committed in the store: mark it, prune again."""
        with self._lock:
            current = self.record.find(info.name)
            if current is not None and current.seq == info.seq:
                self.record.add(dataclasses.replace(current, uploaded=True))
                self.record.save()
            self._prune()
        if self.remote is not None:
            self.remote.prune(set())

    def _reupload_stranded(self: CheckpointManager) -> None:
        """Hand checkpoints that a crash left committed locally but not in the store to the uploader."""
        if self.remote is None:
            return
        for info in [c for c in self.all() if not c.uploaded]:
            log.info("re-uploading %s, which an earlier run did not finish uploading", self.path_of(info))
            self.remote.upload(info, self.path_of(info), info.timestamp, self._manifest_metadata(info))

    def fetch_from_store(self: CheckpointManager) -> None:
        """Download the checkpoint the store's pointer names when none is on disk (a new machine,
        a deleted folder), so that autoresume finds it; nothing when there is no pointer."""
        if self.remote_config is None or self.all():
            return
        if self.remote is None:
            self.remote = self._open_remote()
        makedirs_durable(self.folder)
        if self.remote.fetch_latest(self.folder) is not None:
            self.reconcile()
            with self._lock:
                self.record.checkpoints = [dataclasses.replace(c, uploaded=True) for c in self.record.checkpoints]
                self.record.save()

    def upload_errors(self: CheckpointManager) -> list[Exception]:
        """Upload failures since the last call (empty without a remote)."""
        return list(self.remote.poll_errors()) if self.remote is not None else []

    def wait_uploads(self: CheckpointManager, timeout: float | None = None) -> bool:
        """Block until every checkpoint handed to the uploader is committed in the store or failed;
        False if ``timeout`` seconds passed first."""
        return self.remote.wait(timeout) if self.remote is not None else True
