"""Retention policies: which committed checkpoints must be kept.

A policy is a small object with one method, :meth:`RetentionPolicy.keep`, that looks at the
checkpoints a saver has recorded (oldest first, earlier runs of the saver included) and returns the
save sequence numbers it keeps. Policies compose with :class:`KeepAny`; a checkpoint is deleted only
when no policy keeps it and nothing else protects it (the target of ``latest``, a checkpoint still
in flight, the checkpoint the run resumed from until a newer one is committed):

==============================================  ==================================================
policy                                          keeps
==============================================  ==================================================
``KeepAll()``                                   every checkpoint (``num_checkpoints_to_keep=-1``)
``KeepLast(2)``                                 the 2 last committed (``num_checkpoints_to_keep=2``)
``KeepBest(3, 'val/loss')``                     the 3 with the lowest ``val/loss`` (NaN never)
``KeepBest(1, 'val/acc', mode='max')``          the one with the highest ``val/acc``
``KeepEvery('5ep')``, ``KeepEvery('1000ba')``   milestones: every 5th epoch end, every 1000th batch
``KeepWithin('2h')``                            those committed in the last 2 hours (wall clock)
``KeepAny([KeepLast(2), KeepEvery('5ep')])``    what any of its policies keeps
==============================================  ==================================================

Policies are pure functions of the record: they keep no state of their own, so the same answer
comes back after a resume, when the record (with the scores of earlier runs) is read again.
``num_checkpoints_to_keep=n`` is the Composer shorthand for ``KeepLast(n)``.
"""

from __future__ import annotations

import math
import numbers
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Callable, Iterable, Protocol, Sequence

from ckpt_callbacks.errors import ConfigurationError, bad_value
from ckpt_callbacks.naming import DIST_VARIABLES, RUN_VARIABLES, NameTemplate
from ckpt_callbacks.time import Time, Timestamp, TimeUnit

if TYPE_CHECKING:
    from ckpt_callbacks.record import CheckpointInfo

__all__ = [
    "KeepAll",
    "KeepAny",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "KeepWithin",
    "RetentionPolicy",
    "check_best_filename",
    "find_best_policy",
    "keeps_nothing",
    "retention_from_arguments",
]

BEST_MODES = ("min", "max")
MILESTONE_UNITS = (TimeUnit.EPOCH, TimeUnit.BATCH, TimeUnit.SAMPLE, TimeUnit.TOKEN)


class RetentionPolicy(Protocol):
    """Decides which checkpoints are kept.

    Example:
        >>> class KeepOdd:
        ...     def keep(self, checkpoints):
        ...         return {c.seq for c in checkpoints if c.seq % 2}
    """

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        """Return the ``seq`` of every checkpoint to keep; ``checkpoints`` are oldest first."""
        ...


def _check_policy(argument: str, policy: object) -> None:
    if not callable(getattr(policy, "keep", None)):
        raise ConfigurationError(bad_value(argument, "a retention policy such as KeepLast(3)", policy))


@dataclass(frozen=True, repr=False)
class KeepAll:
    """Keep every checkpoint (``num_checkpoints_to_keep=-1``, the default).

    Example:
        >>> KeepAll()
        KeepAll()
    """

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        """Keep them all."""
        return {checkpoint.seq for checkpoint in checkpoints}

    def __repr__(self) -> str:
        return "KeepAll()"


@dataclass(frozen=True, repr=False)
class KeepLast:
    """Keep the newest ``n`` checkpoints: the last ``n`` committed, whatever their step counters.

    ``KeepLast(0)`` keeps none locally (each file is deleted right after it is saved, and no
    ``latest`` link is made), as Composer's ``num_checkpoints_to_keep=0`` does.

    Example:
        >>> KeepLast(2)
        KeepLast(2)
    """

    n: int

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise ConfigurationError(bad_value("KeepLast(n)", "an int >= 0", self.n))

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        """Keep the ``n`` with the highest save sequence."""
        newest = sorted(checkpoint.seq for checkpoint in checkpoints)
        return set(newest[max(0, len(newest) - self.n) :])

    def __repr__(self) -> str:
        return f"KeepLast({self.n})"


