"""Payload files written with O_DIRECT: every byte lands, errors surface, fallbacks work."""

from __future__ import annotations

import errno
import io
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ckpt_callbacks import direct_io
from ckpt_callbacks.direct_io import DirectFile, open_for_payload
from ckpt_callbacks.codecs import checkpoint_format
from ckpt_callbacks.serialization import read_state, write_state
from ckpt_callbacks.storage import atomic_write
from ckpt_callbacks.temp_files import is_temp_name

MIB = 2**20
BUFFER = direct_io._BUFFER_BYTES


def _write_in_pieces(file: io.RawIOBase, data: bytes, seed: int) -> None:
    """Write ``data`` in random piece sizes, from a few bytes to several buffers."""
    rng, done = random.Random(seed), 0
    while done < len(data):
        size = rng.choice([1, 7, 4095, 4096, 65_537, BUFFER - 3, BUFFER, 2 * BUFFER + 11])
        done += file.write(memoryview(data)[done : done + size])


def _open_direct(path: Path) -> DirectFile:
    file = open_for_payload(path)
    if not isinstance(file, DirectFile):
        file.close()
        pytest.skip(f"the file system of {path.parent} refuses O_DIRECT")
    return file


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, BUFFER - 1, BUFFER, BUFFER + 1, 3 * BUFFER + 5])
def test_every_byte_lands_whatever_the_sizes(tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    path = tmp_path / "payload.bin"
    with _open_direct(path) as file:
        _write_in_pieces(file, data, seed=size)
        assert file.tell() == size
    assert path.read_bytes() == data


def test_a_flush_midway_writes_everything_and_writing_goes_on(tmp_path: Path) -> None:
    first, second = os.urandom(BUFFER + 1234), os.urandom(2 * BUFFER + 99)
    path = tmp_path / "payload.bin"
    with _open_direct(path) as file:
        file.write(first)
        file.flush()
        assert path.read_bytes() == first
        file.write(second)
    assert path.read_bytes() == first + second


def test_typed_memoryviews_are_written_as_their_bytes(tmp_path: Path) -> None:
    tensor = torch.arange(3 * MIB, dtype=torch.float32)
    path = tmp_path / "payload.bin"
    with _open_direct(path) as file:
        file.write(memoryview(tensor.numpy()))
    assert torch.equal(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.float32), tensor)


def test_it_has_the_name_of_its_file(tmp_path: Path) -> None:
    with _open_direct(tmp_path / "payload.bin") as file:
        assert file.name == str(tmp_path / "payload.bin")


def test_a_checkpoint_round_trips_through_atomic_write(tmp_path: Path) -> None:
    state = {"model": {"w": torch.randn(1024, 1024), "b": torch.randn(3)}, "step": 7}
    for name in ("ep1.pt", "ep1.pt.zst", "ep1.tar"):
        path = tmp_path / name
        with atomic_write(path, payload=True) as out:
            write_state(state, out.file, checkpoint_format(name))
        loaded = read_state(path)
        assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["step"] == 7
    assert not [p for p in tmp_path.iterdir() if is_temp_name(p.name)]


def test_bounce_buffers_are_reused_across_files(tmp_path: Path) -> None:
    for index in range(4):
        with _open_direct(tmp_path / f"payload{index}.bin") as file:
            file.write(os.urandom(4 * BUFFER))
    assert len(direct_io._pool) <= direct_io._BUFFERS_PER_FILE


def test_turned_off_by_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPT_CALLBACKS_DIRECT_IO", "off")
    with open_for_payload(tmp_path / "payload.bin") as file:
        assert not isinstance(file, DirectFile)
        file.write(b"plain")
    assert (tmp_path / "payload.bin").read_bytes() == b"plain"


def test_an_existing_file_is_never_opened(tmp_path: Path) -> None:
    (tmp_path / "payload.bin").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        open_for_payload(tmp_path / "payload.bin")
    assert (tmp_path / "payload.bin").read_bytes() == b"keep"


@pytest.fixture
def small_ext4(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB ext4 file system on a loop device (O_DIRECT goes to its block layer)."""
    image, mountpoint = tmp_path / "disk.img", tmp_path / "disk"
    mountpoint.mkdir()
    with open(image, "wb") as file:
        file.truncate(16 * MIB)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 is not usable here: {made.stderr.strip() or made.returncode}")
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a loop device here ({mounted.stderr.strip()})")
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def test_a_full_disk_fails_the_write_and_keeps_the_previous_file(small_ext4: Path) -> None:
    previous = small_ext4 / "latest.pt"
    with atomic_write(previous, payload=True) as out:
        torch.save({"w": torch.ones(1024)}, out.file)
    with pytest.raises(Exception) as raised, atomic_write(previous, payload=True) as out:
        assert isinstance(out.file, DirectFile)
        write_state({"w": torch.randn(8 * MIB)}, out.file, checkpoint_format("x.pt"))  # 32 MB into 16 MiB
    chain, error = [], raised.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(getattr(e, "errno", None) == errno.ENOSPC for e in chain), chain
    assert torch.equal(torch.load(previous)["w"], torch.ones(1024))
    assert sorted(p.name for p in small_ext4.iterdir() if p.name != "lost+found") == ["latest.pt"]


def test_a_write_that_fails_on_the_writer_thread_is_raised_naming_the_file(small_ext4: Path) -> None:
    path = small_ext4 / "payload.bin"
    file = _open_direct(path)
    with pytest.raises(OSError) as raised:
        for _ in range(8):  # 64 MiB into 16 MiB
            file.write(bytes(BUFFER))
        file.flush()
    assert raised.value.errno == errno.ENOSPC and str(path) in str(raised.value)
    with pytest.raises(OSError):
        file.write(b"more")  # a failed file stays failed
    file.close()
    assert file.closed
