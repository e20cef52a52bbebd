"""Start victims, watch them, kill them, and check what a crash left behind.

A :class:`Victim` is one run of ``train_victim.py``, started in one of two ways:

- ``'fork'``: a child of a :class:`Zygote` that imported and warmed up torch and ckpt_callbacks
  once (a trial then starts in milliseconds instead of an interpreter start and a torch import);
- ``'cold'``: ``python train_victim.py`` in a fresh interpreter, optionally under ``strace`` whose
  ``-e inject=...`` delivers a fault or a signal at the n-th real system call of a kind.

Either way the victim reports on a pipe, one line per event (see ``train_victim``); the harness
reads the lines with bounded waits (:class:`Hang` when one does not come) and kills at a random
instant or lets the victim's own crash hook kill it.

After the victim is gone, :func:`check_crash` looks at what is left: no file under a final
checkpoint name fails to verify, ``latest`` (the local link and the store's ``.symlink`` pointer)
names a checkpoint that verifies and is not older than the newest the victim reported saved
(uploaded), and autoresume, run here in the test process, continues from such a checkpoint, finishes
training with exactly the weights of an uninterrupted run, and leaves no temp file behind.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import train_victim
from train_victim import VictimConfig, make_saver, make_trainer

from ckpt_callbacks.errors import CheckpointError
from ckpt_callbacks.remote import open_store
from ckpt_callbacks.remote.publisher import MANIFEST_SUFFIX
from ckpt_callbacks.serialization import verify_file
from ckpt_callbacks.storage import resolve_latest
from ckpt_callbacks.temp_files import is_temp_name

__all__ = [
    "Findings", "Hang", "Victim", "Zygote", "check_crash", "kill_at_random_instant", "one_thread", "reference_weights",
    "stop_zygote", "strace_unusable", "zygote",
]

START_SECONDS = 120.0  # a cold start imports torch; CI machines are slow and shared
RUN_SECONDS = 120.0
_LATEST = "latest-rank0.pt"
_reference: dict[tuple[int, int], dict[str, torch.Tensor]] = {}


def strace_unusable() -> str | None:
    """Why ``strace`` cannot be used here (not installed, ptrace refused), or None when it can."""
    if shutil.which("strace") is None:
        return "strace is not installed (apt-get install strace)"
    probe = subprocess.run(["strace", "-qq", "-o", "/dev/null", "true"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        return f"strace cannot trace here (ptrace refused?): {probe.stderr.decode(errors='replace').strip()}"
    return None


class Hang(AssertionError):
    """A victim did not report, or did not exit, within its bound."""


class Zygote:
    """A warm ``train_victim.py --zygote`` process that forks victims on request (see its docstring).

    Example:
        >>> zygote = Zygote(); pid = zygote.fork(config, report_fd, log); zygote.wait_exit(pid, 60)  # doctest: +SKIP
    """

    def __init__(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        command = [sys.executable, str(Path(train_victim.__file__)), "--zygote", str(theirs.fileno())]
        self._process = subprocess.Popen(command, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        self._sock = mine
        self._exits: dict[int, int] = {}

    def _receive(self, deadline: float) -> dict[str, Any]:
        self._sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            message = self._sock.recv(1 << 16)
        except TimeoutError:
            raise Hang("the zygote did not answer in time") from None
        if not message:
            raise Hang(f"the zygote ended (status {self._process.poll()})")
        return json.loads(message)

    def fork(self, config: VictimConfig, report_fd: int, log: Path) -> int:
        """Start a victim; returns its pid (the first request waits for the zygote's warm-up)."""
        request = json.dumps({"config": json.loads(config.to_json()), "log": str(log)}).encode()
        socket.send_fds(self._sock, [request], [report_fd])
        deadline = time.monotonic() + START_SECONDS
        while "pid" not in (answer := self._receive(deadline)):
            self._exits[answer["exit"]] = answer["status"]
        return answer["pid"]

    def wait_exit(self, pid: int, timeout: float) -> int | None:
        """The exit status of victim ``pid`` (-N: signal N), or None if it did not end in time."""
        deadline = time.monotonic() + timeout
        try:
            while pid not in self._exits:
                answer = self._receive(deadline)
                if "exit" in answer:
                    self._exits[answer["exit"]] = answer["status"]
        except Hang:
            return None
        return self._exits.pop(pid)

    def close(self) -> None:
        """Stop the zygote (closing its socket ends its loop) and reap it."""
        self._sock.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=30)


