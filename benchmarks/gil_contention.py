"""What slows training while an async save runs in the background: the GIL or memory bandwidth.

Run by hand (about two minutes)::

    python benchmarks/gil_contention.py

Trains ``bench_stall.py``'s 512 MB model at ``torch.set_num_threads(1)`` (one core left free, as in
GPU training) while a background thread repeats one piece of an async save, and prints training
steps/s against training next to an idle thread, measured in pairs, round-robin: a 512 MB memory copy (bandwidth), our save of the
staged state as a ``.pt`` with ``torch.save``'s zip CRC-32 on (as it is for ``.pt``) and off, and the
same through the page cache instead of ``O_DIRECT``.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from stall_peers import build, tensors_of, train_step

from ckpt_callbacks.direct_io import open_for_payload
from ckpt_callbacks.serialization import _torch_save
from ckpt_callbacks.staging import StagingBuffers


def main(rounds: int = 7) -> int:
    model, optimizer, batches = build(512)
    torch.set_num_threads(1)
    staged = StagingBuffers().stage({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    sources = tensors_of(staged)
    targets = [torch.empty_like(t) for t in sources]
    folder = Path(tempfile.mkdtemp(prefix="bench-gil-", dir="."))
    count = [0]

    def save(crc: bool, direct: bool = True) -> None:
        count[0] += 1
        path = folder / f"c{count[0]}.pt"
        with open_for_payload(path) if direct else open(path, "xb") as file:
            _torch_save(staged, file, crc=crc)
            file.flush()
            os.fsync(file.fileno())
        path.unlink()

    jobs: dict[str, Callable[[], object] | None] = {
        "512 MB memory copy": lambda: [np.copyto(t.numpy(), s.numpy()) for t, s in zip(targets, sources)],
        "save .pt, zip CRC on (O_DIRECT)": lambda: save(True),
        "save .pt, zip CRC off (O_DIRECT)": lambda: save(False),
        "save .pt, zip CRC on (page cache)": lambda: save(True, direct=False),
    }

    def steps_per_second(job: Callable[[], object] | None, steps: int = 8) -> float:
        stop = threading.Event()

        def background() -> None:
            while not stop.is_set():
                if job is None:
                    stop.wait(0.01)
                else:
                    job()

        thread = threading.Thread(target=background)
        thread.start()
        started = time.perf_counter()
        for index in range(steps):
            train_step(model, optimizer, batches[index % len(batches)])
        rate = steps / (time.perf_counter() - started)
        stop.set()
        thread.join()
        return rate

    for batch in batches[:2]:
        train_step(model, optimizer, batch)
    ratios: dict[str, list[float]] = {name: [] for name in jobs}
    try:
        for _ in range(rounds):  # round-robin, each job next to an idle-thread measurement
            for name, job in jobs.items():
                ratios[name].append(steps_per_second(job) / steps_per_second(None))
        print(f"| background thread | training steps/s with it / with an idle thread (median of {rounds}) |")
        print("|---|---:|")
        for name, values in ratios.items():
            print(f"| {name} | {statistics.median(values):.3f} |", flush=True)
    finally:
        for leftover in folder.iterdir():
            leftover.unlink()
        folder.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
