"""Object-store faults through the loopback fault proxy, end to end: a training run saving every batch
to a real S3 server (SeaweedFS, which checks signatures as AWS does; moto too for throttling).

Promises checked on every run: transient faults (bursts of 500/503 SlowDown, connection resets mid-
upload and mid-download, the server killed and restarted) are retried until every checkpoint is in
the store with its manifest and the pointer names the last one; a stalled upload fails within its
deadline plus a small margin; a permanent fault (403 after a credential change) is reported once,
clearly, and not retried; no local checkpoint is pruned before the store has confirmed it; with
``on_upload_error='warn'`` a dead store cannot fill the disk; no run hangs.
"""

from __future__ import annotations

import re
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from _harness import Findings, one_thread
from fault_proxy import FaultProxy, Reset, Respond, Stall
from train_victim import VictimConfig, make_saver, make_trainer

from ckpt_callbacks import Callback, Trainer, UploadError, UploadTimeoutError
from ckpt_callbacks.remote import open_store
from ckpt_callbacks.remote.publisher import MANIFEST_SUFFIX

RUN_SECONDS = 180.0  # a run that takes longer hangs
MARGIN_SECONDS = 5.0  # how late a deadline may fire on a loaded CI machine
POINTER = "latest-rank0.pt.symlink"


class PruneWatch(Callback):
    """At every batch, checks that each checkpoint gone from the local folder is committed in the store."""

    def __init__(self, folder: Path, store: Any) -> None:
        self.folder, self.store = folder, store
        self.seen: set[str] = set()
        self.violations: list[str] = []

    def batch_end(self, state: Any) -> None:
        present = {p.name for p in self.folder.glob("ba*.pt")}
        for gone in sorted(self.seen - present):
            if self.store.info(gone + MANIFEST_SUFFIX) is None:
                self.violations.append(f"{gone} was pruned locally before the store confirmed it")
        self.seen |= present


class AtBatch(Callback):
    """Runs ``action`` at the start of batch ``batch``."""

    def __init__(self, batch: int, action) -> None:
        self.batch, self.action = batch, action

    def batch_start(self, state: Any) -> None:
        if state.timestamp.batch + 1 == self.batch:
            self.action()


def _config(tmp_path: Path, bucket, proxy: FaultProxy, run: str, **options: Any) -> VictimConfig:
    storage = bucket.storage_options(endpoint_url=proxy.endpoint_url, max_attempts=2, connect_timeout=2,
                                     read_timeout=options.pop("read_timeout", 10))
    options.setdefault("max_batches", 6)
    options.setdefault("keep", 1)
    options.setdefault("upload_timeout", 30.0)
    options.setdefault("shutdown_timeout", 30.0)
    options.setdefault("width", 64)
    return VictimConfig(folder=str(tmp_path / run / "ckpt"), remote=bucket.url(run), storage_options=storage,
                        **options)


def _fit_bounded(trainer: Trainer) -> tuple[BaseException | None, float]:
    """Fit on a worker thread with a bound; returns (what it raised, when it ended). A hang fails the test."""
    outcome: list[BaseException | None] = []

    def fit() -> None:
        try:
            with one_thread():
                trainer.fit()
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 -- handed to the test thread
            outcome.append(error)

    thread = threading.Thread(target=fit, name="reliability-fit", daemon=True)
    thread.start()
    thread.join(RUN_SECONDS)
    if thread.is_alive():
        pytest.fail(f"the training run hung for {RUN_SECONDS:.0f} s")
    return outcome[0], time.monotonic()


def _run(config: VictimConfig, bucket, *callbacks: Callback) -> tuple[BaseException | None, PruneWatch, float]:
    direct = open_store(config.remote, bucket.storage_options())  # around the proxy: checks see the truth
    watch = PruneWatch(Path(config.folder), direct)
    trainer = make_trainer(config, saver=make_saver(config), callbacks=(watch, *callbacks))
    error, ended = _fit_bounded(trainer)
    return error, watch, ended


def _check_store(config: VictimConfig, bucket, watch: PruneWatch, findings: Findings, *,
                 missing: set[int] = frozenset()) -> None:
    """Every checkpoint (but ``missing``) is in the store with its manifest; the pointer names the last."""
    store = open_store(config.remote, bucket.storage_options())
    findings.trials += 1
    findings.problems += watch.violations
    findings.lost += len(watch.violations)
    for batch in range(1, config.max_batches + 1):
        if batch in missing:
            continue
        findings.saved += 1
        if store.info(f"ba{batch}.pt") is None or store.info(f"ba{batch}.pt{MANIFEST_SUFFIX}") is None:
            findings.problem(f"ba{batch}.pt is not committed in the store", lost=True)
    pointer = store.read_bytes(POINTER).decode()
    if pointer != f"ba{config.max_batches}.pt":
        findings.problem(f"the pointer names {pointer}, not ba{config.max_batches}.pt", pointer=True)
    store.close()


