"""Data loading: the embedded set, the real Fashion-MNIST, and fixtures written in every real on-disk
format (IDX, CIFAR binary, SVHN .mat, Tiny ImageNet and ImageFolder trees) by this test file's own
writers, independent of the loader's readers."""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mttlite.data import (
    DATASETS,
    DEBIAN_FASHION_MNIST_DIR,
    EMBEDDED_DIRS,
    FASHION_MNIST_CLASSES,
    MEAN_STD,
    load_dataset,
    read_idx,
)
from mttlite.zca import ZCA

REPO = Path(__file__).resolve().parent.parent
DEBIAN = Path(DEBIAN_FASHION_MNIST_DIR)
needs_debian = pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"{DEBIAN} absent: sudo apt-get install dataset-fashion-mnist (CI installs it)",
)


# ---------------------------------------------------------------------------------------------
# Writers for the real formats (independent of mttlite)
# ---------------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """IDX by hand: 00 00 08 ndim | big-endian uint32 dims | uint8 data."""
    array = np.asarray(array, dtype=np.uint8)
    data = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data += array.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_idx_set(raw_dir: Path, rng: np.random.Generator, n_train=20, n_test=10, size=6, compress=(False, True)):
    """MNIST-style raw/ folder; train files plain/compressed per compress[0], test per compress[1]."""
    arrays = {}
    for split, n, c in (("train", n_train, compress[0]), ("t10k", n_test, compress[1])):
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        write_idx(raw_dir / f"{split}-images-idx3-ubyte", images, c)
        write_idx(raw_dir / f"{split}-labels-idx1-ubyte", labels, c)
        arrays[split] = (images, labels)
    return arrays


def normalised(pixel: float, mean: float, std: float) -> float:
    return (pixel / 255.0 - mean) / std


@pytest.fixture(scope="module")
def mini():
    return load_dataset("fashion-mnist-mini")


# ---------------------------------------------------------------------------------------------
# The embedded set
# ---------------------------------------------------------------------------------------------


def test_embedded_set_shapes_balance_and_classes(mini):
    assert mini.train_images.shape == (6000, 1, 28, 28) and mini.train_images.dtype == torch.float32
    assert mini.test_images.shape == (1000, 1, 28, 28)
    assert mini.train_labels.dtype == torch.int64
    assert torch.bincount(mini.train_labels, minlength=10).tolist() == [600] * 10
    assert torch.bincount(mini.test_labels, minlength=10).tolist() == [100] * 10
    assert mini.class_names == FASHION_MNIST_CLASSES
    assert (mini.channel, mini.im_size, mini.num_classes) == (1, (28, 28), 10)
    assert mini.zca is None and mini.mean == (0.2861,) and mini.std == (0.3530,)
    bags = mini.images_of_class(8)
    assert bags.shape == (600, 1, 28, 28) and torch.equal(bags, mini.train_images[mini.train_labels == 8])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        mini.images_of_class(10)


def test_embedded_set_pixels_and_normalisation_statistics(mini):
    # the stored tensors are exactly (pixel/255 - mean)/std of the bytes in the IDX file
    pixels = read_idx(EMBEDDED_DIRS[0] / "train-images-idx3-ubyte.gz").astype(np.float64) / 255.0  # (6000, 28, 28)
    expected = (pixels - 0.2861) / 0.3530
    np.testing.assert_allclose(mini.train_images[:, 0].double().numpy(), expected, atol=1e-5)
    labels = read_idx(EMBEDDED_DIRS[0] / "train-labels-idx1-ubyte.gz")
    assert np.array_equal(mini.train_labels.numpy(), labels)

    # The stored constants are the FULL training set's statistics; the subset's own statistics
    # differ by sampling noise only. Tolerance = 5 standard errors computed from the per-image
    # moments m1_i = mean_i(p), m2_i = mean_i(p^2) (images are the independent units):
    #   SE(mean) = sd(m1_i)/sqrt(N);  std = sqrt(m2 - m1^2), delta method:
    #   SE(std) = sd((m2_i - 2 m1 m1_i) / (2 std)) / sqrt(N).
    n = pixels.shape[0]
    m1_i, m2_i = pixels.reshape(n, -1).mean(1), (pixels.reshape(n, -1) ** 2).mean(1)
    m1, m2 = m1_i.mean(), m2_i.mean()
    std = np.sqrt(m2 - m1**2)
    se_mean = m1_i.std(ddof=1) / np.sqrt(n)
    se_std = ((m2_i - 2 * m1 * m1_i) / (2 * std)).std(ddof=1) / np.sqrt(n)
    assert abs(m1 - mini.mean[0]) < 5 * se_mean, (m1, se_mean)
    assert abs(std - mini.std[0]) < 5 * se_std, (std, se_std)
    assert se_mean < 0.003 and se_std < 0.003  # the check is tight: a wrong constant (e.g. MNIST's) fails it


