"""scikit-learn's 8x8 handwritten digits (1,797 images): a real dataset small enough for tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LLSError
from .base import Dataset, Split
from .source import Source

TEST_FRACTION = 0.2
SPLIT_SEED = 0  # the train/test split is fixed, whatever the run's seed


@dataclass
class DigitsSource(Source):
    def shape(self):
        return (1, 8, 8), 10

    def fetch(self, data_dir=None, *, quiet=False):
        raise LLSError("digits ships with scikit-learn: pip install scikit-learn; nothing to fetch")

    def _load(self, data_dir, *, download, quiet, augment, image_size) -> Dataset:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise LLSError("the digits dataset needs scikit-learn: pip install 'lls[digits]'") from None
        bunch = load_digits()
        images = torch.from_numpy(bunch.images * (255.0 / 16.0)).round().to(torch.uint8)[:, None]
        labels = torch.from_numpy(bunch.target).long()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
        n_test = int(len(labels) * TEST_FRACTION)
        test, train = order[:n_test], order[n_test:]
        pixels = images[train].float() / 255.0
        return Dataset(
            name="digits",
            train=Split(images[train], labels[train]),
            test=Split(images[test], labels[test]),
            num_classes=10,
            mean=(float(pixels.mean()),),
            std=(float(pixels.std()),),
            source="sklearn.datasets.load_digits",
            classes=tuple(str(d) for d in range(10)),
        )


DIGITS = DigitsSource(name="digits")
