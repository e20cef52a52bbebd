"""Tests for ckpt_callbacks.archive: real tar files, bundled from real folders and read back with tarfile,
and hostile archives built with tarfile to check that extraction refuses them before writing."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
import torch

from ckpt_callbacks.archive import COMPOSER_MEMBER, MEMBER, bundle, copy_member, extract, write_member
from ckpt_callbacks.codecs import CODECS
from ckpt_callbacks.decoding import open_decoded
from ckpt_callbacks.errors import CheckpointError, CheckpointNotFoundError, ConfigurationError, CorruptCheckpointError

TAR_NAMES = ["x.tar", "x.tgz", *(f"x.tar.{ext}" for ext in CODECS)]


def _folder(root: Path) -> Path:
    """A checkpoint folder shaped like a Hugging Face checkpoint-N/ folder, with a subfolder."""
    folder = root / "checkpoint-500"
    (folder / "rng").mkdir(parents=True)
    (folder / "config.json").write_text('{"hidden": 64}')
    torch.save({"w": torch.arange(2048, dtype=torch.float32)}, folder / "optimizer.pt")
    (folder / "rng" / "rng_state_0.pth").write_bytes(os.urandom(3000))
    (folder / "empty.txt").write_bytes(b"")
    return folder


def _bundle(sources: object, path: Path, **kwargs: object) -> list[str]:
    with open(path, "wb") as raw:
        return bundle(sources, raw, path.name, **kwargs)  # type: ignore[arg-type]


def _same_tree(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*"))
    for relative in files_a:
        if (a / relative).is_file():
            assert (a / relative).read_bytes() == (b / relative).read_bytes(), relative


# --- write_member / copy_member --------------------------------------------------------------


@pytest.mark.parametrize("name", TAR_NAMES)
def test_write_member_then_copy_member_round_trips(name: str, tmp_path: Path) -> None:
    data = os.urandom(5000) + bytes(70_000)
    path = tmp_path / name
    with open(path, "wb") as raw:
        write_member(raw, name, io.BytesIO(data), len(data))
    with tarfile.open(fileobj=_decoded(path), mode="r|") as tar:
        members = [(m.name, m.size, m.isreg()) for m in tar]
    assert members == [(MEMBER, len(data), True)]
    out = io.BytesIO()
    with open_decoded(path) as decoded:
        assert copy_member(decoded.stream, out, source=path) == MEMBER
    assert out.getvalue() == data


def _decoded(path: Path) -> io.BytesIO:
    with open_decoded(path) as decoded:
        return io.BytesIO(decoded.stream.read())


def test_write_member_refuses_short_sources_and_non_tar_formats(tmp_path: Path) -> None:
    with open(tmp_path / "x.tar", "wb") as raw:
        with pytest.raises(CheckpointError, match="ended 10 bytes short of its 20"):
            write_member(raw, "x.tar", io.BytesIO(b"0123456789"), 20)
        with pytest.raises(ConfigurationError, match=r"'fmt' must be a tar format .*\(got '.pt.zst'\)"):
            write_member(raw, "x.pt.zst", io.BytesIO(b""), 0)


def test_copy_member_takes_composer_names_and_skips_other_members(tmp_path: Path) -> None:
    path = tmp_path / "composer.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("./README", b"first"), (f"./{COMPOSER_MEMBER}", b"state")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    with open(path, "rb") as stream:
        assert copy_member(stream, out, source=path) == f"./{COMPOSER_MEMBER}"
    assert out.getvalue() == b"state"


def test_copy_member_reports_what_a_tar_holds_instead(tmp_path: Path) -> None:
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("checkpoint.pt")  # a folder, not a file: not a checkpoint member
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    with open(path, "rb") as stream, pytest.raises(CorruptCheckpointError, match=r"holds 'checkpoint.pt'"):
        copy_member(stream, io.BytesIO(), source=path)


def test_copy_member_on_a_cut_tar_is_corrupt(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    path = tmp_path / "x.tar"
    with open(path, "wb") as raw:
        write_member(raw, "x.tar", io.BytesIO(data), len(data))
    blob = path.read_bytes()
    for cut in (600, 5000, 10_000):
        with pytest.raises(CorruptCheckpointError, match=f"{path} is corrupt"):
            copy_member(io.BytesIO(blob[:cut]), io.BytesIO(), source=path)


# --- bundle / extract ------------------------------------------------------------------------


@pytest.mark.parametrize("name", TAR_NAMES)
def test_bundle_a_folder_and_extract_it(name: str, tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    members = _bundle(folder, tmp_path / name)
    assert members == ["rng", "config.json", "empty.txt", "optimizer.pt", "rng/rng_state_0.pth"]
    extracted = extract(tmp_path / name, tmp_path / "out")
    assert extracted == [tmp_path / "out" / m for m in members]
    _same_tree(folder, tmp_path / "out")
    assert torch.load(tmp_path / "out" / "optimizer.pt", weights_only=True)["w"].sum() == sum(range(2048))


def test_bundle_a_file_list_relative_to_root(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    files = [folder / "config.json", folder / "rng" / "rng_state_0.pth"]
    assert _bundle(files, tmp_path / "x.tar.gz", root=folder) == ["config.json", "rng/rng_state_0.pth"]
    assert _bundle(files, tmp_path / "y.tar") == ["config.json", "rng_state_0.pth"]
    extract(tmp_path / "x.tar.gz", tmp_path / "out")
    assert (tmp_path / "out" / "rng" / "rng_state_0.pth").read_bytes() == files[1].read_bytes()


def test_bundle_stores_symlinked_files_as_files(tmp_path: Path) -> None:
    # A Hugging Face hub snapshot links its files into a blob cache.
    folder = tmp_path / "snapshot"
    folder.mkdir()
    (tmp_path / "blob").write_bytes(b"weights")
    (folder / "model.safetensors").symlink_to(tmp_path / "blob")
    _bundle(folder, tmp_path / "x.tar")
    with tarfile.open(tmp_path / "x.tar") as tar:
        assert tar.getmember("model.safetensors").isreg()
    extract(tmp_path / "x.tar", tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"weights"


def test_bundle_refusals(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    with pytest.raises(ConfigurationError, match="'sources' must be a folder or a list of files"):
        _bundle(tmp_path / "missing", tmp_path / "x.tar")
    with pytest.raises(ConfigurationError, match="'sources' must be files with distinct names"):
        _bundle([folder / "config.json", tmp_path / "config.json"], tmp_path / "x.tar")
    with pytest.raises(ConfigurationError, match="'sources' must be files under root="):
        _bundle([tmp_path / "elsewhere.txt"], tmp_path / "x.tar", root=folder)
    with pytest.raises(ConfigurationError, match="'fmt' must be a tar format"):
        _bundle(folder, tmp_path / "x.pt.gz")
    os.mkfifo(folder / "pipe")
    with pytest.raises(ConfigurationError, match="'sources' must be regular files and folders only"):
        _bundle(folder, tmp_path / "x.tar")


def _hostile(path: Path, *members: tarfile.TarInfo, mode: str = "w") -> Path:
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tar:
        good = tarfile.TarInfo("good.txt")
        good.size = 4
        tar.addfile(good, io.BytesIO(b"good"))
        for member in members:
            tar.addfile(member, io.BytesIO(b"evil"[: member.size]))
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = 4 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (_member("/etc/evil"), "has an absolute name"),
        (_member("../evil"), "has a '..' component"),
        (_member("sub/../../evil"), "has a '..' component"),
        (_member("link", tarfile.SYMTYPE, "/etc/passwd"), "is a symlink to '/etc/passwd', outside the archive"),
        (_member("link", tarfile.SYMTYPE, "../../x"), "is a symlink to '../../x'"),
        (_member("sub/link", tarfile.SYMTYPE, "../good.txt"), "is a symlink to '../good.txt'"),
        (_member("hard", tarfile.LNKTYPE, "/etc/passwd"), "is a hard link to '/etc/passwd'"),
        (_member("hard", tarfile.LNKTYPE, "../x"), "is a hard link to '../x'"),
        (_member("dev", tarfile.CHRTYPE), "is a device or fifo"),
        (_member("blk", tarfile.BLKTYPE), "is a device or fifo"),
        (_member("fifo", tarfile.FIFOTYPE), "is a device or fifo"),
    ],
    ids=lambda value: value if isinstance(value, str) else value.name,
)
@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_extract_refuses_unsafe_members_and_writes_nothing(
    member: tarfile.TarInfo, reason: str, mode: str, tmp_path: Path
) -> None:
    path = _hostile(tmp_path / "evil.tar", member, mode=mode)
    dest = tmp_path / "a" / "out"
    with pytest.raises(CheckpointError) as info:
        extract(path, dest)
    message = str(info.value)
    assert f"refusing to extract member {member.name!r}, which {reason}" in message
    assert str(path) in message and "nothing was extracted" in message
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar"]


def test_extract_accepts_links_that_stay_inside(tmp_path: Path) -> None:
    path = _hostile(
        tmp_path / "ok.tar",
        _member("sub", tarfile.DIRTYPE),
        _member("sub/link", tarfile.SYMTYPE, "deeper/file"),
        _member("alias", tarfile.LNKTYPE, "good.txt"),
    )
    extract(path, tmp_path / "out")
    assert os.readlink(tmp_path / "out" / "sub" / "link") == "deeper/file"
    assert (tmp_path / "out" / "alias").read_bytes() == b"good"


def test_extract_of_a_non_tar_or_missing_file(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "x.pt")
    with pytest.raises(CorruptCheckpointError, match="is not a tar bundle"):
        extract(tmp_path / "x.pt", tmp_path / "out")
    with pytest.raises(CheckpointNotFoundError):
        extract(tmp_path / "nope.tar", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extract_of_a_truncated_compressed_tar_is_corrupt(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    _bundle(folder, tmp_path / "x.tar.gz")
    blob = (tmp_path / "x.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CorruptCheckpointError, match="cut.tar.gz is corrupt"):
        extract(tmp_path / "cut.tar.gz", tmp_path / "out")
    assert not (tmp_path / "out").exists()
