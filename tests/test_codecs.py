"""Tests for ckpt_callbacks.codecs: real files written by the real compression libraries and tarfile."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import random
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from ckpt_callbacks.codecs import (
    CODECS,
    PLAIN_EXTENSIONS,
    SNIFF_BYTES,
    CheckpointFormat,
    checkpoint_format,
    get_codec,
    open_decoded,
    sniff,
)
from ckpt_callbacks.errors import (
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    UnsupportedFormatError,
)

zstandard = pytest.importorskip("zstandard")
lz4_frame = pytest.importorskip("lz4.frame")

REPO = Path(__file__).resolve().parents[1]
# Compressible but not trivial: the codecs get real work and the streams span several blocks.
PAYLOAD = random.Random(0).randbytes(300_000) + bytes(300_000) + b"checkpoint" * 30_000


def _torch_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, buf)
    return buf.getvalue()


def _compress(name: str, data: bytes) -> bytes:
    """Compress with the libraries' own one-shot functions, independently of our writers."""
    if name == "gzip":
        return gzip.compress(data)
    if name == "bz2":
        return bz2.compress(data)
    if name == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ)
    if name == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_ALONE)
    if name == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    if name == "lz4":
        return lz4_frame.compress(data)
    raise AssertionError(name)


CODEC_NAMES = ["gzip", "bz2", "xz", "lzma", "zstd", "lz4"]
EXTENSION_OF = {"gzip": "gz", "bz2": "bz2", "xz": "xz", "lzma": "lzma", "zstd": "zst", "lz4": "lz4"}


# --- registry and writers --------------------------------------------------------------------


def test_registry_has_every_codec_keyed_by_extension() -> None:
    assert {ext: codec.name for ext, codec in CODECS.items()} == {v: k for k, v in EXTENSION_OF.items()}
    for ext, codec in CODECS.items():
        assert ext in codec.extensions
    with pytest.raises(TypeError):
        CODECS["new"] = CODECS["gz"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("extension", "level"), [("gz", 6), ("bz2", 9), ("xz", 6), ("lzma", 6), ("zst", 3), ("lz4", 0)]
)
def test_default_levels(extension: str, level: int) -> None:
    assert get_codec(extension).default_level == level
    assert get_codec(extension).check_level(None) == level


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_writer_streams_into_raw_without_closing_it_and_reader_round_trips(name: str, tmp_path: Path) -> None:
    codec = get_codec(EXTENSION_OF[name])
    path = tmp_path / f"blob.{EXTENSION_OF[name]}"
    with open(path, "wb") as raw:
        with codec.open_writer(raw, level=None) as writer:
            for start in range(0, len(PAYLOAD), 65_536):
                writer.write(PAYLOAD[start : start + 65_536])
        assert not raw.closed
        raw.write(b"")  # still usable: the caller flushes and fsyncs it
    header = path.read_bytes()[:SNIFF_BYTES]
    assert sniff(header) == name
    if codec.magic:
        assert header.startswith(codec.magic)
    with open(path, "rb") as raw:
        assert codec.open_reader(raw).read() == PAYLOAD
        assert not raw.closed


@pytest.mark.parametrize(
    ("extension", "fast", "strong"), [("gz", 1, 9), ("bz2", 1, 9), ("xz", 0, 6), ("lzma", 0, 6), ("zst", 1, 12), ("lz4", 0, 12)]
)
def test_explicit_level_is_used(extension: str, fast: int, strong: int) -> None:
    codec = get_codec(extension)
    sizes = []
    for level in (fast, strong):
        raw = io.BytesIO()
        with codec.open_writer(raw, level) as writer:
            writer.write(PAYLOAD)
        sizes.append(len(raw.getvalue()))
        assert codec.open_reader(io.BytesIO(raw.getvalue())).read() == PAYLOAD
    assert sizes[0] != sizes[1]


@pytest.mark.parametrize(("extension", "level"), [("gz", 10), ("bz2", 0), ("xz", -1), ("zst", 23), ("lz4", 17)])
def test_out_of_range_level_is_refused(extension: str, level: int) -> None:
    codec = get_codec(extension)
    with pytest.raises(ConfigurationError, match=rf"'compression_level' must be an int from -?\d+ to \d+ .*got {level}"):
        codec.open_writer(io.BytesIO(), level)