def test_embedded_set_needs_no_apt_package_and_no_cwd(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("MTTLITE_FASHION_MNIST_DIR", str(empty))
    monkeypatch.chdir(tmp_path)  # the relative default root "data" does not exist here
    ds = load_dataset("fashion-mnist-mini", root=tmp_path / "nothing")
    assert ds.train_images.shape == (6000, 1, 28, 28)
    # while the full set is (correctly) unavailable in the same environment
    with pytest.raises(FileNotFoundError):
        load_dataset("fashion-mnist")


def test_embedded_checksums_match_sha256sums():
    d = EMBEDDED_DIRS[0]
    listed = {}
    for line in (d / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ")
        listed[name] = digest
    assert sorted(listed) == sorted(p.name for p in d.glob("*.gz")) and len(listed) == 4
    for name, digest in listed.items():
        assert hashlib.sha256((d / name).read_bytes()).hexdigest() == digest, name


@needs_debian
def test_embedded_files_are_a_byte_identical_rebuild_from_debian(tmp_path):
    spec = importlib.util.spec_from_file_location("make_embedded", REPO / "data" / "make_embedded.py")
    make_embedded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_embedded)
    make_embedded.build(DEBIAN, tmp_path)
    for path in sorted(EMBEDDED_DIRS[0].iterdir()):
        rebuilt = (tmp_path / path.name).read_bytes()
        if rebuilt != path.read_bytes() and path.suffix == ".gz":
            same_payload = gzip.decompress(rebuilt) == gzip.decompress(path.read_bytes())
            pytest.fail(f"{path.name} differs from a rebuild (payload identical: {same_payload}; zlib version?)")
        assert rebuilt == path.read_bytes(), path.name


# ---------------------------------------------------------------------------------------------
# The full Fashion-MNIST
# ---------------------------------------------------------------------------------------------


@needs_debian
def test_full_fashion_mnist_from_debian_files(mini, monkeypatch):
    monkeypatch.delenv("MTTLITE_FASHION_MNIST_DIR", raising=False)
    ds = load_dataset("fashion-mnist", root="/nonexistent")
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.train_labels).tolist() == [6000] * 10
    assert torch.bincount(ds.test_labels).tolist() == [1000] * 10
    p = ds.denormalize(ds.train_images, clamp=False).double()
    # the DC/MTT constants 0.2861 / 0.3530 are these statistics, rounded
    assert abs(p.mean().item() - 0.2861) < 2e-4 and abs(p.std(correction=0).item() - 0.3530) < 2e-4
    # every embedded image is one of the full set's images with the same label
    full = {bytes(x.numpy().tobytes()): int(y) for x, y in zip(p.mul(255).round().to(torch.uint8), ds.train_labels)}
    sub = mini.denormalize(mini.train_images, clamp=False).mul(255).round().to(torch.uint8)
    assert all(full.get(bytes(x.numpy().tobytes())) == int(y) for x, y in zip(sub[:200], mini.train_labels[:200]))


def test_fashion_mnist_from_root_raw_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MTTLITE_FASHION_MNIST_DIR", str(tmp_path / "no-debian"))
    arrays = write_idx_set(tmp_path / "FashionMNIST" / "raw", np.random.default_rng(0), size=28)
    ds = load_dataset("fashion-mnist", root=tmp_path)
    assert ds.train_images.shape == (20, 1, 28, 28)
    images, labels = arrays["train"]
    assert ds.train_images[5, 0, 3, 7].item() == pytest.approx(normalised(images[5, 3, 7], 0.2861, 0.3530), abs=1e-6)
    assert ds.train_labels.tolist() == labels.tolist()


