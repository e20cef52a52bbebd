"""Full, failing and unwritable disks: a clear CheckpointError, nothing partial, the previous checkpoint
and ``latest`` intact, and training that stops or goes on as ``on_save_error`` says.

Real file systems only: a size-limited tmpfs (mounted here when mount is permitted, as it is for
root on these machines; skipped with the reason elsewhere) and ``RLIMIT_FSIZE`` in a victim process
for a disk that fills up; ``strace -e inject=fsync:error=EIO`` for a failing fsync; a read-only bind
mount, ``chattr +i`` and an unprivileged user (``setpriv``) for folders that cannot be written (as
root, ``chmod`` does not stop writes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _harness import Findings, Victim, check_crash, strace_unusable
from train_victim import VictimConfig, make_saver, make_trainer

from ckpt_callbacks import Callback, CheckpointError, CheckpointManager, Timestamp
from ckpt_callbacks.serialization import verify_file
from ckpt_callbacks.storage import resolve_latest
from ckpt_callbacks.temp_files import is_temp_name

PAGE = 4096


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for the test (skipped where mounting is not permitted)."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    mounted = _run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)])
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the RLIMIT_FSIZE test covers a full disk")
    yield mountpoint
    _run(["umount", "-l", str(mountpoint)])


@pytest.fixture
def read_only_view(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(a folder, a bind mount of it that the test can switch to read-only and back)."""
    source, view = tmp_path / "source", tmp_path / "view"
    source.mkdir()
    view.mkdir()
    mounted = _run(["mount", "--bind", str(source), str(view)])
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({mounted.stderr.strip()})")
    yield source, view
    _run(["umount", "-l", str(view)])


def _remount(view: Path, mode: str) -> None:
    result = _run(["mount", "-o", f"remount,bind,{mode}", str(view)])
    assert result.returncode == 0, result.stderr


