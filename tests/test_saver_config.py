"""Bad input is refused at construction (or fit start) with a specific, helpful error, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from _training import make_trainer

from ckpt_callbacks import (
    CheckpointExistsError,
    CheckpointSaver,
    ConfigurationError,
    InvalidTemplateError,
    KeepLast,
    UnsupportedFormatError,
)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"filename": "ep{epcoh}.pt"}, InvalidTemplateError, ["epcoh", "epoch"]),
        ({"filename": "/abs/ep{epoch}.pt"}, InvalidTemplateError, ["filename", "absolute"]),
        ({"filename": "../ep{epoch}.pt"}, InvalidTemplateError, ["filename", ".."]),
        ({"filename": ""}, InvalidTemplateError, ["filename"]),
        ({"folder": "runs/{epoch}"}, InvalidTemplateError, ["folder", "epoch"]),
        ({"latest_filename": "latest-{rnak}"}, InvalidTemplateError, ["latest_filename", "rnak"]),
        ({"save_interval": "5xx"}, ConfigurationError, ["save_interval", "5xx"]),
        ({"save_interval": "1.5ep"}, ConfigurationError, ["save_interval", "1.5ep"]),
        ({"save_interval": [1]}, ConfigurationError, ["save_interval", "callable"]),
        ({"num_checkpoints_to_keep": -2}, ConfigurationError, ["num_checkpoints_to_keep", "-2"]),
        ({"num_concurrent_uploads": 0}, ConfigurationError, ["num_concurrent_uploads", "0"]),
        ({"upload_timeout_in_seconds": -1}, ConfigurationError, ["upload_timeout_in_seconds"]),
        ({"filename": "ep{epoch}.pt.lzo"}, UnsupportedFormatError, ["filename", ".lzo"]),
        ({"filename": "ep{epoch}.pt.symlink"}, UnsupportedFormatError, ["symlink"]),
        ({"ignore_keys": "rng"}, ConfigurationError, ["ignore_keys", "['rng']"]),
        ({"ignore_keys": 3}, ConfigurationError, ["ignore_keys"]),
        ({"save_mode": "later"}, ConfigurationError, ["save_mode", "later"]),
        ({"ranks": "all"}, ConfigurationError, ["ranks", "all"]),
        ({"compression_level": 3}, ConfigurationError, ["compression_level"]),
        ({"filename": "ep{epoch}.pt.gz", "compression_level": 42}, ConfigurationError, ["compression_level", "42", "0 to 9"]),
        ({"num_checkpoints_to_keep": 2, "retention": KeepLast(2)}, ConfigurationError, ["retention", "both"]),
        ({"weights_only": "yes"}, ConfigurationError, ["weights_only"]),
        ({"on_upload_error": "ignore"}, ConfigurationError, ["on_upload_error"]),
    ],
)
def test_bad_arguments_are_refused_at_construction(tmp_path: Path, kwargs, error, words) -> None:
    kwargs.setdefault("folder", str(tmp_path / "ckpt"))
    with pytest.raises(error) as raised:
        CheckpointSaver(**kwargs)
    assert isinstance(raised.value, ValueError)
    for word in words:
        assert word in str(raised.value)
    assert not (tmp_path / "ckpt").exists()


def test_template_without_counter_warns() -> None:
    with pytest.warns(UserWarning, match="overwrites"):
        CheckpointSaver(filename="last.pt")


def test_overwrite_false_refuses_later_checkpoints_at_fit_start(tmp_path: Path) -> None:
    folder = tmp_path / "{run_name}"
    make_trainer([CheckpointSaver(str(folder), filename="{run_name}-ep{epoch}-ba{batch}-t{total_wct}.pt", save_interval="1ba")], max_duration="3ba").fit()
    run = tmp_path / "test-run"
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(CheckpointExistsError, match="overwrite=True") as raised:
        make_trainer([CheckpointSaver(str(folder), filename="{run_name}-ep{epoch}-ba{batch}-t{total_wct}.pt", save_interval="1ba")], max_duration="3ba").fit()
    assert isinstance(raised.value, FileExistsError)
    assert sorted(p.name for p in run.iterdir()) == before
    make_trainer([CheckpointSaver(str(folder), filename="{run_name}-ep{epoch}-ba{batch}-t{total_wct}.pt", save_interval="1ba", overwrite=True)], max_duration="3ba").fit()


def test_overwrite_check_escapes_regex_characters(tmp_path: Path) -> None:
    (tmp_path / "ckpt+[v1]-ba9.pt").write_bytes(b"not ours")
    (tmp_path / "ckptX[v1]-ba9.pt").write_bytes(b"not ours")
    saver = CheckpointSaver(str(tmp_path), filename="ckpt+[v1]-ba{batch}.pt", save_interval="1ba")
    with pytest.raises(CheckpointExistsError, match=r"ckpt\+\[v1\]-ba9"):
        make_trainer([saver], max_duration="1ba").fit()
    saver = CheckpointSaver(str(tmp_path), filename="ckpt.v1-ba{batch}.pt", save_interval="1ba")
    (tmp_path / "ckptXv1-ba9.pt").write_bytes(b"not ours")
    make_trainer([saver], max_duration="1ba").fit()


def test_colliding_savers_are_refused_at_fit_start(tmp_path: Path) -> None:
    one = CheckpointSaver(str(tmp_path), filename="ba{batch}.pt", save_interval="1ba")
    two = CheckpointSaver(str(tmp_path), filename="ba{batch}.pt", save_interval="2ba", weights_only=True)
    with pytest.raises(ConfigurationError, match="different folders or filenames"):
        make_trainer([one, two], max_duration="2ba").fit()
    three = CheckpointSaver(str(tmp_path), filename="w{batch}.pt", save_interval="2ba")
    with pytest.raises(ConfigurationError, match="latest_filename"):
        make_trainer([CheckpointSaver(str(tmp_path), filename="ba{batch}.pt"), three], max_duration="2ba").fit()
    assert not list(tmp_path.glob("*.pt"))


def test_two_savers_keep_separate_state(tmp_path: Path) -> None:
    weights = CheckpointSaver(str(tmp_path / "w"), filename="ep{epoch}.pt", save_interval="1ep", weights_only=True)
    full = CheckpointSaver(str(tmp_path / "f"), filename="ba{batch}.pt", save_interval="2ba")
    assert weights.state_key != full.state_key
    make_trainer([weights, full], max_duration="1ep").fit()
    assert [Path(p).name for p in weights.saved_checkpoints] == ["ep1.pt"]
    assert [Path(p).name for p in full.saved_checkpoints] == ["ba2.pt", "ba4.pt", "ba5.pt"]
