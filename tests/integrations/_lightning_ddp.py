"""Lightning DDP on 2 CPU processes (gloo), launched the way users launch it: ``python script.py``.

Lightning's ``ddp`` launcher re-runs this script for rank 1 with the same arguments; each rank trains
4 steps an epoch. Phase ``first`` saves every 2 steps and crashes at step 5; phase ``resume``
autoresumes (from step 4) and finishes 2 epochs (8 steps). Each
rank writes what it saw to ``<folder>/result-<phase>-rank<rank>.json``.

Usage: python _lightning_ddp.py FOLDER PHASE
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from _lightning_app import Crash, crash_at, fit

from ckpt_callbacks.integrations.lightning import AUTORESUME, CheckpointSaver


class Probe(pl.Callback):
    """Records this rank's weights when training starts, after Lightning restored the checkpoint."""

    def __init__(self) -> None:
        self.start_weights: list[float] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_weights = [float(p.detach().sum()) for p in pl_module.parameters()]


def main(folder: Path, phase: str) -> None:
    saver = CheckpointSaver(
        folder=str(folder / "{run_name}"), filename="ba{batch}-rank{rank}.pt.zst", save_interval="2ba",
        num_checkpoints_to_keep=2, run_name="ddp-run",
    )
    probe = Probe()
    callbacks = [saver, probe] if phase == "resume" else [saver, probe, crash_at(pl, 5)]
    outcome = "finished"
    trainer = None
    try:
        trainer, _ = fit(pl, callbacks, 2, AUTORESUME, accelerator="cpu", devices=2, strategy="ddp")
    except Crash:
        outcome = "crashed"
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    result = {
        "outcome": outcome,
        "global_step": trainer.global_step if trainer else None,
        "saved": [Path(p).name for p in saver.saved_checkpoints],
        "resumed_from": Path(saver.saver.manager.record.lineage.resumed_from or "").name
        if saver.saver.manager and saver.saver.manager.record.lineage else None,
        "start_weights": probe.start_weights,
        "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
    }
    (folder / f"result-{phase}-rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
