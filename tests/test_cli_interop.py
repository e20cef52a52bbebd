"""Interop with the official command-line tools: our files decode with zstd, lz4, gzip, bzip2, xz,
lzma and GNU tar, and files those tools make load here. Composer's way of compressing (torch.save
piped into the CLI) must keep working as input.

The tools come from the Debian packages zstd, lz4, xz-utils, bzip2 (and tar, gzip), which .ci/run
installs; a test whose tool is missing is skipped, naming it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ckpt_callbacks.archive import MEMBER, bundle
from ckpt_callbacks.codecs import checkpoint_format
from ckpt_callbacks.serialization import read_state, verify_file, write_state

# extension -> (compress command, decompress-to-stdout command)
CLIS = {
    "zst": (["zstd", "-q", "-c"], ["zstd", "-q", "-d", "-c"]),
    "lz4": (["lz4", "-q", "-c"], ["lz4", "-q", "-d", "-c"]),
    "gz": (["gzip", "-c"], ["gzip", "-d", "-c"]),
    "bz2": (["bzip2", "-c"], ["bzip2", "-d", "-c"]),
    "xz": (["xz", "-c"], ["xz", "-d", "-c"]),
    "lzma": (["xz", "--format=lzma", "-c"], ["lzma", "-d", "-c"]),
}
# tar extension -> (the GNU tar option reading or writing it, the compressor tar runs for it);
# GNU tar has no lz4 option, so .tar.lz4 goes through a pipe.
TAR_OPTIONS = {"tar": ([], None), "tgz": (["-z"], "gzip"), "tar.gz": (["-z"], "gzip"), "tar.bz2": (["-j"], "bzip2"),
               "tar.xz": (["-J"], "xz"), "tar.lzma": (["--lzma"], "lzma"), "tar.zst": (["--zstd"], "zstd"),
               "tar.lz4": (None, "lz4")}  # fmt: skip


def _need(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs the {', '.join(missing)} command (Debian packages zstd lz4 xz-utils bzip2)")


def _checkpoint() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    return {"state": {"model": model.state_dict(), "metadata": {"schema_version": 1}}, "rng": [{"torch": torch.get_rng_state()}]}


def _same(a: dict, b: dict) -> None:
    for key, tensor in b["state"]["model"].items():
        assert torch.equal(a["state"]["model"][key], tensor), key
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


def _run(command: list[str], *, stdin: Path | None = None, stdout: Path | None = None, cwd: Path | None = None) -> None:
    with open(stdin, "rb") if stdin else open("/dev/null", "rb") as source, \
            open(stdout, "wb") if stdout else open("/dev/null", "wb") as sink:  # fmt: skip
        result = subprocess.run(command, stdin=source, stdout=sink, stderr=subprocess.PIPE, cwd=cwd, timeout=120)
    assert result.returncode == 0, (command, result.stderr.decode())


def _save(path: Path) -> Path:
    with open(path, "wb") as raw:
        write_state(_checkpoint(), raw, checkpoint_format(path.name))
    return path


@pytest.mark.parametrize("ext", sorted(CLIS))
def test_our_compressed_files_decode_with_the_official_cli(ext: str, tmp_path: Path) -> None:
    compress, decompress = CLIS[ext]
    _need(decompress[0])
    ours = _save(tmp_path / f"ep1.pt.{ext}")
    _run(decompress, stdin=ours, stdout=tmp_path / "plain.pt")
    _same(torch.load(tmp_path / "plain.pt", weights_only=True), _checkpoint())
    verify_file(tmp_path / "plain.pt")  # written without CRCs (the codec had a checksum) or with them


@pytest.mark.parametrize("ext", sorted(CLIS))
def test_files_compressed_by_the_official_cli_load_whatever_their_name(ext: str, tmp_path: Path) -> None:
    compress, _ = CLIS[ext]
    _need(compress[0])
    torch.save(_checkpoint(), tmp_path / "plain.pt")
    # Named like a download's temp file: readers go by magic bytes.
    theirs = tmp_path / "download.tmp"
    _run(compress, stdin=tmp_path / "plain.pt", stdout=theirs)
    _same(read_state(theirs), _checkpoint())
    verify_file(theirs)


@pytest.mark.parametrize("ext", ["zst", "lz4", "gz"])
def test_composers_pipe_into_the_cli_loads(ext: str, tmp_path: Path) -> None:
    # Composer: Popen([cli], stdin=PIPE, stdout=file) and torch.save into its stdin.
    compress, _ = CLIS[ext]
    _need(compress[0])
    path = tmp_path / f"ep1-ba2-rank0.pt.{ext}"
    with open(path, "wb") as out:
        process = subprocess.Popen([compress[0]], stdin=subprocess.PIPE, stdout=out, stderr=subprocess.DEVNULL)
        assert process.stdin is not None
        torch.save(_checkpoint(), process.stdin)
        process.stdin.close()
        assert process.wait(timeout=120) == 0
    _same(read_state(path), _checkpoint())


@pytest.mark.parametrize("ext", sorted(TAR_OPTIONS))
def test_our_tar_checkpoints_unpack_with_gnu_tar(ext: str, tmp_path: Path) -> None:
    option, tool = TAR_OPTIONS[ext]
    _need("tar", *([tool] if tool else []))
    ours = _save(tmp_path / f"ep1.{ext}")
    out = tmp_path / "out"
    out.mkdir()
    if option is None:
        _run(["lz4", "-q", "-d", "-c", str(ours)], stdout=tmp_path / "plain.tar")
        _run(["tar", "-xf", str(tmp_path / "plain.tar")], cwd=out)
    else:
        _run(["tar", *option, "-xf", str(ours)], cwd=out)
    assert sorted(p.name for p in out.iterdir()) == [MEMBER]
    _same(torch.load(out / MEMBER, weights_only=True), _checkpoint())


@pytest.mark.parametrize("ext", sorted(TAR_OPTIONS))
def test_tars_made_by_gnu_tar_load(ext: str, tmp_path: Path) -> None:
    option, tool = TAR_OPTIONS[ext]
    _need("tar", *([tool] if tool else []))
    staging = tmp_path / "staging"
    staging.mkdir()
    torch.save(_checkpoint(), staging / MEMBER)
    theirs = tmp_path / f"theirs.{ext}"
    if option is None:
        _run(["tar", "-cf", str(tmp_path / "plain.tar"), "-C", str(staging), MEMBER])
        _run(["lz4", "-q", "-c", str(tmp_path / "plain.tar")], stdout=theirs)
    else:
        _run(["tar", *option, "-cf", str(theirs), "-C", str(staging), "."])  # members named ./checkpoint.pt
    _same(read_state(theirs), _checkpoint())
    verify_file(theirs)


@pytest.mark.parametrize("ext", ["tar", "tar.gz", "tar.zst", "tar.xz"])
def test_bundled_folders_unpack_with_gnu_tar(ext: str, tmp_path: Path) -> None:
    option, tool = TAR_OPTIONS[ext]
    _need("tar", *([tool] if tool else []))
    folder = tmp_path / "checkpoint-7"
    (folder / "shards").mkdir(parents=True)
    torch.save(_checkpoint(), folder / "shards" / "__0_0.distcp")
    (folder / ".metadata").write_bytes(b"index")
    path = tmp_path / f"bundle.{ext}"
    with open(path, "wb") as raw:
        bundle(folder, raw, path.name)
    out = tmp_path / "out"
    out.mkdir()
    _run(["tar", *option, "-xf", str(path)], cwd=out)  # type: ignore[misc]
    assert (out / ".metadata").read_bytes() == b"index"
    _same(torch.load(out / "shards" / "__0_0.distcp", weights_only=True), _checkpoint())


def test_cli_integrity_checks_pass_on_our_files(tmp_path: Path) -> None:
    _need("zstd", "lz4", "xz", "bzip2", "gzip")
    for ext, command in (("zst", "zstd"), ("lz4", "lz4"), ("gz", "gzip"), ("bz2", "bzip2"), ("xz", "xz")):
        _run([command, "-q", "-t", str(_save(tmp_path / f"x.pt.{ext}"))])
