"""The Hugging Face integration with real ``transformers.Trainer`` runs on a tiny GPT-2 built from a
config (no download): the Trainer's folders committed under our names as compressed tars or folders,
our interval driving the Trainer's saves, weights-only exports, resume at the saved step with equal
weights, and an upload to SeaweedFS resumed from its URI."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
transformers = pytest.importorskip("transformers", reason="the Hugging Face integration tests need transformers")

from ckpt_callbacks.archive import extract  # noqa: E402
from ckpt_callbacks.errors import ConfigurationError  # noqa: E402
from ckpt_callbacks.integrations.transformers import CheckpointSaverCallback, resume_from_latest  # noqa: E402
from ckpt_callbacks.record import FOLDER_METADATA  # noqa: E402

STEPS_PER_EPOCH = 8


class Crash(RuntimeError):
    """A job killed mid-training."""


class CrashAt(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise Crash(f"killed at step {self.step}")


def _model() -> Any:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def _data() -> list[dict[str, torch.Tensor]]:
    tokens = torch.randint(0, 64, (STEPS_PER_EPOCH * 4, 16), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in tokens]


def _train(
    output_dir: Path, callbacks: list[Any], *, resume: Any = None, before_train: Any = None, **arguments: Any
) -> tuple[Any, Any]:
    """Train the tiny model for 2 epochs (16 steps); returns (trainer, model). A Crash propagates."""
    options = {"save_strategy": "steps", "save_steps": 4, "save_total_limit": 1, **arguments}
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=4, num_train_epochs=2, report_to="none",
        use_cpu=True, seed=0, logging_strategy="no", disable_tqdm=True, **options,
    )
    model = _model()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data(), callbacks=callbacks)
    if before_train is not None:
        resume = before_train()
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _weights(model: Any) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_trainer_checkpoints_become_compressed_tars_and_resume_at_their_step(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _, reference = _train(tmp_path / "reference", [], save_strategy="no")

    def saver() -> CheckpointSaverCallback:
        return CheckpointSaverCallback(
            folder="{run_name}/checkpoints", filename="ep{epoch}-ba{batch}.tar.zst", latest_filename="latest.tar.zst",
            num_checkpoints_to_keep=2, save_mode="async", run_name="exp",
        )

    first = saver()
    with pytest.raises(Crash):
        _train(tmp_path / "out", [first, CrashAt(10)])
    first.saver.close()  # what the interpreter does at exit: the save in flight completes

    folder = tmp_path / "exp" / "checkpoints"
    assert _names(folder) == ["ep0-ba4.tar.zst", "ep0-ba8.tar.zst", "latest.tar.zst"]
    assert os.readlink(folder / "latest.tar.zst") == "ep0-ba8.tar.zst"
    assert _names(tmp_path / "out") == ["checkpoint-8"]  # save_total_limit deleted checkpoint-4: ours stays
    extracted = extract(folder / "ep0-ba4.tar.zst", tmp_path / "look")
    names = {path.name for path in extracted}
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", FOLDER_METADATA} <= names
    metadata = json.loads((tmp_path / "look" / FOLDER_METADATA).read_text())
    assert (metadata["saver"], metadata["run_name"], metadata["timestamp"]["batch"]) == (first.saver.state_key, "exp", 4)
    assert metadata["timestamp"]["sample"] == 16

    second = saver()
    trainer, model = _train(tmp_path / "out", [second], before_train=lambda: resume_from_latest(second))
    assert second.resumed_from == str(Path("exp/checkpoints/ep0-ba8.tar.zst"))
    assert trainer.state.global_step == 16
    for name, value in _weights(reference).items():
        assert torch.equal(_weights(model)[name], value), name
    assert _names(folder) == ["ep1-ba12.tar.zst", "ep1-ba16.tar.zst", "latest.tar.zst"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".resume")]  # the extracted copy is gone


def test_our_interval_drives_the_trainer_and_commits_folders(tmp_path: Path) -> None:
    saver = CheckpointSaverCallback(folder=str(tmp_path / "ckpt"), filename="ba{batch}", latest_filename="latest",
                                    save_interval="5ba", run_name="exp")
    _train(tmp_path / "out", [saver], save_strategy="no", save_total_limit=None)
    assert _names(tmp_path / "ckpt") == ["ba10", "ba15", "ba16", "ba5", "latest"]  # 16: the end of training
    assert {"config.json", "model.safetensors", "trainer_state.json", FOLDER_METADATA} <= set(_names(tmp_path / "ckpt" / "ba10"))
    assert json.loads((tmp_path / "ckpt" / "ba10" / FOLDER_METADATA).read_text())["timestamp"]["epoch"] == 1
    assert resume_from_latest(saver) == str(tmp_path / "ckpt" / "ba16")  # a folder resumes as it is


def test_weights_only_exports_safetensors_without_trainer_checkpoints(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    saver = CheckpointSaverCallback(folder=str(tmp_path / "exports"), filename="ba{batch}.safetensors",
                                    latest_filename=None, save_interval="8ba", weights_only=True, run_name="exp")
    _, model = _train(tmp_path / "out", [saver], save_strategy="no")
    assert _names(tmp_path / "exports") == ["ba16.safetensors", "ba8.safetensors"]
    assert not (tmp_path / "out").exists() or not _names(tmp_path / "out")  # the Trainer was not asked to save
    exported = load_file(tmp_path / "exports" / "ba16.safetensors")
    for name, value in _weights(model).items():
        assert torch.equal(exported[name], value), name
    with pytest.raises(ConfigurationError, match="full-state saver"):
        resume_from_latest(saver)


def test_configuration_is_checked_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="'filename' must be a tar name"):
        CheckpointSaverCallback(filename="ba{batch}.pt")
    with pytest.raises(ConfigurationError, match="'ranks' must be 'rank0'"):
        CheckpointSaverCallback(ranks="per_rank")
    with pytest.raises(ConfigurationError, match="'run_name' must be None or a non-empty str"):
        CheckpointSaverCallback(run_name="")
    CheckpointSaverCallback(filename="ba{batch}.pt", weights_only=True)  # an export may be any weights format


def test_uploads_to_s3_and_resumes_from_the_uri(tmp_path: Path, seaweedfs_bucket, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    saver = CheckpointSaverCallback(
        filename="ba{batch}.tgz", remote=seaweedfs_bucket.url("runs"), storage_options=seaweedfs_bucket.storage_options(),
        num_checkpoints_to_keep=1, run_name="exp",
    )
    with pytest.raises(Crash):
        _train(tmp_path / "out", [saver, CrashAt(6)])
    saver.saver.close()
    client = seaweedfs_bucket.client()
    keys = {item["Key"] for item in client.list_objects_v2(Bucket=seaweedfs_bucket.name, Prefix="runs/")["Contents"]}
    assert {"runs/exp/checkpoints/ba4.tgz", "runs/exp/checkpoints/latest-rank0.tar.symlink"} <= keys

    # Another machine resumes from the store's pointer.
    pointer = seaweedfs_bucket.url("runs/exp/checkpoints/latest-rank0.tar.symlink")
    restored = resume_from_latest(pointer, storage_options=seaweedfs_bucket.storage_options(), dest=tmp_path / "restore")
    assert restored == str(tmp_path / "restore")
    trainer, _ = _train(tmp_path / "elsewhere", [], resume=restored, save_strategy="no")
    assert trainer.state.global_step == 16
