"""The model, the peers and the measuring worker of ``bench_stall.py`` (also the model that
``bench_upload.py`` trains while uploading).

Each peer is measured in a process of its own (:func:`worker`), driven either by the benchmark's
own training loop (:class:`LoopPeer`: ``torch.save``, our savers, DCP, the HF Trainer's
``_save_checkpoint``) or by Lightning's (:func:`lightning_run`), in the same way: a stall phase of
saves waited for one by one, then the throughput pairs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ckpt_callbacks import CheckpointManager, Timestamp
from ckpt_callbacks.state import State
from ckpt_callbacks.time import Time

__all__ = ["PEERS", "SIZES", "build", "train_step", "worker"]

# nominal state size (MB) -> (width, blocks, vocabulary); 12 bytes a parameter (weight, exp_avg, exp_avg_sq)
SIZES = {128: (512, 2, 4096), 512: (768, 4, 10240), 2048: (1280, 6, 16384)}
BATCH, SEQUENCE = 2, 32
PEERS = [
    "copy floor", "torch.save", "ours sync .pt", "ours async .pt", "ours async .pt.zst", "DCP save",
    "DCP async_save", "Lightning sync", "Lightning async", "HF _save_checkpoint",
]  # fmt: skip
Waiter = Callable[[], object]


def _done() -> None:
    """The waiter of a save that was durable when it returned."""


# ---------------------------------------------------------------------------- model, memory, disk


class GPT(torch.nn.Module):
    """Token embedding, pre-norm transformer blocks (4x MLP), final norm, untied output head."""

    def __init__(self, width: int, blocks: int, vocabulary: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocabulary, width)
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(width, width // 64, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(blocks)
        )
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocabulary)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens)
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(self.norm(hidden))


def loss_of(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a batch of token ids."""
    return torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss_of(model, batch).backward()
    optimizer.step()


def build(size: int) -> tuple[GPT, torch.optim.Adam, list[torch.Tensor]]:
    """The model of ``size`` MB of state after one Adam step, and a few batches of token ids."""
    torch.manual_seed(0)
    width, blocks, vocabulary = SIZES[size]
    model = GPT(width, blocks, vocabulary)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batches = [torch.randint(0, vocabulary, (BATCH, SEQUENCE + 1)) for _ in range(8)]
    train_step(model, optimizer, batches[0])
    return model, optimizer, batches


