"""Save policies: when a checkpoint is due, as tiny objects with one ``should_save(state, event)``.

:func:`create_save_policy` turns a user's ``save_interval`` into a policy::

    '1ep'            -> AnyOf(EveryInterval(Time('1ep')), AtEndOfTraining())
    '500ba', '30m'   -> AnyOf(EveryInterval(...), AtEndOfTraining())
    '0.25dur'        -> AnyOf(EveryFractionOfDuration(0.25), AtEndOfTraining())
    0, '0ep', '0ba'  -> Never()              (no saving at all, not even at the end)
    fn(state, event) -> CallablePolicy(fn)   (no implicit final save)

The rules are Composer's: epoch intervals fire at ``EPOCH_CHECKPOINT``; batch, sample, token,
second and duration intervals fire at ``BATCH_CHECKPOINT``, when the count crosses a multiple of
the interval between the previous timestamp and the current one (so a batch of 8 samples that
carries the count from 16 to 24 crosses ``'20sp'``). "Also at the end of training" is its own
policy, :class:`AtEndOfTraining`, so that it can be combined with any other. Keeping each rule in
its own object lets a saver, a test or a user compose them without a flag per combination.

Policies only decide. Never saving twice for the same batch (an interval and the end of training
can both be due at once) is the saver's job.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol, runtime_checkable

from ckpt_callbacks.errors import ConfigurationError, bad_value
from ckpt_callbacks.events import Event
from ckpt_callbacks.time import Time, Timestamp, TimeUnit

__all__ = [
    "AnyOf",
    "AtEndOfTraining",
    "CallablePolicy",
    "EveryFractionOfDuration",
    "EveryInterval",
    "IntervalState",
    "Never",
    "SavePolicy",
    "create_save_policy",
]

_CHECKPOINT_EVENTS = (Event.BATCH_CHECKPOINT, Event.EPOCH_CHECKPOINT)
_ACCEPTED = "a time string such as '1ep' or '500ba', an int (epochs), a Time, or a callable (state, event) -> bool"


class IntervalState(Protocol):
    """What a policy reads from the trainer's state (``State`` and the trainer adapters provide it).

    ``previous_timestamp`` is the timestamp before the last advance (``None`` before the first
    batch); ``max_duration`` is in ``ep``, ``ba``, ``sp`` or ``tok`` (``None``: length unknown);
    ``dataloader_len`` is the number of batches per epoch, ``None`` when unsized.

    Example:
        >>> from types import SimpleNamespace
        >>> state = SimpleNamespace(timestamp=Timestamp(batch=2), previous_timestamp=Timestamp(batch=1),
        ...                         max_duration=Time(10, TimeUnit.BATCH), dataloader_len=5)
        >>> EveryInterval(Time(2, TimeUnit.BATCH)).should_save(state, Event.BATCH_CHECKPOINT)
        True
    """

    @property
    def timestamp(self) -> Timestamp: ...

    @property
    def previous_timestamp(self) -> Timestamp | None: ...

    @property
    def max_duration(self) -> Time | None: ...

    @property
    def dataloader_len(self) -> int | None: ...


@runtime_checkable
class SavePolicy(Protocol):
    """Decides, at a checkpoint event, whether a checkpoint is due.

    Example:
        >>> class OnBatch3:
        ...     def should_save(self, state, event):
        ...         return state.timestamp.batch == 3
        >>> isinstance(OnBatch3(), SavePolicy)
        True
    """

    def should_save(self, state: IntervalState, event: Event) -> bool:
        """Return True when a checkpoint should be written now."""
        ...


def _crossed(previous: int | float, current: int | float, step: int | float) -> bool:
    """True when a multiple of ``step`` lies in ``(previous, current]``."""
    return math.floor(previous / step) != math.floor(current / step)


def _count(timestamp: Timestamp, unit: TimeUnit) -> int | float:
    # Whole seconds, as Composer does, so '30sec' fires once per 30-second boundary crossed.
    return int(timestamp.total_wct.total_seconds()) if unit is TimeUnit.SECOND else timestamp.get(unit)


@dataclass(frozen=True)
class EveryInterval:
    """Save every ``time``: epochs at ``EPOCH_CHECKPOINT``; ``ba``/``sp``/``tok``/``sec`` at ``BATCH_CHECKPOINT``.

    Args:
        time: A positive interval in any unit but ``dur`` (see :class:`EveryFractionOfDuration`).

    Example:
        >>> EveryInterval(Time.from_timestring("500ba"))
        EveryInterval(time=Time('500ba'))
    """

    time: Time

    def __post_init__(self) -> None:
        if not isinstance(self.time, Time) or self.time.unit is TimeUnit.DURATION or self.time.value <= 0:
            accepted = "a positive Time in ep, ba, sp, tok or sec (use EveryFractionOfDuration for 'dur')"
            raise ConfigurationError(bad_value("time", accepted, self.time))

    def should_save(self, state: IntervalState, event: Event) -> bool:
        """Return True at this unit's event when the count crossed a multiple of the interval."""
        previous = state.previous_timestamp
        due_event = Event.EPOCH_CHECKPOINT if self.time.unit is TimeUnit.EPOCH else Event.BATCH_CHECKPOINT
        if previous is None or event != due_event:
            return False
        unit = self.time.unit
        return _crossed(_count(previous, unit), _count(state.timestamp, unit), self.time.value)


