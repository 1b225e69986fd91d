"""Datasets stored as image files, streamed from disk: Imagenette, TinyImageNet, Visual Wake Words
and any ``root/class/image`` tree (``imagefolder``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..errors import LLSError
from .base import IMAGENET_MEAN, IMAGENET_STD, Augment, Dataset, FileSplit, choose
from .download import fetch_archive
from .source import Source

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
HOLDOUT_FRACTION = 0.1  # test share of an imagefolder tree without train/ and val/ folders


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def class_tree(folder: Path) -> tuple[list[str], list[Path], list[int]]:
    """``folder/<class>/**/image`` -> (sorted class names, files, labels)."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for label, name in enumerate(classes):
        found = list_images(folder / name)
        files += found
        labels += [label] * len(found)
    return classes, files, labels


def check_count(name: str, split: str, found: int, expected: int | None, where: Path) -> None:
    if found == 0:
        raise LLSError(
            f"no {split} images of {name} under {where}; check --data-dir or run `lls data fetch {name}`"
        )
    if expected is not None and found != expected:
        raise LLSError(
            f"{name} {split} has {found} images under {where}, expected {expected}; the copy is incomplete: "
            f"delete it and run `lls data fetch {name}`"
        )


@dataclass
class FileSource(Source):
    """Shared resize / crop presets of the file-based sets (``resize`` then ``size`` crop)."""

    size: int = 128
    resize: dict[str, int | None] | None = None  # augmentation name -> shorter side before cropping
    random_crop: bool = True
    num_classes: int | None = None  # None: as many as the user's folder has

    def shape(self):
        return None if self.num_classes is None else ((3, self.size, self.size), self.num_classes)

    def splits(
        self,
        train: tuple[list[Path], list[int]],
        test: tuple[list[Path], list[int]],
        augment: str | None,
        size: int,
    ) -> tuple[FileSplit, FileSplit]:
        name = augment or self.default_augment
        resize = (self.resize or {}).get(name)
        return (
            FileSplit(train[0], torch.tensor(train[1]), size, resize, random_crop=self.random_crop),
            FileSplit(test[0], torch.tensor(test[1]), size, resize, random_crop=False),
        )


@dataclass
class ImagenetteSource(FileSource):
    folder: str = "imagenette2-160"
    url: str = "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz"
    md5: str = "e793b78cc4c9e9a4ccc0c1155377a412"
    counts: tuple[int, int] | None = (9469, 3925)

    def base(self, data_dir: Path | None) -> Path:
        root = self.root(data_dir)
        return root if (root / "train").is_dir() and (root / "val").is_dir() else root / self.folder

    def fetch(self, data_dir: Path | None = None, *, quiet: bool = False) -> Path:
        if not (self.base(data_dir) / "train").is_dir():
            fetch_archive([self.url], self.md5, self.root(data_dir), quiet=quiet)
        return self.base(data_dir)

    def _load(self, data_dir, *, download, quiet, augment, image_size) -> Dataset:
        base = self.base(data_dir)
        if not (base / "train").is_dir():
            if not download:
                raise LLSError(
                    f"imagenette not found at {base}; run `lls data fetch imagenette` or pass --data-dir"
                )
            base = self.fetch(data_dir, quiet=quiet)
        classes, train_files, train_labels = class_tree(base / "train")
        test_classes, test_files, test_labels = class_tree(base / "val")
        if classes != test_classes or len(classes) != 10:
            raise LLSError(f"{base} must hold the same 10 class folders in train/ and val/")
        expected = self.counts or (None, None)
        check_count(self.name, "train", len(train_files), expected[0], base / "train")
        check_count(self.name, "val", len(test_files), expected[1], base / "val")
        train, test = self.splits((train_files, train_labels), (test_files, test_labels), augment, self.size)
        return Dataset(
            self.name, train, test, 10, IMAGENET_MEAN, IMAGENET_STD, source=str(base), classes=tuple(classes)
        )


