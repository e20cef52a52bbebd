"""Where one saver's files go on this rank: its folder, checkpoint names, and ``latest``/``best`` links.

A :class:`Layout` formats the saver's templates with the run name and this rank's variables once,
and then with a timestamp per checkpoint; it also scans the folder with the same template, so that
the ``overwrite=False`` check reads names exactly as they were written.
"""

from __future__ import annotations

import os
from pathlib import Path

from ckpt_callbacks.dist import DistInfo
from ckpt_callbacks.errors import CheckpointExistsError
from ckpt_callbacks.naming import DIST_VARIABLES, RUN_VARIABLES, NameTemplate, check_relative, is_later
from ckpt_callbacks.record import scan_folder
from ckpt_callbacks.storage import resolve_latest
from ckpt_callbacks.time import Timestamp

__all__ = ["FOLDER_VARIABLES", "Layout"]

FOLDER_VARIABLES = RUN_VARIABLES + DIST_VARIABLES
"""The variables a ``folder`` template may use: a time variable there would make every scan glob folders."""


class Layout:
    """The formatted folder and name templates of one saver on one rank.

    Example:
        >>> layout = Layout("{run_name}/ckpt", "ba{batch}-rank{rank}.pt", "latest-rank{rank}.pt", None,
        ...                 run_name="exp1", rank_info=DistInfo(0, 1, 0, 1, 0))
        >>> layout.folder, layout.name(Timestamp(batch=5))
        (PosixPath('exp1/ckpt'), 'ba5-rank0.pt')
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        filename: str | os.PathLike,
        latest_filename: str | os.PathLike | None,
        best_filename: NameTemplate | None,
        *,
        run_name: str,
        rank_info: DistInfo,
    ) -> None:
        self.folder_template = NameTemplate(folder, argument="folder", allowed=FOLDER_VARIABLES, relative=False)
        self.filename = NameTemplate(filename, argument="filename")
        self.latest_filename = (
            None if latest_filename is None else NameTemplate(latest_filename, argument="latest_filename")
        )
        self.best_filename = best_filename
        self.fixed = {"run_name": run_name, **rank_info.format_variables()}
        self.folder = Path(self.folder_template.format(**self.fixed))
        # A run name (or rank value) that takes a name out of the folder ('../..') fails now, not at
        # the first save.
        self.name(Timestamp())
        self.latest_path(Timestamp())

    def name(self, timestamp: Timestamp) -> str:
        """The checkpoint's name relative to the folder."""
        values = {**self.fixed, **timestamp.format_variables()}
        return check_relative(self.filename.format(**values), argument="filename")

    def latest_path(self, timestamp: Timestamp) -> Path | None:
        """Where the ``latest`` link of a checkpoint saved at ``timestamp`` goes (None: no link)."""
        if self.latest_filename is None:
            return None
        values = {**self.fixed, **timestamp.format_variables()}
        return self.folder / check_relative(self.latest_filename.format(**values), argument="latest_filename")

    def latest_target(self, timestamp: Timestamp) -> Path | None:
        """Where the ``latest`` link of ``timestamp``'s name currently points (None: no link)."""
        link = self.latest_path(timestamp)
        return None if link is None else resolve_latest(link)

    def best_path(self) -> Path | None:
        """Where the ``best`` link goes (None: no link)."""
        if self.best_filename is None:
            return None
        return self.folder / check_relative(self.best_filename.format(**self.fixed), argument="best_filename")

    def relative(self, path: Path) -> str | None:
        """``path`` relative to the folder, or None when it is on another drive."""
        try:
            return os.path.relpath(path.resolve(), self.folder.resolve())
        except ValueError:
            return None

    def check_conflicts(self, timestamp: Timestamp, *, ignore: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """Composer's ``overwrite=False`` rule: refuse a folder holding later checkpoints of this
        template (except the names in ``ignore``).

        Raises:
            CheckpointExistsError: naming the first conflicting checkpoint.
        """
        current = timestamp.format_variables()
        for name in scan_folder(self.folder, self.filename, self.fixed):
            if name in ignore:
                continue
            found = self.filename.parse(name, **self.fixed)
            if found is not None and is_later(found, current):
                raise CheckpointExistsError(
                    f"{self.folder / name} may conflict with a future checkpoint of the current run "
                    f"(it is later than the current time, {timestamp}). Delete that file, choose another "
                    "folder, resume from it (autoresume=True), or set overwrite=True."
                )
