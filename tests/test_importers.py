"""Importing sets made elsewhere: each format round-trips to the same tensors, the space is never
guessed, nothing is unpickled, and every bad file is one SetImportError naming the file, with
nothing written.

Fixtures write each format the way its producer does: the MTT authors' distill.py
(``torch.save`` of plain tensors, the lr as ``syn_lr.item()``), an ImageFolder of PNGs (PIL), and
tensor files (``safetensors.torch.save_file``, ``torch.save`` of a dict)."""
from __future__ import annotations

import builtins
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mttlite.data import load_dataset
from mttlite.evaluate import random_real_subset
from mttlite.importers import (
    SetImportError,
    detect_format,
    import_set,
    load_authors,
    load_folder,
    load_tensor_file,
    read_set,
    torch_load_plain,
)
from mttlite.synset import SyntheticSet

MEAN, STD = 0.2861, 0.3530  # Fashion-MNIST's published constants


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ds():
    return load_dataset("fashion-mnist-mini")


@pytest.fixture(scope="module")
def ds_zca():
    return load_dataset("fashion-mnist-mini", zca=True)


@pytest.fixture(scope="module")
def real(ds):
    """20 real images (2 per class) in the normalised space, and their labels."""
    return random_real_subset(ds, 2, seed=5)


def tree(path: Path) -> dict:
    """Every file under ``path`` -> sha256 of its bytes (to show an import wrote nothing)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


def refuses(call, folder: Path, *fragments: str) -> str:
    """``call()`` raises SetImportError (a ValueError) holding every fragment, and ``folder`` is unchanged."""
    before = tree(folder)
    with pytest.raises(SetImportError) as info:
        call()
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    for f in fragments:
        assert f in message, (f, message)
    assert tree(folder) == before, "an import wrote or changed a file"
    return message


def write_authors(folder: Path, x, y, lr=0.0123, tag="best") -> Path:
    """What the authors' distill.py writes (lr saved as a Python float, ``syn_lr.item()``)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(x.cpu(), folder / f"images_{tag}.pt")
    torch.save(y.cpu(), folder / f"labels_{tag}.pt")
    if lr is not None:
        torch.save(lr, folder / f"lr_{tag}.pt")
    return folder


# --- the authors' format -------------------------------------------------------------------------


@pytest.mark.parametrize("lr", [0.0123, torch.tensor(0.0123)])
def test_authors_round_trip(tmp_path, ds, real, lr):
    x, y = real
    run = write_authors(tmp_path / "run", x, y, lr=lr)
    for path in (run, run / "images_best.pt"):  # the folder or the images file
        s = load_authors(path, ds, "normalised")
        assert torch.equal(s.images, x) and torch.equal(s.labels, y) and s.labels.dtype == torch.int64
        assert s.syn_lr == pytest.approx(0.0123, rel=1e-7) and s.method == "mtt" and s.ipc == 2
        assert (s.dataset, s.mean, s.std, s.zca) == (ds.name, (MEAN,), (STD,), None)
        p = s.provenance
        assert (p["format"], p["space"], p["tag"]) == ("authors", "normalised", "best")
        assert p["files"][str(run / "images_best.pt")] == hashlib.sha256((run / "images_best.pt").read_bytes()).hexdigest()
        assert any("TEST" in n for n in p["notes"])  # images_best.pt was chosen on the test set: said so
        s.check_dataset(ds)
    assert detect_format(run) == "authors" == detect_format(run / "images_best.pt")


def test_authors_zca_space_needs_the_zca_dataset(tmp_path, ds, ds_zca):
    xz = ds_zca.train_images[:10]
    run = write_authors(tmp_path / "run", xz, torch.arange(10))
    s = load_authors(run, ds_zca, "zca")
    assert torch.equal(s.images, xz) and s.zca is ds_zca.zca and s.provenance["space"] == "zca"
    refuses(lambda: load_authors(run, ds, "zca"), tmp_path, "loaded without ZCA", "zca=True")
    refuses(lambda: load_authors(run, ds_zca, "normalised"), tmp_path, "loaded with ZCA")


