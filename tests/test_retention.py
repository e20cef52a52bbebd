"""Retention policies: each policy and their combinations over sequences of saves, NaN, ties, deferred
metrics, resume in the middle, the safety rules, the ``best`` link, and the recipes of docs/retention.md."""

from __future__ import annotations

import math
import os
import re
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from _training import make_loader, make_trainer

from ckpt_callbacks import CheckpointManager, CheckpointSaver, ConfigurationError, InvalidTemplateError, Timestamp
from ckpt_callbacks.events import Callback
from ckpt_callbacks.record import CheckpointInfo
from ckpt_callbacks.retention import (
    KeepAll,
    KeepAny,
    KeepBest,
    KeepEvery,
    KeepLast,
    KeepWithin,
    find_best_policy,
    retention_from_arguments,
)
from ckpt_callbacks.storage import POINTER_MAGIC, resolve_latest

NAN = math.nan
DOCS = Path(__file__).resolve().parent.parent / "docs" / "retention.md"


def info(seq: int, *, epoch: int = 0, batch: int = 0, batch_in_epoch: int = 0, sample: int = 0,
         saved_at: float = 0.0, **metrics: float) -> CheckpointInfo:
    return CheckpointInfo(
        seq=seq, name=f"c{seq}.pt", lineage="L", size=1, saved_at=saved_at, weights_only=False,
        timestamp=Timestamp(epoch=epoch, batch=batch, batch_in_epoch=batch_in_epoch, sample=sample),
        metrics=dict(metrics),
    )


def scored(name: str, values: list[float | None]) -> list[CheckpointInfo]:
    """Checkpoints 1..n; None means 'no such metric recorded'."""
    return [info(i, batch=i, **({} if v is None else {name: v})) for i, v in enumerate(values, start=1)]


EPOCH_ENDS = [info(i, epoch=i, batch=5 * i) for i in range(1, 7)]
MID_EPOCH = info(7, epoch=2, batch=13, batch_in_epoch=3)
BATCHES = [info(i, batch=500 * i, sample=4000 * i) for i in range(1, 6)]
WALL = [info(i, saved_at=t) for i, t in enumerate([1000.0, 6399.0, 6400.0, 9999.0], start=1)]
CLOCK = lambda: 10_000.0  # noqa: E731 -- a fixed wall clock

