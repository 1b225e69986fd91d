"""The training loop around a :class:`~lls.trainer.Trainer`: epochs, evaluation, progress, records."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import islice

import torch
from tqdm import tqdm

from .data import Dataset, TensorLoader
from .errors import LLSError
from .trainer import Trainer

REFRESH_BATCHES = 50  # BatchNorm refresh before each evaluation (the paper's procedure)
EVAL_BATCH_SIZE = 250  # results do not depend on it in eval mode; larger is slower on CPU
POSTFIX_EVERY = 10  # steps between progress-bar updates (each one syncs with the device)


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float
    train_accuracy: float
    block_losses: list[float]  # mean local loss of each block (NaN for bp)
    test_loss: float
    test_accuracy: float
    train_seconds: float
    eval_seconds: float
    lr: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Loaders:
    train: TensorLoader
    test: TensorLoader

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
        return cls(
            train=TensorLoader(
                data.train.head(limit), batch_size, augment=data.augment, shuffle=True, seed=seed, **common
            ),
            test=TensorLoader(data.test.head(limit), EVAL_BATCH_SIZE, **common),
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


def train_epoch(
    trainer: Trainer, loader: TensorLoader, epoch: int, *, progress: bool = True, desc: str = ""
) -> tuple[float, float, list[float], float]:
    """One pass over the training data: (loss, accuracy, per-block losses, seconds)."""
    steps = len(loader)
    device = loader.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    block_sum = torch.zeros(len(trainer.net.blocks), device=device, dtype=torch.float64)
    seen = 0
    bar = tqdm(total=steps, desc=desc, leave=True, disable=not progress, file=sys.stderr, dynamic_ncols=True)
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader.epoch(epoch), start=1):
        result = trainer.train_step(x, y)
        n = len(y)
        loss_sum += result.loss.double() * n
        block_sum += result.block_losses.double() * n
        correct += (result.logits.argmax(1) == y).sum()
        seen += n
        if step % POSTFIX_EVERY == 0 or step == steps:
            loss = float(loss_sum) / seen
            if not math.isfinite(loss):
                raise LLSError(
                    f"training diverged: the loss is {loss} at epoch {epoch + 1}, step {step}; lower --lr"
                )
            if progress:
                bar.set_postfix_str(
                    _postfix(loss, int(correct) / seen, (block_sum / seen).tolist()), refresh=False
                )
                bar.update(step - bar.n)
    seconds = time.perf_counter() - start
    bar.close()
    if seen == 0:
        raise LLSError("the training set is empty")
    return float(loss_sum) / seen, int(correct) / seen, (block_sum / seen).tolist(), seconds


def _postfix(loss: float, accuracy: float, blocks: list[float]) -> str:
    text = f"loss {loss:.3f} acc {100 * accuracy:.1f}%"
    if not all(math.isnan(b) for b in blocks):
        text += " | blocks " + " ".join(f"{b:.3f}" for b in blocks)
    return text


def evaluate(trainer: Trainer, loaders: Loaders, epoch: int) -> tuple[float, float, float]:
    """The paper's evaluation: averaged weights, BN refresh on 50 training batches, test set."""
    start = time.perf_counter()
    refresh = islice(loaders.train.epoch(epoch, stream="refresh"), REFRESH_BATCHES)
    loss, accuracy = trainer.evaluate(loaders.test.epoch(), refresh=refresh)
    return loss, accuracy, time.perf_counter() - start


def fit(
    trainer: Trainer,
    loaders: Loaders,
    epochs: int,
    *,
    start_epoch: int = 0,
    history: History | None = None,
    progress: bool = True,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> History:
    """Train from ``start_epoch`` to ``epochs``, evaluating after each epoch."""
    history = history or History()
    for epoch in range(start_epoch, epochs):
        desc = f"epoch {epoch + 1}/{epochs}"
        loss, accuracy, blocks, train_seconds = train_epoch(
            trainer, loaders.train, epoch, progress=progress, desc=desc
        )
        test_loss, test_accuracy, eval_seconds = evaluate(trainer, loaders, epoch)
        record = EpochRecord(
            epoch + 1,
            loss,
            accuracy,
            blocks,
            test_loss,
            test_accuracy,
            train_seconds,
            eval_seconds,
            trainer.lr,
        )
        history.records.append(record)
        if on_epoch is not None:
            on_epoch(record)
    return history
