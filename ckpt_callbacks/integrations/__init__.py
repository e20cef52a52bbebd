"""Our savers inside other trainers: PyTorch Lightning and the Hugging Face ``Trainer``.

Each integration is one callback that a user adds to the ``callbacks`` list they already pass, with
the arguments of :class:`~ckpt_callbacks.saver.CheckpointSaver`:

- :mod:`ckpt_callbacks.integrations.lightning` (``lightning.pytorch``) and
  :mod:`ckpt_callbacks.integrations.pytorch_lightning` (the standalone ``pytorch_lightning``
  package): ``CheckpointSaver``, a Lightning ``Checkpoint`` callback whose full checkpoints are
  Lightning's own checkpoint dicts, plus the ``CheckpointIO`` plugin that resumes from compressed
  files, tar bundles and remote URIs, and ``AUTORESUME``.
- :mod:`ckpt_callbacks.integrations.transformers`: ``CheckpointSaverCallback``, a
  ``TrainerCallback`` that commits every ``checkpoint-N/`` folder the Trainer writes under our
  names, and ``resume_from_latest``.

The submodules import their trainer package when imported; without it their classes raise an
``ImportError`` naming the extra to install (``pip install 'ckpt-callbacks[lightning]'``).
"""

from __future__ import annotations

__all__: list[str] = []
