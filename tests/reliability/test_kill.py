"""Kill -9 a training run at random instants and at every crash point of a save: nothing is lost.

A victim (``train_victim.py``) saves every batch, sync and async, as ``.pt``, ``.pt.zst`` and
``.tar.zst``, with and without uploads, and is SIGKILLed:

- at a random instant (a random batch, then a random delay within about one batch period);
- just before its n-th file operation after a given batch starts, for every n of a save's
  operations (the victim's in-process crash hook: open, write, fsync, rename, replace, symlink,
  unlink, link; a dry run lists them first);
- under ``strace``, at the n-th real system call of a kind (``-e inject=SYSCALL:signal=SIGKILL:when=N``).

After each kill :func:`_harness.check_crash` verifies the promises: no file under a final name is
partial, ``latest`` (the local link and the store's pointer) names a checkpoint that loads and is
not older than the newest one the victim reported saved (uploaded), autoresume continues from such
a checkpoint and finishes with exactly the weights of an uninterrupted run, and the crashed run's
temp files are swept. CI runs a sample (at least 30 kills in all, a minute or two); ``--trials 500``
runs the large matrix by hand.
"""

from __future__ import annotations

import random
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from _harness import Findings, Hang, Victim, check_crash, kill_at_random_instant, strace_unusable
from train_victim import VictimConfig

FORMATS = ("ba{batch}.pt", "ba{batch}.pt.zst", "ba{batch}.tar.zst")
WINDOW = (4, 5)  # crash points are enumerated over the operations of this batch (saves of nearby ones overlap)
_STRACE_CALLS = ("write", "pwrite64", "fsync", "rename", "symlink", "unlink")  # checkpoints: pwrite64 (direct_io)
_STRACE_LINE = re.compile(r"^(?P<tid>\d+)\s+(?P<call>\w+)\((?P<args>.*)\)\s+=\s+(?P<result>-?\d+)")


def _config(tmp_path: Path, index: int, **options: object) -> VictimConfig:
    trial = tmp_path / f"trial{index:03d}"
    trial.mkdir()
    if options.pop("upload", False):
        options["remote"] = (trial / "store").as_uri()
    return VictimConfig(folder=str(trial / "ckpt"), **options)  # type: ignore[arg-type]


def _trial(victim: Victim, findings: Findings, scratch: Path, *, kill: random.Random | None = None,
           from_store: bool = False) -> None:
    """Run one victim to its end (killed by ``kill``'s random instant, or by its own hook), then check."""
    try:
        victim.start()
        if kill is not None:
            kill_at_random_instant(victim, kill)
        victim.finish()
    except Hang as hang:
        victim.kill()
        findings.trials += 1
        findings.hangs += 1
        findings.problems.append(str(hang))
        return
    check_crash(victim, findings, scratch, from_store=from_store)


