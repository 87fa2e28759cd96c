"""Datasets by name, loaded through torchvision's dataset classes into normalised ``LabeledImages``.

Names: ``digits`` (the embedded default: scikit-learn's bundled 8x8 digits, works offline anywhere), ``mnist``,
``fashion-mnist`` (alias ``fmnist``), ``kmnist``, ``usps`` (16x16, resized to 28x28), ``cifar10`` and
``rmnist-<deg>`` (MNIST with every image rotated by ``deg`` degrees counter-clockwise).

Where the files are looked for (see :func:`data_search_dirs`): the ``root`` argument, else ``$FEDMERGE_DATA``, else
``./data`` plus the project's ``../shared/data``. Two layouts are understood in each directory:

1. torchvision's own layout (``MNIST/raw/...``, ``FashionMNIST/raw``, ``KMNIST/raw``, ``usps.bz2``/``usps.t.bz2``,
   ``cifar-10-batches-py/``): loaded by the torchvision class directly, honouring ``download``.
2. the read-only shared layout (``mnist/*.gz``, ``fashion_mnist/*.gz``, ``kmnist/*first7011*``, ``usps/zip.*.gz``,
   ``cifar10/*.bin``): converted once into torchvision layout under ``$FEDMERGE_CACHE`` (default
   ``~/.cache/fedmerge/torchvision``; written atomically, safe for parallel processes), then loaded from there.

Decoded tensors are cached in-process; :func:`load_dataset` returns fresh copies, so callers may mutate them.

A file that is there but cannot be read (a truncated or corrupt gzip, an IDX file shorter than its header says,
CIFAR records of the wrong size, bad USPS lines) raises :class:`CorruptDatasetError` naming the file and what is
wrong with it; a conversion that fails leaves nothing in the cache.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import os
import pickle
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedmerge.data.images import LabeledImages

# torchvision (about 2.5 s to import) and scikit-learn are imported lazily, where they are used, so that
# ``import fedmerge.data`` stays cheap for modules that only need ``LabeledImages``.

DATASET_NAMES: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "kmnist", "usps", "cifar10")
"""Fixed dataset names; ``rmnist-<deg>`` (any integer ``deg``) is accepted too."""

ALIASES: dict[str, str] = {"fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "cifar-10": "cifar10"}

NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "kmnist": ((0.1918,), (0.3483,)),
    "usps": ((0.2540,), (0.3518,)),  # train set after the 28x28 bilinear resize
    "digits": ((0.3058,), (0.3251,)),  # train split after the 28x28 bilinear resize
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
"""Per-dataset (mean, std) per channel of the [0, 1] pixel values; ``rmnist-*`` uses MNIST's."""

_RMNIST = re.compile(r"^rmnist-(-?\d+)$")
_CACHE_SIZE = 12


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are in none of the searched directories (and ``download`` was False)."""

    def __init__(self, name: str, train: bool, searched: list[Path], missing: list[Path]) -> None:
        self.name = name
        self.train = train
        self.searched = searched
        self.missing = missing
        split = "train" if train else "test"
        lines = [f"dataset {name!r} ({split} split) not found and download=False.", "Directories searched:"]
        lines += [f"  {d}" for d in searched]
        lines.append("Missing files (either layout in any one directory would do):")
        lines += [f"  {p}" for p in missing]
        lines.append(
            "Fix: set FEDMERGE_DATA=/path/to/data, pass root=/path/to/data, or pass download=True (needs internet) "
            "to fetch it with torchvision. The 'digits' dataset needs no files."
        )
        super().__init__("\n".join(lines))


class CorruptDatasetError(ValueError):
    """A dataset file is there but cannot be read: truncated, corrupt, or not in the format its name says.

    ``path`` is the file (or, for a converted copy in the cache, its folder) and ``problem`` what is wrong with it.
    """

    def __init__(self, path: Path, problem: str, fix: str = "") -> None:
        self.path = Path(path)
        self.problem = problem
        fix = fix or "replace it with a good copy (or delete it and pass download=True)"
        super().__init__(f"corrupt dataset file {self.path}: {problem}; {fix}")


_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)
"""What reading a truncated or corrupt gzip stream raises."""
_READ_ERRORS = (EOFError, zlib.error, OSError, ValueError, AssertionError, IndexError, KeyError, pickle.PickleError)
"""What torchvision's readers raise on truncated or malformed files (checked files only: not FileNotFoundError)."""


