"""Benchmark of checkpoint formats: save wall time (to fsync), load time and file size, per format.

Run by hand, not in CI (it takes a few minutes and wants a quiet machine)::

    python benchmarks/bench_formats.py                 # the common formats
    python benchmarks/bench_formats.py --all           # also .pt.bz2, .pt.xz, .pt.lzma (slow)
    python benchmarks/bench_formats.py --repeat 5 --folder /mnt/nvme/bench
    python benchmarks/bench_formats.py --formats .pt.zst,cli:zstd --skip-bf16

It builds a realistic training state of about 512 MB (a model of a few large linear layers after a
few real Adam steps: fp32 weights plus Adam's two moments) and a bf16 copy of it, then measures in
the same run, round-robin so that drift of a shared machine spreads over every format, the median
of ``--repeat`` rounds of:

* save: ``write_state`` into an ``atomic_write`` temp file, flush, fsync, rename, folder fsync
  (what a CheckpointSaver does), or for Composer's way ``torch.save`` piped into the ``zstd`` /
  ``lz4`` CLI writing the file, then fsync;
* load: ``read_state`` (decode into a temp file, ``torch.load(mmap=True)``) and
  ``load_state_dict`` into the model and optimizer, so every byte is touched; for Composer's way,
  the CLI decompresses to a file that ``torch.load`` reads;
* size of the file, and the CPU seconds of the save (all threads, and the CLI's process), which
  other jobs on a shared machine disturb less than wall time.

Ratios are against a plain ``.pt`` and against the CLI pipe of the same codec. A weights-only table
compares ``.pt``, ``.pt.zst`` and ``.safetensors`` for model exports. The targets of issue #3 are
checked at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ckpt_callbacks.codecs import checkpoint_format
from ckpt_callbacks.serialization import read_state, write_state
from ckpt_callbacks.storage import atomic_write

# "name@N" is that format at compression_level=N.
FAST = [".pt", ".pt.zst", ".pt.zst@1", ".pt.lz4", ".pt.gz", ".tar", ".tar.zst", "cli:zstd", "cli:lz4"]
SLOW = [".pt.bz2", ".pt.xz", ".pt.lzma"]
WEIGHTS = [".pt", ".pt.zst", ".safetensors"]


@dataclass
class Result:
    """Timings and size of one format on one state."""

    name: str
    save: list[float] = field(default_factory=list)
    save_cpu: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    size: int = 0


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and its finished children (the CLIs)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def build_state(width: int, layers: int, steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model of ``layers`` Linear(width, width) after ``steps`` real Adam steps on random data."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(32, width)).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


def to_bf16(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A bf16 copy of the model with an optimizer whose state is the same moments in bf16."""
    copy = torch.nn.Sequential(*[torch.nn.Linear(m.in_features, m.out_features) for m in model]).to(torch.bfloat16)
    copy.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    optim = torch.optim.Adam(copy.parameters(), lr=1e-3)
    state = optimizer.state_dict()
    state["state"] = {
        index: {k: (v.to(torch.bfloat16) if k != "step" else v) for k, v in moments.items()}
        for index, moments in state["state"].items()
    }
    optim.load_state_dict(state)
    return copy, optim


def nbytes(obj: object) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def save_ours(checkpoint: dict, path: Path, level: int | None = None) -> None:
    with atomic_write(path) as out:
        write_state(checkpoint, out.file, checkpoint_format(path.name), level)


def save_cli(checkpoint: dict, path: Path, tool: str) -> None:
    """Composer's way: torch.save into the stdin of the CLI, which writes the file."""
    with open(path, "wb") as out:
        process = subprocess.Popen([tool], stdin=subprocess.PIPE, stdout=out)
        assert process.stdin is not None
        torch.save(checkpoint, process.stdin)
        process.stdin.close()
        if process.wait() != 0:
            raise RuntimeError(f"{tool} failed")
        out.flush()
        os.fsync(out.fileno())