@dataclass(frozen=True)
class EveryFractionOfDuration:
    """Save every ``fraction`` of ``max_duration``, at ``BATCH_CHECKPOINT`` (Composer's ``dur`` rules).

    With ``max_duration`` in epochs the step is ``ceil(max_epochs * fraction * dataloader_len)``
    batches; in batches it is ``ceil(max_batches * fraction)`` batches; in both a save is due when
    the batch count is a multiple of the step. In samples or tokens the step is
    ``ceil(max * fraction)`` of that unit, and a save is due when the count crosses a multiple.

    Args:
        fraction: A number in (0, 1].

    Raises:
        RuntimeError: from :meth:`should_save`, when ``max_duration`` is in epochs and the
            dataloader has no length (the number of batches per epoch is unknown).

    Example:
        >>> EveryFractionOfDuration(0.25)
        EveryFractionOfDuration(fraction=0.25)
    """

    fraction: float

    def __post_init__(self) -> None:
        value = self.fraction
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ConfigurationError(bad_value("fraction", "a number in (0, 1], such as 0.25", value))
        object.__setattr__(self, "fraction", float(value))

    def should_save(self, state: IntervalState, event: Event) -> bool:
        """Return True at ``BATCH_CHECKPOINT`` when the run reached the next fraction of its length."""
        previous, max_duration = state.previous_timestamp, state.max_duration
        if previous is None or max_duration is None or event != Event.BATCH_CHECKPOINT:
            return False
        # Exact decimal arithmetic: 10 * 0.3 is 3.0000000000000004 in floats, and ceil would give 4.
        portion = Fraction(str(self.fraction)) * Fraction(str(max_duration.value))
        unit = max_duration.unit
        if unit is TimeUnit.EPOCH:
            if state.dataloader_len is None:
                raise RuntimeError(
                    f"save_interval '{self.fraction}dur' with max_duration {str(max_duration)!r} needs the "
                    "number of batches per epoch, but the train dataloader has no length; give "
                    "max_duration in batches ('ba') or use a dataloader with __len__"
                )
            return state.timestamp.batch % max(1, math.ceil(portion * state.dataloader_len)) == 0
        if unit is TimeUnit.BATCH:
            return state.timestamp.batch % max(1, math.ceil(portion)) == 0
        if unit in (TimeUnit.SAMPLE, TimeUnit.TOKEN):
            step = max(1, math.ceil(portion))
            return _crossed(previous.get(unit), state.timestamp.get(unit), step)
        raise ConfigurationError(bad_value("max_duration", "a Time in ep, ba, sp or tok", max_duration))


@dataclass(frozen=True)
class AtEndOfTraining:
    """Save once the run has reached ``max_duration`` (the final checkpoint).

    Due at ``BATCH_CHECKPOINT`` and ``EPOCH_CHECKPOINT``: with ``max_duration`` in epochs the end is
    first seen at an ``EPOCH_CHECKPOINT``, in other units at a ``BATCH_CHECKPOINT``. A run without a
    known ``max_duration`` never reaches its end here.

    Example:
        >>> AtEndOfTraining()
        AtEndOfTraining()
    """

    def should_save(self, state: IntervalState, event: Event) -> bool:
        """Return True at a checkpoint event once the elapsed fraction of the run is at least 1."""
        max_duration = state.max_duration
        if state.previous_timestamp is None or max_duration is None or event not in _CHECKPOINT_EVENTS:
            return False
        # Same as elapsed / max_duration >= 1, without dividing by a zero max_duration.
        return state.timestamp.get(max_duration.unit) >= max_duration.value