def tensors_of(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return [t for value in values for t in tensors_of(value)]


def nudge(model: torch.nn.Module) -> None:
    """Change every parameter a little: each save sees new values, as after a training step."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1e-6)


def memory(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak since the last :func:`reset_peak`) in bytes; 0 off Linux."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return 0


def reset_peak() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM) at the current RSS (Linux only)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def fsync_tree(path: Path) -> None:
    """fsync a file, or every file of a folder, and the folder holding them."""
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    folder = os.open(path if path.is_dir() else path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def clear(folder: Path) -> None:
    """Delete the checkpoints in ``folder``, keeping our savers' record files (dot files)."""
    for path in folder.iterdir():
        if not path.name.startswith("."):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


# ---------------------------------------------------------------------------- peers in our own loop


class LoopPeer:
    """A saver driven by the benchmark's training loop: ``save(step)`` returns a waiter that blocks
    until that checkpoint is durable."""

    def __init__(self, name: str, folder: Path, model: GPT, optimizer: torch.optim.Adam) -> None:
        self.name, self.folder, self.model, self.optimizer = name, folder, model, optimizer
        self._previous: Waiter = _done
        self.buffers: list[torch.Tensor] = []
        if name.startswith("ours"):
            self.state = State(model=model, optimizers=[optimizer], run_name="b", max_duration=Time.from_input("9999999ba"))
            suffix = name.rsplit(" ", 1)[1]
            self.manager = CheckpointManager(
                str(folder), filename="ba{batch}" + suffix, latest_filename="latest" + suffix, run_name="b",
                save_mode=name.split()[1], overwrite=True,
            )
            self.manager.start(Timestamp())
        elif name.startswith("HF"):
            from transformers import Trainer, TrainingArguments

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
            arguments = TrainingArguments(output_dir=str(folder), report_to="none", use_cpu=True)
            self.trainer = Trainer(model=model, args=arguments, optimizers=(optimizer, scheduler))

    def save(self, step: int) -> Waiter:
        state_dict = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.name.startswith("ours"):
            self.state.timestamp = Timestamp(batch=step)
            return self.manager.save(self.state.timestamp, self.state).result
        if self.name == "copy floor":  # copy_ into buffers allocated once: what staging cannot beat
            tensors = tensors_of(state_dict)
            self.buffers = self.buffers or [torch.empty_like(t) for t in tensors]
            for buffer, tensor in zip(self.buffers, tensors):
                buffer.copy_(tensor)
        elif self.name == "torch.save":
            torch.save(state_dict, self.folder / f"step{step}.pt")
            fsync_tree(self.folder / f"step{step}.pt")
        elif self.name.startswith("DCP"):
            import torch.distributed.checkpoint as dcp

            if self.name == "DCP save":
                dcp.save(state_dict, checkpoint_id=str(self.folder / f"step{step}"), no_dist=True)
                return _done
            self._previous()  # one save in flight, as torchtitan does (else stagings pile up)
            self._previous = dcp.async_save(state_dict, checkpoint_id=str(self.folder / f"step{step}"), no_dist=True).result
            return self._previous
        else:
            self.trainer.state.global_step = step
            self.trainer._save_checkpoint(self.trainer.model, trial=None)
            fsync_tree(self.folder / f"checkpoint-{step}")
        return _done

    def close(self) -> None:
        self._previous()
        if self.name.startswith("ours"):
            self.manager.close()


def loop_stall(peer: LoopPeer, checkpoints: int, step: list[int]) -> list[dict[str, float]]:
    """A warm-up save, then ``checkpoints`` at 1 thread and as many at 2, each waited for."""
    records = []
    for threads, count in ((1, checkpoints + 1), (2, checkpoints)):
        torch.set_num_threads(threads)
        for _ in range(count):
            nudge(peer.model)
            os.sync()
            step[0] += 1
            reset_peak()
            started = time.perf_counter()
            wait = peer.save(step[0])
            stall = time.perf_counter() - started
            wait()
            durable = time.perf_counter() - started
            records.append({"stall": stall, "durable": durable, "peak": memory("VmHWM"), "threads": threads})
    return records


def loop_throughput(peer: LoopPeer, batches: list[torch.Tensor], every: int, periods: int, step: list[int]) -> list:
    """``periods`` pairs (seconds of K steps after a save, until it is durable; of K steps without)."""

    def run(steps: int) -> None:
        for _ in range(steps):
            step[0] += 1
            train_step(peer.model, peer.optimizer, batches[step[0] % len(batches)])

    pairs = []
    for _ in range(periods):
        started = time.perf_counter()
        wait = peer.save(step[0])
        run(every)
        wait()
        middle = time.perf_counter()
        run(every)
        pairs.append((middle - started, time.perf_counter() - middle))
    return pairs


# ---------------------------------------------------------------------------- Lightning


def lightning_run(asynchronous: bool, folder: Path, model: GPT, optimizer: torch.optim.Adam, batches: list[torch.Tensor],
                  args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """Lightning's ``ModelCheckpoint`` (with ``AsyncCheckpointIO`` if asked) measured as the loop
    peers are: the stall phase in one ``fit``, then each thread count's throughput pairs in one."""
    import logging
    import warnings

    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    durable, marks = threading.Event(), {"done": 0.0}
    records: list[dict[str, float]] = []
    pairs: list[tuple[float, float]] = []

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def training_step(self, batch: torch.Tensor, index: int) -> torch.Tensor:
            return loss_of(self.net, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return optimizer

    class DurableIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
            super().save_checkpoint(checkpoint, path, storage_options)
            fsync_tree(Path(path))
            marks["done"] = time.perf_counter()
            durable.set()

    def settle() -> float:
        """Wait until the save in flight is durable; when it became so."""
        durable.wait()
        durable.clear()
        return marks["done"]

    class Probe(Callback):  # runs before ModelCheckpoint, which Lightning always puts last
        def __init__(self, gate: Callable[[int], bool], every: int) -> None:
            self.gate, self.every, self.started = gate, every, 0.0

        def record(self) -> None:
            records.append({"stall": marks["stall"], "durable": settle() - self.started, "peak": memory("VmHWM"),
                            "threads": torch.get_num_threads()})  # fmt: skip

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, index: int) -> None:
            if not self.every:  # stall phase: wait for the previous save; the second half at 2 threads
                if self.started:
                    self.record()
                torch.set_num_threads(1 if index <= args.checkpoints else 2)

        def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
            step, now = trainer.global_step, time.perf_counter()
            if self.every and step % (2 * self.every) == 0:  # K steps after a save: wait for it
                settle()
                now = marks["middle"] = time.perf_counter()
                marks["with"] = now - self.started
            if self.gate(step):
                if self.every and "middle" in marks:
                    pairs.append((marks["with"], now - marks.pop("middle")))
                if not self.every:
                    nudge(model)
                    os.sync()
                    reset_peak()
                self.started = time.perf_counter()

    class GatedCheckpoint(ModelCheckpoint):
        def __init__(self, gate: Callable[[int], bool], probe: Probe) -> None:
            super().__init__(dirpath=folder, every_n_train_steps=1, save_top_k=-1)
            self.gate, self.probe = gate, probe

        def on_train_batch_end(self, trainer: Any, *rest: Any) -> None:
            if self.gate(trainer.global_step):
                super().on_train_batch_end(trainer, *rest)
                marks["stall"] = time.perf_counter() - self.probe.started

    def fit(steps: int, gate: Callable[[int], bool], every: int) -> Probe:
        probe = Probe(gate, every)
        trainer = L.Trainer(
            max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[probe, GatedCheckpoint(gate, probe)], default_root_dir=folder,
            plugins=[AsyncCheckpointIO(DurableIO()) if asynchronous else DurableIO()],
        )  # fmt: skip
        loader = torch.utils.data.DataLoader([batches[i % len(batches)] for i in range(steps + 1)], batch_size=None)
        trainer.fit(Module(), loader)
        return probe

    base = memory("VmRSS")
    fit(2 * args.checkpoints + 1, lambda step: True, 0).record()  # the last save, finished at teardown
    result: dict[str, Any] = {"records": records, "held": memory("VmRSS") - base, "base": base, "throughput": {}}
    clear(folder)
    for threads in (1, 2) if args.throughput else ():
        torch.set_num_threads(threads)
        pairs.clear()
        every = args.every[threads - 1]
        fit(every * (2 * args.periods + 1), lambda step: step % (2 * every) == every, every)
        result["throughput"][str(threads)] = list(pairs)
        clear(folder)
    return result


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one peer on one state size in this process."""
    load = os.getloadavg()[0]
    model, optimizer, batches = build(args.size)
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"size_bytes": sum(t.numel() * t.element_size() for t in tensors_of(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict()}))}  # fmt: skip
    if args.worker == "calibrate":
        for threads in (1, 2):
            torch.set_num_threads(threads)
            steps = []
            for batch in batches[:4]:
                started = time.perf_counter()
                train_step(model, optimizer, batch)
                steps.append(time.perf_counter() - started)
            result[f"step{threads}"] = statistics.median(steps[1:])
        records = loop_stall(LoopPeer("ours sync .pt", folder, model, optimizer), 2, [0])[1:3]
        result["save"] = statistics.median(r["durable"] for r in records)
    elif args.worker.startswith("Lightning"):
        result.update(lightning_run(args.worker.endswith("async"), folder, model, optimizer, batches, args))
    else:
        peer = LoopPeer(args.worker, folder, model, optimizer)
        step, base = [0], memory("VmRSS")
        result["records"] = loop_stall(peer, args.checkpoints, step)
        result.update(held=memory("VmRSS") - base, base=base, throughput={})
        clear(folder)
        for threads in (1, 2) if args.throughput and args.worker != "copy floor" else ():
            torch.set_num_threads(threads)
            result["throughput"][str(threads)] = loop_throughput(peer, batches, args.every[threads - 1], args.periods, step)
            clear(folder)
        peer.close()
    result["load"] = [load, os.getloadavg()[0]]
    return result
