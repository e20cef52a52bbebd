"""One upload as the pool's workers run it: pinned bytes, attempts, backoff, all within a deadline.

The bytes are pinned at hand-off: on Linux the file is opened and the backend reads
``/proc/self/fd/N``, which names the opened inode even after a re-save renamed a new file over the
name, or pruning unlinked it. Elsewhere a hard link under a temp name of
:mod:`ckpt_callbacks.storage` pins them (that module's sweep removes the link after a crash). Either
way the backend gets a plain path, so the :class:`~ckpt_callbacks.remote.base.RemoteStore` Protocol
stays path-based and boto3/fsspec open it themselves (s3transfer reopens it once per part).

Errors decide what happens next: :class:`~ckpt_callbacks.errors.TransientStoreError` is retried
with exponential backoff and jitter while attempts and time remain; a backend's
``UploadTimeoutError`` is a timeout; anything else (denied access, a missing bucket, an existing
object with ``overwrite=False``, a bug) fails at once. (A retry whose earlier attempt landed but lost
its answer is the backend's to recognise: with ``overwrite=False`` it accepts an object holding our
size and checksum metadata.)
"""

from __future__ import annotations

import logging
import os
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from ckpt_callbacks.errors import CheckpointExistsError, TransientStoreError, UploadError, UploadTimeoutError
from ckpt_callbacks.remote.base import CHECKSUM_METADATA_KEY, RemoteStore, checksum_file
from ckpt_callbacks.remote.futures import UploadFuture
from ckpt_callbacks.temp_files import temp_path_for

__all__ = ["RetryPolicy", "UploadJob", "pin_file"]

log = logging.getLogger(__name__)

_PROC_FD = Path("/proc/self/fd")
_BACKOFF_CAP_SECONDS = 30.0


def pin_file(local_path: str) -> tuple[str, BinaryIO | None, Path | None]:
    """Pin the file's current bytes; return the path to read them by, the open file and the link.

    Raises:
        OSError: the file cannot be opened (``FileNotFoundError`` if missing) or linked.

    Example:
        >>> source, file, link = pin_file("ckpt/ba100.pt")  # doctest: +SKIP
        >>> source
        '/proc/self/fd/7'
    """
    if _PROC_FD.is_dir():
        file = open(local_path, "rb")  # noqa: SIM115 -- held until the upload ends
        return f"{_PROC_FD}/{file.fileno()}", file, None
    link = temp_path_for(Path(local_path))
    os.link(local_path, link)
    return str(link), None, link


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how far apart, one upload is tried.

    Attributes:
        max_attempts: whole-upload attempts on transient errors.
        backoff_seconds: the wait before the first retry; it doubles at each retry (capped at 30 s)
            and its second half is random, so ranks throttled together do not retry together.
        timeout: the per-upload deadline in seconds, from the first attempt.

    Example:
        >>> policy = RetryPolicy(max_attempts=4, backoff_seconds=0.5, timeout=600)
        >>> 0.5 <= policy.delay(2, random.Random(0)) <= 1.0
        True
    """

    max_attempts: int
    backoff_seconds: float
    timeout: float

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The wait after failed attempt ``attempt`` (1-based): half fixed, half jitter."""
        base = min(_BACKOFF_CAP_SECONDS, self.backoff_seconds * 2 ** (attempt - 1))
        return base / 2 + rng.uniform(0.0, base / 2)


@dataclass(eq=False)
class UploadJob:
    """One submitted upload: what to send, where, and how far it got.

    ``add_checksum`` has the worker add the file's checksum to ``metadata`` before the first attempt.
    ``deadline`` is set at the first attempt (or, for a job queued behind an abandoned upload of the
    same key, when that one was abandoned); ``in_call`` tells the supervisor whether the worker is
    inside the store; ``abandoned`` marks a job whose worker the supervisor replaced.

    Example:
        >>> job = UploadJob(future, "/proc/self/fd/7", file, None, True, None, "s3://b/run/ba100.pt")  # doctest: +SKIP
    """

    future: UploadFuture
    source: str
    file: BinaryIO | None
    link: Path | None
    overwrite: bool
    metadata: dict[str, str] | None
    where: str
    add_checksum: bool = False
    deadline: float | None = None
    in_call: bool = False
    abandoned: bool = False

    def release(self) -> None:
        """Close what pins the bytes; call it only once no thread reads them any more."""
        if self.file is not None:
            self.file.close()
        if self.link is not None:
            self.link.unlink(missing_ok=True)

    def error(self, kind: type[UploadError], detail: str, cause: BaseException | None) -> UploadError:
        """An error naming the local file, the destination and ``detail``, with ``cause`` as ``__cause__``."""
        error = kind(f"uploading {self.future.local_path} to {self.where} {detail}")
        error.__cause__ = cause
        return error

    def overran(self, timeout: float, detail: str) -> str:
        """The detail of an ``UploadTimeoutError``."""
        attempts = self.future.attempts
        return f"did not finish within upload_timeout_in_seconds={timeout:g} ({attempts} attempt(s)): {detail}"

    def run(
        self,
        store: RemoteStore,
        policy: RetryPolicy,
        clock: Callable[[], float],
        stopping: threading.Event,
        rng: random.Random,
    ) -> UploadError | None | bool:
        """Try the upload until it lands, fails for good, or runs out of attempts or time.

        Returns:
            None once uploaded, the error once failed, or False if it stopped without an outcome
            (``stopping`` was set, or someone else settled the future first).
        """
        future = self.future
        if self.add_checksum and CHECKSUM_METADATA_KEY not in (self.metadata or {}):
            # Here, on the upload worker: the CRC of a big file takes a tenth of a second per 512 MB,
            # which the thread handing the file over (often the training thread) must not pay.
            try:
                self.metadata = {**(self.metadata or {}), CHECKSUM_METADATA_KEY: checksum_file(self.source)}
            except OSError as error:
                return self.error(UploadError, f"failed: cannot read it ({error})", error)
        deadline = self.deadline if self.deadline is not None else clock() + policy.timeout
        cause: BaseException | None = None
        for attempt in range(1, policy.max_attempts + 1):
            if future.done() or stopping.is_set():
                return False
            future._count_attempt(attempt)
            self.in_call = True
            try:
                store.upload_file(
                    self.source, future.key, overwrite=self.overwrite, metadata=self.metadata, deadline=deadline
                )
            except TransientStoreError as error:
                cause = error
            except UploadTimeoutError as error:
                return self.error(UploadTimeoutError, self.overran(policy.timeout, "the store gave up"), error)
            except CheckpointExistsError as error:
                return self.error(UploadError, "failed: the object exists and overwrite=False", error)
            except Exception as error:  # noqa: BLE001 -- permanent: denied, no bucket, a backend bug
                return self.error(UploadError, f"failed: {error}", error)
            else:
                return None
            finally:
                self.in_call = False
            if attempt == policy.max_attempts:
                break
            delay = policy.delay(attempt, rng)
            if clock() + delay >= deadline:
                detail = self.overran(policy.timeout, f"no time left to retry {cause}")
                return self.error(UploadTimeoutError, detail, cause)
            log.warning(
                "upload of %s failed (attempt %d of %d), retrying in %.2f s: %s",
                future.key, attempt, policy.max_attempts, delay, cause,
            )
            if stopping.wait(delay):
                return False
        return self.error(UploadError, f"failed after {policy.max_attempts} attempt(s): {cause}", cause)
