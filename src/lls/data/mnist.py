"""MNIST and Fashion-MNIST from their standard IDX files.

Lookup order: ``data_dir`` (``--data-dir``), then the system folder of a distribution package
(Debian's ``dataset-fashion-mnist`` installs ``/usr/share/datasets/fashion-mnist``), then the cache
folder, then a download from the canonical address with an md5 check of every file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LLSError
from .base import Augment, Dataset, Split, default_data_root
from .download import download
from .idx import parse_idx, read_idx_bytes

SPLIT_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
STANDARD_COUNTS = {"train": 60_000, "test": 10_000}


@dataclass(frozen=True)
class IdxDataset:
    name: str
    mirrors: tuple[str, ...]  # base addresses, tried in order
    md5: dict[str, str]  # of the canonical .gz files, checked on download
    mean: float
    std: float
    augment: Augment
    classes: tuple[str, ...]
    system_dirs: tuple[str, ...] = ()
    content_sha256: dict[str, str] = field(default_factory=dict)  # of the decompressed payloads
    counts: dict[str, int] | None = field(default_factory=lambda: dict(STANDARD_COUNTS))  # None: any


MNIST = IdxDataset(
    name="mnist",
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    md5={
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    mean=0.5,
    std=0.5,
    augment=Augment(crop_padding=4),
    classes=tuple(str(d) for d in range(10)),
    system_dirs=("/usr/share/datasets/mnist",),
)

FASHION_MNIST = IdxDataset(
    name="fashion-mnist",
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    md5={
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    mean=0.286,
    std=0.353,
    augment=Augment(crop_padding=4, hflip=True),
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


def _present(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def locate(
    spec: IdxDataset, data_dir: Path | None, download_missing: bool, quiet: bool = False
) -> dict[str, Path]:
    """Paths of the four IDX files, downloading them if allowed and found nowhere."""
    if data_dir is not None and not data_dir.is_dir():
        raise LLSError(
            f"--data-dir {data_dir} does not exist; create it (files are downloaded into it) "
            f"or point it at the folder holding {SPLIT_FILES['train_images']}.gz"
        )
    folders = [data_dir] if data_dir is not None else []
    folders += [Path(d) for d in spec.system_dirs]
    cache = default_data_root() / spec.name
    folders.append(cache)
    for folder in folders:
        found = {key: _present(folder, stem) for key, stem in SPLIT_FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    if not download_missing:
        where = ", ".join(str(f) for f in folders)
        raise LLSError(
            f"{spec.name} files not found in {where}; run `lls data fetch {spec.name}` or pass --data-dir"
        )
    target = data_dir if data_dir is not None else cache
    paths = {}
    for key, stem in SPLIT_FILES.items():
        existing = _present(target, stem)
        if existing is None:
            name = f"{stem}.gz"
            existing = download(
                [m + name for m in spec.mirrors], target / name, md5=spec.md5[name], quiet=quiet
            )
        paths[key] = existing
    return paths


def load_idx_dataset(
    spec: IdxDataset, data_dir: Path | None = None, download_missing: bool = True, quiet: bool = False
) -> Dataset:
    paths = locate(spec, data_dir, download_missing, quiet)
    payloads = {key: read_idx_bytes(path) for key, path in paths.items()}
    tensors = {key: parse_idx(data, paths[key]) for key, data in payloads.items()}
    splits = {}
    for split in ("train", "test"):
        images, labels = tensors[f"{split}_images"], tensors[f"{split}_labels"]
        count = spec.counts[split] if spec.counts else len(images)
        if (
            images.dim() != 3
            or images.dtype != torch.uint8
            or len(images) != count
            or labels.shape != (count,)
        ):
            raise LLSError(
                f"{paths[f'{split}_images']} holds {tuple(images.shape)} {images.dtype} images and "
                f"{tuple(labels.shape)} labels, not {count} uint8 images with a label each; "
                "fetch the files again"
            )
        if int(labels.max()) >= len(spec.classes) or int(labels.min()) < 0:
            raise LLSError(f"{paths[f'{split}_labels']} holds labels outside 0..{len(spec.classes) - 1}")
        splits[split] = Split(images[:, None], labels)
    for key, data in payloads.items():  # last: format and count errors say more than a hash
        expected = spec.content_sha256.get(SPLIT_FILES[key])
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise LLSError(
                f"{paths[key]} has the right format but the wrong content; delete it and fetch it again"
            )
    return Dataset(
        name=spec.name,
        train=splits["train"],
        test=splits["test"],
        num_classes=len(spec.classes),
        mean=(spec.mean,),
        std=(spec.std,),
        augment=spec.augment,
        source=str(paths["train_images"].parent),
    )
