"""Tests for ckpt_callbacks.intervals: each policy alone, and save_interval over a simulated training loop."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

from ckpt_callbacks.errors import ConfigurationError
from ckpt_callbacks.events import Event
from ckpt_callbacks.intervals import (
    AnyOf,
    AtEndOfTraining,
    CallablePolicy,
    EveryFractionOfDuration,
    EveryInterval,
    Never,
    SavePolicy,
    create_save_policy,
)
from ckpt_callbacks.time import Time, Timestamp, TimeUnit

BATCH, EPOCH = Event.BATCH_CHECKPOINT, Event.EPOCH_CHECKPOINT


@dataclass
class Progress:
    """Stands in for the trainer's State: only what policies read."""

    timestamp: Timestamp
    previous_timestamp: Timestamp | None
    max_duration: Time | None
    dataloader_len: int | None = 5


def simulate(
    save_interval: Any,
    max_duration: str,
    *,
    batches_per_epoch: int = 5,
    samples: int = 8,
    tokens: int = 0,
    seconds: float = 0.0,
    dataloader_len: int | None = 5,
) -> list[tuple[int, int]]:
    """Run Composer's event order and the saver's batch dedup; return the (epoch, batch) of every save."""
    policy = create_save_policy(save_interval)
    state = Progress(Timestamp(), None, Time.from_timestring(max_duration), dataloader_len)
    saves: list[tuple[int, int]] = []

    def checkpoint(event: Event) -> None:
        ts = state.timestamp
        if policy.should_save(state, event) and (not saves or saves[-1][1] != ts.batch):
            saves.append((ts.epoch, ts.batch))

    def finished() -> bool:
        max_time = state.max_duration
        assert max_time is not None
        return state.timestamp.get(max_time.unit) >= max_time.value

    while not finished():
        for _ in range(batches_per_epoch):
            state.previous_timestamp = state.timestamp
            state.timestamp = state.timestamp.to_next_batch(samples, tokens, timedelta(seconds=seconds))
            checkpoint(BATCH)
            if finished():
                break
        if state.timestamp.batch_in_epoch == batches_per_epoch:
            state.previous_timestamp = state.timestamp
            state.timestamp = state.timestamp.to_next_epoch()
            checkpoint(EPOCH)
    return saves


@pytest.mark.parametrize(
    ("save_interval", "max_duration", "expected"),
    [
        ("1ep", "2ep", [(1, 5), (2, 10)]),
        ("2ba", "2ep", [(0, 2), (0, 4), (1, 6), (1, 8), (1, 10)]),
        ("3ba", "2ep", [(0, 3), (1, 6), (1, 9), (2, 10)]),
        ("1ep", "7ba", [(1, 5), (1, 7)]),
        ("1ep", "10ba", [(1, 5), (1, 10)]),
        ("2ep", "5ep", [(2, 10), (4, 20), (5, 25)]),
        (1, "2ep", [(1, 5), (2, 10)]),
        (Time(4, TimeUnit.BATCH), "10ba", [(0, 4), (1, 8), (1, 10)]),
        ("0.25dur", "4ep", [(0, 5), (1, 10), (2, 15), (3, 20)]),
        ("0.5dur", "8ba", [(0, 4), (1, 8)]),
        ("0.3dur", "10ba", [(0, 3), (1, 6), (1, 9), (1, 10)]),
        ("1dur", "2ep", [(1, 10)]),
        ("20sp", "2ep", [(0, 3), (0, 5), (1, 8), (1, 10)]),
        ("0.25dur", "80sp", [(0, 3), (0, 5), (1, 8), (1, 10)]),
        ("0ep", "2ep", []),
        ("0ba", "2ep", []),
        (0, "7ba", []),
    ],
)
def test_simulated_loop_saves(save_interval: Any, max_duration: str, expected: list[tuple[int, int]]) -> None:
    assert simulate(save_interval, max_duration) == expected


def test_simulated_loop_token_interval() -> None:
    # 30 tokens per batch: 100 is crossed at batches 4, 7, 10 (120, 210, 300 tokens).
    assert simulate("100tok", "2ep", tokens=30) == [(0, 4), (1, 7), (1, 10)]


def test_simulated_loop_token_duration_fraction() -> None:
    assert simulate("0.5dur", "300tok", tokens=30) == [(0, 5), (1, 10)]


def test_simulated_loop_seconds_interval() -> None:
    # 4 s per batch: whole-second totals 4, 8, 12, ... cross a multiple of 10 at 12 s, 20 s, 32 s, 40 s.
    assert simulate("10sec", "2ep", seconds=4) == [(0, 3), (0, 5), (1, 8), (1, 10)]