POLICY_TABLE = [
    ("all", KeepAll(), BATCHES, {1, 2, 3, 4, 5}),
    ("last 2", KeepLast(2), BATCHES, {4, 5}),
    ("last 0", KeepLast(0), BATCHES, set()),
    ("last more than there are", KeepLast(9), BATCHES[:2], {1, 2}),
    ("best 2 min", KeepBest(2, "loss"), scored("loss", [0.5, 0.2, 0.4, 0.9]), {2, 3}),
    ("best 2 max", KeepBest(2, "acc", mode="max"), scored("acc", [0.5, 0.2, 0.4, 0.9]), {1, 4}),
    ("NaN is never best", KeepBest(2, "loss"), scored("loss", [0.5, NAN, NAN, 0.9]), {1, 4}),
    ("NaN never best in max mode", KeepBest(1, "acc", mode="max"), scored("acc", [0.1, NAN]), {1}),
    ("all NaN keeps none", KeepBest(3, "loss"), scored("loss", [NAN, NAN]), set()),
    ("unscored are never best", KeepBest(2, "loss"), scored("loss", [None, 0.3, None, None]), {2}),
    ("other metrics do not count", KeepBest(1, "loss"), scored("acc", [0.1, 0.2]), set()),
    ("ties keep the newer", KeepBest(1, "loss"), scored("loss", [0.2, 0.2, 0.2, 0.5]), {3}),
    ("ties keep the newer, max", KeepBest(2, "acc", mode="max"), scored("acc", [0.9, 0.1, 0.9, 0.9]), {3, 4}),
    ("infinities rank", KeepBest(1, "loss"), scored("loss", [0.1, -math.inf, math.inf]), {2}),
    ("every 2 epochs", KeepEvery("2ep"), EPOCH_ENDS + [MID_EPOCH], {2, 4, 6}),
    ("every 3 epochs, int", KeepEvery(3), EPOCH_ENDS, {3, 6}),
    ("every 1000 batches", KeepEvery("1000ba"), BATCHES, {2, 4}),
    ("every 8000 samples", KeepEvery("8000sp"), BATCHES, {2, 4}),
    ("within 1h", KeepWithin("1h", clock=CLOCK), WALL, {3, 4}),
    ("within a timedelta", KeepWithin(timedelta(seconds=1), clock=CLOCK), WALL, {4}),
    ("within seconds", KeepWithin(9000, clock=CLOCK), WALL, {1, 2, 3, 4}),
    ("any: last and best", KeepAny([KeepLast(1), KeepBest(1, "loss")]), scored("loss", [0.3, 0.1, 0.2, NAN]), {2, 4}),
    (
        "any: last, best, milestones",
        KeepAny([KeepLast(2), KeepBest(1, "loss"), KeepEvery("2ep")]),
        [info(i, epoch=i, batch=5 * i, loss=v) for i, v in enumerate([0.9, 0.8, 0.1, 0.7, NAN, 0.6, 0.5], start=1)],
        {2, 3, 4, 6, 7},
    ),
    ("any of one", KeepAny([KeepEvery("1000ba")]), BATCHES, {2, 4}),
    ("nested any", KeepAny([KeepAny([KeepLast(1)]), KeepWithin("1h", clock=CLOCK)]), WALL, {3, 4}),
    ("nothing recorded", KeepAny([KeepLast(2), KeepBest(2, "loss")]), [], set()),
]


@pytest.mark.parametrize(("case", "policy", "checkpoints", "kept"), POLICY_TABLE, ids=[row[0] for row in POLICY_TABLE])
def test_policy_table(case: str, policy, checkpoints: list[CheckpointInfo], kept: set[int]) -> None:
    assert policy.keep(checkpoints) == kept
    assert policy.keep(list(reversed(checkpoints))) == kept, "the answer must not depend on the order given"


BAD_POLICIES = [
    (lambda: KeepLast(-1), ["KeepLast(n)", "-1", ">= 0"]),
    (lambda: KeepLast(True), ["KeepLast(n)", "True"]),
    (lambda: KeepBest(0, "loss"), ["KeepBest(n)", "0", ">= 1"]),
    (lambda: KeepBest(1.5, "loss"), ["KeepBest(n)", "1.5"]),
    (lambda: KeepBest(1, ""), ["KeepBest(metric)", "''"]),
    (lambda: KeepBest(1, None), ["KeepBest(metric)", "None"]),
    (lambda: KeepBest(1, "loss", mode="lowest"), ["KeepBest(mode)", "'lowest'", "'min' or 'max'"]),
    (lambda: KeepEvery("2h"), ["KeepEvery(interval)", "'2h'", "ep, ba, sp or tok"]),
    (lambda: KeepEvery("0.5dur"), ["KeepEvery(interval)", "'0.5dur'"]),
    (lambda: KeepEvery("0ep"), ["KeepEvery(interval)", "'0ep'", "positive"]),
    (lambda: KeepEvery("5xx"), ["KeepEvery(interval)", "'5xx'"]),
    (lambda: KeepEvery(None), ["KeepEvery(interval)", "None"]),
    (lambda: KeepWithin("5ep"), ["KeepWithin(duration)", "'5ep'", "wall-clock"]),
    (lambda: KeepWithin(0), ["KeepWithin(duration)", "0", "positive"]),
    (lambda: KeepWithin(-3.0), ["KeepWithin(duration)", "-3.0"]),
    (lambda: KeepWithin(math.inf), ["KeepWithin(duration)", "inf"]),
    (lambda: KeepWithin("2h", clock=7200), ["KeepWithin(clock)", "7200", "callable"]),
    (lambda: KeepAny([]), ["KeepAny(policies)", "[]", "non-empty"]),
    (lambda: KeepAny(KeepLast(1)), ["KeepAny(policies)", "KeepLast(1)", "list"]),
    (lambda: KeepAny([KeepLast(1), "last"]), ["KeepAny(policies)", "'last'", "retention policy"]),
    (lambda: retention_from_arguments(-1, "KeepLast(2)"), ["retention", "'KeepLast(2)'"]),
    (lambda: retention_from_arguments(3, KeepBest(1, "loss")), ["retention", "both", "KeepLast(3)"]),
]


