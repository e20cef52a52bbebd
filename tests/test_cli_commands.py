"""The ckpt-callbacks commands ls, inspect, verify, download and export, against real files, real
DCP folders, file:// and memory:// stores and the real S3 servers; --json output parsed."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import pty
import secrets
import select
import shutil
import struct
import subprocess
import sys
import termios
import warnings
import zipfile
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp

from _training import make_model, make_trainer, weights
from ckpt_callbacks import CheckpointSaver, load_checkpoint
from ckpt_callbacks.cli import main
from ckpt_callbacks.remote import open_store
from ckpt_callbacks.serialization import read_state

MARKER_ENV = "CKPT_CLI_TEST_MARKER"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str, expect: int = 0) -> Any:
    code, out, err = run(capsys, *argv, "--json")
    assert code == expect, err
    return json.loads(out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A run with a full-state saver (.pt.gz every 2 batches, keep 2) and weights-only exports (.pt)."""
    root = tmp_path_factory.mktemp("runs")
    full = CheckpointSaver(folder=str(root / "{run_name}" / "checkpoints"), filename="ep{epoch}-ba{batch}-rank{rank}.pt.gz",
                           save_interval="2ba", num_checkpoints_to_keep=2)
    exports = CheckpointSaver(folder=str(root / "{run_name}" / "exports"), filename="ep{epoch}-ba{batch}.pt",
                              latest_filename="latest.pt", save_interval="1ep", weights_only=True)
    trainer = make_trainer([full, exports], max_duration="2ep", run_name="cli-run")
    trainer.fit()
    return root / "cli-run", weights(trainer)


def copy_run(trained: tuple[Path, Any], tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained[0], tmp_path / "cli-run", symlinks=True))


def flip_tensor_byte(path: Path) -> None:
    """Flip a bit inside the first tensor's bytes of a torch.save zip (its pickle stays intact)."""
    with zipfile.ZipFile(path) as archive:
        member = next(m for m in archive.infolist() if m.filename.endswith("/data/0"))
    data = bytearray(path.read_bytes())
    # A local file header is 30 bytes plus the name and the extra field that precede the data.
    name_length, extra_length = struct.unpack_from("<HH", data, member.header_offset + 26)
    data[member.header_offset + 30 + name_length + extra_length] ^= 0x10
    path.write_bytes(bytes(data))


class RunsCode:
    """Unpickling this touches a marker file: proof that a command ran a checkpoint's code."""

    def __init__(self) -> None:
        self.marker = os.environ[MARKER_ENV]

    def __setstate__(self, state: dict[str, Any]) -> None:
        Path(state["marker"]).touch()
        self.__dict__.update(state)


def make_dcp_folder(folder: Path, model: torch.nn.Module, prefix: str = "") -> None:
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    state = {"model": {prefix + k: v for k, v in model.state_dict().items()}, "optimizers": [optimizer.state_dict()]}
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process on purpose
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(folder), no_dist=True)


