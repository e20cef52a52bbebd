"""A tiny, real training setup shared by the black-box tests: 8 samples a batch, 5 batches an epoch."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from ckpt_callbacks import Trainer

BATCH_SIZE = 8


def make_loader(batches_per_epoch: int = 5, shuffle: bool = True) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batches_per_epoch * BATCH_SIZE, 4, generator=generator)
    targets = inputs.sum(dim=1, keepdim=True)
    return DataLoader(TensorDataset(inputs, targets), batch_size=BATCH_SIZE, shuffle=shuffle)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.25), torch.nn.Linear(8, 1))


def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    inputs, targets = batch
    return torch.nn.functional.mse_loss(model(inputs), targets)


def make_trainer(callbacks=(), max_duration="2ep", batches_per_epoch: int = 5, **kwargs: Any) -> Trainer:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.9)
    kwargs.setdefault("run_name", "test-run")
    return Trainer(
        model, optimizer, make_loader(batches_per_epoch), loss_fn=loss_fn, max_duration=max_duration,
        callbacks=list(callbacks), schedulers=scheduler, **kwargs,
    )


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.state.model.state_dict().items()}
