"""Progress reporting as a small callback object, passed down with a do-nothing default.

Library functions that move many bytes (downloads, verifying several files) take a ``progress``
argument: a :class:`Progress`, whose methods do nothing, unless the caller wants to see something.
The command line passes a :class:`TqdmCallback`, the only place tqdm is used (as fsspec's
``callbacks.py`` does): a bar with bytes, rate and ETA on stderr when stderr is a terminal, and
nothing at all in a pipe or a log file, so scripts parsing ``--json`` output never see bar debris.

A :class:`Progress` is also a plain ``callable(bytes_done)``, which is what the object stores'
``progress=`` hooks take (:data:`ckpt_callbacks.remote.base.ProgressCallback`).
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any, TextIO

__all__ = ["Progress", "TqdmCallback"]


class Progress:
    """Receives progress in bytes (or any unit); this base class ignores it.

    Example:
        >>> progress = Progress()
        >>> progress.set_total(1024)
        >>> progress(512)  # same as progress.update(512)
        >>> progress.close()
    """

    def set_total(self, total: int | None) -> None:
        """Announce how much work there is (``None``: unknown)."""

    def update(self, done: int) -> None:
        """Report ``done`` more units of work finished."""

    def set_description(self, text: str) -> None:
        """Say what is being worked on now (a file name, say)."""

    def close(self) -> None:
        """The work is over (or abandoned)."""

    def __call__(self, done: int) -> None:
        self.update(done)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


class TqdmCallback(Progress):
    """A tqdm bar in bytes (size, rate, ETA), shown only when the stream is a terminal.

    The bar appears at the first report, so an operation that reports nothing (a local file
    that needs no download) draws nothing.

    Args:
        description: The bar's label.
        file: Where the bar goes (default: stderr, so stdout stays clean for data).
        enabled: Force the bar on or off; ``None`` (default) shows it iff ``file`` is a terminal.

    Example:
        >>> with TqdmCallback("download ep1.pt", enabled=False) as progress:
        ...     progress.set_total(2048)
        ...     progress(2048)
    """

    def __init__(self, description: str = "", *, file: TextIO | None = None, enabled: bool | None = None) -> None:
        self._file = file if file is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self._file, "isatty", None)
            enabled = bool(isatty and isatty())
        self._enabled = enabled
        self._description = description
        self._bar: Any = None

    @property
    def enabled(self) -> bool:
        """Whether a bar is drawn."""
        return self._enabled

    def _drawn(self) -> Any:
        if self._bar is None and self._enabled:
            # Imported here: tqdm is needed only when a bar is actually drawn.
            from tqdm import tqdm

            self._bar = tqdm(
                desc=self._description, file=self._file, unit="B", unit_scale=True, unit_divisor=1024,
                dynamic_ncols=True, leave=False,
            )
        return self._bar

    def set_total(self, total: int | None) -> None:
        """Announce the total, so the bar can show a percentage and an ETA."""
        bar = self._drawn()
        if bar is not None:
            bar.reset(total=total)

    def update(self, done: int) -> None:
        """Advance the bar by ``done`` bytes."""
        bar = self._drawn()
        if bar is not None:
            bar.update(done)

    def set_description(self, text: str) -> None:
        """Relabel the bar."""
        self._description = text
        if self._bar is not None:
            self._bar.set_description_str(text)

    def close(self) -> None:
        """Remove the bar from the terminal."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