def test_ls_reads_the_savers_records(trained: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, _ = trained
    listed = run_json(capsys, "ls", str(run_dir))
    names = [c["name"] for c in listed]
    assert names == ["checkpoints/ep1-ba8-rank0.pt.gz", "checkpoints/ep1-ba10-rank0.pt.gz",
                     "exports/ep1-ba5.pt", "exports/ep2-ba10.pt"]
    assert all(c["source"] == "record" and c["where"] == "local" for c in listed)
    by_name = {c["name"]: c for c in listed}
    newest = by_name["checkpoints/ep1-ba10-rank0.pt.gz"]
    assert (newest["epoch"], newest["batch"], newest["format"], newest["weights_only"]) == (1, 10, "torch+gzip", False)
    assert newest["latest"] and newest["pointers"] == ["checkpoints/latest-rank0.pt"]
    assert not by_name["checkpoints/ep1-ba8-rank0.pt.gz"]["latest"] and by_name["exports/ep2-ba10.pt"]["weights_only"]
    assert newest["size"] == (run_dir / newest["name"]).stat().st_size

    code, out, _ = run(capsys, "ls", str(run_dir))
    header, *rows, total = out.splitlines()
    assert code == 0 and header.split() == ["NAME", "EPOCH", "BATCH", "SIZE", "FORMAT", "CONTENT", "LINKS", "WHERE"]
    assert "latest-rank0.pt" in rows[1] and "full" in rows[1] and "weights" in rows[3]
    assert total.startswith("4 checkpoints")


def test_ls_without_records_reads_metadata_then_names(trained: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = copy_run(trained, tmp_path)
    for record in run_dir.rglob(".ckpt-record-*.json"):
        record.unlink()
    (run_dir / "notes.txt").write_text("not a checkpoint")
    by_name = {c["name"]: c for c in run_json(capsys, "ls", str(run_dir))}
    assert "notes.txt" not in by_name and len(by_name) == 4
    plain = by_name["exports/ep2-ba10.pt"]
    assert (plain["source"], plain["run_name"], plain["weights_only"], plain["batch"]) == ("metadata", "cli-run", True, 10)
    compressed = by_name["checkpoints/ep1-ba10-rank0.pt.gz"]  # not decoded just to be listed
    assert (compressed["source"], compressed["epoch"], compressed["batch"]) == ("name", 1, 10)


def test_ls_a_latest_link_and_a_missing_folder(trained: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, _ = trained
    [only] = run_json(capsys, "ls", str(run_dir / "checkpoints" / "latest-rank0.pt"))
    assert (only["name"], only["source"], only["latest"]) == ("ep1-ba10-rank0.pt.gz", "record", True)
    code, out, err = run(capsys, "ls", str(run_dir / "nowhere"))
    assert (code, out) == (1, "") and err.startswith("ckpt-callbacks: error:") and err.count("\n") == 1


def test_inspect_shows_metadata_keys_and_the_tensor_tree(trained: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, model_weights = trained
    latest = str(run_dir / "checkpoints" / "latest-rank0.pt")
    described = run_json(capsys, "inspect", latest)
    assert described["format"] == "torch+gzip"
    meta = described["metadata"]
    assert (meta["run_name"], meta["world_size"], meta["schema_version"]) == ("cli-run", 1, 1)
    assert meta["timestamp"]["batch"] == 10 and meta["torch_version"] == str(torch.__version__)
    assert described["keys"]["state"][:3] == ["model", "optimizers", "schedulers"] and "rng" in described["keys"]
    tensors = {t["name"]: t for t in described["tensors"]}
    for name, value in model_weights.items():
        entry = tensors[f"state/model/{name}"]
        assert (entry["shape"], entry["dtype"], entry["bytes"]) == (list(value.shape), "float32", value.numel() * 4)
    sections = {s["name"]: s for s in described["sections"]}
    model_bytes = sum(v.numel() * 4 for v in model_weights.values())
    assert sections["state/model"] == {"name": "state/model", "tensors": len(model_weights), "bytes": model_bytes}
    assert sum(s["bytes"] for s in described["sections"]) == described["total"]["bytes"]

    code, out, _ = run(capsys, "inspect", latest)
    assert code == 0 and "run_name" in out and "epoch 1, batch 10" in out
    assert "state/model" in out and "weight" in out and "float32  [8, 4]" in out
    folded = run(capsys, "inspect", latest, "--depth", "0")[1]
    assert "state/model" in folded and "[8, 4]" not in folded


def test_inspect_a_dcp_folder_and_a_safetensors_export(trained: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_dcp_folder(tmp_path / "ba100", make_model())
    described = run_json(capsys, "inspect", str(tmp_path / "ba100"))
    assert described["format"] == "dcp"
    assert {s["name"] for s in described["sections"]} == {"model", "optimizers"}
    assert {"name": "model/0.weight", "shape": [8, 4], "dtype": "float32", "bytes": 128} in described["tensors"]

    run_dir, _ = trained
    assert run(capsys, "export", str(run_dir / "exports" / "latest.pt"), str(tmp_path / "m.safetensors"))[0] == 0
    described = run_json(capsys, "inspect", str(tmp_path / "m.safetensors"))
    assert described["format"] == "safetensors" and described["metadata"]["run_name"] == "cli-run"
    assert {t["name"] for t in described["tensors"]} == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_verify_passes_intact_files_and_fails_damaged_ones(trained: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = copy_run(trained, tmp_path)
    checkpoints = sorted(str(p) for p in run_dir.rglob("ep*"))
    code, out, _ = run(capsys, "verify", *checkpoints)
    assert code == 0 and out.count("\nok ") + out.startswith("ok ") == 4
    assert "gzip checksum" in out and "zip CRC-32s" in out and "4 intact, 0 corrupt, 0 missing" in out

    gz = run_dir / "checkpoints" / "ep1-ba8-rank0.pt.gz"
    gz.write_bytes(gz.read_bytes()[:-100])  # truncated
    flip_tensor_byte(run_dir / "exports" / "ep1-ba5.pt")  # loads fine: only the CRC sees it
    verdicts = run_json(capsys, "verify", *checkpoints, str(run_dir / "gone.pt"), expect=1)
    status = {Path(v["path"]).name: v["status"] for v in verdicts}
    assert status == {"ep1-ba8-rank0.pt.gz": "corrupt", "ep1-ba10-rank0.pt.gz": "ok", "ep1-ba5.pt": "corrupt",
                      "ep2-ba10.pt": "ok", "gone.pt": "missing"}
    code, out, _ = run(capsys, "verify", str(gz), str(run_dir / "exports" / "ep1-ba5.pt"))
    assert code == 1 and [line[:7] for line in out.splitlines()] == ["CORRUPT", "CORRUPT", "0 intac"] and "CRC" in out


def test_verify_checks_foreign_pickles_without_running_them(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "code-ran"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    lightning_like = tmp_path / "epoch=1-step=10.ckpt"
    torch.save({"state_dict": make_model().state_dict(), "hyper_parameters": RunsCode(), "epoch": 1}, lightning_like)
    [verdict] = run_json(capsys, "verify", str(lightning_like))
    assert verdict["ok"] and "pickle structure (not unpickled)" in verdict["checks"]
    assert "RunsCode" in verdict["notes"][0]
    described = run_json(capsys, "inspect", str(lightning_like))
    assert described["tensors"] == [] and "RunsCode" in described["notes"][0]
    lightning_like.write_bytes(lightning_like.read_bytes()[:-300])
    assert run_json(capsys, "verify", str(lightning_like), expect=1)[0]["status"] == "corrupt"
    assert not marker.exists()


def test_verify_a_hugging_face_style_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MARKER_ENV, str(tmp_path / "code-ran"))
    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    torch.save(make_model().state_dict(), tmp_path / "sd.pt")
    assert run(capsys, "export", str(tmp_path / "sd.pt"), str(folder / "model.safetensors"))[0] == 0
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    torch.save(RunsCode(), folder / "training_args.bin")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 10, "epoch": 2.0}))
    (folder / "README").write_text("text")
    [verdict] = run_json(capsys, "verify", str(folder))
    assert verdict["ok"] and verdict["format"] == "folder"
    assert any(c.startswith("model.safetensors:") for c in verdict["checks"])
    assert "trainer_state.json: parses" in verdict["checks"] and any("README" in n for n in verdict["notes"])
    listed = {c["name"]: c for c in run_json(capsys, "ls", str(tmp_path))}
    assert (listed["checkpoint-10"]["format"], listed["checkpoint-10"]["batch"]) == ("folder", 10)
    assert listed["sd.pt"]["format"] == "torch" and "checkpoint-10/model.safetensors" not in listed
    (folder / "trainer_state.json").write_text("{not json")
    assert run_json(capsys, "verify", str(folder), expect=1)[0]["status"] == "corrupt"
    assert not (tmp_path / "code-ran").exists()


def test_verify_dcp_folders_by_format(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ep1-ba100"
    make_dcp_folder(folder, make_model())
    [verdict] = run_json(capsys, "verify", str(folder))
    assert verdict["ok"] and verdict["format"] == "dcp"
    listed = run_json(capsys, "ls", str(tmp_path))
    assert [(c["name"], c["format"], c["epoch"], c["batch"]) for c in listed] == [("ep1-ba100", "dcp", 1, 100)]

    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-50])
    assert "truncated" in run_json(capsys, "verify", str(folder), expect=1)[0]["error"]
    shard.unlink()
    assert "lacks the shard file" in run_json(capsys, "verify", str(folder), expect=1)[0]["error"]

    # An index that would run code when unpickled is refused, not executed.
    marker = tmp_path / "code-ran"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode()))
    [verdict] = run_json(capsys, "verify", str(folder), expect=1)
    assert "not part of a DCP index" in verdict["error"] and not marker.exists()


