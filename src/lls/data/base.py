"""What a dataset is: two splits of images, class count, normalisation and augmentation."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Split:
    """An in-memory split: images as one uint8 tensor (N, C, H, W) and int64 labels (N,)."""

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

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return (c, h, w)

    def head(self, n: int | None) -> Split:
        """The first ``n`` examples (all of them when ``n`` is None)."""
        return self if n is None else Split(self.images[:n], self.labels[:n])


@dataclass
class FileSplit:
    """A split streamed from image files, decoded to ``size x size`` RGB.

    Each image is resized so that its shorter side is ``resize`` (when given), then cropped to
    ``size x size``: at a random position when ``random_crop`` (training), else at the centre.
    """

    files: list[Path]
    labels: torch.Tensor
    size: int
    resize: int | None = None
    random_crop: bool = False

    def __post_init__(self) -> None:
        if len(self.files) != len(self.labels):
            raise ValueError(f"{len(self.files)} files but {len(self.labels)} labels")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)

    def head(self, n: int | None) -> FileSplit:
        if n is None:
            return self
        return FileSplit(self.files[:n], self.labels[:n], self.size, self.resize, self.random_crop)


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation, done on whole batches of tensors (see ``augment.py``)."""

    crop_padding: int = 0  # random crop of the original size after zero padding by this much
    hflip: bool = False  # random horizontal flip with p = 0.5
    erasing: float = 0.0  # random erasing probability (torchvision's area and aspect ranges)


@dataclass
class Dataset:
    name: str
    train: Split | FileSplit
    test: Split | FileSplit
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment = field(default_factory=Augment)
    source: str = ""  # where the files were read from, for the run's record
    classes: tuple[str, ...] = ()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape


def default_data_root() -> Path:
    """Where downloads go when no ``--data-dir`` is given: ``$LLS_DATA_DIR`` or ``~/.cache/lls``."""
    root = os.environ.get("LLS_DATA_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lls"
