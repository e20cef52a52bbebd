"""The ckpt-callbacks command: help, usage errors and the demo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_callbacks.cli import main


def test_module_help() -> None:
    result = subprocess.run([sys.executable, "-m", "ckpt_callbacks", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in result.stdout


def test_console_script_help() -> None:
    script = shutil.which("ckpt-callbacks", path=os.path.dirname(sys.executable)) or shutil.which("ckpt-callbacks")
    assert script, "the ckpt-callbacks console script is not installed"
    result = subprocess.run([script, "demo", "--help"], capture_output=True, text=True, check=True)
    assert "--folder" in result.stdout


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["no-such-command"])
    assert raised.value.code == 2


def test_demo_saves_resumes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--folder", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "ep2-ba25-rank0.pt.gz" in out
    assert "epoch 2, batch 25 (5 into the epoch)" in out
    checkpoints = tmp_path / "demo-run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("ep*")) == ["ep3-ba36-rank0.pt.gz", "ep3-ba40-rank0.pt.gz"]
    assert os.readlink(checkpoints / "latest-rank0.pt") == "ep3-ba40-rank0.pt.gz"
    exports = tmp_path / "demo-run" / "exports"
    assert sorted(p.name for p in exports.glob("ep*")) == [
        "ep1-ba10.pt", "ep2-ba20.pt", "ep2-ba25.pt", "ep3-ba30.pt", "ep4-ba40.pt",
    ]


def test_demo_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the demo wants a folder")
    assert main(["demo", "--folder", str(blocker)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ckpt-callbacks: error:") and err.count("\n") == 1


def test_demo_as_a_two_process_ddp_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--nproc", "2", "--folder", str(tmp_path)]) == 0
    checkpoints = tmp_path / "demo-run" / "checkpoints"
    assert os.readlink(checkpoints / "latest-rank0.pt") == "ep3-ba20-rank0.pt.gz"
    assert not list(checkpoints.glob("*rank1*"))  # rank 0 writes the replicated state
