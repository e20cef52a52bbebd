"""The uploader pool: background uploads with a real deadline, retries, and back-pressure.

``Uploader(store).submit(path, key)`` pins the file's bytes on the caller's thread, queues the
upload for ``num_concurrent_uploads`` worker threads, and returns an
:class:`~ckpt_callbacks.remote.futures.UploadFuture` at once. The rules, and why:

- **Opened at hand-off** (:func:`~ckpt_callbacks.remote.upload_job.pin_file`): a re-save renaming a
  new file over the same name cannot change the bytes being sent, and pruning cannot pull them away.
- **Newest wins.** A queued upload is dropped as superseded when a newer one of the same key is
  submitted, and an upload of a key never starts while an older one of that key is still in a store
  call, so older bytes can never land after newer ones.
- **A real deadline.** ``upload_timeout_in_seconds`` counts from the first attempt and covers every
  retry and backoff. The store gets the deadline for its own per-call timeouts and multipart abort;
  as a thread stuck in a socket cannot be killed, a supervisor thread fails the future at the
  deadline anyway and starts a replacement worker. (Botocore's ``read_timeout`` is per socket
  read: a server trickling bytes would otherwise hold an upload for ever.)
- **Retries** of transient errors with backoff and jitter, a bounded number of times
  (:mod:`~ckpt_callbacks.remote.upload_job`); :meth:`Uploader.close` interrupts the waits.
- **Daemon threads**, not ``concurrent.futures``, which joins its threads at interpreter exit (a
  stuck upload would hang the exit for ever); an ``atexit`` hook drains instead, for at most
  ``shutdown_timeout``.
- **Bounded queue.** ``submit`` blocks while ``max_queued`` uploads wait to start, so a slow store
  slows training down instead of piling up checkpoints that cannot be pruned before they are uploaded.

Failures are :class:`~ckpt_callbacks.errors.UploadError` (``UploadTimeoutError`` past the deadline)
naming the key, the local file and the cause (also kept as ``__cause__``); :meth:`Uploader.poll_errors`
hands them to the training thread, which raises them at its next event.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import random
import threading
import time
import weakref
from collections import deque
from typing import Callable, Mapping

from ckpt_callbacks.errors import (
    CheckpointNotFoundError,
    ConfigurationError,
    UploadError,
    UploadTimeoutError,
    bad_value,
)
from ckpt_callbacks.remote.base import RemoteStore
from ckpt_callbacks.remote.futures import DoneCallback, UploadFuture
from ckpt_callbacks.remote.upload_job import RetryPolicy, UploadJob, pin_file

__all__ = ["UploadFuture", "Uploader"]

log = logging.getLogger(__name__)

_PROGRESS_EVERY_SECONDS = 5.0
_LIVE: weakref.WeakSet[Uploader] = weakref.WeakSet()


def _check_number(argument: str, value: object, *, integer: bool = False, positive: bool = False) -> None:
    minimum = 1 if integer else 0
    accepted = f"{'an int' if integer else 'a number of seconds'} {'>' if positive else '>='} {minimum}"
    numeric = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not numeric or not math.isfinite(value):  # type: ignore[arg-type]
        raise ConfigurationError(bad_value(argument, accepted, value))
    if value < minimum or (positive and value == minimum):  # type: ignore[operator]
        raise ConfigurationError(bad_value(argument, accepted, value))


class Uploader:
    """A pool of daemon threads that upload files to one store, each within a deadline.

    Args:
        store: the object store (a :class:`~ckpt_callbacks.remote.base.RemoteStore`).
        num_concurrent_uploads: files uploaded at once (worker threads).
        upload_timeout_in_seconds: per-upload deadline, from the first attempt, covering every retry.
        max_queued: uploads that may wait to start; :meth:`submit` blocks while that many wait.
        max_attempts: whole-upload attempts on transient errors (the backend's client also retries
            single requests inside each attempt).
        backoff_seconds: the wait before the first retry; doubles at each retry, capped at 30 s,
            half of it random.
        stagger_seconds: each upload starts after a random delay in ``[0, stagger_seconds]``, so
            that many ranks do not hit one prefix at the same instant; its deadline starts after it.
        shutdown_timeout: how long the ``atexit`` hook drains when the process exits unclosed.
        clock: monotonic seconds; the deadlines handed to the store are instants of this clock.

    Raises:
        ConfigurationError: an argument out of range.

    Example:
        >>> with Uploader(store, num_concurrent_uploads=4, upload_timeout_in_seconds=600) as up:  # doctest: +SKIP
        ...     up.submit("ckpt/ba100.pt", "run1/ba100.pt")
        ...     errors = up.poll_errors()  # at each training event: raise the first one
        ...     up.wait()  # at fit end
    """

    def __init__(
        self,
        store: RemoteStore,
        *,
        num_concurrent_uploads: int = 1,
        upload_timeout_in_seconds: float = 3600,
        max_queued: int = 32,
        max_attempts: int = 4,
        backoff_seconds: float = 0.5,
        stagger_seconds: float = 0.0,
        shutdown_timeout: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not callable(getattr(store, "upload_file", None)):
            raise ConfigurationError(bad_value("store", "a RemoteStore (with an upload_file method)", store))
        for argument, value in (
            ("num_concurrent_uploads", num_concurrent_uploads),
            ("max_queued", max_queued),
            ("max_attempts", max_attempts),
        ):
            _check_number(argument, value, integer=True)
        _check_number("upload_timeout_in_seconds", upload_timeout_in_seconds, positive=True)
        for argument, value in (
            ("backoff_seconds", backoff_seconds),
            ("stagger_seconds", stagger_seconds),
            ("shutdown_timeout", shutdown_timeout),
        ):
            _check_number(argument, value)
        if not callable(clock):
            raise ConfigurationError(bad_value("clock", "a callable returning monotonic seconds", clock))
        self.store = store
        self.num_concurrent_uploads = num_concurrent_uploads
        self.max_queued = max_queued
        self.policy = RetryPolicy(max_attempts, float(backoff_seconds), float(upload_timeout_in_seconds))
        self.stagger_seconds = float(stagger_seconds)
        self.shutdown_timeout = float(shutdown_timeout)
        self.clock = clock
        self._rng = random.Random()
        self._cond = threading.Condition()
        self._queue: deque[UploadJob] = deque()
        self._busy: dict[str, UploadJob] = {}  # key -> job whose worker has not come back from the store
        self._unfinished: set[UploadJob] = set()
        self._errors: list[UploadError] = []
        self._closed = False  # refuses new submits; workers still drain the queue
        self._stopping = threading.Event()  # workers leave; backoff and stagger waits end
        self._threads = 0
        for _ in range(num_concurrent_uploads):
            self._start_worker()
        threading.Thread(target=self._supervise, name="ckpt-upload-supervisor", daemon=True).start()
        _LIVE.add(self)

    def __enter__(self) -> Uploader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _where(self, key: str) -> str:
        uri = getattr(self.store, "uri", None)
        return uri(key) if callable(uri) else f"{str(getattr(self.store, 'url', '')).rstrip('/')}/{key}"

    # -- the training thread's side -----------------------------------------------------------------

    def submit(
        self,
        local_path: str | os.PathLike,
        key: str,
        *,
        overwrite: bool = True,
        metadata: Mapping[str, str] | None = None,
        checksum: bool = False,
        on_done: DoneCallback | None = None,
    ) -> UploadFuture:
        """Pin ``local_path``'s bytes now and queue their upload to ``key``; block while the queue is full.

        Args:
            local_path: a committed file; later changes to the name do not change what is sent.
            key: the object key, relative to the store's prefix.
            overwrite: replace an existing object (False: the upload fails, with ``CheckpointExistsError``
                as cause).
            metadata: user metadata stored with the object (its checksum, which also lets the
                backend recognise, under ``overwrite=False``, an earlier attempt that landed).
            checksum: compute the file's checksum on the upload worker (not on the calling thread)
                and add it to ``metadata``.
            on_done: called with the future once it settles (see :meth:`UploadFuture.add_done_callback`).

        Raises:
            ConfigurationError: a bad ``key``, ``metadata`` or ``on_done``.
            CheckpointNotFoundError: ``local_path`` does not exist.
            UploadError: it cannot be opened, or the uploader is closed.

        Example:
            >>> uploader.submit("ckpt/ba100.pt", "run1/ba100.pt", metadata={"crc32c": "1a2b3c4d"})  # doctest: +SKIP
        """
        if not isinstance(key, str) or not key or key.startswith("/"):
            raise ConfigurationError(bad_value("key", "a non-empty key relative to the store prefix", key))
        if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ConfigurationError(bad_value("metadata", "a mapping of str to str", metadata))
        if on_done is not None and not callable(on_done):
            raise ConfigurationError(bad_value("on_done", "a callable taking the UploadFuture, or None", on_done))
        local, where = os.fspath(local_path), self._where(key)
        if self._closed:
            raise UploadError(f"cannot upload {local} to {where}: the uploader is closed")
        try:
            source, file, link = pin_file(local)
        except FileNotFoundError as error:
            raise CheckpointNotFoundError(f"cannot upload {local} to {where}: no such file") from error
        except OSError as error:
            raise UploadError(f"cannot upload {local} to {where}: {error}") from error
        future = UploadFuture(key, local, os.stat(source).st_size, self.clock)
        if on_done is not None:
            future.add_done_callback(on_done)
        job = UploadJob(
            future, source, file, link, bool(overwrite), dict(metadata) if metadata else None, where, bool(checksum)
        )
        try:
            self._enqueue(job)
        except BaseException:
            job.release()
            raise
        return future

    def _enqueue(self, job: UploadJob) -> None:
        started = next_log = self.clock()
        superseded: list[UploadJob] = []
        try:
            with self._cond:
                while True:
                    if self._closed:
                        raise job.error(UploadError, "failed: the uploader is closed", None)
                    older = [old for old in self._queue if old.future.key == job.future.key]
                    for old in older:
                        self._queue.remove(old)
                    superseded += older
                    if len(self._queue) < self.max_queued:
                        break
                    self._cond.wait(_PROGRESS_EVERY_SECONDS)
                    if self.clock() >= next_log + _PROGRESS_EVERY_SECONDS:
                        next_log = self.clock()
                        log.info("upload queue full: %s has waited %.0f s", job.future.key, next_log - started)
                self._queue.append(job)
                self._unfinished.add(job)
                self._cond.notify_all()
        finally:
            for old in superseded:
                self._settle(old, None, superseded=True)
                old.release()
                log.info("dropped the queued upload of %s: a newer file replaces it", old.future.local_path)
        waited = self.clock() - started
        if waited > 0.01:
            log.info("back-pressure: waited %.2f s to queue the upload of %s", waited, job.future.key)

    def poll_errors(self) -> list[UploadError]:
        """Return the failures since the last call, oldest first, without waiting.

        Example:
            >>> for error in uploader.poll_errors():  # doctest: +SKIP
            ...     raise error
        """
        with self._cond:
            errors, self._errors = self._errors, []
        return errors

    def pending(self) -> list[UploadFuture]:
        """The futures of the uploads not finished yet, queued or running.

        Example:
            >>> [future.key for future in uploader.pending()]  # doctest: +SKIP
            ['run1/ba200.pt']
        """
        with self._cond:
            return [job.future for job in self._unfinished]

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every submitted upload has finished (each ends by its deadline), logging progress.

        Returns:
            True once all have finished (failures are in :meth:`poll_errors`); False if ``timeout``
            seconds passed first.

        Example:
            >>> uploader.wait()  # doctest: +SKIP
            True
        """
        end = None if timeout is None else self.clock() + timeout
        last_log = self.clock()
        with self._cond:
            while self._unfinished:
                now = self.clock()
                if end is not None and now >= end:
                    return False
                if now - last_log >= _PROGRESS_EVERY_SECONDS:
                    last_log = now
                    self._log_progress()
                self._cond.wait(_PROGRESS_EVERY_SECONDS if end is None else min(_PROGRESS_EVERY_SECONDS, end - now))
        return True

    def _log_progress(self) -> None:
        jobs = sorted(self._unfinished, key=lambda job: job.future.key)
        log.info(
            "waiting for %d upload(s), %d bytes: %s",
            len(jobs),
            sum(job.future.size for job in jobs),
            ", ".join(f"{j.future.key} ({j.future.attempts} attempt(s), {j.future.elapsed:.0f} s)" for j in jobs[:8]),
        )

    def close(self, drain_timeout: float | None = None) -> list[str]:
        """Refuse new uploads, drain for at most ``drain_timeout`` seconds, then stop the workers.

        Uploads still unfinished then fail with :class:`~ckpt_callbacks.errors.UploadError` (also
        returned by :meth:`poll_errors`) and are logged. Calls after the first do nothing.

        Returns:
            The keys not uploaded because the drain ran out (failures before that are in
            :meth:`poll_errors`).

        Example:
            >>> uploader.close(drain_timeout=60)  # doctest: +SKIP
            []
        """
        with self._cond:
            if self._closed:
                return []
            self._closed = True
            self._cond.notify_all()
        _LIVE.discard(self)
        self.wait(drain_timeout)
        self._stopping.set()
        with self._cond:
            left = sorted(self._unfinished, key=lambda job: job.future.key)
            queued = [job for job in left if job in self._queue]
            self._queue.clear()
            self._cond.notify_all()
        for job in left:
            detail = f"was not uploaded: the uploader closed after draining for {drain_timeout} s"
            self._settle(job, job.error(UploadError, detail, None))
        for job in queued:
            job.release()
        if left:
            log.warning("closed with %d upload(s) unfinished: %s", len(left), ", ".join(j.future.key for j in left))
        return [job.future.key for job in left]

    # -- the workers ----------------------------------------------------------------------------------

    def _start_worker(self) -> None:
        self._threads += 1
        threading.Thread(target=self._work, name=f"ckpt-upload-{self._threads}", daemon=True).start()

    def _take(self) -> UploadJob | None:
        with self._cond:
            while not self._stopping.is_set():
                for job in self._queue:
                    if job.future.key not in self._busy:
                        self._queue.remove(job)
                        self._busy[job.future.key] = job
                        self._cond.notify_all()  # a submitter may be waiting for the free slot
                        return job
                self._cond.wait(_PROGRESS_EVERY_SECONDS)
        return None

    def _work(self) -> None:
        while (job := self._take()) is not None:
            outcome: UploadError | None | bool = False
            try:
                outcome = self._run(job)
            except BaseException as error:  # noqa: BLE001 -- a worker must never die with a future pending
                outcome = job.error(UploadError, f"failed: {error!r}", error)
            finally:
                job.release()  # before settling: once wait() returns, no file is held open
                with self._cond:
                    del self._busy[job.future.key]
                    self._cond.notify_all()
            if outcome is not False:
                self._settle(job, outcome)
            if job.abandoned:
                return  # the supervisor started a replacement when it gave up on this thread

    def _run(self, job: UploadJob) -> UploadError | None | bool:
        if self.stagger_seconds and self._stopping.wait(self._rng.uniform(0.0, self.stagger_seconds)):
            return False
        with self._cond:
            now = self.clock()
            job.future._start(now)
            if job.deadline is None:
                job.deadline = now + self.policy.timeout
            self._cond.notify_all()  # the supervisor learns the deadline
        return job.run(self.store, self.policy, self.clock, self._stopping, self._rng)

    def _settle(self, job: UploadJob, error: UploadError | None, superseded: bool = False) -> None:
        """Fix the outcome: the error is in poll_errors() before any done-callback runs, and wait()
        returns only after the callbacks have run (a manager records the upload in them)."""

        def record() -> None:
            if error is not None:
                with self._cond:
                    self._errors.append(error)

        if not job.future._settle(error, superseded, record):
            return
        with self._cond:
            self._unfinished.discard(job)
            self._cond.notify_all()
        f = job.future
        if error is not None:
            log.warning("%s", error)
        elif not superseded:
            log.debug("uploaded %s (%d bytes, %d attempt(s), %.2f s)", f.key, f.size, f.attempts, f.elapsed)

    # -- the supervisor: deadlines that a stuck store call cannot enforce -----------------------------

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            with self._cond:
                now = self.clock()
                deadlines = {job: job.deadline for job in self._unfinished if job.deadline is not None}
                expired = [(job, self._expire(job, now)) for job, deadline in deadlines.items() if deadline <= now]
                if not expired:
                    nearest = min(deadlines.values(), default=now + _PROGRESS_EVERY_SECONDS)
                    self._cond.wait(max(0.0, min(nearest - now, _PROGRESS_EVERY_SECONDS)))
            for job, detail in expired:
                timeout = job.error(UploadTimeoutError, job.overran(self.policy.timeout, detail), TimeoutError(detail))
                self._settle(job, timeout)
                if not job.abandoned:
                    job.release()  # it was queued: no thread reads it

    def _expire(self, job: UploadJob, now: float) -> str:
        """Under the lock: take an upload past its deadline off the queue, or off its worker."""
        if job in self._queue:
            self._queue.remove(job)
            return "it waited behind an earlier upload of the same key that did not come back"
        job.abandoned = True
        self._start_worker()  # the abandoned thread leaves when (if ever) its store call returns
        # A newer upload of the key starts only when that thread is back (else the old bytes could land
        # last); give it one full deadline from now rather than an unbounded wait.
        for queued in self._queue:
            if queued.future.key == job.future.key and queued.deadline is None:
                queued.deadline = now + self.policy.timeout
        return "the store call was still running at the deadline" if job.in_call else "out of time"


def _drain_at_exit() -> None:
    """Give unclosed uploaders at most their ``shutdown_timeout``, together rather than in turn."""
    start = time.monotonic()
    for uploader in list(_LIVE):
        uploader.close(drain_timeout=max(0.0, uploader.shutdown_timeout - (time.monotonic() - start)))


atexit.register(_drain_at_exit)