# ----------------------------------------------------------------------------------------------------------- paths


def data_root(root: str | Path | None = None) -> Path:
    """The data root: ``root`` if given, else ``$FEDMERGE_DATA``, else ``./data``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("FEDMERGE_DATA")
    return Path(env).expanduser() if env else Path("data")


def data_search_dirs(root: str | Path | None = None) -> list[Path]:
    """Directories searched for data files, in order (absolute).

    Only :func:`data_root` when ``root`` or ``$FEDMERGE_DATA`` is given; otherwise ``./data``, then, where they exist,
    ``../shared/data`` relative to the working directory and to this checkout of the project.
    """
    dirs = [data_root(root)]
    if root is None and not os.environ.get("FEDMERGE_DATA"):
        fallbacks = [Path("..") / "shared" / "data", Path(__file__).resolve().parents[3] / "shared" / "data"]
        dirs += [d for d in fallbacks if d.is_dir()]
    unique: list[Path] = []
    for d in dirs:
        d = d.resolve()
        if d not in unique:
            unique.append(d)
    return unique


def cache_dir() -> Path:
    """Writable folder for converted data: ``$FEDMERGE_CACHE``, else ``~/.cache/fedmerge/torchvision``."""
    env = os.environ.get("FEDMERGE_CACHE")
    path = Path(env) if env else Path("~/.cache/fedmerge/torchvision")
    return path.expanduser().resolve()


# ------------------------------------------------------------------------------------------ conversions (shared)


def _gunzip(src: Path, dst: Path) -> None:
    """Decompress ``src`` into ``dst``; CorruptDatasetError naming ``src`` when it is not a whole gzip file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(src, "rb") as fin, open(dst, "wb") as fout:
        while True:
            try:
                chunk = fin.read(1 << 22)
            except _GZIP_ERRORS as err:
                raise CorruptDatasetError(src, f"truncated or corrupt gzip data ({type(err).__name__}: {err})") from err
            if not chunk:
                break
            fout.write(chunk)


_IDX_ELEMENT_BYTES = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}


def _idx_shape(path: Path, name: Path | None = None) -> tuple[int, ...]:
    """The shape an IDX file (MNIST format) declares, checked against its size; CorruptDatasetError naming
    ``name`` (default ``path``: e.g. the .gz the file was decompressed from) when the two disagree."""
    name = name or path
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[0] or head[1] or head[2] not in _IDX_ELEMENT_BYTES or not 1 <= head[3] <= 3:
            raise CorruptDatasetError(name, f"not an IDX file (it starts with bytes {head.hex() or 'none'})")
        dims_bytes = f.read(4 * head[3])
    if len(dims_bytes) < 4 * head[3]:
        raise CorruptDatasetError(name, f"its IDX header is cut short ({size} bytes in all)")
    dims = tuple(int.from_bytes(dims_bytes[4 * i : 4 * i + 4], "big") for i in range(head[3]))
    expected = 4 + 4 * len(dims) + int(np.prod(dims)) * _IDX_ELEMENT_BYTES[head[2]]
    if size != expected:
        raise CorruptDatasetError(
            name, f"its IDX data has {size} bytes where its header (shape {dims}) needs {expected} (truncated?)"
        )
    return dims


