"""The three rank modes across real gloo processes: rank0, per_rank and sharded (FSDP2 + DCP)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _distributed import run, values
from _training import loss_fn, make_loader, make_trainer

from ckpt_callbacks import CheckpointSaver, Trainer, load_checkpoint


def _per_rank_run(folder: str, max_duration: str, filename: str = "ba{batch}-rank{rank}.pt") -> dict:
    saver = CheckpointSaver(folder, filename=filename, save_interval="2ba", ranks="per_rank")
    trainer = make_trainer([saver], max_duration=max_duration, autoresume=True)
    trainer.fit()
    rank = torch.distributed.get_rank()
    mine = torch.load(Path(folder) / f"ba{trainer.state.timestamp.batch}-rank{rank}.pt", weights_only=True)
    return {
        "saved": [Path(p).name for p in saver.saved_checkpoints],
        "resumed_from": Path(trainer.state.resumed_from).name if trainer.state.resumed_from else None,
        "batch": trainer.state.timestamp.batch,
        "rng_filled": [entry is not None for entry in mine["rng"]],
        "latest": os.readlink(Path(folder) / f"latest-rank{rank}.pt"),
    }


def test_per_rank_mode_writes_one_file_per_rank_and_resumes(tmp_path: Path) -> None:
    first = values(run(2, _per_rank_run, str(tmp_path), "4ba"))
    assert [r["saved"] for r in first] == [["ba2-rank0.pt", "ba4-rank0.pt"], ["ba2-rank1.pt", "ba4-rank1.pt"]]
    assert [r["rng_filled"] for r in first] == [[True, False], [False, True]]
    assert [r["latest"] for r in first] == ["ba4-rank0.pt", "ba4-rank1.pt"]

    os.remove(tmp_path / "ba4-rank1.pt")  # rank 1 lost its newest file: both ranks fall back to ba2
    second = values(run(2, _per_rank_run, str(tmp_path), "6ba"))
    assert [r["resumed_from"] for r in second] == ["ba2-rank0.pt", "ba2-rank1.pt"]
    assert [r["batch"] for r in second] == [6, 6]


def test_per_rank_mode_requires_rank_in_names(tmp_path: Path) -> None:
    outcomes = run(2, _per_rank_run, str(tmp_path), "2ba", "ba{batch}.pt")
    for status, text in outcomes.values():
        assert status == "error" and "InvalidTemplateError" in text and "{rank}" in text
    assert not list(tmp_path.glob("ba*"))


def _failing_rank_run(folder: str, overwrite: bool) -> str:
    if torch.distributed.get_rank() == 1:
        (Path(folder) / "ba2-rank1.pt").mkdir(parents=True)  # rank 1 cannot commit over a folder
    torch.distributed.barrier()
    saver = CheckpointSaver(folder, filename="ba{batch}-rank{rank}.pt", save_interval="2ba", ranks="per_rank",
                            overwrite=overwrite)
    make_trainer([saver], max_duration="2ba").fit()
    return "no error"


@pytest.mark.parametrize(("overwrite", "when"), [(True, "saving"), (False, "preparing")])
def test_a_rank_failing_makes_every_rank_raise(tmp_path: Path, overwrite: bool, when: str) -> None:
    """With overwrite=False rank 1 fails at fit start (a later 'checkpoint' is in its way); with
    overwrite=True it fails to commit over a folder. Either way no rank hangs in a collective."""
    outcomes = run(2, _failing_rank_run, str(tmp_path), overwrite)
    for status, text in outcomes.values():
        assert status == "error"
        assert "CheckpointError" in text and when in text and "failed on rank 1" in text


def _rank0_run(folder: str, max_duration: str) -> dict:
    saver = CheckpointSaver(folder, filename="ba{batch}.pt", save_interval="2ba")
    trainer = make_trainer([saver], max_duration=max_duration, autoresume=True)
    trainer.fit()
    return {
        "saved": [Path(p).name for p in saver.saved_checkpoints],
        "resumed_from": Path(trainer.state.resumed_from).name if trainer.state.resumed_from else None,
        "rng_ranks": len(torch.load(Path(folder) / "ba2.pt", weights_only=True)["rng"]),
    }


def test_rank0_mode_only_rank_zero_writes(tmp_path: Path) -> None:
    first = values(run(2, _rank0_run, str(tmp_path), "2ba"))
    assert [r["saved"] for r in first] == [["ba2.pt"], []]
    assert first[0]["rng_ranks"] == 2
    assert sorted(p.name for p in tmp_path.glob("ba*")) == ["ba2.pt"]
    second = values(run(2, _rank0_run, str(tmp_path), "4ba"))
    assert [r["resumed_from"] for r in second] == ["ba2.pt", "ba2.pt"]


def _sharded_model() -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _full_weights(model: torch.nn.Module) -> dict[str, list]:
    """Plain lists: tensors sent through a multiprocessing queue would share memory with a dead child."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).tolist() for k, v in model.state_dict().items()}