def test_download_goes_through_torchvision_then_the_idx_reader(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("MTTLITE_FASHION_MNIST_DIR", str(tmp_path / "no-debian"))
    calls = []

    def fake_fashion_mnist(root, train=True, download=False):  # stands in for the network
        calls.append((root, download))
        write_idx_set(Path(root) / "FashionMNIST" / "raw", np.random.default_rng(7), size=28, compress=(True, True))

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_fashion_mnist)
    ds = load_dataset("fashion-mnist", root=tmp_path, download=True)
    assert calls == [(str(tmp_path), True)] and ds.train_images.shape == (20, 1, 28, 28)
    load_dataset("fashion-mnist", root=tmp_path)  # second time: found on disk, no download
    assert len(calls) == 1


def test_cifar_download_checks_the_published_md5(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    calls = []

    def fake_download(url, download_root, md5=None, **kw):
        calls.append((url, md5))
        base = Path(download_root) / "cifar-100-binary"
        base.mkdir(parents=True)
        rec, _, _ = cifar_records(np.random.default_rng(8), 2, 2)
        (base / "train.bin").write_bytes(rec.tobytes())
        (base / "test.bin").write_bytes(rec.tobytes())
        (base / "fine_label_names.txt").write_text("\n".join(map(str, range(100))))

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    load_dataset("cifar100", root=tmp_path, download=True)
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8")]


def test_missing_fashion_mnist_gives_one_actionable_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MTTLITE_FASHION_MNIST_DIR", str(tmp_path / "no-debian"))
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", root=tmp_path / "root")
    msg = str(info.value)
    assert "sudo apt-get install dataset-fashion-mnist" in msg
    assert "download=True" in msg and "--download" in msg
    assert str(tmp_path / "no-debian") in msg and str(tmp_path / "root" / "FashionMNIST" / "raw") in msg
    assert "train-images-idx3-ubyte" in msg


# ---------------------------------------------------------------------------------------------
# Fixtures in every real format
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [(False, False), (True, True), (False, True)])
def test_mnist_idx_plain_and_gzip(tmp_path, compress):
    arrays = write_idx_set(tmp_path / "MNIST" / "raw", np.random.default_rng(1), compress=compress)
    ds = load_dataset("mnist", root=tmp_path)
    images, labels = arrays["t10k"]
    assert ds.train_images.shape == (20, 1, 6, 6) and ds.test_images.shape == (10, 1, 6, 6)
    assert ds.class_names == [str(i) for i in range(10)]
    assert ds.test_labels.tolist() == labels.tolist()
    # a known pixel -> its hand-computed normalised value
    assert ds.test_images[4, 0, 2, 5].item() == pytest.approx(normalised(images[4, 2, 5], 0.1307, 0.3081), abs=1e-6)
    expected = (arrays["train"][0] / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(ds.train_images[:, 0].numpy(), expected, atol=1e-5)


def test_read_idx_rejects_corrupt_files(tmp_path):
    write_idx(tmp_path / "ok", np.zeros((2, 3), dtype=np.uint8), compress=False)
    assert read_idx(tmp_path / "ok").shape == (2, 3)
    (tmp_path / "short").write_bytes((tmp_path / "ok").read_bytes()[:-1])
    with pytest.raises(ValueError, match="file has"):
        read_idx(tmp_path / "short")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    # a big-endian int32 IDX (dtype code 0x0C) decodes to native values
    (tmp_path / "i4").write_bytes(b"\x00\x00\x0c\x01" + struct.pack(">I", 2) + struct.pack(">ii", -2, 70000))
    assert read_idx(tmp_path / "i4").tolist() == [-2, 70000]


def cifar_records(rng, n, label_bytes):
    """n CIFAR records: label bytes then 1024 R + 1024 G + 1024 B bytes (row-major 32 x 32 planes)."""
    labels = rng.integers(0, 10, size=(n, label_bytes), dtype=np.uint8)
    pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    return np.concatenate([labels, pixels], axis=1), labels, pixels


def test_cifar10_binary(tmp_path):
    rng = np.random.default_rng(2)
    base = tmp_path / "cifar-10-batches-bin"
    base.mkdir()
    train = []
    for i in range(1, 6):
        rec, lab, pix = cifar_records(rng, 2, 1)
        (base / f"data_batch_{i}.bin").write_bytes(rec.tobytes())
        train.append((lab, pix))
    rec, lab, pix = cifar_records(rng, 3, 1)
    (base / "test_batch.bin").write_bytes(rec.tobytes())
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (base / "batches.meta.txt").write_text("\n".join(names) + "\n\n")

    ds = load_dataset("cifar10", root=tmp_path)
    assert ds.train_images.shape == (10, 3, 32, 32) and ds.test_images.shape == (3, 3, 32, 32)
    assert ds.class_names == names
    assert ds.train_labels.tolist() == np.concatenate([t[0][:, 0] for t in train]).tolist()
    # byte 1024 + 32*h + w of a record is the green pixel at row h, column w
    h, w = 5, 17
    value = pix[1, 1024 + 32 * h + w]
    mean, std = MEAN_STD["cifar10"]
    assert ds.test_images[1, 1, h, w].item() == pytest.approx(normalised(value, mean[1], std[1]), abs=1e-6)
    blue = train[4][1][1, 2048 + 32 * 31 + 0]  # last record of the train set, blue, row 31, col 0
    assert ds.train_images[9, 2, 31, 0].item() == pytest.approx(normalised(blue, mean[2], std[2]), abs=1e-6)


def test_cifar100_binary_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(3)
    base = tmp_path / "cifar-100-binary"
    base.mkdir()
    rec, lab, pix = cifar_records(rng, 4, 2)
    lab[:, 0], lab[:, 1] = [19, 19, 19, 19], [0, 99, 50, 3]  # coarse, fine
    rec[:, :2] = lab
    (base / "train.bin").write_bytes(rec.tobytes())
    (base / "test.bin").write_bytes(rec[:2].tobytes())
    (base / "fine_label_names.txt").write_text("\n".join(f"class{i}" for i in range(100)) + "\n")
    ds = load_dataset("cifar100", root=tmp_path)
    assert ds.num_classes == 100 and ds.train_labels.tolist() == [0, 99, 50, 3]
    mean, std = MEAN_STD["cifar100"]
    assert ds.train_images[2, 0, 0, 1].item() == pytest.approx(normalised(pix[2, 1], mean[0], std[0]), abs=1e-6)


def test_cifar_missing_names_the_url(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-binary.tar.gz") as info:
        load_dataset("cifar10", root=tmp_path)
    assert "download=True" in str(info.value) and "data_batch_1.bin" in str(info.value)


def test_svhn_mat(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(4)
    (tmp_path / "svhn").mkdir()
    xs = {}
    for split, n in (("train", 5), ("test", 3)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)  # (H, W, C, N) as in the .mat files
        y = np.array([[10], [1], [2], [9], [10]][:n], dtype=np.uint8)  # 10 means digit 0
        savemat(str(tmp_path / "svhn" / f"{split}_32x32.mat"), {"X": x, "y": y})
        xs[split] = x
    ds = load_dataset("svhn", root=tmp_path)
    assert ds.train_images.shape == (5, 3, 32, 32) and ds.test_images.shape == (3, 3, 32, 32)
    assert ds.train_labels.tolist() == [0, 1, 2, 9, 0]
    mean, std = MEAN_STD["svhn"]
    value = xs["train"][7, 20, 2, 3]  # row 7, column 20, blue, image 3
    assert ds.train_images[3, 2, 7, 20].item() == pytest.approx(normalised(value, mean[2], std[2]), abs=1e-6)


def test_svhn_without_scipy_says_pip_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # makes `from scipy.io import ...` raise ImportError
    with pytest.raises(ImportError, match="pip install scipy"):
        load_dataset("svhn", root=tmp_path)


def solid_png(path: Path, rgb, size=(8, 8)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size[1], size[0]), tuple(rgb)).save(path)


def test_tiny_imagenet_layout(tmp_path):
    from PIL import Image

    base = tmp_path / "tiny-imagenet-200"
    base.mkdir()
    wnids = ["n09999999", "n01111111"]  # unsorted on purpose: labels follow sorted wnids (ImageFolder/MTT)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("n01111111\tgoldfish, Carassius auratus\nn09999999\tteapot\nn05555555\tunused\n")
    solid_png(base / "train" / "n01111111" / "images" / "n01111111_0.png", (255, 0, 0))
    solid_png(base / "train" / "n01111111" / "images" / "n01111111_1.png", (0, 255, 0))
    solid_png(base / "train" / "n09999999" / "images" / "n09999999_0.png", (10, 20, 30))
    (base / "train" / "n09999999" / "n09999999_boxes.txt").write_text("ignored\n")
    (base / "val" / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), (128, 128, 128)).save(base / "val" / "images" / "val_0.JPEG", quality=95)
    solid_png(base / "val" / "images" / "val_1.png", (0, 0, 255))
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn09999999\t0\t0\t7\t7\nval_1.png\tn01111111\t1\t1\t6\t6\n")

    ds = load_dataset("tiny-imagenet", root=tmp_path)
    assert ds.class_names == ["goldfish, Carassius auratus", "teapot"]
    assert ds.train_labels.tolist() == [0, 0, 1] and ds.test_labels.tolist() == [1, 0]
    assert ds.train_images.shape == (3, 3, 8, 8)
    mean, std = MEAN_STD["tiny-imagenet"]
    for c, value in enumerate((10, 20, 30)):  # train image 2 is the solid (10, 20, 30) one
        assert torch.allclose(ds.train_images[2, c], torch.tensor(normalised(value, mean[c], std[c])), atol=1e-6)
    grey = ds.denormalize(ds.test_images[:1]) * 255  # JPEG of a flat grey: within 1 level
    assert (grey - 128).abs().max() <= 1.01


def test_imagefolder_with_resize_and_own_statistics(tmp_path):
    solid_png(tmp_path / "train" / "cat" / "a.png", (255, 0, 0), size=(4, 4))
    solid_png(tmp_path / "train" / "cat" / "b.png", (255, 255, 0), size=(6, 4))  # different size
    solid_png(tmp_path / "train" / "dog" / "sub" / "c.png", (0, 0, 255), size=(4, 4))  # nested file counts
    solid_png(tmp_path / "val" / "dog" / "d.png", (0, 51, 0), size=(4, 4))
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")

    with pytest.raises(ValueError, match="im_size"):
        load_dataset("imagefolder", root=tmp_path)
    ds = load_dataset("imagefolder", root=tmp_path, im_size=(4, 4))
    assert ds.class_names == ["cat", "dog"] and ds.train_labels.tolist() == [0, 0, 1]
    assert ds.train_images.shape == (3, 3, 4, 4) and ds.test_labels.tolist() == [1]
    # mean/std are the training pixels' own: R = (1, 1, 0), G = (0, 1, 0), B = (0, 0, 1) per image
    np.testing.assert_allclose(ds.mean, [2 / 3, 1 / 3, 1 / 3], atol=1e-6)
    np.testing.assert_allclose(ds.std, [np.sqrt(2) / 3] * 3, atol=1e-6)
    # resizing a solid image keeps it solid; the val pixel (0, 51, 0) round-trips
    np.testing.assert_allclose(ds.denormalize(ds.test_images)[0, :, 0, 0].numpy(), [0, 0.2, 0], atol=1e-6)
    assert ds.train_images[1, 1].std().item() < 1e-6


def test_imagefolder_missing_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageFolder layout"):
        load_dataset("imagefolder", root=tmp_path)


# ---------------------------------------------------------------------------------------------
# API behaviour: names, ZCA, denormalize, devices, resizing
# ---------------------------------------------------------------------------------------------


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(ValueError) as info:
        load_dataset("imagenet-1k")
    for name in DATASETS:
        assert name in str(info.value)
    assert load_dataset("Fashion-MNIST-Mini").name == "fashion-mnist-mini"  # case-insensitive


def test_zca_whitens_with_the_train_fit_and_inverts(tmp_path):
    arrays = write_idx_set(tmp_path / "MNIST" / "raw", np.random.default_rng(5), n_train=60, n_test=10, size=4)
    ds = load_dataset("mnist", root=tmp_path, zca=True, zca_eps=0.1)
    train_p = torch.from_numpy(arrays["train"][0]).float().div(255).unsqueeze(1)  # pixels in [0, 1]
    test_p = torch.from_numpy(arrays["t10k"][0]).float().div(255).unsqueeze(1)
    assert ds.zca is not None and ds.zca.eps == 0.1
    assert ds.mean == (0.0,) and ds.std == (1.0,)  # MTT fits ZCA on un-normalised [0, 1] pixels
    reference = ZCA.fit(train_p, eps=0.1)
    torch.testing.assert_close(ds.train_images, reference(train_p))
    torch.testing.assert_close(ds.test_images, reference(test_p))  # test split: the train fit
    torch.testing.assert_close(ds.zca.inverse(ds.train_images), train_p, atol=1e-5, rtol=0)
    torch.testing.assert_close(ds.denormalize(ds.test_images), test_p, atol=1e-5, rtol=0)
    # whitened, not just normalised: pixel covariance becomes U diag(S/(S+eps)) U^T, not Sigma
    flat = ds.train_images.reshape(60, -1).double()
    cov = torch.cov(flat.T)
    sigma = torch.cov(train_p.reshape(60, -1).double().T)
    s, u = torch.linalg.eigh(sigma)
    torch.testing.assert_close(cov, (u * (s / (s + 0.1))) @ u.T, atol=1e-5, rtol=0)


def test_denormalize_and_normalize_round_trip(mini):
    pixels = torch.from_numpy(read_idx(EMBEDDED_DIRS[0] / "t10k-images-idx3-ubyte.gz")).float().div(255)
    torch.testing.assert_close(mini.denormalize(mini.test_images)[:, 0], pixels, atol=1e-6, rtol=0)
    torch.testing.assert_close(mini.normalize(pixels.unsqueeze(1)), mini.test_images, atol=1e-5, rtol=0)
    wild = torch.tensor([-10.0, 0.0, 10.0]).view(3, 1, 1, 1)
    assert mini.denormalize(wild).flatten().tolist() == [0.0, pytest.approx(0.2861), 1.0]
    assert mini.denormalize(wild, clamp=False).max().item() == pytest.approx(10 * 0.3530 + 0.2861)


def test_to_device_and_resize(tmp_path, mini):
    moved = mini.to("cpu")
    assert moved.train_images.device.type == "cpu" and moved is not mini and moved.name == mini.name
    assert "6000" in repr(mini) and len(repr(mini)) < 200  # no tensor dump
    write_idx_set(tmp_path / "MNIST" / "raw", np.random.default_rng(6), size=6)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"")  # a truncated download
    with pytest.raises(ValueError, match="not an IDX"):
        load_dataset("mnist", root=tmp_path)
    arrays = write_idx_set(tmp_path / "M2" / "MNIST" / "raw", np.random.default_rng(6), size=6)
    ds = load_dataset("mnist", root=tmp_path / "M2", im_size=(3, 3))
    assert ds.train_images.shape == (20, 1, 3, 3) and ds.im_size == (3, 3)
    # resizing never leaves the pixel range: each output is a weighted average of input pixels
    p = ds.denormalize(ds.train_images, clamp=False)
    lo = arrays["train"][0].reshape(20, -1).min(1) / 255.0
    hi = arrays["train"][0].reshape(20, -1).max(1) / 255.0
    assert (p.reshape(20, -1).min(1).values.numpy() >= lo - 1e-6).all()
    assert (p.reshape(20, -1).max(1).values.numpy() <= hi + 1e-6).all()