@dataclass(frozen=True, repr=False)
class KeepBest:
    """Keep the ``n`` best checkpoints by a metric recorded with them.

    A checkpoint's metrics are the trainer's metrics at save time (``State.metrics``, e.g. our
    Trainer's evaluation results), an explicit ``CheckpointManager.save(..., score=...)``, or
    metrics that arrived after the save (``CheckpointManager.update_metrics``). A checkpoint without
    the metric, or whose value is NaN, is never among the best. Of equal scores the newer wins.

    Args:
        n: how many to keep, at least 1.
        metric: the metric's name, as in ``State.metrics`` (``'val/loss'``); ``'score'`` for
            checkpoints saved with ``score=<float>``.
        mode: ``'min'`` (lower is better, e.g. a loss) or ``'max'`` (e.g. an accuracy).

    Raises:
        ConfigurationError: ``n`` is not an int >= 1, ``metric`` is not a non-empty string, or
            ``mode`` is neither ``'min'`` nor ``'max'``.

    Example:
        >>> KeepBest(3, "val/loss")
        KeepBest(3, 'val/loss', mode='min')
    """

    n: int
    metric: str
    mode: str = "min"

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ConfigurationError(bad_value("KeepBest(n)", "an int >= 1", self.n))
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigurationError(bad_value("KeepBest(metric)", "a metric name such as 'val/loss'", self.metric))
        if self.mode not in BEST_MODES:
            raise ConfigurationError(bad_value("KeepBest(mode)", "'min' or 'max'", self.mode))

    def score(self, checkpoint: CheckpointInfo) -> float | None:
        """The checkpoint's value of :attr:`metric`; None when it has none, or NaN."""
        value = checkpoint.metrics.get(self.metric)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            return None
        return float(value)

    def ranked(self, checkpoints: Sequence[CheckpointInfo]) -> list[CheckpointInfo]:
        """The scored checkpoints, best first; of equal scores the newer (higher ``seq``) first."""
        sign = 1.0 if self.mode == "min" else -1.0
        scored = [(sign * score, -c.seq, c) for c in checkpoints if (score := self.score(c)) is not None]
        return [c for *_, c in sorted(scored, key=lambda item: item[:2])]

    def best(self, checkpoints: Sequence[CheckpointInfo]) -> CheckpointInfo | None:
        """The best checkpoint, or None when none is scored."""
        ranked = self.ranked(checkpoints)
        return ranked[0] if ranked else None

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        """Keep the ``n`` best scored checkpoints."""
        return {c.seq for c in self.ranked(checkpoints)[: self.n]}

    def __repr__(self) -> str:
        return f"KeepBest({self.n}, {self.metric!r}, mode={self.mode!r})"


@dataclass(frozen=True, repr=False)
class KeepEvery:
    """Keep milestones: the checkpoints whose training time is a multiple of ``interval``.

    ``'1000ba'`` keeps the checkpoints saved at batch 1000, 2000, ...; ``'64000sp'`` and ``'1e9tok'``
    likewise count samples and tokens. ``'5ep'`` keeps those saved at the end of every 5th epoch:
    at an epoch boundary (``EPOCH_CHECKPOINT``, in-epoch counters at 0). A saver on a batch interval
    writes its end-of-epoch checkpoint at ``BATCH_CHECKPOINT``, before the epoch is counted, so give
    it batch milestones instead (``'500ba'`` is every 5th epoch of 100 batches). Pick an interval
    that the saves can land on: with 8 samples a batch, ``'100sp'`` keeps only every 200th sample.

    Args:
        interval: a positive time string, ``Time`` or int (epochs) in ``ep``, ``ba``, ``sp`` or ``tok``.

    Raises:
        ConfigurationError: another unit (``dur``, wall clock: see :class:`KeepWithin`), zero,
            negative, or not a time.

    Example:
        >>> KeepEvery("5ep")
        KeepEvery('5ep')
    """

    interval: Time

    def __post_init__(self) -> None:
        accepted = "a positive interval in ep, ba, sp or tok, such as '5ep' or '1000ba'"
        if isinstance(self.interval, (Time, str, int)) and not isinstance(self.interval, bool):
            interval = Time.from_input(self.interval, TimeUnit.EPOCH, argument="KeepEvery(interval)")
        else:
            raise ConfigurationError(bad_value("KeepEvery(interval)", accepted, self.interval))
        if interval.unit not in MILESTONE_UNITS or interval.value <= 0:
            raise ConfigurationError(bad_value("KeepEvery(interval)", accepted, self.interval))
        object.__setattr__(self, "interval", interval)

    def is_milestone(self, timestamp: Timestamp) -> bool:
        """Whether a checkpoint saved at ``timestamp`` is a milestone."""
        unit, step = self.interval.unit, self.interval.value
        if unit is TimeUnit.EPOCH:
            return timestamp.batch_in_epoch == 0 and timestamp.epoch % step == 0
        return timestamp.get(unit) % step == 0

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        """Keep every milestone."""
        return {c.seq for c in checkpoints if self.is_milestone(c.timestamp)}

    def __repr__(self) -> str:
        return f"KeepEvery({str(self.interval)!r})"


