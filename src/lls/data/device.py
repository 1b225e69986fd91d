"""Shuffling and augmentation on the training device, a whole epoch's random numbers at a time.

:class:`~lls.data.loader.TensorLoader` draws each batch's random numbers on the host from a CPU
generator, so that every device sees the same stream (bit-for-bit CPU reproducibility rests on it),
and moves them to the device batch by batch. On a GPU that replays a training step in a few
hundred microseconds, that host work is the epoch's limit. :class:`DeviceLoader` draws the epoch's
permutation and every image's crop, flip and erasing numbers in one go, with a generator on the
device seeded by (seed, epoch, stream), then gathers and augments a chunk of batches at a time
with a handful of batched ops; a batch is then a view into the chunk, with no host work and no
host-device transfer. The stream of draws differs from the host loader's but is just as
deterministic: the same (seed, epoch, stream) gives the same batches on the same device, and
resuming at step k reproduces the rest of the epoch exactly (the draws are a function of the
epoch, not of how far it got).

The same code runs on a CPU tensor (then the generator is a CPU one), which is how it is tested.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .augment import draw, pad_crop, seeded_generator
from .base import Split
from .loader import Batch, BatchLoader, shard_slice

CHUNK_BYTES = 256 * 2**20  # augmented float images made at a time (~20k CIFAR images; all of MNIST)


class DeviceLoader(BatchLoader):
    """Batches of an in-memory :class:`Split` held on the device, shuffled and augmented there.

    ``loader.epoch(e, start=k)`` yields the normalised ``(x, y)`` of epoch ``e`` from step ``k``;
    ``x`` is a view into a chunk of ``chunk_bytes`` of augmented images.
    """

    def __init__(self, split: Split, batch_size: int, *, chunk_bytes: int = CHUNK_BYTES, **options) -> None:
        super().__init__(split, batch_size, **options)
        self.images = split.images.to(self.device)
        self.random_crop = bool(self.augment.crop_padding)
        image_bytes = self.images[0].numel() * torch.empty((), dtype=self.dtype).element_size()
        self.chunk_batches = max(1, chunk_bytes // (image_bytes * batch_size))

    def epoch(self, epoch: int = 0, stream: str = "train", start: int = 0) -> Iterator[Batch]:
        n, device = len(self.labels), self.device
        generator = seeded_generator(self.seed, epoch, stream, device=device)
        if self.shuffle:
            order = torch.randperm(n, generator=generator, device=device)
        else:
            order = torch.arange(n, device=device)
        draws = draw(n, self.augment, self.random_crop, generator)  # by position in the epoch
        batches = self.batches()  # the same bounds as the host loader's (a tiny last batch merged)
        for first in range(start, len(batches), self.chunk_batches):
            chunk = batches[first : first + self.chunk_batches]
            lo, hi = chunk[0].start, chunk[-1].stop
            index, part = order[lo:hi], draws.select(slice(lo, hi))
            x = self.images[index]
            if part.crop is not None:
                x = pad_crop(x, self.augment.crop_padding, part.crop)
            x, y = self.finish(x, part), self.labels[index]
            for positions in chunk:
                begin, end = positions.start - lo, positions.stop - lo
                if self.shard is not None:  # this rank's share of the global batch
                    share = shard_slice(end - begin, *self.shard)
                    begin, end = begin + share.start, begin + share.stop
                yield x[begin:end], y[begin:end]
