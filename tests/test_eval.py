"""Evaluation in the reference Trainer: Composer's event order, weighted metrics in the state,
no_grad/eval mode, and no effect on training or on exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _training import make_loader, make_trainer, weights
from torch.utils.data import DataLoader, TensorDataset

from ckpt_callbacks import Callback, CheckpointSaver, ConfigurationError, Event


class Recorder(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def run_event(self, event, state) -> None:
        if event not in (Event.INIT, Event.FIT_START, Event.EPOCH_START, Event.BATCH_START):
            self.seen.append((Event(event).value, state.timestamp.batch))
        super().run_event(event, state)


def constant_eval(model, batch) -> dict[str, float]:
    return {"val/loss": 1.0}


EVAL = ["eval_start", "eval_end"]


@pytest.mark.parametrize(
    ("eval_interval", "max_duration", "expected"),
    [
        (
            "1ep", "2ep",
            ["batch_end", "batch_checkpoint"] * 2 + ["epoch_end", *EVAL, "epoch_checkpoint"]
            + ["batch_end", "batch_checkpoint"] * 2 + ["epoch_end", *EVAL, "epoch_checkpoint", "fit_end"],
        ),
        (
            "1ba", "3ba",
            ["batch_end", *EVAL, "batch_checkpoint"] * 2 + ["epoch_end", "epoch_checkpoint"]
            + ["batch_end", *EVAL, "batch_checkpoint", "fit_end"],
        ),
        (  # the end of training evaluates too, once, even where the epoch also ends
            "2ep", "3ba",
            ["batch_end", "batch_checkpoint"] * 2 + ["epoch_end", "epoch_checkpoint"]
            + ["batch_end", *EVAL, "batch_checkpoint", "fit_end"],
        ),
        ("2ba", "1ep", ["batch_end", "batch_checkpoint", "batch_end", *EVAL, "batch_checkpoint",
                        "epoch_end", "epoch_checkpoint", "fit_end"]),
        ("0ep", "1ep", ["batch_end", "batch_checkpoint"] * 2 + ["epoch_end", "epoch_checkpoint", "fit_end"]),
    ],
)
def test_eval_events_in_composer_order(eval_interval: str, max_duration: str, expected: list[str]) -> None:
    recorder = Recorder()
    make_trainer([recorder], max_duration=max_duration, batches_per_epoch=2, eval_dataloader=make_loader(1),
                 eval_fn=constant_eval, eval_interval=eval_interval).fit()
    assert [name for name, _ in recorder.seen] == expected


def test_metrics_are_averaged_weighted_by_batch_size_under_no_grad_and_eval_mode() -> None:
    values = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    eval_loader = DataLoader(TensorDataset(values, values), batch_size=4)  # batches of 4, 4 and 2
    seen = []

    def eval_fn(model, batch):
        seen.append((torch.is_grad_enabled(), model.training, len(batch[0])))
        return {"mean": batch[0].mean(), "count": len(batch[0])}

    class MetricsAtEvalEnd(Callback):
        def eval_end(self, state) -> None:
            self.metrics, self.measured = dict(state.metrics), state.metrics_timestamp

    probe = MetricsAtEvalEnd()
    trainer = make_trainer([probe], max_duration="1ep", eval_dataloader=eval_loader, eval_fn=eval_fn)
    trainer.fit()
    assert seen == [(False, False, 4), (False, False, 4), (False, False, 2)]
    assert probe.metrics == {"count": pytest.approx((16 + 16 + 4) / 10), "mean": pytest.approx(4.5)}
    assert trainer.state.metrics == probe.metrics
    assert probe.measured == trainer.state.timestamp
    assert trainer.state.model.training, "training mode is restored after evaluation"


def noisy_eval(model, batch) -> dict[str, torch.Tensor]:
    # Draws from the global RNG, like dropout or sampling in an evaluation would.
    return {"val/loss": torch.nn.functional.mse_loss(model(batch[0]), batch[1]) + torch.rand(())}


def test_evaluation_does_not_change_training() -> None:
    plain = make_trainer(max_duration="2ep")
    plain.fit()
    evaluated = make_trainer(max_duration="2ep", eval_dataloader=make_loader(3, shuffle=True), eval_fn=noisy_eval,
                             eval_interval="2ba")
    evaluated.fit()
    for name, tensor in weights(plain).items():
        assert torch.equal(tensor, weights(evaluated)[name]), name
    assert "val/loss" in evaluated.state.metrics


def test_exact_resume_with_evaluation(tmp_path: Path) -> None:
    def trainer(max_duration: str, callbacks=()):
        return make_trainer(list(callbacks), max_duration=max_duration, batches_per_epoch=4,
                            eval_dataloader=make_loader(2, shuffle=True), eval_fn=noisy_eval, eval_interval="3ba",
                            autoresume=True)

    straight = trainer("2ep")
    straight.fit()
    trainer("5ba", [CheckpointSaver(str(tmp_path), filename="ba{batch}.pt", save_interval="1ba")]).fit()
    resumed = trainer("2ep", [CheckpointSaver(str(tmp_path), filename="ba{batch}.pt", save_interval="1ba")])
    resumed.fit()
    assert Path(resumed.state.resumed_from).name == "ba5.pt"
    for name, tensor in weights(straight).items():
        assert torch.equal(tensor, weights(resumed)[name]), name
    assert resumed.state.metrics == pytest.approx(straight.state.metrics)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"eval_dataloader": make_loader(1)}, ["eval_dataloader", "eval_fn"]),
        ({"eval_fn": constant_eval}, ["eval_fn", "eval_dataloader"]),
        ({"eval_dataloader": make_loader(1), "eval_fn": "loss"}, ["eval_fn", "'loss'", "callable"]),
        ({"eval_dataloader": 3, "eval_fn": constant_eval}, ["eval_dataloader", "3", "iterable"]),
        ({"eval_dataloader": make_loader(1), "eval_fn": constant_eval, "eval_interval": "5xx"}, ["eval_interval", "5xx"]),
        ({"eval_dataloader": make_loader(1), "eval_fn": constant_eval, "eval_interval": "1.5dur"}, ["eval_interval"]),
    ],
)
def test_bad_evaluation_arguments_are_refused_at_construction(kwargs, words: list[str]) -> None:
    with pytest.raises(ConfigurationError) as raised:
        make_trainer(**kwargs)
    for word in words:
        assert word in str(raised.value)


@pytest.mark.parametrize(
    ("eval_loader", "eval_fn", "words"),
    [
        (make_loader(1), lambda model, batch: 0.5, ["eval_fn", "dict of metric name", "0.5"]),
        (make_loader(1), lambda model, batch: {"val/loss": "low"}, ["eval_fn", "'low'"]),
        (make_loader(1), lambda model, batch: {"v": torch.ones(3)}, ["eval_fn", "one-element tensor"]),
        ([], constant_eval, ["eval dataloader yielded no batch"]),
    ],
)
def test_bad_evaluation_results_name_eval_fn(eval_loader, eval_fn, words: list[str]) -> None:
    trainer = make_trainer(max_duration="1ep", eval_dataloader=eval_loader, eval_fn=eval_fn)
    with pytest.raises(ConfigurationError) as raised:
        trainer.fit()
    for word in words:
        assert word in str(raised.value)
    assert trainer.state.model.training
