"""MNIST and Fashion-MNIST from their standard IDX files.

Lookup order: ``--data-dir``, then the system folder of a distribution package (Debian's
``dataset-fashion-mnist`` installs ``/usr/share/datasets/fashion-mnist``), then
``$LLS_DATA_DIR/<name>``, then a download from the canonical address with an md5 check.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LLSError
from .base import Augment, Dataset, Split
from .download import download
from .idx import parse_idx, read_idx_bytes
from .source import Source

SPLIT_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
STANDARD_COUNTS = {"train": 60_000, "test": 10_000}


@dataclass
class IdxSource(Source):
    mirrors: tuple[str, ...] = ()  # base addresses, tried in order
    md5: dict[str, str] = field(default_factory=dict)  # of the canonical .gz files, checked on download
    mean: float = 0.5
    std: float = 0.5
    classes: tuple[str, ...] = tuple(str(d) for d in range(10))
    system_dirs: tuple[str, ...] = ()
    content_sha256: dict[str, str] = field(default_factory=dict)  # of the decompressed payloads
    counts: dict[str, int] | None = field(default_factory=lambda: dict(STANDARD_COUNTS))  # None: any

    def shape(self):
        return (1, 28, 28), len(self.classes)  # the IDX files of both sets hold 28 x 28 images

    def folders(self, data_dir: Path | None) -> list[Path]:
        """Where to look: only ``--data-dir`` when one is given (a user who names a folder means
        that folder); else the system copy, then ``$LLS_DATA_DIR/<name>``."""
        if data_dir is not None:
            return [self.root(data_dir)]
        return [Path(d) for d in self.system_dirs] + [self.root(None)]

    def locate(self, data_dir: Path | None, download_missing: bool, quiet: bool) -> dict[str, Path]:
        """Paths of the four IDX files, downloading them if allowed and found nowhere."""
        folders = self.folders(data_dir)
        for folder in folders:
            found = {key: _present(folder, stem) for key, stem in SPLIT_FILES.items()}
            if all(found.values()):
                return found  # type: ignore[return-value]
        if not download_missing:
            where = ", ".join(str(f) for f in folders)
            raise LLSError(
                f"{self.name} files not found in {where}; run `lls data fetch {self.name}` or pass --data-dir"
            )
        return self._download(folders[-1], quiet)

    def _download(self, target: Path, quiet: bool) -> dict[str, Path]:
        paths = {}
        for key, stem in SPLIT_FILES.items():
            existing = _present(target, stem)
            if existing is None:
                name = f"{stem}.gz"
                urls = [m + name for m in self.mirrors]
                existing = download(urls, target / name, md5=self.md5[name], quiet=quiet)
            paths[key] = existing
        return paths

    def fetch(self, data_dir: Path | None = None, *, quiet: bool = False) -> Path:
        paths = self.locate(data_dir, download_missing=True, quiet=quiet)
        return paths["train_images"].parent

    def _load(self, data_dir, *, download, quiet, augment, image_size) -> Dataset:
        paths = self.locate(data_dir, download, quiet)
        payloads = {key: read_idx_bytes(path) for key, path in paths.items()}
        tensors = {key: parse_idx(data, paths[key]) for key, data in payloads.items()}
        splits = {}
        for split in ("train", "test"):
            images, labels = tensors[f"{split}_images"], tensors[f"{split}_labels"]
            count = self.counts[split] if self.counts else len(images)
            if images.dim() != 3 or images.dtype != torch.uint8 or len(images) != count:
                raise LLSError(
                    f"{paths[f'{split}_images']} holds {tuple(images.shape)} {images.dtype} images, "
                    f"not {count} uint8 images; fetch the files again"
                )
            if labels.shape != (count,) or labels.dtype != torch.uint8:
                raise LLSError(
                    f"{paths[f'{split}_labels']} holds {tuple(labels.shape)} {labels.dtype} labels, not one "
                    f"uint8 label for each of the {count} images; fetch the files again"
                )
            if len(labels) and (int(labels.max()) >= len(self.classes) or int(labels.min()) < 0):
                raise LLSError(f"{paths[f'{split}_labels']} holds labels outside 0..{len(self.classes) - 1}")
            splits[split] = Split(images[:, None], labels)
        for key, data in payloads.items():  # last: format and count errors say more than a hash
            expected = self.content_sha256.get(SPLIT_FILES[key])
            if expected is not None and hashlib.sha256(data).hexdigest() != expected:
                raise LLSError(
                    f"{paths[key]} has the right format but the wrong content; delete it and fetch it again"
                )
        return Dataset(
            name=self.name,
            train=splits["train"],
            test=splits["test"],
            num_classes=len(self.classes),
            mean=(self.mean,),
            std=(self.std,),
            source=str(paths["train_images"].parent),
            classes=self.classes,
        )


def _present(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


MNIST = IdxSource(
    name="mnist",
    augmentations={"standard": Augment(crop_padding=4), "none": Augment()},
    default_augment="standard",
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    md5={
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    mean=0.5,
    std=0.5,
    system_dirs=("/usr/share/datasets/mnist",),
)

FASHION_MNIST = IdxSource(
    name="fashion-mnist",
    augmentations={"standard": Augment(crop_padding=4, hflip=True), "none": Augment()},
    default_augment="standard",
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    md5={
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    mean=0.286,
    std=0.353,
    classes=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Boot",
    ),
    system_dirs=("/usr/share/datasets/fashion-mnist",),
    # Debian recompresses the files (other .gz bytes), so local files are checked by content.
    content_sha256={
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
)
