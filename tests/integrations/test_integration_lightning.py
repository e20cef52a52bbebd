"""The Lightning integration with real ``lightning.Trainer`` runs: names, intervals, pruning, formats,
native resume (compressed, tar, ``latest``, remote, ``AUTORESUME``), several savers beside Lightning's
``ModelCheckpoint``, the standalone ``pytorch_lightning`` package, an S3 upload, and DDP on 2 CPU
processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="the Lightning integration tests need lightning")

from _lightning_app import Crash, crash_at, fit, weights  # noqa: E402

from ckpt_callbacks.errors import ConfigurationError  # noqa: E402
from ckpt_callbacks.integrations.lightning import AUTORESUME, CheckpointIO, CheckpointSaver  # noqa: E402
from ckpt_callbacks.record import NATIVE_METADATA_KEY  # noqa: E402
from ckpt_callbacks.retention import KeepBest  # noqa: E402
from ckpt_callbacks.serialization import read_state  # noqa: E402

HERE = Path(__file__).resolve().parent


def _saver(folder: Path, **options: object) -> CheckpointSaver:
    options = {"filename": "ep{epoch}-ba{batch}.pt.zst", "save_interval": "3ba", "num_checkpoints_to_keep": 2,
               "run_name": "exp", **options}
    return CheckpointSaver(folder=str(folder / "{run_name}" / "checkpoints"), **options)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _assert_same_weights(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


def test_full_checkpoints_are_lightning_dicts_that_resume_natively(tmp_path: Path) -> None:
    _, reference = fit(pl, [], 2)
    saver = _saver(tmp_path, save_interval="4ba", num_checkpoints_to_keep=1)
    with pytest.raises(Crash):
        fit(pl, [saver, crash_at(pl, 10)], 2)

    folder = tmp_path / "exp" / "checkpoints"
    assert _names(folder) == ["ep0-ba8.pt.zst", "latest-rank0.pt"]  # ep0-ba4 pruned
    assert os.readlink(folder / "latest-rank0.pt") == "ep0-ba8.pt.zst"
    checkpoint = read_state(folder / "ep0-ba8.pt.zst")  # loads with torch.load(weights_only=True)
    assert (checkpoint["global_step"], checkpoint["epoch"]) == (8, 0)
    assert {"state_dict", "optimizer_states", "loops", "pytorch-lightning_version"} <= checkpoint.keys()
    metadata = checkpoint[NATIVE_METADATA_KEY]
    assert (metadata["saver"], metadata["run_name"], metadata["save_sequence"]) == (saver.state_key, "exp", 2)
    assert (metadata["timestamp"]["epoch"], metadata["timestamp"]["batch"], metadata["timestamp"]["sample"]) == (0, 8, 64)
    assert checkpoint["callbacks"][saver.state_key]["timestamp"]["batch"] == 8

    resumed = _saver(tmp_path, save_interval="4ba", num_checkpoints_to_keep=1)
    trainer, module = fit(pl, [resumed], 2, ckpt_path=folder / "latest-rank0.pt")  # a compressed file, via latest
    assert trainer.global_step == 16
    _assert_same_weights(weights(module), weights(reference))
    assert resumed.saver.manager.record.lineage.resumed_from == "ep0-ba8.pt.zst"
    assert [Path(p).name for p in resumed.saved_checkpoints] == ["ep1-ba16.pt.zst"]
    assert _names(folder) == ["ep1-ba16.pt.zst", "latest-rank0.pt"]
    final = read_state(folder / "ep1-ba16.pt.zst")[NATIVE_METADATA_KEY]["timestamp"]
    assert (final["epoch"], final["batch_in_epoch"], final["sample"]) == (1, 8, 128)


def test_several_savers_beside_model_checkpoint_and_autoresume(tmp_path: Path) -> None:
    def callbacks() -> list:
        full = _saver(tmp_path, filename="ep{epoch}.tar.gz", save_interval="1ep", num_checkpoints_to_keep=-1,
                      save_mode="async")
        exports = CheckpointSaver(
            folder=str(tmp_path / "{run_name}" / "exports"), filename="ba{batch}.safetensors", save_interval="4ba",
            weights_only=True, num_checkpoints_to_keep=1, run_name="exp",
        )
        lightning_own = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "lightning", every_n_train_steps=8, save_top_k=-1)
        return [full, exports, lightning_own]

    first = callbacks()
    trainer, module = fit(pl, first, 1, AUTORESUME, validate=True)  # nothing to resume: a fresh start
    assert trainer.global_step == 8
    assert _names(tmp_path / "exp" / "checkpoints") == ["ep1.tar.gz", "latest-rank0.pt"]
    assert _names(tmp_path / "exp" / "exports") == ["ba8.safetensors", "latest-rank0.pt"]
    assert _names(tmp_path / "lightning") == ["epoch=0-step=8.ckpt"]  # Lightning's own file, untouched by us
    from safetensors.torch import load_file

    _assert_same_weights(load_file(tmp_path / "exp" / "exports" / "ba8.safetensors"), weights(module))
    record = first[0].saver.manager.record
    assert "val_loss" in record.checkpoints[-1].metrics  # the validation of that step scores it

    second = callbacks()
    trainer, _ = fit(pl, second, 2, AUTORESUME, validate=True)
    assert trainer.global_step == 16
    assert second[0].saver.manager.record.lineage.resumed_from == "ep1.tar.gz"  # the full saver, not the export
    assert _names(tmp_path / "exp" / "checkpoints") == ["ep1.tar.gz", "ep2.tar.gz", "latest-rank0.pt"]

    # Lightning's own checkpoint still loads through our plugin, which wraps Lightning's.
    trainer, _ = fit(pl, [_saver(tmp_path / "other")], 2, ckpt_path=tmp_path / "lightning" / "epoch=0-step=8.ckpt")
    assert trainer.global_step == 16
    # Without a saver (an evaluation job), the plugin given to the Trainer reads our tar bundle.
    trainer, _ = fit(pl, [], 2, ckpt_path=tmp_path / "exp" / "checkpoints" / "ep1.tar.gz", plugins=[CheckpointIO()])
    assert trainer.global_step == 16


def test_keep_best_scores_lightning_metrics_and_counts_tokens(tmp_path: Path) -> None:
    saver = _saver(tmp_path, filename="tok{token}.pt", save_interval="1ep", num_checkpoints_to_keep=-1,
                   retention=KeepBest(1, "val_loss", mode="min"), num_tokens_fn=lambda batch: 100)
    fit(pl, [saver], 2, validate=True)
    names = _names(tmp_path / "exp" / "checkpoints")
    assert len([n for n in names if n.startswith("tok")]) == 1 and set(names) <= {"tok800.pt", "tok1600.pt", "latest-rank0.pt"}


def test_configuration_is_checked_at_construction_and_fit(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="'ranks' must be 'rank0' in Lightning"):
        CheckpointSaver(ranks="per_rank")
    with pytest.raises(ConfigurationError, match="'num_tokens_fn' must be None or a callable"):
        CheckpointSaver(num_tokens_fn=3)
    with pytest.raises(ConfigurationError, match="'save_interval'"):
        CheckpointSaver(save_interval="5xx")
    unnamed = CheckpointSaver(folder=str(tmp_path / "ckpt"), filename="ba{batch}.pt")
    with pytest.raises(ConfigurationError, match="needs CheckpointSaver\\(run_name=...\\)"):
        fit(pl, [unnamed], 1, AUTORESUME)
    # Two savers of one folder sharing their latest link are refused before anything is written
    # (identical twins Lightning refuses itself: their states would share a key).
    twins = [_saver(tmp_path), _saver(tmp_path, filename="other-ba{batch}.pt")]
    with pytest.raises(ConfigurationError, match="share latest_filename"):
        fit(pl, twins, 1)


def test_standalone_pytorch_lightning_package(tmp_path: Path) -> None:
    standalone = pytest.importorskip("pytorch_lightning")
    from ckpt_callbacks.integrations.pytorch_lightning import AUTORESUME as STANDALONE_AUTORESUME
    from ckpt_callbacks.integrations.pytorch_lightning import CheckpointSaver as StandaloneSaver

    def saver() -> StandaloneSaver:
        return StandaloneSaver(folder=str(tmp_path / "{run_name}"), filename="ba{batch}.pt.gz", save_interval="4ba",
                               run_name="exp")

    assert isinstance(saver(), standalone.Callback) and not isinstance(saver(), pl.Callback)
    with pytest.raises(Crash):
        fit(standalone, [saver(), crash_at(standalone, 6)], 2, STANDALONE_AUTORESUME)
    trainer, _ = fit(standalone, [saver()], 2, STANDALONE_AUTORESUME)
    assert trainer.global_step == 16
    assert _names(tmp_path / "exp") == ["ba12.pt.gz", "ba16.pt.gz", "ba4.pt.gz", "ba8.pt.gz", "latest-rank0.pt"]


def test_uploads_to_s3_and_resumes_from_the_store(tmp_path: Path, moto_bucket, monkeypatch) -> None:
    def saver(**options: object) -> CheckpointSaver:
        return CheckpointSaver(
            folder="{run_name}/checkpoints", filename="ba{batch}.pt.zst", save_interval="4ba", num_checkpoints_to_keep=1,
            remote=moto_bucket.url("runs"), storage_options=moto_bucket.storage_options(), run_name="exp", **options,
        )

    def on_machine(name: str) -> None:
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)

    on_machine("first")
    fit(pl, [saver()], 1)
    listed = moto_bucket.client().list_objects_v2(Bucket=moto_bucket.name, Prefix="runs/")
    keys = {item["Key"] for item in listed["Contents"]}
    prefix = "runs/exp/checkpoints/"
    assert {f"{prefix}ba4.pt.zst", f"{prefix}ba8.pt.zst", f"{prefix}ba8.pt.zst.manifest.json"} <= keys
    assert f"{prefix}latest-rank0.pt.symlink" in keys

    on_machine("second")  # nothing on disk: autoresume fetches what the store's pointer names
    trainer, _ = fit(pl, [saver()], 2, AUTORESUME)
    assert trainer.global_step == 16

    # An object URI as ckpt_path, through the plugin, with the saver's credentials; restarting from an
    # earlier step on purpose re-saves ba12 and ba16, which the store holds already: overwrite=True.
    on_machine("third")
    trainer, _ = fit(pl, [saver(overwrite=True)], 2, moto_bucket.url("runs/exp/checkpoints/ba8.pt.zst"))
    assert trainer.global_step == 16


def test_ddp_on_two_cpu_processes(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": os.pathsep.join(
        [str(HERE), os.environ.get("PYTHONPATH", "")])}
    script = [sys.executable, str(HERE / "_lightning_ddp.py"), str(tmp_path)]

    def launch(phase: str) -> None:
        done = subprocess.run([*script, phase], env=env, timeout=140, cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-4000:]

    launch("first")
    first = json.loads((tmp_path / "result-first-rank0.json").read_text())
    assert first["outcome"] == "crashed" and first["world_size"] == 2
    assert first["saved"] == ["ba2-rank0.pt.zst", "ba4-rank0.pt.zst"]
    assert not list((tmp_path / "ddp-run").glob("*rank1*"))  # rank 0 writes the replicated state
    saved = read_state(tmp_path / "ddp-run" / "ba4-rank0.pt.zst")["state_dict"]

    launch("resume")
    ranks = [json.loads((tmp_path / f"result-resume-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["global_step"] for r in ranks] == [8, 8]
    assert ranks[0]["resumed_from"] == "ba4-rank0.pt.zst"
    assert ranks[0]["saved"] == ["ba6-rank0.pt.zst", "ba8-rank0.pt.zst"]
    expected = [float(value.sum()) for value in saved.values()]
    assert ranks[0]["start_weights"] == ranks[1]["start_weights"] == pytest.approx(expected)
