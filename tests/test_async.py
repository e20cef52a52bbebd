"""save_mode='async': only the capture blocks; the checkpoint is exactly the state at the save point."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _training import make_trainer, weights

from ckpt_callbacks import CheckpointError, CheckpointManager, CheckpointSaver, Timestamp, load_checkpoint
from ckpt_callbacks.serialization import read_state


def test_async_saves_the_same_checkpoints_and_resumes_exactly(tmp_path: Path) -> None:
    straight = make_trainer(max_duration="2ep", batches_per_epoch=10)
    straight.fit()
    saver = CheckpointSaver(str(tmp_path), filename="ba{batch}.pt.gz", save_interval="3ba", save_mode="async",
                            num_checkpoints_to_keep=2)
    make_trainer([saver], max_duration="7ba", batches_per_epoch=10, autoresume=True).fit()
    assert sorted(p.name for p in tmp_path.glob("ba*")) == ["ba6.pt.gz", "ba7.pt.gz"]
    assert os.readlink(tmp_path / "latest-rank0.pt") == "ba7.pt.gz"
    resumed = make_trainer([CheckpointSaver(str(tmp_path), filename="ba{batch}.pt.gz", save_interval="3ba",
                                            save_mode="async")],
                           max_duration="2ep", batches_per_epoch=10, autoresume=True)
    resumed.fit()
    assert Path(resumed.state.resumed_from).name == "ba7.pt.gz"
    for key, tensor in weights(straight).items():
        assert torch.equal(weights(resumed)[key], tensor), key


def test_training_after_capture_does_not_leak_into_the_checkpoint(tmp_path: Path) -> None:
    trainer = make_trainer(max_duration="3ba")
    trainer.fit()
    state = trainer.state
    sync = CheckpointManager(str(tmp_path / "sync"), filename="ba{batch}.pt", run_name="x")
    sync.start(state.timestamp)
    sync.save(state.timestamp, state).result()

    manager = CheckpointManager(str(tmp_path / "async"), filename="ba{batch}.pt", run_name="x", save_mode="async")
    manager.start(state.timestamp)
    future = manager.save(state.timestamp, state)
    with torch.no_grad():  # training goes on right after capture
        for parameter in state.model.parameters():
            parameter.add_(1.0)
        for optimizer_state in state.optimizers[0].state.values():
            optimizer_state["exp_avg"].mul_(3.0)
    future.result()
    manager.close()

    expected = read_state(tmp_path / "sync" / "ba3.pt")
    actual = read_state(tmp_path / "async" / "ba3.pt")
    for key, tensor in expected["state"]["model"].items():
        assert torch.equal(actual["state"]["model"][key], tensor), key
    for index, slot in expected["state"]["optimizers"][0]["state"].items():
        assert torch.equal(actual["state"]["optimizers"][0]["state"][index]["exp_avg"], slot["exp_avg"])


def test_buffers_are_reused_across_saves(tmp_path: Path) -> None:
    trainer = make_trainer(max_duration="1ba")
    trainer.fit()
    manager = CheckpointManager(str(tmp_path), filename="ba{batch}.pt", run_name="x", save_mode="async")
    manager.start(Timestamp())
    sizes = []
    for batch in (1, 2, 3):
        manager.save(Timestamp(batch=batch), trainer.state).result()
        sizes.append(manager.capturer.staging.nbytes)
    manager.close()
    assert sizes[0] > 0 and sizes == [sizes[0]] * 3
    fresh = make_trainer(max_duration="1ba")
    load_checkpoint(tmp_path / "ba3.pt", fresh.state)
    assert fresh.state.timestamp.batch == 1


def test_a_failing_background_save_is_raised_on_the_training_thread(tmp_path: Path) -> None:
    (tmp_path / "ba2.pt").mkdir()  # the commit of ba2.pt cannot replace a folder
    saver = CheckpointSaver(str(tmp_path), filename="ba{batch}.pt", save_interval="2ba", save_mode="async",
                            overwrite=True)
    with pytest.raises((CheckpointError, OSError)):
        make_trainer([saver], max_duration="4ba").fit()
    assert not (tmp_path / "latest-rank0.pt").exists()