@pytest.mark.parametrize(("make", "words"), BAD_POLICIES, ids=[str(i) for i in range(len(BAD_POLICIES))])
def test_bad_policy_arguments_are_refused_at_construction(make, words: list[str]) -> None:
    with pytest.raises(ConfigurationError) as raised:
        make()
    assert isinstance(raised.value, ValueError)
    for word in words:
        assert word in str(raised.value)


def test_reprs_read_like_the_code_that_built_them() -> None:
    policy = KeepAny([KeepLast(2), KeepBest(3, "val/loss"), KeepEvery("5ep"), KeepWithin("2h")])
    assert repr(policy) == "KeepAny([KeepLast(2), KeepBest(3, 'val/loss', mode='min'), KeepEvery('5ep'), KeepWithin('7200sec')])"
    assert find_best_policy(policy) == KeepBest(3, "val/loss")
    assert find_best_policy(KeepAny([KeepLast(1), KeepAny([KeepBest(1, "acc", mode="max")])])).metric == "acc"
    assert find_best_policy(KeepLast(2)) is None
    assert KeepEvery("1000ba") == KeepEvery(KeepEvery("1000ba").interval)


# ---------------------------------------------------------------------- through the manager


def manager(folder: Path, retention, **kwargs) -> CheckpointManager:
    kwargs.setdefault("run_name", "r")
    return CheckpointManager(str(folder), filename="ba{batch}.pt", retention=retention, **kwargs)


def on_disk(folder: Path) -> list[str]:
    return sorted((p.name for p in folder.glob("ba*.pt")), key=lambda name: int(re.sub(r"\D", "", name)))


def save(m: CheckpointManager, batch: int, score=None) -> CheckpointInfo:
    return m.save(Timestamp(batch=batch), {"x": torch.tensor(batch)}, score=score).result()


def test_best_with_nan_ties_and_the_best_link(tmp_path: Path) -> None:
    m = manager(tmp_path, KeepBest(2, "score"), best_filename="best.pt")
    m.start(Timestamp())
    link = tmp_path / "best.pt"
    expected_best = {1: "ba1.pt", 2: "ba2.pt", 3: "ba2.pt", 4: "ba4.pt", 5: "ba4.pt"}
    for batch, score in zip(range(1, 6), [0.5, 0.3, NAN, 0.3, 0.9]):
        save(m, batch, score)
        assert link.is_symlink() and os.readlink(link) == expected_best[batch]
    # ba3 (NaN) and ba1 went as soon as two better existed; ba5 stays only while it is the newest.
    assert on_disk(tmp_path) == ["ba2.pt", "ba4.pt", "ba5.pt"]
    save(m, 6, 0.4)
    assert on_disk(tmp_path) == ["ba2.pt", "ba4.pt", "ba6.pt"]
    assert m.best().name == "ba4.pt"
    m.close()


def test_explicit_score_dicts_and_bad_scores(tmp_path: Path) -> None:
    m = manager(tmp_path, KeepBest(1, "val/acc", mode="max"))
    m.start(Timestamp())
    assert save(m, 1, {"val/acc": 0.7, "val/loss": torch.tensor(0.2)}).metrics == {"val/acc": 0.7, "val/loss": pytest.approx(0.2)}
    for bad in ("high", [0.1], {"val/acc": "high"}, True):
        with pytest.raises(ConfigurationError, match="'score'"):
            m.save(Timestamp(batch=2), {"x": torch.tensor(2)}, score=bad)
    assert on_disk(tmp_path) == ["ba1.pt"]