@dataclass(frozen=True)
class AnyOf:
    """Save when any of ``policies`` says so.

    Example:
        >>> AnyOf([EveryInterval(Time.from_timestring("1ep")), AtEndOfTraining()])
        AnyOf(policies=(EveryInterval(time=Time('1ep')), AtEndOfTraining()))
    """

    policies: tuple[SavePolicy, ...]

    def __init__(self, policies: Iterable[SavePolicy]) -> None:
        collected = tuple(policies)
        for policy in collected:
            if not isinstance(policy, SavePolicy):
                raise ConfigurationError(bad_value("policies", "save policies (objects with should_save)", policy))
        object.__setattr__(self, "policies", collected)

    def should_save(self, state: IntervalState, event: Event) -> bool:
        """Return True when at least one policy is due."""
        if state.previous_timestamp is None:
            return False
        return any(policy.should_save(state, event) for policy in self.policies)


@dataclass(frozen=True)
class Never:
    """Never save (``save_interval=0``): not at intervals, not at the end.

    Example:
        >>> Never().should_save(None, Event.EPOCH_CHECKPOINT)
        False
    """

    def should_save(self, state: IntervalState, event: Event) -> bool:
        """Return False."""
        return False


@dataclass(frozen=True)
class CallablePolicy:
    """Save when the user's ``fn(state, event)`` returns something truthy; no implicit final save.

    Example:
        >>> CallablePolicy(lambda state, event: state.timestamp.batch % 100 == 0)  # doctest: +ELLIPSIS
        CallablePolicy(fn=<function <lambda> at ...>)
    """

    fn: Callable[[Any, Event], Any]

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ConfigurationError(bad_value("fn", "a callable (state, event) -> bool", self.fn))

    def should_save(self, state: IntervalState, event: Event) -> bool:
        """Return ``bool(fn(state, event))``; False before the first batch."""
        if state.previous_timestamp is None:
            return False
        return bool(self.fn(state, event))


def create_save_policy(save_interval: Any, *, argument: str = "save_interval") -> SavePolicy:
    """Turn a user's ``save_interval`` into a :class:`SavePolicy`.

    Args:
        save_interval: A time string (``'1ep'``, ``'500ba'``, ``'0.25dur'``, ``'30m'``, ...), an int
            or integral float (epochs), a :class:`Time`, a callable ``(state, event) -> bool``, or a
            ready :class:`SavePolicy` (returned as is). Zero (``0``, ``'0ep'``, ``'0ba'``) disables
            saving, including the final checkpoint; ``dur`` values must be in (0, 1].
        argument: The name of the user's argument, used in error messages.

    Returns:
        The policy. Intervals also save at the end of training; callables do not (as in Composer).

    Raises:
        ConfigurationError: ``save_interval`` is of another type (``None``, ``bool``, a list, ...)
            or an invalid time.

    Example:
        >>> create_save_policy("500ba")
        AnyOf(policies=(EveryInterval(time=Time('500ba')), AtEndOfTraining()))
        >>> create_save_policy(0)
        Never()
    """
    if isinstance(save_interval, SavePolicy):
        return save_interval
    if isinstance(save_interval, (Time, str, int, float)) and not isinstance(save_interval, bool):
        time = Time.from_input(save_interval, TimeUnit.EPOCH, argument=argument)
    elif callable(save_interval):
        return CallablePolicy(save_interval)
    else:
        raise ConfigurationError(bad_value(argument, _ACCEPTED, save_interval))
    if time.unit is TimeUnit.DURATION:
        if not 0 < time.value <= 1:
            accepted = "a fraction of max_duration in (0, 1], such as '0.25dur'"
            raise ConfigurationError(bad_value(argument, accepted, save_interval))
        interval: SavePolicy = EveryFractionOfDuration(time.value)
    elif time.value == 0:
        return Never()
    else:
        interval = EveryInterval(time)
    return AnyOf([interval, AtEndOfTraining()])
