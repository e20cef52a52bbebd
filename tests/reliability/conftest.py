"""Fixtures of the reliability suite: trial budgets, the figures it collects, the victim zygote.

The suite runs at its CI size by default (at least 30 kill trials, a few minutes on 2 cores);
``pytest tests/reliability --trials 500`` runs the large matrix by hand (about 100 fault-proxy runs,
every crash point of every save enumerated), and ``--reliability-stats figures.json`` writes what
the trials found, per scenario, for ``python -m tests.reliability.report``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
from _harness import Findings, stop_zygote

from fault_proxy import fault_proxy_factory  # noqa: F401 -- a fixture, registered by being imported


@dataclass(frozen=True)
class Budget:
    """How many trials each scenario runs: CI's sample by default, a share of ``--trials N`` by hand.

    Example:
        >>> Budget(None).kills(share=0.6, ci=12), Budget(500).kills(share=0.6, ci=12)
        (12, 300)
    """

    total: int | None

    @property
    def full(self) -> bool:
        """Whether this is a run by hand (``--trials``): enumerate every crash point."""
        return self.total is not None

    def kills(self, *, share: float, ci: int) -> int:
        """Kill trials of a scenario: ``ci`` in CI, ``share`` of ``--trials`` by hand (never fewer)."""
        return ci if self.total is None else max(ci, round(self.total * share))

    def runs(self, *, share: float, ci: int) -> int:
        """Fault-proxy runs of a scenario: ``ci`` in CI; by hand ``share`` of ``--trials // 5``."""
        return ci if self.total is None else max(ci, round(self.total // 5 * share))


@dataclass
class Figure:
    """One scenario's line of the report."""

    trials: int = 0
    saved: int = 0
    lost: int = 0
    bad_pointers: int = 0
    hangs: int = 0
    detect_seconds: float | None = None
    problems: list[str] = field(default_factory=list)


class Figures:
    """What every scenario found in this session, written as JSON at its end (``--reliability-stats``)."""

    def __init__(self) -> None:
        self.scenarios: dict[str, Figure] = {}

    def add(self, scenario: str, findings: Findings, *, detect_seconds: float | None = None) -> None:
        """Add a scenario's findings (and the slowest detection of a failed upload it measured)."""
        figure = self.scenarios.setdefault(scenario, Figure())
        figure.trials += findings.trials
        figure.saved += findings.saved
        figure.lost += findings.lost
        figure.bad_pointers += findings.bad_pointers
        figure.hangs += findings.hangs
        figure.problems += findings.problems[:20]
        if detect_seconds is not None:
            figure.detect_seconds = max(figure.detect_seconds or 0.0, detect_seconds)

    def write(self, path: Path) -> None:
        """Write every scenario's figure as JSON."""
        path.write_text(json.dumps({name: asdict(figure) for name, figure in self.scenarios.items()}, indent=1))


@pytest.fixture(scope="session")
def budget(request: pytest.FixtureRequest) -> Budget:
    """The session's trial budget (``--trials``)."""
    return Budget(request.config.getoption("--trials"))


@pytest.fixture(scope="session")
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    """The session's figures; written to ``--reliability-stats`` at the end, if given."""
    collected = Figures()
    yield collected
    target = request.config.getoption("--reliability-stats")
    if target:
        collected.write(Path(target))


@pytest.fixture(scope="session", autouse=True)
def _zygote_lifecycle() -> Iterator[None]:
    """Stop the victim zygote (started on first use) at the end of the session."""
    yield
    stop_zygote()


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A random generator seeded by the test's name, so that a failing trial can be replayed."""
    return random.Random(request.node.nodeid)
