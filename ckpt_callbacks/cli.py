"""The ``ckpt-callbacks`` command: look at, check, fetch and convert checkpoints outside training.

Commands (``ckpt-callbacks COMMAND --help`` for each)::

    ls LOCATION...       the checkpoints under local folders or remote prefixes
    inspect PATH         metadata, keys and the tensor tree of one checkpoint
    verify PATH...       decode fully and check every checksum; one line per checkpoint
    download URI DEST    fetch a remote checkpoint (following .symlink pointers), atomically
    export PATH OUT      the model weights as a new .pt (any codec) or .safetensors file
    demo                 train, stop, resume, and show what was saved

Every PATH may be local (a file, a folder, a ``latest`` symlink or pointer file) or a URI
(``s3://``, ``file://``, ``memory://``, any fsspec scheme). Exit codes: 0 success, 1 failure (a
corrupt checkpoint, a missing file, a store error), 2 usage error, 130 interrupted. Errors print
one line unless ``--debug``; ``--json`` prints machine-readable results on stdout; progress bars
appear on stderr only when it is a terminal. This module is argparse and printing only: the work
is done by :mod:`~ckpt_callbacks.listing`, :mod:`~ckpt_callbacks.inspection`,
:mod:`~ckpt_callbacks.verification`, :mod:`~ckpt_callbacks.locations` and
:mod:`~ckpt_callbacks.export`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ckpt_callbacks.errors import CheckpointError, CheckpointExistsError
from ckpt_callbacks.export import DTYPES, export_weights
from ckpt_callbacks.inspection import Description, describe, tensor_tree
from ckpt_callbacks.listing import ListedCheckpoint, list_checkpoints
from ckpt_callbacks.locations import RemoteLocations, is_uri, local_checkpoint
from ckpt_callbacks.progress import Progress, TqdmCallback
from ckpt_callbacks.verification import Verdict, verify_checkpoint

__all__ = ["main"]


class _UsageError(Exception):
    """A bad combination of arguments: reported like argparse's own errors, exit code 2."""