def _free(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def _fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` so that exactly ``leave`` bytes (a multiple of a page) stay free."""
    with open(disk / "filler", "ab") as filler:
        filler.write(b"\0" * (_free(disk) - leave))
        filler.flush()
        os.fsync(filler.fileno())
    assert _free(disk) == leave


def _state(width: int) -> dict:
    return {"model": {"weight": torch.arange(width * width, dtype=torch.float32).reshape(width, width)}}


def _size_when_saved(folder: Path, states: list[dict]) -> int:
    """The size of the last of ``states`` as a manager saves it after the others (metadata included),
    measured in ``folder``, off the small disk."""
    manager = CheckpointManager(folder, filename="ba{batch}.pt")
    manager.start(Timestamp())
    for batch, state in enumerate(states, start=1):
        info = manager.save(Timestamp(batch=batch), state).result()
    manager.close()
    return info.size


def assert_intact(folder: Path, latest_batch: int, *, absent: tuple[str, ...] = ()) -> None:
    """Nothing partial: every checkpoint verifies, ``latest`` names ``latest_batch``, no temp file."""
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if is_temp_name(n)], names
    for name in absent:
        assert name not in names, names
    for path in folder.glob("ba*.pt*"):
        verify_file(path)
    assert resolve_latest(folder / "latest-rank0.pt") == folder / f"ba{latest_batch}.pt"


def test_disk_full_exactly_at_the_last_bytes_of_a_checkpoint(small_disk: Path, tmp_path: Path) -> None:
    big = _state(300)  # 360 KB: bigger than the first, so the free-space guard lets it start
    pages = -(-_size_when_saved(tmp_path / "measure", [_state(8), big]) // PAGE)
    manager = CheckpointManager(small_disk / "ckpt", filename="ba{batch}.pt", num_checkpoints_to_keep=2)
    manager.start(Timestamp())
    manager.save(Timestamp(batch=1), _state(8)).result()
    _fill(small_disk, (pages - 1) * PAGE)  # its last page does not fit
    manager.save(Timestamp(batch=2), big)
    with pytest.raises(CheckpointError) as raised:
        manager.wait()
    message = str(raised.value)
    assert "ba2.pt" in message and "No space left on device" in message, message
    assert_intact(manager.folder, 1, absent=("ba2.pt",))
    manager.close()


def test_disk_full_once_the_checkpoint_is_committed_keeps_it(small_disk: Path, tmp_path: Path) -> None:
    """Room for the checkpoint but not for the record that follows: the error says it is committed,
    and a restart finds it."""
    big = _state(300)
    pages = -(-_size_when_saved(tmp_path / "measure", [_state(8), big]) // PAGE)
    manager = CheckpointManager(small_disk / "ckpt", filename="ba{batch}.pt", num_checkpoints_to_keep=2)
    manager.start(Timestamp())
    manager.save(Timestamp(batch=1), _state(8)).result()
    _fill(small_disk, pages * PAGE)
    manager.save(Timestamp(batch=2), big)
    with pytest.raises(CheckpointError, match="No space left on device") as raised:
        manager.wait()
    assert "committed" in str(raised.value) and "ba2.pt" in str(raised.value)
    (small_disk / "filler").unlink()
    restarted = CheckpointManager(small_disk / "ckpt", filename="ba{batch}.pt", num_checkpoints_to_keep=2)
    restarted.start(Timestamp(batch=2))
    assert restarted.latest() is not None and restarted.latest().name == "ba2.pt"
    verify_file(small_disk / "ckpt" / "ba2.pt")
    manager.close()
    restarted.close()


def test_the_disk_guard_fails_before_writing_anything(small_disk: Path) -> None:
    manager = CheckpointManager(small_disk / "ckpt", filename="ba{batch}.pt", num_checkpoints_to_keep=2)
    manager.start(Timestamp())
    manager.save(Timestamp(batch=1), _state(200)).result()
    size = (small_disk / "ckpt" / "ba1.pt").stat().st_size
    _fill(small_disk, (size // PAGE - 2) * PAGE)
    manager.save(Timestamp(batch=2), _state(200))
    with pytest.raises(CheckpointError, match="not enough free space") as raised:
        manager.wait()
    assert str(manager.folder / "ba2.pt") in str(raised.value) and "ba1.pt" in str(raised.value)
    assert_intact(manager.folder, 1, absent=("ba2.pt",))
    manager.close()


class AtBatch(Callback):
    """Runs ``action`` at the start of batch ``batch``."""

    def __init__(self, batch: int, action) -> None:
        self.batch, self.action = batch, action

    def batch_start(self, state) -> None:
        if state.timestamp.batch + 1 == self.batch:
            self.action()


@pytest.mark.parametrize("on_save_error", ["raise", "warn"])
def test_a_full_disk_stops_or_continues_training_as_asked(small_disk: Path, on_save_error: str) -> None:
    config = VictimConfig(folder=str(small_disk / "ckpt"), width=64, max_batches=6, on_save_error=on_save_error)
    fill = AtBatch(4, lambda: _fill(small_disk, 0))
    trainer = make_trainer(config, saver=make_saver(config), callbacks=(fill,))
    if on_save_error == "raise":
        with pytest.raises(CheckpointError, match="ba4.pt"):
            trainer.fit()
        assert trainer.state.timestamp.batch == 4
    else:
        with pytest.warns(UserWarning, match="training goes on"):
            trainer.fit()
        assert trainer.state.timestamp.batch == 6
    (small_disk / "filler").unlink()
    assert_intact(Path(config.folder), 3, absent=("ba4.pt", "ba5.pt", "ba6.pt"))


def test_a_file_size_limit_fails_a_save_at_its_last_bytes(tmp_path: Path, figures) -> None:
    """RLIMIT_FSIZE: no mount needed. Checkpoints grow a little with each save (the saver's record
    lists every earlier one), so a limit at checkpoint k's size fails checkpoint k+1 in its last bytes."""
    dry = VictimConfig(folder=str(tmp_path / "dry"), keep=-1, max_batches=8)
    assert Victim(dry, log=tmp_path / "dry.log").start().finish() == 0
    sizes = {b: (tmp_path / "dry" / f"ba{b}.pt").stat().st_size for b in range(1, 9)}
    last_fitting = next(b for b in range(3, 8) if sizes[b + 1] > sizes[b])
    findings = Findings()
    for on_save_error, status in (("raise", 1), ("warn", 0)):
        config = VictimConfig(folder=str(tmp_path / on_save_error), keep=-1, max_batches=8,
                              file_size_limit=sizes[last_fitting], on_save_error=on_save_error)
        victim = Victim(config, log=tmp_path / f"{on_save_error}.log").start()
        assert victim.finish() == status
        log = (tmp_path / f"{on_save_error}.log").read_text()
        assert f"ba{last_fitting + 1}.pt failed: File too large" in log, log
        assert max(victim.batches("saved")) == last_fitting
        assert_intact(Path(config.folder), last_fitting, absent=(f"ba{last_fitting + 1}.pt",))
        check_crash(victim, findings, tmp_path)
    figures.add("disk full (RLIMIT_FSIZE) mid-save", findings)
    assert not findings.problems, findings.problems


def test_fsync_failing_with_eio_discards_the_checkpoint(tmp_path: Path) -> None:
    reason = strace_unusable()
    if reason is not None:
        pytest.skip(reason)
    trace = tmp_path / "strace.log"
    dry = VictimConfig(folder=str(tmp_path / "dry"), max_batches=5)
    dry_run = Victim(dry, log=tmp_path / "dry.log", launch="cold", strace=["-o", str(trace), "-y", "-e", "trace=fsync"])
    assert dry_run.start().finish() == 0
    fsyncs = [line for line in trace.read_text().splitlines() if "fsync(" in line]
    ordinal = 1 + next(i for i, line in enumerate(fsyncs) if ".ba3.pt.tmp-" in line)
    for on_save_error, status in (("raise", 1), ("warn", 0)):
        config = VictimConfig(folder=str(tmp_path / on_save_error), max_batches=5, on_save_error=on_save_error)
        inject = ["-o", "/dev/null", "-e", "trace=fsync", "-e", f"inject=fsync:error=EIO:when={ordinal}"]
        victim = Victim(config, log=tmp_path / f"{on_save_error}.log", launch="cold", strace=inject).start()
        assert victim.finish() == status
        log = (tmp_path / f"{on_save_error}.log").read_text()
        assert "fsync of" in log and ".ba3.pt.tmp-" in log and "Input/output error" in log, log
        assert 3 not in victim.batches("saved")
        if on_save_error == "raise":
            assert_intact(Path(config.folder), 2, absent=("ba3.pt",))
        else:
            assert_intact(Path(config.folder), 5, absent=("ba3.pt",))


def test_a_read_only_folder_fails_before_training(read_only_view: tuple[Path, Path]) -> None:
    _, view = read_only_view
    _remount(view, "ro")
    config = VictimConfig(folder=str(view), max_batches=4)
    trainer = make_trainer(config, saver=make_saver(config))
    with pytest.raises(CheckpointError, match="Read-only file system") as raised:
        trainer.fit()
    assert str(view) in str(raised.value)
    assert trainer.state.timestamp.batch == 0


@pytest.mark.parametrize("on_save_error", ["raise", "warn"])
def test_a_folder_turning_read_only_mid_run(read_only_view: tuple[Path, Path], on_save_error: str) -> None:
    source, view = read_only_view
    config = VictimConfig(folder=str(view), max_batches=6, width=64, on_save_error=on_save_error)
    trainer = make_trainer(config, saver=make_saver(config), callbacks=(AtBatch(4, lambda: _remount(view, "ro")),))
    if on_save_error == "raise":
        with pytest.raises(CheckpointError, match="Read-only file system") as raised:
            trainer.fit()
        assert "ba4.pt" in str(raised.value)
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit()
        assert trainer.state.timestamp.batch == 6
        assert any("Read-only file system" in str(w.message) for w in caught)
    _remount(view, "rw")
    assert_intact(source, 3, absent=("ba4.pt",))


def test_an_immutable_folder_mid_run(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.mkdir()
    if _run(["chattr", "+i", str(probe)]).returncode != 0:
        pytest.skip("chattr +i is not possible here (needs root, e2fsprogs and a file system with the flag)")
    _run(["chattr", "-i", str(probe)])
    folder = tmp_path / "ckpt"
    config = VictimConfig(folder=str(folder), max_batches=6, width=64)
    freeze = AtBatch(3, lambda: _run(["chattr", "+i", str(folder)]))
    trainer = make_trainer(config, saver=make_saver(config), callbacks=(freeze,))
    try:
        with pytest.raises(CheckpointError, match="Operation not permitted") as raised:
            trainer.fit()
    finally:
        _run(["chattr", "-i", str(folder)])
    if "immutable" not in str(raised.value):
        pytest.fail(f"the message does not explain EPERM: {raised.value}")
    assert_intact(folder, 2, absent=("ba3.pt",))


_AS_NOBODY = """
import json, sys
sys.path.insert(0, sys.argv[2])
from train_victim import VictimConfig, make_saver, make_trainer
from ckpt_callbacks import CheckpointError
config = VictimConfig(folder=sys.argv[1], max_batches=2)
try:
    make_trainer(config, saver=make_saver(config)).fit()
    print(json.dumps({"error": None}))
except CheckpointError as error:
    print(json.dumps({"error": type(error).__name__, "message": str(error)}))
"""


def test_permission_denied_as_an_unprivileged_user(tmp_path: Path) -> None:
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv (util-linux) to become an unprivileged user")
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                            "import torch, ckpt_callbacks"], capture_output=True, text=True, timeout=120, cwd="/")
    if probe.returncode != 0:
        pytest.skip(f"an unprivileged user cannot import torch from this interpreter's environment: {probe.stderr[-200:]}")
    folder = tmp_path / "root-owned"
    folder.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    here = str(Path(__file__).parent)
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", _AS_NOBODY,
         str(folder / "ckpt"), here],
        capture_output=True, text=True, timeout=300, cwd="/",
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["error"] == "CheckpointError", outcome
    assert str(folder) in outcome["message"] and "Permission denied" in outcome["message"], outcome
    assert list(folder.iterdir()) == []