_zygote: Zygote | None = None


def zygote() -> Zygote:
    """The session's zygote, started on first use (stop it with :func:`stop_zygote`)."""
    global _zygote
    if _zygote is None:
        _zygote = Zygote()
    return _zygote


def stop_zygote() -> None:
    """Stop the session's zygote, if one was started."""
    global _zygote
    if _zygote is not None:
        _zygote.close()
        _zygote = None


class Victim:
    """One victim process and the lines it reported (see the module docstring).

    Example:
        >>> victim = Victim(config, log=tmp_path / "victim.log").start()  # doctest: +SKIP
        >>> victim.wait_for("batch 5"); victim.kill(); victim.finish()  # doctest: +SKIP
    """

    def __init__(self, config: VictimConfig, *, log: Path, launch: str = "fork", strace: list[str] | None = None):
        self.config, self.log, self.launch, self.strace = config, log, launch, strace
        self.lines: list[tuple[float, str]] = []
        self.pid = 0
        self.returncode: int | None = None
        self._buffer = b""
        self._eof = False
        self._fd = -1
        self._process: Any = None

    def start(self) -> Victim:
        """Start the victim; its report pipe is open from now on."""
        read_fd, write_fd = os.pipe()
        self._fd = read_fd
        if self.launch == "fork":
            try:
                self.pid = zygote().fork(self.config, write_fd, self.log)
            finally:
                os.close(write_fd)
            return self
        script = str(Path(train_victim.__file__))
        command = [sys.executable, script, self.config.to_json(), "--report-fd", str(write_fd)]
        if self.strace is not None:
            command = ["strace", "-f", "-qq", *self.strace, "--", *command]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # no .pyc writes among the counted calls
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(
                command, pass_fds=(write_fd,), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )
        os.close(write_fd)
        self.pid = self._process.pid
        return self

    def _read_line(self, deadline: float) -> str | None:
        while b"\n" not in self._buffer and not self._eof:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Hang(f"the victim (pid {self.pid}) reported nothing for too long; last: {self.last()!r}")
            ready, _, _ = select.select([self._fd], [], [], left)
            if ready:
                chunk = os.read(self._fd, 65536)
                self._buffer += chunk
                self._eof = not chunk
        if not self._buffer:
            return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        text = line.decode(errors="replace")
        self.lines.append((time.monotonic(), text))
        return text

    def wait_for(self, wanted: str, timeout: float = RUN_SECONDS) -> str | None:
        """Read lines until one starts with ``wanted``; None if the victim ended first."""
        deadline = time.monotonic() + timeout
        while (line := self._read_line(deadline)) is not None:
            if line.startswith(wanted):
                return line
        return None

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """Send ``signum`` to the victim (nothing if it is gone already)."""
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def finish(self, timeout: float = RUN_SECONDS) -> int:
        """Read every remaining line, reap the process and return its exit status (-N: signal N)."""
        deadline = time.monotonic() + timeout
        while self._read_line(deadline) is not None:
            pass
        os.close(self._fd)
        if self.launch == "fork":
            code = zygote().wait_exit(self.pid, max(0.0, deadline - time.monotonic()))
        else:
            try:
                code = self._process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                code = None
        if code is None:
            self.kill()
            raise Hang(f"the victim (pid {self.pid}) closed its report but did not exit")
        self.returncode = code
        return code

    def last(self) -> str:
        """The last line reported."""
        return self.lines[-1][1] if self.lines else ""

    def batches(self, event: str) -> list[int]:
        """The batch numbers of every ``<event> <n>`` line, in order."""
        return [int(line.split()[1]) for _, line in self.lines if line.split()[0] == event]

    def seen(self, event: str) -> list[str]:
        """The lines of an event, without the event word."""
        return [line.partition(" ")[2] for _, line in self.lines if line.split()[0] == event]