def test_export_to_safetensors_and_pt_loads_and_matches(trained: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, model_weights = trained
    latest = str(run_dir / "checkpoints" / "latest-rank0.pt")
    result = run_json(capsys, "export", latest, str(tmp_path / "model.safetensors"), "--dtype", "bf16")
    assert (result["format"], result["tensors"], result["dtype"], result["source_key"]) == ("safetensors", 4, "bf16", "state/model")
    from safetensors.torch import load_file  # the reference reader

    exported = load_file(tmp_path / "model.safetensors")
    assert exported.keys() == model_weights.keys()
    for name, value in model_weights.items():
        assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], value.to(torch.bfloat16))

    assert run(capsys, "export", latest, str(tmp_path / "model.pt.zst"))[0] == 0
    trainer = make_trainer()
    load_checkpoint(tmp_path / "model.pt.zst", trainer.state, weights_only=True)
    for name, value in trainer.state.model.state_dict().items():
        assert torch.equal(value, model_weights[name])
    metadata = read_state(tmp_path / "model.pt.zst")["state"]["metadata"]
    assert metadata["weights_only"] is True and metadata["run_name"] == "cli-run" and "saver" not in metadata

    assert run(capsys, "export", latest, str(tmp_path / "bare.pt"), "--bare")[0] == 0
    assert torch.load(tmp_path / "bare.pt", weights_only=True).keys() == model_weights.keys()
    code, _, err = run(capsys, "export", latest, str(tmp_path / "bare.pt"))
    assert code == 1 and "--overwrite" in err
    assert run(capsys, "export", latest, str(tmp_path / "bare.pt"), "--overwrite")[0] == 0