@dataclass
class TinyImageNetSource(FileSource):
    folder: str = "tiny-imagenet-200"
    url: str = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
    md5: str = "90528d7ca1a48142e341f4ef8d21d0de"
    counts: tuple[int, int] | None = (100_000, 10_000)

    def base(self, data_dir: Path | None) -> Path:
        root = self.root(data_dir)
        return root if (root / "wnids.txt").is_file() else root / self.folder

    def fetch(self, data_dir: Path | None = None, *, quiet: bool = False) -> Path:
        if not (self.base(data_dir) / "wnids.txt").is_file():
            fetch_archive([self.url], self.md5, self.root(data_dir), quiet=quiet)
        return self.base(data_dir)

    def _load(self, data_dir, *, download, quiet, augment, image_size) -> Dataset:
        base = self.base(data_dir)
        if not (base / "wnids.txt").is_file():
            if not download:
                raise LLSError(
                    f"tinyimagenet not found at {base}; run `lls data fetch tinyimagenet` or pass --data-dir"
                )
            base = self.fetch(data_dir, quiet=quiet)
        wnids = sorted(line.strip() for line in (base / "wnids.txt").read_text().splitlines() if line.strip())
        index = {wnid: i for i, wnid in enumerate(wnids)}
        train_files, train_labels = [], []
        for wnid in wnids:
            found = list_images(base / "train" / wnid / "images")
            train_files += found
            train_labels += [index[wnid]] * len(found)
        annotations = base / "val" / "val_annotations.txt"
        if not annotations.is_file():
            raise LLSError(f"{annotations} is missing; the tinyimagenet copy is incomplete: fetch it again")
        test_files, test_labels = [], []
        for number, line in enumerate(annotations.read_text().splitlines(), start=1):
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise LLSError(f"{annotations} line {number} does not name an image and a known class")
            test_files.append(base / "val" / "images" / fields[0])
            test_labels.append(index[fields[1]])
        missing = [f for f in test_files if not f.is_file()]
        if missing:
            raise LLSError(
                f"{len(missing)} validation images listed in {annotations} are missing, e.g. {missing[0]}"
            )
        expected = self.counts or (None, None)
        check_count(self.name, "train", len(train_files), expected[0], base / "train")
        check_count(self.name, "val", len(test_files), expected[1], base / "val")
        train, test = self.splits((train_files, train_labels), (test_files, test_labels), augment, self.size)
        return Dataset(
            self.name,
            train,
            test,
            len(wnids),
            IMAGENET_MEAN,
            IMAGENET_STD,
            source=str(base),
            classes=tuple(wnids),
        )


@dataclass
class VWWSource(FileSource):
    """Visual Wake Words: COCO 2014 images in ``all2014/`` and pyvww's annotation files.

    ``annotations/instances_train.json`` and ``instances_val.json`` are COCO-style files: an image's
    label is the ``category_id`` of its first annotation (1: person), or 0 if it has none.
    """

    images: str = "all2014"
    annotation_files: tuple[str, str] = ("annotations/instances_train.json", "annotations/instances_val.json")

    def read_annotations(self, path: Path, folder: Path) -> tuple[list[Path], list[int]]:
        try:
            content = json.loads(path.read_text())
            images = {image["id"]: image["file_name"] for image in content["images"]}
            first: dict[int, int] = {}
            for annotation in content.get("annotations", []):
                first.setdefault(annotation["image_id"], int(annotation["category_id"]))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise LLSError(
                f"{path} is not a Visual Wake Words annotation file ({error}); rebuild it with pyvww"
            ) from None
        ids = sorted(images)
        labels = [first.get(i, 0) for i in ids]
        if set(labels) - {0, 1}:
            raise LLSError(f"{path} has category ids other than 0 and 1: build it with pyvww's person filter")
        return [folder / images[i] for i in ids], labels

    def _load(self, data_dir, *, download, quiet, augment, image_size) -> Dataset:
        root = self.root(data_dir)
        folder = root / self.images
        paths = [root / name for name in self.annotation_files]
        for path in (folder, *paths):
            if not path.exists():
                raise LLSError(
                    f"{path} is missing; vww must be built from COCO 2014 with pyvww (see docs/datasets.md) "
                    "and passed with --data-dir"
                )
        train, test = (self.read_annotations(path, folder) for path in paths)
        check_count(self.name, "train", len(train[0]), None, paths[0])
        check_count(self.name, "val", len(test[0]), None, paths[1])
        train_split, test_split = self.splits(train, test, augment, self.size)
        return Dataset(
            self.name,
            train_split,
            test_split,
            2,
            IMAGENET_MEAN,
            IMAGENET_STD,
            source=str(root),
            classes=("no person", "person"),
        )


