"""The uploader pool's rules on the real ``file://`` store: pinning, ordering, back-pressure,
deadlines, failures, close and interpreter exit (faults of real S3 servers: test_uploader_s3.py).

Timing is measured with Events set by done-callbacks, never with sleeps; deadlines are short so the
module stays fast.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from ckpt_callbacks.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigurationError,
    UploadError,
    UploadTimeoutError,
)
from ckpt_callbacks.remote import open_store, upload_job
from ckpt_callbacks.remote.uploader import UploadFuture, Uploader

WAIT = 10.0  # bound on every wait for an event that should come at once
SLACK = 1.0  # how late past its deadline a timeout may be reported


class Gate:
    """Holds uploads of one key inside the store call until opened: a store that hangs, for real."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.returned = threading.Event()


class GatedStore:
    """The real ``file://`` store, with per-key gates that hold an upload inside the store call.

    Bytes go through the real backend; a gate only decides when the call proceeds, which is how a
    store that hangs in a socket looks from the pool's side.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.real = open_store(root.as_uri())
        self.url = self.real.url
        self.gates: dict[str, Gate] = {}
        self.calls: list[tuple[str, bytes]] = []  # (key, first bytes sent), in call order
        self._lock = threading.Lock()

    def gate(self, key: str) -> Gate:
        self.gates[key] = Gate()
        return self.gates[key]

    def upload_file(self, local_path: str, key: str, **options: Any) -> None:
        with open(local_path, "rb") as source:
            head = source.read(16)
        with self._lock:
            self.calls.append((key, head))
        gate = self.gates.get(key)
        if gate is not None:
            gate.entered.set()
            gate.opened.wait(WAIT)
        try:
            self.real.upload_file(local_path, key, **options)
        finally:
            if gate is not None:
                gate.returned.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[GatedStore]:
    root = tmp_path / "bucket"
    root.mkdir()
    gated = GatedStore(root)
    yield gated
    gated.real.close()


def _object(store: GatedStore, key: str) -> bytes:
    return store.real.read_bytes(key)


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _replace(path: Path, data: bytes) -> None:
    """Re-save ``path`` the way storage.py commits: a new file renamed over the name."""
    temp = path.with_name("." + path.name + ".new")
    temp.write_bytes(data)
    os.replace(temp, path)


class Recorder:
    """A done-callback that records each call and when it came."""

    def __init__(self) -> None:
        self.calls: list[tuple[UploadFuture, float]] = []
        self.event = threading.Event()

    def __call__(self, future: UploadFuture) -> None:
        self.calls.append((future, time.monotonic()))
        self.event.set()


# -- the basics ---------------------------------------------------------------------------------------


def test_upload_and_future_fields(store: GatedStore, tmp_path: Path) -> None:
    local = _file(tmp_path, "ba1.pt", b"checkpoint bytes")
    done = Recorder()
    with Uploader(store, num_concurrent_uploads=2) as uploader:
        future = uploader.submit(local, "run/ba1.pt", metadata={"crc32c": "abcd"}, on_done=done)
        assert future.result(timeout=WAIT) is None
        assert uploader.wait(timeout=WAIT)
        late = Recorder()
        future.add_done_callback(late)  # added after the end: runs at once, here
        assert len(late.calls) == 1
    assert _object(store, "run/ba1.pt") == b"checkpoint bytes"
    assert store.info("run/ba1.pt").metadata["crc32c"] == "abcd"
    assert (future.key, future.local_path, future.size, future.attempts) == ("run/ba1.pt", str(local), 16, 1)
    assert future.done() and not future.superseded and future.exception() is None
    assert 0.0 < future.elapsed < WAIT
    assert [call[0] for call in done.calls] == [future]  # exactly once
    assert uploader.poll_errors() == []


def test_bytes_are_pinned_at_hand_off(store: GatedStore, tmp_path: Path) -> None:
    local = _file(tmp_path, "latest.pt", b"first version")
    gate = store.gate("run/latest.pt")
    with Uploader(store) as uploader:
        future = uploader.submit(local, "run/latest.pt")
        assert gate.entered.wait(WAIT)
        _replace(local, b"second version")  # a re-save under the same name...
        gate.opened.set()
        future.result(timeout=WAIT)
        local.unlink()  # ...and pruning: neither touches the bytes handed over
    assert _object(store, "run/latest.pt") == b"first version"


def test_hard_link_pins_the_bytes_where_proc_is_missing(
    store: GatedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upload_job, "_PROC_FD", tmp_path / "no-proc")
    local = _file(tmp_path, "ba2.pt", b"pinned by a link")
    gate = store.gate("k")
    with Uploader(store) as uploader:
        future = uploader.submit(local, "k")
        assert gate.entered.wait(WAIT)
        _replace(local, b"changed")
        gate.opened.set()
        future.result(timeout=WAIT)
    assert _object(store, "k") == b"pinned by a link"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ba2.pt", "bucket"]  # the link is gone


def test_a_failing_done_callback_is_logged_not_raised(
    store: GatedStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(future: UploadFuture) -> None:
        raise RuntimeError("callback bug")

    with Uploader(store) as uploader:
        future = uploader.submit(_file(tmp_path, "a.pt", b"a"), "a.pt", on_done=broken)
        future.result(timeout=WAIT)
        assert uploader.wait(timeout=WAIT)
    assert "callback bug" in caplog.text
    assert _object(store, "a.pt") == b"a"


# -- ordering and back-pressure ------------------------------------------------------------------------


def test_newest_wins_and_never_lands_before_an_older_one(store: GatedStore, tmp_path: Path) -> None:
    gate = store.gate("run/latest.pt")
    with Uploader(store, num_concurrent_uploads=2) as uploader:
        first = uploader.submit(_file(tmp_path, "v1", b"version 1"), "run/latest.pt")
        assert gate.entered.wait(WAIT)  # v1 is inside the store call
        second = uploader.submit(_file(tmp_path, "v2", b"version 2"), "run/latest.pt")
        third = uploader.submit(_file(tmp_path, "v3", b"version 3"), "run/latest.pt")
        assert second.done() and second.superseded and second.result() is None
        other = uploader.submit(_file(tmp_path, "o", b"other key"), "run/other.pt")
        other.result(timeout=WAIT)  # the free worker takes another key, but not v3 while v1 runs
        assert not third.done()
        gate.opened.set()
        first.result(timeout=WAIT)
        third.result(timeout=WAIT)
    assert [data for key, data in store.calls if key == "run/latest.pt"] == [b"version 1", b"version 3"]
    assert _object(store, "run/latest.pt") == b"version 3"
    assert uploader.poll_errors() == []


def test_submit_blocks_while_the_queue_is_full(
    store: GatedStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ckpt_callbacks.remote.uploader")
    gate = store.gate("a")
    returned = threading.Event()
    with Uploader(store, num_concurrent_uploads=1, max_queued=1) as uploader:
        uploader.submit(_file(tmp_path, "a", b"a"), "a")
        assert gate.entered.wait(WAIT)
        uploader.submit(_file(tmp_path, "b", b"b"), "b")  # queued: the queue is now full

        def third() -> None:
            uploader.submit(_file(tmp_path, "c", b"c"), "c")
            returned.set()

        thread = threading.Thread(target=third)
        thread.start()
        assert not returned.wait(0.3)  # blocked by back-pressure
        gate.opened.set()
        assert returned.wait(WAIT)
        thread.join(WAIT)
        assert uploader.wait(timeout=WAIT)
    assert sorted(key for key, _ in store.calls) == ["a", "b", "c"]
    assert "back-pressure: waited" in caplog.text


# -- deadlines -----------------------------------------------------------------------------------------


def test_a_stuck_store_call_fails_at_its_deadline(store: GatedStore, tmp_path: Path) -> None:
    gate = store.gate("stuck.pt")
    done = Recorder()
    with Uploader(store, upload_timeout_in_seconds=0.5) as uploader:
        start = time.monotonic()
        future = uploader.submit(_file(tmp_path, "s", b"s"), "stuck.pt", on_done=done)
        assert done.event.wait(WAIT)
        took = done.calls[0][1] - start
        assert 0.5 <= took <= 0.5 + SLACK
        error = future.exception()
        assert isinstance(error, UploadTimeoutError)
        assert "stuck.pt" in str(error) and str(tmp_path / "s") in str(error)
        assert isinstance(error.__cause__, TimeoutError)
        assert uploader.poll_errors() == [error] and uploader.poll_errors() == []
        # The stuck thread was replaced: other uploads go on while it is still in the store.
        uploader.submit(_file(tmp_path, "n", b"n"), "next.pt").result(timeout=WAIT)
        assert not gate.returned.is_set()
        gate.opened.set()
        assert gate.returned.wait(WAIT)


def test_a_newer_upload_waits_for_an_abandoned_one_of_its_key(store: GatedStore, tmp_path: Path) -> None:
    gate = store.gate("k")
    with Uploader(store, upload_timeout_in_seconds=0.4, num_concurrent_uploads=2) as uploader:
        old = uploader.submit(_file(tmp_path, "old", b"old bytes"), "k")
        assert gate.entered.wait(WAIT)
        new = uploader.submit(_file(tmp_path, "new", b"new bytes"), "k")
        assert isinstance(old.exception(timeout=WAIT), UploadTimeoutError)
        assert not new.done()  # it must not start while the old thread may still write
        del store.gates["k"]
        gate.opened.set()  # the old call comes back late and lands; then the new one runs
        new.result(timeout=WAIT)
    assert _object(store, "k") == b"new bytes"


def test_a_newer_upload_gives_up_behind_one_that_never_returns(store: GatedStore, tmp_path: Path) -> None:
    gate = store.gate("k")
    old_done, new_done = Recorder(), Recorder()
    with Uploader(store, upload_timeout_in_seconds=0.3) as uploader:
        uploader.submit(_file(tmp_path, "old", b"old"), "k", on_done=old_done)
        assert gate.entered.wait(WAIT)
        new = uploader.submit(_file(tmp_path, "new", b"new"), "k", on_done=new_done)
        assert old_done.event.wait(WAIT) and new_done.event.wait(WAIT)
        # One more deadline from the moment the old upload was abandoned.
        assert 0.2 <= new_done.calls[0][1] - old_done.calls[0][1] <= 0.3 + SLACK
        error = new.exception()
        assert isinstance(error, UploadTimeoutError) and "waited behind" in str(error)
        gate.opened.set()
        assert gate.returned.wait(WAIT)


# -- failures ------------------------------------------------------------------------------------------


def test_permanent_failure_is_not_retried(store: GatedStore, tmp_path: Path) -> None:
    store.real.write_bytes("taken.pt", b"someone else's")
    with Uploader(store, max_attempts=5, backoff_seconds=0.01) as uploader:
        future = uploader.submit(_file(tmp_path, "t", b"mine"), "taken.pt", overwrite=False)
        error = future.exception(timeout=WAIT)
    assert isinstance(error, UploadError) and not isinstance(error, UploadTimeoutError)
    assert isinstance(error.__cause__, CheckpointExistsError)
    assert future.attempts == 1 and len(store.calls) == 1
    assert "taken.pt" in str(error) and str(tmp_path / "t") in str(error)
    assert _object(store, "taken.pt") == b"someone else's"


def test_close_reports_what_was_not_uploaded(
    store: GatedStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gate = store.gate("a")
    uploader = Uploader(store)
    futures = [uploader.submit(_file(tmp_path, key, key.encode()), key) for key in ("a", "b", "c")]
    assert gate.entered.wait(WAIT)
    assert uploader.close(drain_timeout=0.2) == ["a", "b", "c"]
    for future in futures:
        assert isinstance(future.exception(timeout=0), UploadError)
    assert sorted(e.args[0].split(" to ")[1].split(" ")[0] for e in uploader.poll_errors()) == [
        f"{store.url}/{key}" for key in ("a", "b", "c")
    ]
    assert "closed with 3 upload(s) unfinished" in caplog.text
    assert uploader.close() == []
    with pytest.raises(UploadError, match="closed"):
        uploader.submit(_file(tmp_path, "d", b"d"), "d")
    gate.opened.set()
    assert gate.returned.wait(WAIT)


def test_close_interrupts_a_stagger(store: GatedStore, tmp_path: Path) -> None:
    uploader = Uploader(store, stagger_seconds=600)
    future = uploader.submit(_file(tmp_path, "a", b"a"), "a")
    start = time.monotonic()
    assert uploader.close(drain_timeout=0.1) == ["a"]
    assert time.monotonic() - start < 0.1 + SLACK
    assert future.attempts == 0 and future.elapsed == 0.0 and store.calls == []


def test_close_drains_everything_by_default(store: GatedStore, tmp_path: Path) -> None:
    uploader = Uploader(store, num_concurrent_uploads=3)
    for i in range(10):
        uploader.submit(_file(tmp_path, f"f{i}", bytes([i]) * 100), f"run/f{i}")
    assert uploader.close() == []
    assert store.list("run/") == [f"run/f{i}" for i in range(10)]


def test_missing_file_and_bad_arguments(store: GatedStore, tmp_path: Path) -> None:
    with Uploader(store) as uploader:
        with pytest.raises(CheckpointNotFoundError, match="nope.pt"):
            uploader.submit(tmp_path / "nope.pt", "k")
        local = _file(tmp_path, "x", b"x")
        with pytest.raises(ConfigurationError, match="'key' must be"):
            uploader.submit(local, "")
        with pytest.raises(ConfigurationError, match="'metadata' must be"):
            uploader.submit(local, "k", metadata={"n": 1})  # type: ignore[dict-item]
        with pytest.raises(ConfigurationError, match="'on_done' must be"):
            uploader.submit(local, "k", on_done="no")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("num_concurrent_uploads", 0),
        ("num_concurrent_uploads", 1.5),
        ("upload_timeout_in_seconds", 0),
        ("upload_timeout_in_seconds", float("inf")),
        ("max_queued", 0),
        ("max_attempts", True),
        ("backoff_seconds", -1),
        ("stagger_seconds", "1s"),
        ("shutdown_timeout", -0.1),
        ("clock", 3),
    ],
)
def test_bad_configuration_is_refused_at_construction(store: GatedStore, argument: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=f"'{argument}' must be .*got {value!r}"):
        Uploader(store, **{argument: value})  # type: ignore[arg-type]


def test_store_must_be_a_remote_store() -> None:
    with pytest.raises(ConfigurationError, match="'store' must be a RemoteStore"):
        Uploader(object())  # type: ignore[arg-type]


# -- interpreter exit --------------------------------------------------------------------------------------

_EXIT_SCRIPT = """
import atexit, logging, sys, threading, pathlib, time
exit_started = []
# Registered before the uploader's hook, so it runs after it (atexit is last in, first out).
atexit.register(lambda: print(f"drained in {time.monotonic() - exit_started[0]:.3f} s", flush=True))
logging.basicConfig(level=logging.WARNING)
from ckpt_callbacks.remote.uploader import Uploader

