"""The manager seams the trainer integrations stand on, without any trainer package (so they run in
every tox env): a trainer's native checkpoint dict saved as the whole file, and a trainer's folder
committed as a tar bundle or a folder; both recorded, and adopted from their own metadata when the
record is lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ckpt_callbacks import CheckpointManager, Timestamp
from ckpt_callbacks.archive import extract
from ckpt_callbacks.capture import FolderCheckpoint, NativeCheckpoint
from ckpt_callbacks.codecs import checkpoint_format
from ckpt_callbacks.errors import ConfigurationError
from ckpt_callbacks.folders import commit_folder
from ckpt_callbacks.record import FOLDER_METADATA, NATIVE_METADATA_KEY
from ckpt_callbacks.serialization import read_state


def _trainer_folder(root: Path, step: int) -> Path:
    """What a Hugging Face Trainer writes: a folder of several files, one in a subfolder."""
    folder = root / f"checkpoint-{step}"
    (folder / "sub").mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    torch.save({"w": torch.full((4,), float(step))}, folder / "optimizer.pt")
    (folder / "sub" / "extra.bin").write_bytes(bytes(range(256)))
    return folder


def _forget_record(folder: Path) -> None:
    for record in folder.glob(".ckpt-record-*.json"):
        record.unlink()


def test_a_native_dict_is_the_whole_file_with_our_metadata_under_one_key(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path), filename="ba{batch}.pt.zst", run_name="r", ignore_keys=["secret"])
    manager.start(Timestamp())
    native = {"state_dict": {"w": torch.ones(2)}, "global_step": 5, "secret": 1}
    info = manager.save(Timestamp(batch=5), NativeCheckpoint(native)).result()
    manager.close()
    saved = read_state(tmp_path / "ba5.pt.zst")
    assert set(saved) == {"state_dict", "global_step", NATIVE_METADATA_KEY}  # ignore_keys applied, no 'state' added
    assert saved[NATIVE_METADATA_KEY]["save_sequence"] == info.seq == 1
    assert "secret" in native  # the trainer's own dict is left as it was

    _forget_record(tmp_path)
    adopted = CheckpointManager(str(tmp_path), filename="ba{batch}.pt.zst", run_name="r", ignore_keys=["secret"])
    adopted.reconcile()
    assert [(c.name, c.seq, c.timestamp.batch) for c in adopted.all()] == [("ba5.pt.zst", 1, 5)]


def test_a_trainer_folder_is_snapshotted_then_bundled_in_the_background(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path / "ckpt"), filename="ba{batch}.tar.zst", run_name="r", save_mode="async")
    manager.start(Timestamp())
    source = _trainer_folder(tmp_path / "out", 4)
    future = manager.save(Timestamp(batch=4), FolderCheckpoint(source))
    shutil.rmtree(source)  # the Trainer's save_total_limit deletes its folder while we bundle
    info = future.result()
    manager.close()
    members = extract(tmp_path / "ckpt" / "ba4.tar.zst", tmp_path / "look")
    assert sorted(p.relative_to(tmp_path / "look").as_posix() for p in members if p.is_file()) == [
        FOLDER_METADATA, "optimizer.pt", "sub/extra.bin", "trainer_state.json",
    ]
    assert (tmp_path / "look" / "sub" / "extra.bin").read_bytes() == bytes(range(256))
    assert json.loads((tmp_path / "look" / FOLDER_METADATA).read_text())["timestamp"]["batch"] == 4
    assert info.files == ("ba4.tar.zst",) and not list((tmp_path / "ckpt").glob(".ba4*"))  # no staging left

    _forget_record(tmp_path / "ckpt")
    adopted = CheckpointManager(str(tmp_path / "ckpt"), filename="ba{batch}.tar.zst", run_name="r")
    adopted.reconcile()
    assert [(c.name, c.seq) for c in adopted.all()] == [("ba4.tar.zst", 1)]


def test_a_trainer_folder_becomes_a_folder_checkpoint_of_hard_links(tmp_path: Path) -> None:
    manager = CheckpointManager(str(tmp_path / "ckpt"), filename="ba{batch}", run_name="r", num_checkpoints_to_keep=1)
    manager.start(Timestamp())
    for step in (2, 4):
        manager.save(Timestamp(batch=step), FolderCheckpoint(_trainer_folder(tmp_path / "out", step)))
    manager.close()
    committed = tmp_path / "ckpt" / "ba4"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if not p.name.startswith(".")) == ["ba4", "latest-rank0.pt"]
    assert (committed / "optimizer.pt").stat().st_ino == (tmp_path / "out" / "checkpoint-4" / "optimizer.pt").stat().st_ino
    assert manager.latest().files == tuple(sorted(
        f"ba4/{name}" for name in (FOLDER_METADATA, "optimizer.pt", "sub/extra.bin", "trainer_state.json")
    ))


def test_only_tar_and_extensionless_names_hold_a_folder(tmp_path: Path) -> None:
    staging = _trainer_folder(tmp_path, 1)
    with pytest.raises(ConfigurationError, match="'filename' must be a tar name"):
        commit_folder(staging, tmp_path / "ba1.pt", checkpoint_format("ba1.pt"))
    assert not staging.exists() and not (tmp_path / "ba1.pt").exists()  # the snapshot is consumed either way