def _sharded_trainer(folder: str, max_duration: str, callbacks=()) -> Trainer:
    model = _sharded_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return Trainer(model, optimizer, make_loader(shuffle=False), loss_fn=loss_fn, max_duration=max_duration,
                   run_name="sharded", callbacks=list(callbacks), autoresume=True)


def _sharded_run(folder: str, max_duration: str) -> dict:
    full = CheckpointSaver(folder, filename="ba{batch}", save_interval="2ba", ranks="sharded")
    export = CheckpointSaver(folder + "/exports", filename="ba{batch}.pt", save_interval="2ba", ranks="sharded",
                             weights_only=True)
    trainer = _sharded_trainer(folder, max_duration, [full, export])
    trainer.fit()
    return {
        "weights": _full_weights(trainer.state.model),
        "resumed_from": Path(trainer.state.resumed_from).name if trainer.state.resumed_from else None,
        "saved": [Path(p).name for p in full.saved_checkpoints],
    }


def _straight_sharded_run(max_duration: str) -> dict:
    trainer = _sharded_trainer("", max_duration)
    trainer.fit()
    return _full_weights(trainer.state.model)


def test_sharded_mode_saves_dcp_folders_and_resumes_exactly(tmp_path: Path) -> None:
    straight = values(run(2, _straight_sharded_run, "4ba"))[0]
    first = values(run(2, _sharded_run, str(tmp_path), "2ba"))
    assert first[0]["saved"] == ["ba2"] and first[1]["saved"] == []
    folder = tmp_path / "ba2"
    assert sorted(p.name for p in folder.iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "ckpt_callbacks.json", "extras.pt",
    ]
    assert os.readlink(tmp_path / "latest-rank0.pt") == "ba2"

    second = values(run(2, _sharded_run, str(tmp_path), "4ba"))
    assert [r["resumed_from"] for r in second] == ["ba2", "ba2"]
    assert second[0]["weights"] == straight

    export = torch.load(tmp_path / "exports" / "ba2.pt", weights_only=True)["state"]["model"]
    assert {key: tensor.tolist() for key, tensor in export.items()} == first[0]["weights"]


def test_sharded_checkpoint_reshards_to_one_process(tmp_path: Path) -> None:
    saved = values(run(2, _sharded_run, str(tmp_path), "2ba"))[0]["weights"]
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), make_loader(), loss_fn=loss_fn,
                      max_duration="4ba")
    load_checkpoint(tmp_path / "ba2", trainer.state)
    assert trainer.state.timestamp.batch == 2
    model = trainer.state.model
    assert model[0].weight.tolist() == saved["0.weight"] and model[2].bias.tolist() == saved["2.bias"]


@pytest.mark.parametrize("world_size", [4])
def test_sharded_save_with_four_ranks_resumes_on_two(tmp_path: Path, world_size: int) -> None:
    saved = values(run(world_size, _sharded_run, str(tmp_path), "2ba"))[0]["weights"]
    resumed = values(run(2, _sharded_run, str(tmp_path), "2ba"))
    assert resumed[0]["resumed_from"] == "ba2"
    assert resumed[0]["weights"] == saved


