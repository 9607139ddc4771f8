"""Real image datasets as resident tensors: what the experts train on and D_syn is distilled from.

MTT touches the real training set in two places: the experts train on it (stage 1), and
D_syn is initialised from random real images of each class (stage 4). Both are fastest when
the whole set already sits on the device as two tensors,

    train_images (N, C, H, W) float32      train_labels (N,) int64

so a mini-batch is an index, ``x[idx]``, with no DataLoader, worker processes or PIL in the
hot path. ``load_dataset`` builds them once:

    pixels in {0..255}  ->  p = pixels / 255 in [0, 1]
                        ->  x = (p - mean_c) / std_c                (per channel c, DC/MTT constants)
    with zca=True       ->  x = ZCA_fit(train p)(p)                 (mttlite.zca; MTT CIFAR setting)

ZCA convention (as the MTT code, ``utils.get_dataset``): when ``--zca`` is on, the transform
is ``ToTensor()`` only, i.e. the kornia ZCA is fitted on raw [0, 1] pixels, not on mean/std
normalised ones. The normaliser matters because eps = 0.1 is absolute: dividing by
std ~ 0.2 first would scale every eigenvalue by ~25 and make eps ~25x weaker. So with
``zca=True`` this module stores ``mean = (0,)*C, std = (1,)*C`` (the affine map actually
applied) and ``Dataset.zca`` holds the fitted transform; ``denormalize`` undoes both.

Sets (``DATASETS``), all read from their original on-disk formats, never from pickles:

    fashion-mnist-mini  embedded in the package: 600 train + 100 test real Fashion-MNIST
                        images per class (see data/README.md); needs no network, no apt
    fashion-mnist       IDX files from the Debian package dataset-fashion-mnist
                        (/usr/share/datasets/fashion-mnist) or ROOT/FashionMNIST/raw/
    mnist               IDX files in ROOT/MNIST/raw/
    cifar10, cifar100   the *binary* versions (fixed-size records), ROOT/cifar-10-batches-bin/,
                        ROOT/cifar-100-binary/
    svhn                ROOT/svhn/{train,test}_32x32.mat (scipy.io.loadmat)
    tiny-imagenet       ROOT/tiny-imagenet-200/ (val/ is the test split, as in MTT)
    imagefolder         ROOT/{train,test|val}/<class>/<image> (torchvision ImageFolder layout)
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .zca import ZCA

DATASETS: tuple[str, ...] = (
    "fashion-mnist-mini",
    "fashion-mnist",
    "mnist",
    "cifar10",
    "cifar100",
    "svhn",
    "tiny-imagenet",
    "imagefolder",
)

# Per-channel mean / std of the training pixels in [0, 1], as in the DC / DSA / MTT code.
MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2861,), (0.3530,)),
    "fashion-mnist-mini": ((0.2861,), (0.3530,)),  # the full set's constants (the subset is within 0.5%)
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny-imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DIGITS = [str(i) for i in range(10)]

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_DIR_ENV = "MTTLITE_FASHION_MNIST_DIR"

_PACKAGE_DIR = Path(__file__).resolve().parent
# The embedded set ships inside the package (works from an install and from any cwd);
# the repo-level data/ folder is a fallback for a checkout that keeps a copy there.
EMBEDDED_DIRS: tuple[Path, ...] = (
    _PACKAGE_DIR / "_data" / "fashion-mnist-mini",
    _PACKAGE_DIR.parent / "data" / "fashion-mnist-mini",
)

IDX_FILES = {  # split -> (images, labels), names as published (append .gz for the compressed files)
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
CIFAR100_MD5 = "03b5dce01913d631647c71ecec9e9cb8"
SVHN_FILES = {  # split -> (url, md5), the md5s torchvision.datasets.SVHN checks
    "train": ("http://ufldl.stanford.edu/housenumbers/train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "test": ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
}
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ---------------------------------------------------------------------------------------------
# The dataset object
# ---------------------------------------------------------------------------------------------


@dataclass(repr=False)
class Dataset:
    """A whole labelled image set, resident on one device.

    train_images: (N, C, H, W) float32, x = (p - mean) / std, then ZCA-whitened if zca is set
    train_labels: (N,) int64 in [0, num_classes)
    test_images, test_labels: the same for the test split (whitened with the *train* ZCA)
    mean, std: the per-channel affine map applied to pixels p in [0, 1] (length C)
    zca: the fitted ZCA (on train p) or None
    val_images, val_labels: a validation split held out of the training set (``holdout_validation``),
        or None. Experts, distillation and baselines only ever see ``train_*``; the split is for
        choosing anything that is chosen (iterations, learning rates) without touching the test set.
    val_spec: how the split was carved, ``{"per_class": v, "seed": s}``, or None
    """

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    zca: ZCA | None = None
    val_images: Tensor | None = None
    val_labels: Tensor | None = None
    val_spec: dict | None = None

    @property
    def channel(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def im_size(self) -> tuple[int, int]:
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def device(self) -> torch.device:
        return self.train_images.device

    def images_of_class(self, c: int) -> Tensor:
        """All training images of class c: (N_c, C, H, W)."""
        if not 0 <= int(c) < self.num_classes:
            raise ValueError(f"class index must be in [0, {self.num_classes}); got {c}")
        return self.train_images[self.train_labels == int(c)]

    def to(self, device) -> Dataset:
        """A copy with every tensor (and the ZCA) on ``device``."""
        return dataclasses.replace(
            self,
            train_images=self.train_images.to(device),
            train_labels=self.train_labels.to(device),
            test_images=self.test_images.to(device),
            test_labels=self.test_labels.to(device),
            zca=None if self.zca is None else self.zca.to(device),
            val_images=None if self.val_images is None else self.val_images.to(device),
            val_labels=None if self.val_labels is None else self.val_labels.to(device),
        )

    def _affine(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return mean, std

    def normalize(self, pixels: Tensor) -> Tensor:
        """Pixels p in [0, 1], (N, C, H, W) -> model inputs x = ZCA((p - mean) / std)."""
        mean, std = self._affine(pixels)
        x = (pixels - mean) / std
        return x if self.zca is None else self.zca(x)

    def denormalize(self, x: Tensor, clamp: bool = True) -> Tensor:
        """Model inputs x (N, C, H, W) -> pixels p = ZCA^-1(x) * std + mean, clamped to [0, 1] for display."""
        if self.zca is not None:
            x = self.zca.inverse(x)
        mean, std = self._affine(x)
        p = x * std + mean
        return p.clamp(0.0, 1.0) if clamp else p

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={tuple(self.train_images.shape)}, "
            f"test={tuple(self.test_images.shape)}, classes={self.num_classes}, "
            f"zca={f'eps={self.zca.eps:g}' if self.zca is not None else None}, device={self.device})"
        )


def holdout_validation(dataset: Dataset, per_class: int, seed: int = 0) -> Dataset:
    """A copy of ``dataset`` whose training set no longer holds ``per_class`` images of each class:
    they become ``val_images`` / ``val_labels``, a split that experts, distillation and baselines
    never see (they read ``train_*`` only).

    The split is a pure function of (the training labels, ``per_class``, ``seed``): for each class
    c, a permutation of its images drawn from ``torch.Generator().manual_seed(seed)`` (classes in
    order), and its first ``per_class`` entries go to validation. Remaining training images keep
    their original order. ZCA (if any) stays the one fitted on the full training set.
    """
    if dataset.val_images is not None:
        raise ValueError(f"{dataset.name} already has a validation split ({dataset.val_spec})")
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be a positive integer, got {per_class!r}")
    labels = dataset.train_labels.cpu()
    counts = torch.bincount(labels, minlength=dataset.num_classes)
    if per_class >= int(counts.min()):
        raise ValueError(f"per_class={per_class} leaves no training image in the smallest class of "
                         f"{dataset.name} ({int(counts.min())} images)")
    gen = torch.Generator().manual_seed(int(seed))
    val_mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(dataset.num_classes):
        members = torch.nonzero(labels == c).flatten()
        val_mask[members[torch.randperm(len(members), generator=gen)[:per_class]]] = True
    keep, val = torch.nonzero(~val_mask).flatten(), torch.nonzero(val_mask).flatten()
    dev = dataset.train_images.device
    keep, val = keep.to(dev), val.to(dev)
    return dataclasses.replace(
        dataset,
        train_images=dataset.train_images[keep].contiguous(), train_labels=dataset.train_labels[keep],
        val_images=dataset.train_images[val].contiguous(), val_labels=dataset.train_labels[val],
        val_spec={"per_class": int(per_class), "seed": int(seed)},
    )


# ---------------------------------------------------------------------------------------------
# File formats
# ---------------------------------------------------------------------------------------------

# IDX (LeCun's MNIST format): magic = 0x00 0x00 <dtype code> <ndim>, then ndim big-endian
# uint32 sizes, then the row-major data, big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzip-compressed or not, detected from its first bytes) into numpy."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims, dtype=np.int64))
    if len(raw) != header + count * dtype.itemsize:
        raise ValueError(
            f"{path}: IDX header says shape {dims} of {dtype} ({header + count * dtype.itemsize} bytes), "
            f"file has {len(raw)} bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))  # native byte order, writable copy


def _find(directory: Path, name: str) -> Path | None:
    """``directory/name`` or ``directory/name.gz``, whichever exists."""
    for candidate in (directory / name, directory / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _has_idx_set(directory: Path) -> bool:
    return all(_find(directory, f) is not None for pair in IDX_FILES.values() for f in pair)


class _Raw(NamedTuple):
    """A split pair in pixel space: uint8 images (N, C, H, W), int64 labels (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]


