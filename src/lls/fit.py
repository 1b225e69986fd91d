"""The training loop around a :class:`~lls.trainer.Trainer`: epochs, evaluation, progress, records."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import islice

import torch
from tqdm import tqdm

from .data import BatchLoader, Dataset, FileSplit, make_loader
from .errors import LLSError
from .readout import PROBE_IMAGES
from .trainer import Evaluation, Trainer

REFRESH_BATCHES = 50  # BatchNorm refresh before each evaluation (the paper's procedure)
EVAL_BATCH_SIZE = 250  # results do not depend on it in eval mode; larger is slower on CPU
CHECK_EVERY = 10  # steps between finiteness checks and progress updates (each syncs with the device)


class TrainingDiverged(LLSError):
    """A loss became NaN or infinite."""


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float
    train_accuracy: float
    block_losses: list[float]  # mean local loss of each block (empty for bp)
    test_loss: float
    test_accuracy: float
    train_seconds: float
    eval_seconds: float
    lr: float
    block_accuracy: list[float] = field(default_factory=list)  # each block's own test accuracy
    readout: str | None = None  # how blocks are read out: "basis", "learned classifier", "ridge probe"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class EpochProgress:
    """Running sums of an epoch in progress; what a mid-epoch checkpoint stores to resume exactly."""

    epoch: int  # 0-based
    step: int = 0  # completed steps
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    block_sums: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Loaders:
    train: BatchLoader
    test: BatchLoader
    probe: BatchLoader | None = None  # unaugmented training images for the per-block ridge probes

    @classmethod
    def for_dataset(
        cls,
        data: Dataset,
        batch_size: int,
        *,
        seed: int = 0,
        device: torch.device | str = "cpu",
        limit: int | None = None,
        channels_last: bool = False,
    ) -> Loaders:
        layout = torch.channels_last if channels_last else torch.contiguous_format
        common = {"mean": data.mean, "std": data.std, "device": device, "memory_format": layout}
        train = data.train.head(limit)
        probe = train.head(min(PROBE_IMAGES, len(train)))
        if isinstance(probe, FileSplit):
            probe = dataclasses.replace(probe, random_crop=False)
        return cls(
            train=make_loader(train, batch_size, augment=data.augment, shuffle=True, seed=seed, **common),
            test=make_loader(data.test.head(limit), EVAL_BATCH_SIZE, **common),
            probe=make_loader(probe, EVAL_BATCH_SIZE, **common),
        )


@dataclass
class History:
    records: list[EpochRecord] = field(default_factory=list)

    @property
    def best_test_accuracy(self) -> float:
        return max((r.test_accuracy for r in self.records), default=float("nan"))

    @property
    def final_test_accuracy(self) -> float:
        return self.records[-1].test_accuracy if self.records else float("nan")

    @property
    def train_seconds(self) -> float:
        return sum(r.train_seconds for r in self.records)


class Interrupted(Exception):  # a control-flow signal, not an error
    """Training stopped on request: mid-epoch at a step boundary (``progress`` says where) or,
    with ``progress`` None, right after an epoch was recorded."""

    def __init__(self, progress: EpochProgress | None) -> None:
        where = f"epoch {progress.epoch + 1}, step {progress.step}" if progress else "an epoch boundary"
        super().__init__(f"interrupted at {where}")
        self.progress = progress


def _first_bad(window: list[torch.Tensor], first_step: int, blocks: int) -> str | None:
    """Where the first non-finite loss in ``window`` (rows: steps; columns: blocks..., head) is."""
    values = torch.stack(window)
    bad = ~torch.isfinite(values)
    if not bool(bad.any()):
        return None
    row = int(bad.any(1).nonzero()[0])
    column = int(bad[row].nonzero()[0])
    who = f"block {column}'s local loss" if column < blocks else "the head's loss"
    return f"step {first_step + row}: {who} is {values[row, column].item()}"


def train_epoch(
    trainer: Trainer,
    loader: BatchLoader,
    epoch: int,
    *,
    progress: bool = True,
    desc: str = "",
    resume: EpochProgress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> EpochProgress:
    """One pass over the training data, from ``resume``'s step if given.

    Checks every few steps that all losses are finite (raising :class:`TrainingDiverged` naming the
    first bad block and step) and whether ``should_stop()``; if so it raises :class:`Interrupted`
    with the sums so far, at a step boundary.
    """
    state = resume or EpochProgress(epoch)
    steps, device, blocks = len(loader), loader.device, len(trainer.net.blocks)
    loss_sum = torch.tensor(state.loss_sum, device=device, dtype=torch.float64)
    correct = torch.tensor(state.correct, device=device, dtype=torch.int64)
    block_sum = torch.tensor(state.block_sums or [], device=device, dtype=torch.float64)
    window: list[torch.Tensor] = []
    window_start = state.step + 1
    bar = tqdm(
        total=steps, initial=state.step, desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True
    )
    start = time.perf_counter() - state.seconds

    def snapshot(step: int) -> EpochProgress:
        return EpochProgress(
            epoch,
            step,
            float(loss_sum),
            int(correct),
            state.seen,
            block_sum.tolist(),
            time.perf_counter() - start,
        )

    step = state.step
    for step, (x, y) in enumerate(loader.epoch(epoch, start=state.step), start=state.step + 1):
        result = trainer.train_step(x, y)
        n = len(y)
        if block_sum.numel() != result.block_losses.numel():
            block_sum = torch.zeros(result.block_losses.numel(), device=device, dtype=torch.float64)
        loss_sum += result.loss.double() * n
        block_sum += result.block_losses.double() * n
        correct += (result.logits.argmax(1) == y).sum()
        state.seen += n
        window.append(torch.cat([result.block_losses.float(), result.loss.float().view(1)]))
        stop = should_stop()
        if step % CHECK_EVERY == 0 or step == steps or stop:
            bad = _first_bad(window, window_start, blocks)
            if bad is not None:
                bar.close()
                raise TrainingDiverged(f"training diverged at epoch {epoch + 1}, {bad}; lower --lr")
            window, window_start = [], step + 1
            if progress:
                seen = state.seen
                text = _postfix(float(loss_sum) / seen, int(correct) / seen, (block_sum / seen).tolist())
                bar.set_postfix_str(text, refresh=False)
                bar.update(step - bar.n)
        if stop and step < steps:
            bar.close()
            raise Interrupted(snapshot(step))
    bar.close()
    if state.seen == 0:
        raise LLSError("the training set is empty")
    return snapshot(step)


def _postfix(loss: float, accuracy: float, blocks: list[float]) -> str:
    text = f"loss {loss:.3f} acc {100 * accuracy:.1f}%"
    if blocks:
        text += " | blocks " + " ".join(f"{b:.3f}" for b in blocks)
    return text


def evaluate(trainer: Trainer, loaders: Loaders, epoch: int, blocks: bool = True) -> tuple[Evaluation, float]:
    """The paper's evaluation (averaged weights, BN refresh on 50 training batches, test set),
    with each block's own accuracy when ``blocks``; returns it with the seconds it took."""
    start = time.perf_counter()
    refresh = islice(loaders.train.epoch(epoch, stream="refresh"), REFRESH_BATCHES)
    probes = loaders.probe.epoch() if blocks and loaders.probe is not None else ()
    result = trainer.evaluate(loaders.test.epoch(), refresh=refresh, blocks=blocks, probe_batches=probes)
    return result, time.perf_counter() - start