def _ddp_run(folder: str, max_duration: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from _training import make_model

    model = DistributedDataParallel(make_model())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    callbacks = [CheckpointSaver(folder, filename="ep{epoch}-ba{batch}.pt", save_interval="1ep")] if folder else []
    trainer = Trainer(model, optimizer, make_loader(batches_per_epoch=4), loss_fn=loss_fn, max_duration=max_duration,
                      run_name="ddp", callbacks=callbacks, autoresume=bool(folder))
    trainer.fit()
    return {
        "weights": {k: v.tolist() for k, v in trainer.state.model.state_dict().items()},
        "timestamp": trainer.state.timestamp.state_dict() | {"total_wct": 0, "epoch_wct": 0, "batch_wct": 0},
        "resumed_from": Path(trainer.state.resumed_from).name if trainer.state.resumed_from else None,
    }


def test_ddp_with_distributed_sampler_resumes_exactly(tmp_path: Path) -> None:
    """Each rank trains on its share of the data (2 batches of 4 per epoch); samples are summed."""
    straight = values(run(2, _ddp_run, "", "2ep"))
    assert straight[0]["timestamp"] == straight[1]["timestamp"]
    assert straight[0]["timestamp"]["batch"] == 4 and straight[0]["timestamp"]["sample"] == 64
    values(run(2, _ddp_run, str(tmp_path), "1ep"))
    resumed = values(run(2, _ddp_run, str(tmp_path), "2ep"))
    assert [r["resumed_from"] for r in resumed] == ["ep1-ba2.pt", "ep1-ba2.pt"]
    assert resumed[0]["weights"] == straight[0]["weights"] == resumed[1]["weights"]


def _per_rank_remote_run(folder: str, url: str, options) -> list[str]:
    saver = CheckpointSaver(folder, filename="ba{batch}-rank{rank}.pt", save_interval="2ba", ranks="per_rank",
                            remote=url, storage_options=options)
    make_trainer([saver], max_duration="2ba").fit()
    return sorted(Path(p).name for p in saver.saved_checkpoints)


def test_per_rank_mode_uploads_every_rank_then_commits_once(tmp_path: Path, moto_bucket) -> None:
    import json

    from ckpt_callbacks.remote import open_store

    url, options = moto_bucket.url("runs"), moto_bucket.storage_options()
    values(run(2, _per_rank_remote_run, str(tmp_path), url, options))
    store = open_store(url, options)
    manifest = json.loads(store.read_bytes("ba2-rank0.pt.manifest.json"))
    assert sorted(item["key"] for item in manifest["objects"]) == ["ba2-rank0.pt", "ba2-rank1.pt"]
    assert all(item["checksum"] for item in manifest["objects"])
    assert store.read_bytes("latest-rank0.pt.symlink").decode() == "ba2-rank0.pt"
    assert store.read_bytes("latest-rank1.pt.symlink").decode() == "ba2-rank1.pt"


def _sharded_remote_run(folder: str, url: str) -> None:
    full = CheckpointSaver(folder, filename="ba{batch}", save_interval="2ba", ranks="sharded", remote=url)
    _sharded_trainer(folder, "2ba", [full]).fit()


def test_sharded_mode_uploads_each_ranks_shards(tmp_path: Path) -> None:
    import json

    from ckpt_callbacks.remote import open_store

    url = (tmp_path / "bucket").as_uri()
    values(run(2, _sharded_remote_run, str(tmp_path / "local"), url))
    store = open_store(url)
    manifest = json.loads(store.read_bytes("ba2.manifest.json"))
    assert sorted(item["key"] for item in manifest["objects"]) == [
        "ba2/.metadata", "ba2/__0_0.distcp", "ba2/__1_0.distcp", "ba2/ckpt_callbacks.json", "ba2/extras.pt",
    ]
    assert store.read_bytes("latest-rank0.pt.symlink").decode() == "ba2"