def _read_idx_set(directory: Path, class_names: list[str]) -> _Raw:
    """train/t10k image + label IDX files -> uint8 (N, 1, H, W) images, int64 labels."""
    out = []
    for split in ("train", "test"):
        img_name, lab_name = IDX_FILES[split]
        images = read_idx(_find(directory, img_name))
        labels = read_idx(_find(directory, lab_name)).astype(np.int64)
        if images.ndim != 3 or images.dtype != np.uint8 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"{directory}: expected uint8 images (N, H, W) and labels (N,); "
                f"got {images.dtype} {images.shape} and {labels.shape}"
            )
        out += [images[:, None], labels]
    return _Raw(*out, class_names=class_names)


def _idx_error(title: str, searched: Sequence[str], raw_dir: Path, how: Sequence[str]) -> FileNotFoundError:
    files = ", ".join(f for pair in IDX_FILES.values() for f in pair)
    lines = [f"{title} not found. Searched:"] + [f"  {s}" for s in searched]
    lines += ["Get it in one of these ways:"] + [f"  {h}" for h in how]
    lines += [f"  put the 4 files ({files}, each optionally .gz) in {raw_dir}/"]
    return FileNotFoundError("\n".join(lines))


def _read_cifar_bin(path: Path, label_bytes: int, label_index: int) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR binary records: ``label_bytes`` label bytes, then 3072 = 3 x 32 x 32 pixel bytes (R, G, B planes).

    Returns uint8 images (N, 3, 32, 32) and the int64 label at byte ``label_index``.
    """
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + 3 * 32 * 32
    if raw.size == 0 or raw.size % record:
        raise ValueError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR records")
    raw = raw.reshape(-1, record)
    labels = raw[:, label_index].astype(np.int64)
    images = np.ascontiguousarray(raw[:, label_bytes:]).reshape(-1, 3, 32, 32)
    return images, labels


def _read_names(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _list_images(directory: Path) -> list[Path]:
    """Every image file under ``directory`` (recursive), sorted by path."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _decode_images(paths: Sequence[Path], im_size: tuple[int, int] | None) -> np.ndarray:
    """Decode image files to uint8 RGB (N, 3, H, W); resize each to ``im_size`` (H, W) with PIL bilinear."""
    from PIL import Image

    def one(path: Path) -> np.ndarray:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im_size is not None and (im.height, im.width) != tuple(im_size):
                im = im.resize((im_size[1], im_size[0]), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)

    if len(paths) == 0:
        raise ValueError("no images to decode")
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(one, paths))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        first = {}
        for p, a in zip(paths, arrays):
            first.setdefault(a.shape, p)
        examples = ", ".join(f"{p} is {s[0]}x{s[1]}" for s, p in list(first.items())[:3])
        raise ValueError(f"images have different sizes ({examples}); pass im_size=(H, W) to resize them")
    return np.stack(arrays).transpose(0, 3, 1, 2).copy()  # (N, H, W, 3) -> (N, 3, H, W)


