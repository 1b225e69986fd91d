"""Minibatches straight from tensors: shuffling, augmentation and normalisation on whole batches.

Small image sets live in memory as one uint8 tensor (on the training device), so an epoch is a
permutation plus a few batched tensor ops per step: no worker processes, no per-sample Python.
Every random draw comes from a generator seeded by (seed, epoch, stream), so an epoch's batches are
the same whenever it is replayed, on any device, including after a resume.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch

from .base import Augment, Split

Batch = tuple[torch.Tensor, torch.Tensor]
ERASE_SCALE = (0.02, 0.33)  # torchvision RandomErasing defaults: area fraction ...
ERASE_RATIO = (0.3, 3.3)  # ... and aspect ratio range


def seeded_generator(*key: object) -> torch.Generator:
    """A CPU generator whose seed is a hash of ``key`` (e.g. ``(seed, epoch, "shuffle")``)."""
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back to the original size at a random offset per image."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    dy, dx = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(n, c, h, w + 2 * padding)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image left-right with probability 1/2."""
    flip = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_erasing(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Set a random rectangle of each image to 0 with probability ``p`` (torchvision semantics).

    Applied after normalisation, as torchvision's ``RandomErasing`` is. Each image gets one try at a
    rectangle of random area in ERASE_SCALE and aspect in ERASE_RATIO; a rectangle that does not
    fit is clipped to the image (torchvision retries up to 10 times instead).
    """
    n, _, h, w = x.shape
    erase = torch.rand(n, generator=generator) < p
    area = h * w * torch.empty(n).uniform_(*ERASE_SCALE, generator=generator)
    log_ratio = torch.empty(n).uniform_(
        math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]), generator=generator
    )
    ratio = torch.exp(log_ratio)
    eh = torch.sqrt(area * ratio).round().clamp(1, h).long()
    ew = torch.sqrt(area / ratio).round().clamp(1, w).long()
    top = (torch.rand(n, generator=generator) * (h - eh + 1)).long()
    left = (torch.rand(n, generator=generator) * (w - ew + 1)).long()
    ys, xs = torch.arange(h)[None, :], torch.arange(w)[None, :]
    inside_y = (ys >= top[:, None]) & (ys < (top + eh)[:, None])
    inside_x = (xs >= left[:, None]) & (xs < (left + ew)[:, None])
    mask = (inside_y[:, :, None] & inside_x[:, None, :] & erase[:, None, None]).to(x.device)
    return x.masked_fill(mask[:, None], 0.0)


class TensorLoader:
    """Batches of one in-memory split, shuffled and augmented per epoch.

    ``loader.epoch(e)`` yields ``(x, y)`` with ``x`` float32 normalised (N, C, H, W) on ``device``.
    """

    def __init__(
        self,
        split: Split,
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
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.augment = augment or Augment()
        self.dtype, self.memory_format = dtype, memory_format
        shape = (1, -1, 1, 1)
        self.scale = (1.0 / (255.0 * torch.tensor(std, dtype=dtype))).view(shape).to(self.device)
        self.shift = (
            (torch.tensor(mean, dtype=dtype) / torch.tensor(std, dtype=dtype)).view(shape).to(self.device)
        )

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def epoch(self, epoch: int = 0, stream: str = "train") -> Iterator[Batch]:
        generator = seeded_generator(self.seed, epoch, stream)
        n = len(self.labels)
        order = torch.randperm(n, generator=generator).to(self.device) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            if order is None:
                index = slice(start, start + self.batch_size)
                x, y = self.images[index], self.labels[index]
            else:
                index = order[start : start + self.batch_size]
                x, y = self.images[index], self.labels[index]
            yield self.transform(x, generator), y

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)

    def transform(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        aug = self.augment
        if aug.crop_padding:
            x = random_crop(x, aug.crop_padding, generator)
        if aug.hflip:
            x = random_flip(x, generator)
        x = x.to(self.dtype) * self.scale - self.shift  # (x / 255 - mean) / std
        if aug.erasing:
            x = random_erasing(x, aug.erasing, generator)
        return x.contiguous(memory_format=self.memory_format)