@dataclass(frozen=True, repr=False)
class KeepWithin:
    """Keep the checkpoints committed within ``duration`` of now (wall clock, not training time).

    Args:
        duration: ``'2h'``, ``'30m'``, ``'90sec'``, a :class:`~datetime.timedelta`, a ``Time`` in
            seconds, or a number of seconds; positive.
        clock: returns the current time in seconds since the epoch (``time.time``); tests pass
            their own.

    Raises:
        ConfigurationError: a duration that is not positive or not a wall-clock time, or a clock
            that is not callable.

    Example:
        >>> KeepWithin("2h")
        KeepWithin('7200sec')
    """

    duration: float
    clock: Callable[[], float] = field(default=time.time, kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "duration", _seconds(self.duration))
        if not callable(self.clock):
            raise ConfigurationError(bad_value("KeepWithin(clock)", "a callable returning seconds", self.clock))

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        """Keep those saved at most ``duration`` seconds ago."""
        oldest = self.clock() - self.duration
        return {c.seq for c in checkpoints if c.saved_at >= oldest}

    def __repr__(self) -> str:
        shown = f"'{int(self.duration)}sec'" if self.duration.is_integer() else repr(self.duration)
        return f"KeepWithin({shown})"


def _seconds(duration: object) -> float:
    accepted = "a positive wall-clock duration such as '2h', '30m', '90sec', a timedelta or a number of seconds"
    if isinstance(duration, timedelta):
        seconds = duration.total_seconds()
    elif isinstance(duration, (str, Time)):
        parsed = Time.from_input(duration, TimeUnit.SECOND, argument="KeepWithin(duration)")
        if parsed.unit is not TimeUnit.SECOND:
            raise ConfigurationError(bad_value("KeepWithin(duration)", accepted, duration))
        seconds = float(parsed.value)
    elif isinstance(duration, numbers.Real) and not isinstance(duration, bool):
        seconds = float(duration)
    else:
        raise ConfigurationError(bad_value("KeepWithin(duration)", accepted, duration))
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(bad_value("KeepWithin(duration)", accepted, duration))
    return seconds


@dataclass(frozen=True, repr=False)
class KeepAny:
    """Keep what any of ``policies`` keeps (a union, like Orbax's ``AnyPreservationPolicy``).

    Raises:
        ConfigurationError: ``policies`` is empty, not a list, or holds something without ``keep``.

    Example:
        >>> KeepAny([KeepLast(2), KeepBest(3, "val/loss"), KeepEvery("5ep")])
        KeepAny([KeepLast(2), KeepBest(3, 'val/loss', mode='min'), KeepEvery('5ep')])
    """

    policies: tuple[RetentionPolicy, ...]

    def __init__(self, policies: Iterable[RetentionPolicy]) -> None:
        accepted = "a non-empty list of retention policies such as [KeepLast(2), KeepEvery('5ep')]"
        if isinstance(policies, (str, bytes)) or not isinstance(policies, Iterable):
            raise ConfigurationError(bad_value("KeepAny(policies)", accepted, policies))
        collected = tuple(policies)
        if not collected:
            raise ConfigurationError(bad_value("KeepAny(policies)", accepted, policies))
        for policy in collected:
            _check_policy("KeepAny(policies)", policy)
        object.__setattr__(self, "policies", collected)

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        """The union of what each policy keeps."""
        kept: set[int] = set()
        for policy in self.policies:
            kept |= set(policy.keep(checkpoints))
        return kept

    def __repr__(self) -> str:
        return f"KeepAny([{', '.join(map(repr, self.policies))}])"


