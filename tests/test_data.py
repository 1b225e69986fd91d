"""Dataset readers on tiny files written here in the real formats, and tensor augmentation."""

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

import lls
from lls.data.augment import draw, erase, flip, pad_crop, seeded_generator
from lls.data.base import Augment, Split
from lls.data.download import download
from lls.data.idx import read_idx
from lls.data.loader import TensorLoader
from lls.data.mnist import FASHION_MNIST, SPLIT_FILES, IdxSource

from .idx_files import write_idx

TINY = IdxSource(name="tiny-idx", classes=tuple("abc"), counts=None)


def write_tiny_idx_set(folder: Path, n_train=12, n_test=5, gz=True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 3, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 3, n_test, dtype=np.uint8),
    }
    for key, array in arrays.items():
        write_idx(folder / (SPLIT_FILES[key] + (".gz" if gz else "")), array)
    return arrays


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, suffix, dtype):
    array = (np.arange(2 * 3 * 4) - 7).astype(dtype).reshape(2, 3, 4)
    if dtype == np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / f"x-idx3{suffix}"
    write_idx(path, array)
    np.testing.assert_array_equal(read_idx(path).numpy(), array)


def test_idx_header_bytes_by_hand(tmp_path):
    path = tmp_path / "labels-idx1-ubyte"
    write_idx(path, np.array([7, 2], dtype=np.uint8))
    assert path.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 2])


