"""Save on preemption: a termination notice becomes one last checkpoint at the next batch boundary.

Spot instances, SLURM (``--signal=USR1@120``) and Kubernetes (SIGTERM, then SIGKILL after
``terminationGracePeriodSeconds``) warn a job before they kill it. A saver built with
``save_on_signals=('SIGTERM', 'SIGUSR1')`` watches those signals through the process-wide
:data:`WATCH`:

1. The handler only records which signal arrived. It does no I/O and takes no lock: it runs
   between two bytecodes of the main thread, possibly in the middle of a save, which then simply
   goes on (Python retries the interrupted system calls).
2. At the next checkpoint event (the end of the batch in progress), rank 0 decides for every rank
   whether a signal arrived and which one; each watching saver then saves (unless it has just
   saved this batch), waits until the checkpoint is durable and drains its uploads, for at most
   its ``shutdown_timeout`` in all.
3. Once every saver watching that signal has done so, the previous handlers are put back and the
   signal is delivered again, so the previous disposition takes over: the default one ends the
   process with that signal (the exit status a scheduler expects), a Python handler is called (it
   may raise ``KeyboardInterrupt`` or ``SystemExit``, which the trainer handles as usual), and an
   ignored signal stays ignored while training goes on, unwatched from then on.

A signal that arrives after the last checkpoint event is handed over when the last watching saver
closes. Handlers can only be installed on the main thread, so a saver that watches signals
refuses to start elsewhere.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ckpt_callbacks.errors import ConfigurationError, bad_value

__all__ = ["WATCH", "SignalWatch", "check_signals", "checkpoint_and_hand_over"]

log = logging.getLogger(__name__)

_UNCATCHABLE = frozenset({"SIGKILL", "SIGSTOP"})
_ACCEPTED = "a list of catchable signal names or numbers such as ['SIGTERM', 'SIGUSR1']"


def check_signals(value: object, *, argument: str = "save_on_signals") -> tuple[signal.Signals, ...]:
    """Validate ``save_on_signals`` at construction and return the signals, duplicates dropped.

    Raises:
        ConfigurationError: a bare string, an unknown name or number, or SIGKILL/SIGSTOP (which no
            process can catch).

    Example:
        >>> check_signals(["SIGTERM", "SIGUSR1"])
        (<Signals.SIGTERM: 15>, <Signals.SIGUSR1: 10>)
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigurationError(bad_value(argument, _ACCEPTED, value))
    found: list[signal.Signals] = []
    for item in value:
        try:
            if isinstance(item, bool):
                raise TypeError(item)
            sig = signal.Signals[item] if isinstance(item, str) else signal.Signals(item)
        except (KeyError, ValueError, TypeError):
            raise ConfigurationError(bad_value(argument, _ACCEPTED, item)) from None
        if sig.name in _UNCATCHABLE:
            raise ConfigurationError(bad_value(argument, f"{_ACCEPTED}; {sig.name} cannot be caught", item))
        found.append(sig)
    return tuple(dict.fromkeys(found))


