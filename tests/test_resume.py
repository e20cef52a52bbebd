"""Exact resume and autoresume through the reference Trainer: same weights, bit for bit, on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _training import make_trainer, weights

from ckpt_callbacks import CheckpointSaver, load_checkpoint
from ckpt_callbacks.errors import ConfigurationError


def full_saver(folder: Path, **kwargs) -> CheckpointSaver:
    kwargs.setdefault("save_interval", "1ba")
    return CheckpointSaver(str(folder), filename="ep{epoch}-ba{batch}.pt", **kwargs)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_epochs_equal_one_epoch_plus_resume(tmp_path: Path) -> None:
    straight = make_trainer(max_duration="2ep")
    straight.fit()

    first = make_trainer([full_saver(tmp_path, save_interval="1ep")], max_duration="1ep", autoresume=True)
    first.fit()
    second = make_trainer([full_saver(tmp_path, save_interval="1ep")], max_duration="2ep", autoresume=True)
    second.fit()

    assert Path(second.state.resumed_from).name == "ep1-ba5.pt"
    assert second.state.timestamp.batch == 10 and second.state.timestamp.epoch == 2
    assert_same(weights(straight), weights(second))
    assert second.state.optimizers[0].state_dict()["state"][0]["step"] == 10


def test_stop_mid_epoch_then_resume(tmp_path: Path) -> None:
    straight = make_trainer(max_duration="2ep", batches_per_epoch=10)
    straight.fit()

    make_trainer([full_saver(tmp_path)], max_duration="7ba", batches_per_epoch=10, autoresume=True).fit()
    resumed = make_trainer([full_saver(tmp_path)], max_duration="2ep", batches_per_epoch=10, autoresume=True)
    resumed.fit()

    assert Path(resumed.state.resumed_from).name == "ep0-ba7.pt"
    assert_same(weights(straight), weights(resumed))
    assert resumed.state.schedulers[0].state_dict() == straight.state.schedulers[0].state_dict()


class StatefulLoader:
    """A loader with state_dict/load_state_dict (like torchdata's StatefulDataLoader)."""

    def __init__(self, batches: int = 5) -> None:
        self.data = [(torch.full((8, 4), float(i)), torch.full((8, 1), float(i))) for i in range(batches)]
        self.position = 0
        self.served: list[int] = []

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        while self.position < len(self.data):
            index = self.position
            self.position += 1
            self.served.append(index)
            yield self.data[index]
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def test_stateful_dataloader_resumes_at_the_right_sample(tmp_path: Path) -> None:
    loader = StatefulLoader()
    first = make_trainer([full_saver(tmp_path)], max_duration="3ba", autoresume=True)
    first.state.dataloader = loader
    first.fit()
    assert loader.served == [0, 1, 2]

    resumed_loader = StatefulLoader()
    second = make_trainer([full_saver(tmp_path)], max_duration="1ep", autoresume=True)
    second.state.dataloader = resumed_loader
    second._load()
    assert resumed_loader.position == 3
    second.fit()
    assert resumed_loader.served == [3, 4]


def test_autoresume_ignores_weights_only_savers_and_needs_a_run_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="run_name"):
        make_trainer(run_name=None, autoresume=True)
    exports = CheckpointSaver(str(tmp_path / "exports"), filename="ba{batch}.pt", save_interval="1ba", weights_only=True)
    make_trainer([exports], max_duration="2ba", autoresume=True).fit()
    exports = CheckpointSaver(str(tmp_path / "exports"), filename="ba{batch}.pt", save_interval="1ba", weights_only=True, overwrite=True)
    fresh = make_trainer([exports], max_duration="2ba", autoresume=True)
    fresh.fit()
    assert fresh.state.resumed_from is None


def test_autoresume_prefers_the_newest_commit_over_latest(tmp_path: Path) -> None:
    """A crash between commit and publish leaves a newer file than `latest` and the record."""
    make_trainer([full_saver(tmp_path)], max_duration="3ba", autoresume=True).fit()
    link = tmp_path / "latest-rank0.pt"
    os.remove(link)
    os.symlink("ep0-ba2.pt", link)
    for record in tmp_path.glob(".ckpt-record-*.json"):
        os.remove(record)

    resumed = make_trainer([full_saver(tmp_path)], max_duration="4ba", autoresume=True)
    resumed._load()
    assert Path(resumed.state.resumed_from).name == "ep0-ba3.pt"
    assert os.readlink(link) == "ep0-ba3.pt"