@pytest.fixture
def proxy(seaweedfs_bucket, fault_proxy_factory) -> FaultProxy:
    return fault_proxy_factory(seaweedfs_bucket.server.endpoint_url)


@pytest.mark.parametrize("server", ["moto", "seaweedfs"])
def test_bursts_of_5xx_and_slowdown_are_retried(tmp_path: Path, request, fault_proxy_factory, budget, figures,
                                                server: str) -> None:
    bucket = request.getfixturevalue(f"{server}_bucket")
    findings = Findings()
    for run in range(budget.runs(share=0.25, ci=1)):
        proxy = fault_proxy_factory(bucket.server.endpoint_url)
        config = _config(tmp_path, bucket, proxy, f"run{run}")
        proxy.add(Respond.slow_down(), method="PUT", times=3)
        proxy.add(Respond.internal_error(), method="PUT", times=2)
        proxy.add(Respond.unavailable(), method="HEAD", times=2)
        error, watch, _ = _run(config, bucket)
        assert error is None, error
        _check_store(config, bucket, watch, findings)
        proxy.close()
    figures.add("store: bursts of 500/503 SlowDown", findings)
    assert not findings.problems, findings.problems


def test_connection_resets_mid_upload_and_mid_download_are_retried(tmp_path: Path, seaweedfs_bucket,
                                                                   fault_proxy_factory, budget, figures) -> None:
    findings = Findings()
    for run in range(budget.runs(share=0.25, ci=1)):
        proxy = fault_proxy_factory(seaweedfs_bucket.server.endpoint_url)
        config = _config(tmp_path, seaweedfs_bucket, proxy, f"run{run}", width=128)
        proxy.add(Reset(after_request_bytes=32 * 1024), method="PUT", path=r"ba\d+\.pt", times=2)
        error, watch, _ = _run(config, seaweedfs_bucket)
        assert error is None, error
        _check_store(config, seaweedfs_bucket, watch, findings)
        # A new machine resumes from the store; the download is cut once.
        for path in Path(config.folder).iterdir():
            path.unlink()
        cut = proxy.add(Reset(after_response_bytes=20_000), method="GET", path=rf"ba{config.max_batches}\.pt$")
        resumed = make_trainer(config, saver=make_saver(config))
        error, _ = _fit_bounded(resumed)
        assert error is None, error
        assert cut.hits == 1 and resumed.state.resumed_from is not None
        assert Path(resumed.state.resumed_from).name == f"ba{config.max_batches}.pt"
        proxy.close()
    figures.add("store: connection resets mid-upload and mid-download", findings)
    assert not findings.problems, findings.problems


@pytest.mark.parametrize("on_upload_error", ["raise", "warn"])
def test_a_stalled_upload_fails_within_its_deadline(tmp_path: Path, seaweedfs_bucket, fault_proxy_factory, budget,
                                                    figures, on_upload_error: str) -> None:
    deadline = 2.0
    findings, slowest = Findings(), 0.0
    for run in range(budget.runs(share=0.05, ci=1)):
        proxy = fault_proxy_factory(seaweedfs_bucket.server.endpoint_url)
        config = _config(tmp_path, seaweedfs_bucket, proxy, f"run{run}", upload_timeout=deadline, read_timeout=60,
                         on_upload_error=on_upload_error)
        stall = proxy.add(Stall(), method="PUT", path=r"ba3\.pt$", times=None)
        stalled_at: list[float] = []
        threading.Thread(target=lambda: stalled_at.append(time.monotonic()) if stall.fired.wait(RUN_SECONDS) else None,
                         daemon=True).start()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            error, watch, ended = _run(config, seaweedfs_bucket)
        detected = ended - stalled_at[0]
        slowest = max(slowest, detected)
        if on_upload_error == "raise":
            assert isinstance(error, UploadTimeoutError), error
            assert "ba3.pt" in str(error) and "upload_timeout_in_seconds=2" in str(error)
            assert detected <= deadline + MARGIN_SECONDS, detected
            findings.trials += 1
        else:
            assert error is None, error
            timeouts = [w for w in caught if "did not finish within" in str(w.message)]
            assert len(timeouts) == 1 and "ba3.pt" in str(timeouts[0].message)
            _check_store(config, seaweedfs_bucket, watch, findings, missing={3})
        assert (Path(config.folder) / "ba3.pt").exists()  # never confirmed, so never pruned
        proxy.close()
    figures.add("store: a stalled upload (deadline 2 s)", findings, detect_seconds=slowest)
    assert not findings.problems, findings.problems


def _failed_checkpoints(messages: list[str]) -> list[str]:
    return [re.search(r"ba\d+\.pt", message)[0] for message in messages]