def test_authors_space_is_never_guessed(tmp_path, ds, real):
    run = write_authors(tmp_path / "run", *real)
    refuses(lambda: load_authors(run, ds, None), tmp_path, "images_best.pt", "--space normalised", "--space zca",
            "--space pixels")


def test_authors_pixels_space_is_normalised_here(tmp_path, ds, real):
    x, y = real
    p = ds.denormalize(x)  # pixels in [0, 1]
    s = load_authors(write_authors(tmp_path / "run", p, y), ds, "pixels")
    torch.testing.assert_close(s.images, (p - MEAN) / STD, rtol=0, atol=1e-6)
    # normalised values claimed to be pixels: refused, with the likely fix
    normalised = write_authors(tmp_path / "n", x, y)
    refuses(lambda: load_authors(normalised, ds, "pixels"), tmp_path, "--space normalised")


def test_authors_iteration_without_lr_and_several_saves(tmp_path, ds, real):
    x, y = real
    run = write_authors(tmp_path / "run", x, y, lr=None, tag="5000")
    s = load_authors(run, ds, "normalised")
    assert s.syn_lr is None and s.provenance["tag"] == "5000"
    assert any("lr_5000.pt" in n for n in s.provenance["notes"])
    write_authors(run, x, y, tag="best")
    msg = refuses(lambda: load_authors(run, ds, "normalised"), tmp_path, "2 saved sets", "pass one file")
    assert "images_5000.pt" in msg and "images_best.pt" in msg
    assert load_authors(run / "images_5000.pt", ds, "normalised").syn_lr is None
    # forks write into <run>/Normal/
    write_authors(tmp_path / "fork" / "Normal", x, y)
    assert load_authors(tmp_path / "fork", ds, "normalised").syn_lr == pytest.approx(0.0123)


def test_soft_labels_are_kept(tmp_path, ds, real):
    x, y = real
    soft = torch.softmax(torch.randn(len(y), 10, generator=torch.Generator().manual_seed(0)), 1)
    s = load_authors(write_authors(tmp_path / "run", x, soft), ds, "normalised")
    assert torch.equal(s.labels, soft)


# --- the folder format ---------------------------------------------------------------------------


def write_png_folder(root: Path, names: list[str], per_class: int = 2, mode: str = "L", size=(28, 28)):
    """PNGs of known uint8 pixels; returns (pixels (n, H, W) uint8 in file order, labels (n,))."""
    rng = np.random.default_rng(0)
    pixels, labels = [], []
    for c, name in sorted(enumerate(names), key=lambda t: t[1]):  # file order = sorted folder names
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            u8 = rng.integers(0, 256, size=size, dtype=np.uint8)
            img = Image.fromarray(u8) if mode == "L" else Image.fromarray(np.stack([u8] * 3, -1))
            img.save(root / name / f"{i}.png")
            pixels.append(u8)
            labels.append(c)
    return torch.from_numpy(np.stack(pixels)), torch.tensor(labels)


def test_png_folder_round_trip(tmp_path, ds):
    # folders named by class name, by index, and <index>_<name> (what export_imagefolder writes)
    names = ["T-shirt/top".replace("/", "_"), "1", "02_Pullover", "Dress", "coat"] + [str(i) for i in range(5, 10)]
    u8, y = write_png_folder(tmp_path / "set", names)
    s = load_folder(tmp_path / "set", ds)
    order = torch.argsort(y, stable=True)  # compare class by class
    expected = (u8.float() / 255.0 - MEAN) / STD
    torch.testing.assert_close(s.images[torch.argsort(s.labels, stable=True)][:, 0], expected[order], rtol=0, atol=1e-6)
    assert torch.equal(torch.sort(s.labels).values, torch.sort(y).values)
    assert s.provenance["format"] == "folder" and s.provenance["space"] == "pixels" and s.syn_lr is None
    assert detect_format(tmp_path / "set") == "folder"


