"""CIFAR-10 and CIFAR-100 from their *binary* distribution (never the pickled one: unpickling a
file from disk can run code).

CIFAR-10: ``cifar-10-batches-bin/data_batch_{1..5}.bin`` and ``test_batch.bin``, records of
1 label byte + 3072 pixel bytes (1024 R, 1024 G, 1024 B, row-major 32x32).
CIFAR-100: ``cifar-100-binary/train.bin`` and ``test.bin``, records of 1 coarse + 1 fine label
byte + 3072 pixel bytes; the fine label (100 classes) is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import LLSError
from .base import Augment, Dataset, Split
from .download import fetch_archive
from .source import Source

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
PIXELS = 3 * 32 * 32
CIFAR_AUGMENTATIONS = {
    "basic": Augment(hflip=True),
    "aug": Augment(crop_padding=4, hflip=True, erasing=0.2),
    "none": Augment(),
}


@dataclass
class CifarSource(Source):
    folder: str = ""
    train_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    label_bytes: int = 1  # label bytes per record; the last one is the label used
    num_classes: int = 10
    url: str = ""
    md5: str = ""
    counts: dict[str, int] = field(default_factory=lambda: {"train": 50_000, "test": 10_000})

    def shape(self):
        return (3, 32, 32), self.num_classes

    def folder_in(self, data_dir: Path | None) -> Path | None:
        root = self.root(data_dir)
        for candidate in (root / self.folder, root):
            if all((candidate / f).is_file() for f in self.train_files + self.test_files):
                return candidate
        return None

    def fetch(self, data_dir: Path | None = None, *, quiet: bool = False) -> Path:
        found = self.folder_in(data_dir)
        if found is not None:
            return found
        fetch_archive([self.url], self.md5, self.root(data_dir), quiet=quiet)
        return self.root(data_dir) / self.folder

    def _load(self, data_dir, *, download, quiet, augment, image_size) -> Dataset:
        folder = self.folder_in(data_dir)
        if folder is None:
            if not download:
                raise LLSError(
                    f"{self.name} binary files ({self.folder}/{self.train_files[0]} ...) not found under "
                    f"{self.root(data_dir)}; run `lls data fetch {self.name}` or pass --data-dir"
                )
            folder = self.fetch(data_dir, quiet=quiet)
        splits = {
            name: self.read(folder, files, self.counts.get(name))
            for name, files in (("train", self.train_files), ("test", self.test_files))
        }
        return Dataset(
            self.name,
            splits["train"],
            splits["test"],
            self.num_classes,
            CIFAR_MEAN,
            CIFAR_STD,
            source=str(folder),
        )

    def read(self, folder: Path, files: tuple[str, ...], count: int | None) -> Split:
        record = self.label_bytes + PIXELS
        chunks = []
        for name in files:
            path = folder / name
            raw = np.fromfile(path, dtype=np.uint8)
            if raw.size == 0 or raw.size % record:
                raise LLSError(
                    f"{path} is {raw.size} bytes, not a whole number of {record}-byte records "
                    "(truncated or not the binary version); delete it and fetch it again"
                )
            chunks.append(raw.reshape(-1, record))
        records = np.concatenate(chunks)
        if count is not None and len(records) != count:
            raise LLSError(
                f"{folder} holds {len(records)} records instead of {count}; fetch the dataset again"
            )
        labels = torch.from_numpy(records[:, self.label_bytes - 1].astype(np.int64))
        if int(labels.max()) >= self.num_classes:
            raise LLSError(f"{folder} has labels >= {self.num_classes}: not {self.name}'s binary files")
        images = torch.from_numpy(records[:, self.label_bytes :].copy()).view(-1, 3, 32, 32)
        return Split(images, labels)


CIFAR10 = CifarSource(
    name="cifar10",
    augmentations=CIFAR_AUGMENTATIONS,
    default_augment="basic",
    folder="cifar-10-batches-bin",
    train_files=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    test_files=("test_batch.bin",),
    label_bytes=1,
    num_classes=10,
    url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    md5="c32a1d4ab5d03f1284b67883e8d87530",
)

CIFAR100 = CifarSource(
    name="cifar100",
    augmentations=CIFAR_AUGMENTATIONS,
    default_augment="basic",
    folder="cifar-100-binary",
    train_files=("train.bin",),
    test_files=("test.bin",),
    label_bytes=2,
    num_classes=100,
    url="https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    md5="03b5dce01913d631647c71ecec9e9cb8",
)
