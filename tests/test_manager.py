"""CheckpointManager used from a custom loop, without the Trainer or events."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from ckpt_callbacks import CheckpointManager, Timestamp
from ckpt_callbacks.storage import POINTER_MAGIC


def test_custom_loop_saves_prunes_and_finds_latest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = torch.nn.Linear(3, 1)
    manager = CheckpointManager(str(tmp_path / "{run_name}"), filename="ba{batch}.pt.gz", run_name="custom",
                                num_checkpoints_to_keep=2)
    manager.start(Timestamp())
    with caplog.at_level(logging.INFO, logger="ckpt_callbacks.manager"):
        for step in (10, 20, 30):
            info = manager.save(Timestamp(batch=step), {"model": model.state_dict(), "step": step}).result()
            assert info.name == f"ba{step}.pt.gz"
    manager.close()
    assert [c.name for c in manager.all()] == ["ba20.pt.gz", "ba30.pt.gz"]
    assert manager.latest().timestamp.batch == 30
    assert any("bytes, stall" in record.message for record in caplog.records)

    reopened = CheckpointManager(str(tmp_path / "{run_name}"), filename="ba{batch}.pt.gz", run_name="custom")
    assert [c.seq for c in reopened.all()] == [2, 3]
    checkpoint = torch.load(__import__("gzip").open(tmp_path / "custom" / "ba30.pt.gz"), weights_only=True)
    assert checkpoint["state"]["step"] == 30 and checkpoint["state"]["metadata"]["save_sequence"] == 3


def test_record_is_rebuilt_from_checkpoints_when_corrupt(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path), filename="ba{batch}.pt", run_name="r")
    manager.start(Timestamp())
    for step in (1, 2):
        manager.save(Timestamp(batch=step), {"x": torch.tensor(step)})
    manager.close()
    (record,) = tmp_path.glob(".ckpt-record-*.json")
    record.write_text("{ not json")
    (tmp_path / "ba9.pt").write_bytes(b"someone else's file")

    rebuilt = CheckpointManager(str(tmp_path), filename="ba{batch}.pt", run_name="r", overwrite=True)
    rebuilt.reconcile()
    assert [(c.name, c.seq) for c in rebuilt.all()] == [("ba1.pt", 1), ("ba2.pt", 2)]


def test_other_runs_files_are_never_adopted_or_pruned(tmp_path: Path) -> None:
    other = CheckpointManager(str(tmp_path), filename="ba{batch}.pt", run_name="other")
    other.start(Timestamp())
    other.save(Timestamp(batch=1), {"x": torch.tensor(1)})
    mine = CheckpointManager(str(tmp_path), filename="ba{batch}.pt", run_name="mine", num_checkpoints_to_keep=1,
                             latest_filename="latest-mine.pt", overwrite=True)
    mine.start(Timestamp())
    for step in (2, 3):
        mine.save(Timestamp(batch=step), {"x": torch.tensor(step)})
    assert sorted(p.name for p in tmp_path.glob("ba*.pt")) == ["ba1.pt", "ba3.pt"]


def test_pointer_file_latest(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path), filename="ba{batch}.pt", run_name="p", latest_mode="pointer")
    manager.start(Timestamp())
    manager.save(Timestamp(batch=4), {"x": torch.tensor(4)})
    latest = tmp_path / "latest-rank0.pt"
    assert not latest.is_symlink() and latest.read_bytes().startswith(POINTER_MAGIC)
    from ckpt_callbacks.locations import resolve_checkpoint_path

    assert resolve_checkpoint_path(latest) == tmp_path / "ba4.pt"


def test_a_failing_save_leaves_the_previous_checkpoint_and_latest(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path), filename="ba{batch}.pt", run_name="f")
    manager.start(Timestamp())
    manager.save(Timestamp(batch=1), {"x": torch.tensor(1)})
    unpicklable = {"fn": lambda: None}
    with pytest.raises(Exception):
        manager.save(Timestamp(batch=2), unpicklable).result()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".ckpt-record")) == ["ba1.pt", "latest-rank0.pt"]
    assert (tmp_path / "latest-rank0.pt").resolve() == (tmp_path / "ba1.pt").resolve()
    assert [c.name for c in manager.all()] == ["ba1.pt"]