# ---------------------------------------------------------------------------------------------
# One reader per dataset: root -> _Raw (uint8 pixels, int64 labels, class names)
# ---------------------------------------------------------------------------------------------


def _embedded_dir() -> Path:
    for d in EMBEDDED_DIRS:
        if _has_idx_set(d):
            return d
    raise FileNotFoundError(
        "the embedded fashion-mnist-mini files are missing from "
        + " and ".join(str(d) for d in EMBEDDED_DIRS)
        + "; rebuild them with `python data/make_embedded.py` (needs the Debian package dataset-fashion-mnist)"
    )


def _load_fashion_mnist_mini(root: Path, download: bool) -> _Raw:
    return _read_idx_set(_embedded_dir(), FASHION_MNIST_CLASSES)


def _load_fashion_mnist(root: Path, download: bool) -> _Raw:
    debian = Path(os.environ.get(FASHION_MNIST_DIR_ENV) or DEBIAN_FASHION_MNIST_DIR)
    raw_dir = root / "FashionMNIST" / "raw"
    for d in (debian, raw_dir):
        if _has_idx_set(d):
            return _read_idx_set(d, FASHION_MNIST_CLASSES)
    if download:
        import torchvision

        torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
        return _read_idx_set(raw_dir, FASHION_MNIST_CLASSES)
    raise _idx_error(
        "Fashion-MNIST",
        [f"{debian}  (Debian package dataset-fashion-mnist; override with ${FASHION_MNIST_DIR_ENV})", str(raw_dir)],
        raw_dir,
        [
            ("sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu; installs the files in "
            f"{DEBIAN_FASHION_MNIST_DIR})"),
            ("load_dataset('fashion-mnist', download=True), or --download on the command line "
            f"(torchvision downloads into {raw_dir}/)"),
        ],
    )


