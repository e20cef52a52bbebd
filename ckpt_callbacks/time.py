"""Training time: units, durations such as ``'500ba'``, and the trainer's running :class:`Timestamp`.

Every interval, duration and file-name counter in the library is expressed with these types, so
that ``save_interval='500ba'``, ``max_duration='10ep'`` and ``{batch}`` in a file name all mean the
same thing. Time strings follow Composer's grammar (case-insensitive, surrounding whitespace
ignored):

==================  ===============================  ====================
string              meaning                          parsed as
==================  ===============================  ====================
``'1ep'``           one epoch                        ``Time(1, EPOCH)``
``'500ba'``         500 batches (optimizer steps)    ``Time(500, BATCH)``
``'64sp'``          64 samples                       ``Time(64, SAMPLE)``
``'3e4tok'``        30000 tokens                     ``Time(30000, TOKEN)``
``'0.5dur'``        half of ``max_duration``         ``Time(0.5, DURATION)``
``'10sec'``         10 seconds of training           ``Time(10, SECOND)``
``'1h30m'``         wall-clock form ``XhYmZs``       ``Time(5400, SECOND)``
==================  ===============================  ====================

A :class:`Timestamp` is immutable: the trainer replaces it with :meth:`Timestamp.to_next_batch` and
:meth:`Timestamp.to_next_epoch`, so a callback holding the previous one sees a consistent snapshot.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from enum import Enum
from typing import Any

from ckpt_callbacks.errors import ConfigurationError, bad_value

__all__ = ["Time", "TimeUnit", "Timestamp"]


class TimeUnit(str, Enum):
    """The units a :class:`Time` can be counted in.

    Example:
        >>> TimeUnit("ba") is TimeUnit.BATCH
        True
    """

    EPOCH = "ep"
    BATCH = "ba"
    SAMPLE = "sp"
    TOKEN = "tok"
    DURATION = "dur"
    SECOND = "sec"

    def __str__(self) -> str:
        return self.value


_ACCEPTED = (
    "a time string: a number and a unit (ep, ba, sp, tok, dur or sec) such as '1ep', '500ba', "
    "'64sp', '1000tok', '0.5dur' or '10sec', or a wall-clock time such as '30s', '5m' or '1h30m'"
)
_NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?"
_UNIT_RE = re.compile(rf"(?P<value>[+-]?{_NUMBER})\s*(?P<unit>ep|ba|sp|tok|dur|sec)")
# At least one component must be present; the lookahead refuses the empty string.
_WALL_CLOCK_RE = re.compile(r"(?=\d)(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s)?")


@dataclass(frozen=True)
class Time:
    """An amount of training time: a non-negative value and its unit.

    Values are whole numbers for every unit except ``dur`` (a fraction of ``max_duration``), which is
    kept as a ``float``. An integral float such as ``2.0`` is stored as the int ``2``.

    Example:
        >>> Time(500, TimeUnit.BATCH)
        Time('500ba')
        >>> str(Time.from_timestring("1h30m"))
        '5400sec'
    """

    value: int | float
    unit: TimeUnit

    def __post_init__(self) -> None:
        unit = _to_unit(self.unit, "unit")
        object.__setattr__(self, "unit", unit)
        object.__setattr__(self, "value", _check_value(self.value, unit, "value", self.value))

    def __str__(self) -> str:
        return f"{self.value}{self.unit.value}"

    def __repr__(self) -> str:
        return f"Time({str(self)!r})"

    @classmethod
    def from_timestring(cls, text: str, *, argument: str = "time") -> Time:
        """Parse a time string such as ``'1ep'``, ``'500ba'``, ``'0.5dur'`` or ``'1h30m'``.

        Unlike Composer, the wall-clock form accepts components beyond their clock range: ``'90m'``
        and ``'25h'`` are 90 minutes and 25 hours (Composer rejects them, users expect them to work).

        Args:
            text: The string to parse; case and surrounding whitespace are ignored.
            argument: The name of the user's argument, used in error messages.

        Returns:
            The parsed time; wall-clock forms are counted in seconds.

        Raises:
            ConfigurationError: ``text`` is not a time string, is negative, or has a fractional
                value in a unit other than ``dur``.

        Example:
            >>> Time.from_timestring("3e4tok")
            Time('30000tok')
            >>> Time.from_timestring(" 2H5m10S ")
            Time('7510sec')
        """
        if not isinstance(text, str):
            raise ConfigurationError(bad_value(argument, _ACCEPTED, text))
        normalized = text.strip().lower()
        clock = _WALL_CLOCK_RE.fullmatch(normalized)
        if clock is not None:
            hours, minutes, seconds = (int(clock.group(g) or 0) for g in "hms")
            return cls(hours * 3600 + minutes * 60 + seconds, TimeUnit.SECOND)
        match = _UNIT_RE.fullmatch(normalized)
        if match is None:
            raise ConfigurationError(bad_value(argument, _ACCEPTED, text))
        unit = TimeUnit(match.group("unit"))
        return cls(_check_value(float(match.group("value")), unit, argument, text), unit)

    @classmethod
    def from_input(
        cls,
        value: Time | str | int | float,
        default_unit: TimeUnit = TimeUnit.EPOCH,
        *,
        argument: str = "time",
    ) -> Time:
        """Turn what a user passed (a ``Time``, a time string or a bare number) into a ``Time``.

        Args:
            value: A ``Time`` (returned as is), a time string, or a non-negative whole number
                counted in ``default_unit`` (an integral float such as ``2.0`` is accepted).
            default_unit: The unit of a bare number.
            argument: The name of the user's argument, used in error messages.

        Returns:
            The time.

        Raises:
            ConfigurationError: ``value`` is of another type (``None``, ``bool``, a list, ...), is
                negative, or is a fractional number in a unit other than ``dur``.

        Example:
            >>> Time.from_input(3)
            Time('3ep')
            >>> Time.from_input("100ba")
            Time('100ba')
        """
        if isinstance(value, Time):
            return value
        if isinstance(value, str):
            return cls.from_timestring(value, argument=argument)
        unit = _to_unit(default_unit, "default_unit")
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return cls(_check_value(value, unit, argument, value), unit)
        accepted = f"a time string such as '1ep' or '500ba', a non-negative number of {unit.value}, or a Time"
        raise ConfigurationError(bad_value(argument, accepted, value))


def _to_unit(unit: object, argument: str) -> TimeUnit:
    try:
        return TimeUnit(unit)
    except ValueError:
        units = ", ".join(u.value for u in TimeUnit)
        raise ConfigurationError(bad_value(argument, f"a TimeUnit or one of {units}", unit)) from None


def _check_value(value: Any, unit: TimeUnit, argument: str, shown: object) -> int | float:
    """Validate a time value for ``unit`` and return it normalized (int, or float for ``dur``)."""
    # numbers.Real also admits numpy scalars, which users get from configs computed with numpy.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigurationError(bad_value(argument, f"a finite number of {unit.value}", shown))
    if value < 0:
        raise ConfigurationError(bad_value(argument, f"a non-negative time, i.e. {_ACCEPTED}", shown))
    if unit is TimeUnit.DURATION:
        return float(value)
    if value != int(value):
        whole = f"a whole number of {unit.value}; only 'dur' takes a fraction such as '0.5dur'"
        raise ConfigurationError(bad_value(argument, whole, shown))
    return int(value)


_ZERO = timedelta(0)
_COUNTERS = ("epoch", "batch", "sample", "token", "batch_in_epoch", "sample_in_epoch", "token_in_epoch")
_CLOCKS = ("total_wct", "epoch_wct", "batch_wct")


@dataclass(frozen=True, repr=False)
class Timestamp:
    """Where a training run is: completed epochs, batches, samples, tokens and training wall-clock.

    ``batch``, ``sample`` and ``token`` are run totals; the ``*_in_epoch`` counters and
    ``epoch_wct``/``batch_wct`` restart at every epoch. ``total_wct`` counts training time only
    (evaluation is excluded), as in Composer.

    Example:
        >>> ts = Timestamp().to_next_batch(samples=8).to_next_batch(samples=8)
        >>> ts.batch, ts.sample, ts.to_next_epoch().batch_in_epoch
        (2, 16, 0)
    """

    epoch: int = 0
    batch: int = 0
    sample: int = 0
    token: int = 0
    batch_in_epoch: int = 0
    sample_in_epoch: int = 0
    token_in_epoch: int = 0
    total_wct: timedelta = _ZERO
    epoch_wct: timedelta = _ZERO
    batch_wct: timedelta = _ZERO

    def __post_init__(self) -> None:
        for name in _COUNTERS:
            _check_count(name, getattr(self, name))
        for name in _CLOCKS:
            _check_duration(name, getattr(self, name))

    def __repr__(self) -> str:
        counters = ", ".join(f"{name}={getattr(self, name)}" for name in _COUNTERS)
        clocks = ", ".join(f"{name}={getattr(self, name).total_seconds()}s" for name in _CLOCKS)
        return f"Timestamp({counters}, {clocks})"

    def to_next_batch(self, samples: int = 0, tokens: int = 0, duration: timedelta = _ZERO) -> Timestamp:
        """Return the timestamp after one more batch of ``samples`` samples and ``tokens`` tokens.

        Args:
            samples: Samples in the batch (summed over ranks).
            tokens: Tokens in the batch (summed over ranks).
            duration: Wall-clock time the batch took.

        Returns:
            The new timestamp; this one is unchanged.

        Example:
            >>> Timestamp().to_next_batch(samples=4, duration=timedelta(seconds=2)).batch_wct
            datetime.timedelta(seconds=2)
        """
        _check_count("samples", samples)
        _check_count("tokens", tokens)
        _check_duration("duration", duration)
        return replace(
            self,
            batch=self.batch + 1,
            batch_in_epoch=self.batch_in_epoch + 1,
            sample=self.sample + samples,
            sample_in_epoch=self.sample_in_epoch + samples,
            token=self.token + tokens,
            token_in_epoch=self.token_in_epoch + tokens,
            total_wct=self.total_wct + duration,
            epoch_wct=self.epoch_wct + duration,
            batch_wct=duration,
        )

    def to_next_epoch(self) -> Timestamp:
        """Return the timestamp after the current epoch ends: totals kept, in-epoch counters reset.

        Example:
            >>> ts = Timestamp(batch=5, batch_in_epoch=5).to_next_epoch()
            >>> ts.epoch, ts.batch, ts.batch_in_epoch
            (1, 5, 0)
        """
        return replace(
            self,
            epoch=self.epoch + 1,
            batch_in_epoch=0,
            sample_in_epoch=0,
            token_in_epoch=0,
            epoch_wct=_ZERO,
            batch_wct=_ZERO,
        )

    def get(self, unit: TimeUnit) -> int | float:
        """Return the run total in ``unit`` (seconds of training for ``sec``).

        Raises:
            ConfigurationError: ``unit`` is ``dur``, which is only defined against a ``max_duration``.

        Example:
            >>> Timestamp(batch=7).get(TimeUnit.BATCH)
            7
        """
        totals: dict[TimeUnit, int | float] = {
            TimeUnit.EPOCH: self.epoch,
            TimeUnit.BATCH: self.batch,
            TimeUnit.SAMPLE: self.sample,
            TimeUnit.TOKEN: self.token,
            TimeUnit.SECOND: self.total_wct.total_seconds(),
        }
        unit = _to_unit(unit, "unit")
        if unit not in totals:
            accepted = "one of ep, ba, sp, tok or sec ('dur' needs a max_duration to be measured against)"
            raise ConfigurationError(bad_value("unit", accepted, unit.value))
        return totals[unit]

    def state_dict(self) -> dict[str, int | float]:
        """Return the timestamp as plain ints and float seconds, loadable with ``weights_only=True``.

        Example:
            >>> Timestamp(epoch=2, total_wct=timedelta(seconds=1.5)).state_dict()["total_wct"]
            1.5
        """
        state: dict[str, int | float] = {name: getattr(self, name) for name in _COUNTERS}
        state.update({name: getattr(self, name).total_seconds() for name in _CLOCKS})
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, int | float]) -> Timestamp:
        """Rebuild a timestamp from :meth:`state_dict`; missing keys read as 0.

        Raises:
            ConfigurationError: ``state`` has a key that is not a timestamp field, or a bad value.

        Example:
            >>> Timestamp.from_state_dict({"epoch": 3, "batch": 30}) == Timestamp(epoch=3, batch=30)
            True
        """
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(key) for key in state if key not in known)
        if unknown:
            accepted = "a timestamp state dict with keys among " + ", ".join(known)
            raise ConfigurationError(bad_value("state_dict", accepted, unknown))
        counters = {name: _whole(name, state[name]) for name in _COUNTERS if name in state}
        clocks = {name: _seconds(name, state[name]) for name in _CLOCKS if name in state}
        return cls(**counters, **clocks)

    def format_variables(self) -> dict[str, int | float]:
        """Return the time variables of file-name templates (``{epoch}``, ``{total_wct}``, ...).

        The ``*_wct`` values are float seconds, as in Composer (``total_wct=36000.0``).

        Example:
            >>> Timestamp(batch=1).format_variables()["batch"]
            1
        """
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "batch_in_epoch": self.batch_in_epoch,
            "sample": self.sample,
            "sample_in_epoch": self.sample_in_epoch,
            "token": self.token,
            "token_in_epoch": self.token_in_epoch,
            "total_wct": self.total_wct.total_seconds(),
            "epoch_wct": self.epoch_wct.total_seconds(),
            "batch_wct": self.batch_wct.total_seconds(),
        }


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(bad_value(name, "a non-negative int", value))


def _check_duration(name: str, value: object) -> None:
    if not isinstance(value, timedelta) or value < _ZERO:
        raise ConfigurationError(bad_value(name, "a non-negative datetime.timedelta", value))


def _whole(name: str, value: object) -> int:
    """Read a stored counter; an integral float (from a JSON or foreign writer) is accepted."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    _check_count(name, value)
    return value  # type: ignore[return-value]


def _seconds(name: str, value: object) -> timedelta:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigurationError(bad_value(name, "a non-negative number of seconds", value))
    return timedelta(seconds=value)
