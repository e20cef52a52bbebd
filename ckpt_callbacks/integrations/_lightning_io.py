"""The ``CheckpointIO`` half of the Lightning integration, shared by both Lightning packages.

:class:`LightningIOMixin` wraps the strategy's own ``CheckpointIO`` plugin (the saver installs it at
setup). Saving: during one of our saves it captures the checkpoint dict that the strategy hands to
its plugin on rank 0, instead of writing it (the manager commits it under our name); every other
save (Lightning's ``ModelCheckpoint``) and every removal goes to the wrapped plugin unchanged.
Loading: it resolves ``latest`` links and pointer files, downloads remote URIs, decodes compressed
files and tar bundles into a plain temp file, and lets the wrapped plugin load that, so Lightning's
own loader reads every format we write. ``ckpt_path=AUTORESUME`` resolves to the newest full
checkpoint of the trainer's savers, or to "nothing to resume".
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt_callbacks.archive import copy_member
from ckpt_callbacks.decoding import open_decoded
from ckpt_callbacks.errors import ConfigurationError, bad_value
from ckpt_callbacks.loader import find_resume_checkpoint
from ckpt_callbacks.locations import is_uri, local_checkpoint
from ckpt_callbacks.record import NATIVE_METADATA_KEY
from ckpt_callbacks.temp_files import temp_path_for

if TYPE_CHECKING:
    from ckpt_callbacks.integrations._lightning import LightningSaverMixin

__all__ = ["AUTORESUME", "LightningIOMixin"]

log = logging.getLogger(__name__)

AUTORESUME = "ckpt-callbacks:autoresume"
"""Pass as ``trainer.fit(model, ckpt_path=AUTORESUME)``: resume from the newest full checkpoint of the
trainer's savers (local, or from the store), or start fresh when there is none."""

_VERSION_KEY = "pytorch-lightning_version"


class _NothingToResume(dict):
    """What ``ckpt_path=AUTORESUME`` loads when there is no checkpoint: Lightning restores nothing from
    a falsy checkpoint, and finds its own version in it, so it has nothing to migrate."""

    def __bool__(self) -> bool:
        return False


@dataclasses.dataclass
class _Sink:
    """Receives the checkpoint dict the strategy hands to its CheckpointIO during one of our saves."""

    checkpoint: dict[str, Any] | None = None