@dataclass
class ImageFolderSource(FileSource):
    """Any ``root/<class>/<image>`` tree; ``root/train`` + ``root/val`` (or ``test``) when present,
    else a fixed, stratified 10 % of every class is held out for testing."""

    takes_image_size: ClassVar[bool] = True

    def _load(self, data_dir, *, download, quiet, augment, image_size) -> Dataset:
        if data_dir is None:
            raise LLSError("imagefolder needs --data-dir pointing at a root/<class>/<image> tree")
        root = self.root(data_dir)
        size = image_size or self.size
        test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
        if (root / "train").is_dir() and test_dir is not None:
            classes, train_files, train_labels = class_tree(root / "train")
            test_classes, test_files, test_labels = class_tree(test_dir)
            if classes != test_classes:
                raise LLSError(f"{root}/train and {test_dir} must hold the same class folders")
        else:
            classes, files, labels = class_tree(root)
            train_files, train_labels, test_files, test_labels = holdout(files, labels)
        if len(classes) < 2:
            raise LLSError(f"{root} holds {len(classes)} class folder(s); a classifier needs at least 2")
        check_count(self.name, "train", len(train_files), None, root)
        check_count(self.name, "test", len(test_files), None, root)
        train, test = self.splits((train_files, train_labels), (test_files, test_labels), augment, size)
        train.resize = test.resize = size  # shorter side to the image size, then a square crop
        return Dataset(
            self.name,
            train,
            test,
            len(classes),
            IMAGENET_MEAN,
            IMAGENET_STD,
            source=str(root),
            classes=tuple(classes),
        )


def holdout(files: list[Path], labels: list[int]) -> tuple[list[Path], list[int], list[Path], list[int]]:
    """Split off a fixed share of every class (seeded, independent of the run's seed)."""
    by_class: dict[int, list[Path]] = {}
    for f, label in zip(files, labels, strict=True):
        by_class.setdefault(label, []).append(f)
    train_f, train_l, test_f, test_l = [], [], [], []
    for label, members in sorted(by_class.items()):
        n_test = max(1, round(len(members) * HOLDOUT_FRACTION)) if len(members) > 1 else 0
        keep, held = choose(len(members), n_test, "imagefolder-holdout", label)
        train_f += [members[i] for i in keep.tolist()]
        test_f += [members[i] for i in held.tolist()]
        train_l += [label] * len(keep)
        test_l += [label] * len(held)
    return train_f, train_l, test_f, test_l


FILE_AUGMENT = Augment(hflip=True, erasing=0.2)

IMAGENETTE = ImagenetteSource(
    name="imagenette",
    num_classes=10,
    augmentations={"aug": FILE_AUGMENT, "basic": Augment(hflip=True), "none": Augment()},
    default_augment="aug",
    size=128,
    resize={"aug": 160, "basic": 132, "none": 160},
)
TINYIMAGENET = TinyImageNetSource(
    name="tinyimagenet",
    num_classes=200,
    augmentations={"aug": FILE_AUGMENT, "none": Augment()},
    default_augment="aug",
    size=64,
    random_crop=False,
)
VWW = VWWSource(
    name="vww",
    num_classes=2,
    augmentations={"standard": Augment(hflip=True), "none": Augment()},
    default_augment="standard",
    size=128,
    resize={"standard": 132, "none": 132},
)
IMAGEFOLDER = ImageFolderSource(
    name="imagefolder",
    augmentations={"standard": Augment(hflip=True), "none": Augment()},
    default_augment="standard",
    size=64,
)