def test_export_strips_wrapper_prefixes_unless_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model()
    wrapped = {f"module._orig_mod.{name}": value for name, value in model.state_dict().items()}
    torch.save({"state": {"model": wrapped, "metadata": {}}}, tmp_path / "ddp-compiled.pt")
    result = run_json(capsys, "export", str(tmp_path / "ddp-compiled.pt"), str(tmp_path / "clean.pt"), "--bare")
    assert sorted(result["stripped"]) == ["_orig_mod.", "module."]
    make_model().load_state_dict(torch.load(tmp_path / "clean.pt", weights_only=True))
    run(capsys, "export", str(tmp_path / "ddp-compiled.pt"), str(tmp_path / "kept.pt"), "--bare", "--keep-prefixes")
    assert set(torch.load(tmp_path / "kept.pt", weights_only=True)) == set(wrapped)


def test_export_consolidates_a_dcp_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model()
    make_dcp_folder(tmp_path / "ba100", model, prefix="_orig_mod.")
    result = run_json(capsys, "export", str(tmp_path / "ba100"), str(tmp_path / "model.safetensors"))
    assert (result["tensors"], result["stripped"], result["source_key"]) == (4, ["_orig_mod."], "model")
    exported = read_state(tmp_path / "model.safetensors")["state"]["model"]
    for name, value in model.state_dict().items():
        assert torch.equal(exported[name], value)