@pytest.mark.parametrize("level", ["3", 2.0, True])
def test_non_int_level_is_refused(level: object) -> None:
    with pytest.raises(ConfigurationError, match="compression_level"):
        get_codec("gz").check_level(level)  # type: ignore[arg-type]


def test_zstd_writer_is_one_checksummed_frame() -> None:
    raw = io.BytesIO()
    with get_codec("zst").open_writer(raw) as writer:
        writer.write(PAYLOAD)
    params = zstandard.get_frame_parameters(raw.getvalue())
    assert params.has_checksum
    assert zstandard.ZstdDecompressor().decompressobj().decompress(raw.getvalue()) == PAYLOAD


def test_zstd_reader_reads_concatenated_frames() -> None:
    blob = _compress("zstd", b"first frame ") + _compress("zstd", b"second frame")
    assert get_codec("zst").open_reader(io.BytesIO(blob)).read() == b"first frame second frame"


def test_gzip_writer_is_reproducible_and_leaks_no_file_name(tmp_path: Path) -> None:
    outputs = []
    for name in ("a.tmp-host-1", "b.tmp-host-2"):
        with open(tmp_path / name, "wb") as raw, get_codec("gz").open_writer(raw) as writer:
            writer.write(b"same state")
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]
    assert b"tmp-host" not in outputs[0]


