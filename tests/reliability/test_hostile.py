"""Hostile input: checkpoints that would run code, tars that would write outside, templates that would
escape their folder, credentials that would leak, and a table of bad configurations.

Nothing here trusts a file: a pickle calling ``os.system`` is refused by the safe loader and never
runs (a marker file proves it), whatever the container (plain, zstd, tar) and whichever door it
comes through (load, verify, autoresume). Tar members with ``..``, absolute names or links outside are
refused before anything is written. A known secret in ``storage_options`` must appear in no log line,
warning, exception (causes included) or repr, across failures.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
import tarfile
import traceback
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from _harness import one_thread
from train_victim import VictimConfig, make_saver, make_trainer

from ckpt_callbacks import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointSaver,
    ConfigurationError,
    CorruptCheckpointError,
    InvalidTemplateError,
    KeepLast,
    Trainer,
    UnsupportedFormatError,
    load_checkpoint,
)
from ckpt_callbacks.archive import extract
from ckpt_callbacks.codecs import checkpoint_format
from ckpt_callbacks.serialization import verify_file


class RunsCode:
    """Unpickling this runs ``touch <marker>``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious(folder: Path, name: str, marker: Path) -> Path:
    """A checkpoint ``name`` (its extension picks the container) whose pickle calls os.system."""
    payload = io.BytesIO()
    torch.save({"state": {"model": {"w": torch.zeros(2)}, "metadata": {}}, "evil": RunsCode(marker)}, payload)
    path = folder / name
    fmt = checkpoint_format(name)
    with open(path, "wb") as out:
        if fmt.container == "tar":
            with fmt.codec.open_writer(out, None) if fmt.codec else _identity(out) as raw:
                with tarfile.open(fileobj=raw, mode="w|") as tar:
                    info = tarfile.TarInfo("checkpoint.pt")
                    info.size = payload.getbuffer().nbytes
                    tar.addfile(info, io.BytesIO(payload.getvalue()))
        elif fmt.codec is not None:
            with fmt.codec.open_writer(out, None) as writer:
                writer.write(payload.getvalue())
        else:
            out.write(payload.getvalue())
    return path


class _identity:
    def __init__(self, raw) -> None:
        self.raw = raw

    def __enter__(self):
        return self.raw

    def __exit__(self, *exc_info: object) -> None:
        pass


@pytest.mark.parametrize("name", ["ba9.pt", "ba9.pt.zst", "ba9.tar.zst", "ba9.pt.gz"])
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    path = _malicious(tmp_path, name, marker)
    config = VictimConfig(folder=str(tmp_path / "ckpt"), width=16)
    state = make_trainer(config, saver=make_saver(config)).state
    for door in (lambda: load_checkpoint(path, state), lambda: verify_file(path)):
        with pytest.raises(CorruptCheckpointError, match="allowlist") as raised:
            door()
        assert str(path) in str(raised.value) and "posix.system" in str(raised.value)
    assert not marker.exists()


def test_autoresume_never_unpickles_a_planted_checkpoint(tmp_path: Path) -> None:
    """A file planted under a name the saver's template matches is read safely, not adopted, and (being
    later than the run) stops the run under ``overwrite=False`` instead of being resumed."""
    marker = tmp_path / "pwned"
    config = VictimConfig(folder=str(tmp_path / "ckpt"), max_batches=3, width=16)
    with one_thread():
        make_trainer(config, saver=make_saver(config)).fit()
    _malicious(Path(config.folder), "ba9.pt", marker)
    longer = replace(config, max_batches=4)
    with pytest.raises(CheckpointExistsError, match="ba9.pt"), one_thread():
        make_trainer(longer, saver=make_saver(longer)).fit()
    assert not marker.exists()


