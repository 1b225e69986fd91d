"""What a dataset is: two splits of images, class count, normalisation and augmentation."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checks import check_fields
from ..errors import LLSError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def seeded_generator(*key: object, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` (the CPU by default) whose seed is a hash of ``key`` (e.g.
    ``(seed, epoch, "train")``)."""
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def choose(n: int, count: int, *key: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random choice of ``count`` of ``n`` items, decided by ``key`` alone (never by a run's
    seed): (the others, the chosen), each in increasing order."""
    order = torch.randperm(n, generator=seeded_generator(*key))
    return order[count:].sort().values, order[:count].sort().values


@dataclass
class Split:
    """An in-memory split: images as one uint8 tensor (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        check_fields(self)
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise LLSError(
                f"Split: images must be uint8 (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise LLSError(f"Split: {len(self.images)} images but {len(self.labels)} labels")
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

    def take(self, index: torch.Tensor, evaluation: bool = False) -> Split:
        return Split(self.images[index], self.labels[index])


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

    def take(self, index: torch.Tensor, evaluation: bool = False) -> FileSplit:
        """The files at ``index``; for evaluation, centre crops instead of random ones."""
        files = [self.files[i] for i in index.tolist()]
        crop = self.random_crop and not evaluation
        return FileSplit(files, self.labels[index], self.size, self.resize, crop)


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

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape

    def hold_out(self, count: int) -> Dataset:
        """This dataset with ``count`` training images (a fixed random choice, the same for every
        seed) moved into the evaluation split: for tuning without looking at the test set."""
        n = len(self.train)
        if not 0 < count < n:
            raise LLSError(f"--holdout takes between 1 and {n - 1} images for {self.name}, got {count}")
        keep, held = choose(n, count, "holdout", self.name)
        train, test = self.train.take(keep), self.train.take(held, evaluation=True)
        return dataclasses.replace(self, name=f"{self.name} (holdout)", train=train, test=test)


def default_data_root() -> Path:
    """Where downloads go when no ``--data-dir`` is given: ``$LLS_DATA_DIR`` or ``~/.cache/lls``."""
    root = os.environ.get("LLS_DATA_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lls"