def _check_mnist_raw(raw_dir: Path, names: dict[str, Path] | None = None) -> None:
    """Check the four MNIST-format files in ``raw_dir``: whole IDX files, as many labels as images per split.

    ``names`` maps a raw file name to the file that errors should name (the shared ``.gz`` it came from).
    """
    names = names or {}
    shapes = {raw: _idx_shape(raw_dir / raw, names.get(raw)) for raw in _MNIST_RAW}
    for images, labels in (_MNIST_RAW[:2], _MNIST_RAW[2:]):
        if len(shapes[images]) != 3 or len(shapes[labels]) != 1 or shapes[images][0] != shapes[labels][0]:
            raise CorruptDatasetError(
                names.get(labels, raw_dir / labels),
                f"shape {shapes[labels]} does not fit the images' {shapes[images]} ({names.get(images, images)})",
            )


def _trim_zeros(value: str) -> str:
    """``"-1.0000"`` -> ``"-1"``, ``"0.8620"`` -> ``"0.862"``: the same number in fewer bytes (faster bz2)."""
    return value.rstrip("0").rstrip(".") if "." in value else value


def _usps_line(line: str) -> str:
    """One ESL USPS line (label v1..v256) as a LIBSVM line ("" for a blank line); ValueError when malformed."""
    tokens = line.split()
    if not tokens:
        return ""
    if len(tokens) != 257:
        raise ValueError(f"{len(tokens)} values where a label and 256 pixels are expected")
    label = float(tokens[0])
    if label not in range(10):
        raise ValueError(f"label {tokens[0]!r} is not a digit 0..9")
    if not np.isfinite(np.array(tokens[1:], dtype=np.float64)).all():  # ValueError for a word that is no number
        raise ValueError("a pixel value is not finite")
    pairs = " ".join(f"{i}:{_trim_zeros(v)}" for i, v in enumerate(tokens[1:], start=1))
    return f"{int(label) + 1} {pairs}\n"


def _usps_to_libsvm(src: Path, dst: Path) -> None:
    """ESL ``zip.*.gz`` text (label v1..v256) -> torchvision's LIBSVM bz2 (label+1 then index:value pairs)."""
    lines = []
    try:
        with gzip.open(src, "rt") as f:
            for number, line in enumerate(f, start=1):
                try:
                    lines.append(_usps_line(line))
                except ValueError as err:
                    raise CorruptDatasetError(src, f"line {number}: {err}") from err
    except _GZIP_ERRORS as err:
        raise CorruptDatasetError(src, f"truncated or corrupt gzip data ({type(err).__name__}: {err})") from err
    except UnicodeDecodeError as err:
        raise CorruptDatasetError(src, f"not a text file ({err})") from err
    lines = [line for line in lines if line]
    if not lines:
        raise CorruptDatasetError(src, "no images in it")
    with bz2.open(dst, "wt", compresslevel=1) as f:
        f.writelines(lines)


def _cifar_bin_to_pickle(src: Path, dst: Path) -> None:
    """CIFAR binary records (label byte + 3072 pixel bytes) -> a python-pickle batch like torchvision's."""
    size = src.stat().st_size
    if size == 0 or size % 3073:
        raise CorruptDatasetError(src, f"{size} bytes is not a whole number of 3073-byte CIFAR records (truncated?)")
    records = np.fromfile(src, dtype=np.uint8).reshape(-1, 3073)
    if int(records[:, 0].max()) > 9:
        raise CorruptDatasetError(src, f"label byte {int(records[:, 0].max())} is not a class 0..9")
    batch = {"batch_label": src.name, "labels": records[:, 0].astype(int).tolist(), "data": records[:, 1:].copy()}
    with open(dst, "wb") as f:
        pickle.dump(batch, f)


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@functools.cache
def cifar10_subset_class() -> type:
    """A subclass of torchvision's CIFAR10 reading only ``data_batch_1`` and ``test_batch`` without checksums, for
    the converted subset of the shared layout (which would fail torchvision's MD5 checks)."""
    from torchvision.datasets import CIFAR10

    class CIFAR10Subset(CIFAR10):
        train_list = [["data_batch_1", None]]
        test_list = [["test_batch", None]]
        meta = {"filename": "batches.meta", "key": "label_names", "md5": None}

    return CIFAR10Subset


