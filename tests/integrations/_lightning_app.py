"""A tiny, real Lightning training setup for the integration tests, for either Lightning package.

8 batches of 8 samples an epoch, no shuffling, Adam without dropout: two runs that train the same
steps end with bit-identical weights on CPU, which is what the resume tests compare.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

BATCHES_PER_EPOCH = 8
BATCH_SIZE = 8


class Crash(RuntimeError):
    """Raised by the crash callback: a job killed mid-training."""


def make_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(BATCHES_PER_EPOCH * BATCH_SIZE, 8, generator=generator)
    return DataLoader(TensorDataset(inputs, inputs.sum(dim=1, keepdim=True)), batch_size=BATCH_SIZE)


def make_module(pl: ModuleType) -> Any:
    """A LightningModule of package ``pl`` (``lightning.pytorch`` or ``pytorch_lightning``)."""

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inputs, targets = batch
            loss = torch.nn.functional.mse_loss(self.layer(inputs), targets)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            inputs, targets = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.layer(inputs), targets))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    return Net()


def crash_at(pl: ModuleType, step: int) -> Any:
    """A callback that kills the run when ``global_step`` reaches ``step``."""

    class CrashAt(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == step:
                raise Crash(f"killed at step {step}")

    return CrashAt()


def fit(
    pl: ModuleType, callbacks: list[Any], max_epochs: int, ckpt_path: Any = None, *, validate: bool = False,
    **trainer_options: Any,
) -> tuple[Any, Any]:
    """Train a fresh module; returns (trainer, module). A Crash propagates."""
    module = make_module(pl)
    # Without a checkpoint callback Lightning would add its default ModelCheckpoint, writing into the CWD.
    checkpointing = any(isinstance(callback, pl.callbacks.Checkpoint) for callback in callbacks)
    trainer = pl.Trainer(
        max_epochs=max_epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=2 if validate else 0,
        enable_checkpointing=checkpointing, **trainer_options,
    )
    trainer.fit(module, make_loader(), make_loader() if validate else None, ckpt_path=ckpt_path)
    return trainer, module


def weights(module: Any) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}
