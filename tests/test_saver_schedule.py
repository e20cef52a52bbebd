"""Which checkpoints a saver writes, through the reference Trainer (5-batch epochs)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from _training import make_trainer

from ckpt_callbacks import CheckpointSaver, Event


def saved_names(folder: Path) -> list[str]:
    names = [p.name for p in folder.iterdir() if not p.name.startswith((".", "latest"))]
    return sorted(names, key=lambda n: (int(re.search(r"-ba(\d+)", n).group(1)), n))


def run(tmp_path: Path, save_interval, max_duration: str, filename: str = "ep{epoch}-ba{batch}", **kwargs) -> list[str]:
    saver = CheckpointSaver(str(tmp_path), filename=filename, save_interval=save_interval, **kwargs)
    make_trainer([saver], max_duration=max_duration).fit()
    return saved_names(tmp_path)


@pytest.mark.parametrize(
    ("save_interval", "max_duration", "expected"),
    [
        ("1ep", "2ep", ["ep1-ba5", "ep2-ba10"]),
        ("2ba", "2ep", ["ep0-ba2", "ep0-ba4", "ep1-ba6", "ep1-ba8", "ep1-ba10"]),
        ("3ba", "2ep", ["ep0-ba3", "ep1-ba6", "ep1-ba9", "ep2-ba10"]),
        ("1ep", "7ba", ["ep1-ba5", "ep1-ba7"]),
        (1, "2ep", ["ep1-ba5", "ep2-ba10"]),
        ("16sp", "2ep", ["ep0-ba2", "ep0-ba4", "ep1-ba6", "ep1-ba8", "ep1-ba10"]),
        # 8-sample batches: 20sp is crossed at samples 24, 40, 64 and 80; the final save dedups on batch 10.
        ("20sp", "2ep", ["ep0-ba3", "ep0-ba5", "ep1-ba8", "ep1-ba10"]),
    ],
)
def test_interval_rules(tmp_path: Path, save_interval, max_duration: str, expected) -> None:
    assert run(tmp_path, save_interval, max_duration) == expected


def test_duration_fraction_saves_four_times(tmp_path: Path) -> None:
    names = run(tmp_path, "0.25dur", "4ep")
    assert len(names) == 4
    # dur intervals fire at BATCH_CHECKPOINT (as in Composer), before the epoch is rolled.
    assert names == ["ep0-ba5", "ep1-ba10", "ep2-ba15", "ep3-ba20"]


def test_token_interval(tmp_path: Path) -> None:
    saver = CheckpointSaver(str(tmp_path), filename="ep{epoch}-ba{batch}-tok{token}", save_interval="100tok")
    make_trainer([saver], max_duration="1ep", num_tokens_fn=lambda batch: 40).fit()
    assert saved_names(tmp_path) == ["ep0-ba3-tok120", "ep0-ba5-tok200"]


def test_max_duration_in_samples_ends_with_a_final_checkpoint(tmp_path: Path) -> None:
    assert run(tmp_path, "1ep", "56sp") == ["ep1-ba5", "ep1-ba7"]


def test_zero_interval_disables_saving(tmp_path: Path) -> None:
    assert run(tmp_path, 0, "2ep") == []
    assert not (tmp_path / "latest-rank0.pt").exists()


def test_callable_interval_has_no_implicit_final_save(tmp_path: Path) -> None:
    def on_batch_three(state, event):
        return event == Event.BATCH_CHECKPOINT and state.timestamp.batch == 3

    assert run(tmp_path, on_batch_three, "2ep") == ["ep0-ba3"]


@pytest.mark.parametrize("keep", [-1, 0, 1, 2, 3, 4])
def test_keep_last_k(tmp_path: Path, keep: int) -> None:
    names = run(tmp_path, "1ba", "1ep", num_checkpoints_to_keep=keep)
    everything = [f"ep0-ba{b}" for b in range(1, 6)]
    expected = everything if keep == -1 else everything[len(everything) - keep :] if keep else []
    assert names == expected
    latest = tmp_path / "latest-rank0.pt"
    assert latest.is_symlink() == (keep != 0)
    if keep:
        assert os.readlink(latest) == "ep0-ba5"


def test_format_variables_and_specs(tmp_path: Path) -> None:
    saver = CheckpointSaver(
        str(tmp_path / "{run_name}-r{rank}"),
        filename="e{epoch:03d}-b{batch}-bie{batch_in_epoch}-s{sample}-sie{sample_in_epoch}-w{world_size}.pt",
        save_interval="3ba",
    )
    make_trainer([saver], max_duration="1ep", run_name="fmt").fit()
    folder = tmp_path / "fmt-r0"
    assert sorted(p.name for p in folder.glob("e*")) == [
        "e000-b3-bie3-s24-sie24-w1.pt",
        "e001-b5-bie0-s40-sie0-w1.pt",
    ]
