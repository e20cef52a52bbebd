"""Trainer: a small reference training loop that fires events in Composer's order.

It exists so that plain PyTorch users, our tests and the demo can drive callbacks; it is not a
framework. Per batch: ``BATCH_START``, the optimisation step, the timestamp advanced, ``BATCH_END``,
``BATCH_CHECKPOINT``; when the data is exhausted the epoch is rolled (in-epoch counters back to 0)
before ``EPOCH_END`` and ``EPOCH_CHECKPOINT``. With an ``eval_dataloader``, an evaluation due at
``eval_interval`` runs between ``BATCH_END`` and ``BATCH_CHECKPOINT`` (or ``EPOCH_END`` and
``EPOCH_CHECKPOINT``), fires ``EVAL_START``/``EVAL_END`` and leaves its metrics in ``state.metrics``,
so a checkpoint saved at that step is scored with them (Composer's order).

Resumption is exact: each epoch's data order comes from a shuffle seeded by ``(seed, epoch)`` (as
``DistributedSampler.set_epoch`` does), so a run resumed mid-epoch skips exactly the batches it had
already trained (or restores a stateful dataloader), and with the RNG states restored it reaches
the same weights, bit for bit on CPU, as a run that was never interrupted. Evaluation restores the
RNG states it found, so evaluating (or not, or at another interval) never changes the training.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import time
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from ckpt_callbacks import dist
from ckpt_callbacks.errors import ConfigurationError, bad_value
from ckpt_callbacks.events import Callback, Event
from ckpt_callbacks.intervals import create_save_policy
from ckpt_callbacks.loader import find_resume_checkpoint, load_checkpoint
from ckpt_callbacks.saver import CheckpointSaver
from ckpt_callbacks.state import State, capture_rng_state, restore_rng_state
from ckpt_callbacks.time import Time, TimeUnit

__all__ = ["Trainer"]

log = logging.getLogger(__name__)

DURATION_UNITS = (TimeUnit.EPOCH, TimeUnit.BATCH, TimeUnit.SAMPLE, TimeUnit.TOKEN)


class Trainer:
    """Train a model and fire events to callbacks, with checkpoint loading and autoresume.

    Args:
        model: the model.
        optimizers: one optimizer or a list.
        train_dataloader: an iterable of batches, usually a :class:`~torch.utils.data.DataLoader`.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar loss of one batch.
        max_duration: how long to train: ``'2ep'``, ``'100ba'``, ``'6400sp'``, ``'1e6tok'`` or an int
            (epochs).
        callbacks: callbacks such as :class:`~ckpt_callbacks.saver.CheckpointSaver`.
        run_name: names the run (``{run_name}``); generated when absent. Autoresume needs one.
        schedulers: one LR scheduler or a list, stepped after every batch.
        load_path: a checkpoint to start from (file, or a ``latest`` link).
        load_weights_only: take only the model weights from ``load_path`` (fine-tuning).
        load_strict_model_weights: require the model's keys to match exactly.
        load_ignore_keys: globs or a callable removing parts of the loaded checkpoint.
        reset_time: after loading a full checkpoint, start the counters from zero.
        autoresume: resume from the newest checkpoint of this run's full-state savers, if any
            (then ``load_path`` is ignored).
        num_samples_fn: ``num_samples_fn(batch)``; default: the first dimension of the batch's
            first tensor.
        num_tokens_fn: ``num_tokens_fn(batch)``; default: 0 tokens.
        seed: seeds the RNGs and the per-epoch data order (default 0).
        eval_dataloader: an iterable of evaluation batches; ``None`` for no evaluation.
        eval_fn: ``eval_fn(model, batch)`` returns a dict of metrics of one batch
            (``{'val/loss': 0.31}``; numbers or one-element tensors). Each metric is averaged over
            the evaluation batches, weighted by their sizes (``num_samples_fn``). Runs under
            ``torch.no_grad()`` with ``model.eval()``.
        eval_interval: when to evaluate, like ``save_interval``: ``'1ep'`` (default), ``'500ba'``,
            ``'0.25dur'``, ... or a callable ``(state, event) -> bool``; intervals also evaluate
            at the end of training.

    Example:
        >>> trainer = Trainer(model, optimizer, loader, loss_fn=loss_fn, max_duration="2ep",
        ...                   run_name="exp1", callbacks=[CheckpointSaver()], autoresume=True)
        >>> trainer.fit()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        train_dataloader: Iterable[Any],
        *,
        loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
        max_duration: str | int | Time,
        callbacks: Sequence[Callback] = (),
        run_name: str | None = None,
        schedulers: Any = None,
        load_path: str | os.PathLike | None = None,
        load_weights_only: bool = False,
        load_strict_model_weights: bool = True,
        load_ignore_keys: Sequence[str] | Callable[[dict], None] | None = None,
        reset_time: bool = False,
        autoresume: bool = False,
        num_samples_fn: Callable[[Any], int] | None = None,
        num_tokens_fn: Callable[[Any], int] | None = None,
        seed: int | None = None,
        eval_dataloader: Iterable[Any] | None = None,
        eval_fn: Callable[[torch.nn.Module, Any], Mapping[str, Any]] | None = None,
        eval_interval: str | int | Time | Callable[[State, Event], bool] = "1ep",
    ) -> None:
        duration = Time.from_input(max_duration, TimeUnit.EPOCH, argument="max_duration")
        if duration.unit not in DURATION_UNITS or duration.value <= 0:
            raise ConfigurationError(
                bad_value("max_duration", "a positive duration in ep, ba, sp or tok such as '2ep' or '500ba'", max_duration)
            )
        if autoresume and not run_name:
            raise ConfigurationError(
                "autoresume=True needs an explicit run_name: a generated name never finds the earlier run "
                f"(got run_name={run_name!r})"
            )
        if not callable(loss_fn):
            raise ConfigurationError(bad_value("loss_fn", "a callable loss_fn(model, batch) -> loss", loss_fn))
        _check_eval(eval_dataloader, eval_fn)
        self.eval_interval = create_save_policy(eval_interval, argument="eval_interval")
        loader = _distributed(train_dataloader, 0 if seed is None else int(seed))
        self.state = State(
            model=model,
            optimizers=_as_list(optimizers),
            schedulers=_as_list(schedulers),
            run_name=run_name or f"run-{int(time.time())}-{os.getpid()}",
            max_duration=duration,
            callbacks=list(callbacks),
            dataloader=loader,
            dataloader_len=_length(loader),
            seed=0 if seed is None else int(seed),
        )
        self.loss_fn = loss_fn
        self.num_samples_fn = num_samples_fn or _first_dimension
        self.num_tokens_fn = num_tokens_fn
        self.load_path = load_path
        self.load_options = {
            "weights_only": load_weights_only,
            "strict": load_strict_model_weights,
            "ignore_keys": load_ignore_keys,
        }
        self.reset_time = reset_time
        self.autoresume = autoresume
        self.eval_dataloader = eval_dataloader
        self.eval_fn = eval_fn
        self._last_eval_batch: int | None = None
        self._seed_everything(self.state.seed)
        self._run_event(Event.INIT)

    @property
    def saved_checkpoints(self) -> list[str]:
        """The first saver's ``saved_checkpoints`` (as Composer's ``Trainer.saved_checkpoints``)."""
        savers = [cb for cb in self.state.callbacks if isinstance(cb, CheckpointSaver)]
        return savers[0].saved_checkpoints if savers else []

    def fit(self) -> None:
        """Train until ``max_duration``, loading a checkpoint first if asked to."""
        try:
            self._load()
            self._run_event(Event.FIT_START)
            while not self.state.max_duration_reached:
                self._train_epoch()
            self._run_event(Event.FIT_END)
        except BaseException:
            self._close_callbacks(failing=True)
            raise
        self._close_callbacks(failing=False)

    def _close_callbacks(self, *, failing: bool) -> None:
        """Close every callback; while an error propagates, close errors are logged, not raised over it."""
        errors = []
        for callback in self.state.callbacks:
            try:
                callback.close()
            except Exception as error:  # noqa: BLE001 -- every callback gets closed; the first error is raised
                if failing:
                    log.error("closing %s failed: %s", callback.state_key, error)
                errors.append(error)
        if errors and not failing:
            raise errors[0]

    # ------------------------------------------------------------------ loading

    def _load(self) -> None:
        path = None
        options = self.load_options
        if self.autoresume:
            savers = [cb for cb in self.state.callbacks if isinstance(cb, CheckpointSaver) and not cb.weights_only]
            path = _as_str(find_resume_checkpoint([s.manager for s in savers if s.manager]))
            if path is not None:
                options = {"weights_only": False, "strict": True, "ignore_keys": None}
                log.info("autoresume: resuming from %s", path)
        if path is None and self.load_path is not None:
            path = os.fspath(self.load_path)
        if path is None:
            return
        load_checkpoint(path, self.state, **options)
        if options["weights_only"]:
            return
        self.state.resumed_from = path
        if self.reset_time and not self.autoresume:
            self.state.timestamp = type(self.state.timestamp)()

    # ------------------------------------------------------------------ the loop

    def _train_epoch(self) -> None:
        state = self.state
        self._run_event(Event.EPOCH_START)
        batches = self._epoch_batches()
        for batch in batches:
            self._run_event(Event.BATCH_START)
            started = time.perf_counter()
            self._train_batch(batch)
            samples, tokens, seconds = _across_ranks(
                int(self.num_samples_fn(batch)),
                int(self.num_tokens_fn(batch)) if self.num_tokens_fn else 0,
                time.perf_counter() - started,
            )
            state.previous_timestamp = state.timestamp
            state.timestamp = state.timestamp.to_next_batch(samples, tokens, timedelta(seconds=seconds))
            self._run_event(Event.BATCH_END)
            self._maybe_evaluate(Event.BATCH_CHECKPOINT)
            self._run_event(Event.BATCH_CHECKPOINT)
            if state.max_duration_reached:
                break
        else:
            self._end_epoch()
            return
        if state.dataloader_len is not None and state.timestamp.batch_in_epoch >= state.dataloader_len:
            self._end_epoch()

    def _end_epoch(self) -> None:
        state = self.state
        if state.timestamp.batch_in_epoch == 0 and state.previous_timestamp is None:
            raise ConfigurationError("the train dataloader yielded no batch: cannot train an epoch")
        state.previous_timestamp = state.timestamp
        state.timestamp = state.timestamp.to_next_epoch()
        self._run_event(Event.EPOCH_END)
        self._maybe_evaluate(Event.EPOCH_CHECKPOINT)
        self._run_event(Event.EPOCH_CHECKPOINT)

    def _train_batch(self, batch: Any) -> None:
        self.state.model.train()
        for optimizer in self.state.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.state.model, batch)
        loss.backward()
        for optimizer in self.state.optimizers:
            optimizer.step()
        for scheduler in self.state.schedulers:
            scheduler.step()

    # ------------------------------------------------------------------ evaluation

    def _maybe_evaluate(self, checkpoint_event: Event) -> None:
        """Evaluate if ``eval_interval`` is due at the checkpoint event about to fire.

        The interval policies answer at checkpoint events (epochs at ``EPOCH_CHECKPOINT``, the rest
        at ``BATCH_CHECKPOINT``); the state is the same one that event will see. Rank 0 decides,
        since wall-clock intervals differ between ranks.
        """
        state = self.state
        if self.eval_fn is None or state.timestamp.batch == self._last_eval_batch:
            return
        if not dist.decide(lambda: bool(self.eval_interval.should_save(state, checkpoint_event))):
            return
        self._last_eval_batch = state.timestamp.batch
        self._run_event(Event.EVAL_START)
        state.metrics = self._evaluate()
        state.metrics_timestamp = state.timestamp
        self._run_event(Event.EVAL_END)

    def _evaluate(self) -> dict[str, float]:
        """Each metric's average over the evaluation batches of every rank, weighted by batch size."""
        model = self.state.model
        was_training = model.training
        # Shuffled eval loaders and dropout draw from the global RNGs that training (and exact
        # resume) depends on: put them back as they were.
        rng = capture_rng_state()
        totals: dict[str, float] = {}
        weights: dict[str, float] = {}
        model.eval()
        try:
            with torch.no_grad():
                for batch in self.eval_dataloader:  # type: ignore[union-attr]
                    size = float(self.num_samples_fn(batch))
                    for name, value in _metric_items(self.eval_fn(model, batch)):  # type: ignore[misc]
                        totals[name] = totals.get(name, 0.0) + value * size
                        weights[name] = weights.get(name, 0.0) + size
        finally:
            restore_rng_state(rng)
            model.train(was_training)
        sums: dict[str, float] = {}
        sizes: dict[str, float] = {}
        for rank_totals, rank_weights in dist.all_gather_object((totals, weights)):
            for name, value in rank_totals.items():
                sums[name] = sums.get(name, 0.0) + value
                sizes[name] = sizes.get(name, 0.0) + rank_weights[name]
        if not sizes:
            raise ConfigurationError("the eval dataloader yielded no batch (or eval_fn no metric): cannot evaluate")
        return {name: sums[name] / sizes[name] if sizes[name] else math.nan for name in sorted(sums)}

    # ------------------------------------------------------------------ data

    def _epoch_batches(self) -> Iterator[Any]:
        """This epoch's batches, in the order fixed by (seed, epoch), past those already trained."""
        state = self.state
        loader = state.dataloader
        _seed_data_order(loader, state.seed, state.timestamp.epoch)
        batches = iter(loader)
        already = state.timestamp.batch_in_epoch
        if already and not callable(getattr(loader, "load_state_dict", None)):
            # A plain loader restarts the epoch: skip what the checkpoint had trained already.
            batches = itertools.islice(batches, already, None)
        return batches

    def _run_event(self, event: Event) -> None:
        for callback in self.state.callbacks:
            callback.run_event(event, self.state)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            import numpy as np

            np.random.seed(seed % 2**32)
        except ImportError:
            pass


