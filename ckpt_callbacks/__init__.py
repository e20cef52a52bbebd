"""ckpt_callbacks: production-grade checkpointing for any PyTorch training loop, as a callback.

Example:
    >>> from ckpt_callbacks import CheckpointSaver, Trainer
    >>> saver = CheckpointSaver(folder="{run_name}/checkpoints", save_interval="500ba",
    ...                         num_checkpoints_to_keep=2)
"""

from ckpt_callbacks.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    InvalidTemplateError,
    UnsupportedFormatError,
    UploadError,
    UploadTimeoutError,
)
from ckpt_callbacks.events import Callback, Event
from ckpt_callbacks.loader import load_checkpoint
from ckpt_callbacks.manager import CheckpointManager
from ckpt_callbacks.record import CheckpointInfo
from ckpt_callbacks.retention import KeepAny, KeepBest, KeepEvery, KeepLast, KeepWithin
from ckpt_callbacks.saver import CheckpointSaver
from ckpt_callbacks.state import State
from ckpt_callbacks.time import Time, Timestamp, TimeUnit
from ckpt_callbacks.trainer import Trainer

__all__ = [
    "Callback",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointSaver",
    "ConfigurationError",
    "CorruptCheckpointError",
    "Event",
    "InvalidTemplateError",
    "KeepAny",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "KeepWithin",
    "State",
    "Time",
    "TimeUnit",
    "Timestamp",
    "Trainer",
    "UnsupportedFormatError",
    "UploadError",
    "UploadTimeoutError",
    "load_checkpoint",
]