@pytest.mark.parametrize("labels", ["hard", "soft"])
def test_export_imagefolder_round_trip(tmp_path, ds, real, labels):
    """mttlite's own export (RGB PNGs with R = G = B, folders <index>_<name>, labels.json) comes back
    as the same set, to 8-bit quantisation."""
    x, y = real
    if labels == "soft":
        y = 0.8 * torch.nn.functional.one_hot(y, 10).float() + 0.02
    s0 = SyntheticSet(images=x, labels=y, syn_lr=None, dataset=ds.name, class_names=ds.class_names,
                      mean=ds.mean, std=ds.std, method="random")
    s0.export_imagefolder(tmp_path / "out")
    s = load_folder(tmp_path / "out", ds)
    order = torch.argsort(torch.argmax(y, 1) if labels == "soft" else y, stable=True)  # files are class-major
    torch.testing.assert_close(s.images, x[order], rtol=0, atol=0.5 / 255 / STD + 1e-6)
    assert torch.equal(s.labels, y[order])


def test_folder_bad_images(tmp_path, ds):
    write_png_folder(tmp_path / "colour", ["0", "1"], mode="RGB")
    img = np.zeros((28, 28, 3), np.uint8)
    img[..., 0] = 200  # red: not grey
    Image.fromarray(img).save(tmp_path / "colour" / "0" / "red.png")
    refuses(lambda: load_folder(tmp_path / "colour", ds), tmp_path, "colour", "1 channel")
    write_png_folder(tmp_path / "small", ["0", "1"], size=(14, 14))
    refuses(lambda: load_folder(tmp_path / "small", ds), tmp_path, "1x14x14", "1x28x28")
    write_png_folder(tmp_path / "names", ["Sneaker", "Bicycle"])
    refuses(lambda: load_folder(tmp_path / "names", ds), tmp_path, "Bicycle", "match no class")
    write_png_folder(tmp_path / "mixed", ["0", "1"])
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "mixed" / "1" / "odd.png")
    refuses(lambda: load_folder(tmp_path / "mixed", ds), tmp_path, "different sizes")
    (tmp_path / "broken" / "3").mkdir(parents=True)
    (tmp_path / "broken" / "3" / "x.png").write_bytes(b"not a png")
    refuses(lambda: load_folder(tmp_path / "broken", ds), tmp_path, "x.png", "not a readable image")
    (tmp_path / "empty").mkdir()
    refuses(lambda: load_folder(tmp_path / "empty", ds), tmp_path, "no class subfolders")


# --- tensor files ------------------------------------------------------------------------------


def test_safetensors_and_pt_round_trip(tmp_path, ds, real):
    x, y = real
    save_file({"images": x, "labels": y, "syn_lr": torch.tensor(0.03)}, str(tmp_path / "set.safetensors"))
    torch.save({"images": x, "labels": y}, tmp_path / "set.pt")
    for name, lr in (("set.safetensors", 0.03), ("set.pt", None)):
        s = load_tensor_file(tmp_path / name, ds, "normalised")
        assert torch.equal(s.images, x) and torch.equal(s.labels, y) and s.method == "imported"
        assert s.syn_lr == (pytest.approx(lr) if lr else None) and s.provenance["format"] == "tensor"
        assert detect_format(tmp_path / name) == "tensor"
    # a mttlite set is recognised as such, and loads as itself
    s.save(tmp_path / "mine.safetensors")
    assert detect_format(tmp_path / "mine.safetensors") == "mttlite"
    assert torch.equal(import_set(tmp_path / "mine.safetensors", ds).images, x)
    refuses(lambda: load_tensor_file(tmp_path / "mine.safetensors", ds, "normalised"), tmp_path, "--format mttlite")


# --- bad files: one error each, naming the file, nothing written -------------------------------------