def _storage_options(text: str) -> dict[str, Any]:
    try:
        value = json.loads(Path(text[1:]).read_text() if text.startswith("@") else text)
    except (OSError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"not a JSON object or @file holding one ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"endpoint_url\": ...}}' (got {text!r})")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckpt-callbacks",
        description="Checkpointing for PyTorch training loops: look at, check, fetch and convert checkpoints.",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage error. Paths may be local or URIs (s3://, file://, ...).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logs")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument(
        "--storage-options", type=_storage_options, metavar="JSON",
        help="options of the object store as a JSON object, or @file.json holding one "
        "(endpoint_url, region, profile, ...; credentials are better left to the environment)",
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str, parents: list[argparse.ArgumentParser], run: Any) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary, parents=[common, *parents])
        sub.set_defaults(run=run, parser=sub)
        return sub

    ls = command("ls", "list the checkpoints under local folders or remote prefixes", [remote, as_json], _ls)
    ls.add_argument("locations", nargs="+", metavar="LOCATION", help="a folder, a checkpoint, or a URI prefix")
    inspect = command("inspect", "show a checkpoint's metadata, keys and tensors", [remote, as_json], _inspect)
    inspect.add_argument("path", metavar="PATH", help="a checkpoint file or folder, a latest link, or a URI")
    inspect.add_argument("--depth", type=int, metavar="N", help="fold the tensor tree below N levels (0: sections only)")
    verify = command("verify", "check that checkpoints are intact (exit 1 if any is not)", [remote, as_json], _verify)
    verify.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint files or folders, latest links, URIs")
    download = command("download", "fetch a remote checkpoint, following .symlink pointers", [remote, as_json], _download)
    download.add_argument("uri", metavar="URI", help="an object, a folder, or a .symlink pointer in a store")
    download.add_argument("dest", metavar="DEST", help="the file to write, or a folder (existing, or ending in /) to write into")
    download.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    export = command("export", "write the model weights as a new .pt or .safetensors file", [remote, as_json], _export)
    export.add_argument("path", metavar="PATH", help="a checkpoint file or DCP folder (local or a URI)")
    export.add_argument("out", type=Path, metavar="OUT", help="the file to write: .pt, .pt.zst, ..., or .safetensors")
    export.add_argument("--dtype", choices=list(DTYPES), default="keep", help="cast floating-point tensors")
    export.add_argument("--keep-prefixes", action="store_true", help="keep the _orig_mod. and module. prefixes")
    export.add_argument("--key", metavar="KEY", help="where the weights are (default: state/model, state_dict or model)")
    export.add_argument("--bare", action="store_true", help="write the state dict alone (torch.load(OUT) returns it)")
    export.add_argument("--level", type=int, metavar="N", help="compression level of OUT's codec")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    demo = command("demo", "train a small model with two savers, stop, resume, and show what was saved", [remote], _demo)
    demo.add_argument("--folder", type=Path, help="where to write (default: a temporary folder, removed after)")
    demo.add_argument("--nproc", type=int, default=1, metavar="N",
                      help="run as a DDP job of N processes on this machine (gloo, CPU), as torchrun would")
    demo.add_argument("--remote", metavar="URI", help="also upload to this store (s3://bucket/prefix, file:///...) "
                      "and resume the second run from it, the local folder deleted")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Example:
        >>> main(["verify", "runs/exp1/checkpoints/latest-rank0.pt"])  # doctest: +SKIP
        0
    """
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except _UsageError as error:
        args.parser.error(str(error))  # exits with 2
    except KeyboardInterrupt:
        print("ckpt-callbacks: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        known = isinstance(error, (CheckpointError, OSError))
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = "" if known else f" ({type(error).__name__}; --debug shows the traceback)"
        print(f"ckpt-callbacks: error: {message}{hint}", file=sys.stderr)
        return 1


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _size(nbytes: int | None) -> str:
    if nbytes is None:
        return "?"
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{nbytes} B"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


# ---------------------------------------------------------------------- ls


def _ls(args: argparse.Namespace) -> int:
    found: list[ListedCheckpoint] = []
    for location in args.locations:
        listed = list_checkpoints(location, storage_options=args.storage_options)
        found += listed
        if not args.json:
            _print_listing(location, listed, several=len(args.locations) > 1)
    if args.json:
        _print_json([c.to_json() for c in found])
    return 0


def _print_listing(location: str, listed: list[ListedCheckpoint], *, several: bool) -> None:
    if several:
        print(f"{location}:")
    if not listed:
        print(f"no checkpoints under {location}")
        return

    def known(value: Any) -> str:
        return "-" if value is None else str(value)

    content = {True: "weights", False: "full", None: "?"}
    rows = [
        [c.name, known(c.epoch), known(c.batch), _size(c.size), known(c.format), content[c.weights_only],
         ", ".join(os.path.basename(p) for p in c.pointers) or "-",
         c.where + (", uncommitted" if c.committed is False else "")]
        for c in listed
    ]
    _table(["NAME", "EPOCH", "BATCH", "SIZE", "FORMAT", "CONTENT", "LINKS", "WHERE"], rows)
    print(f"{_count(len(listed), 'checkpoint')}, {_size(sum(c.size for c in listed))}")


# ---------------------------------------------------------------------- inspect


def _inspect(args: argparse.Namespace) -> int:
    if args.depth is not None and args.depth < 0:
        raise _UsageError(f"--depth must be 0 or more (got {args.depth})")
    with _bar(args.path) as progress, local_checkpoint(args.path, storage_options=args.storage_options,
                                                       progress=progress) as path:
        description = describe(path)
    description.path = args.path
    if args.json:
        _print_json(description.to_json())
    else:
        _print_description(description, args.depth)
    return 0


def _bar(location: str) -> Progress:
    """A download bar for a remote location; nothing for a local one."""
    if not is_uri(location):
        return Progress()
    return TqdmCallback(f"download {location.rstrip('/').rpartition('/')[2]}")


def _describe_value(name: str, value: Any) -> str:
    if name == "timestamp" and isinstance(value, dict):
        shown = ", ".join(f"{k} {value[k]}" for k in ("epoch", "batch", "sample", "token") if k in value)
        return f"{shown} ({value.get('batch_in_epoch', 0)} batches into the epoch)"
    if name in ("saved_at", "exported_at") and isinstance(value, (int, float)):
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))
    return json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)


def _print_description(description: Description, depth: int | None) -> None:
    total = sum(t.nbytes for t in description.tensors)
    print(f"path      {description.path}")
    print(f"format    {description.format}, {_size(description.size)} on disk")
    if description.metadata:
        print("metadata")
        width = max(len(str(k)) for k in description.metadata)
        for name, value in sorted(description.metadata.items()):
            print(f"  {str(name).ljust(width)}  {_describe_value(str(name), value)}")
    if description.keys:
        print("keys")
        for key, children in description.keys.items():
            print(f"  {key}" + (f": {', '.join(children)}" if children else ""))
    print(f"tensors   {_count(len(description.tensors), 'tensor')}, {_size(total)}")
    lines: list[tuple[str, str]] = []
    for section, count, nbytes in description.sections():
        lines.append((f"  {section}", f"{_count(count, 'tensor')}  {_size(nbytes)}"))
        skip = 0 if section == "(top level)" else len(section.split("/"))
        entries = [t for t in description.tensors if t.section == section]
        subtree = tensor_tree(type(t)(t.keys[skip:], t.shape, t.dtype, t.nbytes) for t in entries)
        _tree_lines(subtree, 2, depth, lines)
    width = min(max((len(left) for left, _ in lines), default=0), 72)
    for left, right in lines:
        print(f"{left.ljust(width)}  {right}")
    for note in description.notes:
        print(f"note      {note}")


def _tree_lines(node: Any, indent: int, depth: int | None, lines: list[tuple[str, str]]) -> None:
    if depth is not None and depth <= 0:
        return
    for child in node.children.values():
        pad = " " * (indent + 2)
        if child.tensor is not None and not child.children:
            tensor = child.tensor
            lines.append((f"{pad}{child.name}", f"{tensor.dtype}  {list(tensor.shape)}  {_size(tensor.nbytes)}"))
            continue
        lines.append((f"{pad}{child.name}", f"{_count(child.tensors, 'tensor')}  {_size(child.nbytes)}"))
        _tree_lines(child, indent + 2, None if depth is None else depth - 1, lines)


# ---------------------------------------------------------------------- verify


def _verify(args: argparse.Namespace) -> int:
    verdicts = []
    local_sizes = [_local_size(p) for p in args.paths]
    with TqdmCallback("verify") if sum(local_sizes) else Progress() as progress:
        progress.set_total(sum(local_sizes))
        for location, size in zip(args.paths, local_sizes):
            verdict = _verify_one(location, args.storage_options)
            progress.update(size)
            verdicts.append(verdict)
            if not args.json:
                print(_verdict_line(verdict), flush=True)
    if args.json:
        _print_json([v.to_json() for v in verdicts])
    elif len(verdicts) > 1:
        counts = {status: sum(v.status == status for v in verdicts) for status in ("ok", "corrupt", "missing")}
        print(f"{counts['ok']} intact, {counts['corrupt']} corrupt, {counts['missing']} missing")
    return 0 if all(v.ok for v in verdicts) else 1


def _local_size(location: str) -> int:
    if is_uri(location) or not os.path.isfile(location):
        return 0
    return os.path.getsize(location)


def _verify_one(location: str, storage_options: dict[str, Any] | None) -> Verdict:
    try:
        with _bar(location) as progress, local_checkpoint(location, storage_options=storage_options,
                                                          progress=progress) as path:
            verdict = verify_checkpoint(path)
            local = str(path)
    except (CheckpointError, OSError) as error:
        return Verdict(location, False, None, 0, error=str(error), missing=isinstance(error, FileNotFoundError))
    if is_uri(location):  # not the temp path of the download: what the user gave
        verdict.path = location
        verdict.error = verdict.error and verdict.error.replace(local, location)
    elif local != location:
        verdict.path = f"{location} -> {local}"
    return verdict


def _verdict_line(verdict: Verdict) -> str:
    if not verdict.ok:
        return f"{verdict.status.upper():8} {verdict.path}: {verdict.error}"
    notes = f"; {'; '.join(verdict.notes)}" if verdict.notes else ""
    return f"ok       {verdict.path} ({verdict.format}, {_size(verdict.size)}): {', '.join(verdict.checks)}{notes}"


# ---------------------------------------------------------------------- download


def _download(args: argparse.Namespace) -> int:
    if not is_uri(args.uri):
        raise _UsageError(f"URI must name an object store, such as s3://bucket/key (got {args.uri!r}; copy local files with cp)")
    with RemoteLocations(args.storage_options) as remote:
        target = remote.resolve(args.uri)
        with _bar(target.uri) as progress:
            written = remote.download(target, args.dest, overwrite=args.overwrite, progress=progress)
    result = {
        "uri": args.uri, "resolved": target.uri, "via": list(target.via), "path": str(written),
        "size": target.size, "files": len(target.keys),
    }
    if args.json:
        _print_json(result)
    else:
        via = f" (via {' -> '.join(target.via)})" if target.via else ""
        files = f", {len(target.keys)} files" if target.is_folder else ""
        print(f"downloaded {target.uri}{via} to {written} ({_size(target.size)}{files})")
    return 0


# ---------------------------------------------------------------------- export


def _export(args: argparse.Namespace) -> int:
    if os.path.lexists(args.out) and not args.overwrite:
        raise CheckpointExistsError(f"{args.out} already exists and was left untouched; --overwrite replaces it")
    with _bar(args.path) as progress, local_checkpoint(args.path, storage_options=args.storage_options,
                                                       progress=progress) as path:
        result = export_weights(
            path, args.out, dtype=args.dtype, keep_prefixes=args.keep_prefixes, key=args.key, bare=args.bare,
            overwrite=args.overwrite, compression_level=args.level,
        )
    if args.json:
        _print_json({"source": args.path, **result.to_json()})
        return 0
    details = [f"{result.tensors} tensors", _size(result.nbytes), f"from {result.source_key or 'the top level'}"]
    if result.dtype:
        details.append(f"floating point cast to {result.dtype}")
    if result.stripped:
        details.append(f"stripped {' and '.join(result.stripped)}")
    print(f"wrote {result.out} ({result.format}): {', '.join(details)}")
    return 0


# ---------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    from ckpt_callbacks.demo import run_demo, run_demo_distributed  # imports the trainer only when it runs

    if args.remote is not None and not is_uri(args.remote):
        raise _UsageError(f"--remote must be a URI such as s3://bucket/prefix (got {args.remote!r})")
    if args.nproc < 1:
        raise _UsageError(f"--nproc must be 1 or more (got {args.nproc})")
    if args.nproc > 1:
        return run_demo_distributed(args.nproc, args.folder, args.remote, args.storage_options)
    return run_demo(args.folder, args.remote, args.storage_options)
