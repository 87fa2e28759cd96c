"""Dataset loading: the real shared data, torchvision layout, the embedded default and the errors."""

from __future__ import annotations

import bz2
import gzip
import os
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmerge.data import (
    DATASET_NAMES,
    NORMALIZATION,
    DatasetNotFoundError,
    LabeledImages,
    canonical_name,
    data_root,
    load_dataset,
)
from fedmerge.data import datasets as ds
from fedmerge.data.datasets import CorruptDatasetError
from tests.helpers import SHARED, needs_shared

pytestmark = pytest.mark.usefixtures("tmp_cache")  # conftest.py: a throw-away cache instead of ~/.cache


def pixels(data: LabeledImages, name: str) -> torch.Tensor:
    """Undo the normalisation: [0, 255] pixel values."""
    mean, std = NORMALIZATION[name]
    shape = (1, len(mean), 1, 1)
    return (data.x * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)) * 255


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed uint8 IDX file (MNIST format)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


# -------------------------------------------------------------------------------------------------- real data


@pytest.mark.slow
@needs_shared
def test_mnist_train_and_test():
    train = load_dataset("mnist", root=SHARED)
    test = load_dataset("mnist", train=False, root=SHARED)
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert train.num_classes == 10 and train.name == "mnist"
    assert test.y[0].item() == 7
    assert train.class_counts().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert abs(train.x.mean().item()) < 1e-3 and abs(train.x.std().item() - 1) < 1e-2
    assert abs(pixels(train, "mnist").mean().item() - 33.32) < 0.01


@pytest.mark.slow
@needs_shared
def test_loads_are_independent_copies():
    a = load_dataset("mnist", train=False, root=SHARED)
    a.x.zero_()
    b = load_dataset("mnist", train=False, root=SHARED)
    assert b.x.abs().sum() > 0


@pytest.mark.slow
@needs_shared
def test_fashion_mnist_and_alias():
    test = load_dataset("fmnist", train=False, root=SHARED)
    assert test.name == "fashion-mnist" and test.x.shape == (10000, 1, 28, 28)
    assert test.y[0].item() == 9
    assert test.class_counts().tolist() == [1000] * 10


@pytest.mark.slow
@needs_shared
def test_usps_resized_to_28():
    train = load_dataset("usps", root=SHARED)
    test = load_dataset("usps", train=False, root=SHARED)
    assert train.x.shape == (7291, 1, 28, 28) and test.x.shape == (2007, 1, 28, 28)
    assert train.class_counts().tolist() == [1194, 1005, 731, 658, 652, 556, 664, 645, 542, 644]
    assert test.class_counts().tolist() == [359, 264, 198, 166, 200, 160, 170, 147, 166, 177]
    px = pixels(train, "usps")
    assert px.min() >= -1e-3 and px.max() <= 255 + 1e-3
    # the resize is bilinear from the 16x16 source: shrinking it back is close to the original
    with gzip.open(SHARED / "usps" / "zip.train.gz", "rt") as f:
        first = np.array(f.readline().split()[1:], dtype=np.float32).reshape(16, 16)
    small = torch.nn.functional.interpolate(px[:1] / 255, size=(16, 16), mode="bilinear", antialias=True)
    assert (small[0, 0] - torch.from_numpy((first + 1) / 2)).abs().mean() < 0.08


@pytest.mark.slow
@needs_shared
def test_kmnist_partial_train_set():
    train = load_dataset("kmnist", root=SHARED)
    test = load_dataset("kmnist", train=False, root=SHARED)
    assert len(train) == 7011 and len(test) == 10000
    assert train.x.shape[1:] == (1, 28, 28)
    labels = np.load(SHARED / "kmnist" / "kmnist-train-labels.npz")["arr_0"][:7011]
    assert torch.equal(train.y, torch.from_numpy(labels.astype(np.int64)))