def test_deferred_metrics_score_the_checkpoint_of_their_batch(tmp_path: Path) -> None:
    m = manager(tmp_path, KeepAny([KeepLast(1), KeepBest(1, "val/loss")]), best_filename="best-{run_name}.pt")
    m.start(Timestamp())
    save(m, 1)
    assert m.update_metrics({"val/loss": 0.4}) == [m.record.find("ba1.pt")]
    save(m, 2)
    assert on_disk(tmp_path) == ["ba1.pt", "ba2.pt"]
    # Metrics of batch 1 never score the batch-2 checkpoint, and nothing is saved at batch 7.
    assert m.update_metrics({"val/acc": 0.9}, Timestamp(batch=1))[0].name == "ba1.pt"
    assert m.update_metrics({"val/loss": 0.1}, Timestamp(batch=7)) == []
    assert m.record.find("ba2.pt").metrics == {}
    # A metric the checkpoint already has is kept.
    assert m.update_metrics({"val/loss": 0.9}, Timestamp(batch=1)) == []
    save(m, 3)
    assert on_disk(tmp_path) == ["ba1.pt", "ba3.pt"]
    (scored_now,) = m.update_metrics({"val/loss": 0.2}, Timestamp(batch=3, epoch=1))
    assert scored_now.name == "ba3.pt"
    save(m, 4)
    assert on_disk(tmp_path) == ["ba3.pt", "ba4.pt"], "the deferred score made ba3 the best; ba1 went"
    assert os.readlink(tmp_path / "best-r.pt") == "ba3.pt"
    m.close()
    reopened = manager(tmp_path, KeepAll())
    assert reopened.record.find("ba3.pt").metrics == {"val/loss": 0.2}, "deferred scores are persisted in the record"


def test_resume_in_the_middle_keeps_earlier_runs_scores(tmp_path: Path) -> None:
    policy = KeepAny([KeepLast(1), KeepBest(2, "score")])
    first = manager(tmp_path, policy)
    first.start(Timestamp())
    for batch, score in [(1, 0.9), (2, 0.1), (3, 0.8), (4, 0.7)]:
        save(first, batch, score)
    first.close()
    assert on_disk(tmp_path) == ["ba2.pt", "ba4.pt"]

    second = manager(tmp_path, policy)
    second.start(Timestamp(batch=4), resumed_from=tmp_path / "ba4.pt")
    save(second, 5, 0.5)
    assert on_disk(tmp_path) == ["ba2.pt", "ba5.pt"], "the resume source went once a newer checkpoint was committed"
    save(second, 6, 0.6)
    assert on_disk(tmp_path) == ["ba2.pt", "ba5.pt", "ba6.pt"], "ba2 (0.1) from the first run is still the best"
    assert second.best().name == "ba2.pt"