def test_simulated_loop_wall_clock_string() -> None:
    # 25 s per batch: a whole minute is crossed at 75 s, 125 s, 200 s and 250 s.
    assert simulate("1m", "2ep", seconds=25) == [(0, 3), (0, 5), (1, 8), (1, 10)]


def test_simulated_loop_callable_has_no_final_save() -> None:
    seen: list[Event] = []

    def on_batch_three(state: Progress, event: Event) -> bool:
        seen.append(event)
        return state.timestamp.batch == 3 and event == BATCH

    assert simulate(on_batch_three, "2ep") == [(0, 3)]
    assert seen.count(BATCH) == 10 and seen.count(EPOCH) == 2


def test_duration_in_epochs_needs_dataloader_len() -> None:
    with pytest.raises(RuntimeError, match="no length"):
        simulate("0.5dur", "2ep", dataloader_len=None)
    # Without epochs in max_duration the number of batches per epoch is not needed.
    assert simulate("0.5dur", "10ba", dataloader_len=None) == [(0, 5), (1, 10)]


def _state(prev: Timestamp | None, cur: Timestamp, max_duration: str | None = "2ep") -> Progress:
    return Progress(cur, prev, Time.from_timestring(max_duration) if max_duration else None)


def test_every_interval_uses_the_crossing_test() -> None:
    policy = EveryInterval(Time(20, TimeUnit.SAMPLE))
    assert policy.should_save(_state(Timestamp(sample=16), Timestamp(sample=24)), BATCH)
    assert not policy.should_save(_state(Timestamp(sample=24), Timestamp(sample=32)), BATCH)
    # A batch large enough to skip a multiple entirely still fires once.
    assert policy.should_save(_state(Timestamp(sample=0), Timestamp(sample=50)), BATCH)


def test_every_interval_only_answers_at_its_event() -> None:
    epochs = EveryInterval(Time(1, TimeUnit.EPOCH))
    batches = EveryInterval(Time(1, TimeUnit.BATCH))
    rolled = _state(Timestamp(batch=5), Timestamp(epoch=1, batch=5))
    stepped = _state(Timestamp(batch=4), Timestamp(batch=5))
    assert epochs.should_save(rolled, EPOCH) and not epochs.should_save(rolled, BATCH)
    assert batches.should_save(stepped, BATCH) and not batches.should_save(stepped, EPOCH)
    assert not batches.should_save(stepped, Event.BATCH_END)


def test_every_interval_seconds_count_whole_seconds_of_total_wct() -> None:
    policy = EveryInterval(Time(30, TimeUnit.SECOND))
    before = Timestamp(total_wct=timedelta(seconds=29.9))
    assert not policy.should_save(_state(before, Timestamp(total_wct=timedelta(seconds=29.99))), BATCH)
    assert policy.should_save(_state(before, Timestamp(total_wct=timedelta(seconds=30.2))), BATCH)
    day = timedelta(days=1)
    assert policy.should_save(_state(Timestamp(total_wct=day), Timestamp(total_wct=day + timedelta(seconds=31))), BATCH)


@pytest.mark.parametrize("time", [Time(0, TimeUnit.BATCH), Time(0.5, TimeUnit.DURATION), "1ep", 3])
def test_every_interval_rejects_bad_times(time: Any) -> None:
    with pytest.raises(ConfigurationError, match="'time' must be"):
        EveryInterval(time)


@pytest.mark.parametrize("fraction", [0, 1.5, -0.5, True, "0.5", None])
def test_every_fraction_rejects_bad_fractions(fraction: Any) -> None:
    with pytest.raises(ConfigurationError, match="'fraction' must be"):
        EveryFractionOfDuration(fraction)


def test_every_fraction_rejects_max_duration_in_other_units() -> None:
    state = _state(Timestamp(), Timestamp(batch=1, total_wct=timedelta(seconds=1)), "60sec")
    with pytest.raises(ConfigurationError, match="'max_duration' must be"):
        EveryFractionOfDuration(0.5).should_save(state, BATCH)


def test_at_end_of_training() -> None:
    policy = AtEndOfTraining()
    assert not policy.should_save(_state(Timestamp(batch=9), Timestamp(epoch=1, batch=10)), EPOCH)
    assert policy.should_save(_state(Timestamp(epoch=1, batch=10), Timestamp(epoch=2, batch=10)), EPOCH)
    assert policy.should_save(_state(Timestamp(batch=9), Timestamp(batch=10), "10ba"), BATCH)
    assert policy.should_save(_state(Timestamp(batch=10), Timestamp(batch=11), "10ba"), BATCH)
    assert not policy.should_save(_state(Timestamp(batch=9), Timestamp(batch=10), "10ba"), Event.FIT_END)
    assert not policy.should_save(_state(Timestamp(batch=9), Timestamp(epoch=9, batch=10), None), EPOCH)
    assert policy.should_save(_state(Timestamp(), Timestamp(batch=1), "0ba"), BATCH)


