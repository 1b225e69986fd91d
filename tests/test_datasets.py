"""Every dataset reader on tiny files written here in the real on-disk formats; no network."""

import dataclasses
import hashlib
import http.server
import io
import json
import tarfile
import threading
import typing
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lls
from lls.data import DATASETS, make_loader
from lls.data.archive import extract, safe_members
from lls.data.base import Augment, FileSplit
from lls.data.cifar import CIFAR10, CIFAR100
from lls.data.download import download
from lls.data.images import IMAGENETTE, TINYIMAGENET, VWW
from lls.data.loader import decode_image

RNG = np.random.default_rng(0)


# --- CIFAR binary ---------------------------------------------------------------------------------


def cifar_records(n: int, label_bytes: int, classes: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    labels = RNG.integers(0, classes, n, dtype=np.uint8)
    images = RNG.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    rows = [bytes([*([7] * (label_bytes - 1)), labels[i]]) + images[i].tobytes() for i in range(n)]
    return b"".join(rows), labels, images


def write_cifar10(folder: Path, per_batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    all_labels, all_images = [], []
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        raw, labels, images = cifar_records(per_batch, 1, 10)
        (folder / name).write_bytes(raw)
        all_labels.append(labels)
        all_images.append(images)
    return np.concatenate(all_labels), np.concatenate(all_images)


def test_cifar10_binary_records(tmp_path):
    labels, images = write_cifar10(tmp_path / "cifar-10-batches-bin")
    source = dataclasses.replace(CIFAR10, counts={})
    data = source.load(tmp_path, download=False)
    assert data.train.images.shape == (20, 3, 32, 32) and len(data.test) == 4
    assert (data.input_shape, data.num_classes) == CIFAR10.shape()
    np.testing.assert_array_equal(data.train.images.numpy(), images[:20])  # R plane, then G, then B
    np.testing.assert_array_equal(data.test.labels.numpy(), labels[20:])
    assert data.augment == Augment(hflip=True)  # "basic" by default


def test_cifar100_uses_the_fine_label(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    raw, labels, _ = cifar_records(6, 2, 100)
    (folder / "train.bin").write_bytes(raw)
    (folder / "test.bin").write_bytes(raw[: 2 * 3074])
    data = dataclasses.replace(CIFAR100, counts={}).load(tmp_path, download=False, augment="aug")
    np.testing.assert_array_equal(data.train.labels.numpy(), labels)
    assert data.num_classes == 100 and data.augment == Augment(crop_padding=4, hflip=True, erasing=0.2)
    assert (data.input_shape, data.num_classes) == CIFAR100.shape()


def test_cifar_truncated_file_and_standard_counts(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar10(folder)
    with pytest.raises(lls.LLSError, match="holds 20 records instead of 50000"):
        CIFAR10.load(tmp_path, download=False)
    (folder / "data_batch_3.bin").write_bytes((folder / "data_batch_3.bin").read_bytes()[:-10])
    with pytest.raises(lls.LLSError, match=r"data_batch_3.bin is \d+ bytes, not a whole number of 3073-byte"):
        dataclasses.replace(CIFAR10, counts={}).load(tmp_path, download=False)


def test_cifar_missing_names_the_fetch_command(tmp_path):
    with pytest.raises(lls.LLSError, match="lls data fetch cifar100"):
        CIFAR100.load(tmp_path, download=False)
    with pytest.raises(lls.LLSError, match="has no augmentation 'autoaugment'"):
        CIFAR10.augment("autoaugment")


def test_fetch_archive_verifies_and_unpacks(tmp_path):
    staging = tmp_path / "staging"
    write_cifar10(staging / "cifar-10-batches-bin")
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    root = tmp_path / "root"
    root.mkdir()
    source = dataclasses.replace(CIFAR10, counts={}, url=archive.as_uri(), md5=md5)
    where = source.fetch(root, quiet=True)
    assert where == root / "cifar-10-batches-bin" and len(source.load(root, download=False).train) == 20
    assert not (root / "cifar-10-binary.tar.gz").exists()  # the archive is removed once unpacked
    bad = dataclasses.replace(CIFAR10, url=archive.as_uri(), md5="0" * 32)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(lls.LLSError, match="checksum mismatch"):
        bad.fetch(other, quiet=True)
    assert list(other.iterdir()) == []  # nothing unpacked from an archive that failed its check


# --- archives -------------------------------------------------------------------------------------


def make_tar(path: Path, members: list[tuple[str, bytes | None, str | None]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize(
    "members",
    [
        [("../evil.txt", b"x", None)],
        [("/etc/evil", b"x", None)],
        [("data/ok.txt", b"x", None), ("data/../../evil", b"x", None)],
        [("data/link", None, "/etc/passwd")],
    ],
)
def test_unsafe_tar_members_are_refused_before_anything_is_written(tmp_path, members):
    archive = tmp_path / "a.tar"
    make_tar(archive, members)
    target = tmp_path / "out"
    with pytest.raises(lls.LLSError, match=r"unsafe member|link or special file"):
        extract(archive, target)
    assert not target.exists() or not any(target.iterdir())
    assert not (tmp_path / "evil.txt").exists()


def test_unsafe_zip_member_is_refused(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("tiny/ok.txt", "x")
        z.writestr("../../escape.txt", "x")
    with pytest.raises(lls.LLSError, match="unsafe member"):
        safe_members(archive)


def test_safe_archive_unpacks(tmp_path):
    archive = tmp_path / "a.tar"
    make_tar(archive, [("data/a.txt", b"alpha", None), ("data/sub/b.txt", b"beta", None)])
    extract(archive, tmp_path / "out")
    assert (tmp_path / "out/data/sub/b.txt").read_bytes() == b"beta"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["data"]  # no staging folder left


# --- resumable download over HTTP -----------------------------------------------------------------


class RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    requests: typing.ClassVar[list] = []

    def do_GET(self):
        start = 0
        header = self.headers.get("Range")
        self.requests.append(header)
        if header:
            start = int(header.split("=")[1].split("-")[0])
            self.send_response(206)
        else:
            self.send_response(200)
        body = self.payload[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_download_resumes_a_partial_file_with_a_range_request(tmp_path):
    payload = RNG.integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    RangeHandler.payload, RangeHandler.requests = payload, []
    server = http.server.HTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        dest = tmp_path / "file.bin"
        dest.with_name("file.bin.part").write_bytes(payload[:100_000])  # an interrupted earlier download
        url = f"http://127.0.0.1:{server.server_port}/file.bin"
        download([url], dest, md5=hashlib.md5(payload).hexdigest(), quiet=True)
    finally:
        server.shutdown()
    assert dest.read_bytes() == payload
    assert RangeHandler.requests == ["bytes=100000-"]


# --- image files ----------------------------------------------------------------------------------


def write_image(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8) + np.array(color, dtype=np.uint8)
    array[0, 0] = (255 - color[0], 0, 0)  # a marker pixel at the top-left corner
    Image.fromarray(array).save(path)


def test_decode_resizes_the_shorter_side_and_crops(tmp_path):
    path = tmp_path / "wide.png"
    write_image(path, (200, 100), (10, 20, 30))
    centre = decode_image(path, 50, 40, None)
    assert centre.shape == (3, 40, 40) and centre[:, 20, 20].tolist() == [10, 20, 30]
    corner = decode_image(path, None, 40, [0.0, 0.0])  # no resize: a crop at the top-left corner
    assert corner[0, 0, 0] == 245


def test_imagefolder_with_train_and_val(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for c, color in (("cat", (200, 0, 0)), ("dog", (0, 200, 0))):
            for i in range(n):
                write_image(tmp_path / split / c / f"{i}.png", (40, 30), color)
    data = lls.load_dataset("imagefolder", tmp_path, image_size=16)
    assert data.classes == ("cat", "dog") and len(data.train) == 6 and len(data.test) == 4
    assert data.input_shape == (3, 16, 16)
    loader = make_loader(data.test, 3, mean=data.mean, std=data.std)
    x, y = next(iter(loader))
    assert x.shape == (3, 3, 16, 16) and y.tolist() == [0, 0, 1]
    red = (200 / 255 - data.mean[0]) / data.std[0]
    assert x[0, 0, 8, 8].item() == pytest.approx(red, abs=1e-5)


def test_holdout_of_a_streamed_set_moves_files_and_drops_random_crops(tmp_path):
    for c, color in (("cat", (200, 0, 0)), ("dog", (0, 200, 0))):
        for i in range(5):
            write_image(tmp_path / "train" / c / f"{i}.png", (40, 30), color)
            write_image(tmp_path / "val" / c / f"{i}.png", (40, 30), color)
    data = lls.load_dataset("imagefolder", tmp_path, image_size=16)
    held = data.hold_out(4)
    assert len(held.train) == 6 and len(held.test) == 4
    assert not set(held.train.files) & set(held.test.files)
    assert set(held.train.files) | set(held.test.files) == set(data.train.files)
    for split in (held.train, held.test):  # every file keeps its own label
        assert [
            data.train.labels[data.train.files.index(f)].item() for f in split.files
        ] == split.labels.tolist()
    assert held.train.random_crop == data.train.random_crop and not held.test.random_crop


def test_imagefolder_without_split_holds_out_every_class(tmp_path):
    for c in ("a", "b", "c"):
        for i in range(20):
            write_image(tmp_path / c / f"{i}.jpg", (20, 20), (i, i, i))
    data = lls.load_dataset("imagefolder", tmp_path)
    assert torch.bincount(data.test.labels).tolist() == [2, 2, 2]
    assert not set(data.train.files) & set(data.test.files)
    again = lls.load_dataset("imagefolder", tmp_path)
    assert again.test.files == data.test.files  # the split does not move between runs


def test_imagefolder_errors(tmp_path):
    with pytest.raises(lls.LLSError, match="needs --data-dir"):
        lls.load_dataset("imagefolder")
    (tmp_path / "only").mkdir()
    write_image(tmp_path / "only" / "x.png", (8, 8), (1, 2, 3))
    write_image(tmp_path / "only" / "y.png", (8, 8), (1, 2, 3))
    with pytest.raises(lls.LLSError, match="a classifier needs at least 2"):
        lls.load_dataset("imagefolder", tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "z.png").write_bytes(b"not a png")
    (tmp_path / "broken" / "w.png").write_bytes(b"not a png")
    data = lls.load_dataset("imagefolder", tmp_path)
    with pytest.raises(lls.LLSError, match="cannot decode image"):
        list(make_loader(data.train, 8, mean=data.mean, std=data.std))


def test_imagenette_layout_and_presets(tmp_path):
    wnids = [f"n0{i}" for i in range(10)]
    for split in ("train", "val"):
        for w in wnids:
            write_image(tmp_path / "imagenette2-160" / split / w / "a.JPEG", (213, 160), (5, 5, 5))
    source = dataclasses.replace(IMAGENETTE, counts=None)
    data = source.load(tmp_path, download=False)
    assert data.input_shape == (3, 128, 128) and data.classes == tuple(wnids)
    assert (data.input_shape, data.num_classes) == IMAGENETTE.shape()
    assert (data.train.resize, data.train.random_crop, data.test.random_crop) == (160, True, False)
    assert data.augment == Augment(hflip=True, erasing=0.2)
    basic = source.load(tmp_path, download=False, augment="basic")
    assert basic.train.resize == 132 and basic.augment == Augment(hflip=True)
    with pytest.raises(lls.LLSError, match="expected 9469"):
        IMAGENETTE.load(tmp_path, download=False)


def test_tinyimagenet_reads_val_labels_from_the_annotations_file(tmp_path):
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]  # classes are numbered in sorted order
    (base).mkdir()
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        for i in range(2):
            write_image(base / "train" / w / "images" / f"{w}_{i}.JPEG", (64, 64), (1, 1, 1))
    lines = []
    for i, w in enumerate(["n03", "n01", "n02", "n03"]):
        write_image(base / "val" / "images" / f"val_{i}.JPEG", (64, 64), (2, 2, 2))
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    data = dataclasses.replace(TINYIMAGENET, counts=None).load(tmp_path, download=False)
    assert data.num_classes == 3 and data.test.labels.tolist() == [2, 0, 1, 2]
    assert data.train.labels.tolist() == [0, 0, 1, 1, 2, 2] and data.input_shape == (3, 64, 64)
    (base / "val" / "images" / "val_2.JPEG").unlink()
    with pytest.raises(lls.LLSError, match=r"1 validation images listed .* are missing"):
        dataclasses.replace(TINYIMAGENET, counts=None).load(tmp_path, download=False)


def test_vww_labels_from_coco_style_annotations(tmp_path):
    images = [
        {"id": 3, "file_name": "c.jpg"},
        {"id": 1, "file_name": "a.jpg"},
        {"id": 2, "file_name": "b.jpg"},
    ]
    annotations = [{"image_id": 1, "category_id": 1}, {"image_id": 1, "category_id": 1}]
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        write_image(tmp_path / "all2014" / name, (150, 140), (9, 9, 9))
    (tmp_path / "annotations").mkdir()
    for split in ("train", "val"):
        content = {"images": images, "annotations": annotations}
        (tmp_path / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    data = lls.load_dataset("vww", tmp_path)
    assert [f.name for f in data.train.files] == ["a.jpg", "b.jpg", "c.jpg"]  # by image id
    assert data.train.labels.tolist() == [1, 0, 0] and data.num_classes == 2
    assert data.input_shape == (3, 128, 128) and data.train.resize == 132
    with pytest.raises(lls.LLSError, match="no public download"):
        VWW.fetch(tmp_path)
    (tmp_path / "annotations" / "instances_val.json").write_text("{oops")
    with pytest.raises(lls.LLSError, match="not a Visual Wake Words annotation file"):
        lls.load_dataset("vww", tmp_path)


def test_stream_loader_is_deterministic_and_matches_direct_decoding(tmp_path):
    files = []
    for i in range(10):
        path = tmp_path / f"{i}.png"
        write_image(path, (24 + i, 20), (10 * i, 5 * i, 3 * i))
        files.append(path)
    split = FileSplit(files, torch.arange(10) % 2, size=16, resize=18, random_crop=True)
    options = {"mean": (0.0,) * 3, "std": (1 / 255,) * 3, "augment": Augment(hflip=True), "shuffle": True}
    loader = make_loader(split, 4, seed=3, workers=2, **options)
    first = list(loader.epoch(1))
    second = list(loader.epoch(1))
    assert [len(y) for _, y in first] == [4, 4, 2]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True))
    plan = list(loader.plan(1, "train"))
    index, draws = plan[0]
    expected = np.stack(
        [
            decode_image(files[i], 18, 16, c)
            for i, c in zip(index.tolist(), draws.crop.T.tolist(), strict=True)
        ]
    )
    expected = torch.from_numpy(expected).float()
    expected = torch.where(draws.flip[:, None, None, None], expected.flip(3), expected)
    torch.testing.assert_close(first[0][0], expected)
    resumed = list(loader.epoch(1, start=1))
    assert torch.equal(resumed[0][0], first[1][0])


def test_every_registered_dataset_has_a_reader_test():
    tested = {"mnist", "fashion-mnist", "digits", "cifar10", "cifar100", "imagenette", "tinyimagenet", "vww"}
    assert set(DATASETS.names()) == tested | {"imagefolder"}


def test_declared_shapes_are_what_the_readers_give(digits):
    from lls.data import dataset_shape

    assert dataset_shape("digits") == (digits.input_shape, digits.num_classes)
    assert dataset_shape("imagefolder") is None  # its shape is the user's
    assert all(dataset_shape(name) is not None for name in DATASETS.names() if name != "imagefolder")