def test_safety_rules_newest_resume_source_and_foreign_files(tmp_path: Path) -> None:
    first = manager(tmp_path, KeepAll())
    first.start(Timestamp())
    for batch, score in [(1, 0.9), (2, 0.1), (3, 0.2)]:
        save(first, batch, score)
    first.close()
    foreign = [tmp_path / "ba1.pt.bak", tmp_path / "ba10-notes.pt.txt", tmp_path / "notes.txt"]
    for path in foreign:
        path.write_text("not ours")
    other_run = manager(tmp_path, KeepAll(), run_name="other", latest_filename="latest-other.pt", overwrite=True)
    other_run.start(Timestamp())
    save(other_run, 9, 5.0)
    other_run.close()

    # A restart from the first checkpoint on purpose: ba1 is neither the best nor the newest.
    second = manager(tmp_path, KeepBest(1, "score"), overwrite=True)
    second.start(Timestamp(batch=1), resumed_from=tmp_path / "ba1.pt")
    second.update_metrics({"val/loss": 1.0})  # re-applies retention before this run committed anything
    assert on_disk(tmp_path) == ["ba1.pt", "ba2.pt", "ba3.pt", "ba9.pt"], "resume source and newest are protected"
    save(second, 20, 0.5)
    assert on_disk(tmp_path) == ["ba2.pt", "ba9.pt", "ba20.pt"], "protection ends with the first newer commit"
    save(second, 21)
    assert on_disk(tmp_path) == ["ba2.pt", "ba9.pt", "ba21.pt"], "an unscored checkpoint lives while it is the newest"
    assert all(path.read_text() == "not ours" for path in foreign)
    assert resolve_latest(tmp_path / "latest-rank0.pt") == tmp_path / "ba21.pt"


def test_best_link_as_pointer_file_and_bad_best_filenames(tmp_path: Path) -> None:
    m = manager(tmp_path, KeepBest(1, "score"), best_filename="best.pt", latest_mode="pointer")
    m.start(Timestamp())
    save(m, 1, 0.3)
    save(m, 2, 0.1)
    assert (tmp_path / "best.pt").read_bytes() == POINTER_MAGIC + b"ba2.pt\n"
    assert resolve_latest(tmp_path / "best.pt") == tmp_path / "ba2.pt"
    with pytest.raises(ConfigurationError, match="KeepBest"):
        manager(tmp_path, KeepLast(2), best_filename="best.pt")
    with pytest.raises(InvalidTemplateError, match="best_filename"):
        manager(tmp_path, KeepBest(1, "score"), best_filename="best-ba{batch}.pt")
    with pytest.raises(ConfigurationError, match="best_filename"):
        CheckpointSaver(str(tmp_path), retention=KeepBest(1, "val/loss"), best_filename="latest-rank{rank}.pt")
    with pytest.raises(ConfigurationError, match="KeepBest"):
        CheckpointSaver(str(tmp_path), num_checkpoints_to_keep=2, best_filename="best.pt")
    with pytest.raises(ConfigurationError, match="unless 'remote' is given"):
        CheckpointSaver(str(tmp_path), remote_retention=KeepLast(2))


# ---------------------------------------------------------------------- through the Trainer


class ValLossByEpoch(Callback):
    """Makes eval_fn report a chosen val/loss for each evaluation, by the epoch it runs at."""

    def __init__(self, losses: dict[int, float]) -> None:
        self.losses = losses
        self.epoch = 0

    def eval_start(self, state) -> None:
        self.epoch = state.timestamp.epoch

    def eval_fn(self, model, batch) -> dict[str, float]:
        return {"val/loss": self.losses[self.epoch]}


LOSSES = dict(enumerate([5, 3, 8, NAN, 1, 9, 2, 7, 6, 4, 10, 11], start=1))
TRAINER_POLICY = KeepAny([KeepLast(2), KeepBest(3, "val/loss"), KeepEvery("5ep")])
# last 2: ep11, ep12; best 3: ep5 (1), ep7 (2), ep2 (3), never ep4 (NaN); milestones: ep5, ep10.
TRAINER_KEPT = ["ep2.pt", "ep5.pt", "ep7.pt", "ep10.pt", "ep11.pt", "ep12.pt"]


def fit(folder: Path, epochs: int, scores: ValLossByEpoch) -> CheckpointSaver:
    saver = CheckpointSaver(str(folder), filename="ep{epoch}.pt", retention=TRAINER_POLICY, best_filename="best.pt")
    make_trainer(
        [saver, scores], max_duration=f"{epochs}ep", batches_per_epoch=1, autoresume=True,
        eval_dataloader=make_loader(1, shuffle=False), eval_fn=scores.eval_fn,
    ).fit()
    return saver


