"""Tests for ckpt_callbacks.serialization: real torch state dicts, real files in tmp_path, real codecs,
real tar bundles and safetensors files."""

from __future__ import annotations

import collections
import datetime
import io
import os
import tarfile
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_callbacks.codecs import CODECS, checkpoint_format
from ckpt_callbacks.decoding import open_decoded
from ckpt_callbacks.errors import CheckpointNotFoundError, ConfigurationError, CorruptCheckpointError
from ckpt_callbacks.serialization import (
    SAFE_GLOBALS,
    SCHEMA_VERSION,
    apply_ignore_keys,
    check_ignore_keys,
    read_state,
    verify_file,
    write_state,
)

CODEC_NAMES = [f"ep1-ba4-rank0.pt.{ext}" for ext in CODECS]
TAR_NAMES = ["x.tar", "x.pt.tar", "x.tgz", *(f"x.tar.{ext}" for ext in CODECS)]
NAMES = ["ep1-ba4-rank0.pt", "ep1-ba4-rank0", *CODEC_NAMES, *TAR_NAMES]


def _checkpoint() -> dict[str, Any]:
    """A full checkpoint as DESIGN.md 4b lays it out: a trained model, Adam state, timestamps, RNG."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 8)).pow(2).mean().backward()
        optimizer.step()
    return {
        "state": {
            "model": model.state_dict(),
            "optimizers": [optimizer.state_dict()],
            "timestamp": {"batch": 4, "epoch": 1, "total_wct": datetime.timedelta(seconds=12.5)},
            "run_name": "run",
            "metadata": {"schema_version": SCHEMA_VERSION, "torch_version": torch.__version__, "world_size": 1},
        },
        "rng": [{"torch": torch.get_rng_state()}],
    }


def _assert_same(a: Any, b: Any) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def _save(path: Path, obj: Any = None, level: int | None = None) -> Path:
    with open(path, "wb") as raw:
        write_state(_checkpoint() if obj is None else obj, raw, checkpoint_format(path.name), level)
    return path


def _weights() -> dict[str, Any]:
    """A weights-only checkpoint, the layout a .safetensors file takes."""
    checkpoint = _checkpoint()
    return {"state": {"model": checkpoint["state"]["model"], "metadata": checkpoint["state"]["metadata"]}}


def test_constants() -> None:
    assert SCHEMA_VERSION == 1
    assert SAFE_GLOBALS == (datetime.timedelta, torch.torch_version.TorchVersion)


# --- write and read --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_through_every_format(name: str, tmp_path: Path) -> None:
    path = _save(tmp_path / name)
    loaded = read_state(path)
    _assert_same(loaded, _checkpoint())
    assert isinstance(loaded["state"]["metadata"]["torch_version"], torch.torch_version.TorchVersion)
    verify_file(path)


@pytest.mark.parametrize("ext", sorted(CODECS))
def test_compressed_files_shrink_zero_tensors(ext: str, tmp_path: Path) -> None:
    zeros = {"state": {"model": {"w": torch.zeros(200_000)}}}
    plain = _save(tmp_path / "x.pt", zeros)
    packed = _save(tmp_path / f"x.pt.{ext}", zeros, level=1 if ext != "lz4" else 0)
    assert packed.stat().st_size < plain.stat().st_size / 10
    assert torch.equal(read_state(packed)["state"]["model"]["w"], torch.zeros(200_000))


@pytest.mark.parametrize("name", ["x.pt", "x.pt.gz", "x.pt.zst", "x.tar", "x.tar.zst"])
def test_write_state_streams_into_a_pipe(name: str, tmp_path: Path) -> None:
    # A pipe cannot seek: torch.save and the codec writers must stream front to back.
    read_fd, write_fd = os.pipe()
    received = bytearray()

    def drain() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            while chunk := pipe.read(65_536):
                received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    with os.fdopen(write_fd, "wb") as pipe:
        assert not pipe.seekable()
        write_state(_checkpoint(), pipe, checkpoint_format(name))
    reader.join(timeout=30)
    assert not reader.is_alive()
    fmt = checkpoint_format(name)
    if fmt.codec is not None:
        assert bytes(received).startswith(fmt.codec.magic)
    elif fmt.container == "tar":
        assert bytes(received)[257:262] == b"ustar"
    else:
        assert bytes(received).startswith(b"PK\x03\x04")
    path = tmp_path / name
    path.write_bytes(bytes(received))
    _assert_same(read_state(path), _checkpoint())


def test_read_state_map_location(tmp_path: Path) -> None:
    path = _save(tmp_path / "x.pt.gz")
    loaded = read_state(path, map_location=torch.device("cpu"))
    assert loaded["state"]["model"]["0.weight"].device.type == "cpu"


def test_write_state_refuses_level_for_plain_and_non_dicts(tmp_path: Path) -> None:
    with open(tmp_path / "x.pt", "wb") as raw:
        with pytest.raises(ConfigurationError, match="'compression_level' must be None for an uncompressed format"):
            write_state({}, raw, checkpoint_format("x.pt"), 3)
        with pytest.raises(ConfigurationError, match="'obj' must be a checkpoint dict"):
            write_state([1, 2], raw, checkpoint_format("x.pt"))  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="'compression_level' must be an int from 0 to 9"):
            write_state({}, raw, checkpoint_format("x.pt.gz"), 11)


def test_concurrent_reads_keep_the_allowlist(tmp_path: Path) -> None:
    path = _save(tmp_path / "x.pt")
    errors: list[BaseException] = []

    def load() -> None:
        try:
            for _ in range(5):
                assert read_state(path)["state"]["timestamp"]["total_wct"] == datetime.timedelta(seconds=12.5)
        except BaseException as e:  # collected for the main thread
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []


# --- torch's CRC-32 switch ----------------------------------------------------------------------


def _zip_crcs(path: Path) -> list[int]:
    """The CRC-32 each zip member of the torch.save payload inside ``path`` records."""
    with open_decoded(path) as decoded:
        if decoded.kind == "tar":
            with tarfile.open(fileobj=decoded.stream, mode="r|") as tar:
                member = next(iter(tar))
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
        else:
            data = decoded.stream.read()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [info.CRC for info in archive.infolist() if info.file_size]


@pytest.mark.parametrize("name", ["x.pt", *CODEC_NAMES, *TAR_NAMES])
def test_crc32s_are_written_only_where_no_codec_checksum_covers_them(name: str, tmp_path: Path) -> None:
    path = _save(tmp_path / name)
    fmt = checkpoint_format(name)
    crcs = _zip_crcs(path)
    if fmt.checksummed:
        assert set(crcs) == {0}
    else:  # plain .pt, plain .tar and LZMA-alone keep them
        assert 0 not in crcs
    assert torch.serialization.get_crc32_options() is True
    verify_file(path)


def test_the_crc32_switch_is_restored_to_what_the_user_chose(tmp_path: Path) -> None:
    torch.serialization.set_crc32_options(False)
    try:
        plain = _save(tmp_path / "x.pt")
        assert torch.serialization.get_crc32_options() is False
        _save(tmp_path / "x.pt.zst")
        assert torch.serialization.get_crc32_options() is False
    finally:
        torch.serialization.set_crc32_options(True)
    assert 0 not in _zip_crcs(plain)  # a plain .pt keeps its CRCs even then


def test_concurrent_saves_keep_the_crc32s_of_plain_files(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def save(name: str) -> None:
        try:
            for round_ in range(6):
                _save(tmp_path / f"{round_}-{name}")
        except BaseException as e:  # collected for the main thread
            errors.append(e)

    threads = [threading.Thread(target=save, args=(name,)) for name in ("x.pt", "x.pt.zst", "x.tar.gz", "x.tar")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and not any(thread.is_alive() for thread in threads)
    for round_ in range(6):
        assert 0 not in _zip_crcs(tmp_path / f"{round_}-x.pt")
        assert 0 not in _zip_crcs(tmp_path / f"{round_}-x.tar")
        assert set(_zip_crcs(tmp_path / f"{round_}-x.pt.zst")) == {0}


def test_verify_file_accepts_a_plain_file_decompressed_from_a_checksummed_one(tmp_path: Path) -> None:
    # What `zstd -d x.pt.zst` gives: a torch.save zip whose members record no CRC.
    packed = _save(tmp_path / "x.pt.zst")
    with open_decoded(packed) as decoded:
        (tmp_path / "x.pt").write_bytes(decoded.stream.read())
    verify_file(tmp_path / "x.pt")
    _assert_same(read_state(tmp_path / "x.pt"), _checkpoint())


# --- loading: temp files and memory maps ---------------------------------------------------------


@pytest.mark.parametrize("name", ["x.pt", "x.pt.zst", "x.tar.gz", "x.tar"])
def test_loaded_tensors_outlive_the_file_and_no_temp_file_is_left(name: str, tmp_path: Path) -> None:
    path = _save(tmp_path / name)
    loaded = read_state(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    path.unlink()  # memory-mapped tensors keep their pages after the file is gone
    _assert_same(loaded, _checkpoint())


def test_a_large_tar_member_is_staged_on_disk_and_cleaned_up(tmp_path: Path) -> None:
    # Above 64 MiB the member is staged in an unnamed temp file in the destination folder.
    obj = {"state": {"model": {"w": torch.zeros(17 * 2**20)}}}
    path = _save(tmp_path / "big.tar.zst", obj)
    assert path.stat().st_size < 2**20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.tar.zst"]
    assert torch.equal(read_state(path)["state"]["model"]["w"], obj["state"]["model"]["w"])


def test_tar_level_is_checked_before_anything_is_serialized(tmp_path: Path) -> None:
    with open(tmp_path / "x.tar.gz", "wb") as raw:
        with pytest.raises(ConfigurationError, match="'compression_level' must be an int from 0 to 9"):
            write_state({"state": {}}, raw, checkpoint_format("x.tar.gz"), 11)
        assert raw.tell() == 0
        with pytest.raises(ConfigurationError, match="'compression_level' must be None"):
            write_state({"state": {}}, raw, checkpoint_format("x.tar"), 1)


# --- tar bundles and safetensors -----------------------------------------------------------------


@pytest.mark.parametrize(("mode", "name"), [("w:xz", "composer.tar.lzma"), ("w", "composer.tar"), ("w:gz", "x.bin")])
def test_composer_tar_checkpoints_load(mode: str, name: str, tmp_path: Path) -> None:
    # Composer writes a root folder entry and composer_states.pt, and `.tar.lzma` as an xz container.
    staging = tmp_path / "staging"
    staging.mkdir()
    torch.save(_checkpoint(), staging / "composer_states.pt")
    with tarfile.open(tmp_path / name, mode) as tar:
        tar.add(staging, arcname="")
    _assert_same(read_state(tmp_path / name), _checkpoint())
    verify_file(tmp_path / name)


def test_a_tar_without_a_checkpoint_member_is_corrupt(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with tarfile.open(tmp_path / "x.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "config.json", arcname="config.json")
    for check in (read_state, verify_file):
        with pytest.raises(CorruptCheckpointError, match=r"a tar without a checkpoint member .*'config.json'"):
            check(tmp_path / "x.tar.gz")


def test_safetensors_round_trip_keeps_metadata_and_order(tmp_path: Path) -> None:
    obj = _weights()
    path = _save(tmp_path / "model.safetensors", obj)
    loaded = read_state(path)
    assert list(loaded["state"]) == ["model", "metadata"]
    assert list(loaded["state"]["model"]) == list(obj["state"]["model"])
    for key, tensor in obj["state"]["model"].items():
        assert torch.equal(loaded["state"]["model"][key], tensor)
    assert loaded["state"]["metadata"] == {**obj["state"]["metadata"], "torch_version": str(torch.__version__)}
    verify_file(path)


@pytest.mark.parametrize(
    ("obj", "shown"),
    [
        (lambda: _checkpoint(), "keys ['rng', 'optimizers', 'run_name', 'timestamp']"),
        (lambda: {"state": {"model": {"w": torch.ones(1)}, "step": 3}}, "keys ['step']"),
        (lambda: {"state": [1]}, "list"),
    ],
)
def test_safetensors_refuses_anything_but_weights(obj: Any, shown: str, tmp_path: Path) -> None:
    with open(tmp_path / "x.safetensors", "wb") as raw:
        with pytest.raises(ConfigurationError, match=r"'obj' must be a weights-only checkpoint") as info:
            write_state(obj(), raw, checkpoint_format("x.safetensors"))
    assert shown in str(info.value)


# --- damaged files ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x.pt", *CODEC_NAMES, *TAR_NAMES, "x.safetensors"])
def test_truncated_files_are_corrupt_at_many_cuts(name: str, tmp_path: Path) -> None:
    obj = _weights() if name.endswith(".safetensors") else None
    good = _save(tmp_path / f"good-{name}", obj).read_bytes()
    path = tmp_path / name
    cuts = {*range(len(good) - 24, len(good)), *range(4, len(good), max(1, len(good) // 16))}
    if name in ("x.tar", "x.pt.tar"):
        # An uncompressed tar cut after its member's last byte (in the padding or the end-of-archive
        # blocks) still holds the whole, CRC-checked member, so it loads.
        cuts = {cut for cut in cuts if cut < len(good) - 2 * 1024} | {len(good) - 2048 - 1}
    for cut in sorted(cuts):
        path.write_bytes(good[:cut])
        for check in (read_state, verify_file):
            with pytest.raises(CorruptCheckpointError, match=str(path)):
                check(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"good-{name}", name])  # no temp files left


@pytest.mark.parametrize("name", ["x.pt", *CODEC_NAMES, *TAR_NAMES, "x.safetensors"])
def test_single_bit_flips_never_load_silently_wrong(name: str, tmp_path: Path) -> None:
    obj = _weights() if name.endswith(".safetensors") else _checkpoint()
    good = _save(tmp_path / f"good-{name}", obj).read_bytes()
    path = tmp_path / name
    # Flips spread over the file: verify_file must refuse the file, or else the file must still
    # hold exactly what was saved (a flip in a header's time field or in padding; or in an lz4
    # match offset inside a run of zeros, which decodes to the same bytes).
    caught = 0
    offsets = range(64, len(good) - 1, max(1, len(good) // 24))
    for offset in offsets:
        blob = bytearray(good)
        blob[offset] ^= 0x08
        path.write_bytes(bytes(blob))
        try:
            verify_file(path)
        except CorruptCheckpointError as e:
            assert str(path) in str(e)
            caught += 1
        else:
            loaded = read_state(path)
            if name.endswith(".safetensors"):  # tensors come back as a plain dict in file order
                loaded["state"]["model"] = collections.OrderedDict(
                    (key, loaded["state"]["model"][key]) for key in obj["state"]["model"]
                )
            _assert_same(loaded, obj)
    assert caught >= len(offsets) * 3 // 4


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is not a checkpoint: unknown format"),
        (os.urandom(4096), "is not a checkpoint: unknown format"),
        (b"PK\x03\x04" + b"\x00" * 500, "is corrupt"),
    ],
    ids=["empty", "garbage", "zip-magic-then-garbage"],
)
def test_garbage_and_empty_files_are_corrupt(content: bytes, message: str, tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    for check in (read_state, verify_file):
        with pytest.raises(CorruptCheckpointError, match=message):
            check(path)


def test_missing_file(tmp_path: Path) -> None:
    for check in (read_state, verify_file):
        with pytest.raises(CheckpointNotFoundError):
            check(tmp_path / "nope.pt")


def test_a_non_dict_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(CorruptCheckpointError, match="holds a list, not a dict"):
        read_state(path)


def test_flipped_bit_in_a_tensor_is_caught_by_verify_file_only(tmp_path: Path) -> None:
    marker = torch.full((256,), 1.2345, dtype=torch.float32)
    path = tmp_path / "x.pt"
    torch.save({"state": {"model": {"w": marker}}}, path)
    blob = bytearray(path.read_bytes())
    offset = blob.find(marker.numpy().tobytes())
    assert offset > 0
    blob[offset + 100] ^= 0x01
    path.write_bytes(bytes(blob))

    # torch.load never checks the CRCs, so the damage loads silently...
    flipped = torch.load(path, weights_only=True)["state"]["model"]["w"]
    assert not torch.equal(flipped, marker)
    assert not torch.equal(read_state(path)["state"]["model"]["w"], marker)
    # ...and verify_file names the damaged member.
    member = next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("/data/0"))
    with pytest.raises(CorruptCheckpointError, match=rf"zip member '{member}' failed its check \(Bad CRC-32"):
        verify_file(path)


def test_flipped_bit_in_an_lzma_alone_file_is_caught_by_verify_file(tmp_path: Path) -> None:
    # LZMA-alone has no checksum of its own; the zip CRCs inside still catch the damage.
    path = _save(tmp_path / "x.pt.lzma", {"state": {"model": {"w": torch.randn(4096)}}})
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x04
    path.write_bytes(bytes(blob))
    with pytest.raises(CorruptCheckpointError, match=str(path)):
        verify_file(path)


# --- a checkpoint never runs code --------------------------------------------------------------

CALLS: list[str] = []


def _record_call(tag: str) -> str:
    CALLS.append(tag)
    return tag


class Payload:
    """A custom class whose unpickling would run code."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_record_call, ("ran",))