@pytest.mark.parametrize("upload", [False, True], ids=["local", "upload"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_at_random_instants(tmp_path: Path, budget, figures, rng: random.Random, mode: str, upload: bool) -> None:
    findings = Findings()
    for index in range(budget.kills(share=0.65 / 4, ci=3)):
        config = _config(tmp_path, index, save_mode=mode, filename=FORMATS[index % 3], upload=upload)
        victim = Victim(config, log=tmp_path / f"victim{index:03d}.log")
        _trial(victim, findings, tmp_path, kill=rng, from_store=upload and index % 2 == 1)
    figures.add("kill -9 at a random instant", findings)
    assert not findings.problems, findings.problems


def test_kill_at_random_instants_uploading_to_s3(tmp_path: Path, seaweedfs_bucket, budget, figures,
                                                 rng: random.Random) -> None:
    findings = Findings()
    for index in range(budget.kills(share=0.02, ci=2)):
        trial = _config(tmp_path, index, save_mode=("sync", "async")[index % 2], filename=FORMATS[index % 3],
                        max_batches=12)
        config = replace(trial, remote=seaweedfs_bucket.url(f"run{index}"),
                         storage_options=seaweedfs_bucket.storage_options())
        victim = Victim(config, log=tmp_path / f"victim{index:03d}.log")
        _trial(victim, findings, tmp_path, kill=rng, from_store=index % 2 == 1)
    figures.add("kill -9 at a random instant, uploading to S3", findings)
    assert not findings.problems, findings.problems


def test_kill_of_a_cold_started_script(tmp_path: Path, budget, figures, rng: random.Random) -> None:
    """The victim as users run a script: a fresh interpreter (the other trials fork a warm one)."""
    findings = Findings()
    for index in range(budget.kills(share=0.05, ci=2)):
        config = _config(tmp_path, index, save_mode=("async", "sync")[index % 2], filename=FORMATS[index % 3],
                         upload=True, max_batches=12)
        victim = Victim(config, log=tmp_path / f"victim{index:03d}.log", launch="cold")
        _trial(victim, findings, tmp_path, kill=rng)
    figures.add("kill -9 at a random instant", findings)
    assert not findings.problems, findings.problems


def _crash_points(ops: list[str], wanted: int, rng: random.Random, full: bool) -> list[int]:
    """Which n to crash at: all of them by hand; in CI one of each kind of operation, then random ones."""
    points = list(range(1, len(ops) + 1))
    if full or len(points) <= wanted:
        return points
    first_of_kind: dict[str, int] = {}
    for n, op in zip(points, ops):
        first_of_kind.setdefault(op.split()[0], n)
    chosen = set(list(first_of_kind.values())[:wanted])
    chosen |= set(rng.sample([n for n in points if n not in chosen], wanted - len(chosen)))
    return sorted(chosen)


@pytest.mark.parametrize(
    ("mode", "filename", "upload", "ci"),
    [("sync", "ba{batch}.pt", False, 8), ("async", "ba{batch}.pt.zst", True, 6),
     ("sync", "ba{batch}.tar.zst", True, 4)],
    ids=["sync-pt-local", "async-zst-upload", "sync-tar-upload"],
)
def test_kill_at_every_crash_point_of_a_save(tmp_path: Path, budget, figures, rng: random.Random, mode: str,
                                             filename: str, upload: bool, ci: int) -> None:
    window = {"crash_from_batch": WINDOW[0], "crash_until_batch": WINDOW[1], "max_batches": 8}
    dry = Victim(_config(tmp_path, 0, save_mode=mode, filename=filename, upload=upload, trace_ops=True, **window),
                 log=tmp_path / "dry.log").start()
    assert dry.finish() == 0, (tmp_path / "dry.log").read_text()
    ops = dry.seen("op")
    assert {op.split()[0] for op in ops} >= {"open", "write", "fsync", "replace", "symlink", "unlink"}, ops
    findings, fired = Findings(), 0
    points = _crash_points(ops, ci, rng, budget.full)
    for index, n in enumerate(points, start=1):
        config = _config(tmp_path, index, save_mode=mode, filename=filename, upload=upload, crash=f"any:{n}", **window)
        victim = Victim(config, log=tmp_path / f"victim{index:03d}.log")
        _trial(victim, findings, tmp_path, from_store=upload and index % 2 == 0)
        fired += bool(victim.seen("crash"))
    figures.add("kill -9 at the n-th file operation of a save (in-process hook)", findings)
    assert not findings.problems, findings.problems
    # Threads (async saves, uploads) vary the count a little: the last few points may not be reached.
    assert fired >= 0.8 * len(points), f"the crash hook fired in {fired} of {len(points)} trials"


def test_kill_while_resuming_from_the_store(tmp_path: Path, budget, figures, rng: random.Random) -> None:
    """A new machine (empty local folder) autoresumes from the store and is killed while it downloads."""
    folder, store, template = tmp_path / "ckpt", tmp_path / "store", tmp_path / "store-template"
    first = VictimConfig(folder=str(folder), max_batches=6, remote=store.as_uri())
    assert Victim(first, log=tmp_path / "first.log").start().finish() == 0
    shutil.copytree(store, template)
    window = {"crash_from_batch": 0, "crash_until_batch": 1, "max_batches": 8}

    def fresh_machine() -> None:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(template, store)

    fresh_machine()
    dry = Victim(replace(first, trace_ops=True, **window), log=tmp_path / "dry.log").start()
    assert dry.finish() == 0
    ops = [op for op in dry.seen("op") if str(folder) in op]
    findings = Findings()
    for index, n in enumerate(_crash_points(ops, 4, rng, budget.full), start=1):
        fresh_machine()
        victim = Victim(replace(first, crash=f"any:{n}", **window), log=tmp_path / f"victim{index:03d}.log")
        _trial(victim, findings, tmp_path)
    figures.add("kill -9 while resuming from the store", findings)
    assert not findings.problems, findings.problems


def _syscalls_of_a_save(log: Path, folder: str) -> list[tuple[str, int, str]]:
    """(system call, its ordinal among the victim's calls of that name, path) of each call on the
    checkpoint folder made while batch WINDOW[0] was trained and saved."""
    counts: dict[str, int] = {}
    inside, found = False, []
    for line in log.read_text(errors="replace").splitlines():
        match = _STRACE_LINE.match(line)
        if match is None:
            continue
        call = match["call"]
        counts[call] = counts.get(call, 0) + 1
        if call == "write" and "<pipe:" in match["args"]:
            report = match["args"]
            inside = inside or f'"batch {WINDOW[0]}\\n"' in report
            if f'"batch {WINDOW[1]}\\n"' in report:
                break
            continue
        if inside and folder in match["args"]:
            found.append((call, counts[call], match["args"].split(",")[0][:120]))
    return found


def test_kill_at_system_calls_under_strace(tmp_path: Path, budget, figures, rng: random.Random) -> None:
    reason = strace_unusable()
    if reason is not None:
        pytest.skip(reason)
    window = {"max_batches": 6}
    trace = ["-o", str(tmp_path / "strace.log"), "-y", "-e", "trace=" + ",".join(_STRACE_CALLS)]
    dry_config = _config(tmp_path, 0, filename="ba{batch}.pt.zst", **window)
    dry = Victim(dry_config, log=tmp_path / "dry.log", launch="cold", strace=trace).start()
    assert dry.finish() == 0, (tmp_path / "dry.log").read_text()
    calls = _syscalls_of_a_save(tmp_path / "strace.log", dry_config.folder)
    assert {call for call, _, _ in calls} == set(_STRACE_CALLS), calls
    if budget.full:
        chosen = calls
    else:
        # The last write of the checkpoint, its fsync, and the rename that commits it.
        last_write = [c for c in calls if c[0] in ("write", "pwrite64") and ".tmp-" in c[2] and ".pt.zst" in c[2]][-1]
        chosen = [last_write, next(c for c in calls if c[0] == "fsync"), next(c for c in calls if c[0] == "rename")]
    findings = Findings()
    for index, (call, ordinal, _) in enumerate(chosen, start=1):
        config = _config(tmp_path, index, filename="ba{batch}.pt.zst", **window)
        inject = ["-o", "/dev/null", "-e", f"trace={call}", "-e", f"inject={call}:signal=SIGKILL:when={ordinal}"]
        victim = Victim(config, log=tmp_path / f"victim{index:03d}.log", launch="cold", strace=inject)
        _trial(victim, findings, tmp_path)
        if victim.returncode != -9:
            findings.problems.append(f"strace did not kill at {call} #{ordinal} (exit status {victim.returncode})")
    figures.add("kill -9 at the n-th system call of a save (strace)", findings)
    assert not findings.problems, findings.problems
