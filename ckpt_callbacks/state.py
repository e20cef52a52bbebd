"""What a trainer exposes to callbacks, and how that becomes a checkpoint's ``state`` and back.

A :class:`State` holds the live training objects (model, optimizers, schedulers, dataloader,
callbacks) and the counters (:class:`~ckpt_callbacks.time.Timestamp`). :meth:`State.state_dict`
builds the ``state`` part of a checkpoint as DESIGN.md section 4b lays it out; :meth:`State.load_state_dict`
restores it. RNG states are separate (:func:`capture_rng_state`, :func:`restore_rng_state`): they
belong to each rank, not to the replicated training state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

from ckpt_callbacks.dist import DistInfo, dist_info
from ckpt_callbacks.errors import CorruptCheckpointError
from ckpt_callbacks.events import Callback
from ckpt_callbacks.time import Time, Timestamp

__all__ = ["State", "capture_rng_state", "restore_rng_state"]


@dataclass
class State:
    """The training state that callbacks see and that full checkpoints hold.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> state = State(model=model, optimizers=[torch.optim.SGD(model.parameters(), lr=0.1)],
        ...               run_name="demo", max_duration=Time.from_input("1ep"))
        >>> sorted(state.state_dict())
        ['callbacks', 'model', 'optimizers', 'run_name', 'schedulers', 'timestamp']
    """

    model: torch.nn.Module
    optimizers: list[torch.optim.Optimizer]
    run_name: str
    max_duration: Time
    schedulers: list[Any] = field(default_factory=list)
    callbacks: list[Callback] = field(default_factory=list)
    dataloader: Any = None
    dataloader_len: int | None = None
    timestamp: Timestamp = field(default_factory=Timestamp)
    previous_timestamp: Timestamp | None = None
    seed: int = 0
    resumed_from: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    # When ``metrics`` were measured (None: unknown, taken as now). A checkpoint is scored only with
    # metrics of its own batch: older ones describe other weights.
    metrics_timestamp: Timestamp | None = None

    @property
    def dist(self) -> DistInfo:
        """This process's rank layout."""
        return dist_info()

    @property
    def max_duration_reached(self) -> bool:
        """Whether training has run for ``max_duration``."""
        return self.timestamp.get(self.max_duration.unit) >= self.max_duration.value

    def weights_state_dict(self) -> dict[str, Any]:
        """The ``state`` of a weights-only checkpoint: the model only."""
        return {"model": self.model.state_dict()}

    def state_dict(self) -> dict[str, Any]:
        """The ``state`` of a full checkpoint (DESIGN.md section 4b), without ``metadata``."""
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
            "schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
            "timestamp": self.timestamp.state_dict(),
            "callbacks": {cb.state_key: cb.state_dict() for cb in self.callbacks},
            "run_name": self.run_name,
        }
        if _is_stateful(self.dataloader):
            state["dataloader"] = self.dataloader.state_dict()
        return state

    def load_model(self, model_state: dict[str, Any], *, strict: bool = True) -> None:
        """Load model weights; with ``strict=False`` missing and unexpected keys are tolerated."""
        self.model.load_state_dict(model_state, strict=strict)

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Restore everything :meth:`state_dict` saved.

        Raises:
            CorruptCheckpointError: the checkpoint does not fit this trainer (another number of
                optimizers or schedulers, a missing section).
        """
        missing = [key for key in ("model", "optimizers", "schedulers", "timestamp") if key not in state]
        if missing:
            raise CorruptCheckpointError(
                f"the checkpoint has no {', '.join(missing)}: it is not a full training checkpoint "
                "(load it with weights_only=True to take the model weights only)"
            )
        _check_same_length("optimizers", state["optimizers"], self.optimizers)
        _check_same_length("schedulers", state["schedulers"], self.schedulers)
        self.load_model(state["model"], strict=strict)
        for optimizer, optimizer_state in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(optimizer_state)
        self.load_extras(state)

    def load_extras(self, state: dict[str, Any]) -> None:
        """Restore everything but the model and optimizers: schedulers, timestamp, callbacks, dataloader."""
        _check_same_length("schedulers", state.get("schedulers", []), self.schedulers)
        for scheduler, scheduler_state in zip(self.schedulers, state.get("schedulers", [])):
            scheduler.load_state_dict(scheduler_state)
        self.timestamp = Timestamp.from_state_dict(state["timestamp"])
        self.previous_timestamp = None
        saved_callbacks = state.get("callbacks", {})
        for callback in self.callbacks:
            if callback.state_key in saved_callbacks:
                callback.load_state_dict(saved_callbacks[callback.state_key])
        if "dataloader" in state and _is_stateful(self.dataloader):
            self.dataloader.load_state_dict(state["dataloader"])


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _check_same_length(section: str, saved: list[Any], live: Iterable[Any]) -> None:
    live = list(live)
    if len(saved) != len(live):
        raise CorruptCheckpointError(
            f"the checkpoint holds {len(saved)} {section} but the trainer has {len(live)}: "
            "it was saved by a different training setup"
        )


def capture_rng_state() -> dict[str, Any]:
    """This rank's random number generator states (Python, NumPy, torch CPU, and CUDA if used).

    Only plain types and tensors, so the checkpoint loads with ``torch.load(weights_only=True)``.
    """
    bit_generator, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    rng: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": bit_generator,
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng_state(rng: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` returned on this rank."""
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = rng["numpy"]
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            numpy_state["key"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
