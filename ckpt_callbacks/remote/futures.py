"""The future that :meth:`~ckpt_callbacks.remote.uploader.Uploader.submit` returns for each upload.

Like s3transfer's transfer future it carries the upload's metadata (key, local file, size, attempts,
elapsed time) next to its outcome, and runs its done-callbacks exactly once, on the thread that
settles it. The outcome is settled once: when a supervisor at the deadline and a worker coming back
from a stuck store call race, the first one wins and the other changes nothing.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from ckpt_callbacks.errors import UploadError

__all__ = ["DoneCallback", "UploadFuture"]

log = logging.getLogger(__name__)

DoneCallback = Callable[["UploadFuture"], None]
"""Called with the settled :class:`UploadFuture`."""


class UploadFuture:
    """The outcome of one submitted upload: uploaded, failed, or superseded by a newer one.

    Attributes:
        key: the object key, relative to the store's prefix.
        local_path: the file as named at hand-off.
        size: its size in bytes at hand-off (the bytes that are sent).

    Example:
        >>> future = uploader.submit("ckpt/ba100.pt", "run/ba100.pt")  # doctest: +SKIP
        >>> future.result(timeout=600)  # raises UploadError on failure  # doctest: +SKIP
        >>> future.attempts, round(future.elapsed, 1)  # doctest: +SKIP
        (1, 2.3)
    """

    def __init__(self, key: str, local_path: str, size: int, clock: Callable[[], float]) -> None:
        self.key = key
        self.local_path = local_path
        self.size = size
        self._clock = clock
        self._lock = threading.Lock()
        self._settled = threading.Event()
        self._callbacks: list[DoneCallback] = []
        self._error: UploadError | None = None
        self._superseded = False
        self._attempts = 0
        self._started: float | None = None
        self._ended: float | None = None

    def __repr__(self) -> str:
        if not self.done():
            state = "pending"
        else:
            state = "superseded" if self._superseded else "failed" if self._error else "uploaded"
        return f"UploadFuture(key={self.key!r}, size={self.size}, attempts={self._attempts}, {state})"

    @property
    def attempts(self) -> int:
        """Store calls started so far (0 while queued)."""
        return self._attempts

    @property
    def elapsed(self) -> float:
        """Seconds from the first attempt to the end (or to now while running); 0.0 before it starts."""
        if self._started is None:
            return 0.0
        return (self._ended if self._ended is not None else self._clock()) - self._started

    @property
    def superseded(self) -> bool:
        """True if a newer upload of the same key replaced this one before it started (nothing sent)."""
        return self._superseded

    def done(self) -> bool:
        """Whether the upload has finished: uploaded, failed or superseded."""
        return self._settled.is_set()

    def result(self, timeout: float | None = None) -> None:
        """Wait for the upload; return None once uploaded (or superseded), raise its error if it failed.

        Raises:
            UploadError: the upload failed (``UploadTimeoutError`` past its deadline).
            TimeoutError: ``timeout`` seconds passed and the upload has not finished.
        """
        error = self.exception(timeout)
        if error is not None:
            raise error

    def exception(self, timeout: float | None = None) -> UploadError | None:
        """Wait for the upload and return its error, or None if it was uploaded or superseded.

        Raises:
            TimeoutError: ``timeout`` seconds passed and the upload has not finished.
        """
        if not self._settled.wait(timeout):
            raise TimeoutError(f"the upload of {self.key!r} is still running after {timeout} s")
        return self._error

    def add_done_callback(self, callback: DoneCallback) -> None:
        """Call ``callback(future)`` exactly once when the upload finishes (at once if it has).

        It runs on the thread that settles the upload, so it must be quick and must not call the
        uploader's ``wait`` or ``close`` (they wait for it); an exception it raises is logged.
        """
        with self._lock:
            if not self._settled.is_set():
                self._callbacks.append(callback)
                return
        _run_callback(callback, self)

    def _start(self, now: float) -> None:
        self._started = now

    def _count_attempt(self, attempt: int) -> None:
        self._attempts = attempt

    def _settle(
        self, error: UploadError | None, superseded: bool = False, before_callbacks: Callable[[], None] | None = None
    ) -> bool:
        """Fix the outcome, call ``before_callbacks``, run the callbacks; False if it was already fixed."""
        with self._lock:
            if self._settled.is_set():
                return False
            self._error, self._superseded, self._ended = error, superseded, self._clock()
            callbacks, self._callbacks = self._callbacks, []
            self._settled.set()
        if before_callbacks is not None:
            before_callbacks()
        for callback in callbacks:
            _run_callback(callback, self)
        return True


def _run_callback(callback: DoneCallback, future: UploadFuture) -> None:
    try:
        callback(future)
    except Exception:  # noqa: BLE001 -- a caller's bug must not kill a worker or hide the outcome
        log.exception("done-callback %r of the upload of %r raised", callback, future.key)
