"""What a checkpoint file holds (DESIGN.md section 4b), loaded the way users load it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _training import make_trainer

from ckpt_callbacks import CheckpointNotFoundError, CheckpointSaver, CorruptCheckpointError, load_checkpoint


def only_checkpoint(folder: Path) -> dict:
    (path,) = [p for p in folder.iterdir() if p.name.startswith("ba")]
    return torch.load(path, weights_only=True)


def test_full_checkpoint_schema(tmp_path: Path) -> None:
    saver = CheckpointSaver(str(tmp_path), filename="ba{batch}.pt", save_interval="3ba")
    make_trainer([saver], max_duration="3ba", run_name="schema").fit()
    checkpoint = only_checkpoint(tmp_path)
    assert sorted(checkpoint) == ["rng", "state"]
    state = checkpoint["state"]
    assert sorted(state) == ["callbacks", "metadata", "model", "optimizers", "run_name", "schedulers", "timestamp"]
    assert isinstance(state["optimizers"], list) and len(state["optimizers"]) == 1
    assert isinstance(state["schedulers"], list) and len(state["schedulers"]) == 1
    assert state["timestamp"]["batch"] == 3 and state["run_name"] == "schema"
    metadata = state["metadata"]
    for key in ("schema_version", "library_version", "torch_version", "world_size", "run_name", "timestamp",
                "save_sequence", "lineage", "saved_at"):
        assert key in metadata, key
    assert metadata["schema_version"] == 1 and metadata["world_size"] == 1
    assert len(checkpoint["rng"]) == 1 and {"python", "numpy", "torch"} <= set(checkpoint["rng"][0])
    saver_state = state["callbacks"][saver.state_key]
    assert [Path(name).name for name, _ in saver_state["all_saved_checkpoints_to_timestamp"]] == ["ba3.pt"]


def test_weights_only_key_set(tmp_path: Path) -> None:
    saver = CheckpointSaver(str(tmp_path), filename="ba{batch}.pt", save_interval="3ba", weights_only=True)
    trainer = make_trainer([saver], max_duration="3ba")
    trainer.fit()
    checkpoint = only_checkpoint(tmp_path)
    assert list(checkpoint) == ["state"]
    assert sorted(checkpoint["state"]) == ["metadata", "model"]
    assert checkpoint["state"]["metadata"]["weights_only"] is True
    for key, tensor in trainer.state.model.state_dict().items():
        assert torch.equal(checkpoint["state"]["model"][key], tensor)


@pytest.mark.parametrize(
    ("globs", "check"),
    [
        (["rng"], lambda c: "rng" not in c and "model" in c["state"]),
        (["state/model/*"], lambda c: c["state"]["model"] == {}),
        (["state/model"], lambda c: "model" not in c["state"]),
        (["state/model/0.*"], lambda c: sorted(c["state"]["model"]) == ["2.bias", "2.weight"]),
        (["state/optimizers/0"], lambda c: c["state"]["optimizers"] == []),
        (["state/callbacks", "state/metadata/lineage"], lambda c: "callbacks" not in c["state"] and "lineage" not in c["state"]["metadata"]),
    ],
)
def test_ignore_keys_globs_on_save(tmp_path: Path, globs, check) -> None:
    saver = CheckpointSaver(str(tmp_path), filename="ba{batch}.pt", save_interval="2ba", ignore_keys=globs)
    make_trainer([saver], max_duration="2ba").fit()
    assert check(only_checkpoint(tmp_path))


def test_ignore_keys_callable(tmp_path: Path) -> None:
    def drop_optimizer(checkpoint: dict) -> None:
        del checkpoint["state"]["optimizers"]

    saver = CheckpointSaver(str(tmp_path), filename="ba{batch}.pt", save_interval="2ba", ignore_keys=drop_optimizer)
    make_trainer([saver], max_duration="2ba").fit()
    assert "optimizers" not in only_checkpoint(tmp_path)["state"]


def test_loading_missing_truncated_and_garbage_files(tmp_path: Path) -> None:
    trainer = make_trainer([CheckpointSaver(str(tmp_path), filename="ba{batch}.pt", save_interval="2ba")], max_duration="2ba")
    trainer.fit()
    with pytest.raises(CheckpointNotFoundError):
        load_checkpoint(tmp_path / "nope.pt", trainer.state)
    good = (tmp_path / "ba2.pt").read_bytes()
    for name, data in {"truncated.pt": good[: len(good) // 2], "garbage.pt": b"\x00garbage" * 100, "empty.pt": b""}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CorruptCheckpointError, match=name):
            load_checkpoint(tmp_path / name, trainer.state)


def test_compressed_checkpoint_round_trip(tmp_path: Path) -> None:
    saver = CheckpointSaver(str(tmp_path), filename="ba{batch}.pt.gz", save_interval="2ba", compression_level=1)
    trainer = make_trainer([saver], max_duration="2ba")
    trainer.fit()
    assert (tmp_path / "ba2.pt.gz").read_bytes()[:2] == b"\x1f\x8b"
    renamed = tmp_path / "renamed.bin"
    renamed.write_bytes((tmp_path / "ba2.pt.gz").read_bytes())
    fresh = make_trainer(max_duration="2ba")
    load_checkpoint(renamed, fresh.state)
    assert fresh.state.timestamp.batch == 2
    for key, tensor in trainer.state.model.state_dict().items():
        assert torch.equal(fresh.state.model.state_dict()[key], tensor)
