"""Step 7 of the save pipeline: upload a committed checkpoint, then commit it in the store.

For each checkpoint, every rank uploads its own files (no funnel through rank 0) through the
:class:`~ckpt_callbacks.remote.uploader.Uploader`, each object carrying its checksum. When rank 0
sees every object of the checkpoint in the store (its own uploads confirmed, other ranks' objects
present with their checksums), it writes, in this order:

1. the **manifest** ``<checkpoint key>.manifest.json``: every object with its size and checksum, and
   the checkpoint's metadata. It is the remote commit marker: a checkpoint without one is incomplete;
2. the Composer-style **pointer** ``<latest_remote_file_name>.symlink`` whose content is the
   checkpoint's key. Pointers never move backwards: an older checkpoint confirmed after a newer one
   does not take the pointer back.

Only then does the manager learn that the checkpoint is safe in the store (``on_confirmed``), and
only then may it prune the local copy. Remote retention reads the manifests (they span every run of
the saver) and never deletes the checkpoint a pointer names.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ckpt_callbacks.errors import (
    CheckpointNotFoundError, StoreError, TransientStoreError, UploadError, UploadTimeoutError,
)
from ckpt_callbacks.record import CheckpointInfo
from ckpt_callbacks.remote.base import RemoteStore
from ckpt_callbacks.remote.futures import UploadFuture
from ckpt_callbacks.remote.upload_job import RetryPolicy
from ckpt_callbacks.remote.uploader import Uploader
from ckpt_callbacks.time import Timestamp

__all__ = ["MANIFEST_SUFFIX", "POINTER_SUFFIX", "RemoteCheckpoint", "RemotePublisher"]

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest.json"
POINTER_SUFFIX = ".symlink"
_POLL_SECONDS = 0.2
_COMMIT_ATTEMPTS = 8
_COMMIT_BACKOFF_SECONDS = 0.5


@dataclass
class RemoteCheckpoint:
    """One checkpoint on its way to the store, as this rank sees it.

    Attributes:
        info: the record entry (None on ranks that keep no record: sharded non-coordinators).
        key: the checkpoint's key (a file's key, or the prefix of a folder's objects).
        uploads: this rank's files as (local path, key).
        expected: every object key of the checkpoint, all ranks included (what rank 0 waits for).
        pointers: (pointer key, key it names) to write once it is committed (rank 0 only).
    """

    info: CheckpointInfo | None
    key: str
    uploads: list[tuple[Path, str]]
    expected: list[str]
    pointers: list[tuple[str, str]]
    metadata: dict[str, Any] = field(default_factory=dict)
    futures: list[UploadFuture] = field(default_factory=list)


class RemotePublisher:
    """Uploads checkpoints of one saver on one rank and commits them in the store.

    Args:
        store: the object store (``open_store(remote, storage_options)``).
        uploader: the upload pool over ``store``.
        coordinator: whether this rank writes manifests and pointers (rank 0).
        overwrite: replace existing objects (False: an existing different object fails the upload).
        upload_timeout: seconds rank 0 waits for other ranks' objects after its own are confirmed.
        on_confirmed: called on a background thread with each checkpoint committed in the store.

    Example:
        >>> publisher = RemotePublisher(open_store("s3://bucket/runs"), uploader, coordinator=True,
        ...                             overwrite=False, upload_timeout=600, on_confirmed=print)  # doctest: +SKIP
    """

    def __init__(
        self,
        store: RemoteStore,
        uploader: Uploader,
        *,
        coordinator: bool,
        overwrite: bool,
        upload_timeout: float,
        on_confirmed: Callable[[CheckpointInfo], None],
    ) -> None:
        self.store = store
        self.uploader = uploader
        self.coordinator = coordinator
        self.overwrite = overwrite
        self.upload_timeout = upload_timeout
        self.on_confirmed = on_confirmed
        self._pointed: dict[str, dict[str, Any] | None] = {}  # pointer -> metadata of what it names
        self._errors: list[UploadError] = []
        self._lock = threading.Lock()
        self._finishing: queue.Queue[RemoteCheckpoint | None] = queue.Queue()
        self._in_flight = 0
        self._idle = threading.Condition(self._lock)
        self._closing = threading.Event()
        self._rng = random.Random()
        self._finisher = threading.Thread(target=self._finish_loop, name="ckpt-callbacks-commit", daemon=True)
        self._finisher.start()

    def publish(self, checkpoint: RemoteCheckpoint) -> None:
        """Hand this rank's files of ``checkpoint`` to the uploader; returns at once."""
        with self._lock:
            self._in_flight += 1
        remaining = [len(checkpoint.uploads)]

        def settled(_: UploadFuture) -> None:
            with self._lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                self._finishing.put(checkpoint)

        if not checkpoint.uploads:
            self._finishing.put(checkpoint)
            return
        try:
            for path, key in checkpoint.uploads:
                checkpoint.futures.append(
                    self.uploader.submit(path, key, overwrite=self.overwrite, checksum=True, on_done=settled)
                )
        except BaseException:
            with self._idle:  # nothing more will settle: the checkpoint is not in flight any more
                self._in_flight -= 1
                self._idle.notify_all()
            raise

    def poll_errors(self) -> list[UploadError]:
        """Failures since the last call (to raise on the training thread at its next event)."""
        with self._lock:
            errors, self._errors = self._errors, []
        return errors + self.uploader.poll_errors()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every checkpoint handed over is committed in the store or failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.uploader.wait(timeout)
        with self._idle:
            while self._in_flight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, drain_timeout: float | None = None) -> list[str]:
        """Drain for at most ``drain_timeout`` seconds, stop, and return the keys not uploaded."""
        self.wait(drain_timeout)
        not_uploaded = self.uploader.close(drain_timeout=0)
        self._closing.set()  # ends a commit's backoff
        self._finishing.put(None)
        return not_uploaded

    # ---------------------------------------------------------------- the commit in the store

    def _finish_loop(self) -> None:
        while (checkpoint := self._finishing.get()) is not None:
            try:
                self._finish_retrying(checkpoint)
            except (StoreError, UploadError, OSError) as error:
                failure = error if isinstance(error, UploadError) else UploadError(
                    f"committing {checkpoint.key} in {self.store.url} failed: {error}"
                )
                failure.__cause__ = error if failure is not error else error.__cause__
                with self._lock:
                    self._errors.append(failure)
            finally:
                with self._idle:
                    self._in_flight -= 1
                    self._idle.notify_all()

    def _finish_retrying(self, checkpoint: RemoteCheckpoint) -> None:
        """:meth:`_finish`, retried with backoff and jitter while the store fails transiently (a burst
        of 503 SlowDown on the HEADs and small PUTs of the commit must not lose an uploaded
        checkpoint), within ``upload_timeout`` and until :meth:`close`. Every step is idempotent."""
        policy = RetryPolicy(_COMMIT_ATTEMPTS, _COMMIT_BACKOFF_SECONDS, self.upload_timeout)
        deadline = time.monotonic() + policy.timeout
        for attempt in range(1, policy.max_attempts + 1):
            try:
                self._finish(checkpoint)
                return
            except TransientStoreError as error:
                delay = policy.delay(attempt, self._rng)
                if attempt == policy.max_attempts or time.monotonic() + delay > deadline:
                    raise
                log.warning("committing %s failed (attempt %d of %d), retrying in %.2f s: %s",
                            checkpoint.key, attempt, policy.max_attempts, delay, error)
                if self._closing.wait(delay):
                    raise

    def _finish(self, checkpoint: RemoteCheckpoint) -> None:
        if any(f.exception() is not None or f.superseded for f in checkpoint.futures):
            return  # the uploader reports the failure; the local copy stays
        if not self.coordinator:
            return
        objects = self._await_objects(checkpoint.expected)
        manifest = {"version": 1, "key": checkpoint.key, "objects": objects, **checkpoint.metadata}
        self.store.write_bytes(checkpoint.key + MANIFEST_SUFFIX, json.dumps(manifest, sort_keys=True).encode())
        for pointer, target in checkpoint.pointers:
            if self._moves_forward(pointer, {**checkpoint.metadata, "key": checkpoint.key}):
                self.store.write_bytes(pointer, target.encode())
        log.info("committed %s in %s (%d objects)", checkpoint.key, self.store.url, len(objects))
        if checkpoint.info is not None:
            self.on_confirmed(checkpoint.info)

    def _moves_forward(self, pointer: str, mine: dict[str, Any]) -> bool:
        """Whether ``pointer`` may name the checkpoint whose metadata is ``mine``: not when it names a
        newer checkpoint of the same saver. An older upload confirmed after a newer one (concurrent
        uploads), or a checkpoint an earlier run left unuploaded and a restart re-uploads, must not take
        the pointer back. What the pointer names is read from the store the first time (an earlier run
        may have written it); only the finisher thread gets here."""
        if pointer not in self._pointed:
            self._pointed[pointer] = self._pointed_in_store(pointer)
        current = self._pointed[pointer]
        if current is not None and current.get("saver") == mine.get("saver") and _saved_after(current, mine):
            log.info("%s keeps naming %s, newer than %s", pointer, current.get("key"), mine.get("key"))
            return False
        self._pointed[pointer] = mine
        return True

    def _pointed_in_store(self, pointer: str) -> dict[str, Any] | None:
        try:
            key = self.read_pointer(pointer)
            return None if key is None else self.read_manifest(key)
        except (StoreError, ValueError) as error:  # unreadable: let this checkpoint take the pointer
            log.warning("cannot read what %s names (%s); moving it anyway", self.store.uri(pointer), error)
            return None

    def _await_objects(self, keys: Sequence[str]) -> list[dict[str, Any]]:
        """Size and checksum of every object, waiting (bounded) for other ranks' uploads to land."""
        deadline = time.monotonic() + self.upload_timeout
        objects = []
        for key in keys:
            while (info := self.store.info(key)) is None:
                if time.monotonic() > deadline:
                    raise UploadTimeoutError(
                        f"{self.store.uri(key)} did not appear within {self.upload_timeout:.0f} s: "
                        "another rank's upload failed or is late; the checkpoint is not committed in the store"
                    )
                time.sleep(_POLL_SECONDS)
            objects.append({"key": key, "size": info.size, "checksum": info.checksum})
        return objects

    # ---------------------------------------------------------------- reading the store

    def read_pointer(self, pointer: str) -> str | None:
        """The checkpoint key a pointer names (None when there is no pointer)."""
        try:
            return self.store.read_bytes(pointer).decode().strip()
        except CheckpointNotFoundError:
            return None

    def read_manifest(self, key: str) -> dict[str, Any] | None:
        """The manifest of the checkpoint at ``key`` (None: not committed in the store)."""
        try:
            return json.loads(self.store.read_bytes(key + MANIFEST_SUFFIX))
        except CheckpointNotFoundError:
            return None

    def manifests(self) -> list[dict[str, Any]]:
        """Every committed checkpoint's manifest under the store's prefix."""
        found = []
        for key in self.store.list():
            if key.endswith(MANIFEST_SUFFIX):
                manifest = self.read_manifest(key[: -len(MANIFEST_SUFFIX)])
                if manifest is not None:
                    found.append(manifest)
        return found

    def download(self, key: str, manifest: dict[str, Any], destination: Path) -> Path:
        """Download a committed checkpoint's objects under ``destination`` (its local name) and
        return the local path; sizes and checksums are verified before each file is renamed into place."""
        for item in manifest["objects"]:
            relative = item["key"][len(key):].lstrip("/")
            target = destination / relative if relative else destination
            target.parent.mkdir(parents=True, exist_ok=True)
            self.store.download_file(item["key"], str(target), checksum=item.get("checksum"))
        return destination

    def delete_checkpoint(self, key: str, manifest: dict[str, Any]) -> None:
        """Delete a checkpoint's objects, the manifest last (so a half-deleted one is never 'committed')."""
        for item in manifest["objects"]:
            self.store.delete(item["key"])
        self.store.delete(key + MANIFEST_SUFFIX)


def _saved_after(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether checkpoint metadata ``a`` was saved after ``b``: by save sequence within a lineage, by
    wall clock across lineages (a restarted run saves after the run it restarts)."""
    if a.get("lineage") == b.get("lineage"):
        return int(a.get("save_sequence", 0)) > int(b.get("save_sequence", 0))
    return float(a.get("saved_at", 0.0)) > float(b.get("saved_at", 0.0))


def manifest_info(manifest: dict[str, Any]) -> CheckpointInfo:
    """A record-like entry for a checkpoint in the store (what remote retention policies read)."""
    return CheckpointInfo(
        seq=int(manifest.get("save_sequence", 0)),
        name=manifest["key"],
        timestamp=Timestamp.from_state_dict(manifest.get("timestamp", {})),
        lineage=manifest.get("lineage", ""),
        size=sum(int(item["size"]) for item in manifest["objects"]),
        saved_at=float(manifest.get("saved_at", 0.0)),
        weights_only=bool(manifest.get("weights_only", False)),
        metrics=dict(manifest.get("metrics", {})),
    )
