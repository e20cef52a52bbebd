"""Tests for ckpt_callbacks.storage: real files in tmp_path, real processes, real torch."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import ckpt_callbacks.storage as storage
from ckpt_callbacks.errors import (
    CheckpointExistsError,
    ConfigurationError,
    CorruptCheckpointError,
)
from ckpt_callbacks.storage import (
    POINTER_MAGIC,
    atomic_write,
    fsync_dir,
    makedirs_durable,
    publish_latest,
    remove_checkpoint,
    resolve_latest,
)
from ckpt_callbacks.temp_files import TEMP_INFIX, is_temp_name, sweep_stale_temp_files, temp_path_for

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temp_name_with_pid(final: Path, pid: int) -> Path:
    temp = temp_path_for(final)
    return temp.with_name(temp.name.replace(f"-{os.getpid()}-", f"-{pid}-"))


def test_all_is_complete() -> None:
    public = {
        name
        for name, value in vars(storage).items()
        if not name.startswith("_") and getattr(value, "__module__", "") == storage.__name__
    }
    assert public <= set(storage.__all__)
    assert all(hasattr(storage, n) for n in storage.__all__)


# -- temp names ---------------------------------------------------------------------------------------


def test_temp_path_same_folder_and_recognised(tmp_path: Path) -> None:
    temp = temp_path_for(tmp_path / "ep1-ba5.pt")
    assert temp.parent == tmp_path
    assert temp.name.startswith(".ep1-ba5.pt" + TEMP_INFIX)
    assert f"-{os.getpid()}-" in temp.name
    assert is_temp_name(temp.name)
    assert temp != temp_path_for(tmp_path / "ep1-ba5.pt")


@pytest.mark.parametrize("name", ["ep1.pt", ".hidden", "a.tmp-b.pt", ".a.tmp-host-0-deadbeef", ".a.tmp-host-1-xyz"])
def test_non_temp_names(name: str) -> None:
    assert not is_temp_name(name)


def test_temp_name_stays_within_name_max(tmp_path: Path) -> None:
    temp = temp_path_for(tmp_path / ("x" * 250))
    assert len(os.fsencode(temp.name)) <= 255
    assert is_temp_name(temp.name)
    temp.touch()  # the filesystem accepts it


# -- atomic_write -------------------------------------------------------------------------------------


def test_commit_writes_content_and_leaves_no_temp(tmp_path: Path) -> None:
    final = tmp_path / "ckpt.pt"
    with atomic_write(final) as out:
        assert out.final == final and out.temp.parent == tmp_path
        assert out.size is None
        torch.save({"w": torch.arange(4)}, out.file)
        assert not final.exists()
    assert out.size == final.stat().st_size > 0
    assert torch.equal(torch.load(final, weights_only=True)["w"], torch.arange(4))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_overwrite_true_replaces(tmp_path: Path) -> None:
    final = tmp_path / "a.bin"
    final.write_bytes(b"old")
    with atomic_write(final) as out:
        out.file.write(b"new")
    assert final.read_bytes() == b"new"


def test_overwrite_false_new_file(tmp_path: Path) -> None:
    final = tmp_path / "a.bin"
    with atomic_write(final, overwrite=False) as out:
        out.file.write(b"data")
    assert final.read_bytes() == b"data" and out.size == 4
    assert os.listdir(tmp_path) == ["a.bin"]


def test_overwrite_false_existing_raises_and_keeps_old(tmp_path: Path) -> None:
    final = tmp_path / "a.bin"
    final.write_bytes(b"old bytes")
    with pytest.raises(CheckpointExistsError, match="overwrite=True") as info:
        with atomic_write(final, overwrite=False) as out:
            out.file.write(b"new")
    assert str(final) in str(info.value)
    assert isinstance(info.value, FileExistsError)
    assert final.read_bytes() == b"old bytes"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_exception_in_block_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "a.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(final) as out:
            out.file.write(b"partial")
            assert out.temp.exists()
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_exception_keeps_existing_final(tmp_path: Path) -> None:
    final = tmp_path / "a.bin"
    final.write_bytes(b"old")
    with pytest.raises(KeyError):
        with atomic_write(final) as out:
            out.file.write(b"new")
            raise KeyError("x")
    assert final.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_caller_closing_the_file_still_commits(tmp_path: Path) -> None:
    final = tmp_path / "a.bin"
    with atomic_write(final) as out:
        out.file.write(b"12345")
        out.file.close()  # as a wrapping compression stream may do
    assert final.read_bytes() == b"12345" and out.size == 5


def test_temp_name_refused_as_final(tmp_path: Path) -> None:
    bad = temp_path_for(tmp_path / "a.pt")
    with pytest.raises(ConfigurationError, match="'final'"):
        with atomic_write(bad):
            pass
    assert os.listdir(tmp_path) == []


def test_missing_folder_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        with atomic_write(tmp_path / "nope" / "a.pt"):
            pass


# -- folders ------------------------------------------------------------------------------------------


def test_makedirs_durable_nested_and_idempotent(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b" / "c"
    makedirs_durable(folder)
    assert folder.is_dir()
    makedirs_durable(folder)
    fsync_dir(folder)


def test_makedirs_durable_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(ConfigurationError, match="'folder'"):
        makedirs_durable(tmp_path / "f" / "sub")


# -- publish_latest / resolve_latest -----------------------------------------------------------------


def test_publish_symlink_relative_same_folder(tmp_path: Path) -> None:
    target = tmp_path / "ep1-ba5-rank0.pt"
    target.write_bytes(b"x")
    link = tmp_path / "latest-rank0.pt"
    assert publish_latest(link, target) == "symlink"
    assert os.readlink(link) == "ep1-ba5-rank0.pt"
    assert resolve_latest(link) == target
    assert link.read_bytes() == b"x"


def test_publish_symlink_relative_sub_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    target = tmp_path / "ep1-ba5.pt"
    link = tmp_path / "sub" / "latest.pt"
    assert publish_latest(link, target, mode="symlink") == "symlink"
    assert os.readlink(link) == os.path.join("..", "ep1-ba5.pt")
    assert resolve_latest(link) == target


def test_publish_replaces_old_link_and_leaves_no_temp(tmp_path: Path) -> None:
    link = tmp_path / "latest.pt"
    publish_latest(link, tmp_path / "a.pt")
    publish_latest(link, tmp_path / "b.pt")
    assert os.readlink(link) == "b.pt"
    assert sorted(os.listdir(tmp_path)) == ["latest.pt"]


def test_publish_link_is_never_absent(tmp_path: Path) -> None:
    link = tmp_path / "latest.pt"
    publish_latest(link, tmp_path / "ep0.pt")
    stop, seen, missing = threading.Event(), set(), []

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.add(os.readlink(link))
            except FileNotFoundError:
                missing.append(1)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(300):
            publish_latest(link, tmp_path / f"ep{i}.pt")
    finally:
        stop.set()
        thread.join()
    assert not missing
    assert os.readlink(link) == "ep299.pt"
    assert len(seen) > 1


def test_pointer_mode_round_trip(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    link = tmp_path / "sub" / "latest.pt"
    assert publish_latest(link, tmp_path / "ep1.pt", mode="pointer") == "pointer"
    assert not link.is_symlink()
    assert link.read_bytes() == POINTER_MAGIC + b"../ep1.pt\n"
    assert resolve_latest(link) == tmp_path / "ep1.pt"
    publish_latest(link, tmp_path / "sub" / "ep2.pt", mode="pointer")
    assert resolve_latest(link) == tmp_path / "sub" / "ep2.pt"
    assert sorted(os.listdir(tmp_path / "sub")) == ["latest.pt"]


def test_switching_between_symlink_and_pointer(tmp_path: Path) -> None:
    link = tmp_path / "latest.pt"
    publish_latest(link, tmp_path / "a.pt", mode="pointer")
    publish_latest(link, tmp_path / "b.pt", mode="symlink")
    assert os.readlink(link) == "b.pt"
    publish_latest(link, tmp_path / "c.pt", mode="pointer")
    assert not link.is_symlink() and resolve_latest(link) == tmp_path / "c.pt"


def test_publish_bad_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="'mode'.*'hardlink'"):
        publish_latest(tmp_path / "l", tmp_path / "t", mode="hardlink")


def test_publish_over_real_folder_refused(tmp_path: Path) -> None:
    (tmp_path / "latest").mkdir()
    with pytest.raises(ConfigurationError, match="latest"):
        publish_latest(tmp_path / "latest", tmp_path / "t")


def test_publish_temp_name_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="'link'"):
        publish_latest(temp_path_for(tmp_path / "latest"), tmp_path / "t")


def test_resolve_missing_dangling_and_regular(tmp_path: Path) -> None:
    assert resolve_latest(tmp_path / "latest.pt") is None
    os.symlink("gone.pt", tmp_path / "dangling")
    assert resolve_latest(tmp_path / "dangling") == tmp_path / "gone.pt"
    real = tmp_path / "downloaded.pt"
    real.write_bytes(b"PK\x03\x04 a real checkpoint")
    assert resolve_latest(real) == real


def test_resolve_corrupt_pointer(tmp_path: Path) -> None:
    link = tmp_path / "latest"
    link.write_bytes(POINTER_MAGIC + b"a.pt\nb.pt\n")
    with pytest.raises(CorruptCheckpointError, match="latest"):
        resolve_latest(link)


# -- sweep --------------------------------------------------------------------------------------------


def test_sweep_dead_pid_removed_live_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead = _temp_name_with_pid(tmp_path / "a.pt", _dead_pid())
    dead.write_bytes(b"x")
    dead_link = _temp_name_with_pid(tmp_path / "latest", _dead_pid())
    os.symlink("a.pt", dead_link)
    live = temp_path_for(tmp_path / "b.pt")
    live.write_bytes(b"y")
    with caplog.at_level(logging.INFO, logger="ckpt_callbacks.temp_files"):
        removed = sweep_stale_temp_files(tmp_path)
    assert sorted(removed) == sorted([dead, dead_link])
    assert sorted(os.listdir(tmp_path)) == [live.name]
    assert sum("removed stale temp file" in r.getMessage() for r in caplog.records) == 2


def test_sweep_old_files_removed_young_foreign_kept(tmp_path: Path) -> None:
    old_own = temp_path_for(tmp_path / "a.pt")
    old_own.write_bytes(b"x")
    old_link = temp_path_for(tmp_path / "latest")
    os.symlink("nowhere", old_link)
    young_foreign = tmp_path / f".b.pt{TEMP_INFIX}otherhost-1-0123abcd"
    young_foreign.write_bytes(b"y")
    old_foreign = tmp_path / f".c.pt{TEMP_INFIX}otherhost-1-0123abcd"
    old_foreign.write_bytes(b"z")
    plain_old = tmp_path / "ep1.pt"
    plain_old.write_bytes(b"checkpoint")
    day_ago = time.time() - 2 * 24 * 3600
    for path in (old_own, old_foreign, plain_old):
        os.utime(path, (day_ago, day_ago))
    os.utime(old_link, (day_ago, day_ago), follow_symlinks=False)
    removed = sweep_stale_temp_files(tmp_path, max_age_seconds=3600)
    assert sorted(removed) == sorted([old_own, old_link, old_foreign])
    assert sorted(os.listdir(tmp_path)) == sorted([young_foreign.name, plain_old.name])


def test_sweep_removes_stale_temp_folders_keeps_live_ones(tmp_path: Path) -> None:
    # A sharded checkpoint or a download being assembled is a temp-named folder.
    stale = _temp_name_with_pid(tmp_path / "d", _dead_pid())
    (stale / "shard").mkdir(parents=True)
    live = _temp_name_with_pid(tmp_path / "e", os.getpid())
    live.mkdir()
    assert sweep_stale_temp_files(tmp_path) == [stale]
    assert os.listdir(tmp_path) == [live.name]
    assert sweep_stale_temp_files(tmp_path / "missing") == []


def test_sweep_bad_age(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="'max_age_seconds'"):
        sweep_stale_temp_files(tmp_path, max_age_seconds=-1)


def test_crash_mid_write_leaves_only_a_sweepable_temp(tmp_path: Path) -> None:
    final = tmp_path / "ck.pt"
    code = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from ckpt_callbacks.storage import atomic_write
        with atomic_write(Path({str(final)!r})) as out:
            out.file.write(b"half a checkpoint")
            out.file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    assert not final.exists()
    leftovers = [p for p in tmp_path.iterdir() if is_temp_name(p.name)]
    assert len(leftovers) == 1 and leftovers[0].read_bytes() == b"half a checkpoint"
    assert sweep_stale_temp_files(tmp_path) == leftovers
    assert os.listdir(tmp_path) == []


# -- remove_checkpoint --------------------------------------------------------------------------------


def test_remove_file_symlink_folder_and_missing(tmp_path: Path) -> None:
    target = tmp_path / "ep1.pt"
    target.write_bytes(b"x")
    link = tmp_path / "latest.pt"
    os.symlink("ep1.pt", link)
    remove_checkpoint(link)
    assert not os.path.lexists(link) and target.exists()
    remove_checkpoint(target)
    assert not target.exists()
    shard = tmp_path / "ep2"
    (shard / "inner").mkdir(parents=True)
    (shard / "inner" / "x.distcp").write_bytes(b"x")
    remove_checkpoint(shard)
    assert not shard.exists()
    remove_checkpoint(tmp_path / "never-existed")
    assert os.listdir(tmp_path) == []

