"""Our savers inside the standalone ``pytorch_lightning`` package: one callback, Lightning's own checkpoints.

The same integration as :mod:`ckpt_callbacks.integrations.lightning`, built on this package's
``Callback`` and ``CheckpointIO`` classes (Lightning checks them with ``isinstance``, and the two
packages' classes differ).

Add :class:`CheckpointSaver` to the ``callbacks`` you pass to ``pytorch_lightning.Trainer``. It takes the
arguments of the core :class:`~ckpt_callbacks.saver.CheckpointSaver` (names, intervals, compression
by extension, retention, uploads, async saving) plus ``run_name``, ``num_samples_fn`` and
``num_tokens_fn``. Full checkpoints are the dict ``trainer.save_checkpoint`` writes, taken through
the strategy, so ``trainer.fit(model, ckpt_path=<our file>)`` resumes natively; weights-only saves
are Lightning's ``save_weights_only`` checkpoints (or plain tensors for a ``.safetensors`` name).
The saver installs :class:`CheckpointIO` around the strategy's plugin, which lets ``ckpt_path``
be a compressed file, a tar bundle, a ``latest`` link, a remote URI, or :data:`AUTORESUME`. How it
works: :mod:`ckpt_callbacks.integrations._lightning`. For the standalone ``pytorch_lightning``
package use this module.
"""

from __future__ import annotations

from typing import Any

from ckpt_callbacks.integrations._adapter import missing_package
from ckpt_callbacks.integrations._lightning import LightningSaverMixin
from ckpt_callbacks.integrations._lightning_io import AUTORESUME, LightningIOMixin

try:
    import pytorch_lightning as _package
    from lightning_fabric.plugins import CheckpointIO as _CheckpointIOBase
    from lightning_fabric.plugins import TorchCheckpointIO as _TorchCheckpointIO
    from pytorch_lightning.callbacks import Checkpoint as _CheckpointBase
except ImportError as _error:
    _CheckpointIOBase = missing_package("pytorch_lightning", 'pip install pytorch-lightning', _error)  # type: ignore[misc,assignment]
    _CheckpointBase = missing_package("pytorch_lightning", 'pip install pytorch-lightning', _error)  # type: ignore[misc,assignment]

__all__ = ["AUTORESUME", "CheckpointIO", "CheckpointSaver"]


class CheckpointIO(LightningIOMixin, _CheckpointIOBase):  # type: ignore[misc,valid-type]
    """A ``CheckpointIO`` plugin that loads our checkpoints: compressed, tar, ``latest`` links, remote URIs.

    :class:`CheckpointSaver` installs it around the strategy's plugin at setup; pass it yourself in
    ``Trainer(plugins=[CheckpointIO()])`` to resume from our files without a saver (for example in
    another job), or to give remote credentials. Everything it does not handle goes to the plugin it
    wraps.

    Args:
        checkpoint_io: the plugin to wrap; None for Lightning's ``TorchCheckpointIO``.
        storage_options: credentials and endpoint for remote ``ckpt_path`` URIs (``endpoint_url``,
            ``key``, ``secret``, ...); None for the first saver's, or the environment.

    Example:
        >>> trainer = pytorch_lightning.Trainer(plugins=[CheckpointIO(storage_options={"endpoint_url": url})])  # doctest: +SKIP
        >>> trainer.fit(model, ckpt_path="s3://bucket/runs/exp1/checkpoints/latest-rank0.pt.zst.symlink")  # doctest: +SKIP
    """

    def _default_io(self) -> Any:
        return _TorchCheckpointIO()

    def _package_version(self) -> str:
        return _package.__version__


class CheckpointSaver(LightningSaverMixin, _CheckpointBase):  # type: ignore[misc,valid-type]
    """Save checkpoints of a ``pytorch_lightning.Trainer`` run with our names, formats, uploads and pruning.

    A Lightning ``Checkpoint`` callback (so Lightning adds no default ``ModelCheckpoint`` beside it,
    and runs it after the other callbacks of each hook). Several savers, and Lightning's own
    ``ModelCheckpoint``, work side by side.

    Args:
        folder, filename, remote_file_name, latest_filename, latest_remote_file_name, save_interval:
            as in :class:`ckpt_callbacks.saver.CheckpointSaver`; ``{batch}`` counts optimizer steps
            (Lightning's ``global_step``), ``{epoch}`` finished epochs.
        run_name: the value of ``{run_name}``; needed for ``ckpt_path=AUTORESUME``. None: a generated name.
        num_samples_fn: ``fn(batch) -> int`` samples in one batch of one rank; default its first dimension.
        num_tokens_fn: ``fn(batch) -> int`` tokens in one batch of one rank (``{token}``, ``'1000tok'``);
            default 0.
        **options: the keyword-only arguments of :class:`ckpt_callbacks.saver.CheckpointSaver`
            (``num_checkpoints_to_keep``, ``weights_only``, ``remote``, ``save_mode``, ...);
            ``ranks`` must be ``'rank0'``.

    Raises:
        ConfigurationError: a bad argument, naming it, its value and what is accepted.
        ImportError: ``pytorch_lightning`` is not installed (``pip install pytorch-lightning``).

    Example:
        >>> saver = CheckpointSaver(folder="{run_name}/checkpoints", filename="ba{batch}.pt.zst",
        ...                         save_interval="100ba", num_checkpoints_to_keep=2, run_name="exp1")  # doctest: +SKIP
        >>> trainer = pytorch_lightning.Trainer(max_epochs=3, callbacks=[saver])  # doctest: +SKIP
        >>> trainer.fit(model, ckpt_path=AUTORESUME)  # doctest: +SKIP
    """

    _checkpoint_io_class = CheckpointIO
