"""Retention policies: which committed checkpoints must be kept.

A policy is a small object with one method, :meth:`RetentionPolicy.keep`, that looks at the
checkpoints a saver has recorded (oldest first) and returns the save sequence numbers it keeps. A
checkpoint is deleted only when no policy keeps it and nothing else protects it (the target of
``latest``, a checkpoint still in flight, the checkpoint the run resumed from).
``num_checkpoints_to_keep=n`` is the Composer shorthand for ``KeepLast(n)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

from ckpt_callbacks.errors import ConfigurationError, bad_value

if TYPE_CHECKING:
    from ckpt_callbacks.manager import CheckpointInfo

__all__ = ["KeepAll", "KeepLast", "RetentionPolicy", "retention_from_arguments"]


class RetentionPolicy(Protocol):
    """Decides which checkpoints are kept."""

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        """Return the ``seq`` of every checkpoint to keep; ``checkpoints`` are oldest first."""
        ...


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


class KeepLast:
    """Keep the newest ``n`` checkpoints: the last ``n`` committed, whatever their step counters.

    ``KeepLast(0)`` keeps none locally (each file is deleted right after it is saved, and no
    ``latest`` link is made), as Composer's ``num_checkpoints_to_keep=0`` does.

    Example:
        >>> KeepLast(2)
        KeepLast(2)
    """

    def __init__(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigurationError(bad_value("KeepLast(n)", "an int >= 0", n))
        self.n = n

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        """Keep the ``n`` with the highest save sequence."""
        newest = sorted(checkpoint.seq for checkpoint in checkpoints)
        return set(newest[max(0, len(newest) - self.n) :])

    def __repr__(self) -> str:
        return f"KeepLast({self.n})"


def retention_from_arguments(num_checkpoints_to_keep: int, retention: RetentionPolicy | None) -> RetentionPolicy:
    """Turn the saver's ``num_checkpoints_to_keep`` and ``retention`` arguments into one policy.

    Raises:
        ConfigurationError: a count below -1, a non-int count, both arguments given, or a
            ``retention`` that is not a policy object.
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
        if not callable(getattr(retention, "keep", None)):
            raise ConfigurationError(bad_value("retention", "a retention policy such as KeepLast(3)", retention))
        return retention
    return KeepAll() if num_checkpoints_to_keep == -1 else KeepLast(num_checkpoints_to_keep)
