"""End to end: the saver uploads to a real store, commits manifests and pointers, prunes, and resumes from it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _training import make_trainer, weights

from ckpt_callbacks import CheckpointSaver, ConfigurationError, KeepLast, UploadError
from ckpt_callbacks.remote import open_store


def saver(folder: Path, remote: str, storage_options=None, **kwargs) -> CheckpointSaver:
    kwargs.setdefault("save_interval", "2ba")
    return CheckpointSaver(str(folder), filename="ba{batch}.pt", remote=remote, storage_options=storage_options,
                           **kwargs)


@pytest.fixture(params=["file", "moto", "seaweedfs"])
def remote(request, tmp_path: Path):
    """(url, storage_options) of a file:// store and of each real S3 server."""
    if request.param == "file":
        return (tmp_path / "bucket").as_uri(), None
    bucket = request.getfixturevalue(f"{request.param}_bucket")
    return bucket.url("runs"), bucket.storage_options()


def test_every_checkpoint_reaches_the_store_with_manifest_and_pointer(tmp_path: Path, remote) -> None:
    url, options = remote
    folder = tmp_path / "local"
    make_trainer([saver(folder, url, options, num_checkpoints_to_keep=1)], max_duration="4ba").fit()
    store = open_store(url, options)
    keys = store.list()
    assert "ba2.pt" in keys and "ba4.pt" in keys
    assert store.read_bytes("latest-rank0.pt.symlink").decode() == "ba4.pt"
    manifest = json.loads(store.read_bytes("ba4.pt.manifest.json"))
    assert [item["key"] for item in manifest["objects"]] == ["ba4.pt"]
    assert manifest["objects"][0]["size"] == (folder / "ba4.pt").stat().st_size
    assert manifest["objects"][0]["checksum"]
    assert sorted(p.name for p in folder.glob("ba*.pt")) == ["ba4.pt"]  # pruned locally once uploaded


def test_autoresume_from_the_store_after_the_local_folder_is_gone(tmp_path: Path, remote) -> None:
    url, options = remote
    folder = tmp_path / "local"
    first = make_trainer([saver(folder, url, options)], max_duration="4ba", autoresume=True)
    first.fit()
    shutil.rmtree(folder)
    resumed = make_trainer([saver(folder, url, options)], max_duration="4ba", autoresume=True)
    resumed.fit()
    assert Path(resumed.state.resumed_from).name == "ba4.pt"
    assert resumed.state.timestamp.batch == 4
    for key, tensor in weights(first).items():
        assert torch.equal(weights(resumed)[key], tensor)


def test_remote_retention_keeps_the_newest_and_the_pointer_target(tmp_path: Path) -> None:
    url = (tmp_path / "bucket").as_uri()
    make_trainer([saver(tmp_path / "local", url, save_interval="1ba", remote_retention=KeepLast(2))],
                 max_duration="5ba").fit()
    store = open_store(url)
    assert sorted(k for k in store.list() if k.endswith(".pt")) == ["ba4.pt", "ba5.pt"]
    assert store.read_bytes("latest-rank0.pt.symlink").decode() == "ba5.pt"


def test_uri_folder_stages_locally_and_cleans_up(tmp_path: Path) -> None:
    url = (tmp_path / "bucket" / "run").as_uri()
    staged = CheckpointSaver(url, filename="ba{batch}.pt", save_interval="2ba")
    make_trainer([staged], max_duration="4ba").fit()
    assert not Path(staged.folder.template).exists()
    assert sorted(k for k in open_store(url).list() if k.endswith(".pt")) == ["ba2.pt", "ba4.pt"]


def test_upload_failure_is_raised_on_the_training_thread(tmp_path: Path) -> None:
    url = (tmp_path / "bucket").as_uri()
    (tmp_path / "bucket").mkdir()
    (tmp_path / "bucket" / "ba2.pt").write_bytes(b"someone else's object")
    with pytest.raises(UploadError, match="ba2.pt"):
        make_trainer([saver(tmp_path / "local", url)], max_duration="4ba").fit()
    assert (tmp_path / "local" / "ba2.pt").exists()  # a failed upload keeps its local file


