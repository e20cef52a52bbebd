"""Tests for ckpt_callbacks.time: time-string parsing, Time inputs, Timestamp transitions and state."""

from __future__ import annotations

import io
from datetime import timedelta

import numpy as np
import pytest
import torch

from ckpt_callbacks.errors import ConfigurationError
from ckpt_callbacks.time import Time, Timestamp, TimeUnit


@pytest.mark.parametrize(
    ("text", "value", "unit"),
    [
        ("1ep", 1, TimeUnit.EPOCH),
        ("100ba", 100, TimeUnit.BATCH),
        ("500sp", 500, TimeUnit.SAMPLE),
        ("1000tok", 1000, TimeUnit.TOKEN),
        ("0.5dur", 0.5, TimeUnit.DURATION),
        ("1dur", 1.0, TimeUnit.DURATION),
        ("1e-1dur", 0.1, TimeUnit.DURATION),
        (".25dur", 0.25, TimeUnit.DURATION),
        ("3e4tok", 30000, TimeUnit.TOKEN),
        ("3E4TOK", 30000, TimeUnit.TOKEN),
        ("2.0ep", 2, TimeUnit.EPOCH),
        ("0ep", 0, TimeUnit.EPOCH),
        ("0ba", 0, TimeUnit.BATCH),
        ("10sec", 10, TimeUnit.SECOND),
        ("  7BA \n", 7, TimeUnit.BATCH),
        ("5 ep", 5, TimeUnit.EPOCH),
        ("30s", 30, TimeUnit.SECOND),
        ("5m", 300, TimeUnit.SECOND),
        ("1h", 3600, TimeUnit.SECOND),
        ("1h30m", 5400, TimeUnit.SECOND),
        ("2h5m10s", 7510, TimeUnit.SECOND),
        ("1H30M", 5400, TimeUnit.SECOND),
        ("1h10s", 3610, TimeUnit.SECOND),
        ("90m", 5400, TimeUnit.SECOND),
        ("25h", 90000, TimeUnit.SECOND),
        ("0s", 0, TimeUnit.SECOND),
    ],
)
def test_from_timestring_accepts(text: str, value: int | float, unit: TimeUnit) -> None:
    time = Time.from_timestring(text)
    assert time == Time(value, unit)
    assert time.unit is unit
    assert type(time.value) is (float if unit is TimeUnit.DURATION else int)


@pytest.mark.parametrize(
    "text",
    ["ep", "", "   ", "5xx", "1e", "1iter", "5", "1h30", "5ms", "1.5h", "h", "1ep1", "nanep", "infba", "1e400ep",
     "1_000ba", "1..5dur", "ba100"],
)
def test_from_timestring_rejects_malformed(text: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Time.from_timestring(text, argument="save_interval")
    message = str(info.value)
    assert message.startswith("'save_interval' must be")
    assert repr(text) in message
    if text not in ("nanep", "infba", "1e400ep"):
        for example in ("'1ep'", "'500ba'", "'64sp'", "'1000tok'", "'0.5dur'", "'30s'", "'1h30m'"):
            assert example in message


@pytest.mark.parametrize("text", ["1.5ep", "0.5ba", "2.25sp", "1e-1tok", "1.5sec"])
def test_from_timestring_rejects_fractions_outside_dur(text: str) -> None:
    with pytest.raises(ConfigurationError, match="whole number") as info:
        Time.from_timestring(text, argument="max_duration")
    assert str(info.value).startswith("'max_duration' must be")
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("text", ["-1ba", "-0.5dur", "-3ep"])
def test_from_timestring_rejects_negative(text: str) -> None:
    with pytest.raises(ConfigurationError, match="non-negative") as info:
        Time.from_timestring(text)
    assert repr(text) in str(info.value)


def test_from_timestring_rejects_non_strings() -> None:
    with pytest.raises(ConfigurationError, match="'time' must be"):
        Time.from_timestring(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("time", "text"),
    [
        (Time(500, TimeUnit.BATCH), "500ba"),
        (Time(1, TimeUnit.EPOCH), "1ep"),
        (Time(0.5, TimeUnit.DURATION), "0.5dur"),
        (Time(1, TimeUnit.DURATION), "1.0dur"),
        (Time(5400, TimeUnit.SECOND), "5400sec"),
        (Time(2.0, "tok"), "2tok"),  # type: ignore[arg-type]
    ],
)
def test_time_str_repr_and_round_trip(time: Time, text: str) -> None:
    assert str(time) == text
    assert repr(time) == f"Time({text!r})"
    assert Time.from_timestring(str(time)) == time


def test_time_is_frozen_and_hashable() -> None:
    time = Time(3, TimeUnit.EPOCH)
    with pytest.raises(AttributeError):
        time.value = 4  # type: ignore[misc]
    assert {time, Time(3.0, TimeUnit.EPOCH)} == {time}


@pytest.mark.parametrize(
    ("value", "unit"),
    [(-1, TimeUnit.BATCH), (1.5, TimeUnit.EPOCH), (True, TimeUnit.EPOCH), ("1", TimeUnit.EPOCH),
     (float("nan"), TimeUnit.DURATION), (1, "weeks")],
)
def test_time_constructor_validates(value: object, unit: object) -> None:
    with pytest.raises(ConfigurationError):
        Time(value, unit)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "default_unit", "expected"),
    [
        (3, TimeUnit.EPOCH, Time(3, TimeUnit.EPOCH)),
        (2.0, TimeUnit.EPOCH, Time(2, TimeUnit.EPOCH)),
        (0, TimeUnit.EPOCH, Time(0, TimeUnit.EPOCH)),
        (100, TimeUnit.BATCH, Time(100, TimeUnit.BATCH)),
        (np.int64(4), TimeUnit.EPOCH, Time(4, TimeUnit.EPOCH)),
        (0.25, TimeUnit.DURATION, Time(0.25, TimeUnit.DURATION)),
        ("500ba", TimeUnit.EPOCH, Time(500, TimeUnit.BATCH)),
        (Time(7, TimeUnit.TOKEN), TimeUnit.EPOCH, Time(7, TimeUnit.TOKEN)),
    ],
)
def test_from_input_accepts(value: object, default_unit: TimeUnit, expected: Time) -> None:
    result = Time.from_input(value, default_unit)  # type: ignore[arg-type]
    assert result == expected
    assert type(result.value) is type(expected.value)


