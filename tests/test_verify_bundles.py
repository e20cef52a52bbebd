"""`verify` on a tar bundle of a trainer's folder (a Hugging Face checkpoint-N/), not of one state dict."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ckpt_callbacks import archive
from ckpt_callbacks.verification import verify_checkpoint


def make_bundle(tmp_path: Path, damage: bool = False) -> Path:
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    torch.save({"state": torch.arange(1000, dtype=torch.float32)}, folder / "optimizer.pt")
    if damage:
        data = bytearray((folder / "optimizer.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / "optimizer.pt").write_bytes(bytes(data))
    bundle = tmp_path / "checkpoint-4.tar.gz"
    with open(bundle, "wb") as out:
        archive.bundle(folder, out, bundle.name)
    return bundle


def test_an_intact_folder_bundle_verifies(tmp_path: Path) -> None:
    verdict = verify_checkpoint(make_bundle(tmp_path))
    assert verdict.ok, verdict.error
    assert any("optimizer.pt" in check for check in verdict.checks)


def test_a_damaged_member_fails_verification(tmp_path: Path) -> None:
    verdict = verify_checkpoint(make_bundle(tmp_path, damage=True))
    assert not verdict.ok and "optimizer.pt" in verdict.error