def _tv_class(name: str) -> type:
    """A dataset class of ``torchvision.datasets`` by name."""
    import torchvision.datasets

    return getattr(torchvision.datasets, name)


# ------------------------------------------------------------------------------------------------ dataset specs


@dataclass(frozen=True)
class _Source:
    """How one torchvision-backed dataset is found, converted from the shared layout and read."""

    name: str
    tv_files: Callable[[bool], list[str]]  # paths (relative to a root) torchvision needs, per split
    shared_files: Callable[[bool], list[str]]  # paths (relative to a root) of the shared layout, per split
    convert: Callable[[Path, Path, bool], None]  # (shared root, output torchvision root, train)
    read: Callable[[Path, bool, bool, bool], tuple[torch.Tensor, torch.Tensor]]  # (root, train, download, cached)


_MNIST_RAW = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def _mnist_like(name: str, cls_name: str, shared: str, renames: dict[str, str]) -> _Source:
    """A MNIST-family source read by ``torchvision.datasets.<cls_name>``; ``renames`` maps torchvision raw names to
    shared ``.gz`` names (default: the raw name plus ``.gz``)."""
    shared_of = {raw: f"{shared}/{renames.get(raw, raw + '.gz')}" for raw in _MNIST_RAW}

    def convert(src: Path, out: Path, train: bool) -> None:
        for raw, rel in shared_of.items():
            _gunzip(src / rel, out / cls_name / "raw" / raw)
        _check_mnist_raw(out / cls_name / "raw", {raw: src / rel for raw, rel in shared_of.items()})

    def read(root: Path, train: bool, download: bool, cached: bool) -> tuple[torch.Tensor, torch.Tensor]:
        raw_dir = root / cls_name / "raw"
        if all((raw_dir / raw).is_file() for raw in _MNIST_RAW):  # else torchvision downloads them
            _check_mnist_raw(raw_dir)
        ds = _tv_class(cls_name)(str(root), train=train, download=download)
        return ds.data.unsqueeze(1), ds.targets.long()

    return _Source(
        name,
        tv_files=lambda train: [f"{cls_name}/raw/{raw}" for raw in _MNIST_RAW],
        shared_files=lambda train: list(shared_of.values()),
        convert=convert,
        read=read,
    )