def ckpt_names(folder: Path) -> list[str]:
    return sorted((p.name for p in folder.glob("ep*.pt")), key=lambda name: int(re.sub(r"\D", "", name)))


def test_trainer_any_of_last_best_and_milestones(tmp_path: Path) -> None:
    saver = fit(tmp_path, 12, ValLossByEpoch(LOSSES))
    assert ckpt_names(tmp_path) == TRAINER_KEPT
    assert os.readlink(tmp_path / "best.pt") == "ep5.pt"
    recorded = {c.name: c.metrics["val/loss"] for c in saver.manager.record.checkpoints}
    assert recorded == {name: LOSSES[int(re.sub(r"\D", "", name))] for name in TRAINER_KEPT}


def test_trainer_resume_in_the_middle_gives_the_same_retention(tmp_path: Path) -> None:
    fit(tmp_path, 6, ValLossByEpoch(LOSSES))
    assert ckpt_names(tmp_path) == ["ep1.pt", "ep2.pt", "ep5.pt", "ep6.pt"]
    resumed = fit(tmp_path, 12, ValLossByEpoch(LOSSES))
    assert ckpt_names(tmp_path) == TRAINER_KEPT
    assert os.readlink(tmp_path / "best.pt") == "ep5.pt"
    assert [Path(p).name for p in resumed.saved_checkpoints] == ["ep7.pt", "ep10.pt", "ep11.pt", "ep12.pt"]


def test_trainer_batch_saves_are_scored_only_by_their_own_evaluation(tmp_path: Path) -> None:
    """Saving every batch, evaluating every epoch: the end-of-epoch checkpoint is saved at
    BATCH_CHECKPOINT, before the epoch's evaluation, and scored when its metrics arrive."""
    scores = ValLossByEpoch({1: 0.5, 2: 0.25})
    saver = CheckpointSaver(str(tmp_path), filename="ba{batch}.pt", save_interval="1ba",
                            retention=KeepAny([KeepLast(1), KeepBest(1, "val/loss")]))
    make_trainer([saver, scores], max_duration="2ep", batches_per_epoch=3,
                 eval_dataloader=make_loader(1), eval_fn=scores.eval_fn).fit()
    assert on_disk(tmp_path) == ["ba6.pt"]
    (recorded,) = saver.manager.record.checkpoints
    assert recorded.metrics == {"val/loss": 0.25}
    kept = CheckpointSaver(str(tmp_path / "all"), filename="ba{batch}.pt", save_interval="1ba")
    make_trainer([kept, scores], max_duration="2ep", batches_per_epoch=3,
                 eval_dataloader=make_loader(1), eval_fn=scores.eval_fn).fit()
    assert {c.name: c.metrics for c in kept.manager.record.checkpoints} == {
        "ba1.pt": {}, "ba2.pt": {}, "ba3.pt": {"val/loss": 0.5},
        "ba4.pt": {}, "ba5.pt": {}, "ba6.pt": {"val/loss": 0.25},
    }, "metrics of an earlier evaluation never score a later checkpoint"


# ---------------------------------------------------------------------- the docs


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def test_docs_recipes_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    blocks = python_blocks(DOCS.read_text())
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOCS), "exec"), namespace)  # noqa: S102 -- our own documentation
    full = sorted(p.name for p in (tmp_path / "recipe" / "checkpoints").glob("ep*.pt"))
    assert full == ["ep10.pt", "ep11.pt", "ep12.pt", "ep5.pt"]
    exports = tmp_path / "recipe" / "exports"
    assert len(list(exports.glob("ep*.pt"))) in (3, 4)  # the best 3, and the newest while it is not
    best = resolve_latest(exports / "best.pt")
    losses = {c.name: c.metrics["val/loss"] for c in namespace["exports"].manager.record.checkpoints}
    assert best.name == min(losses, key=losses.get)
    assert "['step200.pt', 'step400.pt']" in capsys.readouterr().out