def _seed_data_order(loader: Any, seed: int, epoch: int) -> None:
    """Fix the epoch's shuffle without drawing from the global RNGs (which the checkpoint restores)."""
    sampler = getattr(loader, "sampler", None)
    if callable(getattr(sampler, "set_epoch", None)):
        sampler.set_epoch(epoch)
    if isinstance(sampler, RandomSampler):
        sampler.generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if isinstance(loader, DataLoader):
        loader.generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)


def _check_eval(eval_dataloader: Any, eval_fn: Any) -> None:
    if eval_fn is not None and not callable(eval_fn):
        raise ConfigurationError(bad_value("eval_fn", "a callable eval_fn(model, batch) -> dict of metrics", eval_fn))
    if (eval_dataloader is None) != (eval_fn is None):
        given, missing = ("eval_dataloader", "eval_fn") if eval_fn is None else ("eval_fn", "eval_dataloader")
        raise ConfigurationError(f"{given} was given without {missing}: evaluation needs both (got {missing}=None)")
    if eval_dataloader is not None and not isinstance(eval_dataloader, Iterable):
        raise ConfigurationError(bad_value("eval_dataloader", "an iterable of batches, such as a DataLoader", eval_dataloader))


def _metric_items(results: Any) -> list[tuple[str, float]]:
    """``eval_fn``'s metrics of one batch as (name, float) pairs."""
    accepted = "a callable returning a dict of metric name -> number (or one-element tensor)"
    if not isinstance(results, Mapping):
        raise ConfigurationError(bad_value("eval_fn", accepted, results))
    items = []
    for name, value in results.items():
        try:
            items.append((str(name), float(value)))
        except (TypeError, ValueError, RuntimeError):
            raise ConfigurationError(bad_value("eval_fn", accepted, results)) from None
    return items