def _load_mnist(root: Path, download: bool) -> _Raw:
    raw_dir = root / "MNIST" / "raw"
    if _has_idx_set(raw_dir):
        return _read_idx_set(raw_dir, DIGITS)
    if download:
        import torchvision

        torchvision.datasets.MNIST(str(root), train=True, download=True)
        return _read_idx_set(raw_dir, DIGITS)
    raise _idx_error(
        "MNIST",
        [str(raw_dir)],
        raw_dir,
        [f"load_dataset('mnist', download=True), or --download (torchvision downloads into {raw_dir}/)"],
    )


def _cifar_missing(title: str, files: Sequence[Path], url: str, root: Path) -> FileNotFoundError:
    missing = [str(f) for f in files if not f.is_file()]
    return FileNotFoundError(
        f"{title} (binary version) not found; missing: {', '.join(missing)}.\n"
        f"Pass download=True (--download), or download {url} and extract it into {root}/"
    )


def _download_archive(url: str, root: Path, md5: str) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(url, download_root=str(root), md5=md5)


def _load_cifar10(root: Path, download: bool) -> _Raw:
    base = root / "cifar-10-batches-bin"
    train_files = [base / f"data_batch_{i}.bin" for i in range(1, 6)]
    files = train_files + [base / "test_batch.bin", base / "batches.meta.txt"]
    if not all(f.is_file() for f in files):
        if not download:
            raise _cifar_missing("CIFAR-10", files, CIFAR10_URL, root)
        _download_archive(CIFAR10_URL, root, CIFAR10_MD5)
    parts = [_read_cifar_bin(f, label_bytes=1, label_index=0) for f in train_files]
    test_images, test_labels = _read_cifar_bin(base / "test_batch.bin", label_bytes=1, label_index=0)
    return _Raw(
        np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
        test_images, test_labels, _read_names(base / "batches.meta.txt"),
    )


def _load_cifar100(root: Path, download: bool) -> _Raw:
    base = root / "cifar-100-binary"
    files = [base / "train.bin", base / "test.bin", base / "fine_label_names.txt"]
    if not all(f.is_file() for f in files):
        if not download:
            raise _cifar_missing("CIFAR-100", files, CIFAR100_URL, root)
        _download_archive(CIFAR100_URL, root, CIFAR100_MD5)
    # records: <coarse label byte> <fine label byte> <3072 pixel bytes>; MTT uses the 100 fine labels
    train = _read_cifar_bin(base / "train.bin", label_bytes=2, label_index=1)
    test = _read_cifar_bin(base / "test.bin", label_bytes=2, label_index=1)
    return _Raw(*train, *test, _read_names(base / "fine_label_names.txt"))


