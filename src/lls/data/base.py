"""What a dataset is: two splits of images, class count, normalisation and augmentation."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Split:
    """Images as one uint8 tensor (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> Split:
        """The first ``n`` examples (all of them when ``n`` is None)."""
        return self if n is None else Split(self.images[:n], self.labels[:n])


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation, done on whole batches of tensors (see ``loader.py``)."""

    crop_padding: int = 0  # random crop of the original size after zero padding by this much
    hflip: bool = False  # random horizontal flip with p = 0.5
    erasing: float = 0.0  # random erasing probability (torchvision's defaults otherwise)


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment = field(default_factory=Augment)
    source: str = ""  # where the files were read from, for the run's record

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.images.shape[1:]
        return (c, h, w)


def default_data_root() -> Path:
    """Where downloads go when no ``--data-dir`` is given: ``$LLS_DATA_DIR`` or ``~/.cache/lls``."""
    root = os.environ.get("LLS_DATA_DIR")
    return Path(root) if root else Path.home() / ".cache" / "lls"