def _tar(path: Path, members: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w") as tar:
        for member in members:
            data = b"x" * member.size if member.isreg() else None
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = 4 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (_member("../escaped.txt"), "'..'"),
        (_member("inner/../../escaped.txt"), "'..'"),
        (_member("/tmp/escaped-absolute.txt"), "absolute"),
        (_member("link", tarfile.SYMTYPE, "../../etc/passwd"), "outside"),
        (_member("link", tarfile.SYMTYPE, "/etc/passwd"), "outside"),
        (_member("hard", tarfile.LNKTYPE, "../outside.txt"), "outside"),
        (_member("device", tarfile.CHRTYPE), "device"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-up", "symlink-absolute", "hardlink-up", "device"],
)
def test_a_tar_writing_outside_is_refused_whole(tmp_path: Path, member: tarfile.TarInfo, reason: str) -> None:
    bundle = _tar(tmp_path / "bundle.tar", [_member("config.json"), member])
    dest = tmp_path / "out" / "inside"
    with pytest.raises(CheckpointError, match=reason) as raised:
        extract(bundle, dest)
    assert str(bundle) in str(raised.value) and member.name in str(raised.value)
    assert not dest.exists()  # refused before anything was written
    assert not (tmp_path / "out" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()


def test_a_tar_checkpoint_with_an_escaping_member_does_not_load(tmp_path: Path) -> None:
    bundle = _tar(tmp_path / "ba1.tar", [_member("../checkpoint.pt")])
    config = VictimConfig(folder=str(tmp_path / "ckpt"), width=16)
    state = make_trainer(config, saver=make_saver(config)).state
    with pytest.raises(CorruptCheckpointError, match="without a checkpoint member"):
        load_checkpoint(bundle, state)
    assert not (tmp_path.parent / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    ("arguments", "argument"),
    [
        ({"filename": "../ba{batch}.pt"}, "filename"),
        ({"filename": "a/../../ba{batch}.pt"}, "filename"),
        ({"filename": "/etc/ba{batch}.pt"}, "filename"),
        ({"latest_filename": "../latest.pt"}, "latest_filename"),
        ({"latest_filename": "/tmp/latest.pt"}, "latest_filename"),
        ({"remote": "file:///tmp/bucket", "remote_file_name": "../{batch}.pt"}, "remote_file_name"),
        ({"remote": "file:///tmp/bucket", "latest_remote_file_name": "/abs/latest"}, "latest_remote_file_name"),
        ({"retention": None, "best_filename": "../best.pt"}, "best_filename"),
    ],
)
def test_templates_that_would_write_outside_the_folder_are_refused(arguments: dict, argument: str) -> None:
    with pytest.raises(InvalidTemplateError if argument != "best_filename" else ConfigurationError) as raised:
        CheckpointSaver("ckpt", **{"filename": "ba{batch}.pt", **arguments})
    assert repr(argument) in str(raised.value)


def test_a_run_name_that_would_escape_is_refused_before_training(tmp_path: Path) -> None:
    config = VictimConfig(folder=str(tmp_path / "ckpt"), max_batches=2, width=16,
                          filename="{run_name}-ba{batch}.pt", run_name="../../escaped")
    with pytest.raises(InvalidTemplateError, match="'filename'"):
        make_trainer(config, saver=make_saver(config))
    assert not list(tmp_path.rglob("*escaped*"))


SECRET = "s3cr3t-" + secrets.token_hex(12)
TOKEN = "t0k3n-" + secrets.token_hex(12)


def _texts_of(error: BaseException | None) -> list[str]:
    texts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        texts += [str(error), repr(error), "".join(traceback.format_exception_only(type(error), error))]
        error = error.__cause__ or error.__context__
    return texts


def test_credentials_never_appear_in_logs_warnings_errors_or_reprs(tmp_path: Path, seaweedfs_bucket,
                                                                   fault_proxy_factory, caplog) -> None:
    from fault_proxy import Reset, Respond

    caplog.set_level(logging.DEBUG, logger="ckpt_callbacks")
    texts: list[str] = []
    proxy = fault_proxy_factory(seaweedfs_bucket.server.endpoint_url)
    good = seaweedfs_bucket.storage_options(endpoint_url=proxy.endpoint_url, max_attempts=1)
    wrong = {**good, "secret": SECRET, "token": TOKEN}
    # 1. A wrong secret: the probe at fit start is refused.
    config = VictimConfig(folder=str(tmp_path / "a"), max_batches=2, width=16, remote=seaweedfs_bucket.url("a"),
                          storage_options=wrong)
    saver = make_saver(config)
    texts += [repr(saver), repr(vars(saver)), repr(saver.remote)]
    with pytest.raises(CheckpointError) as raised:
        make_trainer(config, saver=saver).fit()
    texts += _texts_of(raised.value)
    # 2. Faults during uploads, reported as warnings, with the secret in the options.
    proxy.add(Respond(403, "SignatureDoesNotMatch", "The request signature we calculated does not match"),
              method="PUT", times=2)
    proxy.add(Reset(after_request_bytes=1000), method="PUT", times=1)
    config = VictimConfig(folder=str(tmp_path / "b"), max_batches=4, width=16, remote=seaweedfs_bucket.url("b"),
                          storage_options={**good, "token": TOKEN}, on_upload_error="warn")
    saver = make_saver(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(config, saver=saver)
        try:
            trainer.fit()
        except CheckpointError as error:
            texts += _texts_of(error)
    texts += [str(w.message) for w in caught] + [repr(saver.manager), repr(vars(saver.manager))]
    # 3. A malformed secret is named in the error, its value is not.
    for bad in ({**good, "secret": SECRET.encode()}, {**good, "token": [TOKEN]}):
        with pytest.raises(ConfigurationError) as raised:
            make_trainer(VictimConfig(folder=str(tmp_path / "c"), remote=seaweedfs_bucket.url("c"),
                                      storage_options=bad, width=16),
                         saver=make_saver(VictimConfig(folder=str(tmp_path / "c"), remote=seaweedfs_bucket.url("c"),
                                                       storage_options=bad, width=16))).fit()
        texts += _texts_of(raised.value)
    texts += [record.getMessage() for record in caplog.records]
    leaks = [text for text in texts if SECRET in text or TOKEN in text]
    assert not leaks, leaks[:3]
    assert len(texts) > 20  # the failures above really were reported


def _saver(**arguments: Any) -> CheckpointSaver:
    return CheckpointSaver(**{"folder": "ckpt", "filename": "ba{batch}.pt", **arguments})


def _trainer(**arguments: Any) -> Trainer:
    model = torch.nn.Linear(2, 1)
    defaults = {"loss_fn": lambda m, b: m(b[0]).sum(), "max_duration": "1ep"}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return Trainer(model, optimizer, [(torch.zeros(1, 2),)], **{**defaults, **arguments})


BAD_CONFIGURATIONS = [
    (_saver, {"save_interval": "5xx"}, ConfigurationError, "save_interval"),
    (_saver, {"save_interval": -1}, ConfigurationError, "save_interval"),
    (_saver, {"save_interval": "1.5ba"}, ConfigurationError, "save_interval"),
    (_saver, {"filename": "ba{batch}.pt.rar"}, UnsupportedFormatError, "filename"),
    (_saver, {"filename": "ba{batch"}, InvalidTemplateError, "filename"),
    (_saver, {"filename": "ba{batch:zz}.pt"}, InvalidTemplateError, "filename"),
    (_saver, {"folder": "{run_name}/{epoch}"}, InvalidTemplateError, "folder"),
    (_saver, {"latest_filename": "../latest"}, InvalidTemplateError, "latest_filename"),
    (_saver, {"remote_file_name": "x/{batch}.pt"}, ConfigurationError, "remote_file_name"),
    (_saver, {"remote_retention": KeepLast(2)}, ConfigurationError, "remote_retention"),
    (_saver, {"remote": "not-a-url"}, ConfigurationError, "remote"),
    (_saver, {"remote": "s3://b/x", "folder": "s3://b/y"}, ConfigurationError, "remote"),
    (_saver, {"num_checkpoints_to_keep": -2}, ConfigurationError, "num_checkpoints_to_keep"),
    (_saver, {"num_checkpoints_to_keep": "3"}, ConfigurationError, "num_checkpoints_to_keep"),
    (_saver, {"num_checkpoints_to_keep": 2, "retention": KeepLast(2)}, ConfigurationError, "retention"),
    (_saver, {"weights_only": "yes"}, ConfigurationError, "weights_only"),
    (_saver, {"overwrite": 1}, ConfigurationError, "overwrite"),
    (_saver, {"ignore_keys": "state/model"}, ConfigurationError, "ignore_keys"),
    (_saver, {"ignore_keys": [""]}, ConfigurationError, "ignore_keys[0]"),
    (_saver, {"num_concurrent_uploads": 0}, ConfigurationError, "num_concurrent_uploads"),
    (_saver, {"upload_timeout_in_seconds": 0}, ConfigurationError, "upload_timeout_in_seconds"),
    (_saver, {"storage_options": "key=1"}, ConfigurationError, "storage_options"),
    (_saver, {"save_mode": "background"}, ConfigurationError, "save_mode"),
    (_saver, {"compression_level": 3}, ConfigurationError, "compression_level"),
    (_saver, {"filename": "ba{batch}.pt.zst", "compression_level": 99}, ConfigurationError, "compression_level"),
    (_saver, {"ranks": "all"}, ConfigurationError, "ranks"),
    (_saver, {"on_upload_error": "ignore"}, ConfigurationError, "on_upload_error"),
    (_saver, {"on_save_error": "ignore"}, ConfigurationError, "on_save_error"),
    (_saver, {"shutdown_timeout": -1}, ConfigurationError, "shutdown_timeout"),
    (_saver, {"save_on_signals": ["SIGKILL"]}, ConfigurationError, "save_on_signals"),
    (_saver, {"max_unuploaded_checkpoints": 0}, ConfigurationError, "max_unuploaded_checkpoints"),
    (_saver, {"best_filename": "best.pt"}, ConfigurationError, "best_filename"),
    (_saver, {"filename": "ba{batch}.safetensors"}, ConfigurationError, "weights_only"),
    (_saver, {"remote": "s3://bucket/x", "storage_options": {"bogus": 1}}, ConfigurationError, "storage_options"),
    (_saver, {"remote": "s3://bucket/x", "storage_options": {"endpoint_url": "ftp://x"}}, ConfigurationError,
     "storage_options['endpoint_url']"),
    (_trainer, {"max_duration": "5xx"}, ConfigurationError, "max_duration"),
    (_trainer, {"max_duration": 0}, ConfigurationError, "max_duration"),
    (_trainer, {"loss_fn": None}, ConfigurationError, "loss_fn"),
    (_trainer, {"autoresume": True}, ConfigurationError, "run_name"),
    (_trainer, {"eval_interval": "soon"}, ConfigurationError, "eval_interval"),
    (_trainer, {"eval_fn": "not callable"}, ConfigurationError, "eval_fn"),
]


@pytest.mark.parametrize(
    ("build", "arguments", "error", "argument"), BAD_CONFIGURATIONS,
    ids=[f"{build.__name__.strip('_')}-{'-'.join(map(str, arguments))}-{i}" for i, (build, arguments, _, _)
         in enumerate(BAD_CONFIGURATIONS)],
)
def test_bad_configurations_are_refused_at_construction(build, arguments: dict, error: type, argument: str) -> None:
    with pytest.raises(error) as raised:
        build(**arguments)
    assert argument in str(raised.value), str(raised.value)
    assert len(BAD_CONFIGURATIONS) >= 30
