"""Capture for async saves: a snapshot of a checkpoint dict whose tensors live in reusable buffers.

``save_mode='async'`` blocks training only for :meth:`StagingBuffers.stage`: every tensor of the
checkpoint is copied into a CPU buffer that was allocated at the first save and is reused by every
later one (a copy into an existing buffer costs about 0.4x of a fresh allocation here, see
performance-notes.md), so memory does not grow with the number of checkpoints. CUDA tensors go to
pinned buffers with non-blocking copies, synchronised before returning; a DTensor keeps its layout
with this rank's shard staged. Everything that is not a
tensor is deep-copied, so training may mutate parameters, optimizer states and counters right
after capture without leaking into the checkpoint.

Buffers are reused, so a snapshot is valid only until the next :meth:`~StagingBuffers.stage`; the
manager guarantees that by keeping at most one save in flight.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch.distributed.tensor import DTensor

__all__ = ["StagingBuffers"]


class StagingBuffers:
    """CPU buffers for the tensors of successive checkpoints of the same layout.

    Example:
        >>> buffers = StagingBuffers()
        >>> weights = torch.ones(3)
        >>> snapshot = buffers.stage({"w": weights})
        >>> weights.add_(1)
        tensor([2., 2., 2.])
        >>> snapshot["w"]
        tensor([1., 1., 1.])
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self.staged_bytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (what async saving costs in memory)."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers.values())

    def stage(self, obj: Any) -> Any:
        """Return a snapshot of ``obj`` (dicts, lists and tuples of tensors and plain values).

        A tensor that appears several times (tied weights) is staged once, so the snapshot keeps the
        sharing that ``torch.save`` preserves.
        """
        self.staged_bytes = 0
        staged: dict[int, torch.Tensor] = {}
        used_cuda = False

        def visit(value: Any, path: str) -> Any:
            nonlocal used_cuda
            if isinstance(value, torch.Tensor):
                if id(value) not in staged:
                    used_cuda |= value.is_cuda
                    staged[id(value)] = self._copy(value, path)
                return staged[id(value)]
            if isinstance(value, dict):
                result = copy.copy(value)
                result.clear()
                result.update((key, visit(item, f"{path}/{key!s}")) for key, item in value.items())
                return result
            if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
                return type(value)(visit(item, f"{path}/{index}") for index, item in enumerate(value))
            return copy.deepcopy(value)

        snapshot = visit(obj, "")
        if used_cuda:
            torch.cuda.synchronize()
        return snapshot

    def _copy(self, tensor: torch.Tensor, path: str) -> torch.Tensor:
        if isinstance(tensor, DTensor):
            # A sharded tensor: stage this rank's shard and keep its layout, so that DCP can save it.
            local = self._copy(tensor.to_local(), path)
            return DTensor.from_local(
                local, tensor.device_mesh, tensor.placements, run_check=False, shape=tensor.shape, stride=tensor.stride()
            )
        source = tensor.detach()
        if source.layout != torch.strided:
            return source.to("cpu", copy=True)
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
            buffer = torch.empty(source.shape, dtype=source.dtype, device="cpu", pin_memory=source.is_cuda)
            self._buffers[path] = buffer
        _copy_into(buffer, source)
        self.staged_bytes += buffer.numel() * buffer.element_size()
        return buffer


def _copy_into(buffer: torch.Tensor, source: torch.Tensor) -> None:
    """Copy ``source`` into ``buffer`` (a contiguous CPU tensor of its shape and dtype).

    A dense CPU tensor is copied by one thread (numpy's copy, which releases the GIL as ``copy_``
    does), not split by ``copy_`` over torch's intra-op threads. A copy is bound by memory
    bandwidth, which a second thread hardly adds to (one 529 MB tensor on our 2-core machine:
    0.10 s with one thread, 0.12 s with two), while each parallel region waits for all of its
    threads: on cores shared with anything else (data loader workers, other jobs) every one of a
    state's hundreds of tensors then waits for a scheduler time slice (the 529 MB state of
    bench_stall.py, 212 tensors, at load 7: 0.99 s with two threads, 0.23 s this way).
    """
    dense = source.device.type == "cpu" and source.is_contiguous() and not source.is_quantized
    if dense and not (source.is_conj() or source.is_neg()):
        try:
            np.copyto(_as_bytes(buffer), _as_bytes(source))
            return
        except (RuntimeError, TypeError):  # a dtype without a byte view: torch copies it below
            pass
    buffer.copy_(source, non_blocking=source.is_cuda)


def _as_bytes(tensor: torch.Tensor) -> np.ndarray:
    return tensor.reshape(-1).view(torch.uint8).numpy()
