"""``ckpt-callbacks demo``: two savers, a run stopped mid-epoch, and a second run that resumes.

It trains a small MLP on a regression task with a real signal, with weights-only exports every
epoch and the full training state every 4 batches (the newest 2 kept), stops after 25 batches as
if the job had been killed, then starts again with the same ``run_name`` and ``autoresume=True``
and trains to 4 epochs, printing what was saved and where training resumed. With a ``remote``
both savers also upload, and the local folder is deleted before the second run, as on a new
machine: it resumes from the store. It doubles as an end-to-end check of an installation (and of
a bucket's credentials): it exits non-zero if the second run did not continue from the saved step.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader, TensorDataset

from ckpt_callbacks.dist import barrier, dist_info
from ckpt_callbacks.events import Callback
from ckpt_callbacks.listing import list_checkpoints
from ckpt_callbacks.saver import CheckpointSaver
from ckpt_callbacks.state import State
from ckpt_callbacks.time import Timestamp
from ckpt_callbacks.trainer import Trainer

__all__ = ["run_demo"]


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


def _uploads(remote: str | None, storage_options: Mapping[str, Any] | None, folder: str, name: str, latest: str) -> dict[str, Any]:
    if remote is None:
        return {}
    return {
        "remote": remote, "storage_options": storage_options,
        "remote_file_name": f"{{run_name}}/{folder}/{name}", "latest_remote_file_name": f"{{run_name}}/{folder}/{latest}",
    }


def _demo_trainer(
    folder: Path, max_duration: str, remote: str | None = None, storage_options: Mapping[str, Any] | None = None,
) -> tuple[Trainer, CheckpointSaver, CheckpointSaver, list[float], _FitStart]:
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    if torch.distributed.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(model)
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
        **_uploads(remote, storage_options, "exports", "ep{epoch}-ba{batch}.pt", "latest-export.pt"),
    )
    full = CheckpointSaver(
        folder=str(folder / "{run_name}" / "checkpoints"), filename="ep{epoch}-ba{batch}-rank{rank}.pt.gz",
        save_interval="4ba", num_checkpoints_to_keep=2,
        **_uploads(remote, storage_options, "checkpoints", "ep{epoch}-ba{batch}-rank{rank}.pt.gz", "latest-rank{rank}.pt"),
    )
    start = _FitStart()
    trainer = Trainer(
        model, optimizer, _demo_data(), loss_fn=loss_fn, max_duration=max_duration, run_name="demo-run",
        callbacks=[exports, full, start], autoresume=True, seed=7,
    )
    return trainer, exports, full, losses, start


def run_demo(
    folder: Path | None = None, remote: str | None = None, storage_options: Mapping[str, Any] | None = None,
    *, temporary: bool = False,
) -> int:
    """Run the demo, printing to stdout; return the exit code (0: the resumed run continued exactly).

    Args:
        folder: Where to write; None for a temporary folder, removed afterwards.
        remote: A store URL to upload to and resume from (``s3://bucket/prefix``, ``file:///...``).
        storage_options: The store's options (endpoint, credentials, ...).
        temporary: ``folder`` is removed afterwards by the caller (do not point the user at it).

    Example:
        >>> run_demo(Path("demo-output"))  # doctest: +SKIP
        0
    """
    started = time.perf_counter()
    target = folder or Path(tempfile.mkdtemp(prefix="ckpt-callbacks-demo-"))
    try:
        print(f"Writing to {target}\n")
        per_epoch = 10 // dist_info().world_size  # 640 samples, 64 a batch, shared by the ranks
        stop = per_epoch * 2 + per_epoch // 2
        print(f"Run 1: train for {stop} batches ({per_epoch} batches per epoch), as if the job were stopped mid-epoch.")
        trainer, exports, full, losses, _ = _demo_trainer(target, f"{stop}ba", remote, storage_options)
        trainer.fit()
        first = trainer.state.timestamp
        _table(
            ["saver", "kept on disk"],
            [["weights-only, every epoch", ", ".join(Path(p).name for p in exports.saved_checkpoints)],
             ["full state, every 4 batches, keep 2", ", ".join(Path(p).name for p in full.saved_checkpoints)]],
        )
        print(f"  stopped at {_when(first)}; loss first / last {losses[0]:.4f} / {losses[-1]:.4f}\n")

        if remote is not None:
            if dist_info().rank == 0:
                shutil.rmtree(target / "demo-run")
            barrier()
            print(f"Deleted {target / 'demo-run'}, as on a new machine: run 2 must resume from {remote}.")
        print("Run 2: same run_name, autoresume=True, train to 4 epochs.")
        trainer, exports, full, losses, start = _demo_trainer(target, "4ep", remote, storage_options)
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
        if remote is not None:
            print(f"\nIn the store ({remote}):")
            stored = list_checkpoints(remote, storage_options=storage_options)
            _table(["checkpoint", "size", "latest"], [[c.name, str(c.size), "yes" if c.latest else ""] for c in stored])
        if start.timestamp != first or len(losses) != last.batch - first.batch or not math.isfinite(losses[-1]):
            print("the resumed run did not continue from the saved step", file=sys.stderr)
            return 1
        print(f"\nDone in {time.perf_counter() - started:.1f} s.")
        kept = folder is not None and not temporary
        if kept or remote is not None:
            where = " ".join([str(target / "demo-run")] * kept + [remote] * (remote is not None))
            print(f"See what was saved with: ckpt-callbacks ls {where}")
        return 0
    finally:
        if folder is None:
            shutil.rmtree(target, ignore_errors=True)


def _when(timestamp: Timestamp | None) -> str:
    if timestamp is None:
        return "the start"
    return f"epoch {timestamp.epoch}, batch {timestamp.batch} ({timestamp.batch_in_epoch} into the epoch)"


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)))


def run_demo_distributed(
    nproc: int, folder: Path | None = None, remote: str | None = None, storage_options: Mapping[str, Any] | None = None
) -> int:
    """Run the demo as a DDP job of ``nproc`` processes on this machine (gloo, CPU), as
    ``torchrun --nproc-per-node N`` would; rank 0 prints. Returns the exit code.

    Example:
        >>> run_demo_distributed(2)  # doctest: +SKIP
        0
    """
    target = folder or Path(tempfile.mkdtemp(prefix="ckpt-callbacks-demo-"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        print(f"{nproc} processes (DDP over gloo): rank 0 writes the full state with every rank's RNG; "
              "every rank resumes from it.")
        context = torch.multiprocessing.start_processes(
            _demo_rank, args=(nproc, port, target, remote, storage_options, folder is None), nprocs=nproc,
            start_method="spawn",
            join=False,
        )
        while not context.join():
            pass
        return 0
    except torch.multiprocessing.ProcessRaisedException as error:
        print(f"a rank failed: {error}", file=sys.stderr)
        return 1
    finally:
        if folder is None:
            shutil.rmtree(target, ignore_errors=True)


def _demo_rank(
    rank: int, nproc: int, port: int, folder: Path, remote: str | None, options: Any, temporary: bool
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(nproc),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=nproc)
    try:
        if rank != 0:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- one report, from rank 0
        if run_demo(folder, remote, options, temporary=temporary) != 0:
            raise RuntimeError(f"rank {rank}: the resumed run did not continue from the saved step")
    finally:
        torch.distributed.destroy_process_group()