def test_upload_failure_can_warn(tmp_path: Path) -> None:
    url = (tmp_path / "bucket").as_uri()
    (tmp_path / "bucket").mkdir()
    (tmp_path / "bucket" / "ba2.pt").write_bytes(b"someone else's object")
    with pytest.warns(UserWarning, match="upload failed"):
        make_trainer([saver(tmp_path / "local", url, on_upload_error="warn")], max_duration="4ba").fit()


def test_remote_arguments_without_remote_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="remote_file_name"):
        CheckpointSaver(remote_file_name="x/{batch}.pt")
    with pytest.raises(ConfigurationError, match="remote"):
        CheckpointSaver(remote="not-a-url")


def test_load_checkpoint_from_a_uri_and_a_remote_pointer(tmp_path: Path, remote) -> None:
    from ckpt_callbacks import load_checkpoint

    url, options = remote
    trainer = make_trainer([saver(tmp_path / "local", url, options)], max_duration="4ba")
    trainer.fit()
    for location in (f"{url}/ba4.pt", f"{url}/latest-rank0.pt.symlink"):
        fresh = make_trainer(max_duration="4ba")
        load_checkpoint(location, fresh.state, storage_options=options)
        assert fresh.state.timestamp.batch == 4
        for key, tensor in weights(trainer).items():
            assert torch.equal(weights(fresh)[key], tensor)


# ------------------------------------------------------------------ faults between the saver and a real store

from fault_proxy import Respond, Stall, fault_proxy_factory  # noqa: E402,F401 -- the fixture is used by name


def test_transient_errors_are_retried_and_nothing_is_lost(tmp_path: Path, moto_bucket, fault_proxy_factory) -> None:
    proxy = fault_proxy_factory(moto_bucket.server.endpoint_url)
    options = moto_bucket.storage_options(endpoint_url=proxy.endpoint_url, max_attempts=1)
    rule = proxy.add(Respond(503), method="PUT", path=r"/ba2\.pt", times=2)
    make_trainer([saver(tmp_path / "local", moto_bucket.url("runs"), options)], max_duration="4ba").fit()
    assert rule.hits == 2
    store = open_store(moto_bucket.url("runs"), moto_bucket.storage_options())
    assert {"ba2.pt", "ba4.pt", "ba2.pt.manifest.json"} <= set(store.list())


def test_a_stalled_upload_times_out_and_keeps_its_local_file(tmp_path: Path, moto_bucket, fault_proxy_factory) -> None:
    """Retention must not delete a checkpoint whose upload never completed."""
    proxy = fault_proxy_factory(moto_bucket.server.endpoint_url)
    options = moto_bucket.storage_options(endpoint_url=proxy.endpoint_url, max_attempts=1, read_timeout=1)
    proxy.add(Stall(seconds=10), method="PUT", path=r"/ba2\.pt", times=None)
    stalled = saver(tmp_path / "local", moto_bucket.url("runs"), options, num_checkpoints_to_keep=1,
                    upload_timeout_in_seconds=2, on_upload_error="warn")
    with pytest.warns(UserWarning, match="ba2.pt"):
        make_trainer([stalled], max_duration="4ba").fit()
    assert sorted(p.name for p in (tmp_path / "local").glob("ba*.pt")) == ["ba2.pt", "ba4.pt"]
    store = open_store(moto_bucket.url("runs"), moto_bucket.storage_options())
    assert store.read_bytes("latest-rank0.pt.symlink").decode() == "ba4.pt"
    assert "ba2.pt.manifest.json" not in store.list()


def test_remote_retention_in_a_real_bucket(tmp_path: Path, seaweedfs_bucket) -> None:
    url, options = seaweedfs_bucket.url("runs"), seaweedfs_bucket.storage_options()
    make_trainer([saver(tmp_path / "local", url, options, save_interval="1ba", remote_retention=KeepLast(2))],
                 max_duration="4ba").fit()
    store = open_store(url, options)
    assert sorted(k for k in store.list() if k.endswith(".pt")) == ["ba3.pt", "ba4.pt"]
    assert sorted(k for k in store.list() if k.endswith(".manifest.json")) == [
        "ba3.pt.manifest.json", "ba4.pt.manifest.json",
    ]