class SignalWatch:
    """The process's signal handlers for savers that save on preemption (use :data:`WATCH`).

    Owners (savers) :meth:`watch` some signals; the handler records the first one that arrives;
    each owner reports with :meth:`handled` once it has saved for it, and the last one hands the
    signal over to the previous disposition. :meth:`unwatch` at close does the same for a signal
    still pending.

    Example:
        >>> watch = SignalWatch()
        >>> watch.watch(saver, (signal.SIGTERM,))  # doctest: +SKIP
        >>> watch.requested(saver)  # after a SIGTERM  # doctest: +SKIP
        15
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._owners: dict[int, frozenset[int]] = {}
        self._handled: set[int] = set()

    def watch(self, owner: object, signals: Iterable[int]) -> None:
        """Install the handler for ``signals`` on behalf of ``owner`` (keeping the previous handlers).

        Raises:
            ConfigurationError: not on the main thread, where alone handlers can be installed.
        """
        wanted = frozenset(int(sig) for sig in signals)
        if not wanted:
            return
        if threading.current_thread() is not threading.main_thread():
            accepted = "empty when training runs outside the main thread (only it can install signal handlers)"
            raise ConfigurationError(bad_value("save_on_signals", accepted, sorted(wanted)))
        for sig in sorted(wanted - set(self._previous)):
            self._previous[sig] = signal.signal(sig, self._handle)
        self._owners[id(owner)] = wanted

    def _handle(self, signum: int, frame: Any) -> None:
        # A flag only: no I/O, no lock, no logging (a handler may interrupt a save holding locks).
        if self.received is None:
            self.received = signum

    def requested(self, owner: object) -> int | None:
        """The signal ``owner`` watches that has arrived and is not handed over yet, if any."""
        received = self.received
        return received if received is not None and received in self._owners.get(id(owner), ()) else None

    def handled(self, owner: object, signum: int) -> None:
        """``owner`` has saved for ``signum``; when every owner watching it has, hand it over."""
        self._handled.add(id(owner))
        waiting = [o for o, sigs in self._owners.items() if signum in sigs and o not in self._handled]
        if not waiting:
            self._hand_over(signum)

    def unwatch(self, owner: object) -> None:
        """Stop watching for ``owner`` (at close). The last owner out restores the previous handlers
        and hands over a signal still pending."""
        self._owners.pop(id(owner), None)
        self._handled.discard(id(owner))
        pending = self.received
        if pending is not None and not any(pending in sigs for sigs in self._owners.values()):
            self._hand_over(pending)
        elif not self._owners:
            self._restore()

    def _restore(self) -> dict[int, Any]:
        previous, self._previous = self._previous, {}
        if threading.current_thread() is threading.main_thread():
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        elif previous:
            log.warning("signal handlers for %s were left in place: the saver closed outside the main thread",
                        sorted(previous))
        self._owners.clear()
        self._handled.clear()
        self.received = None
        return previous

    def _hand_over(self, signum: int) -> None:
        """Put every previous handler back, then deliver ``signum`` to the one it had."""
        previous = self._restore().get(signum, signal.SIG_DFL)
        name = signal.Signals(signum).name
        if previous is signal.SIG_IGN:
            log.warning("%s was ignored before the saver watched it: training goes on", name)
        elif callable(previous):
            log.warning("handing %s over to the handler installed before the saver's", name)
            previous(signum, None)
        else:
            log.warning("handing %s over to its default action", name)
            signal.raise_signal(signum)


WATCH = SignalWatch()
"""The process's one :class:`SignalWatch` (signal handlers are process-wide)."""


def checkpoint_and_hand_over(
    owner: object, signum: int, waits: Sequence[Callable[[float], Any]], timeout: float
) -> None:
    """Finish a preemption checkpoint, then report ``owner`` done with ``signum`` to :data:`WATCH`.

    ``waits`` (the save in flight, then the uploads) each get what is left of ``timeout`` seconds;
    a failure or a timeout is logged, not raised: the signal is handed over in any case, since the
    job is going away and a checkpoint still in flight is discarded cleanly (its temp file is swept
    at the next start, ``latest`` keeps naming the previous one). Handing over may end the process.

    Example:
        >>> checkpoint_and_hand_over(saver, signal.SIGTERM, (manager.wait, manager.wait_uploads), 60)  # doctest: +SKIP
    """
    name = signal.Signals(signum).name
    started = time.monotonic()
    log.warning("%s received: saving a checkpoint and draining uploads (at most %.0f s)", name, timeout)
    try:
        for wait in waits:
            if wait(max(0.0, timeout - (time.monotonic() - started))) is False:
                log.error("uploads were not drained within %.0f s of %s", timeout, name)
    except Exception as error:  # noqa: BLE001 -- the job is being preempted: report and hand over anyway
        log.error("the checkpoint saved on %s is not complete: %s", name, error)
    else:
        log.warning("checkpoint saved on %s after %.2f s", name, time.monotonic() - started)
    finally:
        WATCH.handled(owner, signum)