def upload_run(run_dir: Path, url: str, storage_options: dict[str, Any] | None = None) -> None:
    store = open_store(url, storage_options)
    try:
        for path in sorted(run_dir.rglob("*")):
            if path.is_file() and not path.is_symlink() and not path.name.startswith("."):
                store.upload_file(path, path.relative_to(run_dir.parent).as_posix())
        # Composer's pointer convention: the whole content is the checkpoint's key.
        store.write_bytes("cli-run/checkpoints/latest-rank0.pt.symlink", b"cli-run/checkpoints/ep1-ba10-rank0.pt.gz")
    finally:
        store.close()


def check_remote_commands(url: str, options: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          model_weights: dict[str, torch.Tensor]) -> None:
    listed = {c["name"]: c for c in run_json(capsys, "ls", url, *options)}
    assert set(listed) == {"cli-run/checkpoints/ep1-ba8-rank0.pt.gz", "cli-run/checkpoints/ep1-ba10-rank0.pt.gz",
                           "cli-run/exports/ep1-ba5.pt", "cli-run/exports/ep2-ba10.pt"}
    newest = listed["cli-run/checkpoints/ep1-ba10-rank0.pt.gz"]
    assert newest["latest"] and newest["where"] == "remote" and newest["format"] == "torch+gzip"
    assert (newest["epoch"], newest["batch"]) == (1, 10)

    pointer = f"{url}/cli-run/checkpoints/latest-rank0.pt"  # without .symlink: Composer's fallback
    result = run_json(capsys, "download", pointer, str(tmp_path / "fetched") + "/", *options)
    assert result["resolved"] == f"{url}/cli-run/checkpoints/ep1-ba10-rank0.pt.gz"
    assert read_state(result["path"])["state"]["metadata"]["timestamp"]["batch"] == 10
    assert "already exists" in run(capsys, "download", pointer, str(tmp_path / "fetched") + "/", *options)[2]

    [verdict] = run_json(capsys, "verify", pointer + ".symlink", *options)
    assert verdict["ok"] and verdict["path"] == pointer + ".symlink"
    assert run_json(capsys, "inspect", pointer, *options)["metadata"]["run_name"] == "cli-run"
    assert run(capsys, "export", pointer, str(tmp_path / "remote.safetensors"), *options)[0] == 0
    exported = read_state(tmp_path / "remote.safetensors")["state"]["model"]
    assert all(torch.equal(exported[k], v) for k, v in model_weights.items())
    code, out, _ = run(capsys, "verify", f"{url}/cli-run/nothing.pt", *options)
    assert code == 1 and out.startswith("MISSING")


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_remote_commands_on_fsspec_stores(scheme: str, trained: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = (tmp_path / "store").as_uri() if scheme == "file" else f"memory://cli-{secrets.token_hex(4)}/runs"
    upload_run(trained[0], url)
    try:
        check_remote_commands(url, [], tmp_path, capsys, trained[1])
    finally:
        if scheme == "memory":
            fsspec.filesystem("memory").rm("/" + url.split("://")[1].split("/")[0], recursive=True)


def test_remote_commands_on_s3(s3_bucket: Any, trained: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    options = s3_bucket.storage_options()
    upload_run(trained[0], s3_bucket.url("runs"), options)
    check_remote_commands(s3_bucket.url("runs"), ["--storage-options", json.dumps(options)], tmp_path, capsys, trained[1])
    if s3_bucket.server.checks_signatures:  # moto accepts any secret
        code, _, err = run(capsys, "ls", s3_bucket.url("runs"), "--storage-options",
                           json.dumps({**options, "secret": "wrong"}))
        assert code == 1 and err.count("\n") == 1 and "credentials" in err


def test_download_a_remote_dcp_folder_atomically(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_dcp_folder(tmp_path / "local" / "ep1-ba100", make_model())
    url = (tmp_path / "store").as_uri()
    store = open_store(url)
    for path in (tmp_path / "local" / "ep1-ba100").iterdir():
        store.upload_file(path, f"ep1-ba100/{path.name}")
    store.write_bytes("latest.symlink", b"ep1-ba100")
    result = run_json(capsys, "download", f"{url}/latest.symlink", str(tmp_path / "restore"))
    assert result["files"] == 2 and Path(result["path"]) == tmp_path / "restore"
    assert run_json(capsys, "verify", str(tmp_path / "restore"))[0]["ok"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_progress_bar_on_a_terminal_only(trained: Any, tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()
    upload_run(trained[0], url)
    command = [sys.executable, "-m", "ckpt_callbacks", "download", f"{url}/cli-run/checkpoints/latest-rank0.pt.symlink"]
    piped = subprocess.run([*command, str(tmp_path / "piped.pt")], capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and piped.stderr == ""

    leader, follower = pty.openpty()
    # A new pty is 0 columns wide, where tqdm draws nothing; a real terminal has a size.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    with subprocess.Popen([*command, str(tmp_path / "tty.pt")], stdout=subprocess.DEVNULL, stderr=follower) as process:
        os.close(follower)
        seen = read_terminal(leader)
        assert process.wait(timeout=60) == 0
    os.close(leader)
    assert b"ep1-ba10-rank0.pt.gz" in seen and b"B/s" in seen


def read_terminal(leader: int) -> bytes:
    """What is written to a pty until its last writer closes it (or 60 s pass without output)."""
    seen = b""
    while select.select([leader], [], [], 60)[0]:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: every writer has closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    return seen


@pytest.mark.parametrize("argv", [
    ["ls"],
    ["download", "local/file.pt", "dest"],
    ["inspect", "x.pt", "--depth", "-1"],
    ["export", "a.pt", "b.pt", "--dtype", "int3"],
    ["ls", "s3://b/p", "--storage-options", "{not json"],
])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "inspect", str(tmp_path / "missing.pt"))
    assert code == 1 and err.count("\n") == 1
    with pytest.raises(FileNotFoundError):
        main(["inspect", str(tmp_path / "missing.pt"), "--debug"])


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("ls", "inspect", "verify", "download", "export", "demo"):
        with pytest.raises(SystemExit) as raised:
            main([command, "--help"])
        assert raised.value.code == 0 and "usage: ckpt-callbacks " + command in capsys.readouterr().out


def test_demo_with_a_remote_resumes_from_the_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = (tmp_path / "store").as_uri()
    code, out, err = run(capsys, "demo", "--folder", str(tmp_path / "local"), "--remote", store)
    assert code == 0, err
    assert "run 2 must resume from" in out and "resumed from              ep2-ba25-rank0.pt.gz" in out
    listed = {c["name"]: c for c in run_json(capsys, "ls", store)}
    assert listed["demo-run/checkpoints/ep3-ba40-rank0.pt.gz"]["latest"]
    assert all(c["committed"] and c["source"] == "manifest" for c in listed.values())
    assert listed["demo-run/exports/ep4-ba40.pt"]["weights_only"] and listed["demo-run/exports/ep4-ba40.pt"]["batch"] == 40
    (tmp_path / "store" / "demo-run" / "checkpoints" / "ep3-ba36-rank0.pt.gz.manifest.json").unlink()
    code, out, _ = run(capsys, "ls", store + "/demo-run/checkpoints")
    assert [line.endswith("remote, uncommitted") for line in out.splitlines() if "ba36" in line] == [True]