def touch(obj: object) -> None:
    """Read one element per 4 KiB page of every tensor: memory-mapped pages must really be loaded."""
    if isinstance(obj, torch.Tensor):
        if obj.numel():
            obj.reshape(-1)[:: max(1, 4096 // obj.element_size())].sum()
    elif isinstance(obj, dict):
        for value in obj.values():
            touch(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            touch(value)


def load_into(checkpoint: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Restore the model and optimizer, as a resume does, and make sure every byte was read
    (``optimizer.load_state_dict`` keeps the loaded tensors, which may still be memory-mapped)."""
    state = checkpoint["state"]
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizers"][0])
    touch(checkpoint)


def load_cli(path: Path, tool: str, scratch: Path) -> dict:
    """Composer's way: the CLI decompresses to a file next to it, torch.load reads that."""
    plain = scratch / "cli-decoded.pt"
    with open(plain, "wb") as out:
        subprocess.run([tool, "-dc", str(path)], stdout=out, check=True)
    try:
        return torch.load(plain, weights_only=True)
    finally:
        plain.unlink()


def measure(
    formats: list[str], checkpoint: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
    folder: Path, repeat: int, label: str,
) -> dict[str, Result]:
    """Save and load every format ``repeat`` times, round-robin; return the results by format."""
    results = {name: Result(name) for name in formats}
    for round_ in range(repeat):
        for index, name in enumerate(formats):
            tool = name.removeprefix("cli:") if name.startswith("cli:") else None
            extension, _, level = name.partition("@")
            suffix = {"zstd": ".pt.zst", "lz4": ".pt.lz4"}.get(tool or "", extension)
            path = folder / f"{label}-{index}{suffix}"
            # Start every save with no dirty pages of earlier files queued ahead of its fsync.
            os.sync()
            started, cpu = time.perf_counter(), cpu_seconds()
            if tool:
                save_cli(checkpoint, path, tool)
            else:
                save_ours(checkpoint, path, int(level) if level else None)
            results[name].save.append(time.perf_counter() - started)
            results[name].save_cpu.append(cpu_seconds() - cpu)
            results[name].size = path.stat().st_size
            started = time.perf_counter()
            loaded = load_cli(path, tool, folder) if tool else read_state(path)
            load_into(loaded, model, optimizer)
            del loaded
            results[name].load.append(time.perf_counter() - started)
            path.unlink()
            print(f"  [{label}] round {round_ + 1}/{repeat} {name}: save {results[name].save[-1]:.2f} s, "
                  f"load {results[name].load[-1]:.2f} s, {results[name].size / 1e6:.0f} MB", file=sys.stderr)  # fmt: skip
    return results


def table(results: dict[str, Result], title: str, state_bytes: int) -> list[str]:
    """A markdown table: medians, sizes, and ratios to plain .pt and to the CLI pipe."""
    plain = results[".pt"]
    base_save, base_load = statistics.median(plain.save), statistics.median(plain.load)
    cli = {tool: results.get(f"cli:{tool}") for tool in ("zstd", "lz4")}
    lines = [
        f"**{title}** ({state_bytes / 1e6:.0f} MB of tensors)", "",
        "| format | save (s) | save CPU (s) | load (s) | size (MB) | save / .pt | load / .pt | size / .pt "
        "| CLI pipe save / ours |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for name, result in results.items():
        save, load = statistics.median(result.save), statistics.median(result.load)
        extension, _, level = name.partition("@")
        tool = {".pt.zst": "zstd", ".pt.lz4": "lz4"}.get(extension)
        versus = cli.get(tool) if tool else None
        speedup = f"{statistics.median(versus.save) / save:.2f}x" if versus else ""
        shown = f"`{extension}`" + (f" level {level}" if level else "")
        if name.startswith("cli:"):
            shown = f"{name.removeprefix('cli:')} CLI pipe (Composer)"
        cpu = statistics.median(result.save_cpu)
        lines.append(
            f"| {shown} | {save:.2f} | {cpu:.2f} | {load:.2f} | {result.size / 1e6:.0f} | {save / base_save:.2f} | "
            f"{load / base_load:.2f} | {result.size / plain.size:.3f} | {speedup} |"
        )
    return [*lines, ""]


def check_targets(results: dict[str, Result]) -> list[str]:
    """Issue #3's targets for .pt.zst at the default level, on the fp32 state."""
    plain, zst, cli = results[".pt"], results[".pt.zst"], results.get("cli:zstd")
    save_ratio = statistics.median(zst.save) / statistics.median(plain.save)
    size_ratio = zst.size / plain.size
    lines = [
        f"- `.pt.zst` save / `.pt` save = {save_ratio:.2f} (target <= 1.40): {'met' if save_ratio <= 1.4 else 'MISSED'}",
        f"- `.pt.zst` size / `.pt` size = {size_ratio:.3f} (target <= 0.93): {'met' if size_ratio <= 0.93 else 'MISSED'}",
    ]
    if cli is not None:
        speedup = statistics.median(cli.save) / statistics.median(zst.save)
        verdict = "met" if speedup >= 1.3 else "MISSED"
        lines.append(f"- zstd CLI pipe save / `.pt.zst` save = {speedup:.2f} (target >= 1.30): {verdict}")
        change = (zst.size - cli.size) / cli.size
        lines.append(
            f"- `.pt.zst` size {zst.size / 1e6:.2f} MB vs the CLI's {cli.size / 1e6:.2f} MB ({change:+.3%}; "
            f"target: equal or smaller): {'met' if zst.size <= cli.size else 'MISSED'}"
        )
    return lines


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    import zstandard

    import lz4

    return (
        f"{platform.processor() or platform.machine()}, {cores} cores, {memory:.0f} GiB, "
        f"Python {platform.python_version()}, torch {torch.__version__}, zstandard {zstandard.__version__}, "
        f"lz4 {lz4.__version__}; {time.strftime('%Y-%m-%d')}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="also the slow codecs (.pt.bz2, .pt.xz, .pt.lzma)")
    parser.add_argument("--formats", help="comma-separated formats instead, e.g. '.pt,.pt.xz' ('.pt' is always in)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per format (the median is reported)")
    parser.add_argument("--folder", type=Path, help="where files go (default: a temp folder under the current one)")
    parser.add_argument("--width", type=int, default=3328, help="width of each Linear layer")
    parser.add_argument("--layers", type=int, default=4, help="number of Linear layers")
    parser.add_argument("--steps", type=int, default=3, help="Adam steps before saving")
    parser.add_argument("--skip-bf16", action="store_true", help="only the fp32 state")
    args = parser.parse_args(argv)
    formats = FAST + (SLOW if args.all else [])
    if args.formats:
        formats = [".pt", *(f for f in args.formats.split(",") if f and f != ".pt")]
    formats = [f for f in formats if not f.startswith("cli:") or shutil.which(f.removeprefix("cli:"))]
    # The current folder's disk, not /tmp (often RAM-backed tmpfs, which would flatter every write).
    folder = args.folder or Path(tempfile.mkdtemp(prefix="bench-formats-", dir="."))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        model, optimizer = build_state(args.width, args.layers, args.steps)
        states: list[tuple[str, torch.nn.Module, torch.optim.Optimizer]] = [("fp32", model, optimizer)]
        if not args.skip_bf16:
            states.append(("bf16", *to_bf16(model, optimizer)))
        report = [f"Machine: {machine()}. Median of {args.repeat}; files in {folder.resolve()}.", ""]
        first: dict[str, Result] | None = None
        for label, model_, optimizer_ in states:
            checkpoint = {"state": {"model": model_.state_dict(), "optimizers": [optimizer_.state_dict()]}}
            results = measure(formats, checkpoint, model_, optimizer_, folder, args.repeat, label)
            report += table(results, f"Full training state, {label} (model + Adam)", nbytes(checkpoint))
            first = first or results
            weights = {"state": {"model": model_.state_dict()}}
            report += table(
                measure(WEIGHTS, weights, model_, None, folder, args.repeat, f"{label}-weights"),
                f"Weights-only export, {label}", nbytes(weights),
            )
        assert first is not None
        if ".pt.zst" in first:
            report += ["Targets (fp32 full state):", *check_targets(first)]
        print("\n".join(report))
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