def test_from_input_returns_a_time_unchanged() -> None:
    time = Time(7, TimeUnit.TOKEN)
    assert Time.from_input(time) is time


@pytest.mark.parametrize("value", [True, False, None, [1], {"ep": 1}, 1.5, -1, -2.0, float("inf"), "5xx", b"1ep"])
def test_from_input_rejects(value: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        Time.from_input(value, argument="max_duration")  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith("'max_duration' must be")
    assert f"(got {value!r})" in message


def test_from_input_rejects_a_bad_default_unit() -> None:
    with pytest.raises(ConfigurationError, match="'default_unit' must be"):
        Time.from_input(1, "weeks")  # type: ignore[arg-type]


def test_timestamp_defaults_to_zero() -> None:
    ts = Timestamp()
    assert ts.state_dict() == dict.fromkeys(ts.state_dict(), 0)
    assert ts.total_wct == ts.epoch_wct == ts.batch_wct == timedelta(0)


def test_to_next_batch_advances_totals_and_in_epoch_counters() -> None:
    ts = Timestamp().to_next_batch(samples=8, tokens=100, duration=timedelta(seconds=2))
    ts = ts.to_next_batch(samples=8, tokens=50, duration=timedelta(seconds=3))
    assert (ts.epoch, ts.batch, ts.batch_in_epoch) == (0, 2, 2)
    assert (ts.sample, ts.sample_in_epoch, ts.token, ts.token_in_epoch) == (16, 16, 150, 150)
    assert ts.total_wct == ts.epoch_wct == timedelta(seconds=5)
    assert ts.batch_wct == timedelta(seconds=3)


def test_to_next_batch_defaults_count_only_the_batch() -> None:
    ts = Timestamp().to_next_batch()
    assert ts == Timestamp(batch=1, batch_in_epoch=1)


def test_to_next_epoch_resets_in_epoch_counters_and_keeps_totals() -> None:
    before = Timestamp().to_next_batch(samples=4, tokens=9, duration=timedelta(seconds=1.5))
    after = before.to_next_epoch()
    assert after == Timestamp(epoch=1, batch=1, sample=4, token=9, total_wct=timedelta(seconds=1.5))
    nxt = after.to_next_batch(samples=4, duration=timedelta(seconds=1))
    assert (nxt.epoch, nxt.batch, nxt.batch_in_epoch, nxt.sample, nxt.sample_in_epoch) == (1, 2, 1, 8, 4)
    assert (nxt.total_wct, nxt.epoch_wct) == (timedelta(seconds=2.5), timedelta(seconds=1))


def test_transitions_leave_the_original_unchanged() -> None:
    ts = Timestamp(batch=3, batch_in_epoch=3)
    ts.to_next_batch(samples=1)
    ts.to_next_epoch()
    assert ts == Timestamp(batch=3, batch_in_epoch=3)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [({"samples": -1}, "samples"), ({"tokens": 1.5}, "tokens"), ({"duration": 3}, "duration"),
     ({"duration": timedelta(seconds=-1)}, "duration")],
)
def test_to_next_batch_rejects_bad_amounts(kwargs: dict[str, object], argument: str) -> None:
    with pytest.raises(ConfigurationError, match=f"'{argument}' must be"):
        Timestamp().to_next_batch(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs", [{"epoch": -1}, {"batch": 1.0}, {"sample": True}, {"total_wct": 5.0}, {"batch_wct": None}]
)
def test_timestamp_constructor_validates(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError, match=f"'{next(iter(kwargs))}' must be"):
        Timestamp(**kwargs)  # type: ignore[arg-type]