def fit(
    trainer: Trainer,
    loaders: Loaders,
    epochs: int,
    *,
    start_epoch: int = 0,
    history: History | None = None,
    progress: bool = True,
    resume: EpochProgress | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    block_accuracy: bool = True,
    evaluator: Callable[..., tuple[Evaluation, float]] | None = None,
    reduce: Callable[[EpochProgress], EpochProgress] = lambda done: done,
) -> History:
    """Train from ``start_epoch`` (or ``resume``'s epoch and step) to ``epochs``, evaluating after each.

    ``evaluator`` replaces :func:`evaluate` and ``reduce`` combines an epoch's sums across
    processes (both for data parallelism).
    """
    evaluator = evaluator or evaluate
    history = history or History()
    if resume is not None:
        start_epoch = resume.epoch
    for epoch in range(start_epoch, epochs):
        done = train_epoch(
            trainer,
            loaders.train,
            epoch,
            progress=progress,
            desc=f"epoch {epoch + 1}/{epochs}",
            resume=resume if resume is not None and resume.epoch == epoch else None,
            should_stop=should_stop,
        )
        done = reduce(done)
        result, eval_seconds = evaluator(trainer, loaders, epoch, blocks=block_accuracy)
        record = EpochRecord(
            epoch=epoch + 1,
            train_loss=done.loss_sum / done.seen,
            train_accuracy=done.correct / done.seen,
            block_losses=[b / done.seen for b in done.block_sums],
            test_loss=result.loss,
            test_accuracy=result.accuracy,
            train_seconds=done.seconds,
            eval_seconds=eval_seconds,
            lr=trainer.lr,
            block_accuracy=result.block_accuracy,
            readout=result.readout,
        )
        if not math.isfinite(result.loss):
            raise TrainingDiverged(
                f"evaluation after epoch {epoch + 1} gave a test loss of {result.loss}; lower --lr"
            )
        history.records.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if epoch + 1 < epochs and should_stop():
            raise Interrupted(None)
    return history
