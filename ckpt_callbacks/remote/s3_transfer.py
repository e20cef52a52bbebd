"""s3transfer plumbing of the ``s3://`` backend: per-upload context, daemon workers, botocore hooks.

Each upload gets its own ``TransferManager`` whose executors are :class:`DaemonExecutor`: their
threads are daemons (``concurrent.futures`` joins its threads at interpreter exit, so one stuck in a
socket would hang the exit) and each knows the :class:`UploadContext` it serves, in a thread-local.
botocore calls the hooks of this module on those threads, so they can act per upload:

- :func:`add_if_none_match` adds ``If-None-Match: *`` to PutObject and CompleteMultipartUpload of an
  ``overwrite=False`` upload (s3transfer does not pass that argument through);
- :func:`record_upload_id` notes multipart upload ids, so the caller can abort them itself;
- :func:`check_deadline` runs before every request (parts and retries; aborts excepted) and the
  progress subscriber while a body is read: past the deadline both raise :class:`Abandoned`, so
  the transfer fails and s3transfer aborts its multipart upload.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from s3transfer.subscribers import BaseSubscriber

from ckpt_callbacks.errors import UploadTimeoutError
from ckpt_callbacks.remote.base import ProgressCallback

__all__ = [
    "Abandoned",
    "DaemonExecutor",
    "ProgressSubscriber",
    "UploadContext",
    "add_if_none_match",
    "check_deadline",
    "record_upload_id",
]

_local = threading.local()  # .context: the UploadContext a transfer worker thread is serving


class Abandoned(UploadTimeoutError):
    """Raised inside a transfer worker once its upload is past its deadline or abandoned.

    Example:
        >>> issubclass(Abandoned, UploadTimeoutError)
        True
    """


@dataclass
class UploadContext:
    """What the botocore hooks and the workers of one transfer share.

    Example:
        >>> context = UploadContext(if_none_match=True, deadline=time.monotonic() + 600, progress=None)
        >>> context.check()  # raises Abandoned once the deadline has passed
    """

    if_none_match: bool
    deadline: float | None
    progress: ProgressCallback | None
    abandoned: bool = False
    sent: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    upload_ids: list[str] = field(default_factory=list)
    executors: list[DaemonExecutor] = field(default_factory=list)

    def check(self) -> None:
        """Raise :class:`Abandoned` if the transfer is abandoned or past its deadline."""
        if self.abandoned or (self.deadline is not None and time.monotonic() >= self.deadline):
            self.abandoned = True
            raise Abandoned("the upload is past its deadline")


class DaemonExecutor:
    """An s3transfer executor (``executor_cls``): daemon threads, started on demand, bound to a context.

    Example:
        >>> from functools import partial
        >>> context = UploadContext(if_none_match=False, deadline=None, progress=None)
        >>> manager = TransferManager(client, executor_cls=partial(DaemonExecutor, context=context))  # doctest: +SKIP
    """

    def __init__(self, max_workers: int | None = None, *, context: UploadContext | None = None) -> None:
        self._max_workers = max_workers or 1
        self._context = context
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        if context is not None:
            context.executors.append(self)

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run ``fn(*args, **kwargs)`` on a worker thread; return its future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._tasks.put((future, fn, args, kwargs))
        if not self._idle.acquire(blocking=False):
            with self._lock:
                if len(self._threads) < self._max_workers:
                    thread = threading.Thread(target=self._work, name="ckpt-s3-transfer", daemon=True)
                    self._threads.append(thread)
                    thread.start()
        return future

    def _work(self) -> None:
        _local.context = self._context
        while (item := self._tasks.get()) is not None:
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # the future carries it to s3transfer
                    future.set_exception(exc)
            self._idle.release()

    def shutdown(self, wait: bool = True) -> None:
        """Let the workers end after the queued tasks; with ``wait``, join them."""
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._tasks.put(None)
        if wait:
            for thread in threads:
                thread.join()


class ProgressSubscriber(BaseSubscriber):
    """Reports progress, checks the deadline while a body is read, and signals the end of a transfer.

    Example:
        >>> manager.upload(path, bucket, key, subscribers=[ProgressSubscriber(context, size)])  # doctest: +SKIP
    """

    def __init__(self, context: UploadContext, size: int | None = None) -> None:
        self._context = context
        self._size = size

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        """Hand s3transfer the size we know, which spares it a HEAD request."""
        if self._size is not None:
            future.meta.provide_transfer_size(self._size)

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        """Count bytes (negative when a retried request rewinds its body) and stop at the deadline."""
        self._context.check()  # called while the body is read: stops a request mid-way
        self._context.sent += bytes_transferred
        if self._context.progress is not None:
            self._context.progress(bytes_transferred)

    def on_done(self, future: Any, **kwargs: Any) -> None:
        """Wake the caller waiting for this transfer."""
        self._context.done.set()


def _current() -> UploadContext | None:
    return getattr(_local, "context", None)


def add_if_none_match(params: dict, **kwargs: Any) -> None:
    """botocore ``before-parameter-build`` hook: ``If-None-Match: *`` for an ``overwrite=False`` upload.

    Example:
        >>> client.meta.events.register("before-parameter-build.s3.PutObject", add_if_none_match)  # doctest: +SKIP
    """
    context = _current()
    if context is not None and context.if_none_match:
        params["IfNoneMatch"] = "*"


def record_upload_id(parsed: dict, **kwargs: Any) -> None:
    """botocore ``after-call.s3.CreateMultipartUpload`` hook: remember the id, to abort it ourselves.

    Example:
        >>> client.meta.events.register("after-call.s3.CreateMultipartUpload", record_upload_id)  # doctest: +SKIP
    """
    context = _current()
    if context is not None and parsed.get("UploadId"):
        context.upload_ids.append(parsed["UploadId"])


def check_deadline(event_name: str = "", **kwargs: Any) -> None:
    """botocore ``before-send`` hook: no new part and no retry of a transfer past its deadline.

    An abort always goes out: s3transfer's own cleanup of an abandoned multipart upload runs on the
    transfer's threads too, and it must reach the store.

    Example:
        >>> client.meta.events.register("before-send.s3", check_deadline)  # doctest: +SKIP
    """
    context = _current()
    if context is not None and not event_name.endswith(".AbortMultipartUpload"):
        context.check()