@pytest.mark.slow
@needs_shared
def test_cifar10_subset():
    train = load_dataset("cifar10", root=SHARED)
    test = load_dataset("cifar10", train=False, root=SHARED)
    assert train.x.shape == (4000, 3, 32, 32) and test.x.shape == (1000, 3, 32, 32)
    assert train.y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert test.y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    first = pixels(train, "cifar10")[0].round().flatten()  # channel planes R, G, B as in the binary records
    assert first[:3].tolist() == [59, 43, 50] and first[-3:].tolist() == [140, 84, 72]
    assert pixels(test, "cifar10")[0].round().flatten()[:3].tolist() == [158, 159, 165]


@pytest.mark.slow
@needs_shared
def test_rmnist_is_rotated_mnist():
    mnist = load_dataset("mnist", train=False, root=SHARED)
    r90 = load_dataset("rmnist-90", train=False, root=SHARED)
    assert r90.name == "rmnist-90"
    assert torch.equal(r90.x, torch.rot90(mnist.x, 1, dims=(-2, -1)))
    assert torch.equal(r90.y, mnist.y)
    r45 = load_dataset("rmnist-45", train=False, root=SHARED)
    assert r45.x.shape == mnist.x.shape
    corner = pixels(r45, "mnist")[:, :, 0, 0]  # filled with black background, not a normalised zero
    assert corner.abs().max() < 1e-3
    assert not torch.allclose(r45.x, mnist.x)


@pytest.mark.slow
@needs_shared
def test_shared_layout_is_converted_into_the_cache(tmp_cache: Path):
    load_dataset("mnist", train=False, root=SHARED)
    raw = list(tmp_cache.glob("mnist-*/MNIST/raw/t10k-images-idx3-ubyte"))
    assert len(raw) == 1
    assert not list(tmp_cache.glob(".*tmp*"))  # no half-written conversions left behind


@pytest.mark.slow
@needs_shared
def test_default_search_finds_the_shared_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("FEDMERGE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./data here; the project's ../shared/data is still searched
    assert SHARED.resolve() in ds.data_search_dirs()
    assert len(load_dataset("cifar10", train=False)) == 1000


# ---------------------------------------------------------------------------------------------- fake layouts


def test_torchvision_layout(tmp_path: Path):
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (20, 28, 28)), "t10k": rng.integers(0, 256, (5, 28, 28))}
    labels = {"train": rng.integers(0, 10, 20), "t10k": rng.integers(0, 10, 5)}
    for split in ("train", "t10k"):
        write_idx(tmp_path / "MNIST" / "raw" / f"{split}-images-idx3-ubyte", images[split])
        write_idx(tmp_path / "MNIST" / "raw" / f"{split}-labels-idx1-ubyte", labels[split])
    train = load_dataset("mnist", root=tmp_path, download=False)
    test = load_dataset("mnist", train=False, root=tmp_path)
    assert train.x.shape == (20, 1, 28, 28) and test.x.shape == (5, 1, 28, 28)
    assert train.y.tolist() == labels["train"].tolist() and test.y.tolist() == labels["t10k"].tolist()
    assert torch.allclose(pixels(train, "mnist")[:, 0], torch.from_numpy(images["train"]).float(), atol=1e-3)
    r90 = load_dataset("rmnist-90", root=tmp_path)
    assert torch.equal(r90.x, torch.rot90(train.x, 1, dims=(-2, -1)))


def test_torchvision_layout_usps_and_cifar(tmp_path: Path):
    rng = np.random.default_rng(1)
    values = rng.uniform(-1, 1, (4, 256)).round(4)
    with bz2.open(tmp_path / "usps.t.bz2", "wt") as f:
        for label, row in zip([1, 2, 3, 10], values, strict=True):
            f.write(f"{label} " + " ".join(f"{i}:{v}" for i, v in enumerate(row, start=1)) + "\n")
    usps = load_dataset("usps", train=False, root=tmp_path)
    assert usps.x.shape == (4, 1, 28, 28) and usps.y.tolist() == [0, 1, 2, 9]

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "labels": [0, 5, 9]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ds.CIFAR10_CLASSES}))
    # the official checksums fail for these fake batches, which shows the torchvision class itself is used
    with pytest.raises(RuntimeError, match="corrupted"):
        load_dataset("cifar10", root=tmp_path)


