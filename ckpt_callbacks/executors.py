"""Where the pipeline's steps after capture run: inline (``save_mode='sync'``) or on one background
thread (``save_mode='async'``).

Both return ``concurrent.futures.Future`` objects, so the manager treats them alike. The background
executor has a single worker: checkpoints are committed in the order they were captured.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

__all__ = ["BackgroundExecutor", "InlineExecutor", "executor_for"]


class InlineExecutor:
    """Runs each submitted job at once on the caller's thread (``save_mode='sync'``).

    Example:
        >>> InlineExecutor().submit(lambda: 1 + 1).result()
        2
    """

    def submit(self, job: Callable[[], Any]) -> Future:
        """Run ``job`` now and return a completed future holding its result or exception."""
        future: Future = Future()
        try:
            future.set_result(job())
        except BaseException as error:  # noqa: BLE001 -- handed to the caller through the future
            future.set_exception(error)
        return future

    def shutdown(self) -> None:
        """Nothing to stop."""


class BackgroundExecutor:
    """Runs jobs one at a time on a background thread (``save_mode='async'``).

    The thread is not a daemon: at interpreter exit Python waits for the save in flight to be
    committed rather than leaving a temp file behind.

    Example:
        >>> executor = BackgroundExecutor()
        >>> executor.submit(lambda: 6 * 7).result()
        42
        >>> executor.shutdown()
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-callbacks-save")

    def submit(self, job: Callable[[], Any]) -> Future:
        """Queue ``job``; the future completes when it has run."""
        return self._pool.submit(job)

    def shutdown(self) -> None:
        """Finish the queued jobs and stop the thread."""
        self._pool.shutdown(wait=True)


def executor_for(save_mode: str) -> InlineExecutor | BackgroundExecutor:
    """The executor of a ``save_mode`` (``'sync'`` or ``'async'``)."""
    return BackgroundExecutor() if save_mode == "async" else InlineExecutor()