def _usps() -> _Source:
    tv_name = {True: "usps.bz2", False: "usps.t.bz2"}
    shared_name = {True: "usps/zip.train.gz", False: "usps/zip.test.gz"}

    def read(root: Path, train: bool, download: bool, cached: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ds = _tv_class("USPS")(str(root), train=train, download=download)
        return torch.from_numpy(ds.data).unsqueeze(1), torch.as_tensor(ds.targets, dtype=torch.long)

    return _Source(
        "usps",
        tv_files=lambda train: [tv_name[train]],
        shared_files=lambda train: [shared_name[train]],
        convert=lambda src, out, train: _usps_to_libsvm(src / shared_name[train], out / tv_name[train]),
        read=read,
    )


def _cifar10() -> _Source:
    folder = "cifar-10-batches-py"
    shared = {"data_batch_1": "cifar10/data_batch_1_first4000.bin", "test_batch": "cifar10/test_batch_first1000.bin"}

    def convert(src: Path, out: Path, train: bool) -> None:
        (out / folder).mkdir(parents=True)
        for batch, rel in shared.items():
            _cifar_bin_to_pickle(src / rel, out / folder / batch)
        names_file = src / "cifar10" / "batches.meta.txt"
        names = names_file.read_text().split() if names_file.is_file() else CIFAR10_CLASSES
        with open(out / folder / "batches.meta", "wb") as f:
            pickle.dump({"label_names": names, "num_cases_per_batch": 10000, "num_vis": 3072}, f)

    def read(root: Path, train: bool, download: bool, cached: bool) -> tuple[torch.Tensor, torch.Tensor]:
        cls = cifar10_subset_class() if cached else _tv_class("CIFAR10")
        ds = cls(str(root), train=train, download=download)
        x = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        return x, torch.as_tensor(ds.targets, dtype=torch.long)

    tv = [f"{folder}/data_batch_{i}" for i in range(1, 6)] + [f"{folder}/test_batch", f"{folder}/batches.meta"]
    return _Source(
        "cifar10",
        tv_files=lambda train: tv,
        shared_files=lambda train: list(shared.values()),
        convert=convert,
        read=read,
    )


_SOURCES: dict[str, _Source] = {
    "mnist": _mnist_like("mnist", "MNIST", "mnist", {}),
    "fashion-mnist": _mnist_like("fashion-mnist", "FashionMNIST", "fashion_mnist", {}),
    "kmnist": _mnist_like(
        "kmnist",
        "KMNIST",
        "kmnist",
        {
            "train-images-idx3-ubyte": "train-images-first7011-idx3-ubyte.gz",
            "train-labels-idx1-ubyte": "train-labels-first7011-idx1-ubyte.gz",
        },
    ),
    "usps": _usps(),
    "cifar10": _cifar10(),
}


# ------------------------------------------------------------------------------------------------ file handling


def _has_all(root: Path, rel_paths: list[str]) -> bool:
    return all((root / rel).is_file() for rel in rel_paths)


def _conversion_key(source: _Source, shared_root: Path, train: bool) -> str:
    """A short hash of the shared files (path, size, mtime) so a changed source gets a fresh conversion."""
    h = hashlib.sha1(source.name.encode())
    for rel in source.shared_files(train):
        st = (shared_root / rel).stat()
        h.update(f"|{(shared_root / rel).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _converted_root(source: _Source, shared_root: Path, train: bool, cache: Path) -> Path:
    """Convert the shared layout into torchvision layout under ``cache`` once (atomically); return that root."""
    final = cache / f"{source.name}-{_conversion_key(source, shared_root, train)}"
    if final.is_dir():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache))
    try:
        source.convert(shared_root, tmp, train)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # another process may have finished first; otherwise a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _read_source(
    source: _Source, train: bool, dirs: tuple[Path, ...], cache: Path, download: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N x C x H x W) and int64 labels from the first directory holding either layout."""
    for d in dirs:
        if _has_all(d, source.tv_files(train)):
            return _read_checked(source, d, train, download, False)
    for d in dirs:
        if _has_all(d, source.shared_files(train)):
            return _read_checked(source, _converted_root(source, d, train, cache), train, False, True)
    if download:
        dirs[0].mkdir(parents=True, exist_ok=True)
        return source.read(dirs[0], train, True, False)
    missing = [
        d / rel for d in dirs for rel in source.tv_files(train) + source.shared_files(train) if not (d / rel).is_file()
    ]
    raise DatasetNotFoundError(source.name, train, list(dirs), missing)


def _read_checked(
    source: _Source, root: Path, train: bool, download: bool, cached: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``source.read`` of files that are all there; CorruptDatasetError naming them when they cannot be read."""
    try:
        x, y = source.read(root, train, download, cached)
    except CorruptDatasetError:
        raise
    except _READ_ERRORS as err:
        if isinstance(err, FileNotFoundError):
            raise
        files = ", ".join(source.tv_files(train))
        fix = "delete this converted copy to convert it again" if cached else ""
        raise CorruptDatasetError(
            root, f"cannot read {source.name} from {files} ({type(err).__name__}: {err})", fix
        ) from err
    if len(x) != len(y):
        raise CorruptDatasetError(root, f"{len(x)} {source.name} images but {len(y)} labels")
    return x, y


# ----------------------------------------------------------------------------------------------- tensor helpers


def _normalize(x: torch.Tensor, name: str) -> torch.Tensor:
    """Scale [0, 1] float images (N x C x H x W) in place by the dataset's per-channel mean and std."""
    mean, std = NORMALIZATION[name]
    shape = (1, len(mean), 1, 1)
    return x.sub_(torch.tensor(mean).view(shape)).div_(torch.tensor(std).view(shape))