def _load_svhn(root: Path, download: bool) -> _Raw:
    try:
        from scipy.io import loadmat
    except ImportError as e:  # pragma: no cover - scipy is a test dependency
        raise ImportError(
            "SVHN is stored as MATLAB .mat files; reading them needs scipy: pip install scipy "
            "(or pip install 'mttlite[svhn]')"
        ) from e
    base = root / "svhn"
    out = []
    for split, (url, md5) in SVHN_FILES.items():
        path = base / f"{split}_32x32.mat"
        if not path.is_file():
            if not download:
                raise FileNotFoundError(
                    f"SVHN {split} split not found at {path}.\n"
                    f"Pass download=True (--download), or download {url} into {base}/"
                )
            from torchvision.datasets.utils import download_url

            download_url(url, str(base), path.name, md5)
        mat = loadmat(str(path))
        x = mat["X"]  # (32, 32, 3, N) uint8: (H, W, C, N)
        y = mat["y"].reshape(-1).astype(np.int64)  # (N,), digit 0 is stored as label 10
        out += [np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8), y % 10]
    return _Raw(*out, class_names=DIGITS)


def _load_tiny_imagenet(root: Path, download: bool, im_size: tuple[int, int] | None = None) -> _Raw:
    base = root / "tiny-imagenet-200"
    needed = [base / "wnids.txt", base / "train", base / "val" / "images", base / "val" / "val_annotations.txt"]
    if not all(p.exists() for p in needed):
        if not download:
            missing = ", ".join(str(p) for p in needed if not p.exists())
            raise FileNotFoundError(
                f"Tiny ImageNet not found; missing: {missing}.\n"
                f"Pass download=True (--download), or download {TINY_IMAGENET_URL} and unzip it into {root}/"
            )
        _download_archive(TINY_IMAGENET_URL, root, TINY_IMAGENET_MD5)
    # Classes in sorted wnid order: the order torchvision's ImageFolder (and so MTT) gives them.
    wnids = sorted(_read_names(base / "wnids.txt"))
    index = {w: i for i, w in enumerate(wnids)}
    words = {}
    if (base / "words.txt").is_file():
        for line in (base / "words.txt").read_text().splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid] = text.strip()
    class_names = [words.get(w, w) for w in wnids]

    train_paths, train_labels = [], []
    for w in wnids:
        paths = _list_images(base / "train" / w)
        if not paths:
            raise FileNotFoundError(f"Tiny ImageNet: no training images under {base / 'train' / w}")
        train_paths += paths
        train_labels += [index[w]] * len(paths)

    test_paths, test_labels = [], []
    for line in (base / "val" / "val_annotations.txt").read_text().splitlines():
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        if fields[1] not in index:
            raise ValueError(f"Tiny ImageNet: val image {fields[0]} has wnid {fields[1]} not in wnids.txt")
        test_paths.append(base / "val" / "images" / fields[0])
        test_labels.append(index[fields[1]])

    return _Raw(
        _decode_images(train_paths, im_size), np.asarray(train_labels, dtype=np.int64),
        _decode_images(test_paths, im_size), np.asarray(test_labels, dtype=np.int64), class_names,
    )


def _load_imagefolder(root: Path, download: bool, im_size: tuple[int, int] | None = None) -> _Raw:
    train_dir = root / "train"
    test_dir = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise FileNotFoundError(
            f"imagefolder: expected {train_dir}/<class>/<images> and {root / 'test'}/<class>/<images> "
            f"(or {root / 'val'}/...), the torchvision ImageFolder layout; pass root=<that folder>"
        )
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"imagefolder: no class folders in {train_dir}")
    extra = sorted(d.name for d in test_dir.iterdir() if d.is_dir() and d.name not in classes)
    if extra:
        raise ValueError(f"imagefolder: {test_dir} has classes {extra} that {train_dir} lacks; classes: {classes}")

    def split(directory: Path) -> tuple[np.ndarray, np.ndarray]:
        paths, labels = [], []
        for i, c in enumerate(classes):
            found = _list_images(directory / c) if (directory / c).is_dir() else []
            paths += found
            labels += [i] * len(found)
        if not paths:
            raise FileNotFoundError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {directory}")
        return _decode_images(paths, im_size), np.asarray(labels, dtype=np.int64)

    return _Raw(*split(train_dir), *split(test_dir), class_names=classes)