class OrderedSubclass(collections.OrderedDict):
    """An OrderedDict subclass: not the OrderedDict that weights_only allows."""


@pytest.mark.parametrize(
    ("obj", "global_name"),
    [
        ({"state": {"model": {}, "extra": Payload()}}, "_record_call"),
        ({"state": {"model": OrderedSubclass(w=torch.ones(2))}}, "OrderedSubclass"),
    ],
    ids=["reduce-callable", "ordereddict-subclass"],
)
@pytest.mark.parametrize("force_unsafe_env", [False, True])
def test_objects_outside_the_allowlist_are_refused(
    obj: dict, global_name: str, force_unsafe_env: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if force_unsafe_env:
        # This variable flips torch.load's default to weights_only=False; ours is explicit.
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = tmp_path / "x.pt.gz"
    _save(path, obj)
    CALLS.clear()
    for check in (read_state, verify_file):
        with pytest.raises(CorruptCheckpointError) as info:
            check(path)
        message = str(info.value)
        assert str(path) in message
        assert "outside the allowlist" in message and "never runs code" in message
        assert global_name in message
    assert CALLS == []


# --- ignore_keys ---------------------------------------------------------------------------------


def _tree() -> dict[str, Any]:
    return {
        "state": {
            "model": {
                "layer1": {"weights": 1, "bias": 2},
                "layer2": {"weights": 3, "bias": 4},
                "layer1.weight": 5,
                "head": {"weights": 6},
            },
            "optimizers": [{"state": {0: {"step": 1}, 1: {"step": 2}}, "param_groups": [{"lr": 0.1}]}],
            "list_element": ["a", "b"],
            "timestamp": {"batch": 3},
        },
        "rng": [{"torch": 0}],
    }


@pytest.mark.parametrize(
    ("globs", "change"),
    [
        (["state/model/*"], lambda t: t["state"].update(model={})),
        (["state/model"], lambda t: t["state"].pop("model")),
        (
            ["state/model/layer*"],
            lambda t: t["state"].update(model={"head": {"weights": 6}}),
        ),
        (
            ["state/model/*/weights"],
            lambda t: [t["state"]["model"][k].pop("weights") for k in ("layer1", "layer2", "head")],
        ),
        (["state/*/weights"], lambda t: [t["state"]["model"][k].pop("weights") for k in ("layer1", "layer2", "head")]),
        (["rng"], lambda t: t.pop("rng")),
        (["state/list_element/0", "state/list_element/1"], lambda t: t["state"].update(list_element=[])),
        (["state/list_element/0"], lambda t: t["state"].update(list_element=["b"])),
        (["state/list_element/*"], lambda t: t["state"].update(list_element=[])),
        (["state/optimizers/0/state/1"], lambda t: t["state"]["optimizers"][0]["state"].pop(1)),
        (["state/optimizers"], lambda t: t["state"].pop("optimizers")),
        (["state/model/layer1/weights", "rng", "state/timestamp"], lambda t: (
            t["state"]["model"]["layer1"].pop("weights"), t.pop("rng"), t["state"].pop("timestamp"))),
        (["state/model/layer1", "state/model/layer1/*"], lambda t: t["state"]["model"].pop("layer1")),
        (["*"], lambda t: (t.clear(), t.update(state={}))),
        (["state"], lambda t: t.update(state={})),
    ],
)
def test_apply_ignore_keys_table(globs: list[str], change: Any, recwarn: pytest.WarningsRecorder) -> None:
    tree, expected = _tree(), _tree()
    change(expected)
    apply_ignore_keys(tree, globs)
    assert tree == expected
    assert [w for w in recwarn if issubclass(w.category, UserWarning)] == []


def test_apply_ignore_keys_warns_for_each_glob_matching_nothing() -> None:
    tree = _tree()
    with pytest.warns(UserWarning) as record:
        apply_ignore_keys(tree, ["state/nothing/*", "rng", "State/model"])
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert "'state/nothing/*'" in messages[0] and "matched nothing" in messages[0]
    assert "'State/model'" in messages[1]  # case-sensitive on every platform
    assert "rng" not in tree and "model" in tree["state"]


def test_apply_ignore_keys_recreates_state_and_handles_nothing_to_do() -> None:
    bare: dict[str, Any] = {"rng": [1]}
    apply_ignore_keys(bare, ["rng"])
    assert bare == {"state": {}}
    for nothing in (None, [], ()):
        tree = _tree()
        apply_ignore_keys(tree, nothing)
        assert tree == _tree()


def test_apply_ignore_keys_callable_mutates_in_place() -> None:
    tree = _tree()
    apply_ignore_keys(tree, lambda state: state["state"].pop("optimizers"))
    expected = _tree()
    expected["state"].pop("optimizers")
    assert tree == expected


def test_apply_ignore_keys_on_a_real_checkpoint() -> None:
    checkpoint = _checkpoint()
    apply_ignore_keys(checkpoint, ["state/optimizers/*/state", "state/model/2.*", "rng"])
    assert "rng" not in checkpoint
    assert list(checkpoint["state"]["model"]) == ["0.weight", "0.bias"]
    assert list(checkpoint["state"]["optimizers"][0]) == ["param_groups"]


# --- check_ignore_keys ---------------------------------------------------------------------------


def test_check_ignore_keys_accepts_and_normalises() -> None:
    def drop(state: dict) -> None:
        state.pop("rng", None)

    assert check_ignore_keys(None) is None
    assert check_ignore_keys(["state/model/*", "rng"]) == ("state/model/*", "rng")
    assert check_ignore_keys(("rng",)) == ("rng",)
    assert check_ignore_keys([]) == ()
    assert check_ignore_keys(drop) is drop


def test_check_ignore_keys_refuses_a_bare_string() -> None:
    with pytest.raises(ConfigurationError) as info:
        check_ignore_keys("state/model/*", argument="load_ignore_keys")
    message = str(info.value)
    assert message.startswith("'load_ignore_keys' must be a list of globs such as ['state/model/*']")
    assert "(got 'state/model/*')" in message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["rng", ""], r"'ignore_keys\[1\]' must be a non-empty glob string .*\(got ''\)"),
        (["rng", 3], r"'ignore_keys\[1\]' must be a non-empty glob string .*\(got 3\)"),
        ({"rng"}, r"'ignore_keys' must be None, a list of globs .* or a callable.*\(got \{'rng'\}\)"),
        (3, r"'ignore_keys' must be None, a list of globs .*\(got 3\)"),
        (b"rng", r"'ignore_keys' must be None, a list of globs .*\(got b'rng'\)"),
    ],
)
def test_check_ignore_keys_rejections(value: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        check_ignore_keys(value)
    with pytest.raises(ConfigurationError, match=message):
        apply_ignore_keys(_tree(), value)  # type: ignore[arg-type]

