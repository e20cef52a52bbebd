"""Tests for ckpt_callbacks.safetensors_format: real files, checked against the safetensors package
(the reference implementation) in both directions."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest
import torch

from ckpt_callbacks.codecs import sniff
from ckpt_callbacks.errors import CheckpointNotFoundError, ConfigurationError, CorruptCheckpointError
from ckpt_callbacks.safetensors_format import CRC_KEY, DTYPES, read_safetensors, write_safetensors

safetensors_torch = pytest.importorskip("safetensors.torch")


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    tensors = {
        "a.bool": torch.tensor([True, False, True]),  # 3 bytes: would misalign what follows it
        "b.u8": torch.arange(5, dtype=torch.uint8),
        "c.f32": torch.randn(7, 3),
        "d.bf16": torch.randn(4, 4).to(torch.bfloat16),
        "e.f16": torch.randn(3).to(torch.float16),
        "f.i64": torch.tensor([-(2**40), 7]),
        "g.scalar": torch.tensor(3.5, dtype=torch.float64),
        "h.empty": torch.empty(0, 4),
        "i.f8": torch.randn(6).to(torch.float8_e4m3fn),
        "j.transposed": torch.randn(3, 5).t(),  # not contiguous
    }
    for name, dtype in DTYPES.items():
        tensors[f"z.{name}"] = torch.ones(2, dtype=dtype)
    return tensors


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    with open(path, "wb") as raw:
        write_safetensors(tensors, raw, metadata)
    return path


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_round_trip_every_dtype_and_keep_the_callers_order(tmp_path: Path) -> None:
    tensors = _tensors()
    path = _write(tmp_path / "x.safetensors", tensors, {"format": "pt", "note": "hi"})
    loaded, metadata = read_safetensors(path)
    assert list(loaded) == list(tensors)
    for name, tensor in tensors.items():
        assert _equal(loaded[name], tensor), name
    assert metadata["format"] == "pt" and metadata["note"] == "hi" and len(metadata[CRC_KEY]) == 8
    assert sniff(path.read_bytes()[:512]) == "safetensors"


def test_every_tensor_is_aligned_to_its_element_size(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.safetensors", _tensors())
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    assert length % 8 == 0
    header = json.loads(blob[8 : 8 + length])
    for name, entry in header.items():
        if name != "__metadata__":
            size = torch.empty((), dtype=DTYPES[entry["dtype"]]).element_size()
            assert entry["data_offsets"][0] % size == 0, name


def test_the_reference_library_reads_ours(tmp_path: Path) -> None:
    tensors = _tensors()
    path = _write(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    loaded = safetensors_torch.load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert _equal(loaded[name], tensor), name
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format"] == "pt"


def test_we_read_the_reference_librarys_files(tmp_path: Path) -> None:
    tensors = {k: v.contiguous() for k, v in _tensors().items()}
    path = tmp_path / "hf.safetensors"
    safetensors_torch.save_file(tensors, str(path), metadata={"format": "pt"})
    loaded, metadata = read_safetensors(path)
    assert metadata == {"format": "pt"}  # no CRC of ours: read without that check
    for name, tensor in tensors.items():
        assert _equal(loaded[name], tensor), name


def test_tied_tensors_are_written_once_per_name(tmp_path: Path) -> None:
    shared = torch.randn(4)
    path = _write(tmp_path / "x.safetensors", {"encoder": shared, "decoder": shared})
    loaded, _ = read_safetensors(path)
    assert torch.equal(loaded["encoder"], shared) and torch.equal(loaded["decoder"], shared)
    loaded["encoder"].add_(1)
    assert not torch.equal(loaded["encoder"], loaded["decoder"])


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"w": 3}, r"'tensors' must be a mapping of str names to tensors .*\(got \"'w': int\"\)"),
        ({1: torch.ones(1)}, r"'tensors' must be a mapping of str names to tensors"),
        ({"c": torch.ones(2, dtype=torch.complex64)}, r"'tensors\[c\]' must be dense tensors of dtype float64, .*complex64"),
        ({"s": torch.ones(2).to_sparse()}, r"'tensors\[s\]' must be dense tensors .*sparse_coo"),
    ],
)
def test_write_refuses_what_safetensors_cannot_hold(tensors: dict, message: str) -> None:
    raw = io.BytesIO()
    with pytest.raises(ConfigurationError, match=message):
        write_safetensors(tensors, raw)
    assert raw.getvalue() == b""


def _rewrite_header(path: Path, change: object) -> None:
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    change(header)  # type: ignore[operator]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + blob[8 + length :])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h: h["w"].update(dtype="F99"), "bad safetensors entry for 'w'"),
        (lambda h: h["w"].update(shape=[3]), "entry 'w' does not fit its bytes"),
        (lambda h: h["w"].update(data_offsets=[0, 8]), "entry 'w' does not fit its bytes"),
        (lambda h: h["w"].update(data_offsets=[0, 16]), "gap or overlap"),
        (lambda h: h.pop("w"), "data is 32 bytes, tensors cover 16"),
        (lambda h: h["__metadata__"].update(note="changed"), "fails its CRC-32 check"),
    ],
)
def test_malformed_headers_are_corrupt(change: object, message: str, tmp_path: Path) -> None:
    path = _write(tmp_path / "x.safetensors", {"v": torch.ones(4), "w": torch.zeros(4)}, {"note": "n"})
    _rewrite_header(path, change)
    with pytest.raises(CorruptCheckpointError, match=message):
        read_safetensors(path)


def test_damaged_files_are_corrupt(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.safetensors", {"w": torch.randn(64)})
    good = path.read_bytes()
    path.write_bytes(good[:-1])
    with pytest.raises(CorruptCheckpointError, match="entry .w. does not fit its bytes"):
        read_safetensors(path)
    flipped = bytearray(good)
    flipped[-10] ^= 0x01
    path.write_bytes(bytes(flipped))
    with pytest.raises(CorruptCheckpointError, match=f"{path} is corrupt: it fails its CRC-32 check"):
        read_safetensors(path)
    path.write_bytes(struct.pack("<Q", 2**30) + b"{}")
    with pytest.raises(CorruptCheckpointError, match="header length 1073741824 exceeds the file"):
        read_safetensors(path)
    path.write_bytes(struct.pack("<Q", 6) + b"[1, 2]")
    with pytest.raises(CorruptCheckpointError, match="unreadable safetensors header"):
        read_safetensors(path)
    with pytest.raises(CheckpointNotFoundError):
        read_safetensors(tmp_path / "missing.safetensors")
