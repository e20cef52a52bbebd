"""The ``ckpt-callbacks`` command.

Commands:
    demo    train a small model with two savers, stop, resume, and show what happened.

Exit codes: 0 success, 1 failure, 2 usage error. Errors print one line unless ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, TensorDataset

from ckpt_callbacks.errors import CheckpointError
from ckpt_callbacks.events import Callback
from ckpt_callbacks.saver import CheckpointSaver
from ckpt_callbacks.state import State
from ckpt_callbacks.time import Timestamp
from ckpt_callbacks.trainer import Trainer

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckpt-callbacks",
        description="Checkpointing for PyTorch training loops: tools to look at and use checkpoints.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        help="train a small model with two savers, stop, resume, and show what was saved",
        description="Train a small MLP with two savers (weights-only exports every epoch, full training "
        "state every 4 batches), stop mid-training, resume from the latest checkpoint in a second run, "
        "and print what was saved and resumed.",
    )
    demo.add_argument("--folder", type=Path, help="where to write (default: a temporary folder, removed after)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (CheckpointError, OSError) as error:
        if args.debug:
            raise
        print(f"ckpt-callbacks: error: {error}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------- demo


def _demo_data() -> DataLoader:
    """A regression task with a real signal: y = sin(x0) + x1 * x2, plus a little noise."""
    generator = torch.Generator().manual_seed(1234)
    inputs = torch.randn(640, 8, generator=generator)
    targets = (torch.sin(inputs[:, 0]) + inputs[:, 1] * inputs[:, 2]).unsqueeze(1)
    targets += 0.01 * torch.randn(targets.shape, generator=generator)
    return DataLoader(TensorDataset(inputs, targets), batch_size=64, shuffle=True)


class _FitStart(Callback):
    """Remembers the timestamp training started from (after any resume)."""

    timestamp: Timestamp | None = None

    def fit_start(self, state: State) -> None:
        self.timestamp = state.timestamp


def _demo_trainer(
    folder: Path, max_duration: str
) -> tuple[Trainer, CheckpointSaver, CheckpointSaver, list[float], _FitStart]:
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses: list[float] = []

    def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        losses.append(loss.item())
        return loss

    exports = CheckpointSaver(
        folder=str(folder / "{run_name}" / "exports"), filename="ep{epoch}-ba{batch}.pt",
        latest_filename="latest-export.pt", save_interval="1ep", weights_only=True,
    )
    full = CheckpointSaver(
        folder=str(folder / "{run_name}" / "checkpoints"), filename="ep{epoch}-ba{batch}-rank{rank}.pt.gz",
        save_interval="4ba", num_checkpoints_to_keep=2,
    )
    start = _FitStart()
    trainer = Trainer(
        model, optimizer, _demo_data(), loss_fn=loss_fn, max_duration=max_duration, run_name="demo-run",
        callbacks=[exports, full, start], autoresume=True, seed=7,
    )
    return trainer, exports, full, losses, start


def _demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="ckpt-callbacks-demo-"))
    try:
        print(f"Writing to {folder}\n")
        print("Run 1: train for 25 batches (10 batches per epoch), as if the job were stopped mid-epoch.")
        trainer, exports, full, losses, _ = _demo_trainer(folder, "25ba")
        trainer.fit()
        first = trainer.state.timestamp
        _table(
            ["saver", "kept on disk"],
            [["weights-only, every epoch", ", ".join(Path(p).name for p in exports.saved_checkpoints)],
             ["full state, every 4 batches, keep 2", ", ".join(Path(p).name for p in full.saved_checkpoints)]],
        )
        print(f"  stopped at {_when(first)}; loss first / last {losses[0]:.4f} / {losses[-1]:.4f}\n")

        print("Run 2: same run_name, autoresume=True, train to 4 epochs.")
        trainer, exports, full, losses, start = _demo_trainer(folder, "4ep")
        trainer.fit()
        resumed = Path(trainer.state.resumed_from or "nothing").name
        last = trainer.state.timestamp
        _table(
            ["", "value"],
            [["resumed from", resumed],
             ["training resumed at", _when(start.timestamp)],
             ["finished at", _when(last)],
             ["batches trained in run 2", str(len(losses))],
             ["loss first / last", f"{losses[0]:.4f} / {losses[-1]:.4f}"],
             ["full checkpoints kept", ", ".join(Path(p).name for p in full.saved_checkpoints)],
             ["weights-only exports", ", ".join(Path(p).name for p in exports.saved_checkpoints)]],
        )
        if start.timestamp != first or len(losses) != last.batch - first.batch or not math.isfinite(losses[-1]):
            print("the resumed run did not continue from the saved step", file=sys.stderr)
            return 1
        print(f"\nDone in {time.perf_counter() - started:.1f} s.")
        return 0
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)


def _when(timestamp: Timestamp | None) -> str:
    if timestamp is None:
        return "the start"
    return f"epoch {timestamp.epoch}, batch {timestamp.batch} ({timestamp.batch_in_epoch} into the epoch)"


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
