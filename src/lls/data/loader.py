"""Minibatches for training and evaluation, shuffled and augmented per epoch on tensors.

Small image sets live in memory as one uint8 tensor on the training device (``TensorLoader``); an
epoch is a permutation plus a few batched tensor ops per step: no worker processes, no per-sample
Python. Sets that do not fit stream from their image files (``StreamLoader``): a thread pool
decodes the next batches while the current one trains (decoding releases the GIL, so both cores
stay busy). Every random number comes from a generator seeded by (seed, epoch, stream), so an
epoch's batches are the same whenever it is replayed, on any device, including after a resume.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..checks import checked
from ..errors import LLSError
from .augment import Draws, draw, erase, flip, pad_crop, seeded_generator
from .base import Augment, FileSplit, Split

Batch = tuple[torch.Tensor, torch.Tensor]
PREFETCH_BATCHES = 2  # streamed batches decoded ahead of the one training


class BatchLoader:
    """Shared epoch logic: order, per-batch draws, skipping, normalisation, augmentation."""

    random_crop = False  # whether a batch needs crop draws

    @checked
    def __init__(
        self,
        split: Split | FileSplit,
        batch_size: int,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: Augment | None = None,
        shuffle: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        if batch_size < 1:
            raise LLSError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.labels = split.labels.to(self.device)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.shard: tuple[int, int] | None = None  # (rank, world): yield only this rank's share
        # the fewest images a batch may have on each process: BatchNorm in training mode needs 2
        self.min_batch = 1
        self.augment = augment or Augment()
        self.dtype, self.memory_format = dtype, memory_format
        shape = (1, -1, 1, 1)
        std_t, mean_t = torch.tensor(std, dtype=dtype), torch.tensor(mean, dtype=dtype)
        self.scale = (1.0 / (255.0 * std_t)).view(shape).to(self.device)
        self.shift = (mean_t / std_t).view(shape).to(self.device)

    def __len__(self) -> int:
        return len(self.batches())

    def batches(self) -> list[range]:
        """Each batch's positions in the epoch's order. A last batch smaller than ``min_batch``
        images per process is merged into the one before it (every image is still seen once per
        epoch; a batch of one image would break BatchNorm in training mode)."""
        n, size = len(self.labels), self.batch_size
        processes = self.shard[1] if self.shard is not None else 1
        smallest = self.min_batch * processes
        if size < smallest:
            raise LLSError(
                f"a batch of {size} over {processes} process(es) leaves fewer than {self.min_batch} images "
                f"per process (BatchNorm needs {self.min_batch}); use --batch-size {smallest} or more"
            )
        if 0 < n < smallest:
            raise LLSError(
                f"{n} training image(s) cannot fill a batch of {smallest} (BatchNorm needs {self.min_batch} "
                "per process); use more images"
            )
        starts = list(range(0, n, size))
        if len(starts) > 1 and n - starts[-1] < smallest:
            starts.pop()
        return [range(a, b) for a, b in zip(starts, [*starts[1:], n], strict=True)]

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)

    def plan(self, epoch: int, stream: str, start: int = 0) -> Iterator[tuple[torch.Tensor, Draws]]:
        """(indices, draws) of every batch from step ``start`` on; earlier batches' draws are skipped."""
        generator = seeded_generator(self.seed, epoch, stream)
        n = len(self.labels)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        for step, positions in enumerate(self.batches()):
            index = order[positions.start : positions.stop]
            draws = draw(len(index), self.augment, self.random_crop, generator)
            if step < start:
                continue
            if self.shard is not None:  # this rank's share of the global batch (data parallelism)
                rank, world = self.shard
                part = shard_slice(len(index), rank, world)
                index, draws = index[part], draws.select(part)
            yield index, draws

    def finish(self, x: torch.Tensor, draws: Draws) -> torch.Tensor:
        """uint8 batch on the device -> flipped, normalised, erased float batch."""
        if draws.flip is not None:
            x = flip(x, draws.flip)
        x = x.to(self.dtype) * self.scale - self.shift  # (x / 255 - mean) / std
        if draws.erase is not None:
            x = erase(x, self.augment.erasing, draws.erase)
        return x.contiguous(memory_format=self.memory_format)

    def epoch(self, epoch: int = 0, stream: str = "train", start: int = 0) -> Iterator[Batch]:
        raise NotImplementedError