def _distributed(loader: Any, seed: int) -> Any:
    """In a process group, give a DataLoader with a plain sampler a DistributedSampler (each rank its
    share of every epoch, shuffled by (seed, epoch) as before); other loaders are used as they are."""
    if not dist.is_distributed() or not isinstance(loader, DataLoader) or loader.batch_sampler is None:
        return loader
    if isinstance(loader.sampler, DistributedSampler) or not isinstance(loader.sampler, (RandomSampler, SequentialSampler)):
        return loader
    sampler = DistributedSampler(loader.dataset, shuffle=isinstance(loader.sampler, RandomSampler), seed=seed)
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        worker_init_fn=loader.worker_init_fn, persistent_workers=loader.persistent_workers,
    )


def _across_ranks(samples: int, tokens: int, seconds: float) -> tuple[int, int, float]:
    """Samples and tokens summed over every rank, and the slowest rank's batch time, so that the
    timestamp is identical on every rank (one small collective per batch on the training group)."""
    if not dist.is_distributed():
        return samples, tokens, seconds
    counts = torch.tensor([samples, tokens], dtype=torch.float64)
    slowest = torch.tensor([seconds], dtype=torch.float64)
    torch.distributed.all_reduce(counts)
    torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
    return int(counts[0]), int(counts[1]), float(slowest[0])


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _as_str(path: Any) -> str | None:
    return None if path is None else os.fspath(path)


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _first_dimension(batch: Any) -> int:
    first = batch
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    if isinstance(first, dict) and first:
        first = next(iter(first.values()))
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1