def test_get_by_unit() -> None:
    ts = Timestamp(epoch=2, batch=30, sample=240, token=999, total_wct=timedelta(minutes=2, milliseconds=500))
    assert ts.get(TimeUnit.EPOCH) == 2
    assert ts.get(TimeUnit.BATCH) == 30
    assert ts.get(TimeUnit.SAMPLE) == 240
    assert ts.get(TimeUnit.TOKEN) == 999
    assert ts.get(TimeUnit.SECOND) == 120.5
    assert ts.get("ba") == 30  # type: ignore[arg-type]


def test_get_duration_needs_max_duration() -> None:
    with pytest.raises(ConfigurationError, match="max_duration"):
        Timestamp().get(TimeUnit.DURATION)


def _sample_timestamp() -> Timestamp:
    # Composer's test-pinned example (test_file_helpers.py).
    return Timestamp(
        epoch=0, batch=1, sample=2, token=3, batch_in_epoch=1, sample_in_epoch=2, token_in_epoch=3,
        total_wct=timedelta(hours=10), epoch_wct=timedelta(minutes=50), batch_wct=timedelta(seconds=5),
    )


def test_format_variables_match_composer() -> None:
    variables = _sample_timestamp().format_variables()
    assert variables == {
        "epoch": 0, "batch": 1, "batch_in_epoch": 1, "sample": 2, "sample_in_epoch": 2, "token": 3,
        "token_in_epoch": 3, "total_wct": 36000.0, "epoch_wct": 3000.0, "batch_wct": 5.0,
    }
    assert "t{total_wct}.pt".format(**variables) == "t36000.0.pt"
    assert type(variables["epoch"]) is int and type(variables["batch_wct"]) is float


def test_state_dict_round_trip_through_torch_weights_only() -> None:
    ts = _sample_timestamp().to_next_batch(samples=3, duration=timedelta(microseconds=250)).to_next_epoch()
    state = ts.state_dict()
    assert all(type(v) in (int, float) for v in state.values())
    buffer = io.BytesIO()
    torch.save({"timestamp": state}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["timestamp"]
    assert Timestamp.from_state_dict(loaded) == ts


def test_from_state_dict_defaults_missing_keys_to_zero() -> None:
    assert Timestamp.from_state_dict({"epoch": 3, "total_wct": 1.5}) == Timestamp(
        epoch=3, total_wct=timedelta(seconds=1.5)
    )
    assert Timestamp.from_state_dict({}) == Timestamp()


def test_from_state_dict_accepts_integral_float_counters() -> None:
    assert Timestamp.from_state_dict({"batch": 7.0}).batch == 7


def test_from_state_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigurationError, match="iteration") as info:
        Timestamp.from_state_dict({"epoch": 1, "iteration": 0})
    assert "batch_in_epoch" in str(info.value)


@pytest.mark.parametrize("state", [{"batch": -1}, {"batch": 1.5}, {"batch": "3"}, {"total_wct": "1s"},
                                   {"epoch_wct": -2.0}, {"batch_wct": float("nan")}])
def test_from_state_dict_rejects_bad_values(state: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError, match=f"'{next(iter(state))}' must be"):
        Timestamp.from_state_dict(state)  # type: ignore[arg-type]


def test_timestamp_repr_is_readable() -> None:
    text = repr(Timestamp(epoch=1, batch=5, sample=40, total_wct=timedelta(seconds=12.5)))
    assert text.startswith("Timestamp(epoch=1, batch=5, sample=40, token=0, batch_in_epoch=0,")
    assert "total_wct=12.5s" in text
