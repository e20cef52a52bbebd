"""A small training run that the reliability tests kill, signal, starve of disk and restart.

Run it cold as a script, ``python train_victim.py '<config as JSON>' --report-fd N``, or as a
zygote, ``python train_victim.py --zygote FD`` (:func:`serve_zygote`), which imports and warms up
torch once and then forks a victim per request: a trial then starts in milliseconds, not seconds
(the kill tests use both). It trains a small MLP for ``max_batches`` batches with one
:class:`~ckpt_callbacks.CheckpointSaver` (every batch by default) and autoresume, and reports what
happens on the file descriptor it is given, one line per event, each written in one ``write``::

    ready <batch>        fit started (the folder is prepared) at that batch
    batch <n>            batch n is about to be trained
    saved <n>            the checkpoint of batch n is committed and published (as the library logs it)
    uploaded <n>         ... and committed in the store (manifest and pointer written)
    op <kind> <path>     a file operation the crash hook counted (``trace_ops``)
    crash <kind> <path>  the crash hook fires just before this operation
    done <batch>         fit returned

The crash hook (:class:`CrashHook`) sends the process a signal, SIGKILL by default, just before its
n-th file operation of a kind under the checkpoint folders, counted from the start of batch
``crash_from_batch``: ``open`` (for writing), ``write``, ``fsync``, ``rename``, ``replace``,
``link``, ``symlink``, ``unlink``, ``mkdir`` or ``any``. It watches from inside the process: audit
hooks (:func:`sys.addaudithook`) see opens, renames, links, symlinks and removals with their paths;
a profile hook sees the calls of ``os.fsync`` and of binary files' ``write`` made from Python
(``torch.save``'s own writes, made from C++, are invisible to it; ``strace`` sees those).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import resource
import selectors
import signal
import socket
import sys
import tempfile
import threading
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, TensorDataset

from ckpt_callbacks import Callback, CheckpointSaver, Trainer

__all__ = [
    "CRASH_KINDS", "CrashHook", "Reporter", "VictimConfig", "main", "make_saver", "make_trainer", "run", "serve_zygote",
]

CRASH_KINDS = ("open", "write", "fsync", "rename", "replace", "link", "symlink", "unlink", "mkdir", "any")
BATCH_SIZE = 8
BATCHES_PER_EPOCH = 10
FEATURES = 16

_AUDIT_KINDS = {"open": "open", "os.rename": "rename", "os.link": "link", "os.symlink": "symlink",
                "os.remove": "unlink", "os.rmdir": "unlink", "os.mkdir": "mkdir"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_BINARY_FILES = ("BufferedWriter", "BufferedRandom", "FileIO")


@dataclass
class VictimConfig:
    """One victim run; JSON-able, so that the same run can be started cold or in a forkserver child.

    Attributes:
        folder: the saver's folder.
        filename: the saver's filename template; its extension chooses the format.
        save_mode, save_interval, keep: the saver's ``save_mode``, ``save_interval`` and
            ``num_checkpoints_to_keep``.
        max_batches: how long to train.
        width: the hidden width of the MLP (the checkpoint holds about 12 * width**2 bytes).
        remote, storage_options, num_concurrent_uploads, upload_timeout, on_upload_error,
            max_unuploaded_checkpoints: the saver's remote arguments.
        save_on_signals, shutdown_timeout, on_save_error: the saver's arguments of those names.
        crash: ``'<kind>:<n>'``: signal itself just before its n-th file operation of that kind.
        crash_signal: which signal the crash hook sends (``'SIGKILL'``, or ``'SIGTERM'`` to
            preempt itself in the middle of a save).
        crash_from_batch: operations are counted from the start of this batch (0: from the start,
            autoresume and its download included) ...
        crash_until_batch: ... until the start of this one (None: to the end).
        trace_ops: report every operation counted (to enumerate the crash points of a save).
        file_size_limit: ``RLIMIT_FSIZE`` in bytes: a write past it fails with EFBIG (a disk that
            fills up, without a mount).
    """

    folder: str
    run_name: str = "victim"
    filename: str = "ba{batch}.pt"
    save_mode: str = "sync"
    save_interval: str = "1ba"
    keep: int = 2
    max_batches: int = 24
    width: int = 192
    remote: str | None = None
    storage_options: dict[str, Any] | None = None
    num_concurrent_uploads: int = 1
    upload_timeout: float = 60.0
    on_upload_error: str = "raise"
    max_unuploaded_checkpoints: int | None = 8
    save_on_signals: list[str] = field(default_factory=list)
    shutdown_timeout: float = 60.0
    on_save_error: str = "raise"
    crash: str | None = None
    crash_signal: str = "SIGKILL"
    crash_from_batch: int = 1
    crash_until_batch: int | None = None
    trace_ops: bool = False
    file_size_limit: int | None = None

    def to_json(self) -> str:
        """The config as one JSON document (the script's argument)."""
        return json.dumps(asdict(self))

    @property
    def watched_folders(self) -> list[str]:
        """Absolute folders whose file operations the crash hook counts (the store's too, if local)."""
        folders = [os.path.abspath(self.folder)]
        if self.remote and self.remote.startswith("file://"):
            folders.append(os.path.abspath(self.remote[len("file://"):]))
        return folders


def make_saver(config: VictimConfig, *, save_interval: str | int | None = None) -> CheckpointSaver:
    """The victim's saver (a resumed run may save less often: the interval does not name files)."""
    return CheckpointSaver(
        config.folder, filename=config.filename,
        save_interval=config.save_interval if save_interval is None else save_interval,
        num_checkpoints_to_keep=config.keep, save_mode=config.save_mode, remote=config.remote,
        storage_options=config.storage_options, num_concurrent_uploads=config.num_concurrent_uploads,
        upload_timeout_in_seconds=config.upload_timeout, save_on_signals=tuple(config.save_on_signals),
        shutdown_timeout=config.shutdown_timeout, on_save_error=config.on_save_error,
        on_upload_error=config.on_upload_error, max_unuploaded_checkpoints=config.max_unuploaded_checkpoints,
    )


def make_trainer(
    config: VictimConfig, *, saver: CheckpointSaver | None = None, callbacks: tuple[Callback, ...] = ()
) -> Trainer:
    """A deterministic run: the same config always trains to the same weights, resumed or not."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(BATCHES_PER_EPOCH * BATCH_SIZE, FEATURES, generator=generator)
    targets = inputs[:, :1] * 2 - inputs[:, 1:2]
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, config.width), torch.nn.ReLU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(config.width, config.width), torch.nn.ReLU(), torch.nn.Linear(config.width, 1),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=BATCH_SIZE, shuffle=True)
    saver = saver or make_saver(config)
    return Trainer(
        model, optimizer, loader, loss_fn=_loss, max_duration=f"{config.max_batches}ba",
        run_name=config.run_name, callbacks=[saver, *callbacks], autoresume=True, seed=0,
    )


def _loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    inputs, targets = batch
    return torch.nn.functional.mse_loss(model(inputs), targets)


class Reporter(Callback, logging.Handler):
    """Reports the run's progress (see the module docstring) and arms the crash hook.

    Saves and uploads are reported from the library's own log records ("saved <path>: ...",
    "committed <key> in ..."), on whichever thread makes them, so that a checkpoint saved just
    before the process dies of a handed-over signal is reported too; the record is read at each
    event as well.
    """

    def __init__(self, saver: CheckpointSaver, send: Callable[[str], None], hook: CrashHook | None) -> None:
        Callback.__init__(self)
        logging.Handler.__init__(self, logging.INFO)
        self.saver, self.send, self.hook = saver, send, hook
        self._reported: set[tuple[str, int]] = set()
        self._report_lock = threading.Lock()
        library = logging.getLogger("ckpt_callbacks")
        library.setLevel(logging.INFO)
        library.addHandler(self)

    def _report(self, event: str, name: str) -> None:
        found = re.search(r"ba(\d+)", os.path.basename(name))
        if found is None:
            return
        with self._report_lock:
            fresh = (event, int(found[1])) not in self._reported
            self._reported.add((event, int(found[1])))
        if fresh:
            self.send(f"{event} {found[1]}")

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("saved ") and record.args:
            self._report("saved", str(record.args[0]))
        elif message.startswith("committed ") and record.args:
            self._report("uploaded", str(record.args[0]))

    def fit_start(self, state: Any) -> None:
        self.send(f"ready {state.timestamp.batch}")

    def batch_start(self, state: Any) -> None:
        batch = state.timestamp.batch + 1
        if self.hook is not None:
            self.hook.armed = self.hook.from_batch <= batch and (self.hook.until_batch or batch + 1) > batch
        self.send(f"batch {batch}")

    def batch_end(self, state: Any) -> None:
        self._report_record()

    def batch_checkpoint(self, state: Any) -> None:
        self._report_record()

    def fit_end(self, state: Any) -> None:
        self._report_record()

    def _report_record(self) -> None:
        manager = self.saver.manager
        if manager is None or manager.record.lineage is None:
            return
        for info in list(manager.record.checkpoints):
            self._report("saved", info.name)
            if info.uploaded:
                self._report("uploaded", info.name)


class CrashHook:
    """Signals the process just before its n-th file operation of a kind (see the module docstring).

    Example:
        >>> hook = CrashHook("fsync", 3, folders=["/ckpt"], send=print).install()  # doctest: +SKIP
    """

    def __init__(
        self, kind: str, n: int, *, folders: list[str], send: Callable[[str], None],
        signum: int = signal.SIGKILL, from_batch: int = 1, until_batch: int | None = None, trace: bool = False,
    ) -> None:
        if kind not in CRASH_KINDS:
            raise ValueError(f"'kind' must be one of {CRASH_KINDS} (got {kind!r})")
        self.kind, self.n, self.folders, self.send = kind, n, folders, send
        self.signum, self.from_batch, self.until_batch, self.trace = signum, from_batch, until_batch, trace
        self.armed = from_batch <= 0  # 0: from the start, the resume (and its download) included
        self.count = 0
        self._lock = threading.Lock()
        self._calling = threading.local()  # the C function a thread is calling (os.replace vs os.rename)

    def install(self) -> CrashHook:
        """Start watching: the audit hook for the whole process, the profile hook for this thread and
        every thread started from now on (savers and uploaders start theirs later)."""
        sys.addaudithook(self._audit)
        sys.setprofile(self._profile)
        threading.setprofile(self._profile)
        return self

    def _inside(self, path: Any) -> str | None:
        if isinstance(path, int) or path is None:
            return None
        text = os.path.abspath(os.fsdecode(path))
        return text if any(text.startswith(folder) for folder in self.folders) else None

    def _audit(self, event: str, args: tuple[Any, ...]) -> None:
        kind = _AUDIT_KINDS.get(event)
        if kind is None or not self.armed:
            return
        if kind == "open":
            mode, flags = args[1], args[2]
            writing = (mode is not None and any(c in mode for c in "wxa+")) or (mode is None and flags & _WRITE_FLAGS)
            if not writing:
                return
        if kind == "rename" and getattr(self._calling, "name", None) == "replace":
            kind = "replace"
        path = self._inside(args[0])
        if path is None and kind in ("rename", "replace", "link", "symlink"):
            path = self._inside(args[1])
        if path is not None:
            self._hit(kind, path)

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event != "c_call":
            return
        name = getattr(arg, "__name__", "")
        if getattr(arg, "__module__", None) == os.name:  # os.replace and os.rename raise the same audit event
            self._calling.name = name
        if not self.armed:
            return
        if arg is os.fsync:
            self._hit("fsync", "")
        elif name == "write" and type(getattr(arg, "__self__", None)).__name__ in _BINARY_FILES:
            self._hit("write", str(getattr(arg.__self__, "name", "")))

    def _hit(self, kind: str, path: str) -> None:
        with self._lock:
            if self.kind not in ("any", kind):
                return
            self.count += 1
            fire = self.n > 0 and self.count == self.n
        if self.trace:
            self.send(f"op {kind} {path}")
        if fire:
            self.send(f"crash {kind} {path}")
            os.kill(os.getpid(), self.signum)


def run(config: VictimConfig, report_fd: int) -> None:
    """Train as ``config`` says, reporting on ``report_fd``; a crash hook may end the process."""

    def send(line: str) -> None:
        try:
            os.write(report_fd, (line + "\n").encode())
        except OSError:
            pass  # the test stopped listening; the run itself goes on

    # One thread, as in the harness's reference run: other thread counts round differently.
    torch.set_num_threads(1)
    if config.file_size_limit is not None:
        # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG instead of killing us.
        resource.setrlimit(resource.RLIMIT_FSIZE, (config.file_size_limit, config.file_size_limit))
    hook = None
    if config.crash is not None or config.trace_ops:
        kind, _, n = (config.crash or "any:0").partition(":")
        hook = CrashHook(
            kind, int(n), folders=config.watched_folders, send=send, signum=signal.Signals[config.crash_signal],
            from_batch=config.crash_from_batch, until_batch=config.crash_until_batch, trace=config.trace_ops,
        ).install()
    saver = make_saver(config)
    trainer = make_trainer(config, saver=saver, callbacks=(Reporter(saver, send, hook),))
    trainer.fit()
    send(f"done {trainer.state.timestamp.batch}")


def _warm_up() -> None:
    """Train two batches without saving, so that lazy imports and first-call costs are paid here."""
    torch.set_num_threads(1)  # no OpenMP pool in the zygote: a pool does not survive fork
    importlib.import_module("ckpt_callbacks.remote.s3")  # botocore and s3transfer, for S3 victims

    with tempfile.TemporaryDirectory() as folder:
        config = VictimConfig(folder=os.path.join(folder, "ckpt"), max_batches=2, width=8)
        make_trainer(config, saver=make_saver(config, save_interval=0)).fit()


def _victim_child(request: dict[str, Any], report_fd: int, inherited: list[int]) -> None:
    """A forked victim: runs the requested config, then leaves without running the zygote's exit code."""
    code = 1
    try:
        for fd in inherited:
            os.close(fd)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        run(VictimConfig(**request["config"]), report_fd)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 -- reported in the log and by the exit status
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve_zygote(sock_fd: int) -> None:
    """Fork a victim per request on ``sock_fd``, a ``SOCK_SEQPACKET`` Unix socket, until it closes.

    A request is one message: ``{"config": {...}, "log": path}`` as JSON, carrying the write end of
    the victim's report pipe (SCM_RIGHTS). Answers are messages ``{"pid": n}`` and, when a victim
    ends, ``{"exit": n, "status": code}`` (-N: killed by signal N, as ``Popen.returncode``).
    """
    _warm_up()
    sock = socket.socket(fileno=sock_fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is sock:
                message, fds, _, _ = socket.recv_fds(sock, 1 << 16, 1)
                if not message:
                    return
                pid = os.fork()
                if pid == 0:
                    _victim_child(json.loads(message), fds[0], [sock.fileno(), wake_r, wake_w])
                os.close(fds[0])
                sock.send(json.dumps({"pid": pid}).encode())
                continue
            while True:
                try:
                    os.read(wake_r, 512)
                except BlockingIOError:
                    break
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                sock.send(json.dumps({"exit": pid, "status": os.waitstatus_to_exitcode(status)}).encode())


def main(argv: list[str] | None = None) -> None:
    """The script's entry point: ``train_victim.py '<config JSON>' --report-fd N`` or ``--zygote FD``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="a VictimConfig as JSON")
    parser.add_argument("--report-fd", type=int, default=1, help="where to report (default: stdout)")
    parser.add_argument("--zygote", type=int, metavar="FD", help="serve fork requests on this socket instead")
    args = parser.parse_args(argv)
    if args.zygote is not None:
        serve_zygote(args.zygote)
    else:
        run(VictimConfig(**json.loads(args.config)), args.report_fd)


if __name__ == "__main__":
    main()