def kill_at_random_instant(victim: Victim, rng: random.Random) -> None:
    """Kill ``victim`` with SIGKILL at a random instant of its run: during a random batch's save, or
    its training, or between them (a random delay within about one batch period of a random batch)."""
    config = victim.config
    if victim.wait_for("ready", START_SECONDS) is None:
        return
    target = rng.randint(2, config.max_batches)
    before = victim.wait_for(f"batch {target - 1}")
    at = victim.wait_for(f"batch {target}")
    if before is None or at is None:
        return  # it finished (or crashed) first: the trial checks what it left all the same
    period = victim.lines[-1][0] - next(t for t, line in reversed(victim.lines) if line == before)
    # The delay is the point of the trial (a kill at an arbitrary instant), not a wait for an event.
    time.sleep(rng.uniform(0.0, 1.5 * period))
    victim.kill()


@dataclass
class Findings:
    """What trials found; the report adds these up per scenario."""

    trials: int = 0
    saved: int = 0
    lost: int = 0
    bad_pointers: int = 0
    hangs: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str, *, lost: bool = False, pointer: bool = False) -> None:
        """Record a broken promise (``lost``: a reported checkpoint; ``pointer``: a bad ``latest``)."""
        self.problems.append(text)
        self.lost += lost
        self.bad_pointers += pointer


def _batch_of(name: str) -> int | None:
    found = re.search(r"ba(\d+)", name)
    return int(found[1]) if found else None


def _checkpoint_pattern(config: VictimConfig) -> re.Pattern[str]:
    return re.compile(re.escape(config.filename).replace(re.escape("{batch}"), r"\d+") + r"\Z")


def _inspect_folder(config: VictimConfig, saved: list[int], findings: Findings) -> None:
    folder = Path(config.folder)
    if not folder.exists():
        if saved:
            findings.problem(f"{folder} vanished although batches {saved} were reported saved", lost=True)
        return
    pattern = _checkpoint_pattern(config)
    for entry in sorted(folder.iterdir()):
        if is_temp_name(entry.name) or entry.name == _LATEST:
            continue
        if entry.name.startswith(".ckpt-record-"):
            try:
                json.loads(entry.read_text())
            except ValueError as error:
                findings.problem(f"the record {entry.name} is partial: {error}")
        elif pattern.match(entry.name):
            try:
                verify_file(entry)
            except CheckpointError as error:
                findings.problem(f"{entry.name} is under a final name but does not verify: {error}")
        else:
            findings.problem(f"unexpected entry {entry.name} in {folder}")
    target = resolve_latest(folder / _LATEST)
    newest = max(saved, default=None)
    if target is None:
        if newest is not None:
            findings.problem(f"no {_LATEST} although batch {newest} was reported saved", pointer=True)
        return
    try:
        verify_file(target)
    except CheckpointError as error:
        findings.problem(f"{_LATEST} names {target.name}, which does not load: {error}", pointer=True)
        return
    if newest is not None and (_batch_of(target.name) or 0) < newest:
        findings.problem(f"{_LATEST} names {target.name}, older than batch {newest} reported saved", pointer=True)