def test_truncated_idx_is_named(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((4, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(lls.LLSError, match=r"truncated.*delete it and fetch it again"):
        read_idx(path)


def test_bad_magic_and_bad_gzip(tmp_path):
    path = tmp_path / "junk-idx1-ubyte"
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(lls.LLSError, match="not an IDX file"):
        read_idx(path)
    gz = tmp_path / "junk.gz"
    gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 100)[:-12])
    with pytest.raises(lls.LLSError, match="not a valid gzip file"):
        read_idx(gz)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_dataset_from_data_dir(tmp_path, gz):
    arrays = write_tiny_idx_set(tmp_path, gz=gz)
    data = TINY.load(tmp_path, download=False)
    assert data.train.images.shape == (12, 1, 28, 28) and data.test.images.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(data.train.images[:, 0].numpy(), arrays["train_images"])
    np.testing.assert_array_equal(data.test.labels.numpy(), arrays["test_labels"])
    assert data.num_classes == 3 and data.input_shape == (1, 28, 28)


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(lls.LLSError, match="does not exist"):
        TINY.load(tmp_path / "nope", download=False)


def test_missing_files_without_download_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LLS_DATA_DIR", str(tmp_path / "cache"))
    with pytest.raises(lls.LLSError, match="lls data fetch tiny-idx"):
        TINY.load(tmp_path, download=False)


def test_wrong_fashion_mnist_files_are_rejected(tmp_path):
    write_tiny_idx_set(tmp_path)
    with pytest.raises(lls.LLSError, match="not 60000 uint8 images"):
        FASHION_MNIST.load(tmp_path, download=False)


def test_download_verifies_the_checksum_before_the_file_appears(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"x" * 5000)
    good = hashlib.md5(source.read_bytes()).hexdigest()
    dest = tmp_path / "out" / "file.bin"
    with pytest.raises(lls.LLSError, match="checksum mismatch"):
        download([source.as_uri()], dest, md5="0" * 32, quiet=True)
    assert not dest.exists() and not dest.with_name("file.bin.part").exists()
    download(["file:///nonexistent/mirror.bin", source.as_uri()], dest, md5=good, quiet=True)
    assert dest.read_bytes() == source.read_bytes()


def test_a_download_never_replaces_a_link_a_folder_or_a_device(tmp_path):
    """Refused before a byte is fetched (the mirror here would answer): the link, the folder and
    what they point to are left as they were."""
    source = tmp_path / "source.bin"
    source.write_bytes(b"x" * 100)
    good = hashlib.md5(source.read_bytes()).hexdigest()
    kept = tmp_path / "kept.bin"
    kept.write_bytes(b"mine")
    link = tmp_path / "out" / "file.bin"
    link.parent.mkdir()
    link.symlink_to(kept)
    with pytest.raises(lls.LLSError, match="is a symbolic link"):
        download([source.as_uri()], link, md5=good, quiet=True)
    assert link.is_symlink() and kept.read_bytes() == b"mine"
    folder = tmp_path / "out" / "other.bin"
    folder.mkdir()
    with pytest.raises(lls.LLSError, match="is a folder"):
        download([source.as_uri()], folder, md5=good, quiet=True)
    part = tmp_path / "out" / "third.bin.part"
    part.symlink_to(kept)  # the partial file a resume would append to
    with pytest.raises(lls.LLSError, match="is a symbolic link"):
        download([source.as_uri()], tmp_path / "out" / "third.bin", md5=good, quiet=True)
    assert kept.read_bytes() == b"mine" and not (tmp_path / "out" / "third.bin").exists()


def test_digits_dataset(digits):
    assert len(digits.train) + len(digits.test) == 1797
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert digits.train.images.max() == 255


# --- augmentation on tensors -------------------------------------------------------------------


def test_pad_crop_is_a_shifted_window_of_the_zero_padded_image():
    x = torch.arange(3 * 1 * 5 * 5, dtype=torch.uint8).reshape(3, 1, 5, 5)
    position = torch.tensor([[0.0, 0.5, 0.99], [0.99, 0.0, 0.3]])  # (vertical, horizontal) per image
    out = pad_crop(x, 2, position)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    # offsets floor(u * 5) in 0..4: (0, 4), (2, 0), (4, 1)
    for i, (dy, dx) in enumerate([(0, 4), (2, 0), (4, 1)]):
        assert torch.equal(out[i], padded[i, :, dy : dy + 5, dx : dx + 5])


def test_flip_mirrors_where_asked():
    x = torch.arange(2 * 3, dtype=torch.float32).reshape(2, 1, 1, 3)
    out = flip(x, torch.tensor([True, False]))
    assert out[0, 0, 0].tolist() == [2.0, 1.0, 0.0] and out[1, 0, 0].tolist() == [3.0, 4.0, 5.0]


def test_draws_flip_about_half_and_are_reproducible():
    a = draw(4000, Augment(hflip=True), False, seeded_generator("flip"))
    b = draw(4000, Augment(hflip=True), False, seeded_generator("flip"))
    assert torch.equal(a.flip, b.flip) and a.crop is None and a.erase is None
    assert 0.47 < a.flip.float().mean().item() < 0.53


def test_random_erasing_zeroes_one_rectangle_with_probability_p():
    x = torch.ones(2000, 3, 16, 16)
    u = draw(2000, Augment(erasing=0.2), False, seeded_generator("erase")).erase
    out = erase(x, 0.2, u)
    erased = (out == 0).any(dim=(1, 2, 3))
    assert torch.equal(erased, u[0] < 0.2)
    assert 0.17 < erased.float().mean().item() < 0.23
    area = (out[erased] == 0).float().mean(dim=(1, 2, 3))
    assert area.min() > 0 and area.max() <= 0.34 + 0.05
    rows = (out[erased][:, 0] == 0).any(dim=2)  # the zeros form one solid rectangle per image
    cols = (out[erased][:, 0] == 0).any(dim=1)
    assert torch.equal((out[erased][:, 0] == 0).sum((1, 2)), rows.sum(1) * cols.sum(1))


def test_loader_normalises_and_is_deterministic_per_epoch():
    images = torch.randint(0, 256, (50, 1, 6, 6), dtype=torch.uint8)
    split = Split(images, torch.arange(50) % 3)
    plain = TensorLoader(split, 16, mean=(0.3,), std=(0.2,))
    x, y = next(iter(plain))
    torch.testing.assert_close(x, (images[:16].float() / 255 - 0.3) / 0.2)
    assert len(plain) == 4 and torch.equal(y, split.labels[:16])
    loader = TensorLoader(split, 16, mean=(0.3,), std=(0.2,), augment=Augment(2, True), shuffle=True, seed=1)
    first = [b[0] for b in loader.epoch(3)]
    again = [b[0] for b in loader.epoch(3)]
    other = [b[0] for b in loader.epoch(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    resumed = [b[0] for b in loader.epoch(3, start=2)]  # skipping draws, not images, to resume mid-epoch
    assert all(torch.equal(a, b) for a, b in zip(first[2:], resumed, strict=True))
    labels = torch.cat([b[1] for b in loader.epoch(5)])
    assert sorted(labels.tolist()) == sorted(split.labels.tolist())  # a permutation: every image once
