"""Every checkpoint format through the reference Trainer: save with CheckpointSaver(filename=...), then a
second Trainer with autoresume=True continues exactly (same weights, bit for bit) from the file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _training import make_trainer, weights

from ckpt_callbacks import CheckpointSaver, load_checkpoint
from ckpt_callbacks.errors import ConfigurationError

EXTENSIONS = [
    ".pt", "", ".pt.zst", ".pt.lz4", ".pt.gz", ".pt.bz2", ".pt.xz", ".pt.lzma", ".bin.zst",
    ".tar", ".pt.tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz", ".tar.lzma", ".tar.zst", ".tar.lz4",
]  # fmt: skip


@pytest.fixture(scope="module")
def straight() -> dict[str, torch.Tensor]:
    trainer = make_trainer(max_duration="2ep")
    trainer.fit()
    return weights(trainer)


def _saver(folder: Path, extension: str, **kwargs: object) -> CheckpointSaver:
    return CheckpointSaver(str(folder), filename=f"ep{{epoch}}-ba{{batch}}{extension}", save_interval="3ba", **kwargs)


@pytest.mark.parametrize("extension", EXTENSIONS)
def test_every_format_saves_then_autoresumes_exactly(
    extension: str, straight: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    make_trainer([_saver(tmp_path, extension)], max_duration="7ba", autoresume=True).fit()
    assert sorted(p.name for p in tmp_path.glob("ep*")) == sorted(f"ep{e}-ba{b}{extension}" for e, b in ((0, 3), (1, 6), (1, 7)))
    # The latest link keeps the default '.pt' name whatever the checkpoint's format.
    link = tmp_path / "latest-rank0.pt"
    assert os.readlink(link) == f"ep1-ba7{extension}"
    probe = make_trainer(max_duration="1ba")
    load_checkpoint(link, probe.state)
    assert probe.state.timestamp.batch == 7

    resumed = make_trainer([_saver(tmp_path, extension)], max_duration="2ep", autoresume=True)
    resumed.fit()
    assert Path(resumed.state.resumed_from).name == f"ep1-ba7{extension}"
    assert resumed.state.timestamp.batch == 10
    for key, tensor in straight.items():
        assert torch.equal(weights(resumed)[key], tensor), key


def test_compression_level_reaches_the_codec(tmp_path: Path) -> None:
    sizes = []
    for level in (1, 19):
        folder = tmp_path / str(level)
        saver = _saver(folder, ".tar.zst", compression_level=level)
        make_trainer([saver], max_duration="3ba", run_name=f"level-{level}").fit()
        sizes.append((folder / "ep0-ba3.tar.zst").stat().st_size)
    assert sizes[0] != sizes[1]
    with pytest.raises(ConfigurationError, match="'compression_level' must be an int from"):
        _saver(tmp_path, ".tar.gz", compression_level=12)
    with pytest.raises(ConfigurationError, match="'compression_level' must be None for an uncompressed filename"):
        _saver(tmp_path, ".tar", compression_level=3)


def test_safetensors_weights_only_exports_load_into_a_fresh_model(tmp_path: Path) -> None:
    exports = CheckpointSaver(str(tmp_path / "exports"), filename="ep{epoch}.safetensors", save_interval="1ep",
                              weights_only=True)  # fmt: skip
    full = _saver(tmp_path / "full", ".pt.zst")
    trainer = make_trainer([exports, full], max_duration="2ep", autoresume=True)
    trainer.fit()
    assert sorted(p.name for p in (tmp_path / "exports").glob("ep*")) == ["ep1.safetensors", "ep2.safetensors"]

    fresh = make_trainer(max_duration="1ba")
    load_checkpoint(tmp_path / "exports" / "ep2.safetensors", fresh.state, weights_only=True)
    for key, tensor in weights(trainer).items():
        assert torch.equal(weights(fresh)[key], tensor), key
    # Autoresume takes the full-state saver, never the weights-only export.
    resumed = make_trainer([exports, _saver(tmp_path / "full", ".pt.zst")], max_duration="3ep", autoresume=True)
    resumed._load()
    assert Path(resumed.state.resumed_from).name == "ep2-ba10.pt.zst"


def test_safetensors_needs_weights_only(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        CheckpointSaver(str(tmp_path), filename="ep{epoch}.safetensors")
    message = str(info.value)
    assert message.startswith("'weights_only' must be True for filename='ep{epoch}.safetensors'")
    assert "holds tensors only" in message and "(got False)" in message
