"""Damaged checkpoints: loading names the file and the damage; autoresume steps over a corrupt newest
checkpoint, with a warning, to the newest good one (locally and from the store).

Damage is done to real files written by a real saver: truncation (to half, and by one byte),
bytes flipped in the middle, a zero-length file, something else under a checkpoint's name, and
pointers (a local ``latest`` link, a remote ``.symlink``) naming a checkpoint that is not there.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
from _harness import one_thread, reference_weights
from train_victim import VictimConfig, make_saver, make_trainer

from ckpt_callbacks import CheckpointNotFoundError, CorruptCheckpointError, load_checkpoint
from ckpt_callbacks.locations import RemoteLocations
from ckpt_callbacks.remote import open_store

FORMATS = ("ba{batch}.pt", "ba{batch}.pt.zst", "ba{batch}.tar.zst")


def _truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _truncate_last_byte(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 1)


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


def _zero_length(path: Path) -> None:
    path.write_bytes(b"")


def _something_else(path: Path) -> None:
    path.write_bytes(b'{"not": "a checkpoint"}\n')


DAMAGE = {
    "truncated-half": _truncate_half,
    "truncated-last-byte": _truncate_last_byte,
    "flipped-middle": _flip_middle,
    "zero-length": _zero_length,
    "other-content": _something_else,
}


def _saved(tmp_path: Path, filename: str) -> Path:
    """A finished run (4 batches, every checkpoint kept) in ``tmp_path/ckpt``; returns the folder.
    (A saver's identity includes its folder, so the run is made where it is resumed.)"""
    config = VictimConfig(folder=str(tmp_path / "ckpt"), filename=filename, keep=-1, max_batches=4, width=64)
    with one_thread():
        make_trainer(config, saver=make_saver(config)).fit()
    return Path(config.folder)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("filename", FORMATS)
def test_loading_a_damaged_checkpoint_names_the_file(tmp_path: Path, filename: str, damage: str) -> None:
    folder = _saved(tmp_path, filename)
    path = folder / filename.format(batch=4)
    DAMAGE[damage](path)
    config = VictimConfig(folder=str(tmp_path / "other"), filename=filename, width=64)
    state = make_trainer(config, saver=make_saver(config)).state
    with pytest.raises(CorruptCheckpointError) as raised:
        load_checkpoint(path, state)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("filename", FORMATS)
def test_autoresume_steps_over_a_corrupt_newest_checkpoint(tmp_path: Path, filename: str, damage: str) -> None:
    folder = _saved(tmp_path, filename)
    newest = folder / filename.format(batch=4)
    DAMAGE[damage](newest)
    config = VictimConfig(folder=str(folder), filename=filename, keep=-1, max_batches=4, width=64)
    trainer = make_trainer(config, saver=make_saver(config))
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint") as caught, one_thread():
        trainer.fit()
    assert any(str(newest) in str(w.message) for w in caught)
    assert Path(trainer.state.resumed_from).name == filename.format(batch=3)
    assert (folder / (newest.name + ".corrupt")).exists()  # set aside, out of the template's way
    expected = reference_weights(config, tmp_path)
    assert all(tensor.equal(expected[name]) for name, tensor in trainer.state.model.state_dict().items())


def test_a_sound_checkpoint_under_a_wrong_extension_loads(tmp_path: Path) -> None:
    """Readers go by the bytes, not the name: a zstd checkpoint called .pt (or .tar) loads."""
    folder = _saved(tmp_path, "ba{batch}.pt.zst")
    config = VictimConfig(folder=str(tmp_path / "other"), width=64)
    for wrong in ("ba4.pt", "ba4.tar"):
        renamed = folder / wrong
        os.replace(folder / "ba4.pt.zst" if wrong == "ba4.pt" else folder / "ba4.pt", renamed)
        state = make_trainer(config, saver=make_saver(config)).state
        load_checkpoint(renamed, state)
        assert state.timestamp.batch == 4


def test_a_dangling_latest_link_is_not_found(tmp_path: Path) -> None:
    folder = _saved(tmp_path, "ba{batch}.pt")
    (folder / "ba4.pt").unlink()
    config = VictimConfig(folder=str(tmp_path / "other"), width=64)
    state = make_trainer(config, saver=make_saver(config)).state
    with pytest.raises(CheckpointNotFoundError) as raised:
        load_checkpoint(folder / "latest-rank0.pt", state)
    assert "ba4.pt" in str(raised.value) and "latest-rank0.pt" in str(raised.value)


def test_a_remote_pointer_naming_a_missing_object_is_not_found(tmp_path: Path) -> None:
    store_url = (tmp_path / "store").as_uri()
    store = open_store(store_url)
    store.write_bytes("latest-rank0.pt.symlink", b"ba9.pt")
    with RemoteLocations() as remote, pytest.raises(CheckpointNotFoundError) as raised:
        remote.resolve(f"{store_url}/latest-rank0.pt.symlink")
    assert "latest-rank0.pt.symlink" in str(raised.value) and "ba9.pt" in str(raised.value)


def test_autoresume_from_the_store_steps_over_a_corrupt_newest_object(tmp_path: Path) -> None:
    """A new machine (empty folder) resumes from the store, whose newest object was damaged there."""
    store = tmp_path / "store"
    # 'warn': the damaged object stays in the store (never deleted on a guess), and with overwrite=False
    # it keeps the re-trained ba4.pt from being uploaded under its key; that is reported, not fatal.
    config = VictimConfig(folder=str(tmp_path / "ckpt"), keep=-1, max_batches=4, width=64, remote=store.as_uri(),
                          on_upload_error="warn")
    with one_thread():
        make_trainer(config, saver=make_saver(config)).fit()
    shutil.rmtree(config.folder)
    _flip_middle(store / "ba4.pt")
    trainer = make_trainer(config, saver=make_saver(config))
    with warnings.catch_warnings(record=True) as caught, one_thread():
        warnings.simplefilter("always")
        trainer.fit()
    messages = [str(w.message) for w in caught]
    assert any("ba4.pt" in message and "corrupt" in message for message in messages), messages
    assert Path(trainer.state.resumed_from).name == "ba3.pt"
    expected = reference_weights(config, tmp_path)
    assert all(tensor.equal(expected[name]) for name, tensor in trainer.state.model.state_dict().items())
