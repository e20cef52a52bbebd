"""The remote side of one saver: where its checkpoints go in the store, and everything the manager
asks of the store (upload hand-off, remote retention, crash recovery, resume from the store).

:class:`RemoteConfig` holds the saver's remote arguments, validated at construction;
:class:`RemoteTarget` binds them to a run and a rank at fit start (formatting key templates,
opening the store, probing credentials) and drives a :class:`~ckpt_callbacks.remote.publisher.RemotePublisher`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ckpt_callbacks.dist import DistInfo
from ckpt_callbacks.errors import (
    CheckpointNotFoundError, ConfigurationError, CorruptCheckpointError, UploadError, bad_value,
)
from ckpt_callbacks.naming import NameTemplate, check_relative
from ckpt_callbacks.record import CheckpointInfo
from ckpt_callbacks.remote.factory import open_store
from ckpt_callbacks.remote.publisher import POINTER_SUFFIX, RemoteCheckpoint, RemotePublisher, manifest_info
from ckpt_callbacks.remote.uploader import Uploader
from ckpt_callbacks.retention import RetentionPolicy
from ckpt_callbacks.temp_files import temp_path_for
from ckpt_callbacks.time import Timestamp

__all__ = ["RemoteConfig", "RemoteTarget"]

log = logging.getLogger(__name__)

STALE_MULTIPART_SECONDS = 24 * 3600


@dataclass(frozen=True)
class RemoteConfig:
    """A saver's remote arguments, checked at construction.

    ``file_name`` and ``latest_name`` are key templates relative to ``url`` (``latest_name`` gets
    Composer's ``.symlink`` suffix).
    """

    url: str
    file_name: NameTemplate
    latest_name: NameTemplate | None
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)  # credentials: never shown
    num_concurrent_uploads: int = 1
    upload_timeout: float = 3600.0
    shutdown_timeout: float = 300.0
    retention: RetentionPolicy | None = None
    staging: bool = False

    @classmethod
    def from_arguments(
        cls,
        remote: str,
        *,
        folder: NameTemplate,
        filename: NameTemplate,
        latest_filename: NameTemplate | None,
        remote_file_name: str | os.PathLike | None,
        latest_remote_file_name: str | os.PathLike | None,
        staging: bool,
        **options: Any,
    ) -> RemoteConfig:
        """Build the config; key names default to ``folder/filename`` (Composer's default key)
        when ``folder`` is relative, else to ``filename``.

        Raises:
            ConfigurationError: ``remote`` is not a URL with a scheme, or a key template is bad.
        """
        if not isinstance(remote, str) or "://" not in remote:
            raise ConfigurationError(bad_value("remote", "a URL such as 's3://bucket/prefix' or 'file:///mnt/ckpt'", remote))
        prefix = "" if staging or os.path.isabs(folder.template) or ".." in folder.template.split("/") else folder.template + "/"
        file_name = NameTemplate(
            remote_file_name if remote_file_name is not None else prefix + filename.template, argument="remote_file_name"
        )
        latest: str | os.PathLike | None = latest_remote_file_name
        if latest is None and latest_filename is not None:
            latest = prefix + latest_filename.template
        latest_name = None if latest is None else NameTemplate(latest, argument="latest_remote_file_name")
        if remote.lower().startswith("s3://"):
            # Check the options now, as the store will at fit start (nothing is opened or sent).
            from ckpt_callbacks.remote.s3_config import S3Options

            S3Options.from_storage_options(options.get("storage_options"))
        return cls(url=remote.rstrip("/"), file_name=file_name, latest_name=latest_name, staging=staging, **options)


class RemoteTarget:
    """The store side of one saver on one rank, for one run."""

    def __init__(
        self, config: RemoteConfig, *, fixed: dict[str, Any], rank_info: DistInfo, ranks: str, overwrite: bool,
        saver: str, run_name: str, on_confirmed: Callable[[CheckpointInfo], None],
    ) -> None:
        self.config = config
        self.fixed = fixed
        self.rank_info = rank_info
        self.ranks = ranks
        self.saver = saver
        self.run_name = run_name
        self.store = open_store(config.url, dict(config.storage_options) or None)
        coordinator = rank_info.rank == 0
        self.publisher = RemotePublisher(
            self.store,
            Uploader(self.store, num_concurrent_uploads=config.num_concurrent_uploads,
                     upload_timeout_in_seconds=config.upload_timeout, shutdown_timeout=config.shutdown_timeout),
            coordinator=coordinator, overwrite=overwrite, upload_timeout=config.upload_timeout,
            on_confirmed=on_confirmed,
        )

    def probe(self) -> None:
        """Check credentials and the bucket (a LIST under the prefix), and sweep our stale multipart uploads."""
        self.store.probe()
        if self.rank_info.rank == 0:
            self.store.abort_incomplete_uploads(older_than_seconds=STALE_MULTIPART_SECONDS)

    def key(self, timestamp: Timestamp, rank: int | None = None) -> str:
        """The checkpoint's key (for ``rank``'s file in ``'per_rank'`` mode)."""
        values = {**self.fixed, **timestamp.format_variables()}
        if rank is not None:
            values["rank"] = rank
        return check_relative(self.config.file_name.format(**values), argument="remote_file_name")

    def pointer(self, timestamp: Timestamp, rank: int | None = None) -> str | None:
        """The key of the ``.symlink`` pointer object (None: no remote latest)."""
        if self.config.latest_name is None:
            return None
        values = {**self.fixed, **timestamp.format_variables()}
        if rank is not None:
            values["rank"] = rank
        return check_relative(self.config.latest_name.format(**values), argument="latest_remote_file_name") + POINTER_SUFFIX

    def upload(self, info: CheckpointInfo | None, path: Path, timestamp: Timestamp, metadata: dict[str, Any]) -> None:
        """Hand this rank's files of the committed checkpoint at ``path`` to the uploader."""
        ranks = range(self.rank_info.world_size) if self.ranks == "per_rank" else [None]
        key = self.key(timestamp, self.rank_info.rank if self.ranks == "per_rank" else None)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            rank = self.rank_info.rank
            mine = [p for p in files if self._shard_owner(p) == rank or (rank == 0 and self._shard_owner(p) is None)]
            uploads = [(p, f"{key}/{p.relative_to(path).as_posix()}") for p in mine]
            expected = [f"{key}/{p.relative_to(path).as_posix()}" for p in files]
        else:
            uploads = [(path, key)]
            expected = [self.key(timestamp, rank) for rank in ranks] if self.ranks == "per_rank" else [key]
        # Each rank's pointer names that rank's object (one pointer naming the checkpoint otherwise).
        pointers = [
            (pointer, key if rank is None else self.key(timestamp, rank))
            for rank in ranks
            if (pointer := self.pointer(timestamp, rank)) is not None
        ]
        manifest = {**metadata, "local_name": info.name if info else "", "metrics": dict(info.metrics) if info else {}}
        self.publisher.publish(RemoteCheckpoint(info, key, uploads, expected, pointers, manifest))

    @staticmethod
    def _shard_owner(path: Path) -> int | None:
        """The rank whose DCP shard file this is (``__<rank>_<n>.distcp``), None for shared files."""
        name = path.name
        if name.startswith("__") and name.endswith(".distcp"):
            return int(name[2:].split("_", 1)[0])
        return None

    def prune(self, protected_keys: set[str]) -> None:
        """Apply remote retention to this saver's committed checkpoints in the store (rank 0)."""
        if self.config.retention is None or self.rank_info.rank != 0:
            return
        mine = [m for m in self.publisher.manifests() if m.get("saver") == self.saver]
        infos = {id(m): manifest_info(m) for m in mine}
        keep = self.config.retention.keep(sorted(infos.values(), key=lambda i: i.seq))
        pointed = {self.publisher.read_pointer(p) for p in self._all_pointers(mine)} | protected_keys
        newest = max((i.seq for i in infos.values()), default=None)
        for manifest in mine:
            info = infos[id(manifest)]
            if info.seq in keep or info.seq == newest or manifest["key"] in pointed:
                continue
            self.publisher.delete_checkpoint(manifest["key"], manifest)
            log.info("pruned %s from the store", self.store.uri(manifest["key"]))

    def _all_pointers(self, manifests: list[dict[str, Any]]) -> set[str]:
        pointers = set()
        for manifest in manifests:
            timestamp = Timestamp.from_state_dict(manifest.get("timestamp", {}))
            ranks = range(self.rank_info.world_size) if self.ranks == "per_rank" else [None]
            pointers |= {p for p in (self.pointer(timestamp, r) for r in ranks) if p}
        return pointers

    def fetch_latest(self, local_folder: Path, timestamp_hint: Timestamp | None = None) -> Path | None:
        """Download the checkpoint this rank's pointer names into ``local_folder`` (under its local
        name); None when there is no pointer (a fresh start). A download that fails its checksum is
        skipped with a warning for the newest older checkpoint of this saver committed in the store.

        Raises:
            CheckpointNotFoundError: the pointer names a checkpoint with no manifest (not committed).
            CorruptCheckpointError: every committed checkpoint of this saver is damaged in the store.
            StorePermissionError: the store refused access (never taken for "no checkpoint").
        """
        pointer = self.pointer(timestamp_hint or Timestamp(), self.rank_info.rank if self.ranks == "per_rank" else None)
        key = None if pointer is None else self.publisher.read_pointer(pointer)
        if key is None:
            return None
        manifest = self.publisher.read_manifest(key)
        if manifest is None:
            raise CheckpointNotFoundError(
                f"{self.store.uri(pointer)} names {self.store.uri(key)}, which has no manifest: it was never "
                "committed in the store"
            )
        try:
            return self._download(key, manifest, local_folder)
        except CorruptCheckpointError as error:
            if self.ranks == "per_rank":
                raise  # another rank's part may be fine: the ranks choose together, locally
            warnings.warn(f"autoresume: skipping corrupt checkpoint {self.store.uri(key)}: {error}", UserWarning,
                          stacklevel=3)
        older = [m for m in self.publisher.manifests()
                 if m.get("saver") == self.saver and m.get("run_name") == self.run_name and m.get("key") != key]
        for candidate in sorted(older, key=lambda m: float(m.get("saved_at", 0.0)), reverse=True):
            try:
                return self._download(candidate["key"], candidate, local_folder)
            except CorruptCheckpointError as error:
                warnings.warn(f"autoresume: skipping corrupt checkpoint {self.store.uri(candidate['key'])}: {error}",
                              UserWarning, stacklevel=3)
        raise CorruptCheckpointError(f"every checkpoint of this saver committed in {self.store.url} is corrupt")

    def _download(self, key: str, manifest: dict[str, Any], local_folder: Path) -> Path:
        name = manifest.get("local_name") or Path(key).name
        destination = local_folder / name
        if destination.exists():
            return destination
        # A temp name: if this process dies mid-download, the next start's sweep removes the folder.
        staging = temp_path_for(local_folder / "download")
        staging.mkdir()
        try:
            fetched = self.publisher.download(key, manifest, staging / "checkpoint")
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(fetched, destination)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("downloaded %s to %s", self.store.uri(key), destination)
        return destination

    def poll_errors(self) -> list[UploadError]:
        """Upload failures since the last call."""
        return self.publisher.poll_errors()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every handed-over checkpoint is committed in the store or failed."""
        started = time.monotonic()
        done = self.publisher.wait(timeout)
        log.info("uploads drained in %.1f s", time.monotonic() - started)
        return done

    def close(self) -> list[str]:
        """Drain (bounded by ``shutdown_timeout``) and stop; returns the keys not uploaded."""
        not_uploaded = self.publisher.close(self.config.shutdown_timeout)
        self.store.close()
        return not_uploaded