class LightningIOMixin:
    """A Lightning ``CheckpointIO`` that wraps another: ours captures, decodes and resolves, the
    wrapped one does the rest (see the module docstring).

    Args:
        checkpoint_io: the plugin to wrap; None for Lightning's ``TorchCheckpointIO``.
        storage_options: credentials and endpoint for remote ``ckpt_path`` URIs; None to use the
            first saver's ``storage_options`` (or the environment).

    Example:
        >>> class CheckpointIO(LightningIOMixin, lightning.fabric.plugins.CheckpointIO):  # doctest: +SKIP
        ...     def _default_io(self): return TorchCheckpointIO()
        ...     def _package_version(self): return lightning.pytorch.__version__
    """

    def __init__(self, checkpoint_io: Any = None, *, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        if storage_options is not None and not isinstance(storage_options, dict):
            raise ConfigurationError(bad_value("storage_options", "None or a dict", storage_options))
        self.checkpoint_io = checkpoint_io
        self.storage_options = storage_options
        self.savers: list[LightningSaverMixin] = []
        self.resumed_from: str | None = None
        self._sink: _Sink | None = None

    def _default_io(self) -> Any:
        """The package's ``TorchCheckpointIO`` (set by the public module)."""
        raise NotImplementedError

    def _package_version(self) -> str:
        """The Lightning package's version (set by the public module)."""
        raise NotImplementedError

    @property
    def base(self) -> Any:
        """The wrapped plugin."""
        if self.checkpoint_io is None:
            self.checkpoint_io = self._default_io()
        return self.checkpoint_io

    def register(self, saver: LightningSaverMixin) -> None:
        """Remember a saver of this trainer (for ``AUTORESUME`` and remote credentials)."""
        if saver not in self.savers:
            self.savers.append(saver)

    @contextlib.contextmanager
    def capture(self) -> Iterator[_Sink]:
        """Within the block, a save hands its dict to the yielded sink instead of writing a file."""
        self._sink = _Sink()
        try:
            yield self._sink
        finally:
            self._sink = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Capture the dict during one of our saves; otherwise save through the wrapped plugin."""
        if self._sink is not None:
            self._sink.checkpoint = checkpoint
            return
        self.base.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def remove_checkpoint(self, path: Any) -> None:
        """Remove through the wrapped plugin (Lightning's ``ModelCheckpoint`` pruning)."""
        self.base.remove_checkpoint(path)

    def teardown(self) -> None:
        """Tear the wrapped plugin down."""
        self.base.teardown()

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a checkpoint of any of our formats, local or remote, or ``AUTORESUME``.

        Raises:
            ConfigurationError: ``AUTORESUME`` without one of our full-state savers with a ``run_name``.
            CheckpointNotFoundError: nothing at ``path``.
            CorruptCheckpointError: ``path`` does not decode.
        """
        if str(path) == AUTORESUME:
            found = self._autoresume()
            if found is None:
                log.info("autoresume: no checkpoint of this run yet; training starts fresh")
                return _NothingToResume({_VERSION_KEY: self._package_version()})
            path = found
        with self._plain_file(os.fspath(path)) as plain:
            checkpoint = self.base.load_checkpoint(plain, map_location=map_location, weights_only=weights_only)
        checkpoint.pop(NATIVE_METADATA_KEY, None)
        return checkpoint

    def _autoresume(self) -> Path | None:
        savers = [s for s in self.savers if not s.driver.saver.weights_only]
        if not savers:
            raise ConfigurationError(
                f"ckpt_path={AUTORESUME!r} needs a full-state ckpt_callbacks CheckpointSaver in the Trainer's callbacks"
            )
        unnamed = [s for s in savers if s.run_name is None]
        if unnamed:
            raise ConfigurationError(
                f"ckpt_path={AUTORESUME!r} needs CheckpointSaver(run_name=...): a generated name never finds "
                f"the earlier run (got run_name=None for folder={unnamed[0].driver.saver.folder.template!r})"
            )
        found = find_resume_checkpoint([s.driver.saver.manager for s in savers if s.driver.saver.manager])
        if found is not None:
            log.info("autoresume: resuming from %s", found)
        return found

    def _remote_options(self) -> dict[str, Any] | None:
        if self.storage_options is not None:
            return self.storage_options
        remotes = [s.driver.saver.remote for s in self.savers if s.driver.saver.remote is not None]
        return dict(remotes[0].storage_options) if remotes else None

    @contextlib.contextmanager
    def _plain_file(self, location: str) -> Iterator[str]:
        """``location`` as a local, uncompressed ``torch.save`` file (or a folder), for Lightning's loader."""
        with local_checkpoint(location, storage_options=self._remote_options()) as local:
            if not is_uri(location):
                self.resumed_from = str(local)
            with self._decoded(local) as plain:
                yield plain

    @contextlib.contextmanager
    def _decoded(self, path: Path) -> Iterator[str]:
        if path.is_dir():
            yield str(path)
            return
        with open_decoded(path) as decoded:
            if decoded.kind == "safetensors":
                accepted = "a full checkpoint to resume from (a .safetensors export holds weights only)"
                raise ConfigurationError(bad_value("ckpt_path", accepted, str(path)))
            if decoded.kind == "zip" and decoded.codec is None:
                yield str(path)
                return
            # Decoded next to the checkpoint, as our own loader does (/tmp is often a small tmpfs on
            # training nodes); a temp name, so that a saver's sweep removes what a crash leaves.
            scratch = None if os.access(path.parent, os.W_OK) else Path(tempfile.mkdtemp(prefix="ckpt-callbacks-"))
            plain = scratch / "checkpoint.ckpt" if scratch else temp_path_for(path.parent / f"decoded-{path.name}")
            try:
                with open(plain, "wb") as out:
                    if decoded.kind == "tar":
                        copy_member(decoded.stream, out, source=path)
                    else:
                        shutil.copyfileobj(decoded.stream, out, 2**20)
                yield str(plain)
            finally:
                plain.unlink(missing_ok=True)
                if scratch is not None:
                    shutil.rmtree(scratch, ignore_errors=True)