def fake_shared_mnist(root: Path, n_train: int = 12, n_test: int = 4) -> None:
    """A tiny MNIST in the shared layout (gzipped IDX files)."""
    rng = np.random.default_rng(2)
    for split, n in (("train", n_train), ("t10k", n_test)):
        for kind, shape in (("images-idx3", (n, 28, 28)), ("labels-idx1", (n,))):
            plain = root / "plain" / f"{split}-{kind}-ubyte"
            write_idx(plain, rng.integers(0, 10 if kind.startswith("labels") else 256, shape))
            (root / "mnist").mkdir(parents=True, exist_ok=True)
            with gzip.open(root / "mnist" / f"{plain.name}.gz", "wb") as f:
                f.write(plain.read_bytes())


def test_parallel_conversions_are_safe(tmp_path: Path):
    fake_shared_mnist(tmp_path / "data")
    cache = tmp_path / "cache"
    source = ds._SOURCES["mnist"]
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ds._converted_root(source, tmp_path / "data", True, cache)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert sorted(p.name for p in cache.iterdir()) == [results[0].name]
    raw = results[0] / "MNIST" / "raw" / "train-images-idx3-ubyte"
    assert raw.read_bytes() == (tmp_path / "data" / "plain" / raw.name).read_bytes()


def test_torchvision_layout_wins_over_shared_layout(tmp_path: Path):
    fake_shared_mnist(tmp_path, n_train=12)
    for split, n in (("train", 3), ("t10k", 2)):
        write_idx(tmp_path / "MNIST" / "raw" / f"{split}-images-idx3-ubyte", np.zeros((n, 28, 28)))
        write_idx(tmp_path / "MNIST" / "raw" / f"{split}-labels-idx1-ubyte", np.zeros(n))
    assert len(load_dataset("mnist", root=tmp_path)) == 3


# ------------------------------------------------------------------------------------------------ corrupt files


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty conversion cache of this test's own (to see that a failed conversion leaves nothing in it)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDMERGE_CACHE", str(cache))
    return cache


def cache_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_a_truncated_gz_file_is_named_and_leaves_no_cache_entry(tmp_path: Path, fresh_cache: Path):
    fake_shared_mnist(tmp_path / "data")
    gz = tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz"
    whole = gz.read_bytes()
    gz.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CorruptDatasetError, match="truncated or corrupt gzip data") as info:
        load_dataset("mnist", root=tmp_path / "data")
    assert info.value.path == gz and str(gz) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert cache_entries(fresh_cache) == []  # neither a converted entry nor a half-written temporary one
    gz.write_bytes(whole)  # a fixed file is converted afresh
    assert len(load_dataset("mnist", root=tmp_path / "data")) == 12
    assert len(cache_entries(fresh_cache)) == 1


def test_a_gz_file_that_is_not_gzip_is_named(tmp_path: Path, fresh_cache: Path):
    fake_shared_mnist(tmp_path / "data")
    gz = tmp_path / "data" / "mnist" / "t10k-labels-idx1-ubyte.gz"
    gz.write_bytes(b"<html>not found</html>")
    with pytest.raises(CorruptDatasetError, match="BadGzipFile") as info:
        load_dataset("mnist", train=False, root=tmp_path / "data")
    assert info.value.path == gz and cache_entries(fresh_cache) == []


def test_a_whole_gz_of_a_truncated_idx_file_is_named(tmp_path: Path, fresh_cache: Path):
    fake_shared_mnist(tmp_path / "data")
    gz = tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz"
    raw = (tmp_path / "data" / "plain" / "train-images-idx3-ubyte").read_bytes()
    gz.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(CorruptDatasetError, match=r"header \(shape \(12, 28, 28\)\) needs 9424.*truncated") as info:
        load_dataset("mnist", root=tmp_path / "data")
    assert info.value.path == gz and cache_entries(fresh_cache) == []


