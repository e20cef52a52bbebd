"""Benchmark of what a checkpoint costs training: the training-thread stall, the time until the
checkpoint is durable, the extra memory, and the throughput with a save every K steps, for
ckpt_callbacks and its peers in one run (issue #6).

Run by hand, not in CI (about an hour on a shared 2-core machine)::

    python benchmarks/bench_stall.py                        # 128 MB, 512 MB and 2 GB states
    python benchmarks/bench_stall.py --sizes 128,512 --rounds 3
    python benchmarks/bench_stall.py --throughput-sizes 128,512 --every 12 --peers "ours async .pt,DCP async_save"

The state is a GPT-like model (token embedding, pre-norm ``TransformerEncoderLayer`` blocks with a
4x MLP, an untied output head) after one real Adam step: fp32 weights plus Adam's two moments, of
about 128 MB, 512 MB or 2 GB. Each peer runs in a process of its own (so that its memory is its
own), built from the same seed, ``--rounds`` times in alternating order (a drifting load spreads
over every peer). Each process measures:

* **stall**, how long one save call blocks the training thread, and **durable**, from the call until
  the checkpoint is fsynced: one warm-up save (first allocations, thread pools; its stall is shown as
  "first"), then ``--checkpoints`` saves with ``torch.set_num_threads(1)`` and as many with 2. Before
  each save dirty pages are flushed (``os.sync``) and the parameters change a little.
* **peak extra memory**: the peak RSS during saves (reset before each through
  ``/proc/self/clear_refs``) above the RSS before the first; **held**: what stays allocated after the
  last save is durable (staging buffers).
* **throughput**: ``--periods`` pairs, per thread count, of K steps that follow a save (plus any
  wait until it is durable: the next save would wait for it) and K steps without one, back to back
  so that the load of a shared machine cancels out; the median of the pairs' ratios. K defaults to
  the value at which our sync ``.pt`` save costs 20% of the throughput at 1 thread.

``torch.save``, Lightning and the HF Trainer do not fsync; the benchmark fsyncs what they wrote right
after they return (on the writer thread for ``AsyncCheckpointIO``), and counts it. Every peer keeps
every checkpoint (no pruning in the measured work); the files are deleted between phases.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from stall_peers import PEERS, SIZES, worker

# ---------------------------------------------------------------------------- processes


def spawn(peer: str, size: int, folder: Path, args: argparse.Namespace, throughput: bool, every: list[int]) -> dict[str, Any]:
    """Run :func:`worker` for one peer in a fresh process; its result, or ``{'error': ...}``."""
    scratch = folder / "".join(c if c.isalnum() else "-" for c in f"{size}-{peer}")
    out = folder / "result.json"
    command = [
        sys.executable, __file__, "--worker", peer, "--size", str(size), "--checkpoints", str(args.checkpoints),
        "--every", ",".join(map(str, every)), "--periods", str(args.periods), "--folder", str(scratch), "--result", str(out),
    ] + (["--throughput"] if throughput else [])  # fmt: skip
    started = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {size} MB: {peer}", end="", file=sys.stderr, flush=True)
    process = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f" ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    if process.returncode != 0 or not out.exists():
        print(process.stderr[-3000:], file=sys.stderr)
        return {"error": (process.stderr.strip().splitlines() or ["no output"])[-1]}
    result = json.loads(out.read_text())
    out.unlink()
    return result


def merge(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One peer's results over its rounds: the saves after each warm-up, the warm-ups apart."""
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return rounds[0]
    throughput: dict[str, list] = {}
    for result in ok:
        for threads, pairs in result["throughput"].items():
            throughput.setdefault(threads, []).extend(pairs)
    return {
        "size_bytes": ok[0]["size_bytes"], "first": [r["records"][0]["stall"] for r in ok],
        "records": [record for r in ok for record in r["records"][1:]],
        "extra": max(max(record["peak"] for record in r["records"]) - r["base"] for r in ok),
        "held": max(r["held"] for r in ok), "throughput": throughput, "load": [v for r in ok for v in r["load"]],
    }  # fmt: skip


# ---------------------------------------------------------------------------- report


def median_of(result: dict[str, Any], key: str, threads: int = 1) -> float:
    return statistics.median(r[key] for r in result["records"] if r["threads"] == threads)


def throughput_ratio(result: dict[str, Any], threads: str) -> tuple[float, float, float] | None:
    """(median over the pairs of steps/s with saves / without, median seconds of K steps with, without)."""
    pairs = result["throughput"].get(threads)
    if not pairs:
        return None
    return statistics.median(b / a for a, b in pairs), statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs)