@pytest.mark.parametrize(
    "policy",
    [
        create_save_policy("1ba"),
        create_save_policy("0.5dur"),
        AtEndOfTraining(),
        EveryInterval(Time(1, TimeUnit.EPOCH)),
        CallablePolicy(lambda state, event: True),
        Never(),
    ],
)
def test_every_policy_is_false_before_the_first_batch(policy: SavePolicy) -> None:
    state = _state(None, Timestamp(epoch=5, batch=10), "1ba")
    assert not policy.should_save(state, BATCH)
    assert not policy.should_save(state, EPOCH)


def test_any_of_and_never() -> None:
    state = _state(Timestamp(batch=1), Timestamp(batch=2))
    assert AnyOf([Never(), EveryInterval(Time(2, TimeUnit.BATCH))]).should_save(state, BATCH)
    assert not AnyOf([Never(), EveryInterval(Time(3, TimeUnit.BATCH))]).should_save(state, BATCH)
    assert not AnyOf([]).should_save(state, BATCH)
    assert not Never().should_save(state, BATCH)
    with pytest.raises(ConfigurationError, match="'policies' must be"):
        AnyOf(["1ep"])  # type: ignore[list-item]


def test_callable_policy_coerces_its_result_with_bool() -> None:
    state = _state(Timestamp(batch=1), Timestamp(batch=2))
    assert CallablePolicy(lambda s, e: [1]).should_save(state, BATCH) is True
    assert CallablePolicy(lambda s, e: None).should_save(state, BATCH) is False
    with pytest.raises(ConfigurationError, match="'fn' must be"):
        CallablePolicy("1ep")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("save_interval", "expected"),
    [
        ("1ep", AnyOf([EveryInterval(Time(1, TimeUnit.EPOCH)), AtEndOfTraining()])),
        (2, AnyOf([EveryInterval(Time(2, TimeUnit.EPOCH)), AtEndOfTraining()])),
        (2.0, AnyOf([EveryInterval(Time(2, TimeUnit.EPOCH)), AtEndOfTraining()])),
        ("500ba", AnyOf([EveryInterval(Time(500, TimeUnit.BATCH)), AtEndOfTraining()])),
        ("30m", AnyOf([EveryInterval(Time(1800, TimeUnit.SECOND)), AtEndOfTraining()])),
        (Time(64, TimeUnit.SAMPLE), AnyOf([EveryInterval(Time(64, TimeUnit.SAMPLE)), AtEndOfTraining()])),
        ("0.25dur", AnyOf([EveryFractionOfDuration(0.25), AtEndOfTraining()])),
        ("1dur", AnyOf([EveryFractionOfDuration(1.0), AtEndOfTraining()])),
        (0, Never()),
        ("0ep", Never()),
        ("0ba", Never()),
        (Time(0, TimeUnit.TOKEN), Never()),
    ],
)
def test_create_save_policy_builds(save_interval: Any, expected: SavePolicy) -> None:
    assert create_save_policy(save_interval) == expected


def test_create_save_policy_wraps_callables_and_passes_policies_through() -> None:
    def fn(state: Any, event: Event) -> bool:
        return False

    assert create_save_policy(fn) == CallablePolicy(fn)
    policy = EveryInterval(Time(3, TimeUnit.BATCH))
    assert create_save_policy(policy) is policy


@pytest.mark.parametrize("save_interval", [None, True, False, [1], {"ep": 1}, object(), b"1ep"])
def test_create_save_policy_rejects_other_types(save_interval: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        create_save_policy(save_interval, argument="save_interval")
    message = str(info.value)
    assert message.startswith("'save_interval' must be")
    assert "a callable (state, event) -> bool" in message and "'500ba'" in message
    assert f"(got {save_interval!r})" in message


@pytest.mark.parametrize(
    ("save_interval", "fragment"),
    [("5xx", "'1h30m'"), ("1.5ep", "whole number"), ("-1ba", "non-negative"), (1.5, "whole number"),
     (-2, "non-negative"), ("1.5dur", "(0, 1]"), ("0dur", "(0, 1]")],
)
def test_create_save_policy_rejects_bad_times(save_interval: Any, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match="'every' must be") as info:
        create_save_policy(save_interval, argument="every")
    assert fragment in str(info.value)
    assert repr(save_interval) in str(info.value)


def test_policies_are_frozen_and_readable() -> None:
    policy = create_save_policy("500ba")
    assert repr(policy) == "AnyOf(policies=(EveryInterval(time=Time('500ba')), AtEndOfTraining()))"
    with pytest.raises(AttributeError):
        policy.policies = ()  # type: ignore[misc]
    assert isinstance(policy, SavePolicy)