def test_holdout_validation_carves_a_balanced_disjoint_split(mini):
    from mttlite.data import holdout_validation

    ds = holdout_validation(mini, 20, seed=0)
    K = mini.num_classes
    assert len(ds.val_labels) == 20 * K and len(ds.train_labels) == len(mini.train_labels) - 20 * K
    assert torch.bincount(ds.val_labels, minlength=K).tolist() == [20] * K
    # train ∪ val is the original training set, as a multiset of (image, label) rows, and they share no row
    rows = lambda x, y: {(bytes(a.numpy().tobytes()), int(b)) for a, b in zip(x, y)}  # noqa: E731
    train, val = rows(ds.train_images, ds.train_labels), rows(ds.val_images, ds.val_labels)
    assert not train & val and train | val == rows(mini.train_images, mini.train_labels)
    assert ds.val_spec == {"per_class": 20, "seed": 0} and ds.test_images is mini.test_images
    # the same seed gives the same split; another seed another one; the remaining order is kept
    again = holdout_validation(mini, 20, seed=0)
    assert torch.equal(again.val_images, ds.val_images) and torch.equal(again.train_images, ds.train_images)
    assert not torch.equal(holdout_validation(mini, 20, seed=1).val_images, ds.val_images)
    with pytest.raises(ValueError, match="already has a validation split"):
        holdout_validation(ds, 5)
    with pytest.raises(ValueError, match="leaves no training image"):
        holdout_validation(mini, 10**6)
    with pytest.raises(ValueError, match="positive integer"):
        holdout_validation(mini, 0)