def _resize(x: torch.Tensor, size: int = 28) -> torch.Tensor:
    """Bilinear resize of float images to ``size`` x ``size``."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def rotate_images(x: torch.Tensor, degrees: int, fill: float = 0.0) -> torch.Tensor:
    """Rotate images counter-clockwise by ``degrees``: exact ``rot90`` for multiples of 90, else bilinear with
    ``fill`` outside the source image."""
    if degrees % 90 == 0:
        return torch.rot90(x, k=(degrees // 90) % 4, dims=(-2, -1)).contiguous()
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    return TF.rotate(x, float(degrees), interpolation=InterpolationMode.BILINEAR, fill=[fill])


def _digits_split(train: bool, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits, stratified deterministic split: (images N x 8 x 8 in [0, 16], labels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    rng = np.random.RandomState(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test[rng.permutation(idx)[: round(test_fraction * len(idx))]] = True
    keep = ~test if train else test
    return digits.images[keep], labels[keep]


# ---------------------------------------------------------------------------------------------------- loaders


def canonical_name(name: str) -> str:
    """Lower-case, alias-resolved dataset name; ValueError listing the valid names when unknown."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in DATASET_NAMES:
        return key
    match = _RMNIST.match(key)
    if match:
        return f"rmnist-{int(match.group(1))}"
    valid = ", ".join(DATASET_NAMES)
    aliases = ", ".join(f"{a} -> {c}" for a, c in ALIASES.items())
    raise ValueError(
        f"unknown dataset {name!r}; valid names: {valid}, rmnist-<deg> (e.g. rmnist-90); aliases: {aliases}"
    )


def _load_digits(train: bool) -> LabeledImages:
    images, labels = _digits_split(train)
    x = _resize(torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0)
    return LabeledImages(_normalize(x, "digits"), torch.from_numpy(labels), 10, "digits")


def _load_source(name: str, train: bool, dirs: tuple[Path, ...], cache: Path, download: bool) -> LabeledImages:
    x_u8, y = _read_source(_SOURCES[name], train, dirs, cache, download)
    x = x_u8.float().div_(255.0)
    if name == "usps":
        x = _resize(x)
    return LabeledImages(_normalize(x, name), y, 10, name)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _load_cached(name: str, train: bool, dirs: tuple[Path, ...], cache: Path, download: bool) -> LabeledImages:
    """The normalised dataset, decoded once per process (never hand these tensors out uncopied)."""
    if name == "digits":
        return _load_digits(train)
    match = _RMNIST.match(name)
    if match:
        mnist = _load_cached("mnist", train, dirs, cache, download)
        mean, std = NORMALIZATION["mnist"]
        x = rotate_images(mnist.x, int(match.group(1)), fill=-mean[0] / std[0])  # fill = black background
        return LabeledImages(x, mnist.y, 10, name)
    return _load_source(name, train, dirs, cache, download)


def load_dataset(
    name: str, train: bool = True, root: str | Path | None = None, download: bool = False, *, copy: bool = True
) -> LabeledImages:
    """Load dataset ``name`` (train or test split) as normalised float32 images and int64 labels.

    ``root`` overrides ``$FEDMERGE_DATA``; ``download=True`` lets torchvision fetch missing files into the data root.
    Raises ``ValueError`` for unknown names and :class:`DatasetNotFoundError` when the files are missing.
    The result is a copy of the in-process cache, so it may be modified freely; ``copy=False`` skips the copy
    (about 0.2 s for MNIST train) and shares the cached tensors, which must then never be modified in place.
    """
    key = canonical_name(name)
    dirs = () if key == "digits" else tuple(data_search_dirs(root))
    data = _load_cached(key, train, dirs, cache_dir(), download)
    if not copy:
        return LabeledImages(data.x, data.y, data.num_classes, data.name)
    return LabeledImages(data.x.clone(), data.y.clone(), data.num_classes, data.name)


def clear_cache() -> None:
    """Drop the in-process cache of decoded datasets (frees memory)."""
    _load_cached.cache_clear()