def test_access_denied_after_a_credential_change_is_reported_once(tmp_path: Path, seaweedfs_bucket,
                                                                  fault_proxy_factory, budget, figures) -> None:
    findings, slowest = Findings(), 0.0
    for run in range(budget.runs(share=0.05, ci=1)):
        proxy = fault_proxy_factory(seaweedfs_bucket.server.endpoint_url)
        config = _config(tmp_path, seaweedfs_bucket, proxy, f"run{run}")
        revoked_at: list[float] = []

        def revoke(proxy: FaultProxy = proxy, revoked_at: list[float] = revoked_at) -> None:
            revoked_at.append(time.monotonic())
            proxy.add(Respond(403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist."),
                      times=None)

        error, _, ended = _run(config, seaweedfs_bucket, AtBatch(4, revoke))
        slowest = max(slowest, ended - revoked_at[0])
        assert isinstance(error, UploadError) and not isinstance(error, UploadTimeoutError), error
        message = str(error)
        assert "access denied" in message and "check the credentials" in message, message
        (failed,) = _failed_checkpoints([message])
        assert len(proxy.requests("PUT", rf"{failed}$")) <= 1  # permanent: never retried
        assert (Path(config.folder) / failed).exists()  # never confirmed, so never pruned
        findings.trials += 1
        findings.saved += 3
        proxy.close()
    figures.add("store: 403 after a credential change", findings, detect_seconds=slowest)


def test_a_dead_store_cannot_fill_the_disk(tmp_path: Path, seaweedfs_bucket, proxy: FaultProxy, figures) -> None:
    """``on_upload_error='warn'``: each failure is warned about once, and only ``max_unuploaded_checkpoints``
    unuploaded checkpoints are kept beyond retention."""
    config = _config(tmp_path, seaweedfs_bucket, proxy, "run", max_batches=10, on_upload_error="warn",
                     max_unuploaded_checkpoints=2)
    dead = AtBatch(3, lambda: proxy.add(Respond(403, "AccessDenied", "Access Denied"), times=None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        error, _, _ = _run(config, seaweedfs_bucket, dead)
    assert error is None, error
    failed = _failed_checkpoints([str(w.message) for w in caught if "upload failed" in str(w.message)])
    assert len(failed) == len(set(failed)) and {"ba9.pt", "ba10.pt"} <= set(failed), failed
    assert sorted(p.name for p in Path(config.folder).glob("ba*.pt")) == ["ba10.pt", "ba9.pt"]
    figures.add("store: dead store, on_upload_error='warn'", Findings(trials=1, saved=2))


def test_the_server_killed_and_restarted_mid_run(tmp_path: Path, seaweedfs_bucket, budget, figures) -> None:
    findings = Findings()
    for run in range(budget.runs(share=0.25, ci=1)):
        proxy = FaultProxy(seaweedfs_bucket.server.endpoint_url).start()
        port = int(proxy.endpoint_url.rsplit(":", 1)[1])
        config = _config(tmp_path, seaweedfs_bucket, proxy, f"run{run}", max_batches=8)
        restarted: list[FaultProxy] = []

        def restart() -> None:
            restarted.append(FaultProxy(seaweedfs_bucket.server.endpoint_url).start(port))

        def kill() -> None:
            proxy.close()
            # The outage's length is the scenario (about one retry backoff), not a wait for an event.
            threading.Timer(1.5, restart).start()

        try:
            error, watch, _ = _run(config, seaweedfs_bucket, AtBatch(3, kill))
            assert error is None, error
            assert restarted, "the server never came back"
            _check_store(config, seaweedfs_bucket, watch, findings)
        finally:
            proxy.close()
            for server in restarted:
                server.close()
    figures.add("store: server killed and restarted mid-run", findings)
    assert not findings.problems, findings.problems


def test_a_restart_re_uploading_an_older_checkpoint_never_moves_the_pointer_back(tmp_path: Path) -> None:
    """ba4's upload failed (a foreign object held its key) while ba5 and ba6 went up; the restarted run
    re-uploads ba4 once the key is free, and the pointer must keep naming ba6."""
    store = tmp_path / "store"
    store.mkdir()
    (store / "ba4.pt").write_bytes(b"someone else's object")
    config = VictimConfig(folder=str(tmp_path / "ckpt"), max_batches=6, keep=-1, width=16, remote=store.as_uri(),
                          on_upload_error="warn")
    with warnings.catch_warnings(record=True), one_thread():
        warnings.simplefilter("always")
        make_trainer(config, saver=make_saver(config)).fit()
    assert (store / POINTER).read_bytes() == b"ba6.pt"
    (store / "ba4.pt").unlink()
    with one_thread():
        make_trainer(config, saver=make_saver(config)).fit()  # resumes at the end; re-uploads ba4
    assert (store / "ba4.pt.manifest.json").exists()
    assert (store / POINTER).read_bytes() == b"ba6.pt"
