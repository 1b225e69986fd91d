"""A dataset source: where a dataset's files live, how to fetch them, check them and load them."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from tqdm import tqdm

from ..errors import LLSError
from ..training.files import check_folder
from .base import Augment, Dataset, FileSplit, Split, default_data_root
from .loader import decode_image


@dataclass
class Source:
    """Base of every registered dataset. Subclasses implement ``_load`` and, if public, ``fetch``."""

    takes_image_size: ClassVar[bool] = False  # image_size applies: the user's images, cropped to it

    name: str
    augmentations: dict[str, Augment] = field(default_factory=lambda: {"none": Augment()})
    default_augment: str = "none"

    def shape(self) -> tuple[tuple[int, int, int], int] | None:
        """(input shape, classes) as training sees this dataset at its default image size, known
        without its files (for costs and reports); None when it depends on the user's files."""
        return None

    def root(self, data_dir: Path | None) -> Path:
        """The folder holding this dataset: ``--data-dir`` or ``$LLS_DATA_DIR/<name>``."""
        if data_dir is None:
            return default_data_root() / self.name
        fix = f"; create it or point it at the folder holding {self.name} "
        return check_folder(
            data_dir, "--data-dir", fix + f"(see `lls data fetch {self.name} --data-dir DIR`)"
        )

    def augment(self, name: str | None) -> Augment:
        name = name or self.default_augment
        try:
            return self.augmentations[name]
        except KeyError:
            known = ", ".join(self.augmentations)
            raise LLSError(f"{self.name} has no augmentation {name!r}; choose one of: {known}") from None

    def load(
        self,
        data_dir: Path | None = None,
        *,
        download: bool = True,
        quiet: bool = False,
        augment: str | None = None,
        image_size: int | None = None,
    ) -> Dataset:
        self.check_options(augment, image_size)
        dataset = self._load(data_dir, download=download, quiet=quiet, augment=augment, image_size=image_size)
        dataset.augment = self.augment(augment)
        return dataset

    def check_options(self, augment: str | None, image_size: int | None) -> None:
        """Refuse options this dataset has no use for (known without its files)."""
        self.augment(augment)
        if image_size is not None and not self.takes_image_size:
            raise LLSError(
                f"image_size (--image-size) sets the crops of the user's own images; {self.name} has "
                "images of a fixed size: drop it"
            )

    def _load(self, data_dir, *, download, quiet, augment, image_size) -> Dataset:
        raise NotImplementedError

    def fetch(self, data_dir: Path | None = None, *, quiet: bool = False) -> Path:
        raise LLSError(f"{self.name} has no public download; see docs/datasets.md for how to build it")

    def check(
        self, data_dir: Path | None = None, *, sample: int | None = None, quiet: bool = False
    ) -> list[str]:
        """Load without downloading and verify counts, shapes, labels and (for files) every image."""
        data = self.load(data_dir, download=False, quiet=True)
        lines = [f"{self.name}: {data.num_classes} classes, images {data.input_shape}, from {data.source}"]
        for split_name, split in (("train", data.train), ("test", data.test)):
            counts = Counter(split.labels.tolist())
            if min(counts, default=0) < 0 or max(counts, default=0) >= data.num_classes:
                raise LLSError(f"{self.name} {split_name} labels fall outside 0..{data.num_classes - 1}")
            lines.append(
                f"  {split_name}: {len(split)} images, {len(counts)} classes present, "
                f"{min(counts.values())}..{max(counts.values())} images per class"
            )
            if isinstance(split, FileSplit):
                lines.append("  " + decode_all(split, split_name, sample, quiet))
            elif isinstance(split, Split) and split.images.shape[1:] != data.input_shape:
                raise LLSError(f"{self.name} {split_name} images have shape {split.images.shape[1:]}")
        return lines


def decode_all(split: FileSplit, name: str, sample: int | None, quiet: bool) -> str:
    """Decode every file of a split (or every k-th for a sample) and check its shape."""
    step = max(1, len(split) // sample) if sample else 1
    files = split.files[::step]
    with ThreadPoolExecutor() as pool:
        images = pool.map(lambda f: decode_image(f, split.resize, split.size, None), files)
        for image in tqdm(images, total=len(files), desc=f"decoding {name}", disable=quiet, unit="img"):
            if image.shape != (3, split.size, split.size):
                raise LLSError(f"an image of {name} decoded to shape {image.shape}")
    return f"{name}: decoded {len(files)} of {len(split)} files to 3x{split.size}x{split.size}"