def find_best_policy(policy: RetentionPolicy) -> KeepBest | None:
    """The :class:`KeepBest` in ``policy`` (itself, or the first inside a :class:`KeepAny`); None if none.

    It names the metric and mode of the ``best`` link.

    Example:
        >>> find_best_policy(KeepAny([KeepLast(2), KeepBest(3, "val/loss")]))
        KeepBest(3, 'val/loss', mode='min')
    """
    if isinstance(policy, KeepBest):
        return policy
    if isinstance(policy, KeepAny):
        for child in policy.policies:
            found = find_best_policy(child)
            if found is not None:
                return found
    return None


def check_best_filename(best_filename: str | os.PathLike | None, retention: RetentionPolicy) -> NameTemplate | None:
    """Validate the template of the ``best`` link: run and rank variables only, and a ``KeepBest`` to rank by.

    Raises:
        InvalidTemplateError: a bad template, or one with time variables (there is one ``best``).
        ConfigurationError: ``retention`` holds no :class:`KeepBest`.

    Example:
        >>> check_best_filename("best-rank{rank}.pt", KeepBest(1, "val/loss"))
        NameTemplate('best-rank{rank}.pt', argument='best_filename')
    """
    if best_filename is None:
        return None
    template = NameTemplate(best_filename, argument="best_filename", allowed=RUN_VARIABLES + DIST_VARIABLES)
    if find_best_policy(retention) is None:
        raise ConfigurationError(
            f"best_filename={template.template!r} needs a KeepBest policy in 'retention' to rank checkpoints "
            f"(got retention={retention!r}); e.g. retention=KeepAny([KeepLast(2), KeepBest(1, 'val/loss')])"
        )
    return template


def retention_from_arguments(num_checkpoints_to_keep: int, retention: RetentionPolicy | None) -> RetentionPolicy:
    """Turn the saver's ``num_checkpoints_to_keep`` and ``retention`` arguments into one policy.

    Raises:
        ConfigurationError: a count below -1, a non-int count, both arguments given, or a
            ``retention`` that is not a policy object.

    Example:
        >>> retention_from_arguments(2, None)
        KeepLast(2)
        >>> retention_from_arguments(-1, KeepBest(1, "val/loss"))
        KeepBest(1, 'val/loss', mode='min')
    """
    if isinstance(num_checkpoints_to_keep, bool) or not isinstance(num_checkpoints_to_keep, int):
        raise ConfigurationError(
            bad_value("num_checkpoints_to_keep", "an int: -1 (keep all), 0 (keep none) or n > 0", num_checkpoints_to_keep)
        )
    if num_checkpoints_to_keep < -1:
        raise ConfigurationError(
            bad_value("num_checkpoints_to_keep", "-1 (keep all), 0 (keep none) or n > 0", num_checkpoints_to_keep)
        )
    if retention is not None:
        if num_checkpoints_to_keep != -1:
            raise ConfigurationError(
                "give either 'num_checkpoints_to_keep' or 'retention', not both "
                f"(got num_checkpoints_to_keep={num_checkpoints_to_keep} and retention={retention!r}); "
                f"num_checkpoints_to_keep={num_checkpoints_to_keep} is retention=KeepLast({num_checkpoints_to_keep})"
            )
        _check_policy("retention", retention)
        return retention
    return KeepAll() if num_checkpoints_to_keep == -1 else KeepLast(num_checkpoints_to_keep)


def keeps_nothing(policy: RetentionPolicy) -> bool:
    """Whether ``policy`` is ``KeepLast(0)``: nothing is kept locally, so no ``latest`` link is made.

    Example:
        >>> keeps_nothing(KeepLast(0)), keeps_nothing(KeepLast(2))
        (True, False)
    """
    return isinstance(policy, KeepLast) and policy.n == 0