def test_autoresume_falls_back_past_a_corrupt_checkpoint(tmp_path: Path) -> None:
    make_trainer([full_saver(tmp_path)], max_duration="3ba", autoresume=True).fit()
    newest = tmp_path / "ep0-ba3.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))

    with pytest.warns(UserWarning, match="corrupt"):
        resumed = make_trainer([full_saver(tmp_path)], max_duration="1ep", autoresume=True)
        resumed.fit()
    assert Path(resumed.state.resumed_from).name == "ep0-ba2.pt"
    assert (tmp_path / "ep0-ba3.pt.corrupt").exists()
    assert resumed.state.timestamp.batch == 5


def test_pruning_after_resume_covers_earlier_runs(tmp_path: Path) -> None:
    """Composer #2087: num_checkpoints_to_keep also prunes what earlier runs of the saver wrote."""
    make_trainer([full_saver(tmp_path, num_checkpoints_to_keep=2)], max_duration="3ba", autoresume=True).fit()
    foreign = tmp_path / "ep0-ba1-notes.txt"
    foreign.write_text("not ours")
    second = full_saver(tmp_path, num_checkpoints_to_keep=2)
    make_trainer([second], max_duration="6ba", autoresume=True).fit()
    assert sorted(p.name for p in tmp_path.glob("ep*.pt")) == ["ep0-ba5.pt", "ep1-ba6.pt"]
    assert foreign.exists()
    assert [Path(p).name for p in second.saved_checkpoints] == ["ep0-ba5.pt", "ep1-ba6.pt"]


def test_resumed_run_protects_its_source_until_a_newer_commit(tmp_path: Path) -> None:
    make_trainer([full_saver(tmp_path, num_checkpoints_to_keep=1)], max_duration="2ba", autoresume=True).fit()
    assert sorted(p.name for p in tmp_path.glob("ep*.pt")) == ["ep0-ba2.pt"]
    resumed = make_trainer([full_saver(tmp_path, num_checkpoints_to_keep=1)], max_duration="3ba", autoresume=True)
    resumed.fit()
    assert sorted(p.name for p in tmp_path.glob("ep*.pt")) == ["ep0-ba3.pt"]


def test_load_path_fine_tuning_options(tmp_path: Path) -> None:
    source = make_trainer([full_saver(tmp_path)], max_duration="3ba")
    source.fit()
    path = tmp_path / "ep0-ba3.pt"

    weights_only = make_trainer(max_duration="1ba", load_path=path, load_weights_only=True)
    weights_only._load()
    assert weights_only.state.timestamp.batch == 0
    assert_same(weights(weights_only), weights(source))

    reset = make_trainer(max_duration="1ba", load_path=path, reset_time=True)
    reset._load()
    assert reset.state.timestamp.batch == 0
    assert reset.state.optimizers[0].state_dict()["state"][0]["step"] == 3

    ignored = make_trainer(max_duration="1ba", load_path=path, load_ignore_keys=["state/model/0.*"], load_strict_model_weights=False)
    ignored._load()
    assert torch.equal(ignored.state.model.state_dict()["2.weight"], source.state.model.state_dict()["2.weight"])
    assert not torch.equal(ignored.state.model.state_dict()["0.weight"], source.state.model.state_dict()["0.weight"])

    latest = make_trainer(max_duration="1ba")
    load_checkpoint(tmp_path / "latest-rank0.pt", latest.state)
    assert latest.state.timestamp.batch == 3


def test_resume_at_an_epoch_end_does_not_trip_over_the_exports_later_epoch(tmp_path: Path) -> None:
    """The full checkpoint of an epoch's last batch is saved before the epoch is counted; the export
    saved at the epoch checkpoint names the next epoch. Resuming must not call that a conflict."""
    def savers():
        return [full_saver(tmp_path / "full", save_interval="5ba"),
                CheckpointSaver(str(tmp_path / "exports"), filename="ep{epoch}.pt", save_interval="1ep", weights_only=True)]

    make_trainer(savers(), max_duration="1ep", autoresume=True).fit()
    assert (tmp_path / "exports" / "ep1.pt").exists()
    resumed = make_trainer(savers(), max_duration="2ep", autoresume=True)
    resumed.fit()
    assert Path(resumed.state.resumed_from).name == "ep0-ba5.pt"
    assert resumed.state.timestamp.epoch == 2