def test_missing_optional_packages_name_the_extra() -> None:
    # A real interpreter where the optional packages cannot be imported.
    script = textwrap.dedent(
        """
        import sys
        sys.modules["zstandard"] = None
        sys.modules["lz4"] = None
        from ckpt_callbacks.codecs import CODECS, checkpoint_format, get_codec
        from ckpt_callbacks.errors import ConfigurationError, UnsupportedFormatError
        assert sorted(CODECS) == ["bz2", "gz", "lzma", "xz"], sorted(CODECS)
        for name, extra in (("ep{epoch}.pt.zst", "zstd"), ("ep{epoch}.pt.lz4", "lz4")):
            try:
                checkpoint_format(name)
            except UnsupportedFormatError:
                raise AssertionError("a known codec is not an unsupported format")
            except ConfigurationError as e:
                assert f"pip install 'ckpt-callbacks[{extra}]'" in str(e), e
                assert name in str(e), e
            else:
                raise AssertionError(name)
        try:
            checkpoint_format("x.pt.lzo")
        except UnsupportedFormatError as e:
            assert ".zst" in str(e) and ".lz4" in str(e), e
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --- checkpoint_format -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "codec", "extension"),
    [
        ("ep{epoch}-ba{batch}-rank{rank}.pt", None, ".pt"),
        ("ep{epoch}-ba{batch}", None, ""),
        ("t{total_wct}", None, ""),
        ("t{total_wct:.1f}", None, ""),
        ("checkpoint", None, ""),
        ("model.pth", None, ".pth"),
        ("last.ckpt", None, ".ckpt"),
        ("model.bin", None, ".bin"),
        ("w.torch", None, ".torch"),
        ("{run_name}/ep{epoch}.pt", None, ".pt"),
        ("run.v2/ep{epoch}", None, ""),
        ("ep{epoch}.pt.zst", "zstd", ".pt.zst"),
        ("model.bin.zst", "zstd", ".bin.zst"),
        ("model.bin.gz", "gzip", ".bin.gz"),
        ("x.pt.bz2", "bz2", ".pt.bz2"),
        ("x.pt.xz", "xz", ".pt.xz"),
        ("x.pt.lzma", "lzma", ".pt.lzma"),
        ("ep{epoch}-rank{rank}.pt.lz4", "lz4", ".pt.lz4"),
        ("x.zst", "zstd", ".zst"),
        ("ep{epoch:03d}.pt.gz", "gzip", ".pt.gz"),
    ],
)
def test_checkpoint_format_table(template: str, codec: str | None, extension: str) -> None:
    fmt = checkpoint_format(template)
    assert isinstance(fmt, CheckpointFormat)
    assert (fmt.codec.name if fmt.codec else None) == codec
    assert fmt.extension == extension


@pytest.mark.parametrize(
    "template", ["x.tar", "x.pt.tar", "x.tgz", "x.tar.gz", "x.tar.bz2", "x.tar.lzma", "ep{epoch}.tar.zst", "x.tar.lz4"]
)
def test_tar_bundles_are_not_implemented_yet(template: str) -> None:
    with pytest.raises(NotImplementedError, match=r"tar bundles .* issue #3"):
        checkpoint_format(template)


def test_safetensors_is_not_implemented_yet() -> None:
    with pytest.raises(NotImplementedError, match=r"safetensors .*issue #3"):
        checkpoint_format("model.safetensors")


def test_symlink_names_are_refused() -> None:
    with pytest.raises(UnsupportedFormatError, match=r"'latest_filename' .*remote pointers.*latest.pt.symlink"):
        checkpoint_format("latest.pt.symlink", argument="latest_filename")


@pytest.mark.parametrize("template", ["ep{epoch}.pt.lzo", "x.zip", "x.foo", "x.pt.foo", "x.tar.foo", "x."])
def test_unknown_extensions_are_refused_listing_every_accepted_one(template: str) -> None:
    with pytest.raises(UnsupportedFormatError) as info:
        checkpoint_format(template, argument="remote_file_name")
    message = str(info.value)
    assert message.startswith("'remote_file_name' must be")
    assert f"(got {template!r})" in message
    for extension in (*PLAIN_EXTENSIONS, *EXTENSION_OF.values()):
        assert f".{extension}" in message


def test_non_str_template_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="'filename' must be a file name template"):
        checkpoint_format(3)  # type: ignore[arg-type]


# --- sniff -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_sniff_files_written_by_the_real_libraries(name: str, tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(_compress(name, PAYLOAD))
    with open(path, "rb") as f:
        assert sniff(f.read(SNIFF_BYTES)) == name
    assert sniff(_compress(name, b"")) == name  # an empty stream is still that format


def test_sniff_zip_from_torch_save_and_empty_zip() -> None:
    assert sniff(_torch_bytes()[:SNIFF_BYTES]) == "zip"
    empty = io.BytesIO()
    with zipfile.ZipFile(empty, "w"):
        pass
    assert sniff(empty.getvalue()) == "zip"


def test_sniff_tar(tmp_path: Path) -> None:
    member = tmp_path / "checkpoint.pt"
    member.write_bytes(_torch_bytes())
    with tarfile.open(tmp_path / "x.tar", "w") as tar:
        tar.add(member, arcname="checkpoint.pt")
    header = (tmp_path / "x.tar").read_bytes()[:SNIFF_BYTES]
    assert sniff(header) == "tar"
    assert sniff(header[:261]) is None  # the magic ends at byte 262


@pytest.mark.parametrize(
    "header",
    [b"", b"P", b"PK", b"\x1f", b"BZh", b"BZh0", b"BZh9garbage", b"\xfd7zX", b"\x28\xb5\x2f", b"plain text"],
)
def test_sniff_short_or_near_miss_headers(header: bytes) -> None:
    assert sniff(header) is None


def test_sniff_is_strict_about_lzma_alone() -> None:
    good = _compress("lzma", b"x")[:13]
    assert sniff(good) == "lzma"
    bad_props = bytes([225]) + good[1:]
    bad_dict = good[:1] + (5 * 2**20 + 1).to_bytes(4, "little") + good[5:]
    tiny_dict = good[:1] + (1024).to_bytes(4, "little") + good[5:]
    huge_size = good[:5] + (2**60).to_bytes(8, "little")
    for header in (bad_props, bad_dict, tiny_dict, huge_size, good[:12]):
        assert sniff(header) is None
    three_halves = good[:1] + (3 * 2**20).to_bytes(4, "little") + (1234).to_bytes(8, "little")
    assert sniff(three_halves) == "lzma"


def test_sniff_does_not_match_random_data() -> None:
    rng = random.Random(1234)
    assert [sniff(rng.randbytes(SNIFF_BYTES)) for _ in range(5000)].count(None) == 5000


# --- open_decoded ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_open_decoded_yields_seekable_decoded_bytes(name: str, tmp_path: Path) -> None:
    # The name lies on purpose: readers go by magic bytes only.
    path = tmp_path / "misnamed.pt"
    path.write_bytes(_compress(name, PAYLOAD))
    with open_decoded(path) as f:
        assert f.seekable()
        assert f.read() == PAYLOAD
        f.seek(10)
        assert f.read(5) == PAYLOAD[10:15]


def test_open_decoded_yields_a_plain_torch_file_itself(tmp_path: Path) -> None:
    path = tmp_path / "x.pt.zst"  # misnamed the other way round
    path.write_bytes(_torch_bytes())
    with open_decoded(path) as f:
        assert getattr(f, "name", None) == str(path)
        assert torch.load(f, weights_only=True)["w"].sum().item() == sum(range(1000))
    assert f.closed


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_open_decoded_truncated_streams_are_corrupt(name: str, tmp_path: Path) -> None:
    blob = _compress(name, PAYLOAD)
    path = tmp_path / "cut"
    # Keep enough of the header that the file is still recognised as this codec.
    for cut in (len(blob) - 1, len(blob) - 4, len(blob) // 2, 40):
        path.write_bytes(blob[:cut])
        with pytest.raises(CorruptCheckpointError, match=rf"{path} is corrupt: its {name} stream") as info:
            with open_decoded(path) as f:
                f.read()
        assert info.value.__cause__ is not None


@pytest.mark.parametrize("name", ["gzip", "bz2", "xz", "zstd", "lz4"])
def test_open_decoded_flipped_bit_in_checksummed_stream_is_corrupt(name: str, tmp_path: Path) -> None:
    raw = io.BytesIO()
    with get_codec(EXTENSION_OF[name]).open_writer(raw) as writer:
        writer.write(PAYLOAD)
    blob = bytearray(raw.getvalue())
    blob[len(blob) // 3] ^= 0x10
    path = tmp_path / "flipped"
    path.write_bytes(bytes(blob))
    with pytest.raises(CorruptCheckpointError, match=str(path)):
        with open_decoded(path):
            pass


def test_open_decoded_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="nope.pt"):
        with open_decoded(tmp_path / "nope.pt"):
            pass


def test_open_decoded_directory(tmp_path: Path) -> None:
    with pytest.raises(CorruptCheckpointError, match="is a directory"):
        with open_decoded(tmp_path):
            pass


@pytest.mark.parametrize(
    ("content", "detail"),
    [(b"", "the file is empty"), (b"hello, not a checkpoint", "first bytes b'hello, not a che'")],
)
def test_open_decoded_unknown_format(content: bytes, detail: str, tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(CorruptCheckpointError) as info:
        with open_decoded(path):
            pass
    assert f"{path} is not a checkpoint: unknown format" in str(info.value)
    assert detail in str(info.value)


def test_open_decoded_tar_bundles_are_not_implemented_yet(tmp_path: Path) -> None:
    member = tmp_path / "checkpoint.pt"
    member.write_bytes(_torch_bytes())
    for name, mode in (("x.tar", "w"), ("x.tar.gz", "w:gz")):
        with tarfile.open(tmp_path / name, mode) as tar:
            tar.add(member, arcname="checkpoint.pt")
        with pytest.raises(NotImplementedError, match="issue #3"):
            with open_decoded(tmp_path / name):
                pass


def _open_files_under(folder: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc to see open files")
def test_open_decoded_spills_next_to_the_checkpoint(tmp_path: Path) -> None:
    # Above the in-memory bound the decoded bytes go to an unlinked temp file in the same folder.
    big = random.Random(5).randbytes(1024) * (65 * 1024)  # 65 MiB, compresses to almost nothing
    path = tmp_path / "big.pt.zst"
    path.write_bytes(zstandard.ZstdCompressor(level=1).compress(big))
    with open_decoded(path) as f:
        spilled = [name for name in _open_files_under(tmp_path) if not name.endswith("big.pt.zst")]
        assert len(spilled) == 1 and "(deleted)" in spilled[0]
        f.seek(len(big) - 1024)
        assert f.read() == big[-1024:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.pt.zst"]
    assert _open_files_under(tmp_path) == []


def test_open_decoded_small_files_stay_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "small.pt.gz"
    path.write_bytes(gzip.compress(PAYLOAD))
    with open_decoded(path) as f:
        assert f.read() == PAYLOAD
        if Path("/proc/self/fd").is_dir():
            assert [n for n in _open_files_under(tmp_path) if not n.endswith("small.pt.gz")] == []