class Evil:
    """Unpickling this would create the file ``marker``: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def test_pickles_are_refused_not_run(tmp_path, ds, real):
    marker = tmp_path / "pwned"
    run = write_authors(tmp_path / "run", *real)
    torch.save({"images": real[0], "payload": Evil(marker)}, run / "images_best.pt")
    msg = refuses(lambda: load_authors(run, ds, "normalised"), tmp_path, "images_best.pt", "pickled object",
                  "weights_only=True")
    assert "never unpickles" in msg and not marker.exists()
    torch.save(Evil(marker), tmp_path / "evil.pt")
    refuses(lambda: load_tensor_file(tmp_path / "evil.pt", ds, "normalised"), tmp_path, "evil.pt", "pickled object")
    refuses(lambda: torch_load_plain(tmp_path / "evil.pt"), tmp_path, "pickled object")
    assert not marker.exists()


def test_each_bad_file_is_one_clear_error(tmp_path, ds, real):
    x, y = real
    cases = {  # name -> (images, labels, lr, fragments of the message)
        "shape": (x[:, 0], y, 0.01, ["4-d tensor"]),
        "count": (x, y[:-1], 0.01, ["20 images but labels of shape (19,)"]),
        "classes": (x, y + 5, 0.01, ["labels span [5, 14]", "10 classes"]),
        "nan": (x.clone().index_fill_(0, torch.tensor([3]), float("nan")), y, 0.01, ["NaN", "image 3"]),
        "channels": (x.repeat(1, 3, 1, 1), y, 0.01, ["3x28x28", "1x28x28"]),
        "size": (x[..., :20, :20], y, 0.01, ["1x20x20", "1x28x28"]),
        "lr": (x, y, -0.01, ["-0.01", "--lr"]),
        "labels": (x, torch.ones(len(y), dtype=torch.bool), 0.01, ["bool"]),
    }
    for name, (images, labels, lr, fragments) in cases.items():
        run = write_authors(tmp_path / name, images, labels, lr=lr)
        refuses(lambda run=run: load_authors(run, ds, "normalised"), tmp_path, name, *fragments)
    # damaged and missing files
    run = write_authors(tmp_path / "cut", x, y)
    data = (run / "images_best.pt").read_bytes()
    (run / "images_best.pt").write_bytes(data[: len(data) // 2])
    refuses(lambda: load_authors(run, ds, "normalised"), tmp_path, "images_best.pt", "damaged")
    run = write_authors(tmp_path / "nolabels", x, y)
    os.remove(run / "labels_best.pt")
    refuses(lambda: load_authors(run, ds, "normalised"), tmp_path, "labels_best.pt", "missing")
    refuses(lambda: load_authors(tmp_path / "nowhere", ds, "normalised"), tmp_path, "nowhere")
    save_file({"images": x}, str(tmp_path / "half.safetensors"))
    refuses(lambda: load_tensor_file(tmp_path / "half.safetensors", ds, "normalised"), tmp_path, "half.safetensors",
            "lacks ['labels']")
    torch.save([x, y], tmp_path / "list.pt")
    refuses(lambda: load_tensor_file(tmp_path / "list.pt", ds, "normalised"), tmp_path, "list.pt", "must hold a dict")
    (tmp_path / "text.safetensors").write_text("no tensors here")
    refuses(lambda: read_set(tmp_path / "text.safetensors", "tensor"), tmp_path, "text.safetensors", "not a readable")


def test_normalised_space_needs_published_constants(tmp_path, real):
    """imagefolder data sets get their mean/std from their own pixels: a normalised set made elsewhere
    cannot be matched to them (pixels can)."""
    root = tmp_path / "data"
    for split in ("train", "test"):
        write_png_folder(root / split, ["a", "b"], per_class=3, size=(8, 8))
    folder_ds = load_dataset("imagefolder", root=root)
    x = torch.zeros(2, 3, 8, 8)
    run = write_authors(tmp_path / "run", x, torch.tensor([0, 1]))
    refuses(lambda: load_authors(run, folder_ds, "normalised"), tmp_path, "--space pixels")
    s = load_authors(run, folder_ds, "pixels")
    assert s.class_names == ["a", "b"] and s.images.shape == (2, 3, 8, 8)