def test_labels_that_do_not_fit_the_images_are_named(tmp_path: Path, fresh_cache: Path):
    fake_shared_mnist(tmp_path / "data")
    gz = tmp_path / "data" / "mnist" / "t10k-labels-idx1-ubyte.gz"
    plain = tmp_path / "plain-labels"
    write_idx(plain, np.zeros(3))
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(CorruptDatasetError, match=r"shape \(3,\) does not fit the images' \(4, 28, 28\)") as info:
        load_dataset("mnist", train=False, root=tmp_path / "data")
    assert info.value.path == gz and cache_entries(fresh_cache) == []


def test_a_truncated_idx_file_in_torchvision_layout_is_named(tmp_path: Path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 3)):
        write_idx(tmp_path / "MNIST" / "raw" / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / "MNIST" / "raw" / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n))
    images = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-1])
    with pytest.raises(CorruptDatasetError) as info:
        load_dataset("mnist", train=False, root=tmp_path)
    assert info.value.path == images and "truncated" in str(info.value)


def test_truncated_cifar_records_and_bad_usps_lines_are_named(tmp_path: Path, fresh_cache: Path):
    rng = np.random.default_rng(3)
    (tmp_path / "cifar10").mkdir()
    train_bin, test_bin = (
        tmp_path / "cifar10" / "data_batch_1_first4000.bin",
        tmp_path / "cifar10" / "test_batch_first1000.bin",
    )
    train_bin.write_bytes(rng.integers(0, 10, 3 * 3073, dtype=np.uint8).tobytes())
    test_bin.write_bytes(rng.integers(0, 10, 2 * 3073 - 7, dtype=np.uint8).tobytes())
    with pytest.raises(CorruptDatasetError, match="not a whole number of 3073-byte CIFAR records") as info:
        load_dataset("cifar10", root=tmp_path)
    assert info.value.path == test_bin

    (tmp_path / "usps").mkdir()
    good = "3 " + " ".join(["-1.0000"] * 256) + "\n"
    with gzip.open(tmp_path / "usps" / "zip.test.gz", "wt") as f:
        f.write(good + "5 0.5 0.25\n")
    with pytest.raises(CorruptDatasetError, match="line 2: 3 values where a label and 256 pixels") as info:
        load_dataset("usps", train=False, root=tmp_path)
    assert info.value.path == tmp_path / "usps" / "zip.test.gz"
    assert cache_entries(fresh_cache) == []


# -------------------------------------------------------------------------------------- defaults and errors


def test_digits_needs_no_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDMERGE_DATA", str(tmp_path / "nowhere"))
    train = load_dataset("digits")
    test = load_dataset("digits", train=False)
    assert train.x.shape[1:] == (1, 28, 28) and train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert train.name == "digits" and train.num_classes == 10
    assert (train.class_counts() > 130).all() and (test.class_counts() >= 35).all()  # stratified
    assert torch.equal(load_dataset("digits", train=False).y, test.y)  # deterministic split
    assert abs(train.x.mean().item()) < 1e-3 and abs(train.x.std().item() - 1) < 1e-2
    assert not (tmp_path / "nowhere").exists()


def test_missing_data_names_the_files(tmp_path: Path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", root=tmp_path)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte") in message
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in message
    assert "FEDMERGE_DATA" in message and "download=True" in message and "root=" in message
    assert tmp_path.resolve() in info.value.searched
    with pytest.raises(DatasetNotFoundError, match="zip.test.gz"):
        load_dataset("usps", train=False, root=tmp_path)


def test_unknown_names_fail_clearly():
    with pytest.raises(ValueError, match="valid names:.*mnist.*rmnist-<deg>"):
        load_dataset("emnist")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("rmnist-abc")
    assert canonical_name("MNIST") == "mnist" and canonical_name("rmnist--90") == "rmnist--90"
    assert set(DATASET_NAMES) >= {"mnist", "fashion-mnist", "usps", "kmnist", "cifar10", "digits"}


def test_data_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("FEDMERGE_DATA", str(tmp_path))
    assert data_root() == tmp_path
    assert data_root("/elsewhere") == Path("/elsewhere")
    monkeypatch.delenv("FEDMERGE_DATA")
    assert data_root() == Path("data")
    assert os.environ.get("FEDMERGE_CACHE")  # the module fixture keeps ~/.cache out of the tests