_READERS = {
    "fashion-mnist-mini": _load_fashion_mnist_mini,
    "fashion-mnist": _load_fashion_mnist,
    "mnist": _load_mnist,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "svhn": _load_svhn,
    "tiny-imagenet": _load_tiny_imagenet,
    "imagefolder": _load_imagefolder,
}
_DECODES_WITH_PIL = ("tiny-imagenet", "imagefolder")  # these resize per image while decoding


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def load_dataset(
    name: str = "fashion-mnist-mini",
    root: str | os.PathLike = "data",
    device="cpu",
    zca: bool = False,
    zca_eps: float = 0.1,
    download: bool = False,
    im_size: tuple[int, int] | None = None,
) -> Dataset:
    """Load a whole dataset onto ``device`` as normalised float32 tensors.

    name:     one of ``DATASETS``
    root:     data root (ROOT/FashionMNIST/raw, ROOT/cifar-10-batches-bin, ...); for "imagefolder"
              the folder holding train/ and test/ (or val/); unused by "fashion-mnist-mini"
    zca:      whiten with a ZCA fitted on the training pixels (MTT's --zca; see module docstring)
    download: fetch a missing set from its official source (needs network)
    im_size:  (H, W) to resize every image to (bilinear, antialiased); None keeps the native size
    """
    key = str(name).strip().lower()
    if key not in _READERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if im_size is not None:
        im_size = (int(im_size[0]), int(im_size[1]))
    root = Path(root).expanduser().absolute()

    if key in _DECODES_WITH_PIL:
        raw = _READERS[key](root, download, im_size=im_size)
    else:
        raw = _READERS[key](root, download)
    _check_labels(key, raw)

    def pixels(u8: np.ndarray) -> Tensor:
        # uint8 -> device first (4x less to copy), then p = pixels / 255 in [0, 1]      (N, C, H, W)
        p = torch.from_numpy(u8).to(device).float().div_(255.0)
        if im_size is not None and tuple(p.shape[-2:]) != im_size:
            p = F.interpolate(p, size=im_size, mode="bilinear", align_corners=False, antialias=True)
        return p

    train_p, test_p = pixels(raw.train_images), pixels(raw.test_images)
    if train_p.shape[1:] != test_p.shape[1:]:
        raise ValueError(
            f"{key}: train images are {tuple(train_p.shape[1:])} but test images {tuple(test_p.shape[1:])}; "
            "pass im_size=(H, W) to resize both"
        )
    channels = train_p.shape[1]

    if zca:
        # MTT: ZCA on raw [0, 1] pixels, no mean/std normalisation (see module docstring).
        mean, std = (0.0,) * channels, (1.0,) * channels
        whiten = ZCA.fit(train_p, eps=zca_eps)
        train_x, test_x = whiten(train_p), whiten(test_p)
    else:
        whiten = None
        if key in MEAN_STD:
            mean, std = MEAN_STD[key]
        else:  # imagefolder: statistics of its own training pixels
            mean = tuple(train_p.mean(dim=(0, 2, 3), dtype=torch.float64).tolist())
            std = tuple(train_p.double().std(dim=(0, 2, 3), correction=0).clamp_min(1e-8).tolist())
        if len(mean) != channels:
            raise ValueError(f"{key}: {channels} image channels but {len(mean)} normalisation constants")
        view = (1, channels, 1, 1)
        m = torch.tensor(mean, device=train_p.device).view(view)
        s = torch.tensor(std, device=train_p.device).view(view)
        train_x, test_x = (train_p - m) / s, (test_p - m) / s  # x = (p - mean_c) / std_c

    return Dataset(
        name=key,
        train_images=train_x.contiguous(),
        train_labels=torch.from_numpy(raw.train_labels).to(device),
        test_images=test_x.contiguous(),
        test_labels=torch.from_numpy(raw.test_labels).to(device),
        class_names=list(raw.class_names),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        zca=whiten,
    )


def _check_labels(key: str, raw: _Raw) -> None:
    k = len(raw.class_names)
    for split, images, labels in (("train", raw.train_images, raw.train_labels), ("test", raw.test_images, raw.test_labels)):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{key} {split}: {images.shape[0]} images but {labels.shape[0]} labels")
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"{key} {split}: labels span [{labels.min()}, {labels.max()}] but there are {k} classes")
