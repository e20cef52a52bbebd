"""Save on preemption: a watched signal becomes a checkpoint at the next batch boundary, then the
signal's previous disposition takes over.

Spot instances, SLURM ``--signal`` and Kubernetes send SIGTERM (or SIGUSR1) and kill the job a grace
period later. With ``save_on_signals`` the handler only sets a flag; at the end of the batch in
progress the saver saves (whatever its interval), waits until the checkpoint is durable, drains
uploads within ``shutdown_timeout``, and hands the signal over: a plain script still dies of it.
Victims run in their own processes (the default disposition ends them); the handler chaining is
checked in this process with Python handlers.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from _harness import Findings, Victim, check_crash
from train_victim import VictimConfig, make_saver, make_trainer

from ckpt_callbacks import Callback, CheckpointSaver, ConfigurationError
from ckpt_callbacks.serialization import read_state
from ckpt_callbacks.storage import resolve_latest

PROMPT_SECONDS = 10.0  # from the signal to the exit, with a checkpoint and a drain in between


class SignalAt(Callback):
    """Sends this process ``signum`` at the start of batch ``batch`` (the operator's notice)."""

    def __init__(self, signum: int, batch: int) -> None:
        self.signum, self.batch = signum, batch

    def batch_start(self, state) -> None:
        if state.timestamp.batch + 1 == self.batch:
            os.kill(os.getpid(), self.signum)


@pytest.fixture
def previous_handler():
    """A Python handler for SIGUSR1 installed before the saver's; records the signals it gets."""
    calls: list[int] = []
    original = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(signal.SIGUSR1, original)


def _config(tmp_path: Path, **options) -> VictimConfig:
    options.setdefault("save_interval", "1000ba")  # only the signal saves
    options.setdefault("save_on_signals", ["SIGTERM"])
    return VictimConfig(folder=str(tmp_path / "ckpt"), **options)


def _signal_and_time(victim: Victim, at_batch: int, signum: int = signal.SIGTERM) -> float:
    victim.start()
    assert victim.wait_for(f"batch {at_batch}") is not None, victim.lines
    sent = time.monotonic()
    victim.kill(signum)
    victim.finish()
    return time.monotonic() - sent


@pytest.mark.parametrize("upload", [False, True], ids=["local", "upload"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigterm_saves_at_the_next_batch_boundary_then_the_process_dies_of_it(
    tmp_path: Path, figures, mode: str, upload: bool
) -> None:
    config = _config(tmp_path, save_mode=mode, max_batches=120,
                     remote=(tmp_path / "store").as_uri() if upload else None)
    victim = Victim(config, log=tmp_path / "victim.log")
    seconds = _signal_and_time(victim, at_batch=20)
    assert victim.returncode == -signal.SIGTERM, (tmp_path / "victim.log").read_text()
    assert seconds < PROMPT_SECONDS
    saved = victim.batches("saved")
    assert len(saved) == 1 and 20 <= saved[0] < 120, saved  # the interval alone would not have saved
    if upload:
        assert victim.batches("uploaded") == saved  # drained before the hand-over
    latest = resolve_latest(Path(config.folder) / "latest-rank0.pt")
    assert read_state(latest)["state"]["timestamp"]["batch"] == saved[0]
    findings = Findings()
    check_crash(victim, findings, tmp_path)  # resumes from it and finishes: nothing lost
    figures.add("SIGTERM: save at the next batch boundary, then exit", findings)
    assert not findings.problems, findings.problems


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigterm_during_a_save_completes_it_and_exits(tmp_path: Path, figures, budget, mode: str) -> None:
    """The signal lands at each operation of a save in turn (the crash hook sends SIGTERM instead of SIGKILL)."""
    findings, fired = Findings(), 0
    points = range(1, 20) if budget.full else (1, 2, 6, 9)  # in CI: temp file opened, fsync, latest swap, record
    for index, n in enumerate(points):
        config = replace(_config(tmp_path / f"trial{index}", save_mode=mode, save_interval="1ba", max_batches=10),
                         crash=f"any:{n}", crash_signal="SIGTERM", crash_from_batch=4, crash_until_batch=5)
        victim = Victim(config, log=tmp_path / f"victim{index}.log").start()
        victim.finish()
        if not victim.seen("crash"):
            continue  # async saves overlap batches: this batch had fewer operations this time
        fired += 1
        if victim.returncode != -signal.SIGTERM:
            findings.problems.append(f"signal at operation {n}: exit status {victim.returncode}")
        elif max(victim.batches("saved"), default=0) not in (4, 5):
            findings.problems.append(f"signal at operation {n}: saved {victim.batches('saved')}, not batch 4 or 5")
        check_crash(victim, findings, tmp_path)
    figures.add("SIGTERM during a save", findings)
    assert not findings.problems, findings.problems
    assert fired >= 0.8 * len(points), f"the signal was sent in {fired} of {len(points)} trials"


def test_uploads_are_drained_for_a_bounded_time_only(tmp_path: Path, seaweedfs_bucket, fault_proxy_factory,
                                                     figures) -> None:
    """A store that never answers cannot hold the exit beyond ``shutdown_timeout``; the local copy stays."""
    from fault_proxy import Stall

    proxy = fault_proxy_factory(seaweedfs_bucket.server.endpoint_url)
    proxy.add(Stall(), method="PUT", path=r"ba\d+\.pt", times=None)
    options = seaweedfs_bucket.storage_options(endpoint_url=proxy.endpoint_url, max_attempts=1, read_timeout=60)
    config = _config(tmp_path, max_batches=120, remote=seaweedfs_bucket.url("run"), storage_options=options,
                     shutdown_timeout=2.0, upload_timeout=60.0)
    victim = Victim(config, log=tmp_path / "victim.log")
    seconds = _signal_and_time(victim, at_batch=20)
    assert victim.returncode == -signal.SIGTERM
    assert 2.0 <= seconds < 2.0 + PROMPT_SECONDS
    saved = victim.batches("saved")
    assert len(saved) == 1 and not victim.batches("uploaded")
    assert (Path(config.folder) / f"ba{saved[0]}.pt").exists()  # not pruned: never confirmed in the store
    figures.add("SIGTERM with a stalled store: bounded drain", Findings(trials=1, saved=1))


def test_the_previous_python_handler_runs_after_the_checkpoint(tmp_path: Path) -> None:
    config = _config(tmp_path, save_on_signals=["SIGUSR1"], max_batches=8)
    checkpoint = Path(config.folder) / "ba3.pt"
    calls: list[bool] = []  # whether the checkpoint was on disk when the previous handler ran

    def previous(signum: int, frame: object) -> None:
        calls.append(checkpoint.exists())

    original = signal.signal(signal.SIGUSR1, previous)
    try:
        trainer = make_trainer(config, saver=make_saver(config), callbacks=(SignalAt(signal.SIGUSR1, 3),))
        trainer.fit()  # the previous handler returns: training goes on to the end
        assert trainer.state.timestamp.batch == 8
        assert calls == [True]  # called once, after the checkpoint of batch 3 was durable
        assert sorted(p.name for p in checkpoint.parent.glob("ba*.pt")) == ["ba3.pt", "ba8.pt"]
        assert signal.getsignal(signal.SIGUSR1) is previous  # the saver put it back
    finally:
        signal.signal(signal.SIGUSR1, original)


def test_an_ignored_signal_stays_ignored_and_training_goes_on(tmp_path: Path) -> None:
    original = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        config = _config(tmp_path, save_on_signals=["SIGUSR1"], max_batches=6)
        trainer = make_trainer(config, saver=make_saver(config), callbacks=(SignalAt(signal.SIGUSR1, 2),))
        trainer.fit()
        assert trainer.state.timestamp.batch == 6
        assert (Path(config.folder) / "ba2.pt").exists()
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, original)


def test_sigint_becomes_keyboard_interrupt_after_the_checkpoint(tmp_path: Path) -> None:
    config = _config(tmp_path, save_on_signals=["SIGINT"], max_batches=6)
    trainer = make_trainer(config, saver=make_saver(config), callbacks=(SignalAt(signal.SIGINT, 4),))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert (Path(config.folder) / "ba4.pt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_after_the_last_checkpoint_event_is_handed_over_at_close(tmp_path: Path, previous_handler) -> None:
    class SignalAtFitEnd(Callback):
        def fit_end(self, state) -> None:
            os.kill(os.getpid(), signal.SIGUSR1)

    config = _config(tmp_path, save_on_signals=["SIGUSR1"], max_batches=4)
    make_trainer(config, saver=make_saver(config), callbacks=(SignalAtFitEnd(),)).fit()
    assert previous_handler == [signal.SIGUSR1]


def test_watching_signals_off_the_main_thread_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path, save_on_signals=["SIGUSR1"], max_batches=2)
    trainer = make_trainer(config, saver=make_saver(config))
    errors: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as error:  # noqa: BLE001 -- handed to the test thread
            errors.append(error)

    thread = threading.Thread(target=fit)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ConfigurationError)
    assert "save_on_signals" in str(errors[0]) and "main thread" in str(errors[0])


@pytest.mark.parametrize("value", ["SIGTERM", ["SIGKILL"], ["SIGSTOP"], ["SIGNOPE"], [0], [True], 15])
def test_bad_save_on_signals_is_refused_at_construction(tmp_path: Path, value) -> None:
    with pytest.raises(ConfigurationError, match="save_on_signals"):
        CheckpointSaver(str(tmp_path), save_on_signals=value)


def _preempted_rank(folder: str) -> dict:
    """One rank of a 2-rank run; only rank 0 gets SIGUSR1 (at batch 3)."""
    import torch.distributed as torch_dist

    calls: list[int] = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))  # e.g. a requeue script's
    config = _config(Path(folder), save_on_signals=["SIGUSR1"], max_batches=6, width=16)
    rank = torch_dist.get_rank()
    trainer = make_trainer(config, saver=make_saver(config),
                           callbacks=(SignalAt(signal.SIGUSR1, 3),) if rank == 0 else ())
    trainer.fit()
    return {"calls": calls, "batch": trainer.state.timestamp.batch}


def test_ranks_agree_on_preemption_rank_0_decides(tmp_path: Path) -> None:
    from _distributed import run, values

    ranks = values(run(2, _preempted_rank, str(tmp_path)))
    assert [r["calls"] for r in ranks] == [[signal.SIGUSR1], [signal.SIGUSR1]]  # rank 1 got rank 0's decision
    assert [r["batch"] for r in ranks] == [6, 6]
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("ba*.pt")) == ["ba3.pt", "ba6.pt"]