def table(results: dict[str, dict[str, Any]], every: list[int]) -> list[str]:
    """A markdown table of one state size, with ratios against the peers of the same run."""
    ok = {name: r for name, r in results.items() if "records" in r}
    size = next(iter(ok.values()))["size_bytes"] / 1e6 if ok else 0
    bases = [median_of(ok[name], key) if name in ok else None
             for name, key in (("torch.save", "stall"), ("DCP async_save", "stall"), ("ours sync .pt", "durable"))]  # fmt: skip
    lines = [
        f"**State of {size:.0f} MB** (fp32 weights + Adam moments)"
        + (f"; a save every K = {every[0]} steps at 1 thread, {every[1]} at 2" if every else ""), "",
        "| peer | stall (s) | / torch.save | / DCP async | first stall | stall, 2 threads | durable (s) | / ours sync "
        "| peak extra (MB) | held (MB) | throughput with saves, 1 thread | 2 threads | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip

    def ratio(value: float, base: float | None) -> str:
        return f"{value / base:.2f}" if base else ""

    for name, result in results.items():
        if "records" not in result:
            lines.append(f"| {name} | failed: {result['error'][:100]} |" + " |" * 11)
            continue
        stall, durable = median_of(result, "stall"), median_of(result, "durable")
        cells = []
        for threads in ("1", "2"):
            got = throughput_ratio(result, threads)
            k = every[int(threads) - 1] if every else 0
            cells.append(f"{got[0]:.3f} ({k / got[1]:.2f} / {k / got[2]:.2f} steps/s)" if got else "")
        lines.append(
            f"| {name} | {stall:.3f} | {ratio(stall, bases[0])} | {ratio(stall, bases[1])} | "
            f"{statistics.median(result['first']):.3f} | {median_of(result, 'stall', 2):.3f} | {durable:.3f} | "
            f"{ratio(durable, bases[2])} | {max(0, result['extra']) / 1e6:.0f} | {max(0, result['held']) / 1e6:.0f} | "
            f"{cells[0]} | {cells[1]} | {min(result['load']):.1f}-{max(result['load']):.1f} |"
        )
    return [*lines, ""]


def targets(results: dict[str, dict[str, Any]]) -> list[str]:
    """Issue #6's targets on one state size's results (the 512 MB state)."""
    ok = {name: r for name, r in results.items() if "records" in r}
    lines: list[str] = []

    def check(label: str, value: float, limit: float, above: bool = False) -> None:
        met = value >= limit if above else value <= limit
        lines.append(f"- {label} = {value:.3f} (target {'>=' if above else '<='} {limit}): {'met' if met else 'MISSED'}")

    for name in [n for n in ("ours async .pt", "ours async .pt.zst") if n in ok]:
        for peer, limit in (("torch.save", 0.1), ("DCP async_save", 1.2)):
            if peer in ok:
                check(f"`{name}` stall / `{peer}` stall", median_of(ok[name], "stall") / median_of(ok[peer], "stall"), limit)
        for threads in ("1", "2"):
            if (got := throughput_ratio(ok[name], threads)) is not None:
                check(f"`{name}` throughput with saves / without, {threads} thread(s)", got[0], 0.95, above=True)
    if "ours async .pt" in ok and "ours sync .pt" in ok:
        ratio = median_of(ok["ours async .pt"], "durable") / median_of(ok["ours sync .pt"], "durable")
        check("`ours async .pt` durable / `ours sync .pt` durable", ratio, 1.2)
    return lines


def machine() -> str:
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []  # fmt: skip
    versions = [f"torch {torch.__version__}"]
    for package in ("lightning", "transformers"):
        try:
            versions.append(f"{package} {__import__(package).__version__}")
        except ImportError:
            versions.append(f"{package} not installed")
    gpu = "a GPU (not measured)" if torch.cuda.is_available() else "no GPU"
    return (f"{names[0] if names else platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, {gpu}, Python "
            f"{platform.python_version()}, {', '.join(versions)}; {time.strftime('%Y-%m-%d %H:%M')}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="128,512,2048", help=f"state sizes in MB, of {sorted(SIZES)}")
    parser.add_argument("--throughput-sizes", default="512", help="sizes whose throughput is measured ('' for none)")
    parser.add_argument("--peers", help="comma-separated peers instead of all: " + ", ".join(PEERS))
    parser.add_argument("--rounds", type=int, default=2, help="processes per peer, in alternating order")
    parser.add_argument("--checkpoints", type=int, default=3, help="measured saves per round and thread count")
    parser.add_argument("--every", help="K, steps between saves, or 'K1,K2' for 1 and 2 threads "
                        "(default: where our sync .pt costs 20%% of the steps/s)")
    parser.add_argument("--periods", type=int, default=3, help="throughput pairs per round and thread count")
    parser.add_argument("--folder", type=Path, help="where files go (default: a temp folder under the current one)")
    for hidden in ("--worker", "--size", "--result"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--throughput", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.size, args.every = int(args.size), [int(k) for k in args.every.split(",") if k]
        Path(args.result).write_text(json.dumps(worker(args)))
        return 0
    peers = [p.strip() for p in args.peers.split(",") if p.strip()] if args.peers else PEERS
    throughput_sizes = {int(s) for s in args.throughput_sizes.split(",") if s}
    # The current folder's disk, not /tmp (often RAM-backed tmpfs, which would flatter every write).
    folder = args.folder or Path(tempfile.mkdtemp(prefix="bench-stall-", dir="."))
    folder.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/bench_stall.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"Machine: {machine()}.\nCommand: `{command}`.\n", flush=True)
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            every = ([int(k) for k in args.every.split(",")] * 2)[:2] if args.every else []
            if size in throughput_sizes and not every:
                calibration = spawn("calibrate", size, folder, args, False, [1, 1])
                every = [max(1, round(4 * calibration["save"] / calibration[f"step{t}"])) for t in (1, 2)]
                print(f"{size} MB: a training step takes {calibration['step1']:.3f} s at 1 thread, "
                      f"{calibration['step2']:.3f} s at 2, and our sync `.pt` save {calibration['save']:.2f} s: "
                      f"a save every K = {every[0]} and {every[1]} steps costs it 20%.\n", flush=True)  # fmt: skip
            runs: dict[str, list[dict[str, Any]]] = {peer: [] for peer in peers}
            for index in range(args.rounds):
                for peer in peers if index % 2 == 0 else peers[::-1]:
                    runs[peer].append(spawn(peer, size, folder, args, size in throughput_sizes, every))
            results = {peer: merge(results) for peer, results in runs.items()}
            lines = table(results, every) + (["Targets:", *targets(results), ""] if size == 512 else [])
            print("\n".join(lines), flush=True)
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