def _inspect_store(config: VictimConfig, uploaded: list[int], scratch: Path, findings: Findings) -> None:
    store = open_store(config.remote, config.storage_options)
    try:
        newest = max(uploaded, default=None)
        try:
            key = store.read_bytes(_LATEST + ".symlink").decode().strip()
        except CheckpointError:
            key = None
        if key is None:
            if newest is not None:
                findings.problem(f"no remote pointer although batch {newest} was reported uploaded", pointer=True)
            return
        if store.info(key + MANIFEST_SUFFIX) is None:
            findings.problem(f"the remote pointer names {key}, which has no manifest", pointer=True)
            return
        local = scratch / ("remote-" + Path(key).name)
        try:
            store.download_file(key, local)
            verify_file(local)
        except CheckpointError as error:
            findings.problem(f"the remote pointer names {key}, which does not load: {error}", pointer=True)
            return
        finally:
            local.unlink(missing_ok=True)
        if newest is not None and (_batch_of(key) or 0) < newest:
            findings.problem(f"the remote pointer names {key}, older than batch {newest} reported uploaded",
                             pointer=True)
    finally:
        store.close()


@contextmanager
def one_thread() -> Iterator[None]:
    """Train on one thread, as victims do: bit-exact comparisons need the same rounding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reference_weights(config: VictimConfig, scratch: Path) -> dict[str, torch.Tensor]:
    """The final weights of an uninterrupted run of ``config`` (computed once per model and length)."""
    key = (config.width, config.max_batches)
    if key not in _reference:
        plain = VictimConfig(folder=str(scratch / "reference"), width=config.width, max_batches=config.max_batches)
        trainer = make_trainer(plain, saver=make_saver(plain, save_interval=0))
        with one_thread():
            trainer.fit()
        _reference[key] = {k: v.clone() for k, v in trainer.state.model.state_dict().items()}
        shutil.rmtree(plain.folder, ignore_errors=True)
    return _reference[key]


def _resume(config: VictimConfig, saved: list[int], uploaded: list[int], from_store: bool, findings: Findings,
            scratch: Path) -> None:
    folder = Path(config.folder)
    if from_store:
        shutil.rmtree(folder, ignore_errors=True)
    resumed = replace(config, crash=None, trace_ops=False, save_on_signals=[], save_mode="sync")
    trainer = make_trainer(resumed, saver=make_saver(resumed, save_interval=f"{config.max_batches + 1}ba"))
    with warnings.catch_warnings(), one_thread():
        warnings.simplefilter("ignore")  # a corrupt candidate would warn; the checks below judge the outcome
        trainer.fit()
    start = _batch_of(Path(trainer.state.resumed_from).name) if trainer.state.resumed_from else 0
    promised = max(uploaded if from_store else saved, default=0)
    if (start or 0) < promised:
        what = "uploaded" if from_store else "saved"
        findings.problem(f"autoresume started at batch {start}, but batch {promised} was reported {what}", lost=True)
    if trainer.state.timestamp.batch != config.max_batches:
        findings.problem(f"the resumed run stopped at batch {trainer.state.timestamp.batch}")
    expected = reference_weights(config, scratch)
    for name, tensor in trainer.state.model.state_dict().items():
        if not torch.equal(tensor, expected[name]):
            findings.problem(f"the resumed run ended with other weights than an uninterrupted run ({name})")
            break
    leftovers = [p.name for p in folder.iterdir() if is_temp_name(p.name) or p.name.startswith(".download")]
    if leftovers:
        findings.problem(f"temp files left after the restart: {leftovers}")


def check_crash(victim: Victim, findings: Findings, scratch: Path, *, from_store: bool = False) -> None:
    """Check what the dead ``victim`` left, resume it here, and add to ``findings``.

    ``from_store``: delete the local folder first, so autoresume must come from the store's pointer.
    """
    config = victim.config
    saved, uploaded = victim.batches("saved"), victim.batches("uploaded")
    findings.trials += 1
    findings.saved += len(saved)
    _inspect_folder(config, saved, findings)
    if config.remote is not None:
        _inspect_store(config, uploaded, scratch, findings)
    _resume(config, saved, uploaded, from_store and config.remote is not None, findings, scratch)
