"""Tests for ckpt_callbacks.codecs and ckpt_callbacks.decoding: real files written by the real
compression libraries and tarfile, and the stream helpers they build on."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import random
import subprocess
import sys
import tarfile
import textwrap
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from ckpt_callbacks._streams import CheckedReader, ChunkedWriter, check_zstd_frames
from ckpt_callbacks.codecs import (
    CODECS,
    FORMATS,
    PLAIN_EXTENSIONS,
    SNIFF_BYTES,
    CheckpointFormat,
    checkpoint_format,
    codec_named,
    get_codec,
    sniff,
)
from ckpt_callbacks.decoding import open_decoded
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
        assert codec_named(codec.name) is codec
        assert codec.checksummed is (ext != "lzma")
    with pytest.raises(TypeError):
        CODECS["new"] = CODECS["gz"]  # type: ignore[index]


def test_formats_registry_covers_every_listed_extension() -> None:
    expected = {ext: ("torch", None) for ext in PLAIN_EXTENSIONS}
    expected.update({"tar": ("tar", None), "tgz": ("tar", "gz"), "safetensors": ("safetensors", None)})
    for ext in EXTENSION_OF.values():
        expected[ext] = ("torch", ext)
        expected[f"tar.{ext}"] = ("tar", ext)
    assert dict(FORMATS) == expected
    with pytest.raises(TypeError):
        FORMATS["zip"] = ("torch", None)  # type: ignore[index]


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
    raw.seek(0)
    assert check_zstd_frames(raw) is None  # a stream of unknown length declares no content size


@pytest.mark.parametrize("name", ["gzip", "bz2", "xz", "lz4"])
def test_chunked_codecs_write_concatenated_members_that_their_libraries_read_as_one(name: str) -> None:
    codec = get_codec(EXTENSION_OF[name])
    raw = io.BytesIO()
    # A small chunk size forces many members through the same compress function the codec uses.
    compress = {
        "gzip": lambda chunk: gzip.compress(chunk, mtime=0),
        "bz2": bz2.compress,
        "xz": lambda chunk: lzma.compress(chunk, format=lzma.FORMAT_XZ),
        "lz4": lambda chunk: lz4_frame.compress(chunk, content_checksum=True),
    }[name]
    with ChunkedWriter(raw, compress, chunk_bytes=100_000, workers=2) as writer:
        for start in range(0, len(PAYLOAD), 70_001):
            writer.write(memoryview(PAYLOAD)[start : start + 70_001])
    assert codec.open_reader(io.BytesIO(raw.getvalue())).read() == PAYLOAD
    assert sniff(raw.getvalue()[:SNIFF_BYTES]) == name


def test_chunked_writer_compresses_chunks_concurrently_and_writes_them_in_order() -> None:
    # Both workers must be inside compress at once for the barrier to open: proof of overlap.
    barrier = threading.Barrier(2, timeout=20)
    threads: set[int] = set()

    def compress(chunk: bytearray) -> bytes:
        threads.add(threading.get_ident())
        if len(threads) <= 2 and chunk[:1] in (b"a", b"b"):
            barrier.wait()
        return bytes(chunk)

    raw = io.BytesIO()
    with ChunkedWriter(raw, compress, chunk_bytes=4, workers=2) as writer:
        writer.write(b"aaaabbbbccccdddde")
    assert raw.getvalue() == b"aaaabbbbccccdddde"
    assert len(threads) == 2


def test_chunked_writer_writes_one_member_for_an_empty_stream_and_keeps_raw_open() -> None:
    raw = io.BytesIO()
    with ChunkedWriter(raw, lambda chunk: gzip.compress(chunk, mtime=0)):
        pass
    assert gzip.decompress(raw.getvalue()) == b""
    assert not raw.closed


def test_chunked_writer_bounds_chunks_in_flight() -> None:
    # With compression held back, a writer with 2 workers accepts 2 chunks, then blocks in the
    # third write until the first chunk is compressed: memory stays bounded.
    started, release = threading.Semaphore(0), threading.Event()

    def compress(chunk: bytearray) -> bytes:
        started.release()
        assert release.wait(timeout=30)
        return bytes(chunk)

    raw, accepted = io.BytesIO(), []
    writer = ChunkedWriter(raw, compress, chunk_bytes=10, workers=2)

    def produce() -> None:
        for index in range(8):
            writer.write(bytes([index]) * 10)
            accepted.append(index)
        writer.close()

    producer = threading.Thread(target=produce)
    producer.start()
    assert started.acquire(timeout=30) and started.acquire(timeout=30)  # both workers busy
    assert producer.is_alive() and len(accepted) <= 2
    release.set()
    producer.join(timeout=30)
    assert not producer.is_alive()
    assert raw.getvalue() == b"".join(bytes([index]) * 10 for index in range(8))


def test_gzip_writer_is_reproducible_and_leaks_no_file_name(tmp_path: Path) -> None:
    outputs = []
    for name in ("a.tmp-host-1", "b.tmp-host-2"):
        with open(tmp_path / name, "wb") as raw, get_codec("gz").open_writer(raw) as writer:
            writer.write(b"same state")
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]
    assert b"tmp-host" not in outputs[0]


def test_missing_optional_packages_name_the_extra(tmp_path: Path) -> None:
    # A real interpreter where the optional packages cannot be imported.
    script = textwrap.dedent(
        """
        import sys
        sys.modules["zstandard"] = None
        sys.modules["lz4"] = None
        import torch
        from ckpt_callbacks import CheckpointSaver
        from ckpt_callbacks.codecs import CODECS, checkpoint_format, get_codec
        from ckpt_callbacks.errors import UnsupportedFormatError
        from ckpt_callbacks.serialization import read_state
        assert sorted(CODECS) == ["bz2", "gz", "lzma", "xz"], sorted(CODECS)
        names = (("ep{epoch}.pt.zst", "zstd"), ("ep{epoch}.pt.lz4", "lz4"), ("ep{epoch}.tar.zst", "zstd"))
        for name, extra in names:
            for attempt in (lambda: checkpoint_format(name), lambda: CheckpointSaver(".", filename=name)):
                try:
                    attempt()
                except UnsupportedFormatError as e:
                    assert f"pip install 'ckpt-callbacks[{extra}]'" in str(e), e
                    assert name in str(e), e
                    available = str(e).split("Available now: ")[1]
                    assert ".pt," in available and ".tar.gz" in available and ".zst" not in available, e
                else:
                    raise AssertionError(name)
        try:
            checkpoint_format("x.pt.lzo")
        except UnsupportedFormatError as e:
            assert ".zst" in str(e) and ".lz4" in str(e), e
        # Reading a zstd file without zstandard names the file and the extra.
        path = sys.argv[1]
        open(path, "wb").write(bytes.fromhex("28b52ffd2000010000"))
        try:
            read_state(path)
        except UnsupportedFormatError as e:
            assert path in str(e) and "ckpt-callbacks[zstd]" in str(e), e
        else:
            raise AssertionError("read a zstd file without zstandard")
        print("ok")
        """
    )
    target = str(tmp_path / "x.pt.zst")
    result = subprocess.run(
        [sys.executable, "-c", script, target], cwd=REPO, capture_output=True, text=True, timeout=120
    )
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
    assert fmt.container == "torch" and not fmt.tensors_only
    assert fmt.checksummed is (codec not in (None, "lzma"))


@pytest.mark.parametrize(
    ("template", "codec"),
    [
        ("x.tar", None),
        ("x.pt.tar", None),  # Composer refuses this name; it is a tar
        ("ep{epoch}-rank{rank}.tar", None),
        ("x.tgz", "gzip"),
        ("x.tar.gz", "gzip"),
        ("x.tar.bz2", "bz2"),
        ("x.tar.xz", "xz"),
        ("x.tar.lzma", "lzma"),
        ("ep{epoch}.tar.zst", "zstd"),
        ("x.tar.lz4", "lz4"),
        ("x.pt.tar.zst", "zstd"),
    ],
)
def test_tar_bundle_names(template: str, codec: str | None) -> None:
    fmt = checkpoint_format(template)
    assert fmt.container == "tar"
    assert (fmt.codec.name if fmt.codec else None) == codec


def test_safetensors_names() -> None:
    fmt = checkpoint_format("ep{epoch}-model.safetensors")
    assert (fmt.container, fmt.codec, fmt.extension, fmt.tensors_only) == ("safetensors", None, ".safetensors", True)
    with pytest.raises(UnsupportedFormatError, match="'filename' must be"):
        checkpoint_format("model.safetensors.zst")


def test_symlink_names_are_refused() -> None:
    with pytest.raises(UnsupportedFormatError, match=r"'latest_filename' .*remote pointers.*latest.pt.symlink"):
        checkpoint_format("latest.pt.symlink", argument="latest_filename")


@pytest.mark.parametrize("template", ["ep{epoch}.pt.lzo", "x.zip", "x.foo", "x.pt.foo", "x.tar.foo", "x.", "x.tar.tar.gz.lzo"])
def test_unknown_extensions_are_refused_listing_every_accepted_one(template: str) -> None:
    with pytest.raises(UnsupportedFormatError) as info:
        checkpoint_format(template, argument="remote_file_name")
    message = str(info.value)
    assert message.startswith("'remote_file_name' must be")
    assert f"(got {template!r})" in message
    for extension in (*PLAIN_EXTENSIONS, *EXTENSION_OF.values(), "tar", "tgz", "safetensors"):
        assert f".{extension}" in message


@pytest.mark.parametrize("extension", ["gz", "bz2", "xz", "lzma"])
def test_get_codec_refuses_unknown_extensions(extension: str) -> None:
    assert get_codec(extension).extensions == (extension,)
    with pytest.raises(UnsupportedFormatError, match=r"'extension' must be a compression extension: .*\(got 'lzo'\)"):
        get_codec("lzo")


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


def test_sniff_safetensors() -> None:
    header = b'{"__metadata__":{"format":"pt"}}  '
    assert sniff(len(header).to_bytes(8, "little") + header) == "safetensors"
    assert sniff((2**40).to_bytes(8, "little") + header) is None  # an absurd header length
    assert sniff(len(header).to_bytes(8, "little") + b"[1,2]") is None


def test_sniff_does_not_match_random_data() -> None:
    rng = random.Random(1234)
    assert [sniff(rng.randbytes(SNIFF_BYTES)) for _ in range(5000)].count(None) == 5000


# --- open_decoded ----------------------------------------------------------------------------

TORCH_BYTES = _torch_bytes()


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_open_decoded_streams_decoded_bytes_whatever_the_name(name: str, tmp_path: Path) -> None:
    # The name lies on purpose: readers go by magic bytes only.
    path = tmp_path / "misnamed.pt"
    path.write_bytes(_compress(name, TORCH_BYTES))
    with open_decoded(path) as decoded:
        assert (decoded.codec.name, decoded.kind, decoded.path) == (name, "zip", path)
        assert decoded.stream.read() == TORCH_BYTES


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_open_decoded_yields_an_uncompressed_file_itself(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "x.pt.zst"  # misnamed the other way round
    if kind == "zip":
        path.write_bytes(TORCH_BYTES)
    else:
        member = tmp_path / "checkpoint.pt"
        member.write_bytes(TORCH_BYTES)
        with tarfile.open(path, "w") as tar:
            tar.add(member, arcname="checkpoint.pt")
    with open_decoded(path) as decoded:
        assert (decoded.codec, decoded.kind) == (None, kind)
        assert getattr(decoded.stream, "name", None) == str(path)
        assert decoded.stream.seekable()
    assert decoded.stream.closed


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_open_decoded_sees_the_tar_inside_a_compressed_file(mode: str, tmp_path: Path) -> None:
    member = tmp_path / "checkpoint.pt"
    member.write_bytes(TORCH_BYTES)
    path = tmp_path / "bundle.bin"
    with tarfile.open(path, mode) as tar:
        tar.add(member, arcname="checkpoint.pt")
    with open_decoded(path) as decoded:
        assert decoded.kind == "tar" and decoded.codec is not None
        with tarfile.open(fileobj=decoded.stream, mode="r|") as tar:
            assert [m.name for m in tar] == ["checkpoint.pt"]


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_open_decoded_truncated_streams_are_corrupt_at_every_cut(name: str, tmp_path: Path) -> None:
    blob = _compress(name, TORCH_BYTES + PAYLOAD)
    path = tmp_path / "cut"
    # Every cut in the last 40 bytes (trailers, checksums, end marks) and 40 spread over the body;
    # each keeps enough of the header that the file is still recognised as this codec.
    cuts = sorted({*range(len(blob) - 40, len(blob)), *range(40, len(blob), max(1, len(blob) // 40))})
    for cut in cuts:
        path.write_bytes(blob[:cut])
        with pytest.raises(CorruptCheckpointError, match=rf"{path} is corrupt: its {name} stream") as info:
            with open_decoded(path) as decoded:
                decoded.stream.read()
        assert info.value.__cause__ is not None, cut


@pytest.mark.parametrize("name", ["gzip", "bz2", "xz", "zstd", "lz4"])
def test_open_decoded_flipped_bits_in_checksummed_streams_are_corrupt(name: str, tmp_path: Path) -> None:
    raw = io.BytesIO()
    with get_codec(EXTENSION_OF[name]).open_writer(raw) as writer:
        writer.write(TORCH_BYTES + PAYLOAD)
    good = raw.getvalue()
    path = tmp_path / "flipped"
    # Past the stream header (whose metadata fields, such as gzip's mtime, no checksum covers) and
    # before bz2's final byte (whose low bits are padding).
    for offset in range(24, len(good) - 1, max(1, len(good) // 25)):
        for bit in (0x01, 0x80):
            blob = bytearray(good)
            blob[offset] ^= bit
            path.write_bytes(bytes(blob))
            with pytest.raises(CorruptCheckpointError, match=str(path)):
                with open_decoded(path) as decoded:
                    decoded.stream.read()


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


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_open_decoded_unknown_format_inside_a_codec(name: str, tmp_path: Path) -> None:
    path = tmp_path / "x.pt.gz"
    path.write_bytes(_compress(name, b"just some text, not a checkpoint"))
    with pytest.raises(CorruptCheckpointError, match=rf"its {name} stream holds an unknown format \(first bytes b'just"):
        with open_decoded(path):
            pass


# --- the zstd frame check --------------------------------------------------------------------


def _frame(data: bytes, **kwargs: object) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True, **kwargs).compress(data)


def test_check_zstd_frames_returns_declared_sizes_and_accepts_skippable_frames() -> None:
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"12345"
    blob = _frame(PAYLOAD) + skippable + _frame(b"tail")
    assert check_zstd_frames(io.BytesIO(blob)) == len(PAYLOAD) + 4
    assert get_codec("zst").open_reader(io.BytesIO(blob)).read() == PAYLOAD + b"tail"


def test_check_zstd_frames_refuses_a_cut_exactly_at_the_checksum() -> None:
    blob = _frame(PAYLOAD)
    # zstandard's own reader accepts this stream as complete...
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob[:-4]), read_across_frames=True)
    assert reader.read() == PAYLOAD
    # ...the frame walk does not.
    with pytest.raises(EOFError, match="frame checksum"):
        check_zstd_frames(io.BytesIO(blob[:-4]))


@pytest.mark.parametrize(
    ("tail", "error", "message"),
    [
        (b"garbage!", ValueError, "not a zstd frame"),
        (b"\x28\xb5\x2f\xfd\x28", ValueError, "reserved bit"),
        (b"\x28\xb5", EOFError, "frame magic"),
    ],
)
def test_check_zstd_frames_refuses_what_follows_a_frame(tail: bytes, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        check_zstd_frames(io.BytesIO(_frame(b"x" * 100) + tail))


def test_zstd_decoded_length_must_match_the_declared_content_size(tmp_path: Path) -> None:
    blob = bytearray(_frame(b"y" * 1000))
    params = zstandard.get_frame_parameters(bytes(blob))
    assert params.content_size == 1000
    # The single-segment header stores the size in 2 bytes (minus 256) after the descriptor.
    assert blob[4] & 0x20 and blob[4] >> 6 == 1
    blob[5:7] = (999 - 256).to_bytes(2, "little")
    path = tmp_path / "x.pt.zst"
    path.write_bytes(bytes(blob))
    with pytest.raises(CorruptCheckpointError, match="zstd stream does not decode"):
        with open_decoded(path) as decoded:
            decoded.stream.read()


def test_checked_reader_counts_bytes() -> None:
    assert CheckedReader(io.BytesIO(b"abc"), 3).read() == b"abc"
    with pytest.raises(EOFError, match="decoded 2 bytes where the headers declare 3"):
        CheckedReader(io.BytesIO(b"ab"), 3).read()
    with pytest.raises(EOFError, match="more than the 3 bytes"):
        CheckedReader(io.BytesIO(b"abcd"), 3).read()
