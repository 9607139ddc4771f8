"""Build the embedded ``fashion-mnist-mini`` set: a class-balanced subset of the real Fashion-MNIST.

    python data/make_embedded.py                     # reads the Debian package files, writes into the package
    python data/make_embedded.py --src DIR --out DIR

Selection (exact, so anyone can rebuild byte-identical files):

    rng = numpy.random.default_rng(0)                      one generator, used in this order:
    for split in (train, test):                            train: 600 per class, test: 100 per class
        for c in 0..9:
            chosen_c = rng.permutation(indices of class c in the split)[:per_class]
        keep = sort(concatenate(chosen_0..chosen_9))       original order of the published files

The kept images and labels are written as IDX files (the published format: magic
00 00 08 <ndim>, big-endian uint32 sizes, uint8 data), gzip level 6 with mtime 0 and no
file name in the header, so the bytes depend only on the input and zlib; then SHA256SUMS
(``sha256sum -c`` format). Every file is written to a temp file and renamed into place.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
try:
    from mttlite.data import (
        DEBIAN_FASHION_MNIST_DIR,
        EMBEDDED_DIRS,
        FASHION_MNIST_DIR_ENV,
        IDX_FILES,
        read_idx,
    )
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))
    from mttlite.data import (
        DEBIAN_FASHION_MNIST_DIR,
        EMBEDDED_DIRS,
        FASHION_MNIST_DIR_ENV,
        IDX_FILES,
        read_idx,
    )

SEED = 0
PER_CLASS = {"train": 600, "test": 100}
NUM_CLASSES = 10
DEFAULT_OUT = EMBEDDED_DIRS[0]  # mttlite/_data/fashion-mnist-mini: ships inside the package


def select(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``per_class`` random examples of each class 0..9 (classes visited in order)."""
    chosen = []
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        if members.size < per_class:
            raise ValueError(f"class {c} has only {members.size} examples, need {per_class}")
        chosen.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(chosen))


def idx_bytes(array: np.ndarray) -> bytes:
    """uint8 array -> IDX bytes: 00 00 08 <ndim>, the sizes as big-endian uint32, the data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def gzip_bytes(data: bytes) -> bytes:
    """Deterministic gzip: level 6 (level 9 is 10x slower for 1% smaller files), mtime 0, no file name in the header."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=6, mtime=0) as f:
        f.write(data)
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _source_file(src: Path, name: str) -> Path:
    for p in (src / (name + ".gz"), src / name):
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"{src / (name + '.gz')} not found: install the Debian package (sudo apt-get install "
        f"dataset-fashion-mnist) or pass --src DIR holding the 4 Fashion-MNIST IDX files"
    )


def build(src: Path, out: Path) -> dict[str, str]:
    """Write the subset's 4 .gz files and SHA256SUMS into ``out``; return {file name: sha256}."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    sums = {}
    for split in ("train", "test"):  # order matters: one generator for both splits
        img_name, lab_name = IDX_FILES[split]
        images = read_idx(_source_file(src, img_name))  # (N, 28, 28) uint8
        labels = read_idx(_source_file(src, lab_name))  # (N,) uint8
        keep = select(labels, PER_CLASS[split], rng)
        for name, array in ((img_name, images[keep]), (lab_name, labels[keep])):
            data = gzip_bytes(idx_bytes(array))
            write_atomic(out / (name + ".gz"), data)
            sums[name + ".gz"] = hashlib.sha256(data).hexdigest()
    listing = "".join(f"{h}  {n}\n" for n, h in sorted(sums.items()))
    write_atomic(out / "SHA256SUMS", listing.encode())
    return sums


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--src", type=Path,
        default=Path(os.environ.get(FASHION_MNIST_DIR_ENV) or DEBIAN_FASHION_MNIST_DIR),
        help="folder with the full Fashion-MNIST IDX files (default: the Debian package dir)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    for name, digest in sorted(build(args.src, args.out).items()):
        print(f"{digest}  {args.out / name}")


if __name__ == "__main__":
    main()