class SlowStore:
    url = "file://" + sys.argv[1]
    def upload_file(self, local_path, key, *, overwrite=True, metadata=None, deadline=None, progress=None):
        if key == "never":
            threading.Event().wait()  # a store call that never comes back
        threading.Event().wait(0.3)
        pathlib.Path(sys.argv[1], key).write_bytes(open(local_path, "rb").read())

local = pathlib.Path(sys.argv[1], "local.pt")
local.write_bytes(b"bytes")
uploader = Uploader(SlowStore(), shutdown_timeout=float(sys.argv[2]))
for key in sys.argv[3:]:
    uploader.submit(local, key)
exit_started.append(time.monotonic())
"""


def _run_exit_script(tmp_path: Path, shutdown_timeout: float, *keys: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run a script that exits with uploads pending; return it and how long its exit drained."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_EXIT_SCRIPT), str(tmp_path), str(shutdown_timeout), *keys],
        capture_output=True, text=True, timeout=120,
    )
    drained = re.search(r"drained in ([0-9.]+) s", proc.stdout)
    assert proc.returncode == 0 and drained is not None, proc.stdout + proc.stderr
    return proc, float(drained.group(1))


def test_interpreter_exit_drains_pending_uploads(tmp_path: Path) -> None:
    _, drained = _run_exit_script(tmp_path, 30.0, "one", "two")
    assert (tmp_path / "one").read_bytes() == (tmp_path / "two").read_bytes() == b"bytes"
    assert drained >= 0.3  # it did wait for the store


def test_interpreter_exit_drains_for_at_most_the_shutdown_timeout(tmp_path: Path) -> None:
    proc, drained = _run_exit_script(tmp_path, 0.5, "never")
    assert "closed with 1 upload(s) unfinished: never" in proc.stderr
    assert 0.5 <= drained <= 0.5 + SLACK  # without the bound the exit would never end