class TensorLoader(BatchLoader):
    """Batches of an in-memory :class:`Split`; ``loader.epoch(e)`` yields normalised ``(x, y)``."""

    @checked
    def __init__(self, split: Split, batch_size: int, **options) -> None:
        super().__init__(split, batch_size, **options)
        self.images = split.images.to(self.device)
        self.random_crop = bool(self.augment.crop_padding)

    def epoch(self, epoch: int = 0, stream: str = "train", start: int = 0) -> Iterator[Batch]:
        for index, draws in self.plan(epoch, stream, start):
            index = index.to(self.device)
            x = self.images[index]
            if draws.crop is not None:
                x = pad_crop(x, self.augment.crop_padding, draws.crop)
            yield self.finish(x, draws), self.labels[index]


class StreamLoader(BatchLoader):
    """Batches of a :class:`FileSplit`, decoded by a thread pool ahead of training."""

    def __init__(self, split: FileSplit, batch_size: int, *, workers: int | None = None, **options) -> None:
        super().__init__(split, batch_size, **options)
        self.split = split
        self.random_crop = split.random_crop
        self.workers = workers or os.cpu_count() or 2

    def submit(self, pool: ThreadPoolExecutor, index: torch.Tensor, draws: Draws) -> list:
        crops = draws.crop.T.tolist() if draws.crop is not None else [None] * len(index)
        split = self.split
        return [
            pool.submit(decode_image, split.files[i], split.resize, split.size, crop)
            for i, crop in zip(index.tolist(), crops, strict=True)
        ]

    def epoch(self, epoch: int = 0, stream: str = "train", start: int = 0) -> Iterator[Batch]:
        pool = ThreadPoolExecutor(self.workers)
        try:
            pending: deque = deque()
            for index, draws in self.plan(epoch, stream, start):
                pending.append((index, draws, self.submit(pool, index, draws)))
                if len(pending) > PREFETCH_BATCHES:
                    yield self._ready(*pending.popleft())
            while pending:
                yield self._ready(*pending.popleft())
        finally:  # also when the consumer stops early (e.g. the 50 BatchNorm refresh batches)
            pool.shutdown(wait=True, cancel_futures=True)

    def _ready(self, index: torch.Tensor, draws: Draws, futures: list) -> Batch:
        x = torch.from_numpy(np.stack([f.result() for f in futures])).to(self.device)
        return self.finish(x, draws), self.labels[index.to(self.device)]


def decode_image(path, resize: int | None, size: int, crop: list[float] | None) -> np.ndarray:
    """Read one image file as a (3, size, size) uint8 array: RGB, resize shorter side, crop."""
    from PIL import Image, UnidentifiedImageError

    # Images past PIL's warning size (89 Mpixels) are shrunk here like any other; past twice that
    # PIL refuses them (DecompressionBombError, below). Its warning would print before that line.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise LLSError(f"cannot decode image {path}: {error}; remove or replace the file") from None
    w, h = image.size
    short = resize if resize is not None else min(w, h)
    short = max(short, size)  # never crop outside the image
    if min(w, h) != short:
        scale = short / min(w, h)
        w, h = max(short, round(w * scale)), max(short, round(h * scale))
        image = image.resize((w, h), Image.BILINEAR)
    if crop is None:  # centre crop, rounded as torchvision's CenterCrop
        top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    else:
        top, left = min(int(crop[0] * (h - size + 1)), h - size), min(int(crop[1] * (w - size + 1)), w - size)
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()


def shard_slice(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of ``n`` items split ``world`` ways (sizes differ by <= 1)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))
