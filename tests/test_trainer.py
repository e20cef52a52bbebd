"""The reference Trainer fires events in Composer's order with the right counters."""

from __future__ import annotations

import pytest
import torch
from _training import make_trainer

from ckpt_callbacks import Callback, ConfigurationError, Event


class Recorder(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[str, int, int, int, int]] = []

    def run_event(self, event, state) -> None:
        t = state.timestamp
        self.seen.append((Event(event).value, t.epoch, t.batch, t.batch_in_epoch, t.sample_in_epoch))
        super().run_event(event, state)


def test_event_order_and_counters() -> None:
    recorder = Recorder()
    make_trainer([recorder], max_duration="2ep", batches_per_epoch=2).fit()
    assert recorder.seen == [
        ("init", 0, 0, 0, 0),
        ("fit_start", 0, 0, 0, 0),
        ("epoch_start", 0, 0, 0, 0),
        ("batch_start", 0, 0, 0, 0),
        ("batch_end", 0, 1, 1, 8),
        ("batch_checkpoint", 0, 1, 1, 8),
        ("batch_start", 0, 1, 1, 8),
        ("batch_end", 0, 2, 2, 16),
        ("batch_checkpoint", 0, 2, 2, 16),
        ("epoch_end", 1, 2, 0, 0),
        ("epoch_checkpoint", 1, 2, 0, 0),
        ("epoch_start", 1, 2, 0, 0),
        ("batch_start", 1, 2, 0, 0),
        ("batch_end", 1, 3, 1, 8),
        ("batch_checkpoint", 1, 3, 1, 8),
        ("batch_start", 1, 3, 1, 8),
        ("batch_end", 1, 4, 2, 16),
        ("batch_checkpoint", 1, 4, 2, 16),
        ("epoch_end", 2, 4, 0, 0),
        ("epoch_checkpoint", 2, 4, 0, 0),
        ("fit_end", 2, 4, 0, 0),
    ]


def test_batch_duration_stops_mid_epoch_without_rolling_the_epoch() -> None:
    recorder = Recorder()
    trainer = make_trainer([recorder], max_duration="3ba", batches_per_epoch=5)
    trainer.fit()
    assert trainer.state.timestamp.epoch == 0 and trainer.state.timestamp.batch == 3
    assert recorder.seen[-1] == ("fit_end", 0, 3, 3, 24)


def test_token_and_sample_durations() -> None:
    trainer = make_trainer(max_duration="100tok", num_tokens_fn=lambda batch: 30)
    trainer.fit()
    assert trainer.state.timestamp.token == 120 and trainer.state.timestamp.batch == 4
    trainer = make_trainer(max_duration="20sp", num_samples_fn=lambda batch: 5)
    trainer.fit()
    assert trainer.state.timestamp.sample == 20


def test_two_optimizers_and_wall_clock() -> None:
    model = torch.nn.Linear(4, 1)
    first = torch.optim.SGD([model.weight], lr=0.1)
    second = torch.optim.Adam([model.bias], lr=0.1)
    from _training import loss_fn, make_loader

    from ckpt_callbacks import Trainer

    trainer = Trainer(model, [first, second], make_loader(), loss_fn=loss_fn, max_duration="1ep")
    trainer.fit()
    assert len(trainer.state.state_dict()["optimizers"]) == 2
    assert trainer.state.timestamp.total_wct.total_seconds() > 0


@pytest.mark.parametrize("bad", ["0ep", "0.5dur", "10sec", -1, "soon"])
def test_bad_max_duration(bad) -> None:
    with pytest.raises(ConfigurationError, match="max_duration"):
        make_trainer(max_duration=bad)


def test_same_seed_same_result_and_data_order_changes_per_epoch() -> None:
    a = make_trainer(max_duration="2ep", seed=3)
    a.fit()
    b = make_trainer(max_duration="2ep", seed=3)
    b.fit()
    for key, tensor in a.state.model.state_dict().items():
        assert torch.equal(tensor, b.state.model.state_dict()[key])
    loader = make_trainer(max_duration="1ep").state.dataloader
    from ckpt_callbacks.trainer import _seed_data_order

    _seed_data_order(loader, 0, 0)
    first_epoch = [x[0].sum().item() for x in loader]
    _seed_data_order(loader, 0, 1)
    second_epoch = [x[0].sum().item() for x in loader]
    _seed_data_order(loader, 0, 0)
    again = [x[0].sum().item() for x in loader]
    assert first_epoch == again and first_epoch != second_epoch
